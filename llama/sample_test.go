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
