package adapters

import (
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// FileStamp identifies one version of a file: a replacement by rename, an
// in-place rewrite or a touch all change it.
type FileStamp struct {
	Size    int64
	ModTime time.Time
	Inode   uint64
}

func stampOf(fi os.FileInfo) FileStamp {
	s := FileStamp{Size: fi.Size(), ModTime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.Inode = st.Ino
	}
	return s
}

// SyncResult is what a Sync changed.
type SyncResult struct {
	// Added are new registrations (new names, and new generations of
	// replaced files); Replaced and Removed are the registrations they
	// end, whose resident copies the caller drops (requests running on
	// them finish first).
	Added, Replaced, Removed []*Entry
	// Failed are files that could not be registered, each reported once
	// per version of the file (a half-written copy fails until complete).
	Failed []ScanResult
}

// Changed reports whether the sync changed any registration.
func (s SyncResult) Changed() bool { return len(s.Added)+len(s.Replaced)+len(s.Removed) > 0 }

// Sync makes the registry follow the directory, which other processes
// (replicas sharing the volume, an operator) may change: a *.gguf file
// that is new is registered under its name, one that changed is
// registered again as a new generation, and a registration whose file is
// gone is removed. Files are written elsewhere and renamed in (as the
// admin API does) so that a reader never sees half a file; a file that is
// still incomplete fails validation and is retried when it changes.
// Names registered through the API with a path of their own are left to
// the API.
func (r *Registry) Sync() SyncResult {
	var res SyncResult
	matches, _ := filepath.Glob(filepath.Join(r.dir, "*.gguf"))
	sort.Strings(matches)
	present := map[string]bool{}
	for _, p := range matches {
		name := strings.TrimSuffix(filepath.Base(p), ".gguf")
		real, err := r.Resolve(filepath.Base(p))
		if err != nil {
			continue // vanished meanwhile, or a symlink leaving the directory
		}
		present[real] = true
		fi, err := os.Stat(real)
		if err != nil {
			continue
		}
		stamp := stampOf(fi)
		old, exists := r.Get(name)
		if exists && (old.Path != real || old.Stamp == stamp) {
			continue // registered from another path by the API, or unchanged
		}
		r.mu.Lock()
		seen, reported := r.failed[name]
		r.mu.Unlock()
		if reported && seen == stamp {
			continue
		}
		e, err := r.Register(name, real, exists)
		if err != nil {
			r.mu.Lock()
			r.failed[name] = stamp
			r.mu.Unlock()
			res.Failed = append(res.Failed, ScanResult{Path: p, Err: err})
			continue
		}
		r.mu.Lock()
		delete(r.failed, name)
		r.mu.Unlock()
		res.Added = append(res.Added, e)
		if exists {
			res.Replaced = append(res.Replaced, old)
		}
	}
	for _, e := range r.List() {
		if present[e.Path] {
			continue
		}
		if _, err := os.Stat(e.Path); !errors.Is(err, os.ErrNotExist) {
			continue // outside the top level (an API path), still there
		}
		if r.RemoveEntry(e) {
			res.Removed = append(res.Removed, e)
		}
	}
	return res
}

// RemoveEntry unregisters e if it is still the current registration of
// its name.
func (r *Registry) RemoveEntry(e *Entry) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.entries[e.Name]; ok && cur.Gen == e.Gen {
		delete(r.entries, e.Name)
		e.Release()
		return true
	}
	return false
}

// CanonicalPath is the file an adapter named name has in the directory
// (<dir>/<name>.gguf): the file every replica sharing the directory
// registers under that name.
func (r *Registry) CanonicalPath(name string) string {
	return filepath.Join(r.dir, name+".gguf")
}
