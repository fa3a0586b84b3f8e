package adapters

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
)

// Variant is the kind of adapter.
type Variant string

const (
	// FA: fixed one-hot A, trainable B; touches r input columns.
	FA Variant = "fa"
	// FB: fixed one-hot B, trainable A; touches r output rows.
	FB Variant = "fb"
	// LoRA: dense A and B.
	LoRA Variant = "lora"
)

// ParseVariant accepts fa, fb or lora (case-insensitive).
func ParseVariant(s string) (Variant, error) {
	switch v := Variant(strings.ToLower(strings.TrimSpace(s))); v {
	case FA, FB, LoRA:
		return v, nil
	}
	return "", fmt.Errorf("unknown adapter variant %q (want fa, fb or lora)", s)
}

// Adapter is a validated-on-use SBoRA or LoRA adapter held in host memory.
type Adapter struct {
	Name    string
	Variant Variant
	Rank    int
	Alpha   float32
	// Base describes the model the adapter was made for (may be zero for
	// llama.cpp LoRA files, which carry no fingerprint).
	BaseArch        string
	BaseFingerprint string
	// Modules in canonical order (layer, then module).
	Modules []*ModuleWeights
}

// ModuleWeights are the weights of one target module. Matrices are
// row-major float32 in PyTorch orientation.
type ModuleWeights struct {
	Target
	In, Out int
	// Index: FA input columns, FB output rows; nil for LoRA.
	Index []int32
	// A is r×In (FB, LoRA); nil for FA.
	A []float32
	// B is Out×r (FA, LoRA); nil for FB.
	B []float32
	// src locates the module's tensors in the file it was read from (nil
	// for adapters made in memory).
	src *moduleTensors
}

// Scale is alpha/rank, the factor on every update.
func (a *Adapter) Scale() float32 { return a.Alpha / float32(a.Rank) }

// Targets lists the distinct modules (across layers) the adapter touches.
func (a *Adapter) Targets() []Module {
	seen := map[Module]bool{}
	var out []Module
	for _, m := range a.Modules {
		if !seen[m.Module] {
			seen[m.Module] = true
			out = append(out, m.Module)
		}
	}
	slices.Sort(out)
	return out
}

// Module returns the weights for target t, or nil.
func (a *Adapter) Module(t Target) *ModuleWeights {
	for _, m := range a.Modules {
		if m.Target == t {
			return m
		}
	}
	return nil
}

// Bytes is the size of the adapter's tensors in a native file with F16
// matrices (the default): 4 bytes per index, 2 per matrix value.
func (a *Adapter) Bytes() int {
	n := 0
	r := a.Rank
	for _, m := range a.Modules {
		n += 4 * len(m.Index)
		switch a.Variant {
		case FA:
			n += 2 * m.Out * r
		case FB:
			n += 2 * r * m.In
		case LoRA:
			n += 2 * r * (m.In + m.Out)
		}
	}
	return n
}

func (a *Adapter) sortModules() {
	sort.Slice(a.Modules, func(i, j int) bool {
		x, y := a.Modules[i].Target, a.Modules[j].Target
		if x.Layer != y.Layer {
			return x.Layer < y.Layer
		}
		return x.Module < y.Module
	})
}

// ErrInvalid wraps every validation error.
var ErrInvalid = errors.New("invalid adapter")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Validate checks the adapter's internal consistency: variant, rank, shapes,
// index ranges and uniqueness, finite values. ValidateFor adds the base.
func (a *Adapter) Validate() error {
	switch a.Variant {
	case FA, FB, LoRA:
	default:
		return invalid("unknown variant %q", a.Variant)
	}
	if a.Rank <= 0 {
		return invalid("rank %d must be positive", a.Rank)
	}
	if math.IsNaN(float64(a.Alpha)) || math.IsInf(float64(a.Alpha), 0) || a.Alpha == 0 {
		return invalid("alpha %v must be finite and non-zero", a.Alpha)
	}
	if len(a.Modules) == 0 {
		return invalid("no target modules")
	}
	seen := map[Target]bool{}
	r := a.Rank
	for _, m := range a.Modules {
		if m.Module < 0 || m.Module >= NumModules {
			return invalid("%s: unknown module", m.Target)
		}
		if m.Layer < 0 {
			return invalid("%s: negative layer", m.Target)
		}
		if seen[m.Target] {
			return invalid("%s appears twice", m.Target)
		}
		seen[m.Target] = true
		if m.In <= 0 || m.Out <= 0 {
			return invalid("%s: bad shape %d→%d", m.Target, m.In, m.Out)
		}
		// A streamed module's matrices are read later; describe already
		// checked their shapes against the rank.
		streamed := m.src != nil && m.A == nil && m.B == nil
		switch a.Variant {
		case FA:
			if err := checkIndex(m, m.In, "input column"); err != nil {
				return err
			}
			if streamed {
				break
			}
			if len(m.B) != m.Out*r || m.A != nil {
				return invalid("%s: FA needs B of %d×%d and no A (have B of %d values, A of %d)", m.Target, m.Out, r, len(m.B), len(m.A))
			}
		case FB:
			if err := checkIndex(m, m.Out, "output row"); err != nil {
				return err
			}
			if streamed {
				break
			}
			if len(m.A) != r*m.In || m.B != nil {
				return invalid("%s: FB needs A of %d×%d and no B (have A of %d values, B of %d)", m.Target, r, m.In, len(m.A), len(m.B))
			}
		case LoRA:
			if m.Index != nil {
				return invalid("%s: LoRA has no index vector", m.Target)
			}
			if streamed {
				break
			}
			if len(m.A) != r*m.In || len(m.B) != m.Out*r {
				return invalid("%s: LoRA needs A of %d×%d and B of %d×%d (have %d and %d values)", m.Target, r, m.In, m.Out, r, len(m.A), len(m.B))
			}
		}
		for _, s := range [][]float32{m.A, m.B} {
			for i, v := range s {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					return invalid("%s: non-finite value %v at %d", m.Target, v, i)
				}
			}
		}
	}
	return nil
}

func checkIndex(m *ModuleWeights, limit int, what string) error {
	if len(m.Index) == 0 {
		return invalid("%s: missing index vector", m.Target)
	}
	seen := make(map[int32]bool, len(m.Index))
	for i, x := range m.Index {
		if x < 0 || int(x) >= limit {
			return invalid("%s: index %d (at %d) is out of range: %s must be in [0, %d)", m.Target, x, i, what, limit)
		}
		if seen[x] {
			return invalid("%s: index %d is repeated: SBoRA indices must be distinct", m.Target, x)
		}
		seen[x] = true
	}
	return nil
}

// ValidateFor checks the adapter against a base model: fingerprint (when
// both sides have one), architecture, layer range and module shapes.
func (a *Adapter) ValidateFor(base *Base) error {
	if err := a.Validate(); err != nil {
		return err
	}
	if a.BaseArch != "" && a.BaseArch != base.Arch {
		return invalid("adapter is for architecture %q, the base model is %q", a.BaseArch, base.Arch)
	}
	if a.BaseFingerprint != "" && a.BaseFingerprint != base.Fingerprint {
		return invalid("adapter was made for a different base model (fingerprint %s, this base is %s): architecture or tensor shapes differ",
			short(a.BaseFingerprint), short(base.Fingerprint))
	}
	for _, m := range a.Modules {
		shape, ok := base.Weights[m.WeightName()]
		if !ok {
			return invalid("%s: the base model has no weight %s", m.Target, m.WeightName())
		}
		if shape[0] != m.In || shape[1] != m.Out {
			return invalid("%s: adapter shape %d→%d does not match base weight %s (%d→%d)", m.Target, m.In, m.Out, m.WeightName(), shape[0], shape[1])
		}
	}
	return nil
}

func short(fp string) string {
	if len(fp) > 12 {
		return fp[:12]
	}
	return fp
}

// DeltaW returns scale·ΔW of module m as an Out×In float64 matrix
// (row-major): the exact update the adapter adds to the base weight.
func (a *Adapter) DeltaW(m *ModuleWeights, scale float64) []float64 {
	r := a.Rank
	d := make([]float64, m.Out*m.In)
	switch a.Variant {
	case FA:
		for o := 0; o < m.Out; o++ {
			for j, col := range m.Index {
				d[o*m.In+int(col)] += scale * float64(m.B[o*r+j])
			}
		}
	case FB:
		for j, row := range m.Index {
			for i := 0; i < m.In; i++ {
				d[int(row)*m.In+i] += scale * float64(m.A[j*m.In+i])
			}
		}
	case LoRA:
		for o := 0; o < m.Out; o++ {
			for j := 0; j < r; j++ {
				b := scale * float64(m.B[o*r+j])
				if b == 0 {
					continue
				}
				for i := 0; i < m.In; i++ {
					d[o*m.In+i] += b * float64(m.A[j*m.In+i])
				}
			}
		}
	}
	return d
}

// ToLoRA returns the adapter as an equivalent dense LoRA: FA's one-hot A and
// FB's one-hot B written out. The result computes exactly the same update.
func (a *Adapter) ToLoRA() *Adapter {
	if a.Variant == LoRA {
		return a
	}
	out := &Adapter{Name: a.Name, Variant: LoRA, Rank: a.Rank, Alpha: a.Alpha, BaseArch: a.BaseArch, BaseFingerprint: a.BaseFingerprint}
	r := a.Rank
	for _, m := range a.Modules {
		lm := &ModuleWeights{Target: m.Target, In: m.In, Out: m.Out}
		switch a.Variant {
		case FA:
			lm.A = make([]float32, r*m.In)
			for j, col := range m.Index {
				lm.A[j*m.In+int(col)] = 1
			}
			lm.B = slices.Clone(m.B)
		case FB:
			lm.A = slices.Clone(m.A)
			lm.B = make([]float32, m.Out*r)
			for j, row := range m.Index {
				lm.B[int(row)*r+j] = 1
			}
		}
		out.Modules = append(out.Modules, lm)
	}
	return out
}
