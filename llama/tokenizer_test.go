package llama

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

// TestTokenizerMatchesLlamaCpp checks every pair of llama.cpp's own
// tokenizer test for the LLaMA SentencePiece vocabulary.
func TestTokenizerMatchesLlamaCpp(t *testing.T) {
	checkPairs(t, testutil.Shared(t, "models/ggml-vocab-llama-spm.gguf"))
}

// checkPairs runs llama.cpp's tokenizer test pairs of a vocab-only GGUF
// (its .inp inputs and .out expected token ids).
func checkPairs(t *testing.T, vocab string) {
	inp, err := os.ReadFile(vocab + ".inp")
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.ReadFile(vocab + ".out")
	if err != nil {
		t.Fatal(err)
	}
	const sep = "\n__ggml_vocab_test__\n"
	inputs := strings.Split(strings.TrimSuffix(string(inp), sep), sep)
	lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	if len(inputs) != len(lines) {
		t.Fatalf("%d inputs but %d expected outputs", len(inputs), len(lines))
	}
	tok, err := LoadTokenizer(vocab)
	if err != nil {
		t.Fatal(err)
	}
	for i, text := range inputs {
		var want []int32
		for _, f := range strings.Fields(lines[i]) {
			n, err := strconv.Atoi(f)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, int32(n))
		}
		got, err := tok.Encode(text, false)
		if err != nil {
			t.Fatalf("pair %d %q: %v", i, text, err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("pair %d %q:\n got  %v\n want %v", i, text, got, want)
		}
	}
	t.Logf("%d tokenizer pairs match", len(inputs))
}

// TestTokenizeSpecialFloodIsLinear is a regression test: splitting special
// tokens out of a prompt rescanned the text for every special found, so
// 960 KB of "<s>" took 30-40 s. Each input here is tokenized within a
// budget far above what a linear splitter needs on a slow machine.
func TestTokenizeSpecialFloodIsLinear(t *testing.T) {
	for _, vocab := range []string{"models/ggml-vocab-llama-spm.gguf", "models/llama3.1-chat-vocab.gguf"} {
		tok, err := LoadTokenizer(testutil.Shared(t, vocab))
		if err != nil {
			t.Fatal(err)
		}
		bos := tok.Vocabulary().Values[tok.Vocabulary().BOS[0]]
		for _, c := range []struct {
			name, text string
			tokens     int
		}{
			{"specials", strings.Repeat(bos, 960<<10/len(bos)), 960 << 10 / len(bos)},
			{"specials and text", strings.Repeat(bos+"a", 256<<10/(len(bos)+1)), -1},
		} {
			start := time.Now()
			ids, err := tok.Encode(c.text, false)
			if err != nil {
				t.Fatal(err)
			}
			d := time.Since(start)
			t.Logf("%s, %s: %d KB → %d tokens in %v", vocab, c.name, len(c.text)>>10, len(ids), d)
			if c.tokens >= 0 && len(ids) != c.tokens {
				t.Errorf("%d tokens, want %d", len(ids), c.tokens)
			}
			if d > 3*time.Second {
				t.Errorf("%s, %s: %v for %d KB", vocab, c.name, d, len(c.text)>>10)
			}
		}
	}
}

// FuzzSpecialSplitter checks the special-token splitter on arbitrary text:
// the plain runs and special tokens it reports rebuild the input exactly,
// plain runs hold no special token, and nothing panics.
func FuzzSpecialSplitter(f *testing.F) {
	for _, seed := range []string{"", "<s>", "a<s>b</s>c", "<s><s><s>", "<<s>s>", "</s", "x<unk>y<s>", strings.Repeat("<s>a", 50)} {
		f.Add(seed)
	}
	st := &specialTokens{texts: []string{"<unk>", "</s>", "<s>"}, ids: []int32{0, 2, 1}}
	f.Fuzz(func(t *testing.T, s string) {
		var b strings.Builder
		err := st.split(s, func(text string) error {
			for _, sp := range st.texts {
				if strings.Contains(text, sp) {
					t.Fatalf("plain run %q holds %q", text, sp)
				}
			}
			if text == "" {
				t.Fatal("empty plain run")
			}
			b.WriteString(text)
			return nil
		}, func(id int32) {
			b.WriteString(map[int32]string{0: "<unk>", 1: "<s>", 2: "</s>"}[id])
		})
		if err != nil || b.String() != s {
			t.Fatalf("split %q rebuilt as %q (%v)", s, b.String(), err)
		}
	})
}

// TestLlama3TokenizerMatchesLlamaCpp checks llama.cpp's Llama-3 BPE test
// pairs.
func TestLlama3TokenizerMatchesLlamaCpp(t *testing.T) {
	checkPairs(t, testutil.Shared(t, "models/ggml-vocab-llama-bpe.gguf"))
}
