package ggmlx

/*
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

// sbora_repack_buft finds ggml-cpu's weight-repacking buffer type (one of
// its "extra" buffer types; compiled in with GGML_USE_CPU_REPACK).
static ggml_backend_buffer_type_t sbora_repack_buft(void) {
	ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
	if (dev == NULL) return NULL;
	ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
	ggml_backend_dev_get_extra_bufts_t get =
		(ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
	if (get == NULL) return NULL;
	for (ggml_backend_buffer_type_t * b = get(dev); b != NULL && *b != NULL; b++) {
		if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
	}
	return NULL;
}

// sbora_repack converts a weight, in place, to the repacked layout
// ggml-cpu's matmul kernels prefer, by moving it into a buffer object of
// the repacking type that wraps its own memory (repacked layouts have the
// size of the original). It returns the wrapper (to free after the model),
// or NULL when the tensor has no repacked layout.
static ggml_backend_buffer_t sbora_repack(ggml_backend_buffer_type_t buft, struct ggml_tensor * t, void * scratch) {
	// The repacking buffer's init_tensor and set_tensor, taken from a
	// small buffer of that type.
	static struct ggml_backend_buffer_i iface;
	static int have = 0;
	if (!have) {
		ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 64);
		if (probe == NULL) return NULL;
		iface = probe->iface;
		ggml_backend_buffer_free(probe);
		have = 1;
	}
	size_t n = ggml_nbytes(t);
	ggml_backend_buffer_t w = ggml_backend_cpu_buffer_from_ptr(t->data, n);
	w->buft = buft;
	w->iface.init_tensor = iface.init_tensor;
	w->iface.set_tensor = iface.set_tensor;
	w->iface.get_tensor = NULL;
	w->iface.cpy_tensor = NULL;
	ggml_backend_buffer_set_usage(w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
	ggml_backend_buffer_t old = t->buffer;
	void * extra = t->extra;
	t->buffer = w;
	if (iface.init_tensor(w, t) != GGML_STATUS_SUCCESS || t->extra == NULL) {
		t->buffer = old;
		t->extra = extra;
		ggml_backend_buffer_free(w);
		return NULL;
	}
	memcpy(scratch, t->data, n);
	iface.set_tensor(w, t, scratch, 0, n);
	return w;
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/ollama/ollama/ml"
)

// Repacked holds the buffer objects that repacked weights now belong to;
// Free releases them (not the memory, which the model's buffers own) once
// the model is closed.
type Repacked struct {
	bufs  []C.ggml_backend_buffer_t
	Count int   // weights repacked
	Bytes int64 // their size
}

// RepackAvailable reports whether ggml-cpu was built with weight repacking
// (the Makefile's -DGGML_USE_CPU_REPACK).
func RepackAvailable() bool { return C.sbora_repack_buft() != nil }

// Repack converts CPU weights in place to ggml-cpu's repacked layouts (as
// llama.cpp does by default: Q4_0, Q4_K and IQ4_NL matrices whose rows
// come in multiples of 8, on CPUs with AVX2), which its matmul kernels run
// faster. Only weights used by nothing but matrix products may be
// repacked: a repacked tensor can no longer be read or gathered from.
// Weights in other than host memory, or without a repacked layout, are
// left alone.
func Repack(weights []ml.Tensor) (*Repacked, error) {
	buft := C.sbora_repack_buft()
	if buft == nil {
		return nil, fmt.Errorf("ggmlx: ggml-cpu has no weight repacking (build with -DGGML_USE_CPU_REPACK)")
	}
	r := &Repacked{}
	var scratch []byte
	for _, w := range weights {
		t := rawTensor(w)
		if t.buffer == nil || t.data == nil || !bool(C.ggml_backend_buffer_is_host(t.buffer)) {
			continue
		}
		if uintptr(t.data)%32 != 0 {
			continue
		}
		n := int(C.ggml_nbytes(t))
		if len(scratch) < n {
			scratch = make([]byte, n)
		}
		if b := C.sbora_repack(buft, t, unsafe.Pointer(&scratch[0])); b != nil {
			r.bufs = append(r.bufs, b)
			r.Count++
			r.Bytes += int64(n)
		}
	}
	return r, nil
}

// Free releases the wrapper buffer objects.
func (r *Repacked) Free() {
	if r == nil {
		return
	}
	for _, b := range r.bufs {
		C.ggml_backend_buffer_free(b)
	}
	r.bufs = nil
}
