package adapters

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"strings"

	"github.com/x448/float16"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// Metadata keys of the native format (see the package documentation).
const (
	keyGeneralType  = "general.type"
	keyGeneralArch  = "general.architecture"
	keyGeneralName  = "general.name"
	keyAdapterType  = "adapter.type"
	keyVariant      = "adapter.sbora.variant"
	keyRank         = "adapter.rank"
	keyAlpha        = "adapter.lora.alpha"
	keyTargets      = "adapter.targets"
	keyFingerprint  = "adapter.base.fingerprint"
	keyDimPrefix    = "adapter.dim."
	keyFormatVer    = "adapter.sbora.format_version"
	formatVersion   = 1
	suffixIndex     = "sbora_idx"
	suffixSBoRAA    = "sbora_a"
	suffixSBoRAB    = "sbora_b"
	suffixLoRAA     = "lora_a"
	suffixLoRAB     = "lora_b"
	maxAdapterRank  = 1 << 16
	maxAdapterLayer = 1 << 16
)

// Load reads an adapter file (native SBoRA or llama.cpp LoRA GGUF).
func Load(path string) (*Adapter, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	a, err := decode(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return a, nil
}

// Parse reads an adapter from the bytes of a file.
func Parse(data []byte) (*Adapter, error) {
	f, err := gguf.Read(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, err
	}
	return decode(f)
}

type moduleTensors struct {
	idx, a, b *gguf.TensorInfo
}

// decode reads the whole adapter: its layout, then every matrix as float32.
func decode(f *gguf.File) (*Adapter, error) {
	a, err := describe(f)
	if err != nil {
		return nil, err
	}
	for _, m := range a.Modules {
		if m.src.a != nil {
			if m.A, err = readFloats(f, m.src.a); err != nil {
				return nil, err
			}
		}
		if m.src.b != nil {
			if m.B, err = readFloats(f, m.src.b); err != nil {
				return nil, err
			}
		}
	}
	if err := a.validatePartial(); err != nil {
		return nil, err
	}
	return a, nil
}

// describe reads an adapter file's metadata, its modules' shapes and
// indices, and where their matrices are; it reads no matrix.
func describe(f *gguf.File) (*Adapter, error) {
	kind, _ := f.KV.String(keyGeneralType)
	if kind != "adapter" {
		return nil, invalid("general.type is %q, want \"adapter\" (is this a base model?)", kind)
	}
	a := &Adapter{}
	a.Name, _ = f.KV.String(keyGeneralName)
	a.BaseArch, _ = f.KV.String(keyGeneralArch)
	a.BaseFingerprint, _ = f.KV.String(keyFingerprint)
	adapterType, _ := f.KV.String(keyAdapterType)
	switch adapterType {
	case "sbora":
		v, _ := f.KV.String(keyVariant)
		variant, err := ParseVariant(v)
		if err != nil || variant == LoRA {
			return nil, invalid("adapter.sbora.variant is %q, want fa or fb", v)
		}
		a.Variant = variant
	case "lora":
		a.Variant = LoRA
	default:
		return nil, invalid("adapter.type is %q, want sbora or lora", adapterType)
	}

	groups := map[string]*moduleTensors{}
	for i := range f.Tensors {
		t := &f.Tensors[i]
		dot := strings.LastIndexByte(t.Name, '.')
		if dot < 0 {
			return nil, invalid("unexpected tensor %q", t.Name)
		}
		weight, suffix := t.Name[:dot], t.Name[dot+1:]
		if _, ok := parseWeightName(weight); !ok {
			return nil, invalid("tensor %q names an unknown module (want blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.*)", t.Name)
		}
		g := groups[weight]
		if g == nil {
			g = &moduleTensors{}
			groups[weight] = g
		}
		var slot **gguf.TensorInfo
		switch {
		case suffix == suffixIndex && a.Variant != LoRA:
			slot = &g.idx
		case suffix == suffixSBoRAA && a.Variant == FB, suffix == suffixLoRAA && a.Variant == LoRA:
			slot = &g.a
		case suffix == suffixSBoRAB && a.Variant == FA, suffix == suffixLoRAB && a.Variant == LoRA:
			slot = &g.b
		default:
			return nil, invalid("tensor %q does not belong in a %s adapter", t.Name, a.Variant)
		}
		*slot = t
	}
	if len(groups) == 0 {
		return nil, invalid("no adapter tensors")
	}
	names := make([]string, 0, len(groups))
	for n := range groups {
		names = append(names, n)
	}
	sort.Strings(names)

	rank := -1
	for _, weight := range names {
		g := groups[weight]
		target, _ := parseWeightName(weight)
		if target.Layer >= maxAdapterLayer {
			return nil, invalid("%s: layer %d out of range", weight, target.Layer)
		}
		m := &ModuleWeights{Target: target, src: g}
		var r int
		var err error
		switch a.Variant {
		case FA:
			if g.idx == nil || g.b == nil {
				return nil, invalid("%s: FA needs both %s and %s", weight, suffixIndex, suffixSBoRAB)
			}
			if m.Index, err = readIndex(f, g.idx); err != nil {
				return nil, err
			}
			r = len(m.Index)
			if m.Out, err = matrixShape(g.b, r, true); err != nil {
				return nil, err
			}
		case FB:
			if g.idx == nil || g.a == nil {
				return nil, invalid("%s: FB needs both %s and %s", weight, suffixIndex, suffixSBoRAA)
			}
			if m.Index, err = readIndex(f, g.idx); err != nil {
				return nil, err
			}
			r = len(m.Index)
			if m.In, err = matrixShape(g.a, r, false); err != nil {
				return nil, err
			}
		case LoRA:
			if g.a == nil || g.b == nil {
				return nil, invalid("%s: LoRA needs both %s and %s", weight, suffixLoRAA, suffixLoRAB)
			}
			if len(g.a.Shape) != 2 {
				return nil, invalid("%s: %s must be 2-D", weight, suffixLoRAA)
			}
			r = int(min(g.a.Shape[1], maxAdapterRank+1))
			if m.In, err = matrixShape(g.a, r, false); err != nil {
				return nil, err
			}
			if m.Out, err = matrixShape(g.b, r, true); err != nil {
				return nil, err
			}
		}
		if rank >= 0 && r != rank {
			return nil, invalid("%s has rank %d, other modules have rank %d: all modules must share one rank", weight, r, rank)
		}
		rank = r
		if dims, ok := f.KV.Ints(keyDimPrefix + weight); ok {
			if len(dims) != 2 || dims[0] <= 0 || dims[1] <= 0 || dims[0] > math.MaxInt32 || dims[1] > math.MaxInt32 {
				return nil, invalid("%s%s must be [in, out], got %v", keyDimPrefix, weight, dims)
			}
			in, out := int(dims[0]), int(dims[1])
			if (m.In != 0 && m.In != in) || (m.Out != 0 && m.Out != out) {
				return nil, invalid("%s: tensors say %d→%d, metadata says %d→%d", weight, m.In, m.Out, in, out)
			}
			m.In, m.Out = in, out
		}
		a.Modules = append(a.Modules, m)
	}
	a.Rank = rank
	if r, ok := f.KV.Int(keyRank); ok && int(r) != rank {
		return nil, invalid("metadata rank %d does not match tensor rank %d", r, rank)
	}
	alpha, ok := f.KV.Float(keyAlpha)
	if !ok || alpha == 0 {
		// llama.cpp: without alpha the update is applied unscaled.
		alpha = float64(rank)
	}
	a.Alpha = float32(alpha)
	a.sortModules()
	return a, nil
}

// Reader streams an adapter's matrices from its file as stored (F32, F16
// or BF16), so the server can copy them into device memory without making
// float32 copies first. Its Adapter has every module's shape and indices
// but no A or B; values are checked (finite) by whoever converts them.
type Reader struct {
	Adapter *Adapter
	f       *gguf.File
	path    string
}

// OpenReader opens an adapter file for streaming.
func OpenReader(path string) (*Reader, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	return newReader(f, path)
}

func newReader(f *gguf.File, path string) (*Reader, error) {
	a, err := describe(f)
	if err == nil {
		err = a.validatePartial()
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &Reader{Adapter: a, f: f, path: path}, nil
}

// Close closes the file.
func (r *Reader) Close() error { return r.f.Close() }

// RawMatrix is a module matrix as stored: rows of Cols values of Type, in
// PyTorch orientation (FA's and LoRA's B is Out×r, FB's and LoRA's A r×In).
type RawMatrix struct {
	Type       gguf.TensorType
	Rows, Cols int
	Data       []byte
}

// ReadMatrix reads module m's B (b) or A (!b) into buf, reusing it when
// large enough.
func (r *Reader) ReadMatrix(m *ModuleWeights, b bool, buf []byte) (RawMatrix, error) {
	t := m.src.a
	if b {
		t = m.src.b
	}
	if t == nil {
		return RawMatrix{}, fmt.Errorf("%s: %s has no %s matrix", r.path, m.Target, map[bool]string{true: "B", false: "A"}[b])
	}
	n := int(t.Size())
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := r.f.TensorReader(*t).ReadAt(buf, 0); err != nil {
		return RawMatrix{}, fmt.Errorf("%s: reading %s: %w", r.path, t.Name, err)
	}
	return RawMatrix{Type: t.Type, Rows: int(t.Shape[1]), Cols: int(t.Shape[0]), Data: buf}, nil
}

// validatePartial validates what it can before the base is known: the
// fixed side's dimension of an SBoRA module may be unknown (0) until Resolve,
// in which case only the lower bound of its indices is checked.
func (a *Adapter) validatePartial() error {
	for _, m := range a.Modules {
		probe := *m
		if probe.In == 0 {
			probe.In = math.MaxInt32
		}
		if probe.Out == 0 {
			probe.Out = math.MaxInt32
		}
		one := &Adapter{Variant: a.Variant, Rank: a.Rank, Alpha: a.Alpha, Modules: []*ModuleWeights{&probe}}
		if err := one.Validate(); err != nil {
			return err
		}
	}
	return nil
}

// Resolve fills unknown module shapes from the base and validates the
// adapter against it. Loading code calls Resolve before using an adapter.
func (a *Adapter) Resolve(base *Base) error {
	for _, m := range a.Modules {
		in, out, ok := base.Shape(m.Target)
		if !ok {
			return invalid("%s: the base model has no weight %s", m.Target, m.WeightName())
		}
		if m.In == 0 {
			m.In = in
		}
		if m.Out == 0 {
			m.Out = out
		}
	}
	return a.ValidateFor(base)
}

func readIndex(f *gguf.File, t *gguf.TensorInfo) ([]int32, error) {
	if t.Type != gguf.TypeI32 || len(t.Shape) != 1 {
		return nil, invalid("%s must be a 1-D I32 tensor (is %s %v)", t.Name, t.Type, t.Shape)
	}
	if t.Shape[0] > maxAdapterRank {
		return nil, invalid("%s: rank %d is too large", t.Name, t.Shape[0])
	}
	data, err := f.ReadTensor(*t)
	if err != nil {
		return nil, err
	}
	idx := make([]int32, t.Shape[0])
	for i := range idx {
		idx[i] = int32(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return idx, nil
}

// matrixShape checks a 2-D F32/F16/BF16 matrix tensor whose rank-side
// dimension must be r and returns its other dimension. rankFirst: ggml
// shape [r, n] (PyTorch n×r), else [n, r] (PyTorch r×n).
func matrixShape(t *gguf.TensorInfo, r int, rankFirst bool) (int, error) {
	if len(t.Shape) != 2 {
		return 0, invalid("%s must be 2-D (is %v)", t.Name, t.Shape)
	}
	rd, nd := t.Shape[1], t.Shape[0]
	if rankFirst {
		rd, nd = t.Shape[0], t.Shape[1]
	}
	if int(rd) != r || r <= 0 || r > maxAdapterRank {
		return 0, invalid("%s has shape %v: its rank dimension is %d, want %d", t.Name, t.Shape, rd, r)
	}
	if nd > math.MaxInt32 {
		return 0, invalid("%s has shape %v", t.Name, t.Shape)
	}
	if t.Type != gguf.TypeF32 && t.Type != gguf.TypeF16 && t.Type != gguf.TypeBF16 {
		return 0, invalid("%s has type %s, want F32, F16 or BF16", t.Name, t.Type)
	}
	return int(nd), nil
}

// readFloats reads a matrix tensor as float32, row-major in PyTorch
// orientation (which is ggml's storage order).
func readFloats(f *gguf.File, t *gguf.TensorInfo) ([]float32, error) {
	data, err := f.ReadTensor(*t)
	if err != nil {
		return nil, err
	}
	return decodeFloats(data, t.Type), nil
}

func decodeFloats(data []byte, t gguf.TensorType) []float32 {
	switch t {
	case gguf.TypeF16:
		out := make([]float32, len(data)/2)
		for i := range out {
			out[i] = float16.Frombits(binary.LittleEndian.Uint16(data[2*i:])).Float32()
		}
		return out
	case gguf.TypeBF16:
		out := make([]float32, len(data)/2)
		for i := range out {
			out[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(data[2*i:])) << 16)
		}
		return out
	}
	out := make([]float32, len(data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return out
}

func encodeFloats(v []float32, t gguf.TensorType) []byte {
	if t == gguf.TypeF16 {
		out := make([]byte, 2*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint16(out[2*i:], float16.Fromfloat32(x).Bits())
		}
		return out
	}
	out := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(x))
	}
	return out
}

// SaveOptions control how an adapter is written.
type SaveOptions struct {
	// F32 stores the trainable matrices as F32 instead of F16 (training
	// checkpoints, which must resume bit for bit, and exactness tests).
	F32 bool
}

// Encode returns the adapter as a GGUF writer.
func (a *Adapter) Encode(opts SaveOptions) (*gguf.Writer, error) {
	if err := a.validatePartial(); err != nil {
		return nil, err
	}
	w := gguf.NewWriter()
	w.KV.Set(keyGeneralType, "adapter")
	w.KV.Set(keyGeneralArch, orDefault(a.BaseArch, "llama"))
	if a.Name != "" {
		w.KV.Set(keyGeneralName, a.Name)
	}
	if a.Variant == LoRA {
		w.KV.Set(keyAdapterType, "lora")
	} else {
		w.KV.Set(keyAdapterType, "sbora")
		w.KV.Set(keyVariant, string(a.Variant))
		w.KV.Set(keyFormatVer, uint32(formatVersion))
	}
	w.KV.Set(keyRank, uint32(a.Rank))
	w.KV.Set(keyAlpha, a.Alpha)
	targets := []string{}
	for _, m := range a.Targets() {
		targets = append(targets, m.String())
	}
	w.KV.Set(keyTargets, targets)
	if a.BaseFingerprint != "" {
		w.KV.Set(keyFingerprint, a.BaseFingerprint)
	}
	ft := gguf.TypeF16
	if opts.F32 {
		ft = gguf.TypeF32
	}
	r := uint64(a.Rank)
	for _, m := range a.Modules {
		if m.In > 0 && m.Out > 0 {
			w.KV.Set(keyDimPrefix+m.WeightName(), []uint32{uint32(m.In), uint32(m.Out)})
		}
		name := m.WeightName() + "."
		var err error
		add := func(suffix string, typ gguf.TensorType, shape []uint64, data []byte) {
			if err == nil {
				err = w.AddTensor(name+suffix, typ, shape, data)
			}
		}
		switch a.Variant {
		case FA:
			add(suffixIndex, gguf.TypeI32, []uint64{r}, encodeIndex(m.Index))
			add(suffixSBoRAB, ft, []uint64{r, uint64(m.Out)}, encodeFloats(m.B, ft))
		case FB:
			add(suffixIndex, gguf.TypeI32, []uint64{r}, encodeIndex(m.Index))
			add(suffixSBoRAA, ft, []uint64{uint64(m.In), r}, encodeFloats(m.A, ft))
		case LoRA:
			add(suffixLoRAA, ft, []uint64{uint64(m.In), r}, encodeFloats(m.A, ft))
			add(suffixLoRAB, ft, []uint64{r, uint64(m.Out)}, encodeFloats(m.B, ft))
		}
		if err != nil {
			return nil, err
		}
	}
	return w, nil
}

// Save writes the adapter to path atomically.
func (a *Adapter) Save(path string, opts SaveOptions) error {
	w, err := a.Encode(opts)
	if err != nil {
		return err
	}
	return w.WriteFile(path)
}

func encodeIndex(idx []int32) []byte {
	out := make([]byte, 4*len(idx))
	for i, x := range idx {
		binary.LittleEndian.PutUint32(out[4*i:], uint32(x))
	}
	return out
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
