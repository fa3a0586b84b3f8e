package ggmlx

/*
#include "ggml.h"
#include "ggml-backend.h"
*/
import "C"

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"
)

// allocated records, per backend, the graph its scheduler is allocated
// for (and left allocated) by ComputeKeep.
var (
	allocatedMu sync.Mutex
	allocated   = map[unsafe.Pointer]*C.struct_ggml_cgraph{}
)

// ComputeKeep computes ctx's forward graph (built with ctx.Forward) on the
// backend's scheduler and leaves the scheduler allocated for it: computing
// the same graph again (with new input data; see Allocated) skips the
// graph split and the allocation. A graph must be allocated only once: one
// that was computed before and whose allocation is gone (Allocated false)
// is rebuilt, never computed again. Anything else computed on the backend
// must reset the scheduler first (ollama's Context.Compute and Reserve,
// and Graph.Compute here, reset it after themselves; call Forget before
// other uses).
func ComputeKeep(ctx ml.Context) error {
	gc := ctx.(*ggml.Context)
	g := *(**C.struct_ggml_cgraph)(contextGraph.ptr(unsafe.Pointer(gc)))
	if g == nil {
		return fmt.Errorf("ggmlx: the context has no graph (call Forward first)")
	}
	b := *(**ggml.Backend)(contextB.ptr(unsafe.Pointer(gc)))
	base := unsafe.Pointer(b)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	sched := *(*C.ggml_backend_sched_t)(backendSched.ptr(base))
	allocatedMu.Lock()
	same := allocated[base] == g
	allocatedMu.Unlock()
	if !same {
		C.ggml_backend_sched_reset(sched)
		if !C.ggml_backend_sched_alloc_graph(sched, g) {
			C.ggml_backend_sched_reset(sched)
			setAllocated(base, nil)
			return fmt.Errorf("ggmlx: cannot allocate the step graph (out of memory?)")
		}
	}
	if st := C.ggml_backend_sched_graph_compute_async(sched, g); st != C.GGML_STATUS_SUCCESS {
		C.ggml_backend_sched_reset(sched)
		setAllocated(base, nil)
		return fmt.Errorf("ggmlx: graph compute failed with status %d", int(st))
	}
	C.ggml_backend_sched_synchronize(sched)
	setAllocated(base, g)
	return nil
}

// Forget resets b's scheduler if ComputeKeep left it allocated, so that
// other graphs may use it (and so that a freed graph is never reused).
func Forget(b ml.Backend) {
	base := backendOf(b)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	allocatedMu.Lock()
	kept := allocated[base] != nil
	allocatedMu.Unlock()
	if kept {
		C.ggml_backend_sched_reset(*(*C.ggml_backend_sched_t)(backendSched.ptr(base)))
		setAllocated(base, nil)
	}
}

func setAllocated(base unsafe.Pointer, g *C.struct_ggml_cgraph) {
	allocatedMu.Lock()
	defer allocatedMu.Unlock()
	if g == nil {
		delete(allocated, base)
	} else {
		allocated[base] = g
	}
}

// Allocated reports whether the backend's scheduler is still allocated for
// ctx's graph by ComputeKeep.
func Allocated(ctx ml.Context) bool {
	gc := ctx.(*ggml.Context)
	g := *(**C.struct_ggml_cgraph)(contextGraph.ptr(unsafe.Pointer(gc)))
	b := *(**ggml.Backend)(contextB.ptr(unsafe.Pointer(gc)))
	allocatedMu.Lock()
	defer allocatedMu.Unlock()
	return g != nil && allocated[unsafe.Pointer(b)] == g
}
