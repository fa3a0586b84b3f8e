package ggmlx

/*
#include <stdlib.h>
#include "ggml.h"
#include "ggml-backend.h"

static struct ggml_tensor * graph_node(struct ggml_cgraph * g, int i) { return ggml_graph_node(g, i); }
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"
)

// SetParam marks t as a trainable parameter of the graphs it enters.
func SetParam(t ml.Tensor) { C.ggml_set_param(rawTensor(t)) }

// SoftMaxExt is ggml_soft_max_ext: softmax(a·scale + mask) over rows, with
// the mask broadcast over dimensions 2 and 3.
func SoftMaxExt(ctx ml.Context, a, mask ml.Tensor, scale float32) ml.Tensor {
	var m *C.struct_ggml_tensor
	if mask != nil {
		m = rawTensor(mask)
	}
	return wrap(ctx, C.ggml_soft_max_ext(rawContext(ctx), rawTensor(a), m, C.float(scale), 0))
}

// CrossEntropyLoss is the mean over columns of -Σ labels·log softmax(logits).
func CrossEntropyLoss(ctx ml.Context, logits, labels ml.Tensor) ml.Tensor {
	return wrap(ctx, C.ggml_cross_entropy_loss(rawContext(ctx), rawTensor(logits), rawTensor(labels)))
}

// Graph is a forward (and optionally backward) graph computed on a
// backend's scheduler.
type Graph struct {
	backend ml.Backend
	ctx     *C.struct_ggml_context // holds the graph and the backward tensors
	g       *C.struct_ggml_cgraph
	loss    *C.struct_ggml_tensor
	params  []*C.struct_ggml_tensor
	grads   []*C.struct_ggml_tensor
	// ComputeBytes is the scheduler's compute buffer size for this graph
	// (activations, gradients and temporaries), known after Compute.
	ComputeBytes int
}

// NewGraph builds the graph computing loss, which was built in ctx. With
// params, it also builds the backward pass and keeps every parameter's
// gradient for Grad. size bounds the node count (forward and backward).
func NewGraph(ctx ml.Context, loss ml.Tensor, params []ml.Tensor, size int) (*Graph, error) {
	b := ml.Backend(*(**ggml.Backend)(contextB.ptr(unsafe.Pointer(ctx.(*ggml.Context)))))
	EnsureGraphNodes(b, size)
	grads := len(params) > 0
	mem := C.size_t(size)*C.ggml_tensor_overhead() + C.ggml_graph_overhead_custom(C.size_t(size), C._Bool(grads))
	gctx := C.ggml_init(C.struct_ggml_init_params{mem_size: mem, no_alloc: true})
	if gctx == nil {
		return nil, errors.New("ggmlx: cannot allocate a graph context")
	}
	g := &Graph{backend: b, ctx: gctx, loss: rawTensor(loss)}
	g.g = C.ggml_new_graph_custom(gctx, C.size_t(size), C._Bool(grads))
	C.ggml_set_output(g.loss)
	if grads {
		C.ggml_set_loss(g.loss)
	}
	C.ggml_build_forward_expand(g.g, g.loss)
	if !grads {
		return g, nil
	}
	n := int(C.ggml_graph_n_nodes(g.g))
	if last := C.graph_node(g.g, -1); last != g.loss {
		g.Free()
		return nil, errors.New("ggmlx: the loss must be the last node of the forward graph")
	}
	// Seed the loss gradient with an allocated 1.0 input instead of an
	// accumulator the allocator would have to initialise.
	accs := make([]*C.struct_ggml_tensor, n)
	accs[n-1] = rawTensor(ctx.Input().FromFloats([]float32{1}, 1))
	cAccs := (**C.struct_ggml_tensor)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(uintptr(0)))))
	defer C.free(unsafe.Pointer(cAccs))
	copy(unsafe.Slice(cAccs, n), accs)
	for _, p := range params {
		g.params = append(g.params, rawTensor(p))
	}
	C.ggml_build_backward_expand(gctx, g.g, cAccs)
	for _, p := range g.params {
		grad := C.ggml_graph_get_grad(g.g, p)
		if grad != nil {
			C.ggml_set_output(grad)
		}
		g.grads = append(g.grads, grad)
	}
	// Work around the allocator letting rms_norm_back overwrite the gradient
	// it reads (ggml issue 1491): keep the gradients around every RMS norm.
	total := int(C.ggml_graph_n_nodes(g.g))
	for i := 0; i < total; i++ {
		node := C.graph_node(g.g, C.int(i))
		if node.op != C.GGML_OP_RMS_NORM {
			continue
		}
		if gr := C.ggml_graph_get_grad(g.g, node); gr != nil {
			C.ggml_set_output(gr)
		}
		if gr := C.ggml_graph_get_grad(g.g, node.src[0]); gr != nil {
			C.ggml_set_output(gr)
		}
	}
	return g, nil
}

// Compute runs the graph on the backend's scheduler.
func (g *Graph) Compute() (err error) {
	base := backendOf(g.backend)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	sched := *(*C.ggml_backend_sched_t)(backendSched.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	C.ggml_backend_sched_reset(sched)
	setAllocated(base, nil)
	if !C.ggml_backend_sched_alloc_graph(sched, g.g) {
		C.ggml_backend_sched_reset(sched)
		return errors.New("ggmlx: cannot allocate the training graph (out of memory?)")
	}
	backends := *(*[]C.ggml_backend_t)(backendSchedBackends.ptr(base))
	g.ComputeBytes = 0
	for _, be := range backends {
		g.ComputeBytes += int(C.ggml_backend_sched_get_buffer_size(sched, be))
	}
	if st := C.ggml_backend_sched_graph_compute(sched, g.g); st != C.GGML_STATUS_SUCCESS {
		C.ggml_backend_sched_reset(sched)
		return fmt.Errorf("ggmlx: graph compute failed with status %d", int(st))
	}
	C.ggml_backend_sched_synchronize(sched)
	// Leave the scheduler unallocated, as ollama's Compute does: the next
	// graph (an engine step) must get a fresh allocation. Results stay
	// readable until then.
	C.ggml_backend_sched_reset(sched)
	return nil
}

// Loss returns the computed loss.
func (g *Graph) Loss() float32 {
	var v float32
	C.ggml_backend_tensor_get(g.loss, unsafe.Pointer(&v), 0, 4)
	return v
}

// Grad copies parameter i's gradient into out (len = its element count);
// it reports false when the loss does not depend on the parameter.
func (g *Graph) Grad(i int, out []float32) bool {
	gr := g.grads[i]
	if gr == nil {
		clear(out)
		return false
	}
	if int(C.ggml_nelements(gr)) != len(out) || gr._type != C.GGML_TYPE_F32 {
		panic(fmt.Sprintf("ggmlx: gradient of %d F32 values read into %d", C.ggml_nelements(gr), len(out)))
	}
	C.ggml_backend_tensor_get(gr, unsafe.Pointer(&out[0]), 0, C.size_t(4*len(out)))
	return true
}

// Free releases the graph's context (not the tensors of the ml contexts).
func (g *Graph) Free() {
	if g.ctx != nil {
		C.ggml_free(g.ctx)
		g.ctx = nil
	}
}

// ComputeOutputs computes outs (built in ctx) in one graph without
// gradients and keeps every one of them readable (ReadFloats) until the
// backend computes again; intermediate tensors are freed as the graph
// goes, so a layer's temporaries do not outlive it.
func ComputeOutputs(ctx ml.Context, outs []ml.Tensor, size int) error {
	b := ml.Backend(*(**ggml.Backend)(contextB.ptr(unsafe.Pointer(ctx.(*ggml.Context)))))
	EnsureGraphNodes(b, size)
	mem := C.size_t(size)*C.ggml_tensor_overhead() + C.ggml_graph_overhead_custom(C.size_t(size), false)
	gctx := C.ggml_init(C.struct_ggml_init_params{mem_size: mem, no_alloc: true})
	if gctx == nil {
		return errors.New("ggmlx: cannot allocate a graph context")
	}
	defer C.ggml_free(gctx)
	g := &Graph{backend: b, ctx: nil, g: C.ggml_new_graph_custom(gctx, C.size_t(size), false)}
	for _, t := range outs {
		C.ggml_set_output(rawTensor(t))
		C.ggml_build_forward_expand(g.g, rawTensor(t))
	}
	return g.Compute()
}

// ReadFloats copies an F32 tensor's values out (from any backend).
func ReadFloats(t ml.Tensor) []float32 {
	rt := rawTensor(t)
	if rt._type != C.GGML_TYPE_F32 {
		panic("ggmlx: ReadFloats of a non-F32 tensor")
	}
	out := make([]float32, int(C.ggml_nelements(rt)))
	if len(out) > 0 {
		C.ggml_backend_tensor_get(rt, unsafe.Pointer(&out[0]), 0, C.size_t(4*len(out)))
	}
	return out
}
