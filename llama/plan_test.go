package llama

import (
	"slices"
	"strings"
	"testing"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// sevenB describes a 32-layer LLaMA-2-7B-shaped Q4_0 model without writing
// it: the shapes and the weight bytes the GGUF would have.
func sevenB() *ModelInfo {
	c := Config{Architecture: "llama", Layers: 32, Embedding: 4096, FeedForward: 11008, Heads: 32, KVHeads: 32, HeadDim: 128,
		ContextLength: 4096, VocabSize: 32000}
	var shapes []adapters.TensorShape
	var bytes int64
	q40 := func(in, out int) int64 { return int64(in) * int64(out) / 32 * 18 }
	add := func(name string, in, out int) {
		shapes = append(shapes, adapters.TensorShape{Name: name, Shape: []uint64{uint64(in), uint64(out)}})
		bytes += q40(in, out)
	}
	add("token_embd.weight", 4096, 32000)
	add("output.weight", 4096, 32000)
	for l := 0; l < 32; l++ {
		for _, m := range adapters.AllModules {
			in, out := 4096, 4096
			switch m {
			case adapters.Gate, adapters.Up:
				out = 11008
			case adapters.Down:
				in = 11008
			}
			add(adapters.Target{Layer: l, Module: m}.WeightName(), in, out)
		}
	}
	base := adapters.NewBase("llama", 32, shapes)
	return &ModelInfo{Base: base, Config: c, WeightBytes: bytes}
}

const gibibyte = int64(1) << 30

// TestPlanFitsSevenBDefaults plans a 32-layer 7B on the development
// machine's budget (80% of ~23 GiB) with no flags: everything fits, the KV
// pool holds far more than one context, and the parts add up.
func TestPlanFitsSevenBDefaults(t *testing.T) {
	info := sevenB()
	budget := 18 * gibibyte
	p, err := Plan(info, PlanRequest{Budget: budget, BudgetSource: "test", PrefillBudget: 512})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(p)
	if p.Total() > budget {
		t.Fatalf("plan uses %d of %d bytes", p.Total(), budget)
	}
	if p.MaxSeqLen != 4096 || p.Parallel != DefaultParallel || p.MaxRank != DefaultMaxRank {
		t.Fatalf("defaults: ctx %d, parallel %d, max rank %d", p.MaxSeqLen, p.Parallel, p.MaxRank)
	}
	if p.KVTokens < 4*p.MaxSeqLen || p.KVTokens%p.BlockSize != 0 {
		t.Fatalf("KV pool of %d tokens", p.KVTokens)
	}
	if want := int64(p.KVTokens) * int64(BytesPerToken(info.Config, ml.DTypeF16)); p.KV != want || want != int64(p.KVTokens)*512<<10 {
		t.Fatalf("KV bytes %d, want %d (512 KiB per token at F16 for 32 layers × 4096)", p.KV, want)
	}
	if p.Bank != kernels.Bytes(info.Base, kernels.Config{Slots: p.MaxResident, MaxRank: 64, DType: ml.DTypeF16}) || p.MaxResident < 1 {
		t.Fatalf("bank %d bytes for %d slots", p.Bank, p.MaxResident)
	}
	if float64(p.Bank) > 0.21*float64(budget-p.Weights-p.Compute-p.Runtime) {
		t.Fatalf("the default bank takes %d bytes, more than its share", p.Bank)
	}
	// The old layout (16 sequences × 4096 tokens preallocated) does not
	// fit; the pool is smaller than that but serves any 16 short requests.
	if old := int64(16*4096) * int64(BytesPerToken(info.Config, ml.DTypeF16)); old+p.Weights < budget {
		t.Fatalf("the budget would have held the old layout (%d bytes)", old)
	}
}

// TestPlanFailsNamingFlags checks that explicit sizes that cannot fit fail
// at start with a message naming the flags.
func TestPlanFailsNamingFlags(t *testing.T) {
	info := sevenB()
	for _, c := range []struct {
		name string
		req  PlanRequest
		want []string
	}{
		{"huge KV pool", PlanRequest{KVTokens: 65536}, []string{"--kv-tokens", "does not fit"}},
		{"huge bank", PlanRequest{MaxResident: 64}, []string{"--max-resident", "does not fit"}},
		{"rank", PlanRequest{MaxResident: 32, MaxRank: 256}, []string{"--max-resident", "--max-rank"}},
		{"pool below one context", PlanRequest{KVTokens: 1024, MaxSeqLen: 4096}, []string{"--ctx", "--kv-tokens"}},
		{"weights above budget", PlanRequest{Budget: 2 * gibibyte}, []string{"does not fit the memory budget", "--memory-fraction"}},
	} {
		req := c.req
		if req.Budget == 0 {
			req.Budget = 18 * gibibyte
		}
		req.BudgetSource, req.PrefillBudget = "test", 512
		_, err := Plan(info, req)
		if err == nil {
			t.Errorf("%s: planned", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not mention %q", c.name, err, w)
			}
		}
	}
	// Explicit sizes that fit are kept as given.
	p, err := Plan(info, PlanRequest{Budget: 18 * gibibyte, KVTokens: 8000, MaxResident: 4, MaxRank: 32, MaxSeqLen: 2048, Parallel: 4, PrefillBudget: 512})
	if err != nil {
		t.Fatal(err)
	}
	if p.KVTokens != 8000 || p.MaxResident != 4 || p.MaxRank != 32 || p.MaxSeqLen != 2048 || p.Parallel != 4 {
		t.Fatalf("explicit sizes changed: %s", p)
	}
}

func TestPlacement(t *testing.T) {
	gpu := ggmlx.GPU{ID: ml.DeviceID{ID: "0", Library: "CUDA"}, Description: "H200"}
	for _, c := range []struct {
		name   string
		want   int
		gpus   []ggmlx.GPU
		layers []int // offloaded ollama layer indices (32 = output head)
		output bool
	}{
		{"all", AllLayers, []ggmlx.GPU{gpu}, seq(0, 33), true},
		{"more than there are", 40, []ggmlx.GPU{gpu}, seq(0, 33), true},
		{"last eight", 8, []ggmlx.GPU{gpu}, seq(24, 32), false},
		{"CPU asked", 0, []ggmlx.GPU{gpu}, nil, false},
		{"no GPU", AllLayers, nil, nil, false},
	} {
		p, list := place(32, c.want, c.gpus)
		var got []int
		for _, g := range list {
			if g.DeviceID != gpu.ID {
				t.Errorf("%s: device %v", c.name, g.DeviceID)
			}
			got = append(got, g.Layers...)
		}
		if !slices.Equal(got, c.layers) || p.Output != c.output || (p.GPU == nil) != (c.layers == nil) {
			t.Errorf("%s: placement %+v layers %v, want %v (output %v)", c.name, p, got, c.layers, c.output)
		}
	}
}

func seq(lo, hi int) []int {
	var out []int
	for i := lo; i < hi; i++ {
		out = append(out, i)
	}
	return out
}
