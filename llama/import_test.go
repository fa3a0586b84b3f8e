package llama

import (
	"encoding/json"
	"github.com/ollama/ollama/ml"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
)

// pytorchFixtures runs adapters/testdata/hf/make_fixtures.py with Debian's
// python3-torch and builds the base GGUF from the weights it converted the
// way llama.cpp's converter does.
func pytorchFixtures(t *testing.T) (dir, model string) {
	t.Helper()
	dir = t.TempDir()
	cmd := exec.Command("/usr/bin/python3", "../adapters/testdata/hf/make_fixtures.py", dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("writing PyTorch fixtures needs Debian's python3-torch (apt-get install python3-torch): %v\n%s", err, out)
	}
	var idx struct {
		Tensors map[string]struct {
			Shape  []int
			Offset int
		}
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "base.json"))
	if err := json.Unmarshal(raw, &idx); err != nil {
		t.Fatal(err)
	}
	var wrap struct {
		H struct {
			Hidden  int `json:"hidden"`
			Heads   int `json:"heads"`
			KVHeads int `json:"kv_heads"`
			Layers  int `json:"layers"`
			FF      int `json:"ff"`
			Vocab   int `json:"vocab"`
		} `json:"hparams"`
	}
	json.Unmarshal(raw, &wrap)
	hp := wrap.H
	blob, _ := os.ReadFile(filepath.Join(dir, "base.bin"))
	shell := filepath.Join(dir, "shell.gguf")
	spec := modelfile.Spec{Layers: hp.Layers, Embedding: hp.Hidden, FeedForward: hp.FF, Heads: hp.Heads, KVHeads: hp.KVHeads,
		Vocab: hp.Vocab, ContextLength: 64, Type: gguf.TypeF32, Seed: 1}
	if err := modelfile.WriteRandom(shell, spec); err != nil {
		t.Fatal(err)
	}
	model = filepath.Join(dir, "base.gguf")
	err := modelfile.Rewrite(shell, model, nil, func(ti gguf.TensorInfo, _ func() ([]float32, error)) (gguf.TensorType, []byte, bool, error) {
		src, ok := idx.Tensors[ti.Name]
		if !ok {
			t.Fatalf("fixture lacks %s", ti.Name)
		}
		n := int(ti.Elements())
		return gguf.TypeF32, blob[src.Offset : src.Offset+4*n], false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir, model
}

// TestImportMatchesPyTorch imports reference SBoRA (FA, FB, the nested
// QSBoRA layout) and PEFT LoRA checkpoints written by real PyTorch and
// checks the engine's logits against float64 logits PyTorch computed in
// Hugging Face conventions: a model with several heads and GQA, so q_proj
// and k_proj rows must go through llama.cpp's rotary permutation.
func TestImportMatchesPyTorch(t *testing.T) {
	dir, model := pytorchFixtures(t)
	var ref struct {
		Tokens []int32
		Logits map[string][][]float64
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "reference.json"))
	if err := json.Unmarshal(raw, &ref); err != nil {
		t.Fatal(err)
	}
	m := loadModel(t, model)
	e := newEngine(t, m, EngineOptions{KVTokens: 64, CacheF32: true, Bank: kernels.Config{Slots: 8, MaxRank: 8, DType: ml.DTypeF32}})
	compare := func(got [][]float32, want [][]float64) float64 {
		worst, scale := 0.0, 0.0
		for i := range want {
			for j := range want[i] {
				worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
				scale = math.Max(scale, math.Abs(want[i][j]))
			}
		}
		return worst / scale
	}
	if rel := compare(engineLogits(t, e, ref.Tokens, nil), ref.Logits["base"]); rel > 1e-5 {
		t.Fatalf("converted base differs from PyTorch by %.2g relative: the fixture conversion is wrong", rel)
	}
	for _, c := range []struct{ name, from string }{
		{"fa", "fa"}, {"fb", "fb"}, {"qsbora", "qsbora"}, {"lora", "lora/adapter_model.safetensors"},
	} {
		a, err := adapters.Import(filepath.Join(dir, c.from), m.AdapterBase, adapters.ImportOptions{Name: c.name})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		r := load(t, e, a)
		rel := compare(engineLogits(t, e, ref.Tokens, []kernels.Use{{Adapter: r, Scale: 1}}), ref.Logits[c.name])
		t.Logf("%s (%s): |Δ|/max|logit| = %.2g vs PyTorch float64", c.name, a.Variant, rel)
		if rel > 1e-5 {
			t.Errorf("%s: imported adapter differs from PyTorch by %.2g relative", c.name, rel)
		}
		e.Bank.Unload(r)
		// Without the rotary permutation (one "head" spanning all rows)
		// the same checkpoint must give visibly wrong logits.
		wrongBase := *m.AdapterBase
		wrongBase.Heads, wrongBase.KVHeads = 1, 1
		if c.name == "lora" || c.name == "fa" {
			bad, err := adapters.Import(filepath.Join(dir, c.from), &wrongBase, adapters.ImportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rb := load(t, e, bad)
			if relBad := compare(engineLogits(t, e, ref.Tokens, []kernels.Use{{Adapter: rb, Scale: 1}}), ref.Logits[c.name]); relBad < 100*rel {
				t.Errorf("%s: skipping the permutation changed nothing (%.2g): the check is vacuous", c.name, relBad)
			}
			e.Bank.Unload(rb)
		}
	}
}
