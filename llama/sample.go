package llama

import (
	"math"
	"math/rand/v2"
	"slices"
	"sort"
)

// SamplerOptions are the decoding controls of one request.
type SamplerOptions struct {
	// Temperature 0 means greedy (argmax).
	Temperature float32
	TopK        int     // 0 = off
	TopP        float32 // 0 or 1 = off
	MinP        float32 // 0 = off
	// PresencePenalty and FrequencyPenalty follow OpenAI: the logit of a
	// token already generated n times is lowered by presence + n·frequency.
	PresencePenalty  float32
	FrequencyPenalty float32
	// RepeatPenalty follows llama.cpp (1 = off): positive logits of seen
	// tokens are divided by it, negative ones multiplied.
	RepeatPenalty float32
	// Seed makes sampling reproducible; 0 picks a random seed.
	Seed uint64
}

// Sampler picks tokens from logits. Not safe for concurrent use.
type Sampler struct {
	opts   SamplerOptions
	rng    *rand.Rand
	counts map[int32]int
	cands  []candidate
}

type candidate struct {
	id    int32
	logit float32
	p     float64
}

// NewSampler returns a sampler; with Seed 0 it is seeded randomly.
func NewSampler(o SamplerOptions) *Sampler {
	seed := o.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	return &Sampler{opts: o, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), counts: map[int32]int{}}
}

// Accept records a generated token for the penalties.
func (s *Sampler) Accept(tok int32) { s.counts[tok]++ }

// Sample picks the next token. logits is not modified.
func (s *Sampler) Sample(logits []float32) int32 {
	o := s.opts
	penalize := len(s.counts) > 0 && (o.PresencePenalty != 0 || o.FrequencyPenalty != 0 || (o.RepeatPenalty != 0 && o.RepeatPenalty != 1))
	adjusted := func(id int32, l float32) float32 {
		if !penalize {
			return l
		}
		n := s.counts[id]
		if n == 0 {
			return l
		}
		if o.RepeatPenalty != 0 && o.RepeatPenalty != 1 {
			if l > 0 {
				l /= o.RepeatPenalty
			} else {
				l *= o.RepeatPenalty
			}
		}
		return l - o.PresencePenalty - float32(n)*o.FrequencyPenalty
	}
	if o.Temperature <= 0 {
		best, bestL := int32(0), adjusted(0, logits[0])
		for i := 1; i < len(logits); i++ {
			if l := adjusted(int32(i), logits[i]); l > bestL {
				best, bestL = int32(i), l
			}
		}
		return best
	}
	s.cands = s.cands[:0]
	for i, l := range logits {
		s.cands = append(s.cands, candidate{id: int32(i), logit: adjusted(int32(i), l)})
	}
	c := s.cands
	sort.Slice(c, func(i, j int) bool {
		if c[i].logit != c[j].logit {
			return c[i].logit > c[j].logit
		}
		return c[i].id < c[j].id
	})
	if o.TopK > 0 && o.TopK < len(c) {
		c = c[:o.TopK]
	}
	// Probabilities at temperature 1 for the top-p and min-p cuts (as in
	// llama.cpp's default chain), then temperature on what survives.
	softmax(c, 1)
	if o.TopP > 0 && o.TopP < 1 {
		cum := 0.0
		for i := range c {
			cum += c[i].p
			if cum >= float64(o.TopP) {
				c = c[:i+1]
				break
			}
		}
	}
	if o.MinP > 0 {
		limit := c[0].p * float64(o.MinP)
		n := 1
		for n < len(c) && c[n].p >= limit {
			n++
		}
		c = c[:n]
	}
	softmax(c, o.Temperature)
	r := s.rng.Float64()
	for _, x := range c {
		r -= x.p
		if r <= 0 {
			return x.id
		}
	}
	return c[len(c)-1].id
}

func softmax(c []candidate, temp float32) {
	maxL := slices.MaxFunc(c, func(a, b candidate) int {
		switch {
		case a.logit < b.logit:
			return -1
		case a.logit > b.logit:
			return 1
		}
		return 0
	}).logit
	sum := 0.0
	for i := range c {
		c[i].p = math.Exp(float64(c[i].logit-maxL) / float64(temp))
		sum += c[i].p
	}
	for i := range c {
		c[i].p /= sum
	}
}
