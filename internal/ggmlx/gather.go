package ggmlx

/*
#include "ggml.h"
#include "ggml-backend.h"

// bitcast views a's bytes as type t (a's rows keep their byte length).
static struct ggml_tensor * sbora_bitcast(struct ggml_context * ctx, struct ggml_tensor * a, enum ggml_type t) {
	struct ggml_tensor * r = ggml_view_4d(ctx, a, a->ne[0], a->ne[1], a->ne[2], a->ne[3], a->nb[1], a->nb[2], a->nb[3], 0);
	r->ne[0] = (a->ne[0] * (int64_t) ggml_type_size(a->type) / ggml_blck_size(a->type)) / (int64_t) ggml_type_size(t) * ggml_blck_size(t);
	r->type = t;
	r->nb[0] = ggml_type_size(t);
	return r;
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/ollama/ollama/ml"
)

// GatherRows returns the rows of the 2-D tensor src listed in idx (I32 [n])
// as [src.Dim(0), n], keeping src's type. ggml's get_rows always converts
// to F32; for F16 (and BF16) sources this gathers the same bytes viewed as
// I32, which get_rows copies verbatim, and views the result back, so a
// gathered F16 KV cache stays F16 (half the memory traffic, and attention
// sees exactly the bytes a direct view would).
func GatherRows(ctx ml.Context, src, idx ml.Tensor) ml.Tensor {
	rs := rawTensor(src)
	c := rawContext(ctx)
	switch rs._type {
	case C.GGML_TYPE_F32, C.GGML_TYPE_I32:
		return wrap(ctx, C.ggml_get_rows(c, rs, rawTensor(idx)))
	case C.GGML_TYPE_F16, C.GGML_TYPE_BF16:
		if rs.ne[0]%2 != 0 || !bool(C.ggml_is_contiguous(rs)) {
			panic(fmt.Sprintf("ggmlx: GatherRows of a %d-wide or non-contiguous 16-bit tensor", rs.ne[0]))
		}
		asInts := C.sbora_bitcast(c, rs, C.GGML_TYPE_I32)
		rows := C.ggml_get_rows(c, asInts, rawTensor(idx))
		return wrap(ctx, C.sbora_bitcast(c, rows, rs._type))
	default:
		panic(fmt.Sprintf("ggmlx: GatherRows of type %d", rs._type))
	}
}

// ReadAt copies len(data) bytes of t's backend memory, starting at byte
// offset, into data.
func ReadAt(t ml.Tensor, offset int, data []byte) {
	if len(data) == 0 {
		return
	}
	rt := rawTensor(t)
	if offset < 0 || offset+len(data) > int(C.ggml_nbytes(rt)) {
		panic(fmt.Sprintf("ggmlx: read of %d bytes at %d outside a tensor of %d bytes", len(data), offset, C.ggml_nbytes(rt)))
	}
	C.ggml_backend_tensor_get(rt, unsafe.Pointer(&data[0]), C.size_t(offset), C.size_t(len(data)))
}

// Floats reads an F32 tensor into dst (grown as needed) and returns it.
func Floats(t ml.Tensor, dst []float32) []float32 {
	rt := rawTensor(t)
	n := int(C.ggml_nelements(rt))
	if cap(dst) < n {
		dst = make([]float32, n)
	}
	dst = dst[:n]
	if n > 0 {
		C.ggml_backend_tensor_get(rt, unsafe.Pointer(&dst[0]), 0, C.size_t(4*n))
	}
	return dst
}
