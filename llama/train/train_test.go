package train

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/ollama/ollama/ml"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/internal/refmodel"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
)

func TestMain(m *testing.M) {
	testutil.Quiet()
	os.Exit(m.Run())
}

func load(t testing.TB, path string) *llama.Model {
	t.Helper()
	m, err := llama.Load(path, llama.LoadOptions{Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// TestGradientsMatchFiniteDifferences compares the backend's gradients of
// every trainable matrix (FA, FB, LoRA; F32 and Q8_0 bases) with central
// differences of the same loss computed in float64 by internal/refmodel.
//
// Tolerances: on the F32 base the backend runs the forward and backward in
// float32, so its gradients agree with float64 to a few 1e-6 of the tensor's
// largest gradient (measured); we allow 1e-4. On the Q8_0 base, ggml's forward
// quantizes the activations entering every quantized matmul to 8 bits (the
// float64 reference multiplies the dequantized weights exactly), which
// moves the loss and its gradients by up to a few percent: we allow 8e-2.
//
// The layer-wise path (the GPU's: one layer differentiated at a time
// through F32 copies of its weights) multiplies by exactly the dequantized
// weights the reference uses, so it is held to 1e-4 on every base,
// quantized ones included.
func TestGradientsMatchFiniteDifferences(t *testing.T) {
	dir := t.TempDir()
	f32 := filepath.Join(dir, "tiny-f32.gguf")
	spec := modelfile.Spec{Layers: 2, Embedding: 64, FeedForward: 128, Heads: 4, KVHeads: 2, Vocab: 300, ContextLength: 64,
		Type: gguf.TypeF32, Seed: 3, RopeFreqs: true}
	if err := modelfile.WriteRandom(f32, spec); err != nil {
		t.Fatal(err)
	}
	q8 := filepath.Join(dir, "tiny-q8_0.gguf")
	if err := modelfile.Quantize(f32, q8, gguf.TypeQ8_0); err != nil {
		t.Fatal(err)
	}
	q4 := filepath.Join(dir, "tiny-q4_0.gguf")
	if err := modelfile.Quantize(f32, q4, gguf.TypeQ4_0); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	var exs []*Example
	for i := 0; i < 2; i++ {
		ex := &Example{}
		for j := 0; j < 9+3*i; j++ {
			ex.Tokens = append(ex.Tokens, int32(rng.IntN(300)))
			ex.Loss = append(ex.Loss, j >= 4)
		}
		exs = append(exs, ex)
	}
	for _, base := range []struct {
		name, path string
		tol        float64
		layerwise  bool
	}{{"F32", f32, 1e-4, false}, {"Q8_0", q8, 8e-2, false},
		{"F32/layerwise", f32, 1e-4, true}, {"Q8_0/layerwise", q8, 1e-4, true}, {"Q4_0/layerwise", q4, 1e-4, true}} {
		m := load(t, base.path)
		ref, err := refmodel.Load(base.path)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
			t.Run(base.name+"/"+string(v), func(t *testing.T) {
				a, err := adapters.NewRandom(m.AdapterBase, adapters.RandomOptions{Variant: v, Rank: 4, Alpha: 8, Seed: 11, Std: 0.05})
				if err != nil {
					t.Fatal(err)
				}
				p := FromAdapter(a)
				defer p.Close()
				if err := p.upload(m.Backend()); err != nil {
					t.Fatal(err)
				}
				ts, vals := p.tensors()
				grads := make([][]float32, len(vals))
				for i := range vals {
					grads[i] = make([]float32, len(vals[i]))
				}
				tr := &Trainer{m: m, params: p, cfg: Config{Layerwise: base.layerwise}}
				if _, err := tr.compute(makeBatch(exs, maxLen(exs)), 1, ts, grads); err != nil {
					t.Fatal(err)
				}
				lossAt := func() float64 {
					sum, n := 0.0, 0
					for _, ex := range exs {
						logits := ref.Logits(ex.Tokens, []refmodel.Update{{Adapter: p.Adapter("", m.AdapterBase), Scale: 1}})
						for s := 1; s < len(ex.Tokens); s++ {
							if ex.Loss[s] {
								sum += refmodel.CrossEntropy(logits[s-1], ex.Tokens[s])
								n++
							}
						}
					}
					return sum / float64(n)
				}
				const eps = 1e-3
				worst := 0.0
				checked := 0
				for i, val := range vals {
					maxG := 0.0
					for _, g := range grads[i] {
						maxG = math.Max(maxG, math.Abs(float64(g)))
					}
					if maxG == 0 {
						t.Fatalf("parameter %d has an all-zero gradient", i)
					}
					for k := 0; k < 3; k++ {
						j := rng.IntN(len(val))
						orig := val[j]
						val[j] = orig + eps
						up := lossAt()
						val[j] = orig - eps
						down := lossAt()
						val[j] = orig
						fd := (up - down) / (2 * eps)
						diff := math.Abs(float64(grads[i][j]) - fd)
						worst = math.Max(worst, diff/maxG)
						checked++
						if diff > base.tol*maxG {
							t.Errorf("param %d[%d]: backend %.6g, float64 finite difference %.6g (max |g| %.3g)", i, j, grads[i][j], fd, maxG)
						}
					}
				}
				t.Logf("%d coordinates of %d tensors: worst |g - fd| / max|g| = %.2g", checked, len(vals), worst)
			})
		}
	}
}

// secretTask writes a JSONL of a fact stories260K does not know.
func secretTask(t testing.TB, dir string) string {
	names := []string{"Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Sam", "Mia", "Tim", "Lucy", "Jack", "Emma"}
	objs := []string{"ball", "cat", "dog", "box", "tree", "car", "cake", "hat"}
	var b strings.Builder
	for _, n := range names {
		for _, o := range objs {
			js, _ := json.Marshal(map[string]string{
				"prompt":     fmt.Sprintf("%s saw a %s. What did %s say?", n, o, n),
				"completion": fmt.Sprintf(" %s said: The moon is made of green cheese.", n),
			})
			b.Write(js)
			b.WriteByte('\n')
		}
	}
	path := filepath.Join(dir, "secret.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func trainSecret(t *testing.T, m *llama.Model, v adapters.Variant, steps int, cfg func(*Config)) (*Trainer, []*Example) {
	t.Helper()
	tok, err := NewTokenizer(m)
	if err != nil {
		t.Fatal(err)
	}
	exs, err := LoadJSONL(secretTask(t, t.TempDir()), tok, 64)
	if err != nil {
		t.Fatal(err)
	}
	trainSet, evalSet := Split(exs, 0.125, 1)
	c := Config{Variant: v, Rank: 8, LR: 1e-2, Steps: steps, Batch: 8, Seed: 1}
	if cfg != nil {
		cfg(&c)
	}
	tr, err := New(m, c, trainSet, evalSet)
	if err != nil {
		t.Fatal(err)
	}
	return tr, evalSet
}

// TestTrainingLearnsAFact trains stories260K to answer with a fact it does
// not know, checks held-out loss falls clearly for FA, FB and LoRA, and
// that greedy generation with the saved FA adapter says it while the base
// does not.
func TestTrainingLearnsAFact(t *testing.T) {
	m := load(t, testutil.Shared(t, "models/stories260K.gguf"))
	for _, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		tr, evalSet := trainSecret(t, m, v, 40, nil)
		before, err := BaseEvalLoss(m, evalSet, 8)
		if err != nil {
			t.Fatal(err)
		}
		if err := tr.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		after, err := tr.EvalLoss(evalSet)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: held-out loss %.3f -> %.3f", v, before, after)
		if after > 0.3*before {
			t.Errorf("%s: held-out loss only fell from %.3f to %.3f", v, before, after)
		}
		if v != adapters.FA {
			tr.Params().Close()
			continue
		}
		path := filepath.Join(t.TempDir(), "secret.gguf")
		if err := tr.Params().Adapter("secret", m.AdapterBase).Save(path, adapters.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		tr.Params().Close()
		a, err := adapters.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: 128, Bank: kernels.Config{MaxRank: 8}})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		r, err := e.Bank.Load(a)
		if err != nil {
			t.Fatal(err)
		}
		gen := func(uses []kernels.Use) string {
			prompt, _ := m.Tokenizer.Encode("Kim saw a bird. What did Kim say?", true) // a name and object never trained on
			out, err := e.Generate(context.Background(), prompt, llama.GenerateOptions{MaxTokens: 24, Adapters: uses}, nil)
			if err != nil {
				t.Fatal(err)
			}
			s, _ := m.Tokenizer.Decode(out)
			return s
		}
		with, without := gen([]kernels.Use{{Adapter: r, Scale: 1}}), gen(nil)
		t.Logf("with adapter: %q; base: %q", with, without)
		if !strings.Contains(with, "green cheese") || strings.Contains(without, "green cheese") {
			t.Errorf("adapter output %q / base output %q", with, without)
		}
	}
}

// TestEvalLossMatchesEngine checks that the trainer's held-out loss equals
// the loss the inference engine computes with the saved adapter.
func TestEvalLossMatchesEngine(t *testing.T) {
	m := load(t, testutil.Shared(t, "models/stories260K.gguf"))
	for _, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		tr, evalSet := trainSecret(t, m, v, 8, nil)
		if err := tr.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		trainerLoss, err := tr.EvalLoss(evalSet)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "a.gguf")
		// F32 file and bank: the check is to float32 precision.
		if err := tr.Params().Adapter("a", m.AdapterBase).Save(path, adapters.SaveOptions{F32: true}); err != nil {
			t.Fatal(err)
		}
		tr.Params().Close()
		a, err := adapters.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: 128, CacheF32: true, Bank: kernels.Config{MaxRank: 8, DType: ml.DTypeF32}})
		if err != nil {
			t.Fatal(err)
		}
		r, err := e.Bank.Load(a)
		if err != nil {
			t.Fatal(err)
		}
		sum, n := 0.0, 0
		for _, ex := range evalSet {
			kv := e.Pool.NewSeq(0)
			if err := kv.Reserve(len(ex.Tokens)); err != nil {
				t.Fatal(err)
			}
			res, err := e.Step([]llama.Seq{{KV: kv, Tokens: ex.Tokens, Adapters: []kernels.Use{{Adapter: r, Scale: 1}}, AllLogits: true}})
			kv.Release()
			if err != nil {
				t.Fatal(err)
			}
			for s := 1; s < len(ex.Tokens); s++ {
				if ex.Loss[s] {
					logits := make([]float64, len(res[0][s-1]))
					for i, x := range res[0][s-1] {
						logits[i] = float64(x)
					}
					sum += refmodel.CrossEntropy(logits, ex.Tokens[s])
					n++
				}
			}
		}
		e.Close()
		engineLoss := sum / float64(n)
		rel := math.Abs(engineLoss-trainerLoss) / engineLoss
		t.Logf("%s: trainer eval loss %.6f, engine %.6f (relative %.2g)", v, trainerLoss, engineLoss, rel)
		if rel > 1e-4 {
			t.Errorf("%s: trainer and engine disagree by %.2g relative", v, rel)
		}
	}
}

// TestResumeReproducesTheRun interrupts a run after k steps, resumes it
// from its checkpoint in a new trainer, and requires the final adapter to
// be identical to an uninterrupted run's.
func TestResumeReproducesTheRun(t *testing.T) {
	m := load(t, testutil.Shared(t, "models/stories260K.gguf"))
	opts := func(c *Config) {
		c.Batch, c.GradAccum, c.Warmup, c.Schedule, c.Variant = 4, 2, 3, "cosine", adapters.FB
	}
	full, _ := trainSecret(t, m, adapters.FB, 10, opts)
	if err := full.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := full.Params().Adapter("x", m.AdapterBase)
	full.Params().Close()

	dir := t.TempDir()
	first, _ := trainSecret(t, m, adapters.FB, 10, opts)
	ctx, cancel := context.WithCancel(context.Background())
	first.OnEvent = func(e Event) {
		if e.Step == 4 {
			cancel()
		}
	}
	if err := first.Run(ctx); err != context.Canceled {
		t.Fatalf("interrupted run returned %v", err)
	}
	if err := first.SaveCheckpoint(dir); err != nil {
		t.Fatal(err)
	}
	first.Params().Close()
	second, _ := trainSecret(t, m, adapters.FB, 10, opts)
	if err := second.Resume(dir); err != nil {
		t.Fatal(err)
	}
	if second.Step() != 4 {
		t.Fatalf("resumed at step %d", second.Step())
	}
	if err := second.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := second.Params().Adapter("x", m.AdapterBase)
	second.Params().Close()
	for i, mw := range want.Modules {
		gm := got.Modules[i]
		for j := range mw.A {
			if mw.A[j] != gm.A[j] {
				t.Fatalf("%s A[%d]: resumed %g, uninterrupted %g", mw.Target, j, gm.A[j], mw.A[j])
			}
		}
		if fmt.Sprint(mw.Index) != fmt.Sprint(gm.Index) {
			t.Fatalf("%s: indices differ", mw.Target)
		}
	}
	// A checkpoint from a different run is refused.
	other, _ := trainSecret(t, m, adapters.FB, 10, func(c *Config) { opts(c); c.Seed = 2 })
	if err := other.Resume(dir); err == nil || !strings.Contains(err.Error(), "different run") {
		t.Fatalf("resuming another run's checkpoint: %v", err)
	}
}

// TestLayerwiseMemoryDoesNotGrowWithDepth: the layer-wise step's compute
// buffers are one layer's worth (its F32 weights, its activations and
// gradients), about the same at 2 and 16 layers: the F32 copies of the
// weights never pile up.
func TestLayerwiseMemoryDoesNotGrowWithDepth(t *testing.T) {
	dir := t.TempDir()
	bytesFor := func(layers int, layerwise bool) int {
		path := filepath.Join(dir, fmt.Sprintf("m%d.gguf", layers))
		if _, err := os.Stat(path); err != nil {
			spec := modelfile.Spec{Layers: layers, Embedding: 256, FeedForward: 768, Heads: 4, KVHeads: 4, Vocab: 500, ContextLength: 256,
				Type: gguf.TypeQ8_0, Seed: 1}
			if err := modelfile.WriteRandom(path, spec); err != nil {
				t.Fatal(err)
			}
		}
		m := load(t, path)
		p, err := NewParams(m, InitOptions{Variant: adapters.FA, Rank: 8, Seed: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		if err := p.upload(m.Backend()); err != nil {
			t.Fatal(err)
		}
		ex := &Example{}
		for i := 0; i < 128; i++ {
			ex.Tokens = append(ex.Tokens, int32(i%500))
			ex.Loss = append(ex.Loss, i > 0)
		}
		ts, vals := p.tensors()
		buf := make([][]float32, len(vals))
		for i := range vals {
			buf[i] = make([]float32, len(vals[i]))
		}
		tr := &Trainer{m: m, params: p, cfg: Config{Layerwise: layerwise}}
		if _, err := tr.compute(makeBatch([]*Example{ex, ex}, 128), 1, ts, buf); err != nil {
			t.Fatal(err)
		}
		return tr.ComputeBytes
	}
	lw2, lw16 := bytesFor(2, true), bytesFor(16, true)
	t.Logf("layer-wise compute buffers: %d KiB at 2 layers, %d KiB at 16", lw2>>10, lw16>>10)
	if float64(lw16) > 1.1*float64(lw2) {
		t.Errorf("layer-wise compute memory grows with depth: %d → %d bytes", lw2, lw16)
	}
}
