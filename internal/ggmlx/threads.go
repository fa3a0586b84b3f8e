package ggmlx

/*
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static ggml_threadpool_t sbora_threadpool(int n, int poll) {
	struct ggml_threadpool_params p = ggml_threadpool_params_default(n);
	p.poll = (uint32_t) poll;
	return ggml_threadpool_new(&p);
}
*/
import "C"

import (
	"sync"

	"github.com/ollama/ollama/ml"
)

// Threadpool is a persistent pool of ggml CPU worker threads.
type Threadpool struct{ tp C.ggml_threadpool_t }

// UseThreadpool gives the backend's CPU compute a persistent pool of
// worker threads. Without one, ggml-cpu starts (and joins) its workers for
// every graph: a thread and a fresh stack per worker per step. poll 0
// lets idle workers sleep until the next graph instead of spinning (on a
// machine with as many threads as cores, spinning workers steal the time
// the host side of a step needs).
func UseThreadpool(b ml.Backend, threads, poll int) *Threadpool {
	base := backendOf(b)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	defer mu.Unlock()
	tp := &Threadpool{tp: C.sbora_threadpool(C.int(threads), C.int(poll))}
	for _, be := range *(*[]C.ggml_backend_t)(backendSchedBackends.ptr(base)) {
		if C.ggml_backend_is_cpu(be) {
			C.ggml_backend_cpu_set_threadpool(be, tp.tp)
		}
	}
	return tp
}

// Close detaches and frees the pool (after the last compute on b).
func (t *Threadpool) Close(b ml.Backend) {
	if t == nil || t.tp == nil {
		return
	}
	base := backendOf(b)
	mu := (*sync.Mutex)(backendSchedMu.ptr(base))
	mu.Lock()
	for _, be := range *(*[]C.ggml_backend_t)(backendSchedBackends.ptr(base)) {
		if C.ggml_backend_is_cpu(be) {
			C.ggml_backend_cpu_set_threadpool(be, nil)
		}
	}
	mu.Unlock()
	C.ggml_threadpool_free(t.tp)
	t.tp = nil
}
