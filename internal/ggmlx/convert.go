package ggmlx

/*
#include <math.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
#include "ggml-cpu.h"

// sbora_convert_rows converts rows rows of n values of type st (F32, F16 or
// BF16) into rows of m >= n values of type dt (F32, F16 or Q8_0), zero
// padded. scratch holds m floats. It returns the index of the first
// non-finite source value, or -1.
static int64_t sbora_convert_rows(const void * src, int st, int64_t n, int64_t rows,
                                  void * dst, int dt, int64_t m, float * scratch) {
	const size_t src_row = (size_t) n * (st == GGML_TYPE_F32 ? 4 : 2);
	const size_t dst_row = ggml_row_size((enum ggml_type) dt, m);
	for (int64_t r = 0; r < rows; r++) {
		const char * s = (const char *) src + r * src_row;
		char * d = (char *) dst + r * dst_row;
		if (st == GGML_TYPE_F16 && dt == GGML_TYPE_F16) {
			// Copy and check in one pass; the check has no early exit so
			// that it vectorizes.
			const uint16_t * h = (const uint16_t *) s;
			uint16_t * o = (uint16_t *) d;
			int bad = 0;
			for (int64_t i = 0; i < n; i++) {
				o[i] = h[i];
				bad |= (h[i] & 0x7c00) == 0x7c00;
			}
			if (bad) {
				for (int64_t i = 0; i < n; i++) {
					if ((h[i] & 0x7c00) == 0x7c00) return r * n + i;
				}
			}
			memset(d + src_row, 0, (size_t) (m - n) * 2);
			continue;
		}
		switch (st) {
		case GGML_TYPE_F32: memcpy(scratch, s, src_row); break;
		case GGML_TYPE_F16: ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) s, scratch, n); break;
		default: ggml_bf16_to_fp32_row((const ggml_bf16_t *) s, scratch, n); break;
		}
		// Non-finite floats have an all-ones exponent; no early exit, so
		// the check vectorizes.
		const uint32_t * bits = (const uint32_t *) scratch;
		int bad = 0;
		for (int64_t i = 0; i < n; i++) {
			bad |= (bits[i] & 0x7f800000u) == 0x7f800000u;
		}
		if (bad) {
			for (int64_t i = 0; i < n; i++) {
				if (!isfinite(scratch[i])) return r * n + i;
			}
		}
		memset(scratch + n, 0, (size_t) (m - n) * 4);
		switch (dt) {
		case GGML_TYPE_F32: memcpy(d, scratch, (size_t) m * 4); break;
		case GGML_TYPE_F16: ggml_cpu_fp32_to_fp16(scratch, (ggml_fp16_t *) d, m); break;
		default: ggml_quantize_chunk((enum ggml_type) dt, scratch, d, 0, 1, m, NULL); break;
		}
	}
	return -1;
}
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// Type numbers of ggml (equal to gguf.TensorType's).
const (
	TypeF32  = uint32(C.GGML_TYPE_F32)
	TypeF16  = uint32(C.GGML_TYPE_F16)
	TypeQ8_0 = uint32(C.GGML_TYPE_Q8_0)
	TypeBF16 = uint32(C.GGML_TYPE_BF16)
)

// ErrNonFinite reports a NaN or infinity in converted data.
type ErrNonFinite struct{ Index int64 }

func (e ErrNonFinite) Error() string { return fmt.Sprintf("non-finite value at element %d", e.Index) }

// RowBytes is the size of a row of n values of ggml type t.
func RowBytes(t uint32, n int) int { return int(C.ggml_row_size(C.enum_ggml_type(t), C.int64_t(n))) }

// ConvertRows converts rows rows of n values of type src (F32, F16 or BF16,
// densely packed in from) into rows of m ≥ n values of type dst (F32, F16
// or Q8_0) in to, padding each row with zeros; it fails on the first
// non-finite value. scratch must hold at least m floats.
func ConvertRows(from []byte, src uint32, n, rows int, to []byte, dst uint32, m int, scratch []float32) error {
	if rows == 0 {
		return nil
	}
	es := 2
	if src == TypeF32 {
		es = 4
	}
	switch {
	case src != TypeF32 && src != TypeF16 && src != TypeBF16:
		return fmt.Errorf("ggmlx: cannot convert from type %d", src)
	case dst != TypeF32 && dst != TypeF16 && dst != TypeQ8_0:
		return fmt.Errorf("ggmlx: cannot convert to type %d", dst)
	case m < n || len(from) < es*n*rows || len(to) < RowBytes(dst, m)*rows || len(scratch) < m:
		return fmt.Errorf("ggmlx: convert %d×%d into %d-wide rows: buffers too small", rows, n, m)
	case dst == TypeQ8_0 && m%32 != 0:
		return fmt.Errorf("ggmlx: Q8_0 rows of %d values are not whole blocks", m)
	}
	if i := C.sbora_convert_rows(unsafe.Pointer(&from[0]), C.int(src), C.int64_t(n), C.int64_t(rows),
		unsafe.Pointer(&to[0]), C.int(dst), C.int64_t(m), (*C.float)(unsafe.Pointer(&scratch[0]))); i >= 0 {
		return ErrNonFinite{Index: int64(i)}
	}
	return nil
}
