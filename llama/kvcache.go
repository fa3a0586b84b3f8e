package llama

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"
	"github.com/x448/float16"
)

// Cache is a slot-based KV cache: every sequence owns one slot, a contiguous
// region of SlotLen positions per layer. Attention reads a slot range as a
// strided view, so a decode step over many sequences costs the sum of their
// lengths (padded to the longest), not the product of batch size and the
// whole cache as with one shared pool (ollama's kvcache.Causal).
type Cache struct {
	Slots, SlotLen int
	DType          ml.DType
	kvDim          int
	ctx            ml.Context
	keys, values   []ml.Tensor // per layer: [kvDim, SlotLen, Slots]
}

func newCache(m *Model, slots, slotLen int, dtype ml.DType) (c *Cache, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("allocating KV cache of %d slots × %d positions: %v", slots, slotLen, p)
		}
	}()
	c = &Cache{Slots: slots, SlotLen: slotLen, DType: dtype, kvDim: m.Params.KVDim()}
	c.ctx = m.Backend().NewContextSize(2 * len(m.Layers))
	for i := range m.Layers {
		lc := c.ctx.Layer(i)
		c.keys = append(c.keys, lc.Zeros(dtype, c.kvDim, slotLen, slots))
		c.values = append(c.values, lc.Zeros(dtype, c.kvDim, slotLen, slots))
	}
	return c, nil
}

func (c *Cache) close() { c.ctx.Close() }

// seqSpan is where one sequence's tokens sit in a step.
type seqSpan struct {
	slot, pos0, n int
	first         int // row of its first token in the batch
}

// attnGroup is one batched attention call: a contiguous slot range with the
// same number of query rows per slot.
type attnGroup struct {
	slot0, nSlots int
	q             int     // query rows per slot
	kvLen         int     // cache positions read
	qRows         []int32 // [q*nSlots]: batch row of each query cell (0 for padding)
	padding       []bool  // per cell: no query here (decode groups only)
	mask          []byte  // F16 [kvLen, q, 1, nSlots]
}

// attentionPlan is the host-side layout of a step's attention, shared by all
// layers: cache write positions, groups, and the gather that restores batch
// order.
type attentionPlan struct {
	tokens   int
	writeIdx []int32 // per token: slot*SlotLen + position
	groups   []attnGroup
	// outRows maps batch row t to its row in the concatenated group outputs;
	// nil when the groups' outputs are already in batch order.
	outRows []int32
}

var (
	f16NegInf = float16.Inf(-1).Bits()
	f16Zero   = float16.Fromfloat32(0).Bits()
)

// planAttention groups single-token sequences (decode) into one call over
// their slot range, and gives each multi-token sequence (prefill) its own.
func planAttention(spans []seqSpan, slotLen int) *attentionPlan {
	p := &attentionPlan{}
	for _, s := range spans {
		p.tokens += s.n
	}
	p.writeIdx = make([]int32, p.tokens)
	for _, s := range spans {
		for j := 0; j < s.n; j++ {
			p.writeIdx[s.first+j] = int32(s.slot*slotLen + s.pos0 + j)
		}
	}
	var decode []seqSpan
	for _, s := range spans {
		if s.n == 1 {
			decode = append(decode, s)
			continue
		}
		g := attnGroup{slot0: s.slot, nSlots: 1, q: s.n, kvLen: s.pos0 + s.n, qRows: make([]int32, s.n)}
		g.mask = make([]byte, 2*g.kvLen*g.q)
		for j := 0; j < s.n; j++ {
			g.qRows[j] = int32(s.first + j)
			fillMaskRow(g.mask[2*j*g.kvLen:2*(j+1)*g.kvLen], s.pos0+j)
		}
		p.groups = append(p.groups, g)
	}
	if len(decode) > 0 {
		slices.SortFunc(decode, func(a, b seqSpan) int { return a.slot - b.slot })
		lo, hi := decode[0].slot, decode[len(decode)-1].slot
		g := attnGroup{slot0: lo, nSlots: hi - lo + 1, q: 1}
		for _, s := range decode {
			g.kvLen = max(g.kvLen, s.pos0+1)
		}
		g.qRows = make([]int32, g.nSlots)
		g.padding = make([]bool, g.nSlots)
		g.mask = make([]byte, 2*g.kvLen*g.nSlots)
		for i := 0; i < g.nSlots; i++ {
			g.padding[i] = true
			fillMaskRow(g.mask[2*i*g.kvLen:2*(i+1)*g.kvLen], -1)
		}
		for _, s := range decode {
			i := s.slot - lo
			g.qRows[i] = int32(s.first)
			g.padding[i] = false
			fillMaskRow(g.mask[2*i*g.kvLen:2*(i+1)*g.kvLen], s.pos0)
		}
		p.groups = append(p.groups, g)
	}
	// Where does each batch row land in the concatenated outputs?
	p.outRows = make([]int32, p.tokens)
	identity := true
	base := 0
	for _, g := range p.groups {
		for cell, row := range g.qRows {
			if g.padding != nil && g.padding[cell] {
				continue
			}
			p.outRows[row] = int32(base + cell)
			identity = identity && int(row) == base+cell
		}
		base += g.q * g.nSlots
	}
	if identity && base == p.tokens {
		p.outRows = nil
	}
	return p
}

// fillMaskRow writes an F16 mask row allowing positions 0..last.
func fillMaskRow(row []byte, last int) {
	for p := 0; p < len(row)/2; p++ {
		v := f16NegInf
		if p <= last {
			v = f16Zero
		}
		binary.LittleEndian.PutUint16(row[2*p:], v)
	}
}

// cachedAttention is the Attender of an inference step.
type cachedAttention struct {
	m        *Model
	cache    *Cache
	plan     *attentionPlan
	writeIdx ml.Tensor
	groups   []boundGroup
	outRows  ml.Tensor
}

type boundGroup struct {
	attnGroup
	qRowsT ml.Tensor // the group's qRows and mask as inputs of the step
	maskT  ml.Tensor
}

func (c *Cache) bind(ctx ml.Context, m *Model, p *attentionPlan) *cachedAttention {
	a := &cachedAttention{m: m, cache: c, plan: p}
	a.writeIdx = ctx.Input().FromInts(p.writeIdx, len(p.writeIdx))
	for _, g := range p.groups {
		a.groups = append(a.groups, boundGroup{
			attnGroup: g,
			qRowsT:    ctx.Input().FromInts(g.qRows, len(g.qRows)),
			maskT:     ctx.Input().FromBytes(ml.DTypeF16, g.mask, g.kvLen, g.q, 1, g.nSlots),
		})
	}
	if p.outRows != nil {
		a.outRows = ctx.Input().FromInts(p.outRows, len(p.outRows))
	}
	return a
}

func (a *cachedAttention) Attend(ctx ml.Context, layer int, q, k, v ml.Tensor) ml.Tensor {
	c, cfg := a.cache, a.m.Params
	T := a.plan.tokens
	keys, values := c.keys[layer], c.values[layer]
	// Store the new keys and values, then read them back through views; the
	// Forward call orders the writes before the reads in the graph.
	ctx.Forward(
		keys.Reshape(ctx, c.kvDim, c.SlotLen*c.Slots).SetRows(ctx, k.Reshape(ctx, c.kvDim, T), a.writeIdx),
		values.Reshape(ctx, c.kvDim, c.SlotLen*c.Slots).SetRows(ctx, v.Reshape(ctx, c.kvDim, T), a.writeIdx),
	)
	qFlat := q.Reshape(ctx, cfg.QDim(), T)
	var out ml.Tensor
	for _, g := range a.groups {
		qg := qFlat.Rows(ctx, g.qRowsT).Reshape(ctx, cfg.HeadDim, cfg.Heads, g.q, g.nSlots)
		kg := a.view(ctx, keys, g)
		vg := a.view(ctx, values, g)
		o := qg.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, kg, vg, g.maskT, nil, nil, a.m.AttentionScale(), true)
		o = o.Reshape(ctx, cfg.QDim(), g.q*g.nSlots)
		if out == nil {
			out = o
		} else {
			out = out.Concat(ctx, o, 1)
		}
	}
	if a.outRows != nil {
		out = out.Rows(ctx, a.outRows)
	}
	return out
}

// view returns cache positions [0, kvLen) of the group's slots as
// [headDim, kvHeads, kvLen, nSlots].
func (a *cachedAttention) view(ctx ml.Context, t ml.Tensor, g boundGroup) ml.Tensor {
	cfg := a.m.Params
	es := t.Stride(0)
	return t.View(ctx, g.slot0*t.Stride(2),
		cfg.HeadDim, cfg.HeadDim*es,
		cfg.KVHeads, t.Stride(1),
		g.kvLen, t.Stride(2),
		g.nSlots)
}
