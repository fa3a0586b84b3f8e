package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
)

// adapterUse is a request's resolved adapter: a registration and a scale.
type adapterUse struct {
	entry *adapters.Entry
	scale float32
}

// request is one generation submitted to the scheduler.
type request struct {
	ctx       context.Context
	label     string // metrics label: the model name asked for
	endpoint  string
	prompt    []int32
	adapters  []adapterUse
	maxTokens int
	sampler   llama.SamplerOptions
	stop      []string
	ignoreEOS bool // benchmarks: generate maxTokens whatever the model says
	arrived   time.Time
	events    chan event
}

// event is what the scheduler tells a handler: text, or the end.
type event struct {
	text   string
	done   bool
	finish string // stop | length (with done)
	err    error  // with done
	usage  usage
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// sequence is an admitted request holding a KV slot.
type sequence struct {
	req       *request
	slot      int
	pos       int // tokens in the cache
	uses      []kernels.Use
	keys      []adapters.Key
	sampler   *llama.Sampler
	stream    *llama.TextStream
	text      strings.Builder // generated text not yet sent
	next      int32           // token to feed in the next step
	generated int
	lastToken time.Time
	done      bool
}

// schedulerConfig sizes the scheduler.
type schedulerConfig struct {
	MaxQueue      int
	PrefillBudget int // prompt tokens per step, across sequences
}

type loadResult struct {
	key     adapters.Key
	adapter *adapters.Adapter
	err     error
	started time.Time
}

type scheduler struct {
	cfg       schedulerConfig
	engine    *llama.Engine
	tok       tokenizer.Tokenizer
	reg       *adapters.Registry
	res       *adapters.Residency[*kernels.Resident]
	m         *metrics
	submitCh  chan *request
	controlCh chan func()
	loadCh    chan loadResult
	queued    atomic.Int64 // requests submitted but not admitted
	// resident is a snapshot of the resident adapters for HTTP handlers,
	// refreshed by the scheduler so they never wait for a step.
	resident  atomic.Pointer[map[adapters.Key]bool]
	waiting   []*request
	active    []*sequence
	freeSlots []int
	loads     map[adapters.Key]*loadResult // in flight (adapter nil) or parsed
	failed    map[adapters.Key]error       // parse failures, reported to waiters
	stopped   chan struct{}
}

func newScheduler(cfg schedulerConfig, e *llama.Engine, reg *adapters.Registry, capacity int, m *metrics) (*scheduler, error) {
	s := &scheduler{cfg: cfg, engine: e, tok: e.Model.Tokenizer, reg: reg, m: m,
		submitCh: make(chan *request, cfg.MaxQueue), controlCh: make(chan func(), 64), loadCh: make(chan loadResult, 64),
		loads: map[adapters.Key]*loadResult{}, failed: map[adapters.Key]error{}, stopped: make(chan struct{})}
	res, err := adapters.NewResidency(capacity, func(r *kernels.Resident) { e.Bank.Unload(r) })
	if err != nil {
		return nil, err
	}
	s.res = res
	for i := e.Cache.Slots - 1; i >= 0; i-- {
		s.freeSlots = append(s.freeSlots, i)
	}
	m.slotsTotal.Set(float64(e.Cache.Slots))
	m.kvCapacity.Set(float64(e.Cache.Slots * e.Cache.SlotLen))
	return s, nil
}

// submit queues a request, or fails at once when the queue is full.
func (s *scheduler) submit(r *request) error {
	if s.queued.Add(1) > int64(s.cfg.MaxQueue) {
		s.queued.Add(-1)
		return errQueueFull
	}
	select {
	case s.submitCh <- r:
		return nil
	case <-s.stopped:
		s.queued.Add(-1)
		return errShuttingDown
	}
}

// drop unloads an unregistered adapter (now, or when its last request
// ends). It does not wait for the scheduler: the registry has already
// stopped handing the adapter out.
func (s *scheduler) drop(k adapters.Key) {
	select {
	case s.controlCh <- func() {
		s.res.Drop(k)
		delete(s.failed, k)
		s.updateGauges()
	}:
	case <-s.stopped:
	}
}

// run is the engine loop; it returns when ctx ends, failing what is left.
func (s *scheduler) run(ctx context.Context) {
	defer close(s.stopped)
	for {
		s.reap()
		s.admit()
		s.updateGauges()
		if len(s.active) > 0 {
			s.step()
		} else if !s.wait(ctx) {
			// Nothing to compute (waiting requests, if any, need adapter
			// files still being read) and ctx ended while sleeping.
			s.shutdown()
			return
		}
		s.drain()
		if ctx.Err() != nil {
			s.shutdown()
			return
		}
	}
}

// wait sleeps until a submission, a control call or a finished load
// arrives and handles it; it reports false when ctx ends first.
func (s *scheduler) wait(ctx context.Context) bool {
	select {
	case r := <-s.submitCh:
		s.enqueue(r)
	case f := <-s.controlCh:
		f()
	case l := <-s.loadCh:
		s.loaded(l)
	case <-ctx.Done():
		return false
	}
	return true
}

func (s *scheduler) enqueue(r *request) { s.waiting = append(s.waiting, r) }

// drain takes everything pending without blocking.
func (s *scheduler) drain() {
	for {
		select {
		case r := <-s.submitCh:
			s.enqueue(r)
		case f := <-s.controlCh:
			f()
		case l := <-s.loadCh:
			s.loaded(l)
		default:
			return
		}
	}
}

func (s *scheduler) shutdown() {
	for _, q := range s.active {
		s.finish(q, "", errShuttingDown)
	}
	for _, r := range s.waiting {
		s.queued.Add(-1)
		r.events <- event{done: true, err: errShuttingDown}
	}
	s.waiting = nil
}

// reap drops requests whose clients went away.
func (s *scheduler) reap() {
	keep := s.waiting[:0]
	for _, r := range s.waiting {
		if r.ctx.Err() != nil {
			s.queued.Add(-1)
			s.m.requests.WithLabelValues(r.label, r.endpoint, "canceled").Inc()
			continue
		}
		keep = append(keep, r)
	}
	s.waiting = keep
	for _, q := range s.active {
		if !q.done && q.req.ctx.Err() != nil {
			s.finish(q, "", q.req.ctx.Err())
		}
	}
	s.compact()
}

// admit moves waiting requests into free slots when their adapters can be
// made resident; a request whose adapter file is still being read waits
// without blocking the ones behind it.
func (s *scheduler) admit() {
	keep := s.waiting[:0]
	for i, r := range s.waiting {
		if len(s.freeSlots) == 0 {
			keep = append(keep, s.waiting[i:]...)
			break
		}
		uses, keys, err, ready := s.acquire(r)
		if err != nil {
			s.queued.Add(-1)
			s.m.requests.WithLabelValues(r.label, r.endpoint, "error").Inc()
			r.events <- event{done: true, err: err}
			continue
		}
		if !ready {
			keep = append(keep, r)
			continue
		}
		slot := s.freeSlots[len(s.freeSlots)-1]
		s.freeSlots = s.freeSlots[:len(s.freeSlots)-1]
		s.queued.Add(-1)
		s.active = append(s.active, &sequence{req: r, slot: slot, uses: uses, keys: keys,
			sampler: llama.NewSampler(r.sampler), stream: llama.NewTextStream(s.tok)})
		s.m.promptTokens.WithLabelValues(r.label).Add(float64(len(r.prompt)))
	}
	s.waiting = keep
	// Forget parsed adapters no waiting request needs any more.
	for k, l := range s.loads {
		if l.adapter == nil {
			continue
		}
		needed := slices.ContainsFunc(s.waiting, func(r *request) bool {
			return slices.ContainsFunc(r.adapters, func(u adapterUse) bool { return u.entry.Key() == k })
		})
		if !needed {
			delete(s.loads, k)
		}
	}
}

// acquire pins every adapter of r, starting background reads of files that
// are not resident. ready is false while reads are pending or every slot is
// pinned by running requests.
func (s *scheduler) acquire(r *request) (uses []kernels.Use, keys []adapters.Key, err error, ready bool) {
	for _, u := range r.adapters {
		k := u.entry.Key()
		if err, ok := s.failed[k]; ok {
			return nil, nil, err, false
		}
		if !s.res.Resident(k) {
			l, ok := s.loads[k]
			if !ok {
				s.startLoad(u.entry)
				return nil, nil, nil, false
			}
			if l.adapter == nil {
				return nil, nil, nil, false // still reading
			}
		}
	}
	release := func() {
		for _, k := range keys {
			s.res.Release(k)
		}
	}
	for _, u := range r.adapters {
		k := u.entry.Key()
		h, err := s.res.Acquire(k, func() (*kernels.Resident, error) {
			l := s.loads[k]
			r, err := s.engine.Bank.Load(l.adapter)
			if err == nil {
				s.m.adapterLoads.Inc()
				s.m.adapterLoadSecs.Observe(time.Since(l.started).Seconds())
				delete(s.loads, k)
			}
			return r, err
		})
		if errors.Is(err, adapters.ErrNoSlot) {
			release()
			return nil, nil, nil, false
		}
		if err != nil {
			release()
			delete(s.loads, k)
			return nil, nil, fmt.Errorf("adapter %q: %w", u.entry.Name, err), false
		}
		uses = append(uses, kernels.Use{Adapter: h, Scale: u.scale})
		keys = append(keys, k)
	}
	s.m.adapterEvictions.Add(float64(s.res.Evictions))
	s.res.Evictions = 0
	return uses, keys, nil, true
}

func (s *scheduler) startLoad(e *adapters.Entry) {
	k := e.Key()
	l := &loadResult{key: k, started: time.Now()}
	s.loads[k] = l
	base := s.engine.Model.AdapterBase
	go func() {
		a, err := adapters.Load(e.Path)
		if err == nil {
			err = a.Resolve(base)
		}
		if err == nil {
			a.Name = e.Name
		}
		s.loadCh <- loadResult{key: k, adapter: a, err: err, started: l.started}
	}()
}

func (s *scheduler) loaded(l loadResult) {
	if l.err != nil {
		delete(s.loads, l.key)
		s.failed[l.key] = fmt.Errorf("adapter %q cannot be loaded: %w", l.key.Name, l.err)
		slog.Warn("adapter load failed", "adapter", l.key.Name, "error", l.err)
		return
	}
	s.loads[l.key] = &l
}

// step runs one forward pass: one token for every decoding sequence and a
// bounded number of prompt tokens for sequences still prefilling.
func (s *scheduler) step() {
	start := time.Now()
	budget := s.cfg.PrefillBudget
	var seqs []llama.Seq
	var in []*sequence
	for _, q := range s.active {
		if q.pos < len(q.req.prompt) {
			n := min(len(q.req.prompt)-q.pos, budget)
			if n <= 0 {
				continue
			}
			budget -= n
			seqs = append(seqs, llama.Seq{Slot: q.slot, Pos: q.pos, Tokens: q.req.prompt[q.pos : q.pos+n],
				Adapters: q.uses, NoLogits: q.pos+n < len(q.req.prompt)})
		} else {
			seqs = append(seqs, llama.Seq{Slot: q.slot, Pos: q.pos, Tokens: []int32{q.next}, Adapters: q.uses})
		}
		in = append(in, q)
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
		q.pos += len(seqs[i].Tokens)
		if len(logits[i]) > 0 {
			s.sample(q, logits[i][0])
		}
	}
	s.m.batchSequences.Observe(float64(len(seqs)))
	s.m.batchTokens.Observe(float64(tokens))
	s.m.stepSeconds.Observe(time.Since(start).Seconds())
	s.compact()
}

// sample picks q's next token and streams what text it completes.
func (s *scheduler) sample(q *sequence, logits []float32) {
	tok := q.sampler.Sample(logits)
	now := time.Now()
	if q.generated == 0 {
		s.m.ttft.Observe(now.Sub(q.req.arrived).Seconds())
	} else {
		s.m.itl.Observe(now.Sub(q.lastToken).Seconds())
	}
	q.lastToken = now
	if s.tok.Is(tok, tokenizer.SpecialEOS) && !q.req.ignoreEOS {
		s.flush(q, true)
		s.finish(q, "stop", nil)
		return
	}
	q.sampler.Accept(tok)
	q.generated++
	s.m.generationTokens.WithLabelValues(q.req.label).Inc()
	q.text.WriteString(q.stream.Add(tok))
	if s.checkStop(q) {
		s.finish(q, "stop", nil)
		return
	}
	if q.generated >= q.req.maxTokens || q.pos >= s.engine.Cache.SlotLen {
		s.flush(q, true)
		s.finish(q, "length", nil)
		return
	}
	s.flush(q, false)
	q.next = tok
}

// checkStop cuts the text at the first stop sequence; it reports whether
// one was found (and sends the text before it).
func (s *scheduler) checkStop(q *sequence) bool {
	text := q.text.String()
	cut := -1
	for _, st := range q.req.stop {
		if i := strings.Index(text, st); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut < 0 {
		return false
	}
	if cut > 0 {
		q.req.events <- event{text: text[:cut]}
	}
	q.text.Reset()
	return true
}

// flush sends generated text, holding back a tail that could still grow
// into a stop sequence unless final.
func (s *scheduler) flush(q *sequence, final bool) {
	text := q.text.String()
	if final {
		text += q.stream.Flush()
	}
	hold := 0
	if !final {
		for _, st := range q.req.stop {
			for n := min(len(st)-1, len(text)); n > hold; n-- {
				if strings.HasSuffix(text, st[:n]) {
					hold = n
					break
				}
			}
		}
	}
	if send := text[:len(text)-hold]; send != "" {
		q.req.events <- event{text: send}
	}
	q.text.Reset()
	q.text.WriteString(text[len(text)-hold:])
}

// finish ends q: sends the final event, frees its slot and adapter pins.
func (s *scheduler) finish(q *sequence, reason string, err error) {
	if q.done {
		return
	}
	q.done = true
	u := usage{PromptTokens: len(q.req.prompt), CompletionTokens: q.generated, TotalTokens: len(q.req.prompt) + q.generated}
	status := "ok"
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		status = "canceled"
	case err != nil:
		status = "error"
	}
	s.m.requests.WithLabelValues(q.req.label, q.req.endpoint, status).Inc()
	q.req.events <- event{done: true, finish: reason, err: err, usage: u}
	for _, k := range q.keys {
		s.res.Release(k)
	}
	s.freeSlots = append(s.freeSlots, q.slot)
}

func (s *scheduler) compact() {
	s.active = slices.DeleteFunc(s.active, func(q *sequence) bool { return q.done })
}

func (s *scheduler) updateGauges() {
	s.m.queueDepth.Set(float64(s.queued.Load()))
	s.m.activeSequences.Set(float64(len(s.active)))
	s.m.residentAdapters.Set(float64(s.res.Len()))
	s.m.registered.Set(float64(s.reg.Len()))
	used := 0
	for _, q := range s.active {
		used += q.pos
	}
	s.m.kvUsed.Set(float64(used))
	snap := make(map[adapters.Key]bool, s.res.Len())
	for _, k := range s.res.Keys() {
		snap[k] = true
	}
	s.resident.Store(&snap)
}

// residentKeys is the latest snapshot of the resident adapters.
func (s *scheduler) residentKeys() map[adapters.Key]bool {
	if p := s.resident.Load(); p != nil {
		return *p
	}
	return map[adapters.Key]bool{}
}
