package train

import (
	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/llama"
)

// The layer-wise step is the training step for backends that cannot
// differentiate through quantized weights (CUDA's OUT_PROD is F32-only),
// with memory that does not grow with depth:
//
//  1. one forward graph keeps every layer's input (the activations are
//     small: embedding × tokens per layer); each layer multiplies by F32
//     copies of its weights made inside the graph, freed once it is done;
//  2. a graph for the head gives the loss and its gradient with respect to
//     the last layer's output;
//  3. from the last layer down, a graph per layer recomputes it from its
//     saved input and differentiates Σ output ⊙ incoming gradient, giving
//     the layer's adapter gradients and the gradient for the layer below.
//
// At most one layer's weights exist in F32 at a time, and each layer is
// computed twice (forward, then again in its backward graph): gradient
// checkpointing at layer granularity. The same path runs on the CPU, where
// the tests check its gradients against float64 finite differences.

// layerwise reports whether steps use the layer-wise path.
func (t *Trainer) layerwise() bool { return t.cfg.Layerwise || t.m.Placement.GPU != nil }

var dequantize = llama.LayerOptions{Dequantize: true}

// f32 is a weight as F32 (a cast node unless it is already F32).
func f32(ctx ml.Context, w ml.Tensor) ml.Tensor {
	if w.DType() == ml.DTypeF32 {
		return w
	}
	return w.Cast(ctx, ml.DTypeF32)
}

// layerParams maps each layer to the indices (in tensors() order) of its
// trainable tensors.
func (p *Params) layerParams() map[int][]int {
	out := map[int][]int{}
	i := 0
	for _, m := range p.Modules {
		for _, has := range []bool{m.A != nil, m.B != nil} {
			if has {
				out[m.Layer] = append(out[m.Layer], i)
				i++
			}
		}
	}
	return out
}

func (t *Trainer) computeLayerwise(b *batch, weight float64, ts []ml.Tensor, buf [][]float32) (float64, error) {
	m := t.m
	L, d, T := len(m.Layers), m.Params.Embedding, len(b.tokens)
	proj := newProjector(t.params)
	size := graphSize(m, t.params)
	be := m.Backend()
	ggmlx.EnsureGraphNodes(be, size)

	// 1. Forward, keeping each layer's input.
	ctx := be.NewContextSize(size)
	positions := ctx.Input().FromInts(b.positions, T)
	att := newAttention(ctx, m, b.S, b.B)
	h := m.TokenEmbedding.Forward(ctx, ctx.Input().FromInts(b.tokens, T))
	acts := []ml.Tensor{h}
	for i := range L {
		h = m.Layer(ctx, i, h, positions, nil, att, proj, dequantize)
		acts = append(acts, h)
	}
	if err := ggmlx.ComputeOutputs(ctx, acts, size); err != nil {
		ctx.Close()
		return 0, err
	}
	saved := make([][]float32, L+1)
	for i, a := range acts {
		saved[i] = ggmlx.ReadFloats(a)
	}
	ctx.Close()

	// 2. The head: loss, and its gradient for the last layer's output.
	grad := make([]float32, d*T)
	loss, err := func() (float64, error) {
		ctx := be.NewContextSize(size)
		defer ctx.Close()
		x := ctx.Input().FromFloats(saved[L], d, T)
		ggmlx.SetParam(x)
		rows, labels := targets(ctx, m, b)
		hidden := m.OutputNorm.Forward(ctx, x.Rows(ctx, rows), m.Params.Eps)
		loss := ggmlx.CrossEntropyLoss(ctx, f32(ctx, m.Output.Weight).Mulmat(ctx, hidden), labels)
		if weight != 1 {
			loss = loss.Scale(ctx, weight)
		}
		return t.backward(ctx, loss, []ml.Tensor{x}, size, [][]float32{grad})
	}()
	if err != nil {
		return 0, err
	}

	// 3. Layers, last to first.
	byLayer := t.params.layerParams()
	for i := L - 1; i >= 0; i-- {
		own := byLayer[i]
		if len(own) == 0 && i == 0 {
			break // nothing trains here or below
		}
		err := func() error {
			ctx := be.NewContextSize(size)
			defer ctx.Close()
			x := ctx.Input().FromFloats(saved[i], d, T)
			ggmlx.SetParam(x)
			positions := ctx.Input().FromInts(b.positions, T)
			out := m.Layer(ctx, i, x, positions, nil, newAttention(ctx, m, b.S, b.B), proj, dequantize)
			incoming := ctx.Input().FromFloats(grad, d, T)
			surrogate := out.Mul(ctx, incoming).Reshape(ctx, d*T).SumRows(ctx)
			// The input's gradient is the next layer down's incoming one
			// (not wanted below the first layer).
			params, grads := []ml.Tensor{x}, [][]float32{nil}
			if i > 0 {
				grads[0] = grad
			}
			for _, j := range own {
				params, grads = append(params, ts[j]), append(grads, buf[j])
			}
			_, err := t.backward(ctx, surrogate, params, size, grads)
			return err
		}()
		if err != nil {
			return 0, err
		}
	}
	return loss, nil
}
