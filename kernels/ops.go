package kernels

import (
	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
)

// Stack is the device tensors of one target module's adapter slots.
type Stack struct {
	In, Out int
	IdxA    ml.Tensor // I32 [maxRank, slots]: FB's output rows, per A slot
	IdxB    ml.Tensor // I32 [maxRank, slots]: FA's input columns, per B slot
	A       ml.Tensor // [in, maxRank, slots]  (F16, F32 or Q8_0)
	B       ml.Tensor // [maxRank, out, slots] (F16, F32 or Q8_0)
	// BBlock is the block size of B's rows: a view of the first r columns
	// must cover whole blocks.
	BBlock int
	// Fused: the stacks live in host memory (the CPU backend) in a type
	// the fused CPU ops read, which then replace mul_mat_id for the
	// out×r products and the gathers and scatters around them.
	Fused bool
}

func (st *stack) tensors() Stack {
	blk, _ := ggmlx.TypeLayout(st.bType)
	return Stack{In: st.in, Out: st.out, IdxA: st.idx[halfA], IdxB: st.idx[halfB], A: st.a, B: st.b, BBlock: blk, Fused: st.fused}
}

// Op is one adapter application: a stack, the step's rank, and per-token
// routing (slot ids and scales for `used` adapters per token).
type Op struct {
	Stack  Stack
	Rank   int       // columns of each slot this step uses
	IDs    ml.Tensor // I32 [used, T]: FA's B slots, FB's and LoRA's A slots
	IDsRow ml.Tensor // I32 [used*T]
	IDsB   ml.Tensor // I32 [used, T]: LoRA's B slots
	Scales ml.Tensor // F32 [1, used, T]
}

func (o Op) used() int   { return o.IDs.Dim(0) }
func (o Op) tokens() int { return o.IDs.Dim(1) }

// rankFor clamps the step rank to what the fixed side can hold (an SBoRA
// module's indices are distinct, so its rank never exceeds limit) and
// rounds it up to whole blocks of B's rows.
func (o Op) rankFor(limit int) int {
	r := min(o.Rank, limit)
	if blk := o.Stack.BBlock; blk > 1 {
		r = min((r+blk-1)/blk*blk, o.Stack.B.Dim(0))
	}
	return r
}

// tokenIndex gathers each token's index list: [r*used, T] I32.
func (o Op) tokenIndex(ctx ml.Context, table ml.Tensor, r int) ml.Tensor {
	nSlots := table.Dim(1)
	idx := table.View(ctx, 0, r, table.Stride(1), nSlots)
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
	r := o.rankFor(st.In)
	if st.Fused {
		return ggmlx.ExpandFA(ctx, h, st.B, st.IdxB, o.IDs, o.Scales, x, r)
	}
	n, T := o.used(), o.tokens()
	nSlots := st.B.Dim(2)
	// x[idx]: rows of one element, batched per token.
	xg := x.Reshape(ctx, 1, st.In, T).Rows(ctx, o.tokenIndex(ctx, st.IdxB, r)).Reshape(ctx, r, n, T)
	b := st.B.View(ctx, 0, r, st.B.Stride(1), st.Out, st.B.Stride(2), nSlots)
	y := b.MulmatID(ctx, xg, o.IDs).Mul(ctx, o.Scales) // [out, used, T]
	return h.Add(ctx, o.sumUsed(ctx, y, st.Out))
}

// FB computes h with h[idx_slot] += scale·A_slot·x for each routed adapter.
func (o Op) FB(ctx ml.Context, x, h ml.Tensor) ml.Tensor {
	st := o.Stack
	r := min(o.Rank, st.Out)
	n, T := o.used(), o.tokens()
	nSlots := st.A.Dim(2)
	a := st.A.View(ctx, 0, st.In, st.A.Stride(1), r, st.A.Stride(2), nSlots)
	if st.Fused {
		y := a.MulmatID(ctx, x.Reshape(ctx, st.In, 1, T), o.IDs) // [r, used, T]
		return ggmlx.ScatterFB(ctx, h, st.IdxA, o.IDs, o.Scales, y, r)
	}
	y := a.MulmatID(ctx, x.Reshape(ctx, st.In, 1, T), o.IDs).Mul(ctx, o.Scales) // [r, used, T]
	idx := o.tokenIndex(ctx, st.IdxA, r)                                        // [r*used, T]
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
	r := o.rankFor(o.Rank)
	T := o.tokens()
	nSlots := st.A.Dim(2)
	a := st.A.View(ctx, 0, st.In, st.A.Stride(1), r, st.A.Stride(2), nSlots)
	b := st.B.View(ctx, 0, r, st.B.Stride(1), st.Out, st.B.Stride(2), nSlots)
	y := a.MulmatID(ctx, x.Reshape(ctx, st.In, 1, T), o.IDs) // [r, used, T]
	if st.Fused {
		return ggmlx.ExpandZ(ctx, h, st.B, o.IDsB, o.Scales, y, r)
	}
	z := b.MulmatID(ctx, y, o.IDsB).Mul(ctx, o.Scales) // [out, used, T]
	return h.Add(ctx, o.sumUsed(ctx, z, st.Out))
}
