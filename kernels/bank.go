package kernels

import (
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
)

// MaxCompose is the most adapters one sequence may use at once.
const MaxCompose = 4

// Config sizes a Bank.
type Config struct {
	// Slots is the number of adapters of each variant that can be resident.
	Slots int
	// MaxRank is the largest adapter rank the bank accepts.
	MaxRank int
}

// Bank holds resident adapters on the device, stacked per variant and
// target module. It is not safe for concurrent use: the engine calls it
// from its own goroutine, between steps.
type Bank struct {
	backend ml.Backend
	base    *adapters.Base
	cfg     Config
	stacks  map[stackKey]*stack
	slots   map[adapters.Variant][]*Resident // index = slot; nil = free; slot 0 unused
}

type stackKey struct {
	variant adapters.Variant
	target  adapters.Target
}

// stack is one target module's stacked weights for one variant, with
// Slots+1 slots (slot 0 stays zero).
type stack struct {
	ctx     ml.Context
	in, out int
	idx     ml.Tensor // I32 [maxRank, slots]          (FA, FB)
	a       ml.Tensor // F32 [in, maxRank, slots]      (FB, LoRA)
	b       ml.Tensor // F32 [maxRank, out, slots]     (FA, LoRA)
	dirty   []bool    // slot holds non-zero data
}

// Resident is an adapter loaded into a Bank slot.
type Resident struct {
	Adapter *adapters.Adapter
	variant adapters.Variant
	slot    int
	rank    int
	scale   float32 // alpha/rank
	targets map[adapters.Target]bool
	bank    *Bank
}

// Slot is the resident's slot number within its variant's stacks.
func (r *Resident) Slot() int { return r.slot }

// NewBank creates an empty bank for models shaped like base.
func NewBank(backend ml.Backend, base *adapters.Base, cfg Config) (*Bank, error) {
	if cfg.Slots <= 0 || cfg.MaxRank <= 0 {
		return nil, fmt.Errorf("kernels: bank needs positive slots and max rank, got %+v", cfg)
	}
	return &Bank{
		backend: backend,
		base:    base,
		cfg:     cfg,
		stacks:  map[stackKey]*stack{},
		slots: map[adapters.Variant][]*Resident{
			adapters.FA:   make([]*Resident, cfg.Slots+1),
			adapters.FB:   make([]*Resident, cfg.Slots+1),
			adapters.LoRA: make([]*Resident, cfg.Slots+1),
		},
	}, nil
}

// Free reports how many more adapters of variant v fit.
func (b *Bank) Free(v adapters.Variant) int {
	n := 0
	for _, r := range b.slots[v][1:] {
		if r == nil {
			n++
		}
	}
	return n
}

// Load copies a resolved adapter into a free slot.
func (b *Bank) Load(a *adapters.Adapter) (res *Resident, err error) {
	if err := a.ValidateFor(b.base); err != nil {
		return nil, err
	}
	if a.Rank > b.cfg.MaxRank {
		return nil, fmt.Errorf("adapter %q has rank %d, above the server's maximum rank %d", a.Name, a.Rank, b.cfg.MaxRank)
	}
	slots := b.slots[a.Variant]
	slot := slices.Index(slots[1:], nil) + 1
	if slot == 0 {
		return nil, fmt.Errorf("no free %s adapter slot (all %d in use)", a.Variant, b.cfg.Slots)
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("loading adapter %q: %v", a.Name, p)
		}
	}()
	res = &Resident{Adapter: a, variant: a.Variant, slot: slot, rank: a.Rank, scale: a.Scale(), targets: map[adapters.Target]bool{}, bank: b}
	for _, m := range a.Modules {
		st, err := b.stackFor(a.Variant, m.Target)
		if err != nil {
			return nil, err
		}
		st.write(a.Variant, slot, a.Rank, b.cfg.MaxRank, m)
		res.targets[m.Target] = true
	}
	// Clear leftovers of a previous occupant in modules this adapter skips.
	for key, st := range b.stacks {
		if key.variant == a.Variant && !res.targets[key.target] && st.dirty[slot] {
			st.clear(slot, b.cfg.MaxRank)
		}
	}
	slots[slot] = res
	return res, nil
}

// Unload frees the adapter's slot. Steps routed afterwards must not use it.
func (b *Bank) Unload(r *Resident) {
	if r == nil || r.bank != b || b.slots[r.variant][r.slot] != r {
		return
	}
	b.slots[r.variant][r.slot] = nil
}

// Close frees every stack.
func (b *Bank) Close() {
	for _, st := range b.stacks {
		st.ctx.Close()
	}
	b.stacks = map[stackKey]*stack{}
}

func (b *Bank) stackFor(v adapters.Variant, t adapters.Target) (*stack, error) {
	key := stackKey{v, t}
	if st, ok := b.stacks[key]; ok {
		return st, nil
	}
	in, out, ok := b.base.Shape(t)
	if !ok {
		return nil, fmt.Errorf("base model has no weight for %s", t)
	}
	n := b.cfg.Slots + 1
	r := b.cfg.MaxRank
	ctx := b.backend.NewContextSize(4).Layer(t.Layer)
	st := &stack{ctx: ctx, in: in, out: out, dirty: make([]bool, n)}
	if v != adapters.LoRA {
		st.idx = ctx.Zeros(ml.DTypeI32, r, n)
		// Slot 0 and free slots hold distinct indices 0..r-1 so that an
		// FB scatter with a zero update never collides with itself.
		limit := out
		if v == adapters.FA {
			limit = in
		}
		pad := make([]int32, r)
		for i := range pad {
			pad[i] = int32(i % limit)
		}
		for s := 0; s < n; s++ {
			ggmlx.WriteInts(st.idx, s*r, pad)
		}
	}
	if v != adapters.FA {
		st.a = ctx.Zeros(ml.DTypeF32, in, r, n)
	}
	if v != adapters.FB {
		st.b = ctx.Zeros(ml.DTypeF32, r, out, n)
	}
	b.stacks[key] = st
	return st, nil
}

// write stores module m of a rank-r adapter in slot, padding to maxRank.
func (st *stack) write(v adapters.Variant, slot, r, maxRank int, m *adapters.ModuleWeights) {
	if st.idx != nil {
		limit := st.out
		if v == adapters.FA {
			limit = st.in
		}
		ggmlx.WriteInts(st.idx, slot*maxRank, padIndex(m.Index, maxRank, limit))
	}
	if st.a != nil {
		// A is r×in; the slot holds maxRank rows of in values.
		block := make([]float32, st.in*maxRank)
		copy(block, m.A)
		ggmlx.WriteFloats(st.a, slot*st.in*maxRank, block)
	}
	if st.b != nil {
		// B is out×r; the slot holds out rows of maxRank values.
		block := make([]float32, st.out*maxRank)
		for o := 0; o < st.out; o++ {
			copy(block[o*maxRank:o*maxRank+r], m.B[o*r:(o+1)*r])
		}
		ggmlx.WriteFloats(st.b, slot*st.out*maxRank, block)
	}
	st.dirty[slot] = true
}

func (st *stack) clear(slot, maxRank int) {
	if st.a != nil {
		ggmlx.WriteAt(st.a, slot*st.in*maxRank*4, make([]byte, st.in*maxRank*4))
	}
	if st.b != nil {
		ggmlx.WriteAt(st.b, slot*st.out*maxRank*4, make([]byte, st.out*maxRank*4))
	}
	st.dirty[slot] = false
}

// padIndex extends idx to n distinct indices below limit, choosing the
// smallest unused ones. Distinctness keeps FB's set_rows free of collisions;
// the padded columns of the matrices are zero, so the values never matter.
func padIndex(idx []int32, n, limit int) []int32 {
	out := make([]int32, 0, n)
	out = append(out, idx...)
	used := make(map[int32]bool, len(idx))
	for _, x := range idx {
		used[x] = true
	}
	for c := int32(0); len(out) < n; c++ {
		if int(c) >= limit {
			// Fewer distinct indices than the bank's rank: repeat; only FA
			// can get here (FB ranks never exceed the output width).
			out = append(out, int32(len(out)%limit))
			continue
		}
		if !used[c] {
			out = append(out, c)
		}
	}
	return out
}
