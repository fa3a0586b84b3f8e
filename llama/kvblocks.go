package llama

import (
	"container/list"
	"encoding/binary"
	"hash/maphash"
)

// blockKey identifies the content of a full KV block: its tokens, every
// token before it (through the parent's key) and the adapter set that
// computed it (the salt). 128 bits from two independently seeded hashes, so
// collisions are out of reach even for a client that picks its prompts.
type blockKey struct{ a, b uint64 }

var keySeedA, keySeedB = maphash.MakeSeed(), maphash.MakeSeed()

func nextBlockKey(parent blockKey, salt uint64, tokens []int32) blockKey {
	buf := make([]byte, 24+4*len(tokens))
	binary.LittleEndian.PutUint64(buf[0:], parent.a)
	binary.LittleEndian.PutUint64(buf[8:], parent.b)
	binary.LittleEndian.PutUint64(buf[16:], salt)
	for i, t := range tokens {
		binary.LittleEndian.PutUint32(buf[24+4*i:], uint32(t))
	}
	return blockKey{maphash.Bytes(keySeedA, buf), maphash.Bytes(keySeedB, buf)}
}

// blockAllocator is the host-side bookkeeping of the KV pool: which blocks
// are free, which sequences hold which blocks, and the prefix cache (full
// blocks kept after their sequences end, found again by content).
//
// A block is in exactly one of three states:
//   - free: on the free list, holds nothing useful;
//   - held: refs > 0 (one or more sequences read it; only its first holder,
//     while it is still partial, writes to it);
//   - cached: refs == 0 but its content is registered under its key; it sits
//     on the LRU list and is reused by a matching prefix or evicted (least
//     recently released first) when free blocks run out.
//
// Held blocks may be registered too (a running sequence's full blocks are
// shared with new sequences that have the same prefix). Registered blocks
// are never written again: sequences only write at their own end, which is
// always in a block they alone hold.
type blockAllocator struct {
	size    int // tokens per block
	caching bool
	refs    []int32
	free    []int32
	key     []blockKey
	salt    []uint64
	indexed []bool // key[b] is registered in byKey
	byKey   map[blockKey]int32
	bySalt  map[uint64]map[int32]struct{}
	lru     *list.List // cached blocks with refs == 0, least recent first
	elem    []*list.Element
	stats   PoolStats
}

// PoolStats counts prefix-cache lookups in tokens.
type PoolStats struct {
	// PrefixQueried is the number of prompt tokens looked up in the prefix
	// cache; PrefixHit of those were found and not recomputed.
	PrefixQueried, PrefixHit int64
	// Evicted counts cached blocks reclaimed for new tokens.
	Evicted int64
}

func newBlockAllocator(blocks, size int, caching bool) *blockAllocator {
	a := &blockAllocator{size: size, caching: caching, refs: make([]int32, blocks), key: make([]blockKey, blocks),
		salt: make([]uint64, blocks), indexed: make([]bool, blocks), byKey: map[blockKey]int32{},
		bySalt: map[uint64]map[int32]struct{}{}, lru: list.New(), elem: make([]*list.Element, blocks)}
	// Hand out low block numbers first (LIFO from the end of the slice).
	for b := blocks - 1; b >= 0; b-- {
		a.free = append(a.free, int32(b))
	}
	return a
}

func (a *blockAllocator) blocks() int { return len(a.refs) }

// available is how many blocks can be taken now: free plus evictable.
func (a *blockAllocator) available() int { return len(a.free) + a.lru.Len() }

// held is how many blocks sequences hold.
func (a *blockAllocator) held() int { return a.blocks() - a.available() }

// cachedBlocks is how many blocks hold registered content (held or not).
func (a *blockAllocator) cachedBlocks() int { return len(a.byKey) }

// take returns a block for writing, evicting the least recently used cached
// block when none is free; false when every block is held.
func (a *blockAllocator) take() (int32, bool) {
	if n := len(a.free); n > 0 {
		b := a.free[n-1]
		a.free = a.free[:n-1]
		a.refs[b] = 1
		return b, true
	}
	e := a.lru.Front()
	if e == nil {
		return 0, false
	}
	b := e.Value.(int32)
	a.unindex(b)
	a.lru.Remove(e)
	a.elem[b] = nil
	a.refs[b] = 1
	a.stats.Evicted++
	return b, true
}

// hold adds a reference to a registered block found by its key.
func (a *blockAllocator) hold(b int32) {
	if a.refs[b] == 0 && a.elem[b] != nil {
		a.lru.Remove(a.elem[b])
		a.elem[b] = nil
	}
	a.refs[b]++
}

// release drops one reference; an unreferenced block becomes cached (if
// registered) or free.
func (a *blockAllocator) release(b int32) {
	a.refs[b]--
	if a.refs[b] > 0 {
		return
	}
	if a.refs[b] < 0 {
		panic("llama: KV block released more often than held")
	}
	if a.indexed[b] {
		a.elem[b] = a.lru.PushBack(b)
		return
	}
	a.free = append(a.free, b)
}

// register records that block b holds the content named by key (computed
// with salt). A key already registered to another block is left alone: two
// sequences computed the same prefix at the same time, and one copy is
// enough.
func (a *blockAllocator) register(b int32, key blockKey, salt uint64) {
	if !a.caching || a.indexed[b] {
		return
	}
	if _, dup := a.byKey[key]; dup {
		return
	}
	a.byKey[key] = b
	a.key[b], a.salt[b], a.indexed[b] = key, salt, true
	set := a.bySalt[salt]
	if set == nil {
		set = map[int32]struct{}{}
		a.bySalt[salt] = set
	}
	set[b] = struct{}{}
}

func (a *blockAllocator) unindex(b int32) {
	if !a.indexed[b] {
		return
	}
	delete(a.byKey, a.key[b])
	if set := a.bySalt[a.salt[b]]; set != nil {
		delete(set, b)
		if len(set) == 0 {
			delete(a.bySalt, a.salt[b])
		}
	}
	a.indexed[b] = false
}

// invalidate forgets every cached block computed with salt: unheld ones
// become free at once, held ones when their last holder releases them.
func (a *blockAllocator) invalidate(salt uint64) int {
	set := a.bySalt[salt]
	n := 0
	for b := range set {
		a.unindex(b)
		if a.refs[b] == 0 && a.elem[b] != nil {
			a.lru.Remove(a.elem[b])
			a.elem[b] = nil
			a.free = append(a.free, b)
		}
		n++
	}
	return n
}

// lookup finds a registered block by key.
func (a *blockAllocator) lookup(key blockKey) (int32, bool) {
	b, ok := a.byKey[key]
	return b, ok
}
