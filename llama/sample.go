package llama

import (
	"container/heap"
	"math"
	"math/rand/v2"
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
	// LogitBias is added to the logits of the tokens it names (OpenAI's
	// logit_bias; -100 bans a token, +100 all but forces it).
	LogitBias map[int32]float32
	// Seed makes sampling reproducible; 0 picks a random seed.
	Seed uint64
}

// Sampler picks tokens from logits, in the order OpenAI, vLLM and ollama
// use: penalties and logit bias, then temperature, then the top-k, top-p
// and min-p cuts on the tempered distribution, then a draw. Not safe for
// concurrent use.
type Sampler struct {
	opts   SamplerOptions
	rng    *rand.Rand
	counts map[int32]int
	work   []float32 // adjusted logits
	cands  candHeap
}

type candidate struct {
	id int32
	p  float64 // unnormalized probability
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

// Adjust returns the logits after penalties and logit bias (a copy; nil
// when nothing applies, meaning logits unchanged).
func (s *Sampler) Adjust(logits []float32) []float32 {
	o := s.opts
	penalize := len(s.counts) > 0 && (o.PresencePenalty != 0 || o.FrequencyPenalty != 0 || (o.RepeatPenalty != 0 && o.RepeatPenalty != 1))
	if !penalize && len(o.LogitBias) == 0 {
		return nil
	}
	s.work = append(s.work[:0], logits...)
	if penalize {
		for id, n := range s.counts {
			if int(id) >= len(s.work) {
				continue
			}
			l := s.work[id]
			if o.RepeatPenalty != 0 && o.RepeatPenalty != 1 {
				if l > 0 {
					l /= o.RepeatPenalty
				} else {
					l *= o.RepeatPenalty
				}
			}
			s.work[id] = l - o.PresencePenalty - float32(n)*o.FrequencyPenalty
		}
	}
	for id, b := range o.LogitBias {
		if id >= 0 && int(id) < len(s.work) {
			s.work[id] += b
		}
	}
	return s.work
}

// Sample picks the next token. logits is not modified.
func (s *Sampler) Sample(logits []float32) int32 {
	if adj := s.Adjust(logits); adj != nil {
		logits = adj
	}
	return s.draw(logits, nil)
}

// SampleAllowed picks the next token among those allowed reports true
// for (it must allow at least one); -1 when none is.
func (s *Sampler) SampleAllowed(logits []float32, allowed func(int32) bool) int32 {
	if adj := s.Adjust(logits); adj != nil {
		logits = adj
	}
	return s.draw(logits, allowed)
}

func (s *Sampler) draw(logits []float32, allowed func(int32) bool) int32 {
	o := s.opts
	if o.Temperature <= 0 {
		best, bestL := int32(-1), float32(math.Inf(-1))
		for i, l := range logits {
			if (best < 0 || l > bestL) && (allowed == nil || allowed(int32(i))) {
				best, bestL = int32(i), l
			}
		}
		return best
	}
	inv := 1 / float64(o.Temperature)
	maxL := math.Inf(-1)
	for i, l := range logits {
		if float64(l) > maxL && (allowed == nil || allowed(int32(i))) {
			maxL = float64(l)
		}
	}
	if math.IsInf(maxL, -1) {
		return -1
	}
	// Unnormalized probabilities at the temperature; tokens that cannot
	// matter (below e^-40 of the best) are skipped.
	c := s.cands[:0]
	for i, l := range logits {
		x := (float64(l) - maxL) * inv
		if x < -40 || (allowed != nil && !allowed(int32(i))) {
			continue
		}
		c = append(c, candidate{id: int32(i), p: math.Exp(x)})
	}
	if o.TopK > 0 && o.TopK < len(c) {
		c = topK(c, o.TopK)
	}
	if o.TopP > 0 && o.TopP < 1 {
		c = topP(c, float64(o.TopP))
	}
	if o.MinP > 0 {
		best := 0.0
		for _, x := range c {
			best = max(best, x.p)
		}
		limit := best * float64(o.MinP)
		kept := c[:0]
		for _, x := range c {
			if x.p >= limit {
				kept = append(kept, x)
			}
		}
		c = kept
	}
	s.cands = c
	sum := 0.0
	for _, x := range c {
		sum += x.p
	}
	r := s.rng.Float64() * sum
	for _, x := range c {
		r -= x.p
		if r <= 0 {
			return x.id
		}
	}
	return c[len(c)-1].id
}

// topK keeps the k most probable candidates (ties: lower ids) with a
// k-element min-heap: O(n log k), no sort of the vocabulary.
func topK(c []candidate, k int) []candidate {
	worse := func(a, b candidate) bool { return a.p < b.p || (a.p == b.p && a.id > b.id) }
	h := make([]candidate, 0, k)
	down := func(i int) {
		for {
			l, r, m := 2*i+1, 2*i+2, i
			if l < len(h) && worse(h[l], h[m]) {
				m = l
			}
			if r < len(h) && worse(h[r], h[m]) {
				m = r
			}
			if m == i {
				return
			}
			h[i], h[m] = h[m], h[i]
			i = m
		}
	}
	for _, x := range c {
		switch {
		case len(h) < k:
			h = append(h, x)
			for i := len(h) - 1; i > 0 && worse(h[i], h[(i-1)/2]); i = (i - 1) / 2 {
				h[i], h[(i-1)/2] = h[(i-1)/2], h[i]
			}
		case worse(h[0], x):
			h[0] = x
			down(0)
		}
	}
	return h
}

// topP keeps the most probable candidates whose mass first reaches p of
// the total, taking them from a heap so that only those are ordered.
func topP(c []candidate, p float64) []candidate {
	total := 0.0
	for _, x := range c {
		total += x.p
	}
	h := candHeap(c)
	heap.Init(&h)
	out := make([]candidate, 0, 16)
	cum := 0.0
	for h.Len() > 0 {
		x := heap.Pop(&h).(candidate)
		out = append(out, x)
		cum += x.p
		if cum >= p*total {
			break
		}
	}
	return out
}

// candHeap is a max-heap by probability (ties: lower ids first).
type candHeap []candidate

func (h candHeap) Len() int { return len(h) }
func (h candHeap) Less(i, j int) bool {
	return h[i].p > h[j].p || (h[i].p == h[j].p && h[i].id < h[j].id)
}
func (h candHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *candHeap) Push(x any)   { *h = append(*h, x.(candidate)) }
func (h *candHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// LogSumExp is log Σ exp(logits) in float64, shifted by the largest logit
// so that nothing overflows: a token's log probability is its logit minus
// this.
func LogSumExp(logits []float32) float64 {
	maxL := float32(math.Inf(-1))
	for _, l := range logits {
		maxL = max(maxL, l)
	}
	sum := 0.0
	for _, l := range logits {
		sum += math.Exp(float64(l - maxL))
	}
	return float64(maxL) + math.Log(sum)
}
