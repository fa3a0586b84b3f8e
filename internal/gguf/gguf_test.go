package gguf

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func sample(t *testing.T) (*Writer, []byte) {
	t.Helper()
	w := NewWriter()
	values := map[string]any{
		"general.architecture": "llama",
		"u8":                   uint8(7), "i8": int8(-7), "u16": uint16(700), "i16": int16(-700),
		"u32": uint32(70000), "i32": int32(-70000), "f32": float32(1.5), "b": true,
		"u64": uint64(1 << 40), "i64": int64(-1 << 40), "f64": 2.25,
		"strs": []string{"a", "", "ü"}, "ints": []int32{1, -2, 3}, "floats": []float32{0.5},
		"empty": []uint32{},
	}
	for _, k := range []string{"general.architecture", "u8", "i8", "u16", "i16", "u32", "i32", "f32", "b", "u64", "i64", "f64", "strs", "ints", "floats", "empty"} {
		w.KV.Set(k, values[k])
	}
	if err := w.AddTensor("a", TypeF32, []uint64{3, 2}, make([]byte, 24)); err != nil {
		t.Fatal(err)
	}
	q := make([]byte, 34*2)
	q[0] = 9
	if err := w.AddTensor("b", TypeQ8_0, []uint64{64}, q); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	return w, buf.Bytes()
}

func TestRoundTrip(t *testing.T) {
	w, raw := sample(t)
	f, err := Read(bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f.KV.Keys(), w.KV.Keys()) {
		t.Fatalf("keys %v != %v", f.KV.Keys(), w.KV.Keys())
	}
	for _, k := range w.KV.Keys() {
		want, _ := w.KV.Value(k)
		got, _ := f.KV.Value(k)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %#v != %#v", k, got, want)
		}
	}
	b, ok := f.Tensor("b")
	if !ok || b.Type != TypeQ8_0 || b.Offset%f.Alignment != 0 {
		t.Fatalf("tensor b: %+v", b)
	}
	data, err := f.ReadTensor(b)
	if err != nil || data[0] != 9 || len(data) != 68 {
		t.Fatalf("tensor b data: %v %v", data[:1], err)
	}
	if n, _ := f.KV.Int("u32"); n != 70000 {
		t.Fatal("Int accessor")
	}
}

func TestEveryTruncationFails(t *testing.T) {
	_, raw := sample(t)
	f, _ := Read(bytes.NewReader(raw), int64(len(raw)))
	last := f.Tensors[len(f.Tensors)-1]
	end := int(f.DataOffset) + int(last.Offset+last.Size()) // what follows is padding
	for n := 0; n < end; n++ {
		_, err := Read(bytes.NewReader(raw[:n]), int64(n))
		if err == nil {
			t.Fatalf("truncated to %d of %d bytes: no error", n, len(raw))
		}
		if !errors.Is(err, ErrFormat) {
			t.Fatalf("truncated to %d: error %v is not ErrFormat", n, err)
		}
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter()
	if err := w.AddTensor("x", TypeF32, []uint64{4}, make([]byte, 15)); err == nil {
		t.Fatal("wrong data size accepted")
	}
	if err := w.AddTensor("x", TypeQ4_0, []uint64{31}, make([]byte, 18)); err == nil {
		t.Fatal("partial block accepted")
	}
	if err := w.AddTensor("x", TypeF32, []uint64{1}, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	if err := w.AddTensor("x", TypeF32, []uint64{1}, make([]byte, 4)); err == nil {
		t.Fatal("duplicate tensor accepted")
	}
	w.KV.Set("bad", struct{}{})
	if _, err := w.WriteTo(io.Discard); err == nil {
		t.Fatal("unsupported value type written")
	}
}

func TestWriteFileAtomicKeepsOldFileOnFailure(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := WriteFileAtomic(path, func(w io.Writer) error {
		w.Write([]byte("partial"))
		return errors.New("disk full")
	})
	if err == nil {
		t.Fatal("error swallowed")
	}
	if got, _ := os.ReadFile(path); string(got) != "old" {
		t.Fatalf("file is %q", got)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("temporary file left: %v", entries)
	}
}

// TestOverlappingTensorsFail is a regression test: a file whose tensors
// share data bytes was accepted, so a small upload could describe many
// large tensors over the same bytes and make a reader allocate many times
// the file's size.
func TestOverlappingTensorsFail(t *testing.T) {
	_, raw := sample(t)
	// Tensor b's info: name (u64 length 1, "b"), 1 dimension, 64, Q8_0 (8), offset.
	info := []byte{1, 0, 0, 0, 0, 0, 0, 0, 'b', 1, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0}
	at := bytes.Index(raw, info)
	if at < 0 {
		t.Fatal("tensor b's info not found")
	}
	bad := bytes.Clone(raw)
	copy(bad[at+len(info):], make([]byte, 8)) // offset 0: tensor a's bytes
	if _, err := Read(bytes.NewReader(raw), int64(len(raw))); err != nil {
		t.Fatalf("the unpatched file fails: %v", err)
	}
	_, err := Read(bytes.NewReader(bad), int64(len(bad)))
	if !errors.Is(err, ErrFormat) {
		t.Fatalf("overlapping tensors: %v, want ErrFormat", err)
	}
	t.Log(err)
}
