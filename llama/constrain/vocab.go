package constrain

import (
	"bytes"
	"sort"
)

// Vocab is a vocabulary's token texts as a byte trie, so that a mask walks
// each shared prefix once and drops a whole subtree at its first rejected
// byte.
type Vocab struct {
	nodes  []trieNode
	tokens []int32 // token ids in byte order; a node's tokens are tokens[lo:hi]
	size   int
}

type trieNode struct {
	first, next int32 // first child, next sibling; -1 for none
	lo, hi      int32
	b           byte
}

// NewVocab builds the trie of pieces, indexed by token id. A token with an
// empty piece (control tokens) is never allowed by a mask.
func NewVocab(pieces [][]byte) *Vocab {
	ids := make([]int32, 0, len(pieces))
	for id, p := range pieces {
		if len(p) > 0 {
			ids = append(ids, int32(id))
		}
	}
	sort.SliceStable(ids, func(a, b int) bool { return bytes.Compare(pieces[ids[a]], pieces[ids[b]]) < 0 })
	v := &Vocab{tokens: ids, size: len(pieces), nodes: []trieNode{{first: -1, next: -1}}}
	last := []int32{-1} // last child of each node, while building
	path := []int32{0}
	var prev []byte
	for i, id := range ids {
		p := pieces[id]
		c := 0
		for c < len(p) && c < len(prev) && p[c] == prev[c] {
			c++
		}
		if c == len(p) && c == len(prev) { // the same text as the previous token
			v.nodes[path[len(path)-1]].hi++
			continue
		}
		path = path[:c+1]
		for _, b := range p[c:] {
			parent := path[len(path)-1]
			n := int32(len(v.nodes))
			v.nodes = append(v.nodes, trieNode{b: b, first: -1, next: -1})
			last = append(last, -1)
			if last[parent] < 0 {
				v.nodes[parent].first = n
			} else {
				v.nodes[last[parent]].next = n
			}
			last[parent] = n
			path = append(path, n)
		}
		end := &v.nodes[path[len(path)-1]]
		end.lo, end.hi = int32(i), int32(i+1)
		prev = p
	}
	return v
}

// Size is the number of token ids.
func (v *Vocab) Size() int { return v.size }

// Mask computes which tokens may come next. It keeps scratch space, so
// each request needs its own.
type Mask struct {
	v       *Vocab
	m       *Matcher
	levels  []State
	scratch []frame
}

// NewMask returns a mask for m over v.
func NewMask(v *Vocab, m *Matcher) *Mask { return &Mask{v: v, m: m} }

// Fill sets allowed[t] for every token t whose text s accepts and clears
// the rest; it returns how many are allowed. End of text is not a token
// here: ask the matcher's CanEnd.
func (k *Mask) Fill(s *State, allowed []bool) int {
	clear(allowed)
	if len(k.levels) == 0 {
		k.levels = make([]State, 1, 64)
	}
	k.levels[0].frames = append(k.levels[0].frames[:0], s.frames...)
	k.levels[0].starts = append(k.levels[0].starts[:0], s.starts...)
	return k.walk(0, 0, allowed)
}

func (k *Mask) walk(node int32, depth int, allowed []bool) int {
	if depth+1 >= len(k.levels) {
		k.levels = append(k.levels, State{})
	}
	count := 0
	for c := k.v.nodes[node].first; c >= 0; c = k.v.nodes[c].next {
		n := &k.v.nodes[c]
		next := &k.levels[depth+1]
		next.reset()
		k.scratch = k.m.step(&k.levels[depth], n.b, next, k.scratch)
		if next.Dead() {
			continue
		}
		for _, t := range k.v.tokens[n.lo:n.hi] {
			allowed[t] = true
			count++
		}
		count += k.walk(c, depth+1, allowed)
	}
	return count
}
