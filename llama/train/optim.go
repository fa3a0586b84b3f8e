package train

import "math"

// AdamW is Adam with decoupled weight decay over flat parameter vectors.
type AdamW struct {
	Beta1, Beta2, Eps, WeightDecay float64
	Step                           int         // updates done
	M, V                           [][]float32 // moments, one slice per parameter tensor
}

func newAdamW(vals [][]float32, weightDecay float64) *AdamW {
	o := &AdamW{Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, WeightDecay: weightDecay}
	for _, v := range vals {
		o.M = append(o.M, make([]float32, len(v)))
		o.V = append(o.V, make([]float32, len(v)))
	}
	return o
}

// Update applies one step with learning rate lr to vals given grads.
func (o *AdamW) Update(vals [][]float32, grads [][]float64, lr float64) {
	o.Step++
	bc1 := 1 - math.Pow(o.Beta1, float64(o.Step))
	bc2 := 1 - math.Pow(o.Beta2, float64(o.Step))
	for i, v := range vals {
		m, s, g := o.M[i], o.V[i], grads[i]
		for j := range v {
			mj := o.Beta1*float64(m[j]) + (1-o.Beta1)*g[j]
			sj := o.Beta2*float64(s[j]) + (1-o.Beta2)*g[j]*g[j]
			m[j], s[j] = float32(mj), float32(sj)
			x := float64(v[j])
			x -= lr * o.WeightDecay * x
			x -= lr * (mj / bc1) / (math.Sqrt(sj/bc2) + o.Eps)
			v[j] = float32(x)
		}
	}
}

// clipGrads scales grads so their global L2 norm is at most maxNorm (0 =
// no clipping) and returns the norm before clipping.
func clipGrads(grads [][]float64, maxNorm float64) float64 {
	sum := 0.0
	for _, g := range grads {
		for _, x := range g {
			sum += x * x
		}
	}
	norm := math.Sqrt(sum)
	if maxNorm > 0 && norm > maxNorm {
		f := maxNorm / (norm + 1e-12)
		for _, g := range grads {
			for j := range g {
				g[j] *= f
			}
		}
	}
	return norm
}

// learningRate is the schedule: linear warmup, then constant or cosine
// decay to zero at the last step.
func learningRate(base float64, step, warmup, total int, schedule string) float64 {
	if warmup > 0 && step < warmup {
		return base * float64(step+1) / float64(warmup)
	}
	if schedule == "cosine" && total > warmup {
		progress := float64(step-warmup) / float64(max(1, total-warmup))
		return base * 0.5 * (1 + math.Cos(math.Pi*min(progress, 1)))
	}
	return base
}
