package serve

import (
	"context"
	"slices"
	"sync/atomic"
	"time"

	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
)

// schedulerConfig sizes the scheduler.
type schedulerConfig struct {
	MaxQueue      int // requests waiting beyond which submit fails (429)
	Parallel      int // sequences running at once
	PrefillBudget int // prompt tokens per step, across sequences
	MaxLoading    int // adapter loads in flight at once
	// AgingLimit is how long the oldest waiting request may wait before
	// admission turns strictly first-come first-served.
	AgingLimit time.Duration
	// NoPrefixCache turns prefix matching off.
	NoPrefixCache bool
}

// scheduler owns the engine: one goroutine admits requests, steps the
// engine, samples and streams text. Handlers talk to it through channels
// and never wait for a step. The loop is here; admission (admission.go),
// adapter loading (loading.go), stepping (step.go) and output (output.go)
// are its parts.
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
	queued    atomic.Int64 // requests submitted and not yet admitted
	draining  atomic.Bool
	// resident is a snapshot of the resident adapters for HTTP handlers,
	// refreshed by the scheduler so they never wait for a step.
	resident atomic.Pointer[map[adapters.Key]bool]
	stats    atomic.Pointer[schedStats]

	waiting  []*sequence // sorted by (arrival, choice)
	running  []*sequence // in admission order
	loading  map[adapters.Key]bool
	failed   map[adapters.Key]error
	salts    map[adapters.Key]map[uint64]bool // prefix-cache salts that include an adapter
	lastPool llama.PoolStats                  // pool counters already added to the metrics
	stopped  chan struct{}
}

// schedStats is a snapshot for the metrics scrape.
type schedStats struct {
	at                       time.Time
	running, waiting         int // sequences
	runningRequests          int // requests with a running sequence
	waitingRequests          int // requests in the queue with none running
	notAdmitted              int // of those, never admitted (still counted in queued)
	heldBlocks               int
	runningLoRA, waitingLoRA []string
}

type loadResult struct {
	key     adapters.Key
	err     error
	started time.Time
	upload  time.Duration // reading, checking and copying into the bank
}

func newScheduler(cfg schedulerConfig, e *llama.Engine, reg *adapters.Registry, m *metrics) *scheduler {
	s := &scheduler{cfg: cfg, engine: e, tok: e.Model.Tokenizer, reg: reg, m: m,
		submitCh: make(chan *request, cfg.MaxQueue), controlCh: make(chan func(), 64), loadCh: make(chan loadResult, 64),
		loading: map[adapters.Key]bool{}, failed: map[adapters.Key]error{}, salts: map[adapters.Key]map[uint64]bool{},
		stopped: make(chan struct{})}
	s.res = adapters.NewResidency(func(r *kernels.Resident) { e.Bank.Unload(r) })
	m.kvBlocks.Set(float64(e.Pool.Blocks()))
	m.kvCapacity.Set(float64(e.Pool.Tokens()))
	m.slotsTotal.Set(float64(cfg.Parallel))
	s.stats.Store(&schedStats{})
	return s
}

// submit queues a request, or fails at once when the queue is full or the
// server is draining.
func (s *scheduler) submit(r *request) error {
	if s.draining.Load() {
		return errShuttingDown
	}
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

// control runs f on the scheduler goroutine (without waiting for it).
func (s *scheduler) control(f func()) {
	select {
	case s.controlCh <- f:
	case <-s.stopped:
	}
}

// drop unloads an unregistered adapter (now, or when its last request
// ends) and forgets its prefix-cache blocks. It does not wait: the
// registry has already stopped handing the adapter out.
func (s *scheduler) drop(k adapters.Key) {
	s.control(func() {
		s.res.Drop(k)
		delete(s.failed, k)
		for salt := range s.salts[k] {
			s.engine.Pool.Invalidate(salt)
		}
		delete(s.salts, k)
		s.updateGauges()
	})
}

// run is the engine loop; it returns when ctx ends, failing what is left.
func (s *scheduler) run(ctx context.Context) {
	defer close(s.stopped)
	for {
		s.reap()
		s.admit()
		s.updateGauges()
		if len(s.running) > 0 {
			s.step()
		} else if !s.wait(ctx) {
			break
		}
		s.drain()
		if ctx.Err() != nil {
			break
		}
	}
	s.shutdown(errShuttingDown)
	// Let uploads in flight finish before the bank goes away.
	for len(s.loading) > 0 {
		s.loaded(<-s.loadCh)
	}
}

// wait sleeps until a submission, a control call or a finished load
// arrives and handles it; it reports false when ctx ends first. With
// requests waiting (for adapters) it wakes up now and then to let them age.
func (s *scheduler) wait(ctx context.Context) bool {
	var tick <-chan time.Time
	if len(s.waiting) > 0 {
		t := time.NewTimer(50 * time.Millisecond)
		defer t.Stop()
		tick = t.C
	}
	select {
	case r := <-s.submitCh:
		s.enqueue(r)
	case f := <-s.controlCh:
		f()
	case l := <-s.loadCh:
		s.loaded(l)
	case <-tick:
	case <-ctx.Done():
		return false
	}
	return true
}

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

// shutdown ends every sequence, running or waiting, with err.
func (s *scheduler) shutdown(err error) {
	for _, q := range slices.Clone(s.running) {
		s.finish(q, "", err)
	}
	for _, q := range slices.Clone(s.waiting) {
		s.finish(q, "", err)
	}
	s.compact()
	for {
		select {
		case r := <-s.submitCh:
			s.enqueue(r)
			for _, q := range r.seqs {
				s.finish(q, "", err)
			}
			s.compact()
		default:
			return
		}
	}
}

// drainRequests stops new submissions, lets what runs and waits finish
// until ctx ends, then ends the rest with errShuttingDown. It returns when
// nothing is left.
func (s *scheduler) drainRequests(ctx context.Context) {
	s.draining.Store(true)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		st := s.stats.Load()
		if st.running == 0 && st.waiting == 0 && s.queued.Load() == 0 {
			return
		}
		select {
		case <-tick.C:
		case <-s.stopped:
			return
		case <-ctx.Done():
			done := make(chan struct{})
			s.control(func() {
				s.shutdown(errDrainTimeout)
				s.updateGauges()
				close(done)
			})
			select {
			case <-done:
			case <-s.stopped:
			}
			return
		}
	}
}

func (s *scheduler) updateGauges() {
	s.m.queueDepth.Set(float64(s.queued.Load()))
	s.m.activeSequences.Set(float64(len(s.running)))
	s.m.residentAdapters.Set(float64(s.res.Len()))
	s.m.registered.Set(float64(s.reg.Len()))
	p := s.engine.Pool
	s.m.kvUsedBlocks.Set(float64(p.HeldBlocks()))
	s.m.kvCachedBlocks.Set(float64(p.CachedBlocks()))
	used := 0
	for _, q := range s.running {
		used += q.kv.Len()
	}
	s.m.kvUsed.Set(float64(used))
	st := p.Stats()
	s.m.prefixQueried.Add(float64(st.PrefixQueried - s.lastPool.PrefixQueried))
	s.m.prefixHit.Add(float64(st.PrefixHit - s.lastPool.PrefixHit))
	s.m.kvEvicted.Add(float64(st.Evicted - s.lastPool.Evicted))
	s.lastPool = st
	snap := make(map[adapters.Key]bool, s.res.Len())
	for _, k := range s.res.Ready() {
		snap[k] = true
	}
	s.resident.Store(&snap)
	stats := &schedStats{at: time.Now(), running: len(s.running), waiting: len(s.waiting), heldBlocks: p.HeldBlocks()}
	runningReqs := map[*request]bool{}
	for _, q := range s.running {
		runningReqs[q.req] = true
	}
	waitingReqs := map[*request]bool{}
	for _, q := range s.waiting {
		if !runningReqs[q.req] && !waitingReqs[q.req] {
			waitingReqs[q.req] = true
			if !q.req.admitted {
				stats.notAdmitted++
			}
		}
	}
	stats.runningRequests, stats.waitingRequests = len(runningReqs), len(waitingReqs)
	stats.runningLoRA = adapterNames(s.running)
	stats.waitingLoRA = adapterNames(s.waiting)
	s.stats.Store(stats)
}

// adapterNames lists the distinct adapters the sequences use, sorted.
func adapterNames(qs []*sequence) []string {
	var names []string
	for _, q := range qs {
		for _, u := range q.req.adapters {
			if !slices.Contains(names, u.entry.Name) {
				names = append(names, u.entry.Name)
			}
		}
	}
	slices.Sort(names)
	return names
}

// residentKeys is the latest snapshot of the resident adapters.
func (s *scheduler) residentKeys() map[adapters.Key]bool {
	if p := s.resident.Load(); p != nil {
		return *p
	}
	return map[adapters.Key]bool{}
}
