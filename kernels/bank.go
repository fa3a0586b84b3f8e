package kernels

import (
	"errors"
	"fmt"
	"slices"
	"unsafe"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// MaxCompose is the most adapters one sequence may use at once.
const MaxCompose = 4

// Config sizes a Bank.
type Config struct {
	// Slots is the bank's capacity in LoRA-sized slots: it has Slots "A
	// halves" (r×in matrices) and Slots "B halves" (out×r). An FB adapter
	// takes one A half, an FA adapter one B half, a LoRA one of each, so
	// the bank holds between Slots (all LoRA) and 2·Slots (FA and FB)
	// adapters.
	Slots int
	// MaxRank is the largest adapter rank the bank accepts.
	MaxRank int
	// DType stores the matrices: F16 (the default), F32 or Q8_0 (rows that
	// are not whole Q8_0 blocks stay F16).
	DType ml.DType
	// Generic uses ggml's standard ops (mul_mat_id, get_rows, set_rows)
	// everywhere, as on GPU backends, instead of the fused CPU ops.
	Generic bool
}

func (c Config) dtype() ml.DType {
	if c.DType == ml.DTypeOther {
		return ml.DTypeF16
	}
	return c.DType
}

// half is one of the two kinds of slot.
type half int

const (
	halfA half = iota // r×in: FB's A, LoRA's A
	halfB             // out×r: FA's B, LoRA's B
)

// halves lists the halves an adapter of variant v occupies.
func halves(v adapters.Variant) []half {
	switch v {
	case adapters.FA:
		return []half{halfB}
	case adapters.FB:
		return []half{halfA}
	}
	return []half{halfA, halfB}
}

// Bank holds resident adapters on the device: for every projection of the
// base model, stacked A and B matrices of Slots+1 slots padded to MaxRank
// (slot 0 stays zero), plus the index tables of SBoRA adapters. All of it
// is allocated when the bank is created, so loading an adapter never
// allocates device memory.
//
// The bank is driven from the engine's goroutine (Reserve, Activate,
// Unload, Route); Upload may run on another goroutine while steps run,
// because steps only read slots of active adapters.
type Bank struct {
	backend ml.Backend
	base    *adapters.Base
	cfg     Config
	stacks  map[adapters.Target]*stack
	order   []adapters.Target
	slots   [2][]*Resident // per half, index = slot; nil = free; slot 0 unused
}

// stack is one target module's slots.
type stack struct {
	ctx          ml.Context
	in, out      int
	idx          [2]ml.Tensor // I32 [maxRank, slots]: per half, the SBoRA indices of its occupants
	a, b         ml.Tensor    // [in, maxRank, slots] and [maxRank, out, slots]
	aType, bType uint32       // ggml types of a and b
	dirty        [2][]bool    // per half: slot holds non-zero data
	fused        bool         // host memory and types the fused CPU ops take
}

// Resident is an adapter holding bank slots. After Reserve it is only a
// claim on slots; Upload fills them and Activate makes it routable.
type Resident struct {
	// Adapter describes the resident (its matrices may never have been in
	// host memory: uploads can stream them from the file).
	Adapter *adapters.Adapter
	variant adapters.Variant
	slot    [2]int // per half; 0 = none
	rank    int
	scale   float32 // alpha/rank
	targets map[adapters.Target]bool
	bank    *Bank
	active  bool
}

// Slot is the resident's slot number in the half it occupies (FA: B, FB
// and LoRA: A).
func (r *Resident) Slot() int {
	if r.variant == adapters.FA {
		return r.slot[halfB]
	}
	return r.slot[halfA]
}

// Bytes is the device memory a bank of this configuration takes on base.
func Bytes(base *adapters.Base, cfg Config) int64 {
	var n int64
	for _, t := range bankTargets(base) {
		in, out, _ := base.Shape(t)
		at, bt := stackTypes(cfg, in)
		s := int64(cfg.Slots + 1)
		n += s * int64(cfg.MaxRank) * int64(ggmlx.RowBytes(at, in))
		n += s * int64(out) * int64(ggmlx.RowBytes(bt, cfg.MaxRank))
		n += 2 * s * int64(cfg.MaxRank) * 4
	}
	return n
}

// SlotBytes is the memory of one LoRA-sized slot (an A and a B half).
func SlotBytes(base *adapters.Base, cfg Config) int64 {
	one := cfg
	one.Slots = 1
	zero := cfg
	zero.Slots = 0
	return Bytes(base, one) - Bytes(base, zero)
}

// bankTargets lists every projection of base, in canonical order.
func bankTargets(base *adapters.Base) []adapters.Target {
	var ts []adapters.Target
	for l := 0; l < base.Layers; l++ {
		for _, m := range adapters.AllModules {
			t := adapters.Target{Layer: l, Module: m}
			if _, _, ok := base.Shape(t); ok {
				ts = append(ts, t)
			}
		}
	}
	return ts
}

// stackTypes picks the storage of a target's A and B stacks.
func stackTypes(cfg Config, in int) (a, b uint32) {
	switch cfg.dtype() {
	case ml.DTypeF32:
		return ggmlx.TypeF32, ggmlx.TypeF32
	case ml.DTypeQ80:
		a, b = ggmlx.TypeF16, ggmlx.TypeF16
		if in%32 == 0 {
			a = ggmlx.TypeQ8_0
		}
		if cfg.MaxRank%32 == 0 {
			b = ggmlx.TypeQ8_0
		}
		return a, b
	}
	return ggmlx.TypeF16, ggmlx.TypeF16
}

func mlType(t uint32) ml.DType {
	switch t {
	case ggmlx.TypeF32:
		return ml.DTypeF32
	case ggmlx.TypeQ8_0:
		return ml.DTypeQ80
	}
	return ml.DTypeF16
}

// NewBank allocates a bank for models shaped like base.
func NewBank(backend ml.Backend, base *adapters.Base, cfg Config) (b *Bank, err error) {
	if cfg.Slots <= 0 || cfg.MaxRank <= 0 {
		return nil, fmt.Errorf("kernels: bank needs positive slots and max rank, got %+v", cfg)
	}
	switch cfg.dtype() {
	case ml.DTypeF16, ml.DTypeF32, ml.DTypeQ80:
	default:
		return nil, fmt.Errorf("kernels: bank type must be F16, F32 or Q8_0")
	}
	b = &Bank{backend: backend, base: base, cfg: cfg, stacks: map[adapters.Target]*stack{}, order: bankTargets(base)}
	for h := range b.slots {
		b.slots[h] = make([]*Resident, cfg.Slots+1)
	}
	defer func() {
		if p := recover(); p != nil {
			b.Close()
			b, err = nil, fmt.Errorf("allocating the adapter bank (%d slots × rank %d): %v", cfg.Slots, cfg.MaxRank, p)
		}
	}()
	n, r := cfg.Slots+1, cfg.MaxRank
	for _, t := range b.order {
		in, out, _ := base.Shape(t)
		ctx := backend.NewContextSize(4).Layer(t.Layer)
		st := &stack{ctx: ctx, in: in, out: out}
		st.aType, st.bType = stackTypes(cfg, in)
		st.a = ctx.Zeros(mlType(st.aType), in, r, n)
		st.b = ctx.Zeros(mlType(st.bType), r, out, n)
		// Every slot starts with distinct indices 0..r-1 (so an FB scatter
		// of a zero update never collides with itself).
		st.fused = !cfg.Generic && ggmlx.HostData(st.b) != nil && ggmlx.FusedTypeOK(st.bType) && r <= ggmlx.FusedRankLimit
		for h, limit := range [2]int{out, in} {
			st.idx[h] = ctx.Zeros(ml.DTypeI32, r, n)
			pad := padIndex(nil, r, limit)
			for s := 0; s < n; s++ {
				ggmlx.WriteInts(st.idx[h], s*r, pad)
			}
			st.dirty[h] = make([]bool, n)
		}
		b.stacks[t] = st
	}
	return b, nil
}

// Tensors lists the bank's device tensors.
func (b *Bank) Tensors() []ml.Tensor {
	var ts []ml.Tensor
	for _, t := range b.order {
		st := b.stacks[t]
		ts = append(ts, st.a, st.b, st.idx[0], st.idx[1])
	}
	return ts
}

// Config is the bank's configuration.
func (b *Bank) Config() Config { return b.cfg }

// Free reports how many more adapters of variant v fit without evicting.
func (b *Bank) Free(v adapters.Variant) int {
	n := len(b.slots[0])
	for _, h := range halves(v) {
		n = min(n, b.free(h))
	}
	return n
}

func (b *Bank) free(h half) int {
	n := 0
	for _, r := range b.slots[h][1:] {
		if r == nil {
			n++
		}
	}
	return n
}

// Helps reports whether unloading r would free a slot an adapter of
// variant v needs.
func (b *Bank) Helps(r *Resident, v adapters.Variant) bool {
	for _, h := range halves(v) {
		if r.slot[h] != 0 && b.free(h) == 0 {
			return true
		}
	}
	return false
}

// ErrRank is returned for adapters above the bank's maximum rank.
var ErrRank = errors.New("adapter rank above the server's maximum rank")

// Reserve claims slots for an adapter of variant v and rank (its data
// comes with Upload). It fails with adapters.ErrNoSlot when the halves it
// needs are taken, and with ErrRank above the bank's maximum rank.
func (b *Bank) Reserve(name string, v adapters.Variant, rank int) (*Resident, error) {
	if rank > b.cfg.MaxRank {
		return nil, fmt.Errorf("%w: adapter %q has rank %d, the maximum is %d", ErrRank, name, rank, b.cfg.MaxRank)
	}
	if rank <= 0 {
		return nil, fmt.Errorf("adapter %q has rank %d", name, rank)
	}
	res := &Resident{Adapter: &adapters.Adapter{Name: name, Variant: v, Rank: rank}, variant: v, rank: rank, bank: b}
	for _, h := range halves(v) {
		s := slices.Index(b.slots[h][1:], nil) + 1
		if s == 0 {
			b.release(res)
			return nil, fmt.Errorf("%w: no free %s slot for adapter %q", adapters.ErrNoSlot, v, name)
		}
		res.slot[h] = s
		b.slots[h][s] = res
	}
	return res, nil
}

// Activate makes an uploaded resident routable.
func (b *Bank) Activate(r *Resident) { r.active = true }

// Load reserves, uploads (from the adapter's float32 matrices) and
// activates an adapter in one call.
func (b *Bank) Load(a *adapters.Adapter) (*Resident, error) {
	r, err := b.Reserve(a.Name, a.Variant, a.Rank)
	if err != nil {
		return nil, err
	}
	if err := r.Upload(a, nil); err != nil {
		b.Unload(r)
		return nil, err
	}
	b.Activate(r)
	return r, nil
}

// Unload frees the resident's slots. Steps routed afterwards must not use it.
func (b *Bank) Unload(r *Resident) {
	if r == nil || r.bank != b {
		return
	}
	r.active = false
	b.release(r)
}

func (b *Bank) release(r *Resident) {
	for h := range r.slot {
		if s := r.slot[h]; s != 0 && b.slots[h][s] == r {
			b.slots[h][s] = nil
		}
	}
}

// Close frees every stack.
func (b *Bank) Close() {
	for _, st := range b.stacks {
		st.ctx.Close()
	}
	b.stacks = map[adapters.Target]*stack{}
}

// MatrixSource supplies an adapter's matrices as stored: an
// *adapters.Reader streams them from the file.
type MatrixSource interface {
	ReadMatrix(m *adapters.ModuleWeights, b bool, buf []byte) (adapters.RawMatrix, error)
}

// memorySource serves the float32 matrices of an in-memory adapter.
type memorySource struct{}

func (memorySource) ReadMatrix(m *adapters.ModuleWeights, b bool, _ []byte) (adapters.RawMatrix, error) {
	v, rows, cols := m.A, len(m.A)/max(m.In, 1), m.In
	if b {
		v, rows, cols = m.B, m.Out, len(m.B)/max(m.Out, 1)
	}
	if len(v) == 0 {
		return adapters.RawMatrix{}, fmt.Errorf("%s: no matrix in memory", m.Target)
	}
	return adapters.RawMatrix{Type: gguf.TypeF32, Rows: rows, Cols: cols, Data: unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v))}, nil
}

// Upload validates a against the base and the reservation, then writes
// its indices and matrices (read from src; nil means a's own float32
// matrices) into the reserved slots, zeroing what a previous occupant left
// in modules a does not target. It runs on any goroutine: until Activate,
// no step reads these slots.
func (r *Resident) Upload(a *adapters.Adapter, src MatrixSource) error {
	if err := a.ValidateFor(r.bank.base); err != nil {
		return err
	}
	if a.Variant != r.variant || a.Rank != r.rank {
		return fmt.Errorf("adapter %q is %s rank %d, the slots were reserved for %s rank %d", a.Name, a.Variant, a.Rank, r.variant, r.rank)
	}
	if src == nil {
		src = memorySource{}
	}
	r.Adapter, r.scale = a, a.Scale()
	r.targets = map[adapters.Target]bool{}
	for _, m := range a.Modules {
		r.targets[m.Target] = true
	}
	b := r.bank
	R := b.cfg.MaxRank
	w := &slotWriter{}
	for _, t := range b.order {
		st := b.stacks[t]
		m := r.Adapter.Module(t)
		for _, h := range halves(r.variant) {
			s := r.slot[h]
			if m == nil {
				if st.dirty[h][s] {
					w.clear(st, h, s, R)
					st.dirty[h][s] = false
				}
				continue
			}
			if m.Index != nil {
				limit := st.out
				if h == halfB {
					limit = st.in
				}
				ggmlx.WriteInts(st.idx[h], s*R, padIndex(m.Index, R, limit))
			}
			raw, err := src.ReadMatrix(m, h == halfB, w.buf)
			if err != nil {
				return err
			}
			if _, inMemory := src.(memorySource); !inMemory {
				w.buf = raw.Data[:0] // reuse the read buffer
			}
			if err := w.write(st, h, s, R, r.rank, raw); err != nil {
				return fmt.Errorf("adapter %q %s: %w", r.Adapter.Name, t, err)
			}
			st.dirty[h][s] = true
		}
	}
	return nil
}

// slotWriter converts matrices into slot layout, writing straight into
// host memory when the bank lives there and through a staging buffer
// otherwise.
type slotWriter struct {
	buf     []byte // read buffer for matrices
	staging []byte
	scratch []float32
}

// region returns the bytes of slot s of tensor t (n bytes per slot) to
// write into, and a function that makes the write visible.
func (w *slotWriter) region(t ml.Tensor, s, n int) ([]byte, func()) {
	if host := ggmlx.HostData(t); host != nil {
		return host[s*n : (s+1)*n], func() {}
	}
	if cap(w.staging) < n {
		w.staging = make([]byte, n)
	}
	st := w.staging[:n]
	return st, func() { ggmlx.WriteAt(t, s*n, st) }
}

func (w *slotWriter) write(st *stack, h half, s, R, rank int, raw adapters.RawMatrix) error {
	if len(w.scratch) < max(R, st.in) {
		w.scratch = make([]float32, max(R, st.in))
	}
	if h == halfB {
		// B: out rows of rank values → out rows of R.
		if raw.Rows != st.out || raw.Cols != rank {
			return fmt.Errorf("B is %d×%d, want %d×%d", raw.Rows, raw.Cols, st.out, rank)
		}
		rowBytes := ggmlx.RowBytes(st.bType, R)
		dst, done := w.region(st.b, s, st.out*rowBytes)
		if err := ggmlx.ConvertRows(raw.Data, uint32(raw.Type), rank, st.out, dst, st.bType, R, w.scratch); err != nil {
			return err
		}
		done()
		return nil
	}
	// A: rank rows of in values → R rows of in (the rest zero).
	if raw.Rows != rank || raw.Cols != st.in {
		return fmt.Errorf("A is %d×%d, want %d×%d", raw.Rows, raw.Cols, rank, st.in)
	}
	rowBytes := ggmlx.RowBytes(st.aType, st.in)
	dst, done := w.region(st.a, s, R*rowBytes)
	if err := ggmlx.ConvertRows(raw.Data, uint32(raw.Type), st.in, rank, dst, st.aType, st.in, w.scratch); err != nil {
		return err
	}
	clear(dst[rank*rowBytes:])
	done()
	return nil
}

// clear zeroes slot s of half h (all-zero bytes are zero in F32, F16 and
// Q8_0 alike).
func (w *slotWriter) clear(st *stack, h half, s, R int) {
	t, n := st.a, R*ggmlx.RowBytes(st.aType, st.in)
	if h == halfB {
		t, n = st.b, st.out*ggmlx.RowBytes(st.bType, R)
	}
	dst, done := w.region(t, s, n)
	clear(dst)
	done()
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
