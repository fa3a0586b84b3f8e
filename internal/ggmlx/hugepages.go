package ggmlx

/*
#include <stdint.h>
#include <sys/mman.h>
#include "ggml.h"
#include "ggml-backend.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

// sbora_hugepages asks the kernel to back [p, p+n) with transparent huge
// pages, collapsing what is already there; it returns the bytes covered.
static int64_t sbora_hugepages(uintptr_t p, size_t n) {
	const uintptr_t huge = 2u << 20;
	uintptr_t lo = (p + huge - 1) & ~(huge - 1);
	uintptr_t hi = (p + n) & ~(huge - 1);
	if (hi <= lo) return 0;
	madvise((void *) lo, hi - lo, MADV_HUGEPAGE);
	madvise((void *) lo, hi - lo, MADV_COLLAPSE);
	return (int64_t) (hi - lo);
}
*/
import "C"

import (
	"sort"

	"github.com/ollama/ollama/ml"
)

// HugePages backs the host memory of the tensors with transparent huge
// pages where the kernel allows it (Linux, THP "madvise" or "always"):
// large weights read every step then cost far fewer TLB misses. It returns
// the bytes it covered; a kernel that refuses leaves the pages as they are.
func HugePages(ts []ml.Tensor) int64 {
	type span struct{ lo, hi uintptr }
	var spans []span
	for _, t := range ts {
		rt := rawTensor(t)
		if rt.data == nil || rt.buffer == nil || !bool(C.ggml_backend_buffer_is_host(rt.buffer)) {
			continue // device memory is not ours to madvise
		}
		lo := uintptr(rt.data)
		spans = append(spans, span{lo, lo + uintptr(C.ggml_nbytes(rt))})
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].lo < spans[j].lo })
	var n int64
	for i := 0; i < len(spans); {
		s := spans[i]
		j := i + 1
		for j < len(spans) && spans[j].lo <= s.hi+64 {
			s.hi = max(s.hi, spans[j].hi)
			j++
		}
		n += int64(C.sbora_hugepages(C.uintptr_t(s.lo), C.size_t(s.hi-s.lo)))
		i = j
	}
	return n
}
