package llama

import (
	"fmt"
	"strings"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// EngineOptions size an Engine.
type EngineOptions struct {
	// KVTokens is the KV pool's capacity in tokens, shared by all
	// sequences (rounded up to whole blocks).
	KVTokens int
	// BlockSize is the KV block size in tokens (default DefaultBlockSize).
	BlockSize int
	// MaxSeqLen is the longest sequence (prompt + generation); default the
	// model's context length, at most 4096, and at most KVTokens.
	MaxSeqLen int
	// CacheF32 stores keys and values as F32 instead of F16.
	CacheF32 bool
	// NoPrefixCache turns off prefix caching (blocks are freed, not kept).
	NoPrefixCache bool
	// Bank sizes the adapter bank.
	Bank kernels.Config
	// HugePages backs the KV pool and the bank with transparent huge pages.
	HugePages bool
	// GatherAttention makes every layer gather its sequences' keys and
	// values into contiguous copies for ggml's flash attention (what
	// layers on a GPU do) instead of reading CPU pools in place: for
	// comparisons.
	GatherAttention bool
}

// Engine runs batched steps of a model: every sequence holds blocks of one
// shared KV pool and may use its own adapters. An Engine is not safe for
// concurrent use; the server drives it from one goroutine.
type Engine struct {
	Model *Model
	Pool  *KVPool
	Bank  *kernels.Bank
	// MaxSeqLen is the longest sequence a step accepts.
	MaxSeqLen int
	// graph is the last step's, reused by a next step of the same shape
	// while the scheduler is still allocated for it (llama.cpp reuses
	// graphs the same way: a graph is only ever allocated once).
	graph *stepGraph
}

// NewEngine allocates the KV pool and the adapter bank.
func NewEngine(m *Model, opts EngineOptions) (*Engine, error) {
	if opts.BlockSize <= 0 {
		opts.BlockSize = DefaultBlockSize
	}
	if opts.MaxSeqLen <= 0 {
		opts.MaxSeqLen = min(m.Params.ContextLength, 4096)
	}
	if opts.KVTokens <= 0 {
		opts.KVTokens = opts.MaxSeqLen
	}
	blocks := (opts.KVTokens + opts.BlockSize - 1) / opts.BlockSize
	opts.MaxSeqLen = min(opts.MaxSeqLen, blocks*opts.BlockSize)
	dtype := ml.DTypeF16
	if opts.CacheF32 {
		dtype = ml.DTypeF32
	}
	pool, err := newKVPool(m, blocks, opts.BlockSize, dtype, !opts.NoPrefixCache, opts.GatherAttention)
	if err != nil {
		return nil, err
	}
	if opts.Bank.Slots <= 0 {
		opts.Bank.Slots = 8
	}
	if opts.Bank.MaxRank <= 0 {
		opts.Bank.MaxRank = 64
	}
	bank, err := kernels.NewBank(m.Backend(), m.AdapterBase, opts.Bank)
	if err != nil {
		pool.close()
		return nil, err
	}
	if opts.HugePages {
		ggmlx.HugePages(append(append([]ml.Tensor(nil), pool.keys...), pool.values...))
		ggmlx.HugePages(bank.Tensors())
	}
	return &Engine{Model: m, Pool: pool, Bank: bank, MaxSeqLen: opts.MaxSeqLen}, nil
}

// Close frees the KV pool and the adapter bank (not the model).
func (e *Engine) Close() {
	e.dropGraph()
	e.Bank.Close()
	e.Pool.close()
}

// Seq is one sequence's share of a step: Tokens are appended at the end of
// KV, which must have room for them (SeqKV.Reserve).
type Seq struct {
	KV     *SeqKV
	Tokens []int32
	// Adapters applied to this sequence (at most kernels.MaxCompose).
	Adapters []kernels.Use
	// AllLogits returns logits for every token instead of the last only.
	AllLogits bool
	// NoLogits skips the output head for this sequence (a prefill chunk
	// that is not the last).
	NoLogits bool
}

// Step runs one forward pass over all sequences and returns each sequence's
// logits: one row per token with AllLogits, else one row (none with NoLogits).
// A step with the shape of the previous one (same batch layout, attention
// groups and adapter routing shape — consecutive decode steps, mostly)
// reuses its graph and allocation and only uploads new inputs.
func (e *Engine) Step(seqs []Seq) ([][][]float32, error) {
	in, err := e.prepare(seqs)
	if err != nil {
		return nil, err
	}
	g := e.graph
	if g != nil && g.sig == in.sig && ggmlx.Allocated(g.ctx) {
		g.update(in)
	} else {
		e.dropGraph()
		ggmlx.EnsureGraphNodes(e.Model.Backend(), e.graphBudget(len(in.plan.groups), in.routing.NodesPerModule()))
		g = e.buildGraph(in)
		e.graph = g
	}
	if err := ggmlx.ComputeKeep(g.ctx); err != nil {
		e.dropGraph()
		return nil, err
	}
	flat := ggmlx.Floats(g.logits, nil)
	vocab := g.logits.Dim(0)
	for _, s := range seqs {
		s.KV.commit(s.Tokens)
	}

	result := make([][][]float32, len(seqs))
	row := 0
	for i, s := range seqs {
		n := 0
		switch {
		case s.NoLogits:
		case s.AllLogits:
			n = len(s.Tokens)
		default:
			n = 1
		}
		for j := 0; j < n; j++ {
			result[i] = append(result[i], flat[(row+j)*vocab:(row+j+1)*vocab])
		}
		row += n
	}
	return result, nil
}

// stepInputs is a laid-out step: the host data of its graph's inputs and
// the signature of its graph's shape.
type stepInputs struct {
	tokens, positions, outputs []int32
	// needOutputs: the rows wanted are not simply all of them in order.
	needOutputs bool
	plan        *attentionPlan
	routing     *kernels.Routing
	sig         string
}

func (e *Engine) prepare(seqs []Seq) (*stepInputs, error) {
	spans, uses, tokens, positions, outputs, err := e.layout(seqs)
	if err != nil {
		return nil, err
	}
	routing, err := e.Bank.Route(uses)
	if err != nil {
		return nil, err
	}
	paged, gathered := e.Pool.readModes()
	in := &stepInputs{tokens: tokens, positions: positions, outputs: outputs, routing: routing,
		plan: planAttention(spans, e.Pool.BlockSize, paged, gathered)}
	if len(in.outputs) == 0 {
		// Nothing to return: still run the layers to fill the cache, keeping
		// one row so the graph has an output.
		in.outputs = []int32{0}
	}
	in.needOutputs = len(in.outputs) != len(tokens) || !isIdentity(in.outputs)
	var sig strings.Builder
	fmt.Fprintf(&sig, "T%d o%d %v|", len(tokens), len(in.outputs), in.needOutputs)
	in.plan.signature(&sig)
	routing.Signature(&sig)
	in.sig = sig.String()
	return in, nil
}

// stepGraph is a built step graph with its input tensors, kept for the
// next step of the same shape.
type stepGraph struct {
	sig                        string
	ctx                        ml.Context
	logits                     ml.Tensor
	tokens, positions, outputs ml.Tensor
	att                        *pagedAttention
	proj                       *kernels.Bound
}

func (e *Engine) buildGraph(in *stepInputs) *stepGraph {
	g := &stepGraph{sig: in.sig, ctx: e.Model.Backend().NewContext()}
	ctx := g.ctx
	ctx.SetBatchSize(len(in.tokens))
	g.tokens = ctx.Input().FromInts(in.tokens, len(in.tokens))
	g.positions = ctx.Input().FromInts(in.positions, len(in.positions))
	if in.needOutputs {
		g.outputs = ctx.Input().FromInts(in.outputs, len(in.outputs))
	}
	var proj Projector
	if !in.routing.Empty() {
		g.proj = in.routing.Bind(ctx)
		proj = g.proj
	}
	g.att = e.Pool.bind(ctx, e.Model, in.plan)
	hidden := e.Model.Transformer(ctx, g.tokens, g.positions, g.outputs, g.att, proj)
	g.logits = e.Model.Logits(ctx, hidden)
	ctx.Forward(g.logits)
	return g
}

// update writes a step's inputs into a graph of the same shape.
func (g *stepGraph) update(in *stepInputs) {
	g.tokens.FromInts(in.tokens)
	g.positions.FromInts(in.positions)
	if g.outputs != nil {
		g.outputs.FromInts(in.outputs)
	}
	g.att.update(in.plan)
	if g.proj != nil {
		g.proj.Update(in.routing)
	}
}

// dropGraph frees the kept graph (and resets the scheduler, which may be
// allocated for it).
func (e *Engine) dropGraph() {
	if e.graph != nil {
		ggmlx.Forget(e.Model.Backend())
		e.graph.ctx.Close()
		e.graph = nil
	}
}

// ReserveCompute allocates the compute buffers of the largest step the
// server will run, so that memory is taken at start (an out-of-memory is a
// start-up error, not a crash under load), and returns their size: parallel
// sequences decoding at the longest length next to a prefill chunk of
// prefill tokens that wants every logit.
func (e *Engine) ReserveCompute(parallel, prefill int) (n int64, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("reserving compute buffers for %d sequences of %d tokens: %v", parallel, e.MaxSeqLen, r)
		}
	}()
	fake := func(length int) *SeqKV {
		return &SeqKV{pool: e.Pool, blocks: make([]int32, e.Pool.BlocksFor(length)), tokens: make([]int32, length-1)}
	}
	L := e.MaxSeqLen
	prefill = min(prefill, L-1)
	seqs := []Seq{{KV: &SeqKV{pool: e.Pool, blocks: make([]int32, e.Pool.BlocksFor(L)), tokens: make([]int32, L-prefill)},
		Tokens: make([]int32, prefill), AllLogits: true}}
	for i := 0; i < parallel; i++ {
		seqs = append(seqs, Seq{KV: fake(L), Tokens: []int32{0}})
	}
	// Room for the most attention groups a step can have (every sequence
	// prefilling, or decoding at lengths too far apart to share a group),
	// so the scheduler — and its reserved buffers — is never rebuilt.
	e.dropGraph()
	ggmlx.EnsureGraphNodes(e.Model.Backend(), e.graphBudget(2*parallel+1, kernels.MaxNodesPerModule))
	in, err := e.prepare(seqs)
	if err != nil {
		return 0, err
	}
	g := e.buildGraph(in)
	defer g.ctx.Close()
	g.ctx.Reserve()
	return ggmlx.ComputeBufferSize(e.Model.Backend()), nil
}

// layout validates the step and flattens it into batch rows.
func (e *Engine) layout(seqs []Seq) (spans []seqSpan, uses [][]kernels.Use, tokens, positions, outputs []int32, err error) {
	if len(seqs) == 0 {
		return nil, nil, nil, nil, nil, fmt.Errorf("empty step")
	}
	seen := map[*SeqKV]bool{}
	vocab := int32(e.Model.Params.VocabSize)
	for i, s := range seqs {
		fail := func(format string, args ...any) error {
			return fmt.Errorf("sequence %d: %s", i, fmt.Sprintf(format, args...))
		}
		switch {
		case s.KV == nil || s.KV.pool != e.Pool:
			return nil, nil, nil, nil, nil, fail("no KV sequence of this engine")
		case seen[s.KV]:
			return nil, nil, nil, nil, nil, fail("appears twice in one step")
		case len(s.Tokens) == 0:
			return nil, nil, nil, nil, nil, fail("no tokens")
		case s.KV.Len()+len(s.Tokens) > e.MaxSeqLen:
			return nil, nil, nil, nil, nil, fail("positions %d..%d exceed the longest sequence %d", s.KV.Len(), s.KV.Len()+len(s.Tokens), e.MaxSeqLen)
		case s.KV.Len()+len(s.Tokens) > s.KV.Capacity():
			return nil, nil, nil, nil, nil, fail("%d tokens need room in the KV pool (reserve them first)", len(s.Tokens))
		case len(s.Adapters) > kernels.MaxCompose:
			return nil, nil, nil, nil, nil, fail("%d adapters, at most %d compose", len(s.Adapters), kernels.MaxCompose)
		}
		seen[s.KV] = true
		pos0 := s.KV.Len()
		spans = append(spans, seqSpan{kv: s.KV, pos0: pos0, n: len(s.Tokens), first: len(tokens)})
		for j, t := range s.Tokens {
			if t < 0 || t >= vocab {
				return nil, nil, nil, nil, nil, fail("token %d out of vocabulary [0, %d)", t, vocab)
			}
			row := int32(len(tokens))
			tokens = append(tokens, t)
			positions = append(positions, int32(pos0+j))
			uses = append(uses, s.Adapters)
			switch {
			case s.NoLogits:
			case s.AllLogits, j == len(s.Tokens)-1:
				outputs = append(outputs, row)
			}
		}
	}
	return spans, uses, tokens, positions, outputs, nil
}

func isIdentity(rows []int32) bool {
	for i, r := range rows {
		if int(r) != i {
			return false
		}
	}
	return true
}

// graphBudget bounds the node count of a step's graph.
func (e *Engine) graphBudget(groups, adapterNodes int) int {
	perLayer := 48 + 20*groups + 7*adapterNodes
	need := 64 + len(e.Model.Layers)*perLayer
	n := 2048
	for n < need {
		n *= 2
	}
	return n
}
