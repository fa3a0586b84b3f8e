#!/usr/bin/env bash
# GPU check: ONE script for a machine with an NVIDIA GPU, nvcc, cmake and
# ninja, but no Go and no network. It builds ggml's CUDA backend from the
# ggml source, then runs `sbora-serve check`, which prints
#   - GPU vs CPU logits for stories260K and a 7B-shaped 2-layer model: base,
#     FA, FB, LoRA and a composition, and a mixed batch against solo runs,
#     each with its bound (PASS/FAIL);
#   - decode throughput (32 sequences) and server throughput (64 concurrent
#     requests over HTTP), base vs 8 and 64 distinct adapters;
#   - 20 FA training steps on the GPU (loss must fall) and the saved
#     adapter's eval loss against the engine's.
# Budget: about 5 minutes of build on 16 cores, 2 of checks; the whole run is
# capped at 8 minutes.
#
# Inputs (prepare them with `make gpu-bundle` on a machine with Go):
#   SBORA_BIN   the prebuilt binary            (default bin/sbora-serve)
#   GGML_SRC    ggml's source tree             (default build/ggml-src)
#   CUDA_CMAKE  deploy/cuda (CMakeLists.txt)   (default: next to this script)
#   SHARED      the shared assets (models/)    (default ../shared)
#   CUDA_ARCHITECTURES                         (default 90: H100/H200)
#   OUT         where results go               (default $OUT or /tmp/gpu-check)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
SBORA_BIN="${SBORA_BIN:-$root/bin/sbora-serve}"
GGML_SRC="${GGML_SRC:-$root/build/ggml-src}"
CUDA_CMAKE="${CUDA_CMAKE:-$here/cuda}"
SHARED="${SHARED:-$root/../shared}"
ARCH="${CUDA_ARCHITECTURES:-90}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

deadline=$((SECONDS + 480))
left() { echo $((deadline - SECONDS)); }
step() { echo; echo "### $* (t=${SECONDS}s)"; }

for tool in nvcc cmake ninja nvidia-smi; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
[ -x "$SBORA_BIN" ] || { echo "no binary at $SBORA_BIN" >&2; exit 2; }
[ -f "$GGML_SRC/src/ggml-cuda/CMakeLists.txt" ] || { echo "no ggml source at $GGML_SRC" >&2; exit 2; }
[ -f "$SHARED/models/stories260K.gguf" ] || { echo "no stories260K.gguf under $SHARED/models" >&2; exit 2; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvcc --version | tail -1
nproc

step "build libggml-cuda (sm_$ARCH)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
build_start=$SECONDS
cmake -S "$CUDA_CMAKE" -B "$work/build" -G Ninja -DGGML_SRC="$GGML_SRC" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log"; exit 1; }
timeout "$(left)" cmake --build "$work/build" --target ggml-cuda -j "$(nproc)" > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in $((SECONDS - build_start)) s"
# The binary looks in <its directory>/../lib/ollama.
mkdir -p "$work/bin" "$work/lib/ollama"
cp "$SBORA_BIN" "$work/bin/sbora-serve"
cp -P "$work/build/lib/ollama/"libggml-base.so* "$work/build/lib/ollama/libggml-cuda.so" "$work/lib/ollama/"
bin="$work/bin/sbora-serve"

step "models"
cp "$SHARED/models/stories260K.gguf" "$work/stories260K.gguf"
"$bin" model random --preset 7b --layers 2 --out "$work/7b-2layer.gguf" > /dev/null
ls -la "$work"/*.gguf

step "check (logits, throughput, training)"
timeout "$(left)" "$bin" check --model "$work/stories260K.gguf" --model "$work/7b-2layer.gguf" \
  --train-model "$work/stories260K.gguf" --streams 64 | tee "$OUT/check.txt"
status=${PIPESTATUS[0]}
echo
echo "finished in ${SECONDS}s, status $status"
exit "$status"
