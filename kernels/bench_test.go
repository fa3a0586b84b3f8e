package kernels

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// BenchmarkSBoRALayer measures one 4096×4096 Q4_0 projection with routed
// SBoRA adapters against the bare base matmul, timed alternately in the same
// loop; "x-base" is the ratio (1.00 = free). Tokens are spread round-robin
// over the adapters. Run with: make bench
func BenchmarkSBoRALayer(b *testing.B) {
	const dim = 4096
	o := newOneWeight(b, dim, dim, gguf.TypeQ4_0)
	for _, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		for _, rank := range []int{8, 64} {
			bank, err := NewBank(o.backend, o.base, Config{Slots: 64, MaxRank: rank})
			if err != nil {
				b.Fatal(err)
			}
			var res []*Resident
			for i := 0; i < 64; i++ {
				r, err := bank.Load(o.randomAdapter(b, v, rank, uint64(i+1)))
				if err != nil {
					b.Fatal(err)
				}
				res = append(res, r)
			}
			for _, n := range []int{1, 8, 64} {
				for _, T := range []int{1, 64, 512} {
					if n > T {
						continue // fewer tokens than adapters: same as n = T
					}
					b.Run(fmt.Sprintf("%s/r%d/adapters%d/tokens%d", v, rank, n, T), func(b *testing.B) {
						benchLayer(b, o, bank, res[:n], T)
					})
				}
			}
			bank.Close()
		}
	}
}

func benchLayer(b *testing.B, o *oneWeight, bank *Bank, res []*Resident, T int) {
	rng := rand.New(rand.NewPCG(1, uint64(T)))
	x := make([]float32, o.in*T)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	uses := make([][]Use, T)
	for t := range uses {
		uses[t] = []Use{{Adapter: res[t%len(res)], Scale: 1}}
	}
	run := func(withAdapters bool) time.Duration {
		start := time.Now()
		ctx := o.backend.NewContext()
		xt := ctx.Input().FromFloats(x, o.in, T)
		h := o.w.Mulmat(ctx, xt)
		if withAdapters {
			r, err := bank.Route(uses)
			if err != nil {
				b.Fatal(err)
			}
			h = r.Bind(ctx).Project(ctx, adapters.Target{Layer: 0, Module: adapters.Q}, xt, h)
		}
		ctx.Forward(h).Compute(h)
		h.Floats()
		ctx.Close()
		return time.Since(start)
	}
	run(false)
	run(true)
	// Medians: on a shared 2-core machine single computes stall now and
	// then (thread wake-ups, page faults), which would swamp means.
	var base, sbora []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base = append(base, run(false))
		sbora = append(sbora, run(true))
	}
	b.StopTimer()
	mb, ms := median(base), median(sbora)
	b.ReportMetric(float64(ms)/1e3, "µs/sbora")
	b.ReportMetric(float64(mb)/1e3, "µs/base")
	b.ReportMetric(float64(ms)/float64(mb), "x-base")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkAdapterLoad measures how long an adapter takes to become
// resident — open its file, validate it, convert and copy its matrices into
// bank slots — against a plain memory copy of the file's tensor bytes, in
// the same loop; "x-memcpy" is the ratio (the goal is ≤ 3). The adapter is
// FA rank 64 on all seven projections of the 2-layer LLaMA-7B shape, as a
// native F16 file (the default) and as an F32 one.
func BenchmarkAdapterLoad(b *testing.B) {
	backend, base := sevenBLayers(b, 2)
	bank, err := NewBank(backend, base, Config{Slots: 2, MaxRank: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer bank.Close()
	a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: "fa64", Variant: adapters.FA, Rank: 64, Seed: 1})
	if err != nil {
		b.Fatal(err)
	}
	for _, f32 := range []bool{false, true} {
		name := map[bool]string{false: "F16-file", true: "F32-file"}[f32]
		path := filepath.Join(b.TempDir(), name+".gguf")
		if err := a.Save(path, adapters.SaveOptions{F32: f32}); err != nil {
			b.Fatal(err)
		}
		st, _ := os.Stat(path)
		b.Run(name, func(b *testing.B) {
			src := make([]byte, st.Size())
			dst := make([]byte, st.Size())
			load := func() time.Duration {
				start := time.Now()
				rd, err := adapters.OpenReader(path)
				if err != nil {
					b.Fatal(err)
				}
				if err := rd.Adapter.Resolve(base); err != nil {
					b.Fatal(err)
				}
				r, err := bank.Reserve(rd.Adapter.Name, rd.Adapter.Variant, rd.Adapter.Rank)
				if err != nil {
					b.Fatal(err)
				}
				if err := r.Upload(rd.Adapter, rd); err != nil {
					b.Fatal(err)
				}
				rd.Close()
				bank.Activate(r)
				d := time.Since(start)
				bank.Unload(r)
				return d
			}
			cp := func() time.Duration {
				start := time.Now()
				copy(dst, src)
				return time.Since(start)
			}
			load()
			cp()
			var loads, copies []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				loads = append(loads, load())
				copies = append(copies, cp())
			}
			b.StopTimer()
			ml, mc := median(loads), median(copies)
			b.ReportMetric(float64(st.Size())/(1<<20), "MiB")
			b.ReportMetric(float64(ml)/1e6, "ms/load")
			b.ReportMetric(float64(mc)/1e6, "ms/memcpy")
			b.ReportMetric(float64(ml)/float64(mc), "x-memcpy")
		})
	}
}

// sevenBLayers is a CPU backend for a model of LLaMA-7B layer shapes (its
// weights are not needed: the bank only asks the backend for per-layer
// contexts) and the Base describing those shapes.
func sevenBLayers(tb testing.TB, layers int) (ml.Backend, *adapters.Base) {
	tb.Helper()
	w := gguf.NewWriter()
	w.KV.Set("general.architecture", "llama")
	w.KV.Set("llama.block_count", uint32(layers))
	var shapes []adapters.TensorShape
	for l := 0; l < layers; l++ {
		for _, m := range adapters.AllModules {
			in, out := 4096, 4096
			switch m {
			case adapters.Gate, adapters.Up:
				out = 11008
			case adapters.Down:
				in = 11008
			}
			shapes = append(shapes, adapters.TensorShape{Name: adapters.Target{Layer: l, Module: m}.WeightName(), Shape: []uint64{uint64(in), uint64(out)}})
		}
		// One small tensor per layer so the backend creates the layer.
		if err := w.AddTensor(fmt.Sprintf("blk.%d.attn_norm.weight", l), gguf.TypeF32, []uint64{8}, make([]byte, 32)); err != nil {
			tb.Fatal(err)
		}
	}
	path := filepath.Join(tb.TempDir(), "layers.gguf")
	if err := w.WriteFile(path); err != nil {
		tb.Fatal(err)
	}
	backend, err := ml.NewBackend(path, ml.BackendParams{AllocMemory: true, NumThreads: 2})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(backend.Close)
	return backend, adapters.NewBase("llama", layers, shapes)
}
