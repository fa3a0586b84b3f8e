package serve

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
)

// enqueue turns a submitted request into waiting sequences, one per choice.
func (s *scheduler) enqueue(r *request) {
	n := max(r.n, 1)
	seed := r.sampler.Seed
	for c := 0; c < n; c++ {
		o := r.sampler
		if seed != 0 {
			// Distinct, reproducible seeds per choice.
			o.Seed = seed + uint64(c)*0x9e3779b97f4a7c15
		}
		q := &sequence{req: r, choice: c, input: append([]int32(nil), r.prompt...),
			sampler: llama.NewSampler(o), stream: llama.NewTextStream(s.tok)}
		if r.grammar != nil {
			q.grammar = r.grammar.Start()
		}
		r.seqs = append(r.seqs, q)
		i, _ := slices.BinarySearchFunc(s.waiting, q, before)
		s.waiting = slices.Insert(s.waiting, i, q)
	}
	r.open = n
}

// before orders waiting sequences: older requests first, then choices.
func before(a, b *sequence) int {
	if c := a.req.arrived.Compare(b.req.arrived); c != 0 {
		return c
	}
	return a.choice - b.choice
}

// reap ends sequences whose clients went away.
func (s *scheduler) reap() {
	for _, q := range slices.Clone(s.waiting) {
		if err := q.req.ctx.Err(); err != nil {
			s.finish(q, "", err)
		}
	}
	for _, q := range slices.Clone(s.running) {
		if err := q.req.ctx.Err(); err != nil {
			s.finish(q, "", err)
		}
	}
	s.compact()
}

// admit moves waiting sequences into the running set, oldest first, while
// there is room: a sequence needs its adapters resident (their loads start
// here, in the background) and KV blocks for the part of its input the
// prefix cache does not already hold. A request that cannot get blocks
// stops admission (younger ones would take the blocks it waits for); one
// that waits for adapter slots held by running requests lets younger ones
// pass until it has waited AgingLimit, then it too blocks the queue until
// it is in.
func (s *scheduler) admit() {
	pool := s.engine.Pool
	watermark := max(1, pool.Blocks()/100)
	for i := 0; i < len(s.waiting); {
		q := s.waiting[i]
		if len(s.running) >= s.cfg.Parallel {
			return
		}
		if q.choice > 0 && !q.req.seqs[0].prefilled() && !q.req.seqs[0].done {
			i++ // waits for the first choice's prefill to share it
			continue
		}
		ready, err := s.acquire(q)
		if err != nil {
			s.failRequest(q.req, err)
			continue // failRequest removed it from waiting
		}
		if !ready {
			if i == 0 && time.Since(q.req.arrived) > s.cfg.AgingLimit {
				return // first come, first served from now on
			}
			i++
			continue
		}
		kv := pool.NewSeq(q.req.salt())
		if !s.cfg.NoPrefixCache && !q.wantsPromptLogprobs() {
			kv.MatchPrefix(q.input)
		}
		need := pool.BlocksFor(len(q.input)) - kv.Blocks()
		if pool.FreeBlocks()-need < watermark && len(s.running) > 0 || kv.Reserve(len(q.input)-kv.Len()) != nil {
			kv.Release()
			s.releasePins(q)
			return
		}
		q.kv = kv
		s.startRunning(q)
		s.waiting = slices.Delete(s.waiting, i, i+1)
	}
}

// startRunning records q as running and tells its handler on its
// request's first admission.
func (s *scheduler) startRunning(q *sequence) {
	q.admitted = time.Now()
	s.running = append(s.running, q)
	r := q.req
	if !r.admitted {
		r.admitted = true
		s.queued.Add(-1)
		s.m.queueSeconds.Observe(time.Since(r.arrived).Seconds())
		s.m.promptTokens.WithLabelValues(r.label).Add(float64(len(r.prompt)))
		r.events <- event{kind: evAdmitted}
	}
	salt := r.salt()
	for _, u := range r.adapters {
		k := u.entry.Key()
		if s.salts[k] == nil {
			s.salts[k] = map[uint64]bool{}
		}
		s.salts[k][salt] = true
	}
}

// acquire pins q's adapters when all are resident; otherwise it starts
// loading what is missing (as far as slots and the load limit allow) and
// reports not ready.
func (s *scheduler) acquire(q *sequence) (ready bool, err error) {
	if len(q.keys) > 0 {
		return true, nil // pinned already (waiting for KV)
	}
	ready = true
	for _, u := range q.req.adapters {
		k := u.entry.Key()
		if err, ok := s.failed[k]; ok {
			return false, err
		}
		if present, ok := s.res.State(k); !ok {
			ready = false
			if !present {
				if err := s.startLoad(q, u.entry); err != nil {
					return false, err
				}
			}
		}
	}
	if !ready {
		return false, nil
	}
	for _, u := range q.req.adapters {
		k := u.entry.Key()
		q.uses = append(q.uses, kernels.Use{Adapter: s.res.Pin(k), Scale: u.scale})
		q.keys = append(q.keys, k)
	}
	return true, nil
}

// releasePins unpins q's adapters (q stops running or gives up its turn).
func (s *scheduler) releasePins(q *sequence) {
	for _, k := range q.keys {
		s.res.Release(k)
	}
	q.keys, q.uses = nil, nil
}

// preempt takes q's KV blocks back (its full blocks stay in the prefix
// cache) and puts it back in the queue, where it keeps its place by age.
func (s *scheduler) preempt(q *sequence) {
	q.kv.Release()
	q.kv = nil
	s.releasePins(q)
	s.running = slices.DeleteFunc(s.running, func(x *sequence) bool { return x == q })
	i, _ := slices.BinarySearchFunc(s.waiting, q, before)
	s.waiting = slices.Insert(s.waiting, i, q)
	s.m.preemptions.Inc()
}

// youngestRunning is the running sequence admitted last (the one to
// preempt).
func (s *scheduler) youngestRunning() *sequence {
	var y *sequence
	for _, q := range s.running {
		if !q.done && (y == nil || q.admitted.After(y.admitted)) {
			y = q
		}
	}
	return y
}

// failRequest ends every open sequence of r with err.
func (s *scheduler) failRequest(r *request, err error) {
	for _, q := range r.seqs {
		s.finish(q, "", err)
	}
	s.compact()
}

// finish ends q: sends its final event, returns its KV blocks and pins.
func (s *scheduler) finish(q *sequence, reason string, err error) {
	if q.done {
		return
	}
	q.done = true
	r := q.req
	if q.kv != nil {
		q.kv.Release()
		q.kv = nil
	}
	s.releasePins(q)
	status := "ok"
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		status = "canceled"
	case err != nil:
		status = "error"
	}
	u := usage{PromptTokens: len(r.prompt), CompletionTokens: q.generated, TotalTokens: len(r.prompt) + q.generated}
	r.events <- event{kind: evDone, choice: q.choice, finish: reason, err: err, usage: u}
	r.open--
	if r.open == 0 {
		releaseUses(r.adapters)
		if !r.admitted {
			s.queued.Add(-1)
		}
		s.m.requests.WithLabelValues(r.label, r.endpoint, status).Inc()
	}
}

// compact drops finished sequences from the running and waiting lists.
func (s *scheduler) compact() {
	done := func(q *sequence) bool { return q.done }
	s.running = slices.DeleteFunc(s.running, done)
	s.waiting = slices.DeleteFunc(s.waiting, done)
}
