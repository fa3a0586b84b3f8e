package adapters

import (
	"fmt"
	"math/rand/v2"
	"slices"
)

// ChooseIndices picks r distinct indices in [0, n) with a seeded generator,
// skipping those in avoid, and returns them sorted. The reference SBoRA code
// samples without a seed; here the choice is reproducible.
func ChooseIndices(rng *rand.Rand, n, r int, avoid map[int32]bool) ([]int32, error) {
	free := make([]int32, 0, n)
	for i := 0; i < n; i++ {
		if !avoid[int32(i)] {
			free = append(free, int32(i))
		}
	}
	if r > len(free) {
		return nil, fmt.Errorf("cannot choose %d distinct indices from %d free of %d", r, len(free), n)
	}
	rng.Shuffle(len(free), func(i, j int) { free[i], free[j] = free[j], free[i] })
	out := slices.Clone(free[:r])
	slices.Sort(out)
	return out, nil
}

// RandomOptions describe a random adapter.
type RandomOptions struct {
	Name    string
	Variant Variant
	Rank    int
	Alpha   float32
	Modules []Module // default: all seven
	Layers  []int    // default: every layer
	Seed    uint64
	// Std is the spread of the trainable values (uniform, this standard
	// deviation); default 0.02.
	Std float32
}

// NewRandom makes an adapter with random trainable matrices (never zero)
// for tests, demos and benchmarks.
func NewRandom(base *Base, o RandomOptions) (*Adapter, error) {
	if o.Modules == nil {
		o.Modules = AllModules
	}
	if o.Layers == nil {
		for l := 0; l < base.Layers; l++ {
			o.Layers = append(o.Layers, l)
		}
	}
	if o.Std == 0 {
		o.Std = 0.02
	}
	if o.Alpha == 0 {
		o.Alpha = float32(2 * o.Rank)
	}
	rng := rand.New(rand.NewPCG(o.Seed, 0x5b07a))
	a := &Adapter{Name: o.Name, Variant: o.Variant, Rank: o.Rank, Alpha: o.Alpha, BaseArch: base.Arch, BaseFingerprint: base.Fingerprint}
	values := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			// Uniform with the requested standard deviation, kept away from 0.
			x := (2*rng.Float32() - 1) * o.Std * 1.7320508
			if x == 0 {
				x = o.Std
			}
			v[i] = x
		}
		return v
	}
	for _, l := range o.Layers {
		for _, mod := range o.Modules {
			t := Target{Layer: l, Module: mod}
			in, out, ok := base.Shape(t)
			if !ok {
				return nil, fmt.Errorf("base has no weight %s", t.WeightName())
			}
			m := &ModuleWeights{Target: t, In: in, Out: out}
			var err error
			switch o.Variant {
			case FA:
				if m.Index, err = ChooseIndices(rng, in, o.Rank, nil); err != nil {
					return nil, fmt.Errorf("%s: %w", t, err)
				}
				m.B = values(out * o.Rank)
			case FB:
				if m.Index, err = ChooseIndices(rng, out, o.Rank, nil); err != nil {
					return nil, fmt.Errorf("%s: %w", t, err)
				}
				m.A = values(o.Rank * in)
			case LoRA:
				m.A = values(o.Rank * in)
				m.B = values(out * o.Rank)
			default:
				return nil, fmt.Errorf("unknown variant %q", o.Variant)
			}
			a.Modules = append(a.Modules, m)
		}
	}
	a.sortModules()
	return a, a.ValidateFor(base)
}
