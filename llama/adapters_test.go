package llama

import (
	"fmt"

	"github.com/ollama/ollama/ml"
	"math"
	"path/filepath"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/refmodel"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// exactBank keeps adapter matrices in F32: exactness tests compare with
// float32 and float64 references (the default F16 bank is checked against
// it in TestF16BankMatchesF32Bank).
var exactBank = kernels.Config{DType: ml.DTypeF32}

// randomAdapter makes a rank-8 adapter on every projection of every layer.
func randomAdapter(t testing.TB, base *adapters.Base, v adapters.Variant, seed uint64) *adapters.Adapter {
	t.Helper()
	a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: fmt.Sprintf("%s-%d", v, seed), Variant: v, Rank: 8, Alpha: 16, Seed: seed, Std: 0.05})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// engineLogits runs prompt through a fresh sequence with the given adapters.
func engineLogits(t testing.TB, e *Engine, prompt []int32, uses []kernels.Use) [][]float32 {
	t.Helper()
	kv := e.Pool.NewSeq(0)
	defer kv.Release()
	return step(t, e, Seq{KV: kv, Tokens: prompt, Adapters: uses, AllLogits: true})[0]
}

func load(t testing.TB, e *Engine, a *adapters.Adapter) *kernels.Resident {
	t.Helper()
	r, err := e.Bank.Load(a)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestAdaptersMatchLlamaCppAndMergedWeights checks FA, FB and LoRA adapters
// on all seven projections, alone and composed (four at once, two of them FB
// adapters writing the same rows), against two independent references:
//
//   - our engine on a model whose F32 weights have W0 + Σ scale·ΔW written
//     in (float64 arithmetic in modelfile.Merge), both with F32 KV caches:
//     the only difference left is float32 summation order, ≤ 1e-5 relative;
//   - llama.cpp running the same update as a dense LoRA GGUF, both with F32
//     KV caches; llama.cpp without flash attention, because its flash
//     attention casts an F32 cache to F16, which would add F16 rounding of
//     slightly different keys (≈1e-3 relative) to a float32-order check.
func TestAdaptersMatchLlamaCppAndMergedWeights(t *testing.T) {
	stories := testutil.Shared(t, "models/stories260K.gguf")
	dir := t.TempDir()
	m := loadModel(t, stories)
	e := newEngine(t, m, EngineOptions{KVTokens: 128, CacheF32: true, Bank: exactBank})
	prompt, err := m.Tokenizer.Encode(storiesText, true)
	if err != nil {
		t.Fatal(err)
	}
	prompt = prompt[:64]
	baseLogits := engineLogits(t, e, prompt, nil)

	fa := randomAdapter(t, m.AdapterBase, adapters.FA, 1)
	fb := randomAdapter(t, m.AdapterBase, adapters.FB, 2)
	lora := randomAdapter(t, m.AdapterBase, adapters.LoRA, 3)
	fa2 := randomAdapter(t, m.AdapterBase, adapters.FA, 4)
	fb2 := randomAdapter(t, m.AdapterBase, adapters.FB, 5)
	for i, mod := range fb2.Modules { // same rows as fb: the scatters collide
		mod.Index = append([]int32(nil), fb.Modules[i].Index...)
	}
	cases := []struct {
		name string
		ws   []modelfile.Weighted
	}{
		{"FA", []modelfile.Weighted{{Adapter: fa, Scale: 1}}},
		{"FB", []modelfile.Weighted{{Adapter: fb, Scale: 1}}},
		{"LoRA", []modelfile.Weighted{{Adapter: lora, Scale: 1}}},
		{"compose4", []modelfile.Weighted{{Adapter: fa, Scale: 0.7}, {Adapter: fb, Scale: 1.3}, {Adapter: fa2, Scale: -0.5}, {Adapter: fb2, Scale: 0.9}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var uses []kernels.Use
			for _, w := range c.ws {
				r := load(t, e, w.Adapter)
				defer e.Bank.Unload(r)
				uses = append(uses, kernels.Use{Adapter: r, Scale: w.Scale})
			}
			// llama.cpp's graph budget ignores adapter nodes, so four LoRAs
			// on a five-layer model overflow it (GGML_ASSERT in
			// ggml_backend_sched). Give it one LoRA of rank Σr that is
			// algebraically the sum: [s1·B1 … sn·Bn]·[A1; …; An].
			path := filepath.Join(dir, c.name+"-lora.gguf")
			if err := concatLoRA(c.ws).Save(path, adapters.SaveOptions{F32: true}); err != nil {
				t.Fatal(err)
			}
			loras := []oracle.LoRA{{Path: path, Scale: 1}}
			got := engineLogits(t, e, prompt, uses)
			if d, _ := maxAbs(got, baseLogits); d < 0.05 {
				t.Fatalf("adapter barely changes the logits (max Δ %.3g): the test would be vacuous", d)
			}

			o, err := oracle.Open(stories, loras, oracle.Options{CacheF32: true, NoFlashAttention: true})
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			want, err := o.Logits(prompt)
			if err != nil {
				t.Fatal(err)
			}
			diff, scale := maxAbs(got, want)
			t.Logf("vs llama.cpp dense LoRA: max |Δ| %.3g (max |logit| %.3g)", diff, scale)
			if diff > 1e-5*scale {
				t.Errorf("differs from llama.cpp by %.3g", diff)
			}

			merged := filepath.Join(dir, c.name+"-merged.gguf")
			if _, err := modelfile.Merge(stories, merged, m.AdapterBase, c.ws); err != nil {
				t.Fatal(err)
			}
			mm := loadModel(t, merged)
			me := newEngine(t, mm, EngineOptions{KVTokens: 128, CacheF32: true, Bank: exactBank})
			wantMerged := engineLogits(t, me, prompt, nil)
			diff, scale = maxAbs(got, wantMerged)
			t.Logf("vs merged F32 weights: max |Δ| %.3g (max |logit| %.3g)", diff, scale)
			if diff > 1e-5*scale {
				t.Errorf("differs from the merged model by %.3g", diff)
			}
		})
	}
}

// TestMixedBatchEqualsAlone runs sequences with different adapters (FA, FB,
// an FA+FB composition, LoRA, a scaled FA, none) through one batch for a
// prefill and several decode steps, and checks that each sequence gets the
// logits it gets when run alone.
func TestMixedBatchEqualsAlone(t *testing.T) {
	stories := testutil.Shared(t, "models/stories260K.gguf")
	m := loadModel(t, stories)
	// F32 caches: with F16 ones, float32 summation-order differences between
	// batch shapes (≈1e-7) flip F16 roundings of keys and values and show up
	// as ≈1e-4 relative noise that would hide nothing but blur the check.
	e := newEngine(t, m, EngineOptions{KVTokens: 8 * 128, MaxSeqLen: 128, CacheF32: true, Bank: exactBank})
	fa := load(t, e, randomAdapter(t, m.AdapterBase, adapters.FA, 11))
	fb := load(t, e, randomAdapter(t, m.AdapterBase, adapters.FB, 12))
	lora := load(t, e, randomAdapter(t, m.AdapterBase, adapters.LoRA, 13))
	seqs := []struct {
		text string
		uses []kernels.Use
	}{
		{"Once upon a time", []kernels.Use{{Adapter: fa, Scale: 1}}},
		{"The little dog ran to the park and", []kernels.Use{{Adapter: fb, Scale: 1}}},
		{"Lily and Tom", []kernels.Use{{Adapter: fa, Scale: 0.5}, {Adapter: fb, Scale: 1.5}}},
		{"One day, a big bird", []kernels.Use{{Adapter: lora, Scale: 1}}},
		{"Mom said", nil},
		{"The sun was hot. Ben wanted to swim in the", []kernels.Use{{Adapter: fa, Scale: -1}}},
	}
	const decodeSteps = 8
	// Alone: each sequence in its own step, slot 0 of its own engine run.
	alone := make([][][]float32, len(seqs))
	for i, s := range seqs {
		toks, _ := m.Tokenizer.Encode(s.text, true)
		solo := newEngine(t, m, EngineOptions{KVTokens: 128, CacheF32: true, Bank: exactBank})
		// Resident handles belong to e's bank; load the same adapters here.
		var uses []kernels.Use
		for _, u := range s.uses {
			uses = append(uses, kernels.Use{Adapter: load(t, solo, u.Adapter.Adapter), Scale: u.Scale})
		}
		seq := Seq{KV: solo.Pool.NewSeq(0), Tokens: toks, Adapters: uses}
		for k := 0; k <= decodeSteps; k++ {
			res := step(t, solo, seq)
			alone[i] = append(alone[i], res[0][0])
			seq.Tokens = []int32{oracle.Argmax(res[0][0])}
		}
	}
	// Together: one step for all prefills, then batched decode steps. A
	// long-lived sequence holds blocks in between so that the others' block
	// tables are scattered over the pool.
	spacer := e.Pool.NewSeq(0)
	batch := make([]Seq, len(seqs))
	for i, s := range seqs {
		toks, _ := m.Tokenizer.Encode(s.text, true)
		batch[i] = Seq{KV: e.Pool.NewSeq(0), Tokens: toks, Adapters: s.uses}
		if err := spacer.Reserve(e.Pool.BlockSize * (i + 1)); err != nil {
			t.Fatal(err)
		}
		if err := batch[i].KV.Reserve(len(toks) + decodeSteps); err != nil {
			t.Fatal(err)
		}
	}
	worst := 0.0
	for k := 0; k <= decodeSteps; k++ {
		res := step(t, e, batch...)
		for i := range batch {
			want := alone[i][k]
			diff, scale := maxAbs([][]float32{res[i][0]}, [][]float32{want})
			worst = max(worst, diff/scale)
			if diff > 1e-5*scale {
				t.Errorf("step %d sequence %d (%q): batched logits differ from alone by %.3g (max |logit| %.3g)", k, i, seqs[i].text, diff, scale)
			}
			batch[i].Tokens = []int32{oracle.Argmax(want)}
		}
	}
	t.Logf("%d sequences × %d steps: worst |Δ|/max|logit| = %.2g", len(seqs), decodeSteps+1, worst)
}

// concatLoRA returns one dense LoRA whose update equals Σ scale·ΔW of ws:
// ranks are concatenated and each adapter's alpha/r·scale is folded into its
// block of B (the result has alpha = rank, so its own scale is 1).
func concatLoRA(ws []modelfile.Weighted) *adapters.Adapter {
	out := &adapters.Adapter{Name: "concat", Variant: adapters.LoRA}
	byTarget := map[adapters.Target]*adapters.ModuleWeights{}
	for _, w := range ws {
		out.Rank += w.Adapter.Rank
	}
	out.Alpha = float32(out.Rank)
	off := 0
	for _, w := range ws {
		l := w.Adapter.ToLoRA()
		s := w.Scale * w.Adapter.Scale()
		for _, m := range l.Modules {
			c := byTarget[m.Target]
			if c == nil {
				c = &adapters.ModuleWeights{Target: m.Target, In: m.In, Out: m.Out,
					A: make([]float32, out.Rank*m.In), B: make([]float32, m.Out*out.Rank)}
				byTarget[m.Target] = c
				out.Modules = append(out.Modules, c)
			}
			copy(c.A[off*m.In:], m.A)
			for o := 0; o < m.Out; o++ {
				for j := 0; j < l.Rank; j++ {
					c.B[o*out.Rank+off+j] = s * m.B[o*l.Rank+j]
				}
			}
		}
		off += w.Adapter.Rank
	}
	return out
}

// TestFloat64ReferenceAgrees checks the engine against the plain-Go float64
// reference (internal/refmodel) on a random GQA model with rope factors, a
// tied head and an FA+FB+LoRA composition. The reference is what the
// trainer's gradient check differentiates, so it is checked here first.
func TestFloat64ReferenceAgrees(t *testing.T) {
	path := filepath.Join(derived(t), "random-f32.gguf")
	m := loadModel(t, path)
	ref, err := refmodel.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, m, EngineOptions{KVTokens: 64, CacheF32: true, Bank: exactBank})
	var uses []kernels.Use
	var ups []refmodel.Update
	for i, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		a := randomAdapter(t, m.AdapterBase, v, uint64(20+i))
		uses = append(uses, kernels.Use{Adapter: load(t, e, a), Scale: 0.8})
		ups = append(ups, refmodel.Update{Adapter: a, Scale: 0.8})
	}
	prompt := []int32{1, 40, 7, 300, 12, 99, 5, 250, 3, 18, 77, 140}
	got := engineLogits(t, e, prompt, uses)
	want := ref.Logits(prompt, ups)
	worst, scale := 0.0, 0.0
	for i := range want {
		for j := range want[i] {
			worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
			scale = math.Max(scale, math.Abs(want[i][j]))
		}
	}
	t.Logf("engine vs float64 reference: max |Δ| %.3g (max |logit| %.3g)", worst, scale)
	if worst > 1e-4*scale {
		t.Fatalf("engine differs from the float64 reference by %.3g", worst)
	}
}

// TestF16BankMatchesF32Bank checks the default F16 adapter bank against the
// F32 bank on adapters whose values are F16 already (as F16 files hold
// them): what remains is the F16 rounding of the activations the adapter
// products read, a small fraction of the adapter's effect.
func TestF16BankMatchesF32Bank(t *testing.T) {
	stories := testutil.Shared(t, "models/stories260K.gguf")
	m := loadModel(t, stories)
	f32 := newEngine(t, m, EngineOptions{KVTokens: 128, CacheF32: true, Bank: exactBank})
	f16 := newEngine(t, m, EngineOptions{KVTokens: 128, CacheF32: true})
	prompt, _ := m.Tokenizer.Encode(storiesText, true)
	prompt = prompt[:48]
	base := engineLogits(t, f32, prompt, nil)
	dir := t.TempDir()
	for i, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		path := filepath.Join(dir, string(v)+".gguf")
		if err := randomAdapter(t, m.AdapterBase, v, uint64(60+i)).Save(path, adapters.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		a, err := adapters.Load(path) // F16 values
		if err != nil {
			t.Fatal(err)
		}
		want := engineLogits(t, f32, prompt, []kernels.Use{{Adapter: load(t, f32, a), Scale: 1}})
		got := engineLogits(t, f16, prompt, []kernels.Use{{Adapter: load(t, f16, a), Scale: 1}})
		effect, _ := maxAbs(want, base)
		diff, _ := maxAbs(got, want)
		t.Logf("%s: F16 bank vs F32 bank max |Δ| %.3g; the adapter moves logits by up to %.3g (%.2g%%)", v, diff, effect, 100*diff/effect)
		if effect < 0.05 || diff > 0.02*effect {
			t.Errorf("%s: F16 bank differs from F32 by %.3g, adapter effect %.3g", v, diff, effect)
		}
	}
}
