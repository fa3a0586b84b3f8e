package llama

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

// TestTokenizerMatchesLlamaCpp checks every pair of llama.cpp's own
// tokenizer test for the LLaMA SentencePiece vocabulary.
func TestTokenizerMatchesLlamaCpp(t *testing.T) {
	vocab := testutil.Shared(t, "models/ggml-vocab-llama-spm.gguf")
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
