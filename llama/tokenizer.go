package llama

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/ollama/ollama/fs"
	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/ollama/ollama/tokenizer"
)

// NewTokenizer builds the tokenizer a GGUF describes (SentencePiece for
// tokenizer.ggml.model "llama", byte-pair encoding for "gpt2").
func NewTokenizer(kv fs.Config) (tokenizer.Tokenizer, error) {
	vocab := &tokenizer.Vocabulary{
		Values: kv.Strings("tokenizer.ggml.tokens"),
		Scores: kv.Floats("tokenizer.ggml.scores"),
		Types:  kv.Ints("tokenizer.ggml.token_type"),
		Merges: kv.Strings("tokenizer.ggml.merges"),
		AddBOS: kv.Bool("tokenizer.ggml.add_bos_token", true),
		BOS:    []int32{int32(kv.Uint("tokenizer.ggml.bos_token_id"))},
		AddEOS: kv.Bool("tokenizer.ggml.add_eos_token", false),
		EOS:    append([]int32{int32(kv.Uint("tokenizer.ggml.eos_token_id"))}, kv.Ints("tokenizer.ggml.eos_token_ids")...),
	}
	if len(vocab.Values) == 0 {
		return nil, fmt.Errorf("GGUF has no tokenizer.ggml.tokens")
	}
	if n := len(vocab.Values); len(vocab.Types) != n || (len(vocab.Scores) != 0 && len(vocab.Scores) != n) {
		return nil, fmt.Errorf("GGUF tokenizer arrays disagree: %d tokens, %d types, %d scores", n, len(vocab.Types), len(vocab.Scores))
	}
	if eot := kv.Uint("tokenizer.ggml.eot_token_id", ^uint32(0)); eot != ^uint32(0) {
		vocab.EOS = append(vocab.EOS, int32(eot))
	}
	switch model := kv.String("tokenizer.ggml.model"); model {
	case "llama":
		if len(vocab.Scores) == 0 {
			return nil, fmt.Errorf("GGUF SentencePiece tokenizer has no scores")
		}
		spm := tokenizer.NewSentencePiece(vocab)
		return &sentencePiece{SentencePiece: spm, vocab: vocab, addSpacePrefix: kv.Bool("tokenizer.ggml.add_space_prefix", true)}, nil
	case "gpt2":
		return tokenizer.NewBytePairEncoding(vocab, pretokenizer(kv.String("tokenizer.ggml.pre"))...), nil
	default:
		return nil, fmt.Errorf("unsupported tokenizer model %q", model)
	}
}

// pretokenizer returns the split expressions of a BPE pre-tokenizer name.
func pretokenizer(name string) []string {
	switch name {
	case "qwen2":
		return []string{`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}
	case "refact":
		return []string{`\p{N}`, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`}
	case "default":
		return nil
	default: // llama-bpe (LLaMA 3) and unknown names
		return []string{`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}
	}
}

// LoadTokenizer reads only the metadata of the GGUF at path (a vocab-only
// file works) and builds its tokenizer.
func LoadTokenizer(path string) (tokenizer.Tokenizer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	meta, err := fsggml.Decode(f, -1)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return NewTokenizer(meta.KV())
}

// sentencePiece adds llama.cpp's SentencePiece conventions to ollama's
// tokenizer: special tokens are split out first, and every run of plain
// text that starts the input or follows a special token gets the dummy
// space prefix ("▁") that SentencePiece models are trained with.
type sentencePiece struct {
	tokenizer.SentencePiece
	vocab          *tokenizer.Vocabulary
	addSpacePrefix bool
}

func (t *sentencePiece) Encode(s string, addSpecial bool) ([]int32, error) {
	specials := append([]string(nil), t.vocab.SpecialVocabulary()...)
	// Longest first, so that a special token containing another wins.
	sort.SliceStable(specials, func(i, j int) bool { return len(specials[i]) > len(specials[j]) })
	var ids []int32
	prevSpecial := true
	for len(s) > 0 {
		at, which := len(s), ""
		for _, sp := range specials {
			if sp == "" {
				continue
			}
			if i := strings.Index(s, sp); i >= 0 && i < at {
				at, which = i, sp
			}
		}
		if at > 0 {
			text := s[:at]
			if t.addSpacePrefix && prevSpecial {
				text = " " + text
			}
			part, err := t.SentencePiece.Encode(text, false)
			if err != nil {
				return nil, err
			}
			ids = append(ids, part...)
			prevSpecial = false
		}
		if which == "" {
			break
		}
		ids = append(ids, t.vocab.Encode(which))
		prevSpecial = true
		s = s[at+len(which):]
	}
	if addSpecial && t.vocab.AddBOS && len(t.vocab.BOS) > 0 {
		ids = append([]int32{t.vocab.BOS[0]}, ids...)
	}
	if addSpecial && t.vocab.AddEOS && len(t.vocab.EOS) > 0 {
		ids = append(ids, t.vocab.EOS[0])
	}
	return ids, nil
}
