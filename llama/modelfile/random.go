package modelfile

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// Spec describes a random-weight LLaMA model.
type Spec struct {
	Layers, Embedding, FeedForward int
	Heads, KVHeads                 int
	Vocab                          int // ignored with VocabFrom
	ContextLength                  int
	// Type of the 2-D weights (norms stay F32); see QuantTypeFor.
	Type gguf.TensorType
	Seed uint64
	// TiedOutput omits output.weight so the head reuses token_embd.
	TiedOutput bool
	// RopeFreqs adds a llama3-style rope_freqs.weight tensor.
	RopeFreqs bool
	// RopeBase sets rope.freq_base when non-zero.
	RopeBase float32
	// VocabFrom copies the tokenizer metadata of another GGUF.
	VocabFrom string
}

// SevenB returns a spec with LLaMA-2-7B layer shapes and the given depth.
func SevenB(layers int, typ gguf.TensorType) Spec {
	return Spec{Layers: layers, Embedding: 4096, FeedForward: 11008, Heads: 32, KVHeads: 32, Vocab: 32000, ContextLength: 4096, Type: typ, Seed: 1}
}

// WriteRandom writes a random-weight model. Weights are uniform with the
// variance of a 1/sqrt(fan_in) initialisation so activations stay in range
// through many layers; norm weights are 1.
func WriteRandom(path string, s Spec) error {
	if s.Layers <= 0 || s.Embedding <= 0 || s.FeedForward <= 0 || s.Heads <= 0 {
		return fmt.Errorf("random model needs positive layers, embedding, feed-forward and heads: %+v", s)
	}
	if s.KVHeads == 0 {
		s.KVHeads = s.Heads
	}
	if s.Embedding%s.Heads != 0 || s.Heads%s.KVHeads != 0 {
		return fmt.Errorf("embedding %d must divide into %d heads, and heads into %d KV heads", s.Embedding, s.Heads, s.KVHeads)
	}
	if s.ContextLength == 0 {
		s.ContextLength = 2048
	}
	w := gguf.NewWriter()
	w.KV.Set("general.architecture", "llama")
	w.KV.Set("general.name", fmt.Sprintf("random-llama-%dL-%d", s.Layers, s.Embedding))
	if ft, ok := fileTypes[s.Type]; ok {
		w.KV.Set("general.file_type", ft)
	}
	w.KV.Set("llama.block_count", uint32(s.Layers))
	w.KV.Set("llama.context_length", uint32(s.ContextLength))
	w.KV.Set("llama.embedding_length", uint32(s.Embedding))
	w.KV.Set("llama.feed_forward_length", uint32(s.FeedForward))
	w.KV.Set("llama.attention.head_count", uint32(s.Heads))
	w.KV.Set("llama.attention.head_count_kv", uint32(s.KVHeads))
	w.KV.Set("llama.attention.layer_norm_rms_epsilon", float32(1e-5))
	headDim := s.Embedding / s.Heads
	w.KV.Set("llama.rope.dimension_count", uint32(headDim))
	if s.RopeBase != 0 {
		w.KV.Set("llama.rope.freq_base", s.RopeBase)
	}
	vocab, err := tokenizerKV(&w.KV, s)
	if err != nil {
		return err
	}
	kvDim := s.KVHeads * headDim
	seed := s.Seed
	add := func(name string, in, out int, scale float32) error {
		seed++
		tensorSeed := seed
		typ := gguf.TypeF32
		shape := []uint64{uint64(in)}
		if out > 0 {
			shape = append(shape, uint64(out))
			typ = QuantTypeFor(s.Type, uint64(in))
		}
		info := gguf.TensorInfo{Name: name, Type: typ, Shape: shape}
		return w.AddTensorFunc(name, typ, shape, func(wr io.Writer) error {
			var v []float32
			if out == 0 {
				v = make([]float32, in)
				for i := range v {
					v[i] = 1
				}
			} else {
				v = uniform(in*out, scale, tensorSeed)
			}
			data, err := QuantizeFloats(typ, v, in)
			if err != nil {
				return err
			}
			_, err = wr.Write(data)
			return err
		}, info.Size())
	}
	fan := func(in int) float32 { return float32(math.Sqrt(3 / float64(in))) }
	if err := add("token_embd.weight", s.Embedding, vocab, 1); err != nil {
		return err
	}
	if s.RopeFreqs {
		// llama3-style per-frequency factors: 1 for high frequencies,
		// growing for low ones.
		factors := make([]float32, headDim/2)
		for i := range factors {
			factors[i] = 1 + 3*float32(i)/float32(len(factors))
		}
		if err := w.AddTensor("rope_freqs.weight", gguf.TypeF32, []uint64{uint64(len(factors))}, f32bytes(factors)); err != nil {
			return err
		}
	}
	for l := 0; l < s.Layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		for _, t := range []struct {
			name    string
			in, out int
		}{
			{"attn_norm.weight", s.Embedding, 0},
			{"attn_q.weight", s.Embedding, s.Embedding},
			{"attn_k.weight", s.Embedding, kvDim},
			{"attn_v.weight", s.Embedding, kvDim},
			{"attn_output.weight", s.Embedding, s.Embedding},
			{"ffn_norm.weight", s.Embedding, 0},
			{"ffn_gate.weight", s.Embedding, s.FeedForward},
			{"ffn_up.weight", s.Embedding, s.FeedForward},
			{"ffn_down.weight", s.FeedForward, s.Embedding},
		} {
			if err := add(p+t.name, t.in, t.out, fan(t.in)); err != nil {
				return err
			}
		}
	}
	if err := add("output_norm.weight", s.Embedding, 0, 0); err != nil {
		return err
	}
	if !s.TiedOutput {
		if err := add("output.weight", s.Embedding, vocab, fan(s.Embedding)); err != nil {
			return err
		}
	}
	return w.WriteFile(path)
}

// uniform returns n values uniform in [-scale, scale), generated in parallel
// from a seed so the same spec always yields the same file.
func uniform(n int, scale float32, seed uint64) []float32 {
	v := make([]float32, n)
	const chunk = 1 << 20
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for c := 0; c*chunk < n; c++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			r := rand.New(rand.NewPCG(seed, uint64(c)))
			for i := c * chunk; i < min(n, (c+1)*chunk); i++ {
				v[i] = scale * (2*r.Float32() - 1)
			}
		}()
	}
	wg.Wait()
	return v
}

func f32bytes(v []float32) []byte {
	out, _ := QuantizeFloats(gguf.TypeF32, v, len(v))
	return out
}

// tokenizerKV writes tokenizer metadata and returns the vocabulary size:
// copied from s.VocabFrom, or a synthetic SentencePiece vocabulary with byte
// fallback (every string encodes) of s.Vocab tokens.
func tokenizerKV(kv *gguf.KV, s Spec) (int, error) {
	if s.VocabFrom != "" {
		f, err := gguf.Open(s.VocabFrom)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		n := 0
		for _, k := range f.KV.Keys() {
			if len(k) > 10 && k[:10] == "tokenizer." {
				v, _ := f.KV.Value(k)
				kv.Set(k, v)
			}
		}
		if toks, ok := f.KV.Strings("tokenizer.ggml.tokens"); ok {
			n = len(toks)
		}
		if n == 0 {
			return 0, fmt.Errorf("%s has no tokenizer", s.VocabFrom)
		}
		return n, nil
	}
	n := max(s.Vocab, 3+256+26)
	tokens := make([]string, 0, n)
	types := make([]int32, 0, n)
	scores := make([]float32, 0, n)
	push := func(t string, typ int32) {
		tokens = append(tokens, t)
		types = append(types, typ)
		scores = append(scores, -float32(len(tokens)))
	}
	push("<unk>", 2)
	push("<s>", 3)
	push("</s>", 3)
	for b := 0; b < 256; b++ {
		push(fmt.Sprintf("<0x%02X>", b), 6)
	}
	push("▁", 1)
	for c := 'a'; c <= 'z'; c++ {
		push(string(c), 1)
	}
	for len(tokens) < n {
		push(fmt.Sprintf("▁t%d", len(tokens)), 1)
	}
	kv.Set("tokenizer.ggml.model", "llama")
	kv.Set("tokenizer.ggml.tokens", tokens)
	kv.Set("tokenizer.ggml.scores", scores)
	kv.Set("tokenizer.ggml.token_type", types)
	kv.Set("tokenizer.ggml.bos_token_id", uint32(1))
	kv.Set("tokenizer.ggml.eos_token_id", uint32(2))
	kv.Set("tokenizer.ggml.unknown_token_id", uint32(0))
	return n, nil
}
