package llama

import (
	"math"
	"slices"
	"testing"
)

func softmaxRef(logits []float32, temp float64) []float64 {
	mx := math.Inf(-1)
	for _, l := range logits {
		mx = math.Max(mx, float64(l))
	}
	p := make([]float64, len(logits))
	sum := 0.0
	for i, l := range logits {
		p[i] = math.Exp((float64(l) - mx) / temp)
		sum += p[i]
	}
	for i := range p {
		p[i] /= sum
	}
	return p
}

func frequencies(s *Sampler, logits []float32, n int) []float64 {
	f := make([]float64, len(logits))
	for i := 0; i < n; i++ {
		f[s.Sample(logits)] += 1 / float64(n)
	}
	return f
}

func TestSampler(t *testing.T) {
	logits := []float32{2, 1.5, 0.5, 0, -1, -3}
	if got := NewSampler(SamplerOptions{}).Sample(logits); got != 0 {
		t.Fatalf("greedy picked %d", got)
	}
	if got := NewSampler(SamplerOptions{Temperature: 1, TopK: 1, Seed: 9}).Sample(logits); got != 0 {
		t.Fatalf("top-k 1 picked %d", got)
	}
	// Same seed, same draws; another seed, other draws.
	draw := func(seed uint64) []int32 {
		s := NewSampler(SamplerOptions{Temperature: 1, Seed: seed})
		var out []int32
		for i := 0; i < 50; i++ {
			out = append(out, s.Sample(logits))
		}
		return out
	}
	a, b, c := draw(7), draw(7), draw(8)
	if !slices.Equal(a, b) || slices.Equal(a, c) {
		t.Fatal("seeded sampling is not reproducible (or ignores the seed)")
	}
	// Temperature sampling follows softmax(logits / T).
	const n = 40000
	for _, temp := range []float64{1, 0.5, 2} {
		f := frequencies(NewSampler(SamplerOptions{Temperature: float32(temp), Seed: 3}), logits, n)
		p := softmaxRef(logits, temp)
		for i := range p {
			if d := math.Abs(f[i] - p[i]); d > 4*math.Sqrt(p[i]*(1-p[i])/n)+1e-3 {
				t.Errorf("T=%g token %d: frequency %.4f, softmax %.4f", temp, i, f[i], p[i])
			}
		}
	}
	// top-p keeps the smallest set reaching p, renormalized.
	p := softmaxRef(logits, 1)
	f := frequencies(NewSampler(SamplerOptions{Temperature: 1, TopP: float32(p[0] + p[1] - 1e-6), Seed: 4}), logits, n)
	if f[2]+f[3]+f[4]+f[5] != 0 || math.Abs(f[0]-p[0]/(p[0]+p[1])) > 0.02 {
		t.Errorf("top-p frequencies %v", f)
	}
	// min-p drops tokens below min_p × the top probability.
	f = frequencies(NewSampler(SamplerOptions{Temperature: 1, MinP: 0.3, Seed: 5}), logits, n)
	for i := range p {
		if p[i] < 0.3*p[0] && f[i] != 0 {
			t.Errorf("min-p kept token %d (p %.3f < 0.3 × %.3f)", i, p[i], p[0])
		}
	}
	// The cuts apply to the tempered distribution (OpenAI, vLLM and ollama
	// apply temperature first; this sampler cut at T = 1 before): at T = 2
	// the distribution flattens and top-p 0.8 keeps four tokens, not the
	// three it keeps at T = 1.
	for _, c := range []struct {
		temp     float64
		opts     SamplerOptions
		describe string
	}{
		{2, SamplerOptions{TopP: 0.8}, "top-p 0.8"},
		{0.5, SamplerOptions{TopP: 0.95}, "top-p 0.95"},
		{2, SamplerOptions{MinP: 0.3}, "min-p 0.3"},
		{2, SamplerOptions{TopK: 3, TopP: 0.9}, "top-k 3, top-p 0.9"},
		{1.5, SamplerOptions{TopK: 4, MinP: 0.2}, "top-k 4, min-p 0.2"},
	} {
		o := c.opts
		o.Temperature, o.Seed = float32(c.temp), 6
		want := cutReference(logits, c.temp, o)
		f := frequencies(NewSampler(o), logits, n)
		for i := range want {
			if d := math.Abs(f[i] - want[i]); d > 4*math.Sqrt(want[i]*(1-want[i])/n)+1e-3 {
				t.Errorf("T=%g %s: token %d frequency %.4f, reference %.4f", c.temp, c.describe, i, f[i], want[i])
			}
		}
	}
	// logit_bias moves single tokens: -100 bans, +100 all but forces.
	if got := NewSampler(SamplerOptions{LogitBias: map[int32]float32{0: -100}}).Sample(logits); got != 1 {
		t.Fatalf("bias -100 on the argmax: picked %d", got)
	}
	f = frequencies(NewSampler(SamplerOptions{Temperature: 1, LogitBias: map[int32]float32{5: 100}, Seed: 8}), logits, 1000)
	if f[5] < 0.999 {
		t.Fatalf("bias +100: token 5 drawn %.3f of the time", f[5])
	}
	// Penalties (OpenAI semantics): a token generated twice loses
	// presence + 2·frequency, enough here to lose the argmax.
	s := NewSampler(SamplerOptions{PresencePenalty: 0.2, FrequencyPenalty: 0.2})
	s.Accept(0)
	if got := s.Sample(logits); got != 0 {
		t.Fatalf("one use costs 0.4 < the 0.5 lead; picked %d", got)
	}
	s.Accept(0)
	if got := s.Sample(logits); got != 1 {
		t.Fatalf("two uses cost 0.6 > the 0.5 lead; picked %d", got)
	}
	// llama.cpp's repeat penalty divides positive logits.
	s = NewSampler(SamplerOptions{RepeatPenalty: 1.5})
	s.Accept(0)
	if got := s.Sample(logits); got != 1 {
		t.Fatalf("repeat penalty 1.5 turns 2 into 1.33 < 1.5; picked %d", got)
	}
}

// cutReference is the distribution after temperature, then top-k, top-p
// and min-p, by full sorting in float64 (the sampler avoids sorting).
func cutReference(logits []float32, temp float64, o SamplerOptions) []float64 {
	p := softmaxRef(logits, temp)
	order := make([]int, len(p))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int {
		if p[a] != p[b] {
			if p[a] > p[b] {
				return -1
			}
			return 1
		}
		return a - b
	})
	keep := make([]bool, len(p))
	kept := order
	if o.TopK > 0 && o.TopK < len(kept) {
		kept = kept[:o.TopK]
	}
	if o.TopP > 0 && o.TopP < 1 {
		total, cum := 0.0, 0.0
		for _, i := range kept {
			total += p[i]
		}
		for n, i := range kept {
			cum += p[i]
			if cum >= float64(o.TopP)*total {
				kept = kept[:n+1]
				break
			}
		}
	}
	best := p[kept[0]]
	sum := 0.0
	for _, i := range kept {
		if p[i] >= float64(o.MinP)*best {
			keep[i] = true
			sum += p[i]
		}
	}
	out := make([]float64, len(p))
	for i := range p {
		if keep[i] {
			out[i] = p[i] / sum
		}
	}
	return out
}
