package ggmlx

/*
// ggml-cpu's flash attention is C++ compiled with GCC's default
// floating-point contraction (a*b + c as one fused multiply-add); cgo
// compiles C without it. Asking for it here makes the scalar updates
// below, and the vector helpers inlined from ggml's vec.h, round as
// ggml's do.
#pragma GCC optimize ("fp-contract=fast")
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"
#include "ggml-cpu/vec.h"

// Paged attention for the CPU backend: causal attention reading each
// query's keys and values straight from the KV pool through its
// sequence's block table, instead of from a gathered contiguous copy (a
// copy of every sequence's keys and values, in every layer, every step).
//
// The arithmetic is ggml-cpu's flash attention (flash_attn_ext), step for
// step, with its dot products and vector helpers: for an F16 cache the
// query rounded to F16 and an F16 accumulator, as llama.cpp computes, so
// logits stay llama.cpp's. The loop order is not: positions outside,
// heads inside, so each step reads one whole key row and value row of the
// pool (all of a thread's heads, contiguous) where ggml walks one head's
// slices at the row stride (one short read per position, 8 KiB apart in a
// 7B model, which defeats the hardware prefetcher).
//
// Layouts (ggml order): dst [D, H, N] F32 (one row per query token and
// head); src[0] q [D, H, N] F32; src[1], src[2] key and value pools
// [kvDim, rows] F16 or F32 (row = block·blockSize + offset, kvDim = KVH·D);
// src[3] block table I32 [maxBlocks, seqs]; src[4] I32 [2, N]: per query
// token its sequence and the last position it may attend to. userdata
// packs the block size (low 32 bits) and the F32 bits of the scale.

// Scratch lives on the stack (40 KiB at most): runs of up to 8 heads of up
// to 512 dimensions.
enum { SBORA_PAGED_HEADS = 8, SBORA_PAGED_MAX_D = 512 };

static void sbora_paged_attn(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
	const uint64_t ud = (uint64_t) (uintptr_t) userdata;
	const int64_t bs = (int64_t) (uint32_t) ud;
	const uint32_t scale_bits = (uint32_t) (ud >> 32);
	float scale;
	memcpy(&scale, &scale_bits, sizeof scale);

	const struct ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2];
	const struct ggml_tensor * table = dst->src[3], * where = dst->src[4];
	const int D = (int) q->ne[0];
	const int64_t H = q->ne[1], N = q->ne[2];
	const int64_t group = H / (k->ne[0] / D);
	const int64_t max_blocks = table->ne[0];
	const int vf16 = v->type == GGML_TYPE_F16;
	const size_t k_head = ggml_row_size(k->type, D), v_head = ggml_row_size(v->type, D);

	const enum ggml_type k_vec_dot_type = ggml_get_type_traits_cpu(k->type)->vec_dot_type;
	const ggml_from_float_t q_to_vec_dot = ggml_get_type_traits_cpu(k_vec_dot_type)->from_float;
	const ggml_vec_dot_t kq_vec_dot = ggml_get_type_traits_cpu(k->type)->vec_dot;
	const size_t q_row = ggml_row_size(k_vec_dot_type, D);

	// Per head of the run: the query in the dot product's type, the
	// accumulator (F16 for an F16 cache, as in ggml; else F32), the running
	// maximum and sum.
	char Q_q[SBORA_PAGED_HEADS * SBORA_PAGED_MAX_D * sizeof(float)];
	float VKQ32[SBORA_PAGED_HEADS * SBORA_PAGED_MAX_D];
	ggml_fp16_t VKQ16[SBORA_PAGED_HEADS * SBORA_PAGED_MAX_D];
	float M[SBORA_PAGED_HEADS], S[SBORA_PAGED_HEADS];

	// Work units are (query token, run of heads), dealt round-robin: every
	// thread gets early and late tokens (a causal prefill's rows grow with
	// the position) and, for one token, its own heads.
	const int64_t runs = (H + SBORA_PAGED_HEADS - 1) / SBORA_PAGED_HEADS;
	const int64_t per_token = runs >= nth ? runs : (H < nth ? H : nth);
	for (int64_t u = ith; u < N * per_token; u += nth) {
		const int64_t t = u / per_token, r = u % per_token;
		const int64_t h0 = H * r / per_token, h1 = H * (r + 1) / per_token;
		const int32_t * w = (const int32_t *) ((const char *) where->data + t * where->nb[1]);
		const int32_t * blocks = (const int32_t *) ((const char *) table->data + w[0] * table->nb[1]);
		const int64_t last = w[1];
		for (int64_t hs = h0; hs < h1; hs += SBORA_PAGED_HEADS) {
			const int nh = (int) ((hs + SBORA_PAGED_HEADS < h1 ? hs + SBORA_PAGED_HEADS : h1) - hs);
			for (int i = 0; i < nh; i++) {
				M[i] = -INFINITY;
				S[i] = 0.0f;
				const float * pq = (const float *) ((const char *) q->data + (hs + i) * q->nb[1] + t * q->nb[2]);
				q_to_vec_dot(pq, Q_q + i * q_row, D);
			}
			if (vf16) {
				memset(VKQ16, 0, sizeof(ggml_fp16_t) * nh * D);
			} else {
				memset(VKQ32, 0, sizeof(float) * nh * D);
			}
			for (int64_t ic = 0; ic <= last && ic / bs < max_blocks; ic++) {
				const int64_t row = (int64_t) blocks[ic / bs] * bs + ic % bs;
				const char * krow = (const char *) k->data + row * k->nb[1];
				const char * vrow = (const char *) v->data + row * v->nb[1];
				for (int i = 0; i < nh; i++) {
					const int64_t kvh = (hs + i) / group;
					float s;
					kq_vec_dot(D, &s, 0, krow + kvh * k_head, 0, Q_q + i * q_row, 0, 1);
					s = s * scale;
					s += 0.0f; // the causal mask's allowed entries, as in ggml

					// A new maximum rescales the accumulator by ms (< 1) and
					// adds v with weight 1; otherwise v adds with weight vs.
					const int new_max = s > M[i];
					float ms = 1.0f;
					float vs = 1.0f;
					if (new_max) {
						ms = expf(M[i] - s);
						M[i] = s;
					} else {
						vs = expf(s - M[i]);
					}
					const char * v_data = vrow + kvh * v_head;
					if (vf16) {
						if (new_max) {
							ggml_vec_scale_f16(D, VKQ16 + i * D, ms);
						}
						ggml_vec_mad_f16(D, VKQ16 + i * D, (const ggml_fp16_t *) v_data, vs);
					} else {
						if (new_max) {
							ggml_vec_scale_f32(D, VKQ32 + i * D, ms);
						}
						ggml_vec_mad_f32(D, VKQ32 + i * D, (const float *) v_data, vs);
					}
					S[i] = S[i] * ms + vs;
				}
			}
			for (int i = 0; i < nh; i++) {
				float * out = (float *) ((char *) dst->data + (hs + i) * dst->nb[1] + t * dst->nb[2]);
				if (vf16) {
					for (int j = 0; j < D; j++) {
						out[j] = GGML_CPU_FP16_TO_FP32(VKQ16[i * D + j]);
					}
				} else {
					memcpy(out, VKQ32 + i * D, sizeof(float) * D);
				}
				const float S_inv = S[i] == 0.0f ? 0.0f : 1.0f / S[i];
				ggml_vec_scale_f32(D, out, S_inv);
			}
		}
	}
}

static struct ggml_tensor * sbora_paged_attn_op(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
		struct ggml_tensor * v, struct ggml_tensor * table, struct ggml_tensor * where, int block_size, float scale) {
	struct ggml_tensor * args[5] = { q, k, v, table, where };
	uint32_t scale_bits;
	memcpy(&scale_bits, &scale, sizeof scale_bits);
	const uint64_t ud = ((uint64_t) scale_bits << 32) | (uint32_t) block_size;
	return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, args, 5, sbora_paged_attn,
		GGML_N_TASKS_MAX, (void *) (uintptr_t) ud);
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/ollama/ollama/ml"
)

// PagedHeadDimLimit is the largest head size PagedAttention takes.
const PagedHeadDimLimit = C.SBORA_PAGED_MAX_D

// PagedAttention is causal attention read through block tables (one CPU
// graph node): q [D, H, N] F32 (N query tokens, after RoPE); keys and
// values the KV pool [KVH·D, rows] of one layer, row = block·blockSize +
// offset; table I32 [maxBlocks, seqs], each sequence's blocks in order;
// where I32 [2, N], per query token its sequence (a column of table) and
// the last position it attends to. It returns [D, H, N] (ollama's flash
// attention output layout). H must be a multiple of KVH. The op runs on
// the CPU only (see PagedOK).
func PagedAttention(ctx ml.Context, q, keys, values, table, where ml.Tensor, blockSize int, scale float32) ml.Tensor {
	rq, rk := rawTensor(q), rawTensor(keys)
	switch {
	case rq._type != C.GGML_TYPE_F32 || rq.ne[0] > PagedHeadDimLimit:
		panic(fmt.Sprintf("ggmlx: paged attention of a %d-wide query of type %d", rq.ne[0], rq._type))
	case rk.ne[0]%rq.ne[0] != 0 || rq.ne[1]%(rk.ne[0]/rq.ne[0]) != 0:
		panic(fmt.Sprintf("ggmlx: paged attention: %d query heads of %d over %d-wide keys", rq.ne[1], rq.ne[0], rk.ne[0]))
	case !kvType(keys) || !kvType(values):
		panic(fmt.Sprintf("ggmlx: paged attention over key and value types %d, %d", rk._type, rawTensor(values)._type))
	case blockSize <= 0 || int64(blockSize) > 1<<31-1 || unsafe.Sizeof(uintptr(0)) < 8:
		panic(fmt.Sprintf("ggmlx: paged attention with block size %d", blockSize))
	}
	return wrap(ctx, C.sbora_paged_attn_op(rawContext(ctx), rq, rk, rawTensor(values), rawTensor(table), rawTensor(where),
		C.int(blockSize), C.float(scale)))
}

// PagedOK reports whether PagedAttention can read keys and values: both
// in host memory (the CPU backend computes the op), F16 or F32.
func PagedOK(keys, values ml.Tensor) bool {
	return OnHost(keys) && OnHost(values) && kvType(keys) && kvType(values)
}

func kvType(t ml.Tensor) bool {
	typ := rawTensor(t)._type
	return typ == C.GGML_TYPE_F16 || typ == C.GGML_TYPE_F32
}
