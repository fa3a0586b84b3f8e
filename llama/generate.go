package llama

import (
	"context"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/kernels"
)

// TextStream turns generated tokens into text as it becomes printable:
// control tokens are dropped and bytes of an unfinished UTF-8 character are
// held back until the character completes.
type TextStream struct {
	tok     tokenizer.Tokenizer
	pending []byte
}

// NewTextStream returns a stream for tok.
func NewTextStream(tok tokenizer.Tokenizer) *TextStream { return &TextStream{tok: tok} }

// Add returns the text that token t completes (possibly empty).
func (s *TextStream) Add(t int32) string {
	if IsControl(s.tok, t) {
		return ""
	}
	piece, err := s.tok.Decode([]int32{t})
	if err != nil {
		return ""
	}
	s.pending = append(s.pending, piece...)
	n := len(s.pending)
	// Keep back an incomplete trailing character (at most 3 bytes).
	for back := 1; back <= 3 && back <= n; back++ {
		b := s.pending[n-back]
		if b < 0x80 {
			break
		}
		if utf8.RuneStart(b) {
			if !utf8.FullRune(s.pending[n-back:]) {
				n -= back
			}
			break
		}
	}
	out := strings.ToValidUTF8(string(s.pending[:n]), "\uFFFD")
	s.pending = append(s.pending[:0], s.pending[n:]...)
	return out
}

// Flush returns whatever is held back (invalid bytes become U+FFFD).
func (s *TextStream) Flush() string {
	out := strings.ToValidUTF8(string(s.pending), "\uFFFD")
	s.pending = s.pending[:0]
	return out
}

// IsControl reports whether t is a control token (BOS, EOS, ...), which is
// never shown as text.
func IsControl(tok tokenizer.Tokenizer, t int32) bool {
	v := tok.Vocabulary()
	if t < 0 || int(t) >= len(v.Types) {
		return false
	}
	return v.Types[t] == tokenizer.TOKEN_TYPE_CONTROL
}

// GenerateOptions control Engine.Generate.
type GenerateOptions struct {
	MaxTokens int
	Sampler   SamplerOptions
	Adapters  []kernels.Use
	// PrefillChunk bounds the tokens of one prefill step (default 512).
	PrefillChunk int
}

// Generate runs one sequence to completion: prefill the prompt, then sample
// until EOS or MaxTokens, calling emit with each token (emit returning false
// stops early). It returns the generated tokens.
func (e *Engine) Generate(ctx context.Context, prompt []int32, o GenerateOptions, emit func(int32) bool) ([]int32, error) {
	chunk := o.PrefillChunk
	if chunk <= 0 {
		chunk = 512
	}
	s := NewSampler(o.Sampler)
	kv := e.Pool.NewSeq(0)
	defer kv.Release()
	if len(prompt) == 0 || len(prompt) >= e.MaxSeqLen {
		return nil, fmt.Errorf("the prompt has %d tokens; the engine takes 1 to %d", len(prompt), e.MaxSeqLen-1)
	}
	if err := kv.Reserve(len(prompt) + 1); err != nil {
		return nil, err
	}
	var logits []float32
	for pos := 0; pos < len(prompt); {
		end := min(len(prompt), pos+chunk)
		res, err := e.Step([]Seq{{KV: kv, Tokens: prompt[pos:end], Adapters: o.Adapters, NoLogits: end < len(prompt)}})
		if err != nil {
			return nil, err
		}
		if end == len(prompt) {
			logits = res[0][0]
		}
		pos = end
	}
	var out []int32
	for len(out) < o.MaxTokens {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		next := s.Sample(logits)
		if e.Model.Tokenizer.Is(next, tokenizer.SpecialEOS) {
			break
		}
		s.Accept(next)
		out = append(out, next)
		if emit != nil && !emit(next) {
			break
		}
		if len(out) == o.MaxTokens || kv.Len() >= e.MaxSeqLen {
			break
		}
		if err := kv.Reserve(1); err != nil {
			return out, err
		}
		res, err := e.Step([]Seq{{KV: kv, Tokens: []int32{next}, Adapters: o.Adapters}})
		if err != nil {
			return out, err
		}
		logits = res[0][0]
	}
	return out, nil
}

// TokenPieces returns every token's text as bytes (byte tokens as their
// byte), nil for control tokens, which never appear in text.
func TokenPieces(tok tokenizer.Tokenizer) [][]byte {
	n := len(tok.Vocabulary().Values)
	pieces := make([][]byte, n)
	for t := range int32(n) {
		if IsControl(tok, t) {
			continue
		}
		if s, err := tok.Decode([]int32{t}); err == nil && s != "" {
			pieces[t] = []byte(s)
		}
	}
	return pieces
}
