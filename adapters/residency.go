package adapters

import (
	"errors"
	"fmt"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// ErrNoSlot means every resident adapter is in use by a running request.
var ErrNoSlot = errors.New("all adapter slots are in use")

// Residency keeps at most Capacity adapters loaded on the device, evicting
// the least recently used one that no request holds. H is the device
// handle the loader returns. Not safe for concurrent use: the engine's
// goroutine owns it.
type Residency[H any] struct {
	lru      *simplelru.LRU[Key, *resident[H]]
	unload   func(H)
	capacity int
	// Stats
	Loads, Evictions int
}

type resident[H any] struct {
	handle  H
	pins    int
	dropped bool // unregistered: unload when the last pin goes
}

// NewResidency returns an empty residency of the given capacity.
func NewResidency[H any](capacity int, unload func(H)) (*Residency[H], error) {
	// The LRU is sized above capacity so that Add never evicts on its own:
	// eviction must skip pinned adapters, which simplelru cannot know.
	l, err := simplelru.NewLRU[Key, *resident[H]](capacity+1, nil)
	if err != nil {
		return nil, err
	}
	return &Residency[H]{lru: l, unload: unload, capacity: capacity}, nil
}

// Acquire pins the adapter k, loading it with load when absent (evicting an
// unpinned one if full). Every successful Acquire needs one Release.
func (r *Residency[H]) Acquire(k Key, load func() (H, error)) (H, error) {
	if res, ok := r.lru.Get(k); ok {
		res.pins++
		return res.handle, nil
	}
	var zero H
	if r.lru.Len() >= r.capacity && !r.evictOne() {
		return zero, ErrNoSlot
	}
	h, err := load()
	if err != nil {
		return zero, err
	}
	r.Loads++
	r.lru.Add(k, &resident[H]{handle: h, pins: 1})
	return h, nil
}

// Resident reports whether k is loaded.
func (r *Residency[H]) Resident(k Key) bool { return r.lru.Contains(k) }

// Release unpins k; a dropped adapter is unloaded with its last pin.
func (r *Residency[H]) Release(k Key) {
	res, ok := r.lru.Peek(k)
	if !ok {
		panic(fmt.Sprintf("adapters: release of non-resident %v", k))
	}
	res.pins--
	if res.pins == 0 && res.dropped {
		r.lru.Remove(k)
		r.unload(res.handle)
	}
}

// Drop unloads k now, or when the last request using it finishes.
func (r *Residency[H]) Drop(k Key) {
	res, ok := r.lru.Peek(k)
	if !ok {
		return
	}
	if res.pins > 0 {
		res.dropped = true
		return
	}
	r.lru.Remove(k)
	r.unload(res.handle)
}

// Len is the number of resident adapters.
func (r *Residency[H]) Len() int { return r.lru.Len() }

// Keys lists resident adapters, least recently used first.
func (r *Residency[H]) Keys() []Key { return r.lru.Keys() }

func (r *Residency[H]) evictOne() bool {
	for _, k := range r.lru.Keys() {
		res, _ := r.lru.Peek(k)
		if res.pins == 0 {
			r.lru.Remove(k)
			r.unload(res.handle)
			r.Evictions++
			return true
		}
	}
	return false
}
