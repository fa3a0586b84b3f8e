package ggmlx

/*
#include <stdint.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SBORA_AVX2 1
#endif

// Fused adapter ops for the CPU backend. ggml's mul_mat_id computes the
// out×r products of adapter B matrices as one r-long dot product per
// output row and token (a function call each); these kernels do the
// products for all outputs of a token in one loop and add them to the
// base projection in place, in one graph node per module.
//
// Layouts (ggml order): h [out, T] F32; B stack [R, out, S] F16 or F32 (row
// o of slot s holds B[o, 0..R)); idx [R, S] I32; ids [used, T] I32 (slot 0:
// none); scales [1, used, T] F32; for FA x [in, T] F32 (z = x[idx]), for
// LoRA z [r, used, T] F32 (A·x, computed by mul_mat_id).

enum { SBORA_EXPAND_FA = 0, SBORA_EXPAND_Z = 1 };

static inline float sbora_dot(const char * b, int btype, const float * z, int r) {
	float s = 0;
	int j = 0;
#if SBORA_AVX2
	__m256 acc = _mm256_setzero_ps();
	if (btype == GGML_TYPE_F16) {
		for (; j + 8 <= r; j += 8) {
			__m256 bv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (b + 2 * j)));
			acc = _mm256_fmadd_ps(bv, _mm256_loadu_ps(z + j), acc);
		}
	} else {
		for (; j + 8 <= r; j += 8) {
			acc = _mm256_fmadd_ps(_mm256_loadu_ps((const float *) b + j), _mm256_loadu_ps(z + j), acc);
		}
	}
	__m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
	lo = _mm_add_ps(lo, hi);
	lo = _mm_hadd_ps(lo, lo);
	lo = _mm_hadd_ps(lo, lo);
	s = _mm_cvtss_f32(lo);
#endif
	for (; j < r; j++) {
		float bj = btype == GGML_TYPE_F16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) b)[j]) : ((const float *) b)[j];
		s += bj * z[j];
	}
	return s;
}

// dst (= h, in place) += Σ_k scale·B_slot·z over the tokens; src: h, B,
// idx, ids, scales, x-or-z. userdata packs r and the mode.
static void sbora_expand(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
	const uintptr_t ud = (uintptr_t) userdata;
	const int r = (int) (ud & 0xffff), mode = (int) (ud >> 16);
	const struct ggml_tensor * B = dst->src[1], * idx = dst->src[2], * ids = dst->src[3], * sc = dst->src[4], * xz = dst->src[5];
	const int64_t out = dst->ne[0], T = dst->ne[1], used = ids->ne[0];
	const int64_t o0 = out * ith / nth, o1 = out * (ith + 1) / nth;
	float z[1024];
	for (int64_t t = 0; t < T; t++) {
		float * d = (float *) ((char *) dst->data + t * dst->nb[1]);
		for (int64_t k = 0; k < used; k++) {
			const int32_t s = *(const int32_t *) ((const char *) ids->data + k * ids->nb[0] + t * ids->nb[1]);
			if (s == 0) continue;
			const float scale = *(const float *) ((const char *) sc->data + k * sc->nb[1] + t * sc->nb[2]);
			const float * zp;
			if (mode == SBORA_EXPAND_FA) {
				const int32_t * ix = (const int32_t *) ((const char *) idx->data + s * idx->nb[1]);
				const float * x = (const float *) ((const char *) xz->data + t * xz->nb[1]);
				for (int j = 0; j < r; j++) z[j] = x[ix[j]];
				zp = z;
			} else {
				zp = (const float *) ((const char *) xz->data + k * xz->nb[1] + t * xz->nb[2]);
			}
			const char * bs = (const char *) B->data + s * B->nb[2];
			for (int64_t o = o0; o < o1; o++) {
				d[o] += scale * sbora_dot(bs + o * B->nb[1], (int) B->type, zp, r);
			}
		}
	}
}

// dst (= h, in place): h[idx_slot[j], t] += scale·y[j, k, t] for every
// routed FB adapter k, one after the other (composed adapters may share
// rows). src: h, idx, ids, scales, y [r, used, T]. Tokens are split over
// the threads.
static void sbora_scatter(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
	const int r = (int) (uintptr_t) userdata;
	const struct ggml_tensor * idx = dst->src[1], * ids = dst->src[2], * sc = dst->src[3], * y = dst->src[4];
	const int64_t T = dst->ne[1], used = ids->ne[0];
	for (int64_t t = T * ith / nth; t < T * (ith + 1) / nth; t++) {
		float * d = (float *) ((char *) dst->data + t * dst->nb[1]);
		for (int64_t k = 0; k < used; k++) {
			const int32_t s = *(const int32_t *) ((const char *) ids->data + k * ids->nb[0] + t * ids->nb[1]);
			if (s == 0) continue;
			const float scale = *(const float *) ((const char *) sc->data + k * sc->nb[1] + t * sc->nb[2]);
			const int32_t * ix = (const int32_t *) ((const char *) idx->data + s * idx->nb[1]);
			const float * yp = (const float *) ((const char *) y->data + k * y->nb[1] + t * y->nb[2]);
			for (int j = 0; j < r; j++) d[ix[j]] += scale * yp[j];
		}
	}
}

static struct ggml_tensor * sbora_expand_op(struct ggml_context * ctx, struct ggml_tensor * h, struct ggml_tensor * B,
		struct ggml_tensor * idx, struct ggml_tensor * ids, struct ggml_tensor * sc, struct ggml_tensor * xz, int r, int mode) {
	struct ggml_tensor * args[5] = { B, idx, ids, sc, xz };
	return ggml_custom_inplace(ctx, h, args, 5, sbora_expand, GGML_N_TASKS_MAX, (void *) (uintptr_t) (r | (mode << 16)));
}

static struct ggml_tensor * sbora_scatter_op(struct ggml_context * ctx, struct ggml_tensor * h, struct ggml_tensor * idx,
		struct ggml_tensor * ids, struct ggml_tensor * sc, struct ggml_tensor * y, int r) {
	struct ggml_tensor * args[4] = { idx, ids, sc, y };
	return ggml_custom_inplace(ctx, h, args, 4, sbora_scatter, GGML_N_TASKS_MAX, (void *) (uintptr_t) r);
}
*/
import "C"

import (
	"fmt"

	"github.com/ollama/ollama/ml"
)

// FusedRankLimit is the largest rank the fused CPU adapter ops take.
const FusedRankLimit = 1024

// ExpandFA adds Σ_k scale·B_slot·x[idx_slot] to h in place (the FA update;
// one CPU graph node). b is the stack [R, out, slots] (F16 or F32), idx
// [R, slots], ids [used, T], scales [1, used, T], x [in, T]; r is the rank
// the step uses.
func ExpandFA(ctx ml.Context, h, b, idx, ids, scales, x ml.Tensor, r int) ml.Tensor {
	return expand(ctx, h, b, idx, ids, scales, x, r, C.SBORA_EXPAND_FA)
}

// ExpandZ adds Σ_k scale·B_slot·z_k to h in place, z [r, used, T] (the
// second product of LoRA).
func ExpandZ(ctx ml.Context, h, b, ids, scales, z ml.Tensor, r int) ml.Tensor {
	return expand(ctx, h, b, ids, ids, scales, z, r, C.SBORA_EXPAND_Z)
}

func expand(ctx ml.Context, h, b, idx, ids, scales, xz ml.Tensor, r int, mode C.int) ml.Tensor {
	if r > FusedRankLimit || r <= 0 {
		panic(fmt.Sprintf("ggmlx: fused adapter op of rank %d", r))
	}
	return wrap(ctx, C.sbora_expand_op(rawContext(ctx), rawTensor(h), rawTensor(b), rawTensor(idx), rawTensor(ids),
		rawTensor(scales), rawTensor(xz), C.int(r), mode))
}

// ScatterFB adds scale·y_k to the rows idx_slot of h in place for each
// routed FB adapter k (y [r, used, T] = A·x).
func ScatterFB(ctx ml.Context, h, idx, ids, scales, y ml.Tensor, r int) ml.Tensor {
	return wrap(ctx, C.sbora_scatter_op(rawContext(ctx), rawTensor(h), rawTensor(idx), rawTensor(ids), rawTensor(scales),
		rawTensor(y), C.int(r)))
}

// FusedTypeOK reports whether a bank stack of ggml type t can feed the
// fused ops.
func FusedTypeOK(t uint32) bool { return t == TypeF16 || t == TypeF32 }
