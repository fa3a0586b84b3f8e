package adapters

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// testBase is a two-layer model shaped like a tiny LLaMA with GQA.
func testBase() *Base {
	var ts []TensorShape
	add := func(name string, shape ...uint64) { ts = append(ts, TensorShape{Name: name, Shape: shape}) }
	add("token_embd.weight", 32, 100)
	for l := 0; l < 2; l++ {
		p := "blk." + string(rune('0'+l)) + "."
		add(p+"attn_q.weight", 32, 32)
		add(p+"attn_k.weight", 32, 16)
		add(p+"attn_v.weight", 32, 16)
		add(p+"attn_output.weight", 32, 32)
		add(p+"ffn_gate.weight", 32, 64)
		add(p+"ffn_up.weight", 32, 64)
		add(p+"ffn_down.weight", 64, 32)
		add(p+"attn_norm.weight", 32)
		add(p+"ffn_norm.weight", 32)
	}
	add("output_norm.weight", 32)
	add("output.weight", 32, 100)
	return NewBase("llama", 2, ts)
}

func mustRandom(t testing.TB, v Variant, rank int, seed uint64) *Adapter {
	t.Helper()
	a, err := NewRandom(testBase(), RandomOptions{Name: "test", Variant: v, Rank: rank, Alpha: 8, Seed: seed})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func encode(t testing.TB, a *Adapter, opts SaveOptions) []byte {
	t.Helper()
	w, err := a.Encode(opts)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestRoundTrip(t *testing.T) {
	for _, v := range []Variant{FA, FB, LoRA} {
		for _, f16 := range []bool{false, true} {
			a := mustRandom(t, v, 4, 1)
			path := filepath.Join(t.TempDir(), "a.gguf")
			if err := a.Save(path, SaveOptions{F32: !f16}); err != nil {
				t.Fatal(err)
			}
			b, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Resolve(testBase()); err != nil {
				t.Fatal(err)
			}
			if b.Variant != v || b.Rank != 4 || b.Alpha != 8 || b.Name != "test" || b.BaseFingerprint != testBase().Fingerprint || len(b.Modules) != 14 {
				t.Fatalf("%s: metadata did not round-trip: %+v", v, b)
			}
			tol := 0.0
			if f16 {
				tol = 1e-3
			}
			for i, m := range a.Modules {
				n := b.Modules[i]
				if m.Target != n.Target || m.In != n.In || m.Out != n.Out || !slices.Equal(m.Index, n.Index) {
					t.Fatalf("%s %s: module header differs", v, m.Target)
				}
				for k := range m.A {
					if d := math.Abs(float64(m.A[k] - n.A[k])); d > tol*math.Abs(float64(m.A[k]))+tol*1e-4 {
						t.Fatalf("%s %s: A[%d] %g != %g", v, m.Target, k, m.A[k], n.A[k])
					}
				}
				for k := range m.B {
					if d := math.Abs(float64(m.B[k] - n.B[k])); d > tol*math.Abs(float64(m.B[k]))+tol*1e-4 {
						t.Fatalf("%s %s: B[%d] %g != %g", v, m.Target, k, m.B[k], n.B[k])
					}
				}
			}
		}
	}
}

// TestSBoRAHalvesLoRABytes checks the method's storage claim: an SBoRA
// adapter stores one matrix plus r indices per module, LoRA two matrices.
func TestSBoRAHalvesLoRABytes(t *testing.T) {
	for _, v := range []Variant{FA, FB} {
		sb, lora := mustRandom(t, v, 4, 1), mustRandom(t, LoRA, 4, 1)
		ratio := float64(sb.Bytes()) / float64(lora.Bytes())
		t.Logf("%s tensors %d bytes, LoRA %d bytes (%.2f); files %d and %d bytes", v, sb.Bytes(), lora.Bytes(), ratio,
			len(encode(t, sb, SaveOptions{})), len(encode(t, lora, SaveOptions{})))
		if ratio > 0.55 {
			t.Fatalf("%s stores %.2f of LoRA's bytes at the same rank", v, ratio)
		}
	}
}

// rewrite encodes a, lets edit change the writer, and parses the result.
func rewrite(t *testing.T, a *Adapter, edit func(w *gguf.Writer) *gguf.Writer) error {
	t.Helper()
	w, err := a.Encode(SaveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w = edit(w)
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	b, err := Parse(buf.Bytes())
	if err != nil {
		return err
	}
	return b.Resolve(testBase())
}

// rebuild copies w's metadata and tensors, letting tensor replace or drop
// (return ok=false) each tensor.
func rebuild(t *testing.T, a *Adapter, kv func(*gguf.KV), tensor func(name string, typ gguf.TensorType, shape []uint64, data []byte) (string, gguf.TensorType, []uint64, []byte, bool)) error {
	t.Helper()
	raw := encode(t, a, SaveOptions{})
	f, err := gguf.Read(bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	w := gguf.NewWriter()
	for _, k := range f.KV.Keys() {
		v, _ := f.KV.Value(k)
		w.KV.Set(k, v)
	}
	if kv != nil {
		kv(&w.KV)
	}
	for _, ti := range f.Tensors {
		data, _ := f.ReadTensor(ti)
		name, typ, shape, data, ok := ti.Name, ti.Type, ti.Shape, data, true
		if tensor != nil {
			name, typ, shape, data, ok = tensor(name, typ, shape, data)
		}
		if ok {
			if err := w.AddTensor(name, typ, shape, data); err != nil {
				t.Fatal(err)
			}
		}
	}
	return rewrite(t, a, func(*gguf.Writer) *gguf.Writer { return w })
}

func setI32(data []byte, i int, v int32) []byte {
	out := bytes.Clone(data)
	out[4*i], out[4*i+1], out[4*i+2], out[4*i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	return out
}

func TestValidationErrors(t *testing.T) {
	fa := mustRandom(t, FA, 4, 1)
	fb := mustRandom(t, FB, 4, 1)
	const qIdx = "blk.0.attn_q.weight.sbora_idx"
	cases := []struct {
		name string
		err  func() error
		want string
	}{
		{"FA index out of range", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Delete("adapter.dim.blk.0.attn_q.weight") },
				func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
					if n == qIdx {
						d = setI32(d, 0, 32) // q has 32 input columns
					}
					return n, ty, s, d, true
				})
		}, "out of range"},
		{"negative index", func() error {
			return rebuild(t, fb, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				if n == qIdx {
					d = setI32(d, 1, -3)
				}
				return n, ty, s, d, true
			})
		}, "out of range"},
		{"FB index beyond the output rows", func() error {
			return rebuild(t, fb, func(kv *gguf.KV) { kv.Delete("adapter.dim.blk.0.attn_k.weight") },
				func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
					if n == "blk.0.attn_k.weight.sbora_idx" {
						d = setI32(d, 0, 16) // k has 16 output rows
					}
					return n, ty, s, d, true
				})
		}, "out of range"},
		{"repeated index", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				if n == qIdx {
					d = setI32(d, 1, int32(uint32(d[0])|uint32(d[1])<<8))
				}
				return n, ty, s, d, true
			})
		}, "repeated"},
		{"shape mismatch with the base", func() error {
			a := mustRandom(t, LoRA, 4, 1)
			a.Modules[0].Out = 33
			a.Modules[0].B = append(a.Modules[0].B, 1, 1, 1, 1)
			path := filepath.Join(t.TempDir(), "bad.gguf")
			if err := a.Save(path, SaveOptions{}); err != nil {
				return err
			}
			b, err := Load(path)
			if err != nil {
				return err
			}
			return b.Resolve(testBase())
		}, "does not match base weight"},
		{"rank dimension mismatch", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				if n == "blk.0.attn_q.weight.sbora_b" {
					s = []uint64{2, 64}
				}
				return n, ty, s, d, true
			})
		}, "rank dimension"},
		{"modules with different ranks", func() error {
			a := mustRandom(t, FA, 4, 1)
			b := mustRandom(t, FA, 2, 1)
			a.Modules[3] = b.Modules[3]
			_, err := a.Encode(SaveOptions{})
			if err == nil {
				err = rebuild(t, a, nil, nil)
			}
			return err
		}, "FA needs B of 32×4"},
		{"unknown module", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				return strings.Replace(n, "blk.1.ffn_up", "blk.1.ffn_sideways", 1), ty, s, d, true
			})
		}, "unknown module"},
		{"layer beyond the base", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				return strings.Replace(n, "blk.1.", "blk.7.", 1), ty, s, d, true
			})
		}, "has no weight"},
		{"missing partner tensor", func() error {
			return rebuild(t, fb, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				return n, ty, s, d, n != "blk.1.attn_v.weight.sbora_a"
			})
		}, "needs both"},
		{"tensor of the wrong variant", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				return strings.Replace(n, ".sbora_b", ".lora_b", 1), ty, s, d, true
			})
		}, "does not belong"},
		{"index of the wrong type", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				if n == qIdx {
					ty = gguf.TypeF32
				}
				return n, ty, s, d, true
			})
		}, "I32"},
		{"non-finite value", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				if n == "blk.0.attn_q.weight.sbora_b" {
					d = setI32(d, 5, int32(math.Float32bits(float32(math.NaN()))))
				}
				return n, ty, s, d, true
			})
		}, "non-finite"},
		{"not an adapter", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("general.type", "model") }, nil)
		}, "general.type"},
		{"unknown adapter type", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("adapter.type", "dora") }, nil)
		}, "adapter.type"},
		{"unknown variant", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("adapter.sbora.variant", "fc") }, nil)
		}, "variant"},
		{"metadata rank disagrees", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("adapter.rank", uint32(5)) }, nil)
		}, "metadata rank"},
		{"different base model", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("adapter.base.fingerprint", strings.Repeat("ab", 32)) }, nil)
		}, "different base model"},
		{"different architecture", func() error {
			return rebuild(t, fa, func(kv *gguf.KV) { kv.Set("general.architecture", "qwen2") }, nil)
		}, "architecture"},
		{"no tensors", func() error {
			return rebuild(t, fa, nil, func(n string, ty gguf.TensorType, s []uint64, d []byte) (string, gguf.TensorType, []uint64, []byte, bool) {
				return n, ty, s, d, false
			})
		}, "no adapter tensors"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.err()
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not mention %q", err, c.want)
			}
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, gguf.ErrFormat) {
				t.Fatalf("error %q is neither ErrInvalid nor gguf.ErrFormat", err)
			}
		})
	}
}

// TestTruncatedAndCorrupt cuts a valid file at every length and flips
// bytes across it: every result must be an error or a valid adapter, never
// a panic.
func TestTruncatedAndCorrupt(t *testing.T) {
	raw := encode(t, mustRandom(t, FB, 2, 3), SaveOptions{})
	for n := 0; n < len(raw); n++ {
		if _, err := Parse(raw[:n]); err == nil {
			t.Fatalf("file truncated to %d of %d bytes parsed", n, len(raw))
		}
	}
	for i := 0; i < len(raw); i += 7 {
		for _, x := range []byte{0xff, 0x80, 0x01} {
			bad := bytes.Clone(raw)
			bad[i] ^= x
			if a, err := Parse(bad); err == nil {
				// A flip in tensor data can leave a valid adapter.
				if err := a.Resolve(testBase()); err != nil && !errors.Is(err, ErrInvalid) {
					t.Fatalf("flip at %d: unexpected error type %v", i, err)
				}
			}
		}
	}
}

// TestSaveIsAtomic checks that a failed save leaves the old file intact and
// no temporary files behind.
func TestSaveIsAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.gguf")
	good := mustRandom(t, FA, 4, 1)
	if err := good.Save(path, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	bad := mustRandom(t, FA, 4, 2)
	bad.Modules[0].Index[0] = bad.Modules[0].Index[1] // invalid: refused before writing
	if err := bad.Save(path, SaveOptions{}); err == nil {
		t.Fatal("invalid adapter saved")
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Fatal("failed save changed the existing file")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
}

func TestToLoRAComputesTheSameUpdate(t *testing.T) {
	for _, v := range []Variant{FA, FB} {
		a := mustRandom(t, v, 4, 9)
		l := a.ToLoRA()
		for i, m := range a.Modules {
			d1 := a.DeltaW(m, 1)
			d2 := l.DeltaW(l.Modules[i], 1)
			for k := range d1 {
				if math.Abs(d1[k]-d2[k]) > 1e-12 {
					t.Fatalf("%s %s: ΔW differs at %d", v, m.Target, k)
				}
			}
		}
	}
}

// TestRegionalUpdates checks the method's defining property: FA changes only
// its r input columns of W, FB only its r output rows.
func TestRegionalUpdates(t *testing.T) {
	for _, v := range []Variant{FA, FB} {
		a := mustRandom(t, v, 4, 5)
		for _, m := range a.Modules {
			d := a.DeltaW(m, 1)
			for o := 0; o < m.Out; o++ {
				for i := 0; i < m.In; i++ {
					touched := d[o*m.In+i] != 0
					inRegion := (v == FA && containsIdx(m.Index, i)) || (v == FB && containsIdx(m.Index, o))
					if touched && !inRegion {
						t.Fatalf("%s %s: ΔW[%d,%d] outside its region", v, m.Target, o, i)
					}
				}
			}
		}
	}
}

func containsIdx(idx []int32, x int) bool {
	for _, v := range idx {
		if int(v) == x {
			return true
		}
	}
	return false
}

func TestChooseIndices(t *testing.T) {
	a, b := mustRandom(t, FA, 8, 1), mustRandom(t, FA, 8, 1)
	if !slices.Equal(a.Modules[0].Index, b.Modules[0].Index) {
		t.Fatal("index choice is not reproducible for a seed")
	}
	if c := mustRandom(t, FA, 8, 2); slices.Equal(a.Modules[0].Index, c.Modules[0].Index) {
		t.Fatal("different seeds chose the same indices")
	}
	avoid := map[int32]bool{}
	for _, x := range a.Modules[0].Index {
		avoid[x] = true
	}
	rng := rand.New(rand.NewPCG(3, 3))
	got, err := ChooseIndices(rng, 32, 24, avoid)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range got {
		if avoid[x] {
			t.Fatalf("chose avoided index %d", x)
		}
	}
	if _, err := ChooseIndices(rng, 32, 25, avoid); err == nil {
		t.Fatal("chose 25 of 24 free indices")
	}
}

func FuzzParse(f *testing.F) {
	for _, v := range []Variant{FA, FB, LoRA} {
		f.Add(encode(f, mustRandom(f, v, 2, 1), SaveOptions{}))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := Parse(data)
		if err != nil {
			return
		}
		// Whatever parses must survive validation against a base and
		// re-encoding without panicking.
		_ = a.Resolve(testBase())
		_, _ = a.Encode(SaveOptions{})
	})
}
