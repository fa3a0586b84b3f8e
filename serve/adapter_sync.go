package serve

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// watchAdapters keeps the registry in step with the adapter directory,
// which other replicas (sharing the volume) and operators change: on file
// events (fsnotify, after a short settle) and every interval, whichever
// comes first. Network file systems deliver no events for other hosts'
// changes, so the interval is what bounds how stale a replica can be.
func (s *Server) watchAdapters(ctx context.Context, interval time.Duration) {
	var events <-chan fsnotify.Event
	if w, err := fsnotify.NewWatcher(); err != nil {
		slog.Warn("adapter directory: no file events, rescanning only", "every", interval, "error", err)
	} else if err := w.Add(s.registry.Dir()); err != nil {
		w.Close()
		slog.Warn("adapter directory: no file events, rescanning only", "every", interval, "error", err)
	} else {
		defer w.Close()
		events = w.Events
		go func() {
			for err := range w.Errors {
				slog.Warn("adapter directory watch", "error", err)
			}
		}()
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var settle <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if strings.HasSuffix(ev.Name, ".gguf") && settle == nil {
				settle = time.After(100 * time.Millisecond)
			}
			continue
		case <-settle:
			settle = nil
		case <-tick.C:
		}
		s.syncAdapters()
	}
}

// syncAdapters applies the directory's changes and unloads what they end.
func (s *Server) syncAdapters() {
	s.adminMu.Lock()
	defer s.adminMu.Unlock()
	res := s.registry.Sync()
	for _, e := range res.Added {
		slog.Info("adapter registered from the directory", "name", e.Name, "generation", e.Gen, "file", filepath.Base(e.Path))
	}
	for _, e := range res.Replaced {
		s.sched.drop(e.Key())
	}
	for _, e := range res.Removed {
		slog.Info("adapter unregistered: its file is gone", "name", e.Name)
		s.sched.drop(e.Key())
	}
	for _, f := range res.Failed {
		slog.Warn("adapter file not registered (retried when it changes)", "path", f.Path, "error", f.Err)
	}
	if res.Changed() {
		s.sched.control(s.sched.updateGauges)
	}
}
