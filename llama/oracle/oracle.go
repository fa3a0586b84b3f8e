// Package oracle runs models through llama.cpp's own engine so tests can
// check sbora-serve's logits and greedy outputs against the reference
// implementation of GGUF.
//
// It calls the llama.cpp C API directly (ollama's Go binding hard-codes
// context options such as embeddings=true and has no way to turn off weight
// repacking) and links against the llama.cpp that
// github.com/ollama/ollama/llama compiles. It is imported only by tests.
//
// Building it needs llama.cpp's include directory and a miniaudio.h on the
// include path (include/ here is a stand-in; see its comment) and the
// Debian packages nlohmann-json3-dev and libstb-dev; the Makefile sets this
// up.
//
// Weight repacking (llama.cpp's "extra buffer types", on by default in
// llama.cpp) follows Options.Repack, so a test configures both engines the
// same way: repacked weights run other ggml CPU kernels (interleaved
// blocks), so only like-for-like comparisons can be exact. Benchmarks use
// llama.cpp's defaults (repacking on).
package oracle

/*
#include <stdlib.h>
#include "llama.h"

static void oracle_quiet(enum ggml_log_level level, const char * text, void * user) { (void)level; (void)text; (void)user; }
static void oracle_init(void) { llama_log_set(oracle_quiet, NULL); llama_backend_init(); }
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	_ "github.com/ollama/ollama/llama" // links llama.cpp
)

// LoRA is a llama.cpp LoRA GGUF applied with a scale.
type LoRA struct {
	Path  string
	Scale float32
}

// Options configure an Oracle.
type Options struct {
	Context int // tokens; default 256
	Threads int // default 2
	// CacheF32 uses an F32 KV cache instead of F16.
	CacheF32 bool
	// NoFlashAttention uses llama.cpp's mul_mat + softmax attention.
	NoFlashAttention bool
	// Repack lets llama.cpp repack CPU weights (its default).
	Repack bool
	// Sequences is how many sequences the context holds (default 1).
	Sequences int
	// Defaults keeps llama.cpp's context defaults other than size and
	// threads (benchmarks); otherwise flash attention follows the options
	// above.
	Defaults bool
}

// Oracle is a llama.cpp model and context for a single sequence.
type Oracle struct {
	model *C.struct_llama_model
	ctx   *C.struct_llama_context
	loras []*C.struct_llama_adapter_lora
	vocab int
}

var initOnce sync.Once

// Open loads modelPath on the CPU with the given LoRAs applied.
func Open(modelPath string, loras []LoRA, opts Options) (*Oracle, error) {
	initOnce.Do(func() { C.oracle_init() })
	if opts.Context == 0 {
		opts.Context = 256
	}
	if opts.Threads == 0 {
		opts.Threads = 2
	}
	mp := C.llama_model_default_params()
	mp.n_gpu_layers = 0
	mp.use_mmap = false
	mp.use_extra_bufts = C.bool(opts.Repack)
	path := C.CString(modelPath)
	defer C.free(unsafe.Pointer(path))
	o := &Oracle{model: C.llama_model_load_from_file(path, mp)}
	if o.model == nil {
		return nil, fmt.Errorf("oracle: llama.cpp cannot load %s", modelPath)
	}
	if opts.Sequences <= 0 {
		opts.Sequences = 1
	}
	cp := C.llama_context_default_params()
	cp.n_ctx = C.uint32_t(opts.Context)
	cp.n_batch = C.uint32_t(opts.Context)
	cp.n_ubatch = C.uint32_t(opts.Context)
	cp.n_seq_max = C.uint32_t(opts.Sequences)
	cp.n_threads = C.int32_t(opts.Threads)
	cp.n_threads_batch = C.int32_t(opts.Threads)
	cp.embeddings = false
	if !opts.Defaults {
		cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
		if opts.NoFlashAttention {
			cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
		}
	}
	if opts.CacheF32 {
		cp.type_k = C.GGML_TYPE_F32
		cp.type_v = C.GGML_TYPE_F32
	}
	o.ctx = C.llama_init_from_model(o.model, cp)
	if o.ctx == nil {
		o.Close()
		return nil, errors.New("oracle: llama.cpp cannot create a context")
	}
	o.vocab = int(C.llama_vocab_n_tokens(C.llama_model_get_vocab(o.model)))
	for _, l := range loras {
		lp := C.CString(l.Path)
		a := C.llama_adapter_lora_init(o.model, lp)
		C.free(unsafe.Pointer(lp))
		if a == nil {
			o.Close()
			return nil, fmt.Errorf("oracle: llama.cpp cannot load LoRA %s", l.Path)
		}
		o.loras = append(o.loras, a)
		if C.llama_set_adapter_lora(o.ctx, a, C.float(l.Scale)) != 0 {
			o.Close()
			return nil, fmt.Errorf("oracle: llama.cpp cannot apply LoRA %s", l.Path)
		}
	}
	return o, nil
}

// Close frees the context, adapters and model.
func (o *Oracle) Close() {
	if o.ctx != nil {
		C.llama_free(o.ctx)
		o.ctx = nil
	}
	for _, a := range o.loras {
		C.llama_adapter_lora_free(a)
	}
	o.loras = nil
	if o.model != nil {
		C.llama_model_free(o.model)
		o.model = nil
	}
}

// Tokenize tokenizes text with llama.cpp's tokenizer (special tokens parsed).
func (o *Oracle) Tokenize(text string, addSpecial bool) ([]int32, error) {
	ct := C.CString(text)
	defer C.free(unsafe.Pointer(ct))
	buf := make([]C.llama_token, len(text)+8)
	vocab := C.llama_model_get_vocab(o.model)
	n := C.llama_tokenize(vocab, ct, C.int32_t(len(text)), &buf[0], C.int32_t(len(buf)), C.bool(addSpecial), true)
	if n < 0 {
		return nil, fmt.Errorf("oracle: tokenize needs %d tokens", -n)
	}
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(buf[i])
	}
	return out, nil
}

// Logits evaluates tokens from position 0 of an empty cache and returns the
// logits of every position.
func (o *Oracle) Logits(tokens []int32) ([][]float32, error) {
	C.llama_memory_clear(C.llama_get_memory(o.ctx), true)
	return o.eval(tokens, 0, true)
}

func (o *Oracle) eval(tokens []int32, pos0 int, all bool) ([][]float32, error) {
	batch := C.llama_batch_init(C.int32_t(len(tokens)), 0, 1)
	defer C.llama_batch_free(batch)
	tok := unsafe.Slice(batch.token, len(tokens))
	pos := unsafe.Slice(batch.pos, len(tokens))
	nseq := unsafe.Slice(batch.n_seq_id, len(tokens))
	seq := unsafe.Slice(batch.seq_id, len(tokens))
	logits := unsafe.Slice(batch.logits, len(tokens))
	for i, t := range tokens {
		tok[i] = C.llama_token(t)
		pos[i] = C.llama_pos(pos0 + i)
		nseq[i] = 1
		*seq[i] = 0
		logits[i] = 0
		if all || i == len(tokens)-1 {
			logits[i] = 1
		}
	}
	batch.n_tokens = C.int32_t(len(tokens))
	if rc := C.llama_decode(o.ctx, batch); rc != 0 {
		return nil, fmt.Errorf("oracle: llama_decode returned %d", rc)
	}
	var out [][]float32
	for i := range tokens {
		if all || i == len(tokens)-1 {
			p := C.llama_get_logits_ith(o.ctx, C.int32_t(i))
			if p == nil {
				return nil, fmt.Errorf("oracle: no logits for token %d", i)
			}
			out = append(out, append([]float32(nil), unsafe.Slice((*float32)(unsafe.Pointer(p)), o.vocab)...))
		}
	}
	return out, nil
}

// Greedy evaluates the prompt and then generates n tokens by argmax.
func (o *Oracle) Greedy(prompt []int32, n int) ([]int32, error) {
	C.llama_memory_clear(C.llama_get_memory(o.ctx), true)
	logits, err := o.eval(prompt, 0, false)
	if err != nil {
		return nil, err
	}
	pos := len(prompt)
	var out []int32
	for {
		next := Argmax(logits[len(logits)-1])
		out = append(out, next)
		if len(out) == n {
			return out, nil
		}
		if logits, err = o.eval([]int32{next}, pos, false); err != nil {
			return nil, err
		}
		pos++
	}
}

// Argmax returns the index of the largest value (the first on ties).
func Argmax(v []float32) int32 {
	best := 0
	for i := range v {
		if v[i] > v[best] {
			best = i
		}
	}
	return int32(best)
}

// Prefill clears the cache and evaluates tokens, returning the last
// position's logits; Decode then evaluates one token at pos.
func (o *Oracle) Prefill(tokens []int32) ([]float32, error) {
	C.llama_memory_clear(C.llama_get_memory(o.ctx), true)
	l, err := o.eval(tokens, 0, false)
	if err != nil {
		return nil, err
	}
	return l[0], nil
}

// Decode evaluates one token at position pos (after Prefill).
func (o *Oracle) Decode(token int32, pos int) ([]float32, error) {
	l, err := o.eval([]int32{token}, pos, false)
	if err != nil {
		return nil, err
	}
	return l[0], nil
}

// Entry is one token of a batch: its sequence, position, and whether its
// logits are wanted.
type Entry struct {
	Token  int32
	Pos    int
	Seq    int
	Logits bool
}

// EvalBatch evaluates a batch of tokens of several sequences (positions
// continue each sequence's cache) and returns the logits of the entries
// that want them, in order.
func (o *Oracle) EvalBatch(entries []Entry) ([][]float32, error) {
	batch := C.llama_batch_init(C.int32_t(len(entries)), 0, 1)
	defer C.llama_batch_free(batch)
	tok := unsafe.Slice(batch.token, len(entries))
	pos := unsafe.Slice(batch.pos, len(entries))
	nseq := unsafe.Slice(batch.n_seq_id, len(entries))
	seq := unsafe.Slice(batch.seq_id, len(entries))
	logits := unsafe.Slice(batch.logits, len(entries))
	for i, e := range entries {
		tok[i] = C.llama_token(e.Token)
		pos[i] = C.llama_pos(e.Pos)
		nseq[i] = 1
		*seq[i] = C.llama_seq_id(e.Seq)
		logits[i] = 0
		if e.Logits {
			logits[i] = 1
		}
	}
	batch.n_tokens = C.int32_t(len(entries))
	if rc := C.llama_decode(o.ctx, batch); rc != 0 {
		return nil, fmt.Errorf("oracle: llama_decode returned %d", rc)
	}
	var out [][]float32
	for i, e := range entries {
		if e.Logits {
			p := C.llama_get_logits_ith(o.ctx, C.int32_t(i))
			if p == nil {
				return nil, fmt.Errorf("oracle: no logits for entry %d", i)
			}
			out = append(out, unsafe.Slice((*float32)(unsafe.Pointer(p)), o.vocab))
		}
	}
	return out, nil
}

// Clear empties the KV cache of every sequence.
func (o *Oracle) Clear() { C.llama_memory_clear(C.llama_get_memory(o.ctx), true) }
