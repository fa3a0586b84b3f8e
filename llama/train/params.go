package train

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/llama"
)

// Params is an adapter being trained: host values (the source of truth),
// device tensors marked trainable, and the fixed one-hot factors.
type Params struct {
	Variant adapters.Variant
	Rank    int
	Alpha   float32
	Modules []*Module
	ctx     ml.Context
}

// Module is one target module's trainable matrices.
type Module struct {
	adapters.Target
	In, Out int
	Index   []int32 // FA/FB
	// Trainable values, PyTorch orientation (A r×in, B out×r).
	A, B []float32
	// Device tensors: trainable a [in, r] and/or b [r, out]; the fixed
	// one-hot factor of SBoRA as dense oneA [in, r] (FA) or oneB [r, out] (FB).
	a, b, oneA, oneB ml.Tensor
}

// tensors lists the trainable host values and, once uploaded, their device
// tensors, in one fixed order (per module: A, then B).
func (p *Params) tensors() (ts []ml.Tensor, vals [][]float32) {
	for _, m := range p.Modules {
		if m.A != nil {
			ts, vals = append(ts, m.a), append(vals, m.A)
		}
		if m.B != nil {
			ts, vals = append(ts, m.b), append(vals, m.B)
		}
	}
	return ts, vals
}

// Count is the number of trainable values.
func (p *Params) Count() int {
	n := 0
	for _, m := range p.Modules {
		n += len(m.A) + len(m.B)
	}
	return n
}

// InitOptions describe a fresh adapter.
type InitOptions struct {
	Variant adapters.Variant
	Rank    int
	Alpha   float32
	Targets []adapters.Module
	Seed    uint64
	// Avoid lists adapters whose indices the new one must not reuse, so
	// that they compose without crosstalk.
	Avoid []*adapters.Adapter
}

// NewParams initialises an adapter for m: SBoRA indices chosen with a
// seeded generator (avoiding Avoid's), the trainable SBoRA matrix zero (as
// in the reference), LoRA A uniform(±1/sqrt(in)) and B zero (as PEFT).
func NewParams(m *llama.Model, o InitOptions) (*Params, error) {
	if o.Rank <= 0 {
		return nil, fmt.Errorf("rank must be positive")
	}
	if o.Alpha == 0 {
		o.Alpha = float32(2 * o.Rank)
	}
	targets := slices.Clone(o.Targets)
	slices.Sort(targets) // canonical order, as adapters store modules
	targets = slices.Compact(targets)
	rng := rand.New(rand.NewPCG(o.Seed, 0x7a1))
	p := &Params{Variant: o.Variant, Rank: o.Rank, Alpha: o.Alpha}
	for l := 0; l < m.Params.Layers; l++ {
		for _, mod := range targets {
			t := adapters.Target{Layer: l, Module: mod}
			in, out, ok := m.AdapterBase.Shape(t)
			if !ok {
				return nil, fmt.Errorf("base model has no weight %s", t.WeightName())
			}
			mw := &Module{Target: t, In: in, Out: out}
			avoid := map[int32]bool{}
			for _, a := range o.Avoid {
				if a.Variant == o.Variant || a.Variant == adapters.LoRA {
					if other := a.Module(t); other != nil {
						for _, x := range other.Index {
							avoid[x] = true
						}
					}
				}
			}
			var err error
			switch o.Variant {
			case adapters.FA:
				if mw.Index, err = adapters.ChooseIndices(rng, in, o.Rank, avoid); err != nil {
					return nil, fmt.Errorf("%s: %w", t, err)
				}
				mw.B = make([]float32, out*o.Rank)
			case adapters.FB:
				if mw.Index, err = adapters.ChooseIndices(rng, out, o.Rank, avoid); err != nil {
					return nil, fmt.Errorf("%s: %w", t, err)
				}
				mw.A = make([]float32, o.Rank*in)
			case adapters.LoRA:
				mw.A = make([]float32, o.Rank*in)
				bound := float32(1 / math.Sqrt(float64(in)))
				for i := range mw.A {
					mw.A[i] = bound * (2*rng.Float32() - 1)
				}
				mw.B = make([]float32, out*o.Rank)
			default:
				return nil, fmt.Errorf("unknown variant %q", o.Variant)
			}
			p.Modules = append(p.Modules, mw)
		}
	}
	return p, nil
}

// FromAdapter wraps an existing adapter's values for further training.
func FromAdapter(a *adapters.Adapter) *Params {
	p := &Params{Variant: a.Variant, Rank: a.Rank, Alpha: a.Alpha}
	for _, m := range a.Modules {
		p.Modules = append(p.Modules, &Module{Target: m.Target, In: m.In, Out: m.Out,
			Index: slices.Clone(m.Index), A: slices.Clone(m.A), B: slices.Clone(m.B)})
	}
	return p
}

// Adapter returns the current values as an adapter for base.
func (p *Params) Adapter(name string, base *adapters.Base) *adapters.Adapter {
	a := &adapters.Adapter{Name: name, Variant: p.Variant, Rank: p.Rank, Alpha: p.Alpha, BaseArch: base.Arch, BaseFingerprint: base.Fingerprint}
	for _, m := range p.Modules {
		a.Modules = append(a.Modules, &adapters.ModuleWeights{Target: m.Target, In: m.In, Out: m.Out,
			Index: slices.Clone(m.Index), A: slices.Clone(m.A), B: slices.Clone(m.B)})
	}
	return a
}

// upload allocates the device tensors (once) and copies the host values.
func (p *Params) upload(b ml.Backend) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("allocating adapter parameters: %v", r)
		}
	}()
	if p.ctx == nil {
		p.ctx = b.NewContextSize(4 * len(p.Modules))
		r := p.Rank
		for _, m := range p.Modules {
			lc := p.ctx.Layer(m.Layer)
			if m.A != nil {
				m.a = lc.Zeros(ml.DTypeF32, m.In, r)
				ggmlx.SetParam(m.a)
			}
			if m.B != nil {
				m.b = lc.Zeros(ml.DTypeF32, r, m.Out)
				ggmlx.SetParam(m.b)
			}
			switch p.Variant {
			case adapters.FA:
				one := make([]float32, m.In*r)
				for j, col := range m.Index {
					one[j*m.In+int(col)] = 1
				}
				m.oneA = lc.FromFloats(one, m.In, r)
			case adapters.FB:
				one := make([]float32, r*m.Out)
				for j, row := range m.Index {
					one[int(row)*r+j] = 1
				}
				m.oneB = lc.FromFloats(one, r, m.Out)
			}
		}
	}
	ts, vals := p.tensors()
	for i, t := range ts {
		ggmlx.WriteFloats(t, 0, vals[i])
	}
	return nil
}

// Close frees the device tensors.
func (p *Params) Close() {
	if p.ctx != nil {
		p.ctx.Close()
		p.ctx = nil
	}
}

// projector adds the trainable adapter's terms to each projection.
type projector struct {
	p     *Params
	byTgt map[adapters.Target]*Module
	scale float64
}

func newProjector(p *Params) *projector {
	pr := &projector{p: p, byTgt: map[adapters.Target]*Module{}, scale: float64(p.Alpha) / float64(p.Rank)}
	for _, m := range p.Modules {
		pr.byTgt[m.Target] = m
	}
	return pr
}

func (pr *projector) Project(ctx ml.Context, t adapters.Target, x, h ml.Tensor) ml.Tensor {
	m := pr.byTgt[t]
	if m == nil {
		return h
	}
	var z ml.Tensor
	switch pr.p.Variant {
	case adapters.FA:
		z = m.b.Mulmat(ctx, m.oneA.Mulmat(ctx, x)) // B·(x[idx])
	case adapters.FB:
		z = m.oneB.Mulmat(ctx, m.a.Mulmat(ctx, x)) // scatter rows of A·x
	case adapters.LoRA:
		z = m.b.Mulmat(ctx, m.a.Mulmat(ctx, x))
	}
	return h.Add(ctx, z.Scale(ctx, pr.scale))
}

// Select: the trainer's adapter does not depend on the row.
func (pr *projector) Select(ml.Context, ml.Tensor) llama.Projector { return pr }
