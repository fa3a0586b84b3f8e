package llama

import (
	"cmp"
	"fmt"

	"github.com/ollama/ollama/fs"
)

// Config holds the hyper-parameters of a LLaMA-architecture GGUF.
type Config struct {
	Architecture  string
	Layers        int
	Embedding     int // hidden size
	FeedForward   int
	Heads         int
	KVHeads       int
	HeadDim       int
	RopeDim       int
	RopeBase      float32
	RopeScale     float32 // frequency scale (1/linear factor)
	Eps           float32
	ContextLength int
	VocabSize     int
}

// QDim is the width of the attention query projection's output.
func (c Config) QDim() int { return c.Heads * c.HeadDim }

// KVDim is the width of the key and value projections' outputs.
func (c Config) KVDim() int { return c.KVHeads * c.HeadDim }

// configFrom reads the hyper-parameters, with llama.cpp's defaults and
// required keys.
func configFrom(kv fs.Config) (Config, error) {
	c := Config{Architecture: kv.Architecture()}
	if c.Architecture != "llama" {
		return c, fmt.Errorf("unsupported architecture %q: sbora-serve runs llama-architecture GGUFs", c.Architecture)
	}
	need := func(key string) (uint32, error) {
		if kv.Value(key) == nil && kv.Value(c.Architecture+"."+key) == nil {
			return 0, fmt.Errorf("GGUF lacks required key %s.%s", c.Architecture, key)
		}
		return kv.Uint(key), nil
	}
	var err error
	var v uint32
	if v, err = need("block_count"); err != nil {
		return c, err
	}
	c.Layers = int(v)
	if v, err = need("embedding_length"); err != nil {
		return c, err
	}
	c.Embedding = int(v)
	if v, err = need("feed_forward_length"); err != nil {
		return c, err
	}
	c.FeedForward = int(v)
	if v, err = need("attention.head_count"); err != nil {
		return c, err
	}
	c.Heads = int(v)
	if c.Heads <= 0 || c.Embedding <= 0 || c.Layers <= 0 {
		return c, fmt.Errorf("GGUF has invalid shape: %d layers, %d embedding, %d heads", c.Layers, c.Embedding, c.Heads)
	}
	c.KVHeads = int(kv.Uint("attention.head_count_kv", uint32(c.Heads)))
	if c.KVHeads <= 0 || c.Heads%c.KVHeads != 0 {
		return c, fmt.Errorf("GGUF has %d heads and %d KV heads: heads must be a multiple", c.Heads, c.KVHeads)
	}
	c.HeadDim = int(kv.Uint("attention.key_length", uint32(c.Embedding/c.Heads)))
	c.RopeDim = int(kv.Uint("rope.dimension_count", uint32(c.HeadDim)))
	c.RopeBase = kv.Float("rope.freq_base", 10000)
	factor := cmp.Or(kv.Float("rope.scaling.factor", 0), kv.Float("rope.scale_linear", 0))
	c.RopeScale = 1
	if factor != 0 {
		c.RopeScale = 1 / factor
	}
	if kv.Value("attention.layer_norm_rms_epsilon") == nil && kv.Value(c.Architecture+".attention.layer_norm_rms_epsilon") == nil {
		return c, fmt.Errorf("GGUF lacks required key %s.attention.layer_norm_rms_epsilon", c.Architecture)
	}
	c.Eps = kv.Float("attention.layer_norm_rms_epsilon")
	c.ContextLength = int(kv.Uint("context_length", 2048))
	c.VocabSize = len(kv.Strings("tokenizer.ggml.tokens"))
	return c, nil
}
