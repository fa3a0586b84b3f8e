package llama

import (
	"fmt"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// EngineOptions size an Engine.
type EngineOptions struct {
	// Slots is the number of sequences that can hold KV cache at once.
	Slots int
	// SlotLen is each sequence's context length (prompt + generation).
	SlotLen int
	// CacheF32 stores keys and values as F32 instead of F16.
	CacheF32 bool
	// AdapterSlots is how many adapters of each variant can be resident.
	AdapterSlots int
	// MaxRank is the largest adapter rank accepted.
	MaxRank int
}

// Engine runs batched steps of a model: every sequence has a KV slot and may
// use its own adapters. An Engine is not safe for concurrent use; the server
// drives it from one goroutine.
type Engine struct {
	Model *Model
	Cache *Cache
	Bank  *kernels.Bank
}

// NewEngine allocates the KV cache and the adapter bank.
func NewEngine(m *Model, opts EngineOptions) (*Engine, error) {
	if opts.Slots <= 0 {
		opts.Slots = 1
	}
	if opts.SlotLen <= 0 {
		opts.SlotLen = min(m.Params.ContextLength, 4096)
	}
	if opts.AdapterSlots <= 0 {
		opts.AdapterSlots = 8
	}
	if opts.MaxRank <= 0 {
		opts.MaxRank = 64
	}
	dtype := ml.DTypeF16
	if opts.CacheF32 {
		dtype = ml.DTypeF32
	}
	cache, err := newCache(m, opts.Slots, opts.SlotLen, dtype)
	if err != nil {
		return nil, err
	}
	bank, err := kernels.NewBank(m.Backend(), m.AdapterBase, kernels.Config{Slots: opts.AdapterSlots, MaxRank: opts.MaxRank})
	if err != nil {
		cache.close()
		return nil, err
	}
	return &Engine{Model: m, Cache: cache, Bank: bank}, nil
}

// Close frees the cache and the adapter bank (not the model).
func (e *Engine) Close() {
	e.Bank.Close()
	e.Cache.close()
}

// Seq is one sequence's share of a step.
type Seq struct {
	// Slot is the sequence's KV slot; Pos is how many of its tokens are
	// already cached there (the position of Tokens[0]).
	Slot, Pos int
	Tokens    []int32
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
	spans, uses, tokens, positions, outputs, err := e.layout(seqs)
	if err != nil {
		return nil, err
	}
	routing, err := e.Bank.Route(uses)
	if err != nil {
		return nil, err
	}
	plan := planAttention(spans, e.Cache.SlotLen)
	ggmlx.EnsureGraphNodes(e.Model.Backend(), e.graphBudget(len(plan.groups), routing))

	ctx := e.Model.Backend().NewContext()
	defer ctx.Close()
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
	att := e.Cache.bind(ctx, e.Model, plan)
	hidden := e.Model.Transformer(ctx, tokT, posT, outT, att, proj)
	logits := e.Model.Logits(ctx, hidden)
	ctx.Forward(logits).Compute(logits)
	flat := logits.Floats()
	vocab := logits.Dim(0)

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

// layout validates the step and flattens it into batch rows.
func (e *Engine) layout(seqs []Seq) (spans []seqSpan, uses [][]kernels.Use, tokens, positions, outputs []int32, err error) {
	if len(seqs) == 0 {
		return nil, nil, nil, nil, nil, fmt.Errorf("empty step")
	}
	seen := map[int]bool{}
	vocab := int32(e.Model.Params.VocabSize)
	for _, s := range seqs {
		if s.Slot < 0 || s.Slot >= e.Cache.Slots {
			return nil, nil, nil, nil, nil, fmt.Errorf("slot %d out of range [0, %d)", s.Slot, e.Cache.Slots)
		}
		if seen[s.Slot] {
			return nil, nil, nil, nil, nil, fmt.Errorf("slot %d appears twice in one step", s.Slot)
		}
		seen[s.Slot] = true
		if len(s.Tokens) == 0 {
			return nil, nil, nil, nil, nil, fmt.Errorf("slot %d: no tokens", s.Slot)
		}
		if s.Pos < 0 || s.Pos+len(s.Tokens) > e.Cache.SlotLen {
			return nil, nil, nil, nil, nil, fmt.Errorf("slot %d: positions %d..%d exceed the context length %d", s.Slot, s.Pos, s.Pos+len(s.Tokens), e.Cache.SlotLen)
		}
		if len(s.Adapters) > kernels.MaxCompose {
			return nil, nil, nil, nil, nil, fmt.Errorf("slot %d: %d adapters, at most %d compose", s.Slot, len(s.Adapters), kernels.MaxCompose)
		}
		spans = append(spans, seqSpan{slot: s.Slot, pos0: s.Pos, n: len(s.Tokens), first: len(tokens)})
		for j, t := range s.Tokens {
			if t < 0 || t >= vocab {
				return nil, nil, nil, nil, nil, fmt.Errorf("slot %d: token %d out of vocabulary [0, %d)", s.Slot, t, vocab)
			}
			row := int32(len(tokens))
			tokens = append(tokens, t)
			positions = append(positions, int32(s.Pos+j))
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
func (e *Engine) graphBudget(groups int, r *kernels.Routing) int {
	perLayer := 48 + 12*groups + 7*r.NodesPerModule()
	need := 64 + len(e.Model.Layers)*perLayer
	n := 2048
	for n < need {
		n *= 2
	}
	return n
}
