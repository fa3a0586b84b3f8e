package kernels

import (
	"github.com/ollama/ollama/ml"
)

// Stack is the device tensors of one target module's adapter slots.
type Stack struct {
	In, Out int
	Idx     ml.Tensor // I32 [maxRank, slots]
	A       ml.Tensor // F32 [in, maxRank, slots]
	B       ml.Tensor // F32 [maxRank, out, slots]
}

func (st *stack) tensors() Stack { return Stack{In: st.in, Out: st.out, Idx: st.idx, A: st.a, B: st.b} }

// Op is one adapter application: a stack, the step's rank, and per-token
// routing (slot ids and scales for `used` adapters per token).
type Op struct {
	Stack  Stack
	Rank   int       // columns of each slot this step uses
	IDs    ml.Tensor // I32 [used, T]
	IDsRow ml.Tensor // I32 [used*T]
	Scales ml.Tensor // F32 [1, used, T]
}

func (o Op) used() int   { return o.IDs.Dim(0) }
func (o Op) tokens() int { return o.IDs.Dim(1) }

// rankFor clamps the step rank to what the fixed side can hold: an SBoRA
// module's indices are distinct, so its rank never exceeds limit.
func rankFor(rank, limit int) int { return min(rank, limit) }

// tokenIndex gathers each token's index list: [r*used, T] I32.
func (o Op) tokenIndex(ctx ml.Context, r int) ml.Tensor {
	nSlots := o.Stack.Idx.Dim(1)
	idx := o.Stack.Idx.View(ctx, 0, r, o.Stack.Idx.Stride(1), nSlots)
	return idx.Rows(ctx, o.IDsRow).Reshape(ctx, r*o.used(), o.tokens())
}

// sumUsed reduces y [out, used, T] (already scaled) over the used axis.
func (o Op) sumUsed(ctx ml.Context, y ml.Tensor, out int) ml.Tensor {
	n, T := o.used(), o.tokens()
	if n == 1 {
		return y.Reshape(ctx, out, T)
	}
	acc := y.View(ctx, 0, out, y.Stride(2), T)
	for a := 1; a < n; a++ {
		acc = acc.Add(ctx, y.View(ctx, a*y.Stride(1), out, y.Stride(2), T))
	}
	return acc
}

// FA computes h + Σ scale·B_slot·x[idx_slot]. x is [in, T], h is [out, T].
func (o Op) FA(ctx ml.Context, x, h ml.Tensor) ml.Tensor {
	st := o.Stack
	r := rankFor(o.Rank, st.In)
	n, T := o.used(), o.tokens()
	nSlots := st.B.Dim(2)
	// x[idx]: rows of one element, batched per token.
	xg := x.Reshape(ctx, 1, st.In, T).Rows(ctx, o.tokenIndex(ctx, r)).Reshape(ctx, r, n, T)
	b := st.B.View(ctx, 0, r, st.B.Stride(1), st.Out, st.B.Stride(2), nSlots)
	y := b.MulmatID(ctx, xg, o.IDs).Mul(ctx, o.Scales) // [out, used, T]
	return h.Add(ctx, o.sumUsed(ctx, y, st.Out))
}

// FB computes h with h[idx_slot] += scale·A_slot·x for each routed adapter.
func (o Op) FB(ctx ml.Context, x, h ml.Tensor) ml.Tensor {
	st := o.Stack
	r := rankFor(o.Rank, st.Out)
	n, T := o.used(), o.tokens()
	nSlots := st.A.Dim(2)
	a := st.A.View(ctx, 0, st.In, st.A.Stride(1), r, st.A.Stride(2), nSlots)
	y := a.MulmatID(ctx, x.Reshape(ctx, st.In, 1, T), o.IDs).Mul(ctx, o.Scales) // [r, used, T]
	idx := o.tokenIndex(ctx, r)                                                 // [r*used, T]
	h3 := h.Reshape(ctx, 1, st.Out, T)
	// One adapter at a time: composed adapters may touch the same rows.
	for k := 0; k < n; k++ {
		ik := idx.View(ctx, k*r*4, r, idx.Stride(1), T)
		yk := y.View(ctx, k*y.Stride(1), 1, 4, r, y.Stride(2), T)
		sum := h3.Rows(ctx, ik).Add(ctx, yk)
		h3 = h3.SetRows(ctx, sum, ik)
	}
	return h3.Reshape(ctx, st.Out, T)
}

// LoRA computes h + Σ scale·B_slot·(A_slot·x).
func (o Op) LoRA(ctx ml.Context, x, h ml.Tensor) ml.Tensor {
	st := o.Stack
	r := o.Rank
	T := o.tokens()
	nSlots := st.A.Dim(2)
	a := st.A.View(ctx, 0, st.In, st.A.Stride(1), r, st.A.Stride(2), nSlots)
	b := st.B.View(ctx, 0, r, st.B.Stride(1), st.Out, st.B.Stride(2), nSlots)
	y := a.MulmatID(ctx, x.Reshape(ctx, st.In, 1, T), o.IDs) // [r, used, T]
	z := b.MulmatID(ctx, y, o.IDs).Mul(ctx, o.Scales)        // [out, used, T]
	return h.Add(ctx, o.sumUsed(ctx, z, st.Out))
}
