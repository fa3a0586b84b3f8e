// Package refmodel is a float64 LLaMA forward pass in plain Go, written
// from the GGUF conventions (not from the engine), for tests: finite
// differences of the training loss and cross-checks of the engine.
// It is slow and meant for tiny models.
package refmodel

import (
	"fmt"
	"math"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// Model holds dequantized weights in float64.
type Model struct {
	Layers, Embd, Heads, KVHeads, HeadDim, RopeDim, Vocab int
	RopeBase, RopeScale, Eps                              float64
	w                                                     map[string]*matrix
	ropeFactors                                           []float64
}

type matrix struct {
	in, out int
	v       []float64 // out rows of in
}

// Load reads every tensor of a llama GGUF as float64.
func Load(path string) (*Model, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	get := func(k string, def float64) float64 {
		if v, ok := f.KV.Float("llama." + k); ok {
			return v
		}
		return def
	}
	m := &Model{w: map[string]*matrix{}}
	m.Layers = int(get("block_count", 0))
	m.Embd = int(get("embedding_length", 0))
	m.Heads = int(get("attention.head_count", 0))
	m.KVHeads = int(get("attention.head_count_kv", float64(m.Heads)))
	m.HeadDim = m.Embd / m.Heads
	m.RopeDim = int(get("rope.dimension_count", float64(m.HeadDim)))
	m.RopeBase = get("rope.freq_base", 10000)
	m.RopeScale = 1
	if s := get("rope.scaling.factor", 0); s != 0 {
		m.RopeScale = 1 / s
	}
	m.Eps = get("attention.layer_norm_rms_epsilon", 1e-5)
	for _, t := range f.Tensors {
		data, err := f.ReadTensor(t)
		if err != nil {
			return nil, err
		}
		v32, err := ggmlx.Dequantize(uint32(t.Type), data, int(t.Elements()))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", t.Name, err)
		}
		mt := &matrix{in: int(t.Shape[0]), out: 1, v: make([]float64, len(v32))}
		if len(t.Shape) > 1 {
			mt.out = int(t.Shape[1])
		}
		for i, x := range v32 {
			mt.v[i] = float64(x)
		}
		m.w[t.Name] = mt
	}
	if rf, ok := m.w["rope_freqs.weight"]; ok {
		m.ropeFactors = rf.v
	}
	m.Vocab = m.w["token_embd.weight"].out
	return m, nil
}

// Update is an adapter applied at a scale (user scale; alpha/r is added).
type Update struct {
	Adapter *adapters.Adapter
	Scale   float64
}

func (m *Model) weight(name string) *matrix {
	if w, ok := m.w[name]; ok {
		return w
	}
	if name == "output.weight" {
		return m.w["token_embd.weight"]
	}
	panic("refmodel: missing " + name)
}

// project computes W·x plus the adapter updates for target t.
func (m *Model) project(t adapters.Target, x []float64, ups []Update) []float64 {
	w := m.weight(t.WeightName())
	y := matvec(w, x)
	for _, u := range ups {
		mw := u.Adapter.Module(t)
		if mw == nil {
			continue
		}
		s := u.Scale * float64(u.Adapter.Alpha) / float64(u.Adapter.Rank)
		r := u.Adapter.Rank
		switch u.Adapter.Variant {
		case adapters.FA:
			for o := 0; o < mw.Out; o++ {
				acc := 0.0
				for j, col := range mw.Index {
					acc += float64(mw.B[o*r+j]) * x[col]
				}
				y[o] += s * acc
			}
		case adapters.FB:
			for j, row := range mw.Index {
				acc := 0.0
				for i := 0; i < mw.In; i++ {
					acc += float64(mw.A[j*mw.In+i]) * x[i]
				}
				y[row] += s * acc
			}
		case adapters.LoRA:
			ax := make([]float64, r)
			for j := 0; j < r; j++ {
				for i := 0; i < mw.In; i++ {
					ax[j] += float64(mw.A[j*mw.In+i]) * x[i]
				}
			}
			for o := 0; o < mw.Out; o++ {
				acc := 0.0
				for j := 0; j < r; j++ {
					acc += float64(mw.B[o*r+j]) * ax[j]
				}
				y[o] += s * acc
			}
		}
	}
	return y
}

func matvec(w *matrix, x []float64) []float64 {
	y := make([]float64, w.out)
	for o := 0; o < w.out; o++ {
		row := w.v[o*w.in : (o+1)*w.in]
		acc := 0.0
		for i, v := range row {
			acc += v * x[i]
		}
		y[o] = acc
	}
	return y
}

func (m *Model) rmsnorm(x []float64, name string) []float64 {
	w := m.weight(name).v
	ss := 0.0
	for _, v := range x {
		ss += v * v
	}
	f := 1 / math.Sqrt(ss/float64(len(x))+m.Eps)
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = v * f * w[i]
	}
	return out
}

// rope rotates pairs (x[2i], x[2i+1]) of each head (ggml's normal mode).
func (m *Model) rope(x []float64, heads, pos int) {
	for h := 0; h < heads; h++ {
		v := x[h*m.HeadDim : (h+1)*m.HeadDim]
		for i0 := 0; i0 < m.RopeDim; i0 += 2 {
			theta := float64(pos) * math.Pow(m.RopeBase, -float64(i0)/float64(m.RopeDim))
			if m.ropeFactors != nil {
				theta /= m.ropeFactors[i0/2]
			}
			theta *= m.RopeScale
			c, s := math.Cos(theta), math.Sin(theta)
			a, b := v[i0], v[i0+1]
			v[i0], v[i0+1] = a*c-b*s, a*s+b*c
		}
	}
}

// Logits runs one sequence from position 0 and returns every position's
// logits.
func (m *Model) Logits(tokens []int32, ups []Update) [][]float64 {
	T := len(tokens)
	emb := m.weight("token_embd.weight")
	hidden := make([][]float64, T)
	for t, tok := range tokens {
		hidden[t] = append([]float64(nil), emb.v[int(tok)*emb.in:(int(tok)+1)*emb.in]...)
	}
	group := m.Heads / m.KVHeads
	for l := 0; l < m.Layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		tg := func(mod adapters.Module) adapters.Target { return adapters.Target{Layer: l, Module: mod} }
		qs, ks, vs := make([][]float64, T), make([][]float64, T), make([][]float64, T)
		for t := 0; t < T; t++ {
			x := m.rmsnorm(hidden[t], p+"attn_norm.weight")
			qs[t], ks[t], vs[t] = m.project(tg(adapters.Q), x, ups), m.project(tg(adapters.K), x, ups), m.project(tg(adapters.V), x, ups)
			m.rope(qs[t], m.Heads, t)
			m.rope(ks[t], m.KVHeads, t)
		}
		scale := 1 / math.Sqrt(float64(m.HeadDim))
		for t := 0; t < T; t++ {
			att := make([]float64, m.Heads*m.HeadDim)
			for h := 0; h < m.Heads; h++ {
				kh := h / group
				q := qs[t][h*m.HeadDim : (h+1)*m.HeadDim]
				scores := make([]float64, t+1)
				mx := math.Inf(-1)
				for s := 0; s <= t; s++ {
					k := ks[s][kh*m.HeadDim : (kh+1)*m.HeadDim]
					dot := 0.0
					for d := range q {
						dot += q[d] * k[d]
					}
					scores[s] = dot * scale
					mx = math.Max(mx, scores[s])
				}
				sum := 0.0
				for s := range scores {
					scores[s] = math.Exp(scores[s] - mx)
					sum += scores[s]
				}
				for s := range scores {
					v := vs[s][kh*m.HeadDim : (kh+1)*m.HeadDim]
					for d := 0; d < m.HeadDim; d++ {
						att[h*m.HeadDim+d] += scores[s] / sum * v[d]
					}
				}
			}
			o := m.project(tg(adapters.O), att, ups)
			for i := range hidden[t] {
				hidden[t][i] += o[i]
			}
			x := m.rmsnorm(hidden[t], p+"ffn_norm.weight")
			gate, up := m.project(tg(adapters.Gate), x, ups), m.project(tg(adapters.Up), x, ups)
			for i := range gate {
				gate[i] = gate[i] / (1 + math.Exp(-gate[i])) * up[i]
			}
			down := m.project(tg(adapters.Down), gate, ups)
			for i := range hidden[t] {
				hidden[t][i] += down[i]
			}
		}
	}
	out := make([][]float64, T)
	for t := 0; t < T; t++ {
		out[t] = matvec(m.weight("output.weight"), m.rmsnorm(hidden[t], "output_norm.weight"))
	}
	return out
}

// CrossEntropy is -log softmax(logits)[target].
func CrossEntropy(logits []float64, target int32) float64 {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, v)
	}
	sum := 0.0
	for _, v := range logits {
		sum += math.Exp(v - mx)
	}
	return -(logits[target] - mx - math.Log(sum))
}
