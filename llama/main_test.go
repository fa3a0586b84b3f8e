package llama

import (
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

func TestMain(m *testing.M) {
	testutil.Quiet()
	os.Exit(m.Run())
}

// storiesText is TinyStories-style text long enough for a 64-token prompt.
const storiesText = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. " +
	"One day, she saw a big red ball near the tree. She ran to the ball and kicked it very high. Her mom smiled and said, " +
	"\"Be careful, Lily!\" Lily laughed and played until the sun went down."

var (
	derivedOnce sync.Once
	derivedDir  string
	derivedErr  error
)

// derived returns a directory of model files derived once per test binary
// from the shared assets: quantized copies and random models.
func derived(t testing.TB) string {
	t.Helper()
	stories := testutil.Shared(t, "models/stories260K.gguf")
	derivedOnce.Do(func() {
		derivedDir, derivedErr = os.MkdirTemp("", "sbora-llama-test-")
		if derivedErr != nil {
			return
		}
		if derivedErr = modelfile.Quantize(stories, filepath.Join(derivedDir, "stories-q8_0.gguf"), gguf.TypeQ8_0); derivedErr != nil {
			return
		}
		// A random model whose rows are whole k-quant blocks, with GQA,
		// llama3 rope factors, a non-default rope base and a tied output head.
		spec := modelfile.Spec{Layers: 2, Embedding: 256, FeedForward: 512, Heads: 4, KVHeads: 2, Vocab: 320,
			ContextLength: 512, Type: gguf.TypeF32, Seed: 7, TiedOutput: true, RopeFreqs: true, RopeBase: 50000}
		if derivedErr = modelfile.WriteRandom(filepath.Join(derivedDir, "random-f32.gguf"), spec); derivedErr != nil {
			return
		}
		for _, typ := range []gguf.TensorType{gguf.TypeF16, gguf.TypeQ4_0, gguf.TypeQ4_K, gguf.TypeQ6_K} {
			name := filepath.Join(derivedDir, "random-"+typ.String()+".gguf")
			if derivedErr = modelfile.Quantize(filepath.Join(derivedDir, "random-f32.gguf"), name, typ); derivedErr != nil {
				return
			}
		}
	})
	if derivedErr != nil {
		t.Fatal(derivedErr)
	}
	return derivedDir
}

// loadModel loads a model for a test and closes it at the end.
func loadModel(t testing.TB, path string) *Model {
	t.Helper()
	m, err := Load(path, LoadOptions{Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func newEngine(t testing.TB, m *Model, opts EngineOptions) *Engine {
	t.Helper()
	e, err := NewEngine(m, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// maxAbs returns max |a-b| and max |b| over all rows; a NaN or a shape
// mismatch anywhere makes diff infinite so no tolerance accepts it.
func maxAbs(a, b [][]float32) (diff, scale float64) {
	if len(a) != len(b) {
		return math.Inf(1), 0
	}
	for i := range b {
		if len(a[i]) != len(b[i]) {
			return math.Inf(1), 0
		}
		for j := range b[i] {
			d := math.Abs(float64(a[i][j]) - float64(b[i][j]))
			if math.IsNaN(d) {
				return math.Inf(1), scale
			}
			diff = math.Max(diff, d)
			scale = math.Max(scale, math.Abs(float64(b[i][j])))
		}
	}
	return diff, scale
}

// greedy generates n tokens after prompt in a fresh sequence.
func greedy(t testing.TB, e *Engine, prompt []int32, n int, uses ...kernels.Use) []int32 {
	t.Helper()
	seq := Seq{KV: e.Pool.NewSeq(0), Tokens: prompt, Adapters: uses}
	defer seq.KV.Release()
	var out []int32
	for len(out) < n {
		res := step(t, e, seq)
		next := oracle.Argmax(res[0][0])
		out = append(out, next)
		seq.Tokens = []int32{next}
	}
	return out
}

// step reserves room for each sequence's tokens and runs one engine step.
func step(t testing.TB, e *Engine, seqs ...Seq) [][][]float32 {
	t.Helper()
	for _, s := range seqs {
		if err := s.KV.Reserve(len(s.Tokens)); err != nil {
			t.Fatal(err)
		}
	}
	res, err := e.Step(seqs)
	if err != nil {
		t.Fatal(err)
	}
	return res
}
