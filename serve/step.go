package serve

import (
	"fmt"
	"log/slog"
	"math"
	"slices"
	"time"

	"github.com/sbora-serve/sbora-serve/llama"
)

// step runs one forward pass: the next token of every decoding sequence and
// up to PrefillBudget tokens of inputs still being prefilled.
func (s *scheduler) step() {
	start := time.Now()
	s.growForDecode()
	budget := s.cfg.PrefillBudget
	var seqs []llama.Seq
	var in []*sequence
	var starts []int
	for _, q := range s.running {
		rest := q.input[q.kv.Len():]
		n := len(rest)
		if n > 1 { // prefill (or re-prefill after a preemption)
			n = min(n, budget)
			if n <= 0 {
				continue
			}
			budget -= n
		}
		echo := q.wantsPromptLogprobs()
		seqs = append(seqs, llama.Seq{KV: q.kv, Tokens: rest[:n], Adapters: q.uses, NoLogits: n < len(rest) && !echo, AllLogits: echo})
		in = append(in, q)
		starts = append(starts, q.kv.Len())
	}
	if len(seqs) == 0 {
		return
	}
	logits, err := s.engine.Step(seqs)
	if err != nil {
		slog.Error("engine step failed", "error", err)
		for _, q := range in {
			s.finish(q, "", fmt.Errorf("engine step failed: %w", err))
		}
		s.compact()
		return
	}
	tokens := 0
	for i, q := range in {
		tokens += len(seqs[i].Tokens)
		rows := logits[i]
		if seqs[i].AllLogits {
			s.promptLogprobs(q, starts[i], rows)
		}
		if starts[i]+len(seqs[i].Tokens) < len(q.input) {
			continue // more of the prompt to go
		}
		last := rows[len(rows)-1]
		if q.choice == 0 && !q.prefilled() && q.req.n > 1 {
			s.fork(q, last)
		}
		s.sample(q, last)
	}
	s.m.batchSequences.Observe(float64(len(seqs)))
	s.m.batchTokens.Observe(float64(tokens))
	s.m.stepSeconds.Observe(time.Since(start).Seconds())
	s.compact()
}

// growForDecode gives every sequence about to decode room for its next
// token. When the pool is out of blocks it preempts the youngest running
// sequences (possibly the one that needs the room) until it fits.
func (s *scheduler) growForDecode() {
	for _, q := range slices.Clone(s.running) {
		if q.done || q.kv == nil || len(q.input)-q.kv.Len() != 1 {
			continue
		}
		for q.kv.Reserve(1) != nil {
			victim := s.youngestRunning()
			s.preempt(victim)
			if victim == q {
				break
			}
		}
	}
}

// fork starts the other choices of parent's request from its KV blocks
// now that the prompt is in: they share its full blocks, copy its last
// partial one, and sample their first tokens from the same logits. A
// choice that cannot start now (no room, no adapters) is admitted later
// and finds the prompt in the prefix cache.
func (s *scheduler) fork(parent *sequence, logits []float32) {
	for _, q := range parent.req.seqs[1:] {
		if q.done || q.kv != nil || len(s.running) >= s.cfg.Parallel {
			continue
		}
		ready, err := s.acquire(q)
		if err != nil || !ready {
			s.releasePins(q)
			continue
		}
		kv, err := parent.kv.Fork()
		if err != nil {
			s.releasePins(q)
			continue
		}
		q.kv = kv
		s.waiting = slices.DeleteFunc(s.waiting, func(x *sequence) bool { return x == q })
		s.startRunning(q)
		s.sample(q, logits)
	}
}

// promptLogprobs records the logprobs of the prompt tokens that rows (the
// logits of the positions from start on) predict, and sends them all once
// the prompt is complete.
func (s *scheduler) promptLogprobs(q *sequence, start int, rows [][]float32) {
	r := q.req
	if len(r.promptLP) == 0 {
		r.promptLP = make([]tokenLogprob, len(r.prompt))
		r.promptLP[0] = tokenLogprob{token: r.prompt[0], logprob: math.NaN()}
	}
	for j, row := range rows {
		next := start + j + 1
		if next < len(r.prompt) {
			r.promptLP[next] = logprobOf(row, r.prompt[next], r.logprobs)
		}
	}
	if start+len(rows) >= len(r.prompt) {
		r.events <- event{kind: evPromptLogprobs, logprobs: r.promptLP}
	}
}
