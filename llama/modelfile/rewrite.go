package modelfile

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// TensorFunc decides a tensor's new type and data during a rewrite. It gets
// the tensor and a function that returns its data as float32 (row-major,
// rows of Shape[0]); returning keep=true copies the tensor unchanged.
type TensorFunc func(t gguf.TensorInfo, floats func() ([]float32, error)) (typ gguf.TensorType, data []byte, keep bool, err error)

// Rewrite copies the GGUF at src to dst, passing every tensor through fn.
// Metadata is copied; edit adjusts it (may be nil).
func Rewrite(src, dst string, edit func(*gguf.KV), fn TensorFunc) error {
	f, err := gguf.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	w := gguf.NewWriter()
	w.Alignment = f.Alignment
	for _, k := range f.KV.Keys() {
		if k == "general.alignment" {
			continue
		}
		v, _ := f.KV.Value(k)
		w.KV.Set(k, v)
	}
	if edit != nil {
		edit(&w.KV)
	}
	for _, t := range f.Tensors {
		t := t
		floats := func() ([]float32, error) {
			data, err := f.ReadTensor(t)
			if err != nil {
				return nil, err
			}
			return ggmlx.Dequantize(uint32(t.Type), data, int(t.Elements()))
		}
		typ, data, keep, err := fn(t, floats)
		if err != nil {
			return fmt.Errorf("%s: %w", t.Name, err)
		}
		if keep {
			err = w.AddTensorFunc(t.Name, t.Type, t.Shape, func(out io.Writer) error {
				_, err := io.Copy(out, f.TensorReader(t))
				return err
			}, t.Size())
		} else {
			err = w.AddTensor(t.Name, typ, t.Shape, data)
		}
		if err != nil {
			return err
		}
	}
	return w.WriteFile(dst)
}

// QuantizeFloats converts float32 values with rows of cols elements to typ.
func QuantizeFloats(typ gguf.TensorType, v []float32, cols int) ([]byte, error) {
	switch typ {
	case gguf.TypeF32:
		out := make([]byte, 4*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(x))
		}
		return out, nil
	default:
		return ggmlx.Quantize(uint32(typ), v, len(v)/cols, cols)
	}
}

// QuantTypeFor picks the type a weight of the given row length gets when the
// file is quantized to want: want itself when rows are whole blocks, else
// Q8_0 for k-quants whose 256-blocks do not fit but 32-blocks do, else F32
// (F32 rather than llama.cpp's F16 fallback: ggml cannot backpropagate
// through F16 weights on CPU, and the trainer needs to).
func QuantTypeFor(want gguf.TensorType, rowLen uint64) gguf.TensorType {
	if rowLen%want.BlockSize() == 0 {
		return want
	}
	if want.BlockSize() == 256 && rowLen%32 == 0 {
		return gguf.TypeQ8_0
	}
	return gguf.TypeF32
}

// fileTypes maps a tensor type to general.file_type (llama_ftype).
var fileTypes = map[gguf.TensorType]uint32{
	gguf.TypeF32: 0, gguf.TypeF16: 1, gguf.TypeQ4_0: 2, gguf.TypeQ4_1: 3, gguf.TypeQ8_0: 7,
	gguf.TypeQ5_0: 8, gguf.TypeQ5_1: 9, gguf.TypeQ2_K: 10, gguf.TypeQ3_K: 12,
	gguf.TypeQ4_K: 15, gguf.TypeQ5_K: 17, gguf.TypeQ6_K: 18, gguf.TypeBF16: 32,
}

// Quantize writes a copy of src whose 2-D weights are stored as typ (see
// QuantTypeFor); norms and other 1-D tensors stay F32.
func Quantize(src, dst string, typ gguf.TensorType) error {
	if _, ok := fileTypes[typ]; !ok {
		return fmt.Errorf("cannot quantize to %s", typ)
	}
	return Rewrite(src, dst, func(kv *gguf.KV) {
		kv.Set("general.file_type", fileTypes[typ])
	}, func(t gguf.TensorInfo, floats func() ([]float32, error)) (gguf.TensorType, []byte, bool, error) {
		if len(t.Shape) != 2 {
			return 0, nil, true, nil
		}
		want := QuantTypeFor(typ, t.Shape[0])
		if want == t.Type {
			return 0, nil, true, nil
		}
		v, err := floats()
		if err != nil {
			return 0, nil, false, err
		}
		data, err := QuantizeFloats(want, v, int(t.Shape[0]))
		return want, data, false, err
	})
}
