package adapters

import (
	"container/list"
	"errors"
	"fmt"
)

// ErrNoSlot means every bank slot an adapter needs is held by adapters in
// use by running requests.
var ErrNoSlot = errors.New("all adapter slots are in use")

// Residency tracks the adapters that hold slots of a bounded device bank:
// those resident and ready, and those still being loaded. Ready adapters
// that no request holds (pins) are kept in least-recently-used order and
// evicted first. H is the bank's handle. Not safe for concurrent use: the
// engine's goroutine owns it.
type Residency[H any] struct {
	entries map[Key]*residentEntry[H]
	lru     *list.List // ready, unpinned or not, least recently used first
	unload  func(H)
	// Loads and Evictions count completed loads and evictions.
	Loads, Evictions int
}

type residentEntry[H any] struct {
	handle  H
	ready   bool
	pins    int
	dropped bool // unregistered: unload when the last pin goes (or the load ends)
	elem    *list.Element
}

// NewResidency returns an empty tracker; unload frees a handle's slots.
func NewResidency[H any](unload func(H)) *Residency[H] {
	return &Residency[H]{entries: map[Key]*residentEntry[H]{}, lru: list.New(), unload: unload}
}

// State reports whether k holds slots (present) and whether it is loaded.
func (r *Residency[H]) State(k Key) (present, ready bool) {
	e, ok := r.entries[k]
	return ok, ok && e.ready
}

// Handle returns k's handle, ready or loading.
func (r *Residency[H]) Handle(k Key) (H, bool) {
	e, ok := r.entries[k]
	if !ok {
		var zero H
		return zero, false
	}
	return e.handle, true
}

// Pin marks a ready adapter as used by one more request and returns its
// handle; every Pin needs one Release.
func (r *Residency[H]) Pin(k Key) H {
	e, ok := r.entries[k]
	if !ok || !e.ready {
		panic(fmt.Sprintf("adapters: pin of %v, which is not resident", k))
	}
	e.pins++
	r.lru.MoveToBack(e.elem)
	return e.handle
}

// Release unpins k; a dropped adapter is unloaded with its last pin.
func (r *Residency[H]) Release(k Key) {
	e, ok := r.entries[k]
	if !ok || e.pins == 0 {
		panic(fmt.Sprintf("adapters: release of %v, which is not pinned", k))
	}
	e.pins--
	if e.pins == 0 && e.dropped {
		r.remove(k, e)
	}
}

// Loading records that k holds slots (handle h) while its data is loaded.
func (r *Residency[H]) Loading(k Key, h H) {
	if _, ok := r.entries[k]; ok {
		panic(fmt.Sprintf("adapters: %v is already resident", k))
	}
	r.entries[k] = &residentEntry[H]{handle: h}
}

// Loaded marks a loading adapter ready; it reports false (and unloads it)
// when the adapter was dropped meanwhile.
func (r *Residency[H]) Loaded(k Key) bool {
	e, ok := r.entries[k]
	if !ok || e.ready {
		return false
	}
	if e.dropped {
		r.remove(k, e)
		return false
	}
	e.ready = true
	e.elem = r.lru.PushBack(k)
	r.Loads++
	return true
}

// Failed forgets a loading adapter whose load failed, unloading it.
func (r *Residency[H]) Failed(k Key) {
	if e, ok := r.entries[k]; ok && !e.ready {
		r.remove(k, e)
	}
}

// Evict unloads the least recently used ready adapter that no request
// holds, is not protected and helps (frees a slot the caller needs); it
// reports whether it found one.
func (r *Residency[H]) Evict(protected func(Key) bool, helps func(H) bool) bool {
	for el := r.lru.Front(); el != nil; el = el.Next() {
		k := el.Value.(Key)
		e := r.entries[k]
		if e.pins > 0 || protected(k) || !helps(e.handle) {
			continue
		}
		r.remove(k, e)
		r.Evictions++
		return true
	}
	return false
}

// Drop unloads k now, or when its last request finishes or its load ends.
func (r *Residency[H]) Drop(k Key) {
	e, ok := r.entries[k]
	if !ok {
		return
	}
	if e.pins > 0 || !e.ready {
		e.dropped = true
		return
	}
	r.remove(k, e)
}

func (r *Residency[H]) remove(k Key, e *residentEntry[H]) {
	if e.elem != nil {
		r.lru.Remove(e.elem)
	}
	delete(r.entries, k)
	r.unload(e.handle)
}

// Len is the number of adapters holding slots (ready or loading).
func (r *Residency[H]) Len() int { return len(r.entries) }

// Ready lists the ready adapters, least recently used first.
func (r *Residency[H]) Ready() []Key {
	out := make([]Key, 0, r.lru.Len())
	for el := r.lru.Front(); el != nil; el = el.Next() {
		out = append(out, el.Value.(Key))
	}
	return out
}
