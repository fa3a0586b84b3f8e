package ggmlx

// #include "ggml.h"
// #include "ggml-cpu.h"
// #include "helpers.h"
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// TypeLayout returns ggml's block size (elements) and type size (bytes) for
// the ggml type t.
func TypeLayout(t uint32) (blockSize, typeSize int) {
	return int(C.ggml_blck_size(C.enum_ggml_type(t))), int(C.ggml_type_size(C.enum_ggml_type(t)))
}

// Quantize converts rows×cols float32 values (row-major, rows of cols) to
// ggml type t, in parallel over rows.
func Quantize(t uint32, src []float32, rows, cols int) ([]byte, error) {
	if rows*cols != len(src) {
		return nil, fmt.Errorf("ggmlx: quantize %d values as %d×%d", len(src), rows, cols)
	}
	ct := C.enum_ggml_type(t)
	if int(C.ggml_blck_size(ct)) <= 0 || cols%int(C.ggml_blck_size(ct)) != 0 {
		return nil, fmt.Errorf("ggmlx: row of %d is not a multiple of the %s block size", cols, C.GoString(C.ggml_type_name(ct)))
	}
	if C.ggml_quantize_requires_imatrix(ct) {
		return nil, fmt.Errorf("ggmlx: %s needs an importance matrix", C.GoString(C.ggml_type_name(ct)))
	}
	rowSize := int(C.ggml_row_size(ct, C.int64_t(cols)))
	dst := make([]byte, rowSize*rows)
	if len(dst) == 0 {
		return dst, nil
	}
	quantizeInit.Do(func() { C.ggml_cpu_init() })
	workers := min(runtime.GOMAXPROCS(0), rows)
	per := (rows + workers - 1) / workers
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		r0, r1 := w*per, min(rows, (w+1)*per)
		if r0 >= r1 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// start is an element offset applied to both src and dst.
			C.ggml_quantize_chunk(ct, (*C.float)(unsafe.Pointer(&src[0])), unsafe.Pointer(&dst[0]),
				C.int64_t(r0*cols), C.int64_t(r1-r0), C.int64_t(cols), nil)
		}()
	}
	wg.Wait()
	return dst, nil
}

var quantizeInit sync.Once

// Dequantize converts n elements of ggml type t to float32.
func Dequantize(t uint32, data []byte, n int) ([]float32, error) {
	ct := C.enum_ggml_type(t)
	out := make([]float32, n)
	if n == 0 {
		return out, nil
	}
	if t == 0 { // F32
		if len(data) < 4*n {
			return nil, fmt.Errorf("ggmlx: %d bytes hold fewer than %d F32 values", len(data), n)
		}
		copy(out, unsafe.Slice((*float32)(unsafe.Pointer(&data[0])), n))
		return out, nil
	}
	bs := int(C.ggml_blck_size(ct))
	if bs <= 0 || n%bs != 0 {
		return nil, fmt.Errorf("ggmlx: %d elements are not whole %s blocks", n, C.GoString(C.ggml_type_name(ct)))
	}
	if need := int(C.ggml_row_size(ct, C.int64_t(n))); len(data) < need {
		return nil, fmt.Errorf("ggmlx: %d bytes hold fewer than %d %s values", len(data), n, C.GoString(C.ggml_type_name(ct)))
	}
	traits := C.ggml_get_type_traits(ct)
	if traits.to_float == nil {
		return nil, fmt.Errorf("ggmlx: cannot dequantize %s", C.GoString(C.ggml_type_name(ct)))
	}
	C.ggml_dequantize_row(traits.to_float, unsafe.Pointer(&data[0]), (*C.float)(unsafe.Pointer(&out[0])), C.int64_t(n))
	return out, nil
}
