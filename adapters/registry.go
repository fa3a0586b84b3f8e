package adapters

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// Entry is a registered adapter: a name bound to a validated file. Only the
// metadata stays in memory; the weights are read when it becomes resident.
type Entry struct {
	Name    string
	Path    string // absolute path of the file
	Variant Variant
	Rank    int
	Alpha   float32
	Targets []Module
	Bytes   int
	Created time.Time
	// Gen distinguishes registrations of the same name: re-registering
	// creates a new generation, and requests keep the one they started with.
	Gen uint64
	// Stamp is the version of the file that was validated (Sync compares
	// it with the directory's).
	Stamp FileStamp

	// file stays open while anything uses this registration, so that the
	// version registered is the one loaded even after the file is
	// replaced or deleted (by this process, another replica or by hand).
	// refs counts the registry's hold and every Acquire.
	file *os.File
	refs atomic.Int32
}

// Acquire takes a hold on the registration's file; false when it has
// been released for good (the adapter was removed meanwhile).
func (e *Entry) Acquire() bool {
	for {
		n := e.refs.Load()
		if n <= 0 {
			return false
		}
		if e.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Release drops a hold; the last one closes the file.
func (e *Entry) Release() {
	if e.refs.Add(-1) == 0 && e.file != nil {
		e.file.Close()
	}
}

// OpenReader streams the registered version of the adapter (the caller
// holds the entry, see Acquire).
func (e *Entry) OpenReader() (*Reader, error) {
	if e.file == nil {
		return OpenReader(e.Path)
	}
	f, err := gguf.Read(e.file, e.Stamp.Size)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", e.Path, err)
	}
	return newReader(f, e.Path)
}

// Key identifies one registration.
func (e *Entry) Key() Key { return Key{Name: e.Name, Gen: e.Gen} }

// Key identifies a registration (name + generation).
type Key struct {
	Name string
	Gen  uint64
}

// Registry maps adapter names to files inside one directory. It is safe
// for concurrent use.
type Registry struct {
	mu       sync.RWMutex
	dir      string // absolute, symlinks resolved
	base     *Base
	reserved map[string]bool
	maxRank  int
	entries  map[string]*Entry
	gen      uint64
	failed   map[string]FileStamp // files Sync could not register, by name
}

// RegistryOptions configure a Registry.
type RegistryOptions struct {
	// Reserved names (the base model's) are refused.
	Reserved []string
	// MaxRank refuses adapters of a higher rank (0: no limit): the server
	// could never load them.
	MaxRank int
}

// Errors a caller maps to HTTP statuses.
var (
	ErrNotFound = errors.New("adapter not found")
	ErrExists   = errors.New("adapter already registered")
	ErrBadName  = errors.New("invalid adapter name")
	ErrBadPath  = errors.New("adapter path outside the adapter directory")
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`)

// NewRegistry returns a registry of files under dir (created if missing)
// for adapters of base.
func NewRegistry(dir string, base *Base, opts RegistryOptions) (*Registry, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if abs, err = filepath.EvalSymlinks(abs); err != nil {
		return nil, err
	}
	r := &Registry{dir: abs, base: base, reserved: map[string]bool{}, maxRank: opts.MaxRank, entries: map[string]*Entry{}, failed: map[string]FileStamp{}}
	for _, n := range opts.Reserved {
		r.reserved[n] = true
	}
	return r, nil
}

// Dir is the adapter directory.
func (r *Registry) Dir() string { return r.dir }

// CheckName validates an adapter name.
func (r *Registry) CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit", ErrBadName, name)
	}
	if r.reserved[name] {
		return fmt.Errorf("%w %q: it is the base model's name", ErrBadName, name)
	}
	return nil
}

// CheckRank refuses an adapter above the registry's maximum rank.
func (r *Registry) CheckRank(a *Adapter) error {
	if r.maxRank > 0 && a.Rank > r.maxRank {
		return invalid("adapter has rank %d, above the server's maximum rank %d (--max-rank)", a.Rank, r.maxRank)
	}
	return nil
}

// Resolve maps a path relative to the adapter directory to an absolute
// path inside it, refusing absolute paths, ".." and symlinks that leave it.
func (r *Registry) Resolve(rel string) (string, error) {
	if rel == "" || filepath.IsAbs(rel) || strings.HasPrefix(rel, "~") {
		return "", fmt.Errorf("%w: %q must be relative to the adapter directory", ErrBadPath, rel)
	}
	clean := filepath.Clean(rel)
	if clean == ".." || strings.HasPrefix(clean, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("%w: %q", ErrBadPath, rel)
	}
	full := filepath.Join(r.dir, clean)
	real, err := filepath.EvalSymlinks(full)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%w: %s", ErrNotFound, rel)
		}
		return "", err
	}
	if real != r.dir && !strings.HasPrefix(real, r.dir+string(filepath.Separator)) {
		return "", fmt.Errorf("%w: %q resolves outside it", ErrBadPath, rel)
	}
	return real, nil
}

// Register validates the file at path (absolute, inside the directory) and
// binds name to it. With replace, an existing name gets a new generation;
// otherwise an existing name is ErrExists.
func (r *Registry) Register(name, path string, replace bool) (*Entry, error) {
	if err := r.CheckName(name); err != nil {
		return nil, err
	}
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	e, err := r.validate(name, path, fh)
	if err != nil {
		fh.Close()
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old, ok := r.entries[name]
	if ok && !replace {
		fh.Close()
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	r.gen++
	e.Gen = r.gen
	r.entries[name] = e
	if ok {
		old.Release()
	}
	return e, nil
}

// validate reads and checks the adapter in fh (open, at path).
func (r *Registry) validate(name, path string, fh *os.File) (*Entry, error) {
	fi, err := fh.Stat()
	if err != nil {
		return nil, err
	}
	f, err := gguf.Read(fh, fi.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	a, err := decode(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := a.Resolve(r.base); err != nil {
		return nil, err
	}
	if err := r.CheckRank(a); err != nil {
		return nil, err
	}
	e := &Entry{Name: name, Path: path, Variant: a.Variant, Rank: a.Rank, Alpha: a.Alpha, Targets: a.Targets(),
		Bytes: a.Bytes(), Created: time.Now(), Stamp: stampOf(fi), file: fh}
	e.refs.Store(1)
	return e, nil
}

// Get returns the current registration of name.
func (r *Registry) Get(name string) (*Entry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	e, ok := r.entries[name]
	return e, ok
}

// Remove unregisters name and returns the removed entry.
func (r *Registry) Remove(name string) (*Entry, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	delete(r.entries, name)
	e.Release()
	return e, nil
}

// List returns all entries sorted by name.
func (r *Registry) List() []*Entry {
	r.mu.RLock()
	out := make([]*Entry, 0, len(r.entries))
	for _, e := range r.entries {
		out = append(out, e)
	}
	r.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Len is the number of registered adapters.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.entries)
}

// ScanResult reports one file of a directory scan.
type ScanResult struct {
	Path  string
	Entry *Entry
	Err   error
}

// Scan registers every *.gguf file in the directory (not recursing), named
// after the file without its extension. Invalid files are reported, not
// fatal.
func (r *Registry) Scan() []ScanResult {
	matches, _ := filepath.Glob(filepath.Join(r.dir, "*.gguf"))
	sort.Strings(matches)
	var out []ScanResult
	for _, p := range matches {
		name := strings.TrimSuffix(filepath.Base(p), ".gguf")
		real, err := r.Resolve(filepath.Base(p))
		var e *Entry
		if err == nil {
			e, err = r.Register(name, real, false)
		}
		out = append(out, ScanResult{Path: p, Entry: e, Err: err})
	}
	return out
}
