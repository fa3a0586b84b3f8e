package llama

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// promptTokens returns the first n tokens of storiesText with BOS, as
// llama.cpp tokenizes them (the engine's tokenizer must agree).
func promptTokens(t *testing.T, m *Model, o *oracle.Oracle, n int) []int32 {
	t.Helper()
	ours, err := m.Tokenizer.Encode(storiesText, true)
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := o.Tokenize(storiesText, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ours, theirs) {
		t.Fatalf("tokenizers disagree:\n ours   %v\n llama.cpp %v", ours, theirs)
	}
	if len(ours) < n {
		t.Fatalf("prompt has %d tokens, need %d", len(ours), n)
	}
	return ours[:n]
}

// compareWithOracle checks every position's logits of a 64-token prompt and
// a 64-token greedy continuation against llama.cpp, with CPU weight
// repacking off on both sides and on on both sides (repacked weights run
// other kernels, so each engine is compared with its like).
func compareWithOracle(t *testing.T, path string, tol float64) {
	for _, repack := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "repacked"}[repack], func(t *testing.T) {
			compareWithOracleLayout(t, path, tol, repack)
		})
	}
}

func compareWithOracleLayout(t *testing.T, path string, tol float64, repack bool) {
	// Repacked runs use the whole serving configuration (persistent
	// worker threads, huge pages): none of it may change a logit.
	opts := LoadOptions{Threads: 2}
	if repack {
		opts = ServingOptions(2)
	}
	m, err := Load(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	if n, _ := m.Repacked(); repack && strings.Contains(path, "Q4_0") && n == 0 {
		t.Fatal("no Q4_0 weight was repacked")
	}
	o, err := oracle.Open(path, nil, oracle.Options{Repack: repack})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	prompt := promptTokens(t, m, o, 64)
	want, err := o.Logits(prompt)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, m, EngineOptions{KVTokens: 256})
	got := step(t, e, Seq{KV: e.Pool.NewSeq(0), Tokens: prompt, AllLogits: true})
	diff, scale := maxAbs(got[0], want)
	n, bytes := m.Repacked()
	t.Logf("%s (%d weights, %d bytes repacked): max |Δlogit| = %.3g over 64 positions (max |logit| %.3g)", filepath.Base(path), n, bytes, diff, scale)
	if diff > tol*scale {
		t.Errorf("logits differ from llama.cpp by %.3g > %.g·%.3g", diff, tol, scale)
	}
	wantText, err := o.Greedy(prompt, 64)
	if err != nil {
		t.Fatal(err)
	}
	gotText := greedy(t, e, prompt, 64)
	if !slices.Equal(gotText, wantText) {
		t.Errorf("greedy continuation differs from llama.cpp:\n ours      %v\n llama.cpp %v", gotText, wantText)
	}
}

func TestBaseMatchesLlamaCpp(t *testing.T) {
	for _, c := range []struct{ name, path string }{
		{"F32", testutil.Shared(t, "models/stories260K.gguf")},
		{"Q8_0", filepath.Join(derived(t), "stories-q8_0.gguf")},
	} {
		t.Run(c.name, func(t *testing.T) { compareWithOracle(t, c.path, 1e-3) })
	}
}

// TestWeightTypesMatchLlamaCpp covers F16 and k-quant weights, GQA, llama3
// rope factors, a non-default rope base and a tied output head on a random
// model (random weights make greedy decoding a sharp test: no two models
// that differ would agree on 64 argmaxes by chance).
func TestWeightTypesMatchLlamaCpp(t *testing.T) {
	dir := derived(t)
	for _, typ := range []string{"F32", "F16", "Q4_0", "Q4_K", "Q6_K"} {
		t.Run(typ, func(t *testing.T) {
			path := filepath.Join(dir, "random-"+typ+".gguf")
			if typ == "F32" {
				path = filepath.Join(dir, "random-f32.gguf")
			}
			compareWithOracle(t, path, 1e-3)
		})
	}
}
