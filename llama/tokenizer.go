package llama

import (
	"container/heap"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/dlclark/regexp2"
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
		return &sentencePiece{SentencePiece: spm, vocab: vocab, specials: newSpecials(vocab),
			addSpacePrefix: kv.Bool("tokenizer.ggml.add_space_prefix", true)}, nil
	case "gpt2":
		return newBytePairs(vocab, pretokenizer(kv.String("tokenizer.ggml.pre"))), nil
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

// specialTokens splits special tokens out of text in one pass (ollama's
// tokenizers rescan and rebuild their fragment list for every special
// found: quadratic in their number, so a prompt full of "<s>" took seconds
// per 100 KB).
type specialTokens struct {
	texts []string // longest first, so a special containing another wins
	ids   []int32
}

func newSpecials(v *tokenizer.Vocabulary) *specialTokens {
	st := &specialTokens{}
	for _, sp := range v.SpecialVocabulary() {
		if sp != "" {
			st.texts = append(st.texts, sp)
		}
	}
	sort.SliceStable(st.texts, func(i, j int) bool { return len(st.texts[i]) > len(st.texts[j]) })
	for _, sp := range st.texts {
		st.ids = append(st.ids, v.Encode(sp))
	}
	return st
}

// split calls text for every run of plain text and special for every
// special token, in order.
func (st *specialTokens) split(s string, text func(string) error, special func(int32)) error {
	next := make([]int, len(st.texts)) // next occurrence at or after pos; -1: none
	for i := range next {
		next[i] = -2 // not searched yet
	}
	pos := 0
	for pos < len(s) {
		at, which := len(s), -1
		for i, sp := range st.texts {
			if next[i] == -2 || (next[i] >= 0 && next[i] < pos) {
				if j := strings.Index(s[pos:], sp); j >= 0 {
					next[i] = pos + j
				} else {
					next[i] = -1
				}
			}
			if next[i] >= 0 && next[i] < at {
				at, which = next[i], i
			}
		}
		if at > pos {
			if err := text(s[pos:at]); err != nil {
				return err
			}
		}
		if which < 0 {
			break
		}
		special(st.ids[which])
		pos = at + len(st.texts[which])
	}
	return nil
}

// sentencePiece adds llama.cpp's SentencePiece conventions to ollama's
// tokenizer: special tokens are split out first, and every run of plain
// text that starts the input or follows a special token gets the dummy
// space prefix ("▁") that SentencePiece models are trained with.
type sentencePiece struct {
	tokenizer.SentencePiece
	vocab          *tokenizer.Vocabulary
	specials       *specialTokens
	addSpacePrefix bool
}

func (t *sentencePiece) Encode(s string, addSpecial bool) ([]int32, error) {
	var ids []int32
	prevSpecial := true
	err := t.specials.split(s, func(text string) error {
		if t.addSpacePrefix && prevSpecial {
			text = " " + text
		}
		part, err := t.SentencePiece.Encode(text, false)
		ids = append(ids, part...)
		prevSpecial = false
		return err
	}, func(id int32) {
		ids = append(ids, id)
		prevSpecial = true
	})
	if err != nil {
		return nil, err
	}
	return addSpecials(t.vocab, ids, addSpecial), nil
}

// bytePairs is byte-level BPE as llama.cpp does it: special tokens split
// out first, the pre-tokenizer's pieces, then merges by rank with ties
// going to the leftmost pair (ollama's encoder breaks ties arbitrarily,
// which merges runs like "......" and "" differently). Decoding is
// ollama's.
type bytePairs struct {
	tokenizer.BytePairEncoding
	vocab    *tokenizer.Vocabulary
	specials *specialTokens
	regexps  []*regexp2.Regexp
}

func newBytePairs(vocab *tokenizer.Vocabulary, pre []string) *bytePairs {
	if len(pre) == 0 {
		// The byte-level pre-tokenizer of GPT-2 (Hugging Face's default).
		pre = []string{`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`}
	}
	t := &bytePairs{BytePairEncoding: tokenizer.NewBytePairEncoding(vocab, pre...), vocab: vocab, specials: newSpecials(vocab)}
	for _, p := range pre {
		t.regexps = append(t.regexps, regexp2.MustCompile(p, regexp2.RE2))
	}
	return t
}

func (t *bytePairs) Encode(s string, addSpecial bool) ([]int32, error) {
	var ids []int32
	err := t.specials.split(s, func(text string) error {
		for _, piece := range t.split(text) {
			ids = t.merge(piece, ids)
		}
		return nil
	}, func(id int32) { ids = append(ids, id) })
	if err != nil {
		return nil, err
	}
	return addSpecials(t.vocab, ids, addSpecial), nil
}

// split applies the pre-tokenizer's expressions in turn, keeping the text
// between matches as pieces of its own.
func (t *bytePairs) split(s string) []string {
	parts := []string{s}
	for _, re := range t.regexps {
		var next []string
		for _, part := range parts {
			r := []rune(part)
			offset := 0
			m, _ := re.FindRunesMatch(r)
			for ; m != nil; m, _ = re.FindNextMatch(m) {
				if m.Index > offset {
					next = append(next, string(r[offset:m.Index]))
				}
				next = append(next, m.String())
				offset = m.Index + m.Length
			}
			if offset < len(r) {
				next = append(next, string(r[offset:]))
			}
		}
		parts = next
	}
	return parts
}

// byteRune maps a byte to the printable rune that stands for it in
// byte-level BPE vocabularies (GPT-2's bytes_to_unicode).
func byteRune(b byte) rune {
	r := rune(b)
	switch {
	case r == 0xad:
		return 0x143
	case r <= 0x20:
		return r + 0x100
	case r >= 0x7f && r <= 0xa0:
		return r + 0xa2
	}
	return r
}

type bpeSymbol struct {
	text       string
	prev, next int
}

type bpePair struct {
	left, right int // symbol indices
	rank        int
	text        string
}

type bpeQueue []bpePair

func (q bpeQueue) Len() int { return len(q) }
func (q bpeQueue) Less(i, j int) bool {
	return q[i].rank < q[j].rank || (q[i].rank == q[j].rank && q[i].left < q[j].left)
}
func (q bpeQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *bpeQueue) Push(x any)   { *q = append(*q, x.(bpePair)) }
func (q *bpeQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// merge encodes one pre-tokenized piece and appends its ids.
func (t *bytePairs) merge(piece string, ids []int32) []int32 {
	var sb strings.Builder
	for i := 0; i < len(piece); i++ {
		sb.WriteRune(byteRune(piece[i]))
	}
	text := sb.String()
	if id := t.vocab.Encode(text); id >= 0 {
		return append(ids, id)
	}
	var syms []bpeSymbol
	for i, r := range []rune(text) {
		syms = append(syms, bpeSymbol{text: string(r), prev: i - 1, next: i + 1})
	}
	q := &bpeQueue{}
	push := func(l, r int) {
		if l < 0 || r >= len(syms) {
			return
		}
		if rank := t.vocab.Merge(syms[l].text, syms[r].text); rank >= 0 {
			heap.Push(q, bpePair{left: l, right: r, rank: rank, text: syms[l].text + syms[r].text})
		}
	}
	for i := 0; i+1 < len(syms); i++ {
		push(i, i+1)
	}
	for q.Len() > 0 {
		p := heap.Pop(q).(bpePair)
		l, r := &syms[p.left], &syms[p.right]
		if l.text == "" || r.text == "" || l.text+r.text != p.text || l.next != p.right {
			continue // stale: one side merged since
		}
		l.text += r.text
		r.text = ""
		l.next = r.next
		if r.next < len(syms) {
			syms[r.next].prev = p.left
		}
		push(l.prev, p.left)
		push(p.left, l.next)
	}
	for _, sy := range syms {
		if sy.text == "" {
			continue
		}
		if id := t.vocab.Encode(sy.text); id >= 0 {
			ids = append(ids, id)
			continue
		}
		for _, b := range []byte(sy.text) { // not a token: its runes one by one
			if id := t.vocab.Encode(string(rune(b))); id >= 0 {
				ids = append(ids, id)
			}
		}
	}
	return ids
}

// addSpecials adds BOS and EOS as the vocabulary asks.
func addSpecials(v *tokenizer.Vocabulary, ids []int32, add bool) []int32 {
	if add && v.AddBOS && len(v.BOS) > 0 {
		ids = append([]int32{v.BOS[0]}, ids...)
	}
	if add && v.AddEOS && len(v.EOS) > 0 {
		ids = append(ids, v.EOS[0])
	}
	return ids
}
