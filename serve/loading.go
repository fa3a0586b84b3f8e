package serve

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// startLoad claims bank slots for e (evicting least recently used
// adapters no running request holds, never one q itself needs) and reads
// its file in the background, straight into those slots. It does nothing
// while MaxLoading loads are in flight or no slot can be freed; errors are
// final for this registration.
func (s *scheduler) startLoad(q *sequence, e *adapters.Entry) error {
	k := e.Key()
	if len(s.loading) >= s.cfg.MaxLoading {
		return nil
	}
	protected := func(x adapters.Key) bool {
		for _, u := range q.req.adapters {
			if u.entry.Key() == x {
				return true
			}
		}
		return false
	}
	bank := s.engine.Bank
	for {
		r, err := bank.Reserve(e.Name, e.Variant, e.Rank)
		if err == nil {
			e.Acquire() // q holds e, so this succeeds; the upload releases it
			s.res.Loading(k, r)
			s.loading[k] = true
			s.m.adapterEvictions.Add(float64(s.res.Evictions))
			s.res.Evictions = 0
			go s.upload(k, e, r, time.Now())
			return nil
		}
		if !errors.Is(err, adapters.ErrNoSlot) {
			err = &loadError{name: e.Name, err: err}
			s.failed[k] = err
			return err
		}
		if !s.res.Evict(protected, func(h *kernels.Resident) bool { return bank.Helps(h, e.Variant) }) {
			return nil // every slot it needs is held by running requests
		}
	}
}

// upload reads e's file into r's slots; it runs on its own goroutine
// while the engine steps (steps never read slots that are not active).
func (s *scheduler) upload(k adapters.Key, e *adapters.Entry, r *kernels.Resident, started time.Time) {
	begin := time.Now()
	defer e.Release()
	err := func() error {
		rd, err := e.OpenReader()
		if err != nil {
			return err
		}
		defer rd.Close()
		a := rd.Adapter
		if err := a.Resolve(s.engine.Model.AdapterBase); err != nil {
			return err
		}
		a.Name = e.Name
		return r.Upload(a, rd)
	}()
	s.loadCh <- loadResult{key: k, err: err, started: started, upload: time.Since(begin)}
}

// loaded makes a finished upload routable, or records why it failed.
func (s *scheduler) loaded(l loadResult) {
	delete(s.loading, l.key)
	if l.err != nil {
		s.res.Failed(l.key)
		s.failed[l.key] = &loadError{name: l.key.Name, err: l.err}
		slog.Warn("adapter load failed", "adapter", l.key.Name, "error", l.err)
		return
	}
	h, ok := s.res.Handle(l.key)
	if !ok {
		return
	}
	// Activate before marking it loaded: Loaded unloads (deactivates) an
	// adapter dropped during its load.
	s.engine.Bank.Activate(h)
	if s.res.Loaded(l.key) {
		s.m.adapterLoads.Inc()
		s.m.adapterLoadSecs.Observe(time.Since(l.started).Seconds())
		s.m.adapterUploadSecs.Observe(l.upload.Seconds())
	}
}

// loadError is a registered adapter that cannot be made resident (its file
// changed or broke after registration): the server's fault, not the
// request's, so a 500 with its own code.
type loadError struct {
	name string
	err  error
}

func (e *loadError) Error() string {
	return fmt.Sprintf("adapter %q cannot be loaded: %v", e.name, e.err)
}
func (e *loadError) Unwrap() error { return e.err }
