package ggmlx

// #include <stdlib.h>
// #include "ggml.h"
// #include "ggml-backend.h"
import "C"

import (
	"fmt"
	"reflect"
	"sync"
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"
)

// field describes an unexported struct field found by reflection.
type field struct{ offset uintptr }

func mustField(t reflect.Type, name, typeName string) field {
	f, ok := t.FieldByName(name)
	if !ok {
		panic(fmt.Sprintf("ggmlx: %s has no field %q: ollama's ggml backend layout changed; ggmlx supports v0.17.4", t, name))
	}
	if got := f.Type.String(); typeName != "" && got != typeName {
		panic(fmt.Sprintf("ggmlx: %s.%s has type %s, want %s: ollama's ggml backend layout changed", t, name, got, typeName))
	}
	return field{f.Offset}
}

func (f field) ptr(base unsafe.Pointer) unsafe.Pointer { return unsafe.Add(base, f.offset) }

var (
	tensorType  = reflect.TypeOf(ggml.Tensor{})
	contextType = reflect.TypeOf(ggml.Context{})
	backendType = reflect.TypeOf(ggml.Backend{})

	tensorB = mustField(tensorType, "b", "*ggml.Backend")
	tensorT = mustField(tensorType, "t", "*ggml._Ctype_struct_ggml_tensor")

	contextB   = mustField(contextType, "b", "*ggml.Backend")
	contextCtx = mustField(contextType, "ctx", "*ggml._Ctype_struct_ggml_context")

	backendSchedMu       = mustField(backendType, "schedMu", "sync.Mutex")
	backendSched         = mustField(backendType, "sched", "ggml._Ctype_ggml_backend_sched_t")
	backendSchedBackends = mustField(backendType, "schedBackends", "[]ggml._Ctype_ggml_backend_t")
	backendSchedBufts    = mustField(backendType, "schedBufts", "[]ggml._Ctype_ggml_backend_buffer_type_t")
	backendAllocMemory   = mustField(backendType, "allocMemory", "bool")
	backendMaxNodes      = mustField(backendType, "maxGraphNodes", "int")
)

func rawTensor(t ml.Tensor) *C.struct_ggml_tensor {
	gt, ok := t.(*ggml.Tensor)
	if !ok {
		panic(fmt.Sprintf("ggmlx: tensor of type %T is not a ggml tensor", t))
	}
	return *(**C.struct_ggml_tensor)(tensorT.ptr(unsafe.Pointer(gt)))
}

func rawContext(ctx ml.Context) *C.struct_ggml_context {
	gc, ok := ctx.(*ggml.Context)
	if !ok {
		panic(fmt.Sprintf("ggmlx: context of type %T is not a ggml context", ctx))
	}
	return *(**C.struct_ggml_context)(contextCtx.ptr(unsafe.Pointer(gc)))
}

// wrap returns an ml.Tensor for a raw tensor created in ctx.
func wrap(ctx ml.Context, t *C.struct_ggml_tensor) ml.Tensor {
	gc := ctx.(*ggml.Context)
	out := &ggml.Tensor{}
	*(**ggml.Backend)(tensorB.ptr(unsafe.Pointer(out))) = *(**ggml.Backend)(contextB.ptr(unsafe.Pointer(gc)))
	*(**C.struct_ggml_tensor)(tensorT.ptr(unsafe.Pointer(out))) = t
	return out
}

func backendOf(b ml.Backend) unsafe.Pointer {
	gb, ok := b.(*ggml.Backend)
	if !ok {
		panic(fmt.Sprintf("ggmlx: backend of type %T is not the ggml backend", b))
	}
	return unsafe.Pointer(gb)
}

// WriteAt copies data into t's backend memory starting at byte offset.
// t must be allocated (a weight or a tensor from Context.Empty/Zeros).
func WriteAt(t ml.Tensor, offset int, data []byte) {
	if len(data) == 0 {
		return
	}
	rt := rawTensor(t)
	if offset < 0 || offset+len(data) > int(C.ggml_nbytes(rt)) {
		panic(fmt.Sprintf("ggmlx: write of %d bytes at %d outside a tensor of %d bytes", len(data), offset, C.ggml_nbytes(rt)))
	}
	C.ggml_backend_tensor_set(rt, unsafe.Pointer(&data[0]), C.size_t(offset), C.size_t(len(data)))
}

// TypeOf returns the ggml type number of t (matches gguf.TensorType).
func TypeOf(t ml.Tensor) uint32 { return uint32(rawTensor(t)._type) }

var graphMu sync.Mutex

// EnsureGraphNodes grows the backend's scheduler so a single graph may hold
// n nodes. ollama sizes it from the model's tensor count (32 per tensor,
// at least 1024), which is too small for tiny models carrying many adapter
// ops per layer. Must not run concurrently with Compute on b.
func EnsureGraphNodes(b ml.Backend, n int) {
	graphMu.Lock()
	defer graphMu.Unlock()
	base := backendOf(b)
	maxNodes := (*int)(backendMaxNodes.ptr(base))
	if *maxNodes >= n {
		return
	}
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	backends := *(*[]C.ggml_backend_t)(backendSchedBackends.ptr(base))
	bufts := *(*[]C.ggml_backend_buffer_type_t)(backendSchedBufts.ptr(base))
	alloc := *(*bool)(backendAllocMemory.ptr(base))
	sched := (*C.ggml_backend_sched_t)(backendSched.ptr(base))
	fresh := C.ggml_backend_sched_new_ext(
		(*C.ggml_backend_t)(unsafe.Pointer(&backends[0])),
		(*C.ggml_backend_buffer_type_t)(unsafe.Pointer(&bufts[0])),
		C.int(len(backends)), C.size_t(n), C._Bool(false), C._Bool(true), C._Bool(alloc))
	C.ggml_backend_sched_free(*sched)
	*sched = fresh
	*maxNodes = n
	setAllocated(base, nil)
}

// WriteFloats copies v into t (F32) starting at element offset.
func WriteFloats(t ml.Tensor, offset int, v []float32) {
	if len(v) > 0 {
		WriteAt(t, 4*offset, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
	}
}

// WriteInts copies v into t (I32) starting at element offset.
func WriteInts(t ml.Tensor, offset int, v []int32) {
	if len(v) > 0 {
		WriteAt(t, 4*offset, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
	}
}

// HostData returns t's backend memory as a byte slice when it lives in host
// memory (the CPU backend), or nil: a writer may then fill it in place
// instead of staging a copy and uploading it.
func HostData(t ml.Tensor) []byte {
	rt := rawTensor(t)
	if rt.buffer == nil || rt.data == nil || !bool(C.ggml_backend_buffer_is_host(rt.buffer)) {
		return nil
	}
	return unsafe.Slice((*byte)(rt.data), int(C.ggml_nbytes(rt)))
}

// ComputeBufferSize is the size of the backend scheduler's compute buffers
// (all its backends), as allocated by the last reserve or compute.
func ComputeBufferSize(b ml.Backend) int64 {
	base := backendOf(b)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	sched := *(*C.ggml_backend_sched_t)(backendSched.ptr(base))
	var n int64
	for _, be := range *(*[]C.ggml_backend_t)(backendSchedBackends.ptr(base)) {
		n += int64(C.ggml_backend_sched_get_buffer_size(sched, be))
	}
	return n
}

// SameTensor reports whether a and b are the same ggml tensor.
func SameTensor(a, b ml.Tensor) bool { return rawTensor(a) == rawTensor(b) }

var contextGraph = mustField(contextType, "graph", "*ggml._Ctype_struct_ggml_cgraph")
