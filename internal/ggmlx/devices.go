package ggmlx

/*
#include "ggml-backend.h"
*/
import "C"

import (
	"github.com/ollama/ollama/ml"
	ggmlsrc "github.com/ollama/ollama/ml/backend/ggml/ggml/src"
)

// GPU is an accelerator ggml found: a GPU backend library (libggml-cuda,
// ...) loaded from <executable>/../lib/ollama or OLLAMA_LIBRARY_PATH.
type GPU struct {
	ID          ml.DeviceID
	Name        string
	Description string
	FreeMemory  uint64
	TotalMemory uint64
}

// GPUs loads ggml's backend libraries (once) and lists the GPUs they
// expose, in ggml's order.
func GPUs() []GPU {
	ggmlsrc.OnceLoad()
	var out []GPU
	for i := range C.ggml_backend_dev_count() {
		d := C.ggml_backend_dev_get(i)
		switch C.ggml_backend_dev_type(d) {
		case C.GGML_BACKEND_DEVICE_TYPE_GPU, C.GGML_BACKEND_DEVICE_TYPE_IGPU:
		default:
			continue
		}
		var props C.struct_ggml_backend_dev_props
		C.ggml_backend_dev_get_props(d, &props)
		g := GPU{Name: C.GoString(props.name), Description: C.GoString(props.description)}
		g.ID.ID = C.GoString(props.id)
		if props.library != nil {
			g.ID.Library = C.GoString(props.library)
		}
		var free, total C.size_t
		C.ggml_backend_dev_memory(d, &free, &total)
		g.FreeMemory, g.TotalMemory = uint64(free), uint64(total)
		out = append(out, g)
	}
	return out
}

// LibraryPaths are where GPUs looked for backend libraries.
func LibraryPaths() []string { return ggmlsrc.LibPaths() }

// OnHost reports whether t's data is in host memory (the CPU backend's).
func OnHost(t ml.Tensor) bool {
	rt := rawTensor(t)
	return rt.buffer != nil && bool(C.ggml_backend_buffer_is_host(rt.buffer))
}
