package train

import (
	"math"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/llama"
)

// attention is full causal attention over B sequences of S positions laid
// out sequence-major. Heads and sequences share dimension 2 so that
// mul_mat's GQA broadcast stays differentiable (ggml's backward of a
// broadcast mul_mat needs dimension 3 to be 1).
type attention struct {
	m    *llama.Model
	S, B int
	mask ml.Tensor // F32 [S, S]: 0 on and below the diagonal, -inf above
}

func newAttention(ctx ml.Context, m *llama.Model, S, B int) *attention {
	mask := make([]float32, S*S)
	for q := 0; q < S; q++ {
		for k := q + 1; k < S; k++ {
			mask[q*S+k] = float32(math.Inf(-1))
		}
	}
	return &attention{m: m, S: S, B: B, mask: ctx.Input().FromFloats(mask, S, S)}
}

func (a *attention) Attend(ctx ml.Context, layer int, q, k, v ml.Tensor) ml.Tensor {
	c := a.m.Params
	S, B, hd := a.S, a.B, c.HeadDim
	q = q.Reshape(ctx, hd, c.Heads, S, B).Permute(ctx, 0, 2, 1, 3).Contiguous(ctx).Reshape(ctx, hd, S, c.Heads*B)
	k = k.Reshape(ctx, hd, c.KVHeads, S, B).Permute(ctx, 0, 2, 1, 3).Contiguous(ctx).Reshape(ctx, hd, S, c.KVHeads*B)
	v = v.Reshape(ctx, hd, c.KVHeads, S, B).Permute(ctx, 1, 2, 0, 3).Contiguous(ctx).Reshape(ctx, S, hd, c.KVHeads*B)
	kq := ggmlx.SoftMaxExt(ctx, k.Mulmat(ctx, q), a.mask, float32(a.m.AttentionScale())) // [S_k, S_q, heads·B]
	out := v.Mulmat(ctx, kq)                                                             // [hd, S_q, heads·B]
	return out.Reshape(ctx, hd, S, c.Heads, B).Permute(ctx, 0, 2, 1, 3).Contiguous(ctx).Reshape(ctx, hd*c.Heads, S*B)
}

// batch is B examples padded to S positions, with the rows and labels of
// every loss target.
type batch struct {
	S, B      int
	tokens    []int32
	positions []int32
	rows      []int32 // batch rows whose next token is a target
	labels    []int32 // those targets
}

// makeBatch lays out examples (each at most S tokens).
func makeBatch(exs []*Example, S int) *batch {
	b := &batch{S: S, B: len(exs)}
	b.tokens = make([]int32, S*len(exs))
	b.positions = make([]int32, S*len(exs))
	for i, ex := range exs {
		for s := 0; s < S; s++ {
			b.positions[i*S+s] = int32(s)
			if s < len(ex.Tokens) {
				b.tokens[i*S+s] = ex.Tokens[s]
			}
		}
		for s := 1; s < len(ex.Tokens); s++ {
			if ex.Loss[s] {
				b.rows = append(b.rows, int32(i*S+s-1))
				b.labels = append(b.labels, ex.Tokens[s])
			}
		}
	}
	return b
}

// lossGraph builds the forward pass and the mean cross-entropy over the
// batch's targets, scaled by weight; it returns the scaled loss tensor.
func lossGraph(ctx ml.Context, m *llama.Model, p *projector, b *batch, weight float64) ml.Tensor {
	tokens := ctx.Input().FromInts(b.tokens, len(b.tokens))
	positions := ctx.Input().FromInts(b.positions, len(b.positions))
	rows, labels := targets(ctx, m, b)
	var proj llama.Projector
	if p != nil {
		proj = p
	}
	hidden := m.Transformer(ctx, tokens, positions, rows, newAttention(ctx, m, b.S, b.B), proj)
	loss := ggmlx.CrossEntropyLoss(ctx, m.Logits(ctx, hidden), labels)
	if weight != 1 {
		loss = loss.Scale(ctx, weight)
	}
	return loss
}

// targets are the batch's target rows and their labels one-hot [vocab, n].
func targets(ctx ml.Context, m *llama.Model, b *batch) (rows, labels ml.Tensor) {
	vocab := m.Params.VocabSize
	onehot := make([]float32, vocab*len(b.labels))
	for i, l := range b.labels {
		onehot[i*vocab+int(l)] = 1
	}
	return ctx.Input().FromInts(b.rows, len(b.rows)), ctx.Input().FromFloats(onehot, vocab, len(b.labels))
}
