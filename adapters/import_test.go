package adapters

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fixtureBase matches adapters/testdata/hf/make_fixtures.py's model: 2
// layers, hidden 64, 4 heads, 2 KV heads, feed-forward 128.
func fixtureBase() *Base {
	var ts []TensorShape
	for l := 0; l < 2; l++ {
		for _, s := range []struct {
			n       string
			in, out uint64
		}{{"attn_q", 64, 64}, {"attn_k", 64, 32}, {"attn_v", 64, 32}, {"attn_output", 64, 64}, {"ffn_gate", 64, 128}, {"ffn_up", 64, 128}, {"ffn_down", 128, 64}} {
			ts = append(ts, TensorShape{Name: fmt.Sprintf("blk.%d.%s.weight", l, s.n), Shape: []uint64{s.in, s.out}})
		}
	}
	b := NewBase("llama", 2, ts)
	b.Heads, b.KVHeads = 4, 2
	return b
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "torch", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The seeds were written by PyTorch (make_fixtures.py); end-to-end logits
// checks against PyTorch live in llama's TestImportMatchesPyTorch.
func TestImportFixtures(t *testing.T) {
	cfg := readFixture(t, "sbora_fa_config.json")
	for _, c := range []struct {
		file string
		want Variant
	}{{"sbora_fa.bin", FA}, {"sbora_fb.bin", FB}, {"lora.safetensors", LoRA}} {
		conf := cfg
		if c.want != FA {
			conf = []byte(`{"r": 4, "lora_alpha": 8}`)
		}
		a, err := ImportBytes(readFixture(t, c.file), conf, fixtureBase(), ImportOptions{})
		if err != nil {
			t.Fatalf("%s: %v", c.file, err)
		}
		if a.Variant != c.want || a.Rank != 4 || a.Alpha != 8 || len(a.Modules) != 14 {
			t.Errorf("%s: %s rank %d alpha %g modules %d", c.file, a.Variant, a.Rank, a.Alpha, len(a.Modules))
		}
	}
}

// TestRotaryRow checks the permutation against llama.cpp's definition
// (reshape rows to [heads, 2, hd/2], swap the last two axes) by brute force.
func TestRotaryRow(t *testing.T) {
	for _, c := range []struct{ rows, heads int }{{64, 4}, {32, 2}, {8, 1}} {
		hd := c.rows / c.heads
		seen := map[int]bool{}
		for i := 0; i < c.heads; i++ {
			for two := 0; two < 2; two++ {
				for j := 0; j < hd/2; j++ {
					hf := i*hd + two*(hd/2) + j // [heads, 2, hd/2] order
					gg := i*hd + j*2 + two      // [heads, hd/2, 2] order
					if got := RotaryRow(hf, c.rows, c.heads); got != gg {
						t.Fatalf("rows %d heads %d: HF row %d -> %d, want %d", c.rows, c.heads, hf, got, gg)
					}
					seen[gg] = true
				}
			}
		}
		if len(seen) != c.rows {
			t.Fatal("not a permutation")
		}
	}
}

func safetensors(t testing.TB, tensors map[string]any) []byte {
	header := map[string]any{}
	var body bytes.Buffer
	for _, name := range sortedKeys(tensors) {
		start := body.Len()
		var dtype string
		var shape []int
		switch v := tensors[name].(type) {
		case matrix2:
			dtype, shape = "F32", []int{v.rows, len(v.vals) / v.rows}
			binary.Write(&body, binary.LittleEndian, v.vals)
		case []float32:
			dtype, shape = "F32", []int{len(v)}
			binary.Write(&body, binary.LittleEndian, v)
		case []int64:
			dtype, shape = "I64", []int{len(v)}
			binary.Write(&body, binary.LittleEndian, v)
		}
		header[name] = map[string]any{"dtype": dtype, "shape": shape, "data_offsets": []int{start, body.Len()}}
	}
	h, _ := json.Marshal(header)
	var out bytes.Buffer
	binary.Write(&out, binary.LittleEndian, uint64(len(h)))
	out.Write(h)
	out.Write(body.Bytes())
	return out.Bytes()
}

type matrix2 struct {
	rows int
	vals []float32
}

func TestImportErrors(t *testing.T) {
	base := fixtureBase()
	lora := readFixture(t, "lora.safetensors")
	cfg := []byte(`{"r": 4, "lora_alpha": 8}`)
	cases := []struct {
		name    string
		weights []byte
		config  []byte
		want    string
	}{
		{"truncated safetensors", lora[:len(lora)/2], cfg, "outside the file"},
		{"header overflow", append([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, lora[8:]...), cfg, "header length"},
		{"garbage", []byte("hello world, not a checkpoint"), cfg, "safetensors"},
		{"truncated torch zip", readFixture(t, "sbora_fa.bin")[:2000], cfg, "torch checkpoint"},
		{"unknown key", safetensors(t, map[string]any{"model.embed_tokens.lora_A.weight": []float32{1}}), cfg, "not LLaMA projection adapters: model.embed_tokens"},
		{"missing partner", safetensors(t, map[string]any{"base_model.model.model.layers.0.self_attn.q_proj.lora_A": []int64{1, 2, 3, 4}}), cfg, "only one of lora_A and lora_B"},
		{"index out of range", safetensors(t, map[string]any{
			"base_model.model.model.layers.0.self_attn.v_proj.lora_A":        []int64{1, 2, 3, 99},
			"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": matrix2{32, make([]float32, 32*4)}}), cfg, "out of range"},
		{"layer beyond the base", safetensors(t, map[string]any{
			"base_model.model.model.layers.5.mlp.up_proj.lora_A":        []int64{1, 2, 3, 4},
			"base_model.model.model.layers.5.mlp.up_proj.lora_B.weight": matrix2{128, make([]float32, 128*4)}}), cfg, "has no weight"},
		{"wrong rank in config", lora, []byte(`{"r": 8, "lora_alpha": 8}`), "r = 8"},
		{"no alpha", lora, nil, "no lora_alpha"},
		{"rslora", lora, []byte(`{"r": 4, "lora_alpha": 8, "use_rslora": true}`), ""},
		{"variant name mismatch", lora, []byte(`{"peft_type": "SBORA", "adapter_name": "sbora_fa", "r": 4, "lora_alpha": 8}`), "dense LoRA"},
	}
	for _, c := range cases {
		_, err := ImportBytes(c.weights, c.config, base, ImportOptions{})
		if c.name == "rslora" {
			// rslora is refused by Import (config on disk); ImportBytes
			// ignores it, so check the directory path instead.
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), c.weights, 0o644)
			os.WriteFile(filepath.Join(dir, "adapter_config.json"), c.config, 0o644)
			_, err = Import(dir, base, ImportOptions{})
			c.want = "use_rslora"
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
}

// TestTorchZipRejectsLyingStorage hand-edits a real checkpoint so a storage
// record is shorter than its pickle claims: the reader must refuse before
// allocating, not panic.
func TestTorchZipRejectsLyingStorage(t *testing.T) {
	src := readFixture(t, "sbora_fa.bin")
	zr, err := zip.NewReader(bytes.NewReader(src), int64(len(src)))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, f := range zr.File {
		rc, _ := f.Open()
		var data bytes.Buffer
		data.ReadFrom(rc)
		rc.Close()
		b := data.Bytes()
		if strings.Contains(f.Name, "/data/") && len(b) > 8 {
			b = b[:len(b)-8]
		}
		w, _ := zw.CreateHeader(&zip.FileHeader{Name: f.Name, Method: zip.Store})
		w.Write(b)
	}
	zw.Close()
	if _, err := ImportBytes(buf.Bytes(), []byte(`{"r":4,"lora_alpha":8}`), fixtureBase(), ImportOptions{}); err == nil || !strings.Contains(err.Error(), "claims") {
		t.Fatalf("lying storage: %v", err)
	}
}

func FuzzImportBytes(f *testing.F) {
	for _, name := range []string{"sbora_fa.bin", "sbora_fb.bin", "lora.safetensors"} {
		f.Add(readFixture(f, name))
	}
	base := fixtureBase()
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := ImportBytes(data, []byte(`{"r": 4, "lora_alpha": 8}`), base, ImportOptions{})
		if err == nil {
			if err := a.ValidateFor(base); err != nil {
				t.Fatalf("import returned an invalid adapter: %v", err)
			}
		}
	})
}
