package ggmlx

import (
	"math"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// TestTypeLayoutsMatchGGML checks the gguf package's hard-coded type table
// against ggml's own type traits.
func TestTypeLayoutsMatchGGML(t *testing.T) {
	for _, name := range []string{"F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "I8", "I16", "I32", "I64", "F64", "BF16"} {
		typ, err := gguf.ParseTensorType(name)
		if err != nil {
			t.Fatal(err)
		}
		bs, ts := TypeLayout(uint32(typ))
		if uint64(bs) != typ.BlockSize() || uint64(ts) != typ.TypeSize() {
			t.Errorf("%s: ggml says %d elements in %d bytes, gguf table says %d in %d", name, bs, ts, typ.BlockSize(), typ.TypeSize())
		}
	}
}

func TestQuantizeRoundTrip(t *testing.T) {
	const rows, cols = 7, 256
	v := make([]float32, rows*cols)
	for i := range v {
		v[i] = float32(math.Sin(float64(i) * 0.37))
	}
	for _, c := range []struct {
		typ gguf.TensorType
		tol float64
	}{{gguf.TypeF16, 1e-3}, {gguf.TypeQ8_0, 1e-2}, {gguf.TypeQ6_K, 3e-2}, {gguf.TypeQ4_K, 1e-1}, {gguf.TypeQ4_0, 1.5e-1}} {
		data, err := Quantize(uint32(c.typ), v, rows, cols)
		if err != nil {
			t.Fatal(err)
		}
		if want, _ := c.typ.RowSize(cols); len(data) != rows*int(want) {
			t.Fatalf("%s: %d bytes", c.typ, len(data))
		}
		back, err := Dequantize(uint32(c.typ), data, rows*cols)
		if err != nil {
			t.Fatal(err)
		}
		for i := range v {
			if d := math.Abs(float64(back[i] - v[i])); d > c.tol {
				t.Fatalf("%s: value %d is %g, was %g", c.typ, i, back[i], v[i])
			}
		}
		// Row r of a multi-row quantization equals quantizing row r alone
		// (the chunked parallel path must not shift rows).
		one, _ := Quantize(uint32(c.typ), v[5*cols:6*cols], 1, cols)
		rs, _ := c.typ.RowSize(cols)
		if string(one) != string(data[5*int(rs):6*int(rs)]) {
			t.Fatalf("%s: row 5 differs when quantized alone", c.typ)
		}
	}
	if _, err := Quantize(uint32(gguf.TypeQ4_0), v[:31], 1, 31); err == nil {
		t.Fatal("partial block quantized")
	}
}
