package llama

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"

	"github.com/ollama/ollama/ml"
	"github.com/x448/float16"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
)

// seqSpan is where one sequence's tokens sit in a step.
type seqSpan struct {
	kv      *SeqKV
	pos0, n int
	first   int // batch row of its first token
}

// attnGroup is one batched attention call over nSeqs sequences with the
// same number of query rows, each reading its own first nb blocks (gathered
// into a contiguous [nb·BlockSize] stretch per sequence).
type attnGroup struct {
	nSeqs  int
	q      int     // query rows per sequence
	nb     int     // blocks read per sequence
	blocks []int32 // [nb·nSeqs]: block ids, sequence-major (padding: block 0, masked)
	qRows  []int32 // [q·nSeqs]: batch row of each query
	// qFirst is the first query row when qRows is one contiguous run
	// (then the queries are a view, not a gather); -1 otherwise.
	qFirst int
	// block0 is the first block when the group is one sequence whose
	// blocks are consecutive (then keys and values are a view of the pool,
	// not a gather); -1 otherwise.
	block0 int
	mask   []byte // F16 [nb·BlockSize, q, 1, nSeqs]
}

// attentionPlan is the host-side layout of a step's attention, shared by all
// layers: where each token is written, and how layers read: in place
// through block tables (layers whose pool the CPU reads: ggmlx's paged
// attention), or through gathered groups (the others, on a GPU).
type attentionPlan struct {
	tokens   int
	writeIdx []int32 // per token: its pool row
	// Paged reads: table [maxBlocks, seqs] holds each sequence's blocks
	// (padding: block 0, never read); where [2, tokens] each token's
	// sequence and the last position it attends to. Nil without paged
	// layers.
	table           []int32
	maxBlocks, seqs int
	where           []int32
	// Gathered reads; nil without gathered layers.
	groups []attnGroup
	// outRows maps batch row t to its row in the concatenated group
	// outputs; nil when the groups' outputs are already in batch order.
	outRows []int32
}

var (
	f16NegInf = float16.Inf(-1).Bits()
	f16Zero   = float16.Fromfloat32(0).Bits()
)

// decodeMergeSlack bounds the padding a decode group may add: a sequence
// joins a group whose longest member has at most 1.5× its blocks plus this.
const decodeMergeSlack = 2

// planAttention lays out a step's attention for paged layers, gathered
// layers, or both.
func planAttention(spans []seqSpan, blockSize int, paged, gathered bool) *attentionPlan {
	p := &attentionPlan{}
	for _, s := range spans {
		p.tokens += s.n
	}
	p.writeIdx = make([]int32, p.tokens)
	for _, s := range spans {
		for j := 0; j < s.n; j++ {
			p.writeIdx[s.first+j] = s.kv.rowOf(s.pos0 + j)
		}
	}
	if paged {
		p.planPaged(spans, blockSize)
	}
	if gathered {
		p.planGroups(spans, blockSize)
	}
	return p
}

// planPaged writes the block tables: one column per sequence, as long as
// the longest sequence's.
func (p *attentionPlan) planPaged(spans []seqSpan, blockSize int) {
	p.seqs = len(spans)
	for _, s := range spans {
		p.maxBlocks = max(p.maxBlocks, blocksFor(s.pos0+s.n, blockSize))
	}
	p.table = make([]int32, p.maxBlocks*p.seqs)
	p.where = make([]int32, 2*p.tokens)
	for i, s := range spans {
		copy(p.table[i*p.maxBlocks:], s.kv.blocks[:blocksFor(s.pos0+s.n, blockSize)])
		for j := 0; j < s.n; j++ {
			p.where[2*(s.first+j)] = int32(i)
			p.where[2*(s.first+j)+1] = int32(s.pos0 + j)
		}
	}
}

// planGroups gives each multi-token sequence (a prefill chunk) its own
// group and batches single-token sequences (decode) in groups of similar
// length, so that padding to the longest member stays small.
func (p *attentionPlan) planGroups(spans []seqSpan, blockSize int) {
	var decode []seqSpan
	for _, s := range spans {
		if s.n == 1 {
			decode = append(decode, s)
			continue
		}
		p.groups = append(p.groups, newGroup([]seqSpan{s}, blocksFor(s.pos0+s.n, blockSize), blockSize))
	}
	slices.SortStableFunc(decode, func(a, b seqSpan) int { return a.pos0 - b.pos0 })
	for i := 0; i < len(decode); {
		lo := blocksFor(decode[i].pos0+1, blockSize)
		j := i + 1
		for j < len(decode) && 2*blocksFor(decode[j].pos0+1, blockSize) <= 3*lo+2*decodeMergeSlack {
			j++
		}
		p.groups = append(p.groups, newGroup(decode[i:j], blocksFor(decode[j-1].pos0+1, blockSize), blockSize))
		i = j
	}
	// Where does each batch row land in the concatenated outputs?
	p.outRows = make([]int32, p.tokens)
	identity := true
	base := 0
	for _, g := range p.groups {
		for cell, row := range g.qRows {
			p.outRows[row] = int32(base + cell)
			identity = identity && int(row) == base+cell
		}
		base += len(g.qRows)
	}
	if identity {
		p.outRows = nil
	}
}

func newGroup(seqs []seqSpan, nb, blockSize int) attnGroup {
	q := seqs[0].n
	g := attnGroup{nSeqs: len(seqs), q: q, nb: nb, blocks: make([]int32, 0, nb*len(seqs)), qRows: make([]int32, 0, q*len(seqs))}
	kvLen := nb * blockSize
	g.mask = make([]byte, 2*kvLen*q*len(seqs))
	for i, s := range seqs {
		g.blocks = append(g.blocks, s.kv.blocks[:min(nb, len(s.kv.blocks))]...)
		for len(g.blocks) < (i+1)*nb {
			g.blocks = append(g.blocks, 0)
		}
		for j := 0; j < s.n; j++ {
			g.qRows = append(g.qRows, int32(s.first+j))
			cell := i*q + j
			fillMaskRow(g.mask[2*cell*kvLen:2*(cell+1)*kvLen], s.pos0+j)
		}
	}
	g.block0 = -1
	if len(seqs) == 1 && len(g.blocks) > 0 {
		g.block0 = int(g.blocks[0])
		for k, b := range g.blocks {
			if int(b) != g.block0+k {
				g.block0 = -1
				break
			}
		}
	}
	g.qFirst = int(g.qRows[0])
	for k, r := range g.qRows {
		if int(r) != g.qFirst+k {
			g.qFirst = -1
			break
		}
	}
	return g
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

// pagedAttention is the Attender of an inference step.
type pagedAttention struct {
	m        *Model
	pool     *KVPool
	plan     *attentionPlan
	writeIdx ml.Tensor
	// table and where feed the paged layers.
	table, where ml.Tensor
	groups       []boundGroup
	outRows      ml.Tensor
}

type boundGroup struct {
	attnGroup
	blocksT, qRowsT, maskT ml.Tensor // the group's inputs in the step
}

func (p *KVPool) bind(ctx ml.Context, m *Model, plan *attentionPlan) *pagedAttention {
	a := &pagedAttention{m: m, pool: p, plan: plan}
	a.writeIdx = ctx.Input().FromInts(plan.writeIdx, len(plan.writeIdx))
	if plan.table != nil {
		a.table = ctx.Input().FromInts(plan.table, plan.maxBlocks, plan.seqs)
		a.where = ctx.Input().FromInts(plan.where, 2, plan.tokens)
	}
	for _, g := range plan.groups {
		bg := boundGroup{attnGroup: g,
			maskT: ctx.Input().FromBytes(ml.DTypeF16, g.mask, g.nb*p.BlockSize, g.q, 1, g.nSeqs)}
		if g.block0 < 0 {
			bg.blocksT = ctx.Input().FromInts(g.blocks, len(g.blocks))
		}
		if g.qFirst < 0 {
			bg.qRowsT = ctx.Input().FromInts(g.qRows, len(g.qRows))
		}
		a.groups = append(a.groups, bg)
	}
	if plan.outRows != nil {
		a.outRows = ctx.Input().FromInts(plan.outRows, len(plan.outRows))
	}
	return a
}

// signature writes what of the plan shapes the graph: the groups' sizes
// and the offsets their views use.
func (p *attentionPlan) signature(b *strings.Builder) {
	if p.table != nil {
		fmt.Fprintf(b, "p%d,%d;", p.maxBlocks, p.seqs)
	}
	for _, g := range p.groups {
		fmt.Fprintf(b, "g%d,%d,%d,%d,%d;", g.nSeqs, g.q, g.nb, g.qFirst, g.block0)
	}
	fmt.Fprintf(b, "r%v|", p.outRows != nil)
}

// update writes a plan of the same signature into the bound inputs.
func (a *pagedAttention) update(p *attentionPlan) {
	a.plan = p
	a.writeIdx.FromInts(p.writeIdx)
	if a.table != nil {
		a.table.FromInts(p.table)
		a.where.FromInts(p.where)
	}
	for i, g := range p.groups {
		bg := &a.groups[i]
		if bg.blocksT != nil {
			bg.blocksT.FromInts(g.blocks)
		}
		if bg.qRowsT != nil {
			bg.qRowsT.FromInts(g.qRows)
		}
		bg.maskT.FromBytes(g.mask)
	}
	if a.outRows != nil {
		a.outRows.FromInts(p.outRows)
	}
}

func (a *pagedAttention) Attend(ctx ml.Context, layer int, q, k, v ml.Tensor) ml.Tensor {
	p, cfg := a.pool, a.m.Params
	T := a.plan.tokens
	bs, nBlocks := p.BlockSize, p.Blocks()
	// Store the new keys and values; reading through the stores' results
	// orders every read after them.
	keys := p.keys[layer].SetRows(ctx, k.Reshape(ctx, p.kvDim, T), a.writeIdx)
	values := p.values[layer].SetRows(ctx, v.Reshape(ctx, p.kvDim, T), a.writeIdx)
	if p.paged[layer] {
		o := ggmlx.PagedAttention(ctx, q, keys, values, a.table, a.where, bs, float32(a.m.AttentionScale()))
		return o.Reshape(ctx, cfg.QDim(), T)
	}
	keys, values = keys.Reshape(ctx, p.kvDim*bs, nBlocks), values.Reshape(ctx, p.kvDim*bs, nBlocks)
	qFlat := q.Reshape(ctx, cfg.QDim(), T)
	var out ml.Tensor
	for _, g := range a.groups {
		var qg ml.Tensor
		if g.qRowsT == nil {
			qg = qFlat.View(ctx, g.qFirst*qFlat.Stride(1), cfg.QDim()*g.q*g.nSeqs)
		} else {
			qg = qFlat.Rows(ctx, g.qRowsT)
		}
		qg = qg.Reshape(ctx, cfg.HeadDim, cfg.Heads, g.q, g.nSeqs)
		kvLen := g.nb * bs
		read := func(pool ml.Tensor) ml.Tensor {
			if g.block0 >= 0 {
				pool = pool.View(ctx, g.block0*pool.Stride(1), pool.Dim(0)*g.nb)
			} else {
				pool = ggmlx.GatherRows(ctx, pool, g.blocksT)
			}
			return pool.Reshape(ctx, cfg.HeadDim, cfg.KVHeads, kvLen, g.nSeqs)
		}
		kg, vg := read(keys), read(values)
		o := qg.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, kg, vg, g.maskT, nil, nil, a.m.AttentionScale(), true)
		o = o.Reshape(ctx, cfg.QDim(), g.q*g.nSeqs)
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
