package kernels

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

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
