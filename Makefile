# sbora-serve build. cgo compiles ggml (through ollama's Go packages) and, for
# tests, llama.cpp; the flags below make that fast and reproducible.

GO ?= go
# Explicit ISA level: -march=native fails to link on AMX CPUs, and ggml's
# default build has no AVX (4-6x slower matmuls).
ARCH_FLAGS ?= -O3 -march=x86-64-v3
OLLAMA_DIR := $(shell $(GO) mod download github.com/ollama/ollama >/dev/null 2>&1; $(GO) list -m -f '{{.Dir}}' github.com/ollama/ollama)

export CGO_ENABLED := 1
export CGO_CFLAGS := $(ARCH_FLAGS)
export CGO_CXXFLAGS := $(ARCH_FLAGS)
# ggml headers (and its internal backend header) for internal/ggmlx; llama.cpp
# headers and a miniaudio stand-in for the test oracle (llama/oracle).
# GGML_USE_CPU_REPACK compiles ggml-cpu's weight repacking (its "extra buffer
# types", on by default in llama.cpp's own build; ollama's cgo build leaves
# them out), which both sbora-serve and the llama.cpp oracle use.
export CGO_CPPFLAGS := -DGGML_USE_CPU_REPACK -I$(OLLAMA_DIR)/ml/backend/ggml/ggml/include -I$(OLLAMA_DIR)/ml/backend/ggml/ggml/src -I$(OLLAMA_DIR)/llama/llama.cpp/include -I$(CURDIR)/llama/oracle/include

TEST_TIMEOUT ?= 40m
PKGS := ./...

MODEL ?= $(CURDIR)/../shared/models/stories260K.gguf
PROMPT ?= Once upon a time

.PHONY: all build cuda gpu-bundle run generate testdeps test vet fmt-check bench bench-decode clean

all: build

build:
	$(GO) build -o bin/sbora-serve ./cmd/sbora-serve

# ggml's CUDA backend, built from the pinned module's source into lib/ollama
# (next to bin/, where the binary looks). Needs nvcc and cmake, not a GPU.
# CUDA_ARCHITECTURES: 90 = H100/H200; e.g. "80;86;89;90" for several.
CUDA_ARCHITECTURES ?= 90
CUDA_BUILD ?= build/cuda
CUDA_JOBS ?= $(shell nproc)
cuda:
	cmake -S deploy/cuda -B $(CUDA_BUILD) $(if $(shell command -v ninja),-G Ninja) \
		-DGGML_SRC=$(OLLAMA_DIR)/ml/backend/ggml/ggml -DCMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHITECTURES)"
	cmake --build $(CUDA_BUILD) --target ggml-cuda -j $(CUDA_JOBS)
	mkdir -p lib/ollama
	cp -P $(CUDA_BUILD)/lib/ollama/libggml-base.so* $(CUDA_BUILD)/lib/ollama/libggml-cuda.so lib/ollama/

# What deploy/gpu-check.sh needs on a GPU machine without Go: the binary
# and ggml's source (about 28 MiB together).
gpu-bundle: build
	rm -rf build/ggml-src && mkdir -p build
	cp -r $(OLLAMA_DIR)/ml/backend/ggml/ggml build/ggml-src && chmod -R u+w build/ggml-src

# The main job: the server on the default model with two demo adapters.
run: build
	MODEL=$(MODEL) ./deploy/run-demo.sh

# A one-off greedy generation with the default model.
generate: build
	./bin/sbora-serve generate --model $(MODEL) --prompt "$(PROMPT)" --max-tokens 64 --temperature 0

vet:
	$(GO) vet $(PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# The openai npm client drives the server in serve's tests.
OPENAI_CLIENT := serve/testdata/openai-client
testdeps: $(OPENAI_CLIENT)/node_modules/openai/package.json

$(OPENAI_CLIENT)/node_modules/openai/package.json: $(OPENAI_CLIENT)/package.json $(OPENAI_CLIENT)/package-lock.json
	cd $(OPENAI_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# -p 1: test binaries run one at a time. Each drives ggml with all cores,
# and ggml's spinning threads slow down 30-60x when two binaries share
# the cores.
test: fmt-check vet build testdeps
	$(GO) test -p 1 -timeout $(TEST_TIMEOUT) $(PKGS)

bench:
	$(GO) test -run '^$$' -bench . -benchtime 20x ./kernels

bench-decode:
	$(GO) run ./bench/decode --model $(MODEL) --tokens 200
	$(GO) run ./bench/decode --synthetic 7b --layers 2 --tokens 32

clean:
	rm -rf bin lib build
