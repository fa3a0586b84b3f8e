package llama

import (
	"fmt"

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
	pool, err := newKVPool(m, blocks, opts.BlockSize, dtype, !opts.NoPrefixCache)
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
	return &Engine{Model: m, Pool: pool, Bank: bank, MaxSeqLen: opts.MaxSeqLen}, nil
}

// Close frees the KV pool and the adapter bank (not the model).
func (e *Engine) Close() {
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
func (e *Engine) Step(seqs []Seq) ([][][]float32, error) {
	ctx, logits, err := e.build(seqs)
	if err != nil {
		return nil, err
	}
	defer ctx.Close()
	ctx.Forward(logits).Compute(logits)
	flat := logits.Floats()
	vocab := logits.Dim(0)
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

// build lays out a step and builds its graph in a new context (the caller
// closes it); the returned tensor is the logits.
func (e *Engine) build(seqs []Seq) (ml.Context, ml.Tensor, error) {
	spans, uses, tokens, positions, outputs, err := e.layout(seqs)
	if err != nil {
		return nil, nil, err
	}
	routing, err := e.Bank.Route(uses)
	if err != nil {
		return nil, nil, err
	}
	plan := planAttention(spans, e.Pool.BlockSize)
	ggmlx.EnsureGraphNodes(e.Model.Backend(), e.graphBudget(len(plan.groups), routing.NodesPerModule()))

	ctx := e.Model.Backend().NewContext()
	ctx.SetBatchSize(len(tokens))
	tokT := ctx.Input().FromInts(tokens, len(tokens))
	posT := ctx.Input().FromInts(positions, len(positions))
	var outT ml.Tensor
	if len(outputs) == 0 {
		// Nothing to return: still run the layers to fill the cache, keeping
		// one row so the graph has an output.
		outputs = []int32{0}
	}
	if len(outputs) != len(tokens) || !isIdentity(outputs) {
		outT = ctx.Input().FromInts(outputs, len(outputs))
	}
	var proj Projector
	if !routing.Empty() {
		proj = routing.Bind(ctx)
	}
	att := e.Pool.bind(ctx, e.Model, plan)
	hidden := e.Model.Transformer(ctx, tokT, posT, outT, att, proj)
	return ctx, e.Model.Logits(ctx, hidden), nil
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
	ggmlx.EnsureGraphNodes(e.Model.Backend(), e.graphBudget(2*parallel+1, kernels.MaxNodesPerModule))
	ctx, logits, err := e.build(seqs)
	if err != nil {
		return 0, err
	}
	defer ctx.Close()
	ctx.Forward(logits).Reserve()
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
