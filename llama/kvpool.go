package llama

import (
	"errors"
	"fmt"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
)

// KVPool is the KV cache: one pool of fixed-size blocks shared by every
// sequence. A sequence holds the blocks its tokens fill (prompt plus what
// it has generated), grown a block at a time, not a whole context; full
// blocks are shared between sequences with the same prefix and the same
// adapters (prefix caching), and stay cached after their sequences end
// until their blocks are needed.
//
// Attention reads each sequence's own blocks — in place through block
// tables on the CPU, gathered into a contiguous buffer for the step on a
// GPU — so decode costs the sum of the sequences' lengths, never the
// length of the whole pool.
//
// Not safe for concurrent use; the engine's goroutine owns it.
type KVPool struct {
	// BlockSize is the number of tokens per block.
	BlockSize int
	DType     ml.DType
	kvDim     int
	ctx       ml.Context
	// keys and values per layer: [kvDim, blocks·BlockSize].
	keys, values []ml.Tensor
	// paged marks the layers whose attention reads the pool in place
	// (host memory: ggmlx.PagedAttention); the others gather.
	paged []bool
	alloc *blockAllocator
}

// DefaultBlockSize is the KV block size in tokens: small enough that a
// sequence wastes little of its last block, large enough that block tables
// and gathers stay short.
const DefaultBlockSize = 32

// ErrPoolFull means the KV pool has no block left for the request.
var ErrPoolFull = errors.New("KV pool full")

func newKVPool(m *Model, blocks, blockSize int, dtype ml.DType, prefixCache, gatherAttention bool) (p *KVPool, err error) {
	if blocks <= 0 || blockSize <= 0 {
		return nil, fmt.Errorf("KV pool needs positive blocks and block size, got %d × %d", blocks, blockSize)
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("allocating a KV pool of %d tokens: %v", blocks*blockSize, r)
		}
	}()
	p = &KVPool{BlockSize: blockSize, DType: dtype, kvDim: m.Params.KVDim(), alloc: newBlockAllocator(blocks, blockSize, prefixCache)}
	p.ctx = m.Backend().NewContextSize(2 * len(m.Layers))
	for i := range m.Layers {
		lc := p.ctx.Layer(i)
		p.keys = append(p.keys, lc.Zeros(dtype, p.kvDim, blocks*blockSize))
		p.values = append(p.values, lc.Zeros(dtype, p.kvDim, blocks*blockSize))
		p.paged = append(p.paged, !gatherAttention && m.Params.HeadDim <= ggmlx.PagedHeadDimLimit && ggmlx.PagedOK(p.keys[i], p.values[i]))
	}
	return p, nil
}

// readModes reports whether some layers read the pool in place and
// whether some gather.
func (p *KVPool) readModes() (paged, gathered bool) {
	for _, in := range p.paged {
		paged = paged || in
		gathered = gathered || !in
	}
	return paged, gathered
}

func (p *KVPool) close() { p.ctx.Close() }

// Tokens is the pool's capacity in tokens.
func (p *KVPool) Tokens() int { return p.alloc.blocks() * p.BlockSize }

// Blocks is the pool's capacity in blocks.
func (p *KVPool) Blocks() int { return p.alloc.blocks() }

// FreeBlocks is how many blocks a sequence can take now (free, or cached
// and not held, which are evicted on demand).
func (p *KVPool) FreeBlocks() int { return p.alloc.available() }

// HeldBlocks is how many blocks sequences hold.
func (p *KVPool) HeldBlocks() int { return p.alloc.held() }

// CachedBlocks is how many blocks hold registered prefix content.
func (p *KVPool) CachedBlocks() int { return p.alloc.cachedBlocks() }

// Stats returns the prefix cache counters.
func (p *KVPool) Stats() PoolStats { return p.alloc.stats }

// BytesPerToken is the memory one cached token takes (all layers, K and V).
func BytesPerToken(c Config, dtype ml.DType) int {
	es := 2
	if dtype == ml.DTypeF32 {
		es = 4
	}
	return 2 * c.Layers * c.KVDim() * es
}

// BlocksFor is the number of blocks n tokens occupy.
func (p *KVPool) BlocksFor(n int) int { return blocksFor(n, p.BlockSize) }

// blocksFor is the number of blocks of size tokens that n tokens occupy.
func blocksFor(n, size int) int { return (n + size - 1) / size }

// SeqKV is one sequence's share of the pool: its block table and the tokens
// whose keys and values are cached.
type SeqKV struct {
	pool   *KVPool
	salt   uint64
	blocks []int32
	tokens []int32
	chain  []blockKey // key of each full block, in order
}

// NewSeq starts an empty sequence. salt names the adapter set whose tokens
// it caches (0 for the base model): prefixes are shared only between
// sequences with the same salt.
func (p *KVPool) NewSeq(salt uint64) *SeqKV { return &SeqKV{pool: p, salt: salt} }

// Len is the number of cached tokens (the position of the next token).
func (s *SeqKV) Len() int { return len(s.tokens) }

// Capacity is how many tokens fit in the blocks s holds.
func (s *SeqKV) Capacity() int { return len(s.blocks) * s.pool.BlockSize }

// Blocks is the number of blocks s holds.
func (s *SeqKV) Blocks() int { return len(s.blocks) }

// MatchPrefix attaches the longest run of cached full blocks that begins
// prompt and returns how many tokens it covers. The last prompt token is
// never covered (its logits must be computed). Only for an empty sequence.
func (s *SeqKV) MatchPrefix(prompt []int32) int {
	if len(s.tokens) != 0 || len(s.blocks) != 0 {
		panic("llama: MatchPrefix on a sequence that already holds tokens")
	}
	a, bs := s.pool.alloc, s.pool.BlockSize
	a.stats.PrefixQueried += int64(len(prompt))
	var parent blockKey
	for (len(s.blocks)+1)*bs <= len(prompt)-1 {
		i := len(s.blocks)
		key := nextBlockKey(parent, s.salt, prompt[i*bs:(i+1)*bs])
		b, ok := a.lookup(key)
		if !ok {
			break
		}
		a.hold(b)
		s.blocks = append(s.blocks, b)
		s.chain = append(s.chain, key)
		parent = key
	}
	n := len(s.blocks) * bs
	s.tokens = append(s.tokens, prompt[:n]...)
	a.stats.PrefixHit += int64(n)
	return n
}

// Reserve makes room for n more tokens, taking blocks (and evicting cached
// ones) as needed; it takes nothing and returns ErrPoolFull when the pool
// cannot hold them.
func (s *SeqKV) Reserve(n int) error {
	need := s.pool.BlocksFor(len(s.tokens)+n) - len(s.blocks)
	if need <= 0 {
		return nil
	}
	a := s.pool.alloc
	if a.available() < need {
		return ErrPoolFull
	}
	for i := 0; i < need; i++ {
		b, _ := a.take()
		s.blocks = append(s.blocks, b)
	}
	return nil
}

// Release returns every block s holds to the pool (full blocks stay in the
// prefix cache until needed) and empties s.
func (s *SeqKV) Release() {
	for _, b := range s.blocks {
		s.pool.alloc.release(b)
	}
	s.blocks, s.tokens, s.chain = nil, nil, nil
}

// commit records that tokens were written at the end of s, registering the
// blocks they complete in the prefix cache.
func (s *SeqKV) commit(tokens []int32) {
	s.tokens = append(s.tokens, tokens...)
	bs := s.pool.BlockSize
	for full := len(s.tokens) / bs; len(s.chain) < full; {
		i := len(s.chain)
		var parent blockKey
		if i > 0 {
			parent = s.chain[i-1]
		}
		key := nextBlockKey(parent, s.salt, s.tokens[i*bs:(i+1)*bs])
		s.chain = append(s.chain, key)
		s.pool.alloc.register(s.blocks[i], key, s.salt)
	}
}

// Fork returns a new sequence with the same cached tokens: full blocks are
// shared, the partial last block is copied (so each may go on writing).
func (s *SeqKV) Fork() (*SeqKV, error) {
	a, bs := s.pool.alloc, s.pool.BlockSize
	c := &SeqKV{pool: s.pool, salt: s.salt, tokens: append([]int32(nil), s.tokens...), chain: append([]blockKey(nil), s.chain...)}
	full := len(s.tokens) / bs
	partial := len(s.tokens)%bs != 0
	if partial && a.available() == 0 {
		return nil, ErrPoolFull
	}
	for i := 0; i < full; i++ {
		a.hold(s.blocks[i])
		c.blocks = append(c.blocks, s.blocks[i])
	}
	if partial {
		b, _ := a.take()
		s.pool.copyBlock(s.blocks[full], b)
		c.blocks = append(c.blocks, b)
	}
	// Blocks s reserved beyond its tokens stay with s; c reserves its own.
	return c, nil
}

// Invalidate drops the cached blocks computed with salt (an adapter was
// replaced or removed): they can never match again.
func (p *KVPool) Invalidate(salt uint64) int { return p.alloc.invalidate(salt) }

// copyBlock copies block src's keys and values to block dst in every layer.
func (p *KVPool) copyBlock(src, dst int32) {
	es := 2
	if p.DType == ml.DTypeF32 {
		es = 4
	}
	n := p.kvDim * p.BlockSize * es
	buf := make([]byte, n)
	for l := range p.keys {
		for _, t := range []ml.Tensor{p.keys[l], p.values[l]} {
			ggmlx.ReadAt(t, int(src)*n, buf)
			ggmlx.WriteAt(t, int(dst)*n, buf)
		}
	}
}

// rowOf is the pool row holding position pos of s.
func (s *SeqKV) rowOf(pos int) int32 {
	bs := s.pool.BlockSize
	return s.blocks[pos/bs]*int32(bs) + int32(pos%bs)
}
