package modelfile

import (
	"fmt"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// Weighted is an adapter applied at a user scale (1 = as trained).
type Weighted struct {
	Adapter *adapters.Adapter
	Scale   float32
}

// MergeStats reports what a merge changed.
type MergeStats struct {
	Tensors       int // weights that received an update
	Blocks        int // quantization blocks in those weights
	BlocksChanged int // blocks that were re-quantized
	Bytes         int // bytes of the changed blocks
}

// Merge writes base + Σ scale·ΔW to dst. The merge is regional: only the
// quantization blocks that contain an updated element are re-quantized; every
// other byte of the file is copied unchanged. (An FB adapter touches r rows,
// so it rewrites exactly r rows of blocks per weight; FA touches r columns,
// so every row's blocks that hold one of those columns.)
func Merge(src, dst string, base *adapters.Base, ws []Weighted) (MergeStats, error) {
	var stats MergeStats
	updates := map[string][]moduleUpdate{}
	for _, w := range ws {
		if err := w.Adapter.Resolve(base); err != nil {
			return stats, err
		}
		for _, m := range w.Adapter.Modules {
			updates[m.WeightName()] = append(updates[m.WeightName()], moduleUpdate{w.Adapter, m, float64(w.Scale) * float64(w.Adapter.Scale())})
		}
	}
	f, err := gguf.Open(src)
	if err != nil {
		return stats, err
	}
	defer f.Close()
	err = Rewrite(src, dst, nil, func(t gguf.TensorInfo, _ func() ([]float32, error)) (gguf.TensorType, []byte, bool, error) {
		ups := updates[t.Name]
		if len(ups) == 0 {
			return 0, nil, true, nil
		}
		data, err := f.ReadTensor(t)
		if err != nil {
			return 0, nil, false, err
		}
		in, out := int(t.Shape[0]), int(t.Shape[1])
		delta := make([]float32, in*out)
		touched := make([]bool, in*out)
		for _, u := range ups {
			u.addTo(delta, touched)
		}
		st, err := mergeRegional(t.Type, data, delta, touched, in, out)
		stats.Tensors++
		stats.Blocks += st.Blocks
		stats.BlocksChanged += st.BlocksChanged
		stats.Bytes += st.Bytes
		return t.Type, data, false, err
	})
	return stats, err
}

type moduleUpdate struct {
	a     *adapters.Adapter
	m     *adapters.ModuleWeights
	scale float64
}

// addTo accumulates scale·ΔW into delta (out rows of in) without forming a
// dense product for the SBoRA variants.
func (u moduleUpdate) addTo(delta []float32, touched []bool) {
	m, r, in := u.m, u.a.Rank, u.m.In
	switch u.a.Variant {
	case adapters.FA:
		for o := 0; o < m.Out; o++ {
			for j, col := range m.Index {
				delta[o*in+int(col)] += float32(u.scale * float64(m.B[o*r+j]))
				touched[o*in+int(col)] = true
			}
		}
	case adapters.FB:
		for j, row := range m.Index {
			for i := 0; i < in; i++ {
				delta[int(row)*in+i] += float32(u.scale * float64(m.A[j*in+i]))
				touched[int(row)*in+i] = true
			}
		}
	case adapters.LoRA:
		for o, d := range u.a.DeltaW(m, u.scale) {
			delta[o] += float32(d)
			touched[o] = true
		}
	}
}

// mergeRegional adds delta to the touched blocks of data (type typ, out
// rows of in elements) in place.
func mergeRegional(typ gguf.TensorType, data []byte, delta []float32, touched []bool, in, out int) (MergeStats, error) {
	bs := int(typ.BlockSize())
	ts := int(typ.TypeSize())
	rowBytes := in / bs * ts
	var st MergeStats
	st.Blocks = out * in / bs
	for o := 0; o < out; o++ {
		for b := 0; b < in/bs; b++ {
			e0 := o*in + b*bs
			hit := false
			for _, t := range touched[e0 : e0+bs] {
				if t {
					hit = true
					break
				}
			}
			if !hit {
				continue
			}
			block := data[o*rowBytes+b*ts : o*rowBytes+(b+1)*ts]
			vals, err := ggmlx.Dequantize(uint32(typ), block, bs)
			if err != nil {
				return st, err
			}
			for i := range vals {
				vals[i] += delta[e0+i]
			}
			q, err := QuantizeFloats(typ, vals, bs)
			if err != nil {
				return st, err
			}
			if len(q) != ts {
				return st, fmt.Errorf("re-quantized block is %d bytes, want %d", len(q), ts)
			}
			copy(block, q)
			st.BlocksChanged++
			st.Bytes += ts
		}
	}
	return st, nil
}
