package kernels

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
)

// Use asks for one resident adapter at a user scale (1 = as trained).
type Use struct {
	Adapter *Resident
	Scale   float32
}

// Routing is the host-side plan of one step: which slots and scales each
// token uses, per variant. Build it with Bank.Route, then Bind it to the
// step's graph context.
type Routing struct {
	bank     *Bank
	tokens   int
	variants []*variantRoute
}

type variantRoute struct {
	variant adapters.Variant
	used    int       // adapters per token (max over tokens)
	rank    int       // largest rank among the used adapters
	ids     []int32   // [used, tokens]: FA's B slots, FB's and LoRA's A slots; 0 = none
	idsB    []int32   // [used, tokens]: LoRA's B slots
	scales  []float32 // [used, tokens]
	targets map[adapters.Target]bool
}

// Route plans a step. uses[t] lists the adapters of token t (at most
// MaxCompose); tokens with no adapters may have an empty list.
func (b *Bank) Route(uses [][]Use) (*Routing, error) {
	r := &Routing{bank: b, tokens: len(uses)}
	for _, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		vr := &variantRoute{variant: v, targets: map[adapters.Target]bool{}}
		for _, u := range uses {
			if len(u) > MaxCompose {
				return nil, fmt.Errorf("a sequence may compose at most %d adapters, got %d", MaxCompose, len(u))
			}
			n := 0
			for _, x := range u {
				if x.Adapter.variant == v {
					n++
				}
			}
			vr.used = max(vr.used, n)
		}
		if vr.used == 0 {
			continue
		}
		vr.ids = make([]int32, vr.used*len(uses))
		if v == adapters.LoRA {
			vr.idsB = make([]int32, vr.used*len(uses))
		}
		vr.scales = make([]float32, vr.used*len(uses))
		for t, u := range uses {
			k := 0
			for _, x := range u {
				if x.Adapter.variant != v {
					continue
				}
				if !x.Adapter.active || x.Adapter.bank != b {
					return nil, fmt.Errorf("adapter %q is not resident", x.Adapter.Adapter.Name)
				}
				i := t*vr.used + k
				vr.ids[i] = int32(x.Adapter.Slot())
				if v == adapters.LoRA {
					vr.idsB[i] = int32(x.Adapter.slot[halfB])
				}
				vr.scales[i] = x.Scale * x.Adapter.scale
				vr.rank = max(vr.rank, x.Adapter.rank)
				for tg := range x.Adapter.targets {
					vr.targets[tg] = true
				}
				k++
			}
		}
		r.variants = append(r.variants, vr)
	}
	return r, nil
}

// Empty reports whether no token uses any adapter.
func (r *Routing) Empty() bool { return len(r.variants) == 0 }

// Projector adds adapter updates to a projection: given the input x [in, T]
// and the base output h = W·x [out, T], Project returns h plus every update
// that targets t. The model calls it for every projection of every layer.
type Projector interface {
	Project(ctx ml.Context, t adapters.Target, x, h ml.Tensor) ml.Tensor
	// Select returns the projector for a subset of the batch rows (the last
	// layer computes its MLP only for the rows whose logits are wanted).
	Select(ctx ml.Context, rows ml.Tensor) Projector
}

// Bound is a Routing with its inputs created in a step's graph context. It
// implements the engine's projection hook.
type Bound struct {
	routing  *Routing
	variants []boundVariant
}

type boundVariant struct {
	*variantRoute
	ids    ml.Tensor // I32 [used, T]
	idsRow ml.Tensor // I32 [used*T] (same data)
	idsB   ml.Tensor // I32 [used, T] (LoRA)
	scales ml.Tensor // F32 [1, used, T]
}

// Bind creates the routing's input tensors in ctx (an input context of the
// step's graph).
func (r *Routing) Bind(ctx ml.Context) *Bound {
	b := &Bound{routing: r}
	for _, vr := range r.variants {
		ids := ctx.Input().FromInts(vr.ids, vr.used, r.tokens)
		bv := boundVariant{
			variantRoute: vr,
			ids:          ids,
			idsRow:       ids.Reshape(ctx, vr.used*r.tokens),
			scales:       ctx.Input().FromFloats(vr.scales, 1, vr.used, r.tokens),
		}
		if vr.idsB != nil {
			bv.idsB = ctx.Input().FromInts(vr.idsB, vr.used, r.tokens)
		}
		b.variants = append(b.variants, bv)
	}
	return b
}

// Signature writes what of the routing shapes a step's graph: per variant
// the adapters per token, the rank and the modules targeted.
func (r *Routing) Signature(b *strings.Builder) {
	for _, v := range r.variants {
		ts := make([]adapters.Target, 0, len(v.targets))
		for t := range v.targets {
			ts = append(ts, t)
		}
		sort.Slice(ts, func(i, j int) bool {
			if ts[i].Layer != ts[j].Layer {
				return ts[i].Layer < ts[j].Layer
			}
			return ts[i].Module < ts[j].Module
		})
		fmt.Fprintf(b, "%s%d,%d:", v.variant, v.used, v.rank)
		for _, t := range ts {
			fmt.Fprintf(b, "%d.%d,", t.Layer, t.Module)
		}
		b.WriteByte(';')
	}
}

// Update writes the routing of a step with the same signature into the
// bound inputs, skipping tables that did not change.
func (b *Bound) Update(r *Routing) {
	for i, vr := range r.variants {
		v := &b.variants[i]
		if !slices.Equal(v.variantRoute.ids, vr.ids) {
			v.ids.FromInts(vr.ids)
		}
		if vr.idsB != nil && !slices.Equal(v.variantRoute.idsB, vr.idsB) {
			v.idsB.FromInts(vr.idsB)
		}
		if !slices.Equal(v.variantRoute.scales, vr.scales) {
			v.scales.FromFloats(vr.scales)
		}
		v.variantRoute = vr
	}
	b.routing = r
}

// Select restricts the routing to the batch rows listed in rows.
func (b *Bound) Select(ctx ml.Context, rows ml.Tensor) Projector {
	if b == nil {
		return b
	}
	n := rows.Dim(0)
	out := &Bound{routing: b.routing}
	for _, v := range b.variants {
		ids := v.ids.Rows(ctx, rows) // [used, n]
		bv := boundVariant{
			variantRoute: v.variantRoute,
			ids:          ids,
			idsRow:       ids.Reshape(ctx, v.used*n),
			scales:       v.scales.Reshape(ctx, v.used, b.routing.tokens).Rows(ctx, rows).Reshape(ctx, 1, v.used, n),
		}
		if v.idsB != nil {
			bv.idsB = v.idsB.Rows(ctx, rows)
		}
		out.variants = append(out.variants, bv)
	}
	return out
}

// Project adds the updates of every routed adapter that targets t to h, the
// base projection of x. x is [in, T], h is [out, T].
func (b *Bound) Project(ctx ml.Context, t adapters.Target, x, h ml.Tensor) ml.Tensor {
	if b == nil {
		return h
	}
	for i := range b.variants {
		v := &b.variants[i]
		if !v.targets[t] {
			continue
		}
		st := b.routing.bank.stacks[t]
		if st == nil {
			continue
		}
		op := Op{Stack: st.tensors(), Rank: v.rank, IDs: v.ids, IDsRow: v.idsRow, IDsB: v.idsB, Scales: v.scales}
		switch v.variant {
		case adapters.FA:
			h = op.FA(ctx, x, h)
		case adapters.FB:
			h = op.FB(ctx, x, h)
		case adapters.LoRA:
			h = op.LoRA(ctx, x, h)
		}
	}
	return h
}

// MaxNodesPerModule bounds NodesPerModule for any routing (every variant,
// MaxCompose adapters each).
const MaxNodesPerModule = 28 + 10*MaxCompose

// NodesPerModule bounds the graph nodes the routed adapters add to one
// projection, for sizing the step graph.
func (r *Routing) NodesPerModule() int {
	n := 0
	for _, v := range r.variants {
		switch v.variant {
		case adapters.FA:
			n += 10 + 2*v.used
		case adapters.FB:
			n += 8 + 6*v.used
		case adapters.LoRA:
			n += 10 + 2*v.used
		}
	}
	return n
}
