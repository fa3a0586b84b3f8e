package modelfile

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Quiet()
	os.Exit(m.Run())
}

func baseOf(t *testing.T, path string) *adapters.Base {
	f, err := gguf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ts []adapters.TensorShape
	for _, ti := range f.Tensors {
		ts = append(ts, adapters.TensorShape{Name: ti.Name, Shape: ti.Shape})
	}
	return adapters.NewBase("llama", 2, ts)
}

func tensorData(t *testing.T, path string) map[string][]byte {
	f, err := gguf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	for _, ti := range f.Tensors {
		b, err := f.ReadTensor(ti)
		if err != nil {
			t.Fatal(err)
		}
		out[ti.Name] = b
	}
	return out
}

// TestRegionalMergeOnQuantizedBase merges FA and FB adapters into a Q8_0
// model and byte-compares: only blocks in the adapter's region change (FB:
// exactly r rows of blocks per weight), their count is what Merge reports,
// everything else is byte-identical, and the merged weights equal
// W0 + scale·ΔW within Q8_0's rounding.
func TestRegionalMergeOnQuantizedBase(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "q8.gguf")
	spec := Spec{Layers: 2, Embedding: 128, FeedForward: 256, Heads: 4, KVHeads: 2, Vocab: 300, Type: gguf.TypeQ8_0, Seed: 1}
	if err := WriteRandom(src, spec); err != nil {
		t.Fatal(err)
	}
	base := baseOf(t, src)
	before := tensorData(t, src)
	for _, v := range []adapters.Variant{adapters.FB, adapters.FA} {
		const r = 4
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Variant: v, Rank: r, Seed: 3, Std: 0.05,
			Modules: []adapters.Module{adapters.Q, adapters.V, adapters.Down}})
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, "merged-"+string(v)+".gguf")
		stats, err := Merge(src, dst, base, []Weighted{{Adapter: a, Scale: 0.75}})
		if err != nil {
			t.Fatal(err)
		}
		after := tensorData(t, dst)
		changed, region := 0, 0
		for name, old := range before {
			m := a.Module(targetOf(name))
			if m == nil {
				if !bytes.Equal(old, after[name]) {
					t.Fatalf("%s: %s changed but the adapter does not touch it", v, name)
				}
				continue
			}
			in := m.In
			const bs, ts = 32, 34
			rowBlocks := in / bs
			touchedRows := map[int]bool{}
			touchedCols := map[int]bool{}
			for _, x := range m.Index {
				if v == adapters.FB {
					touchedRows[int(x)] = true
				} else {
					touchedCols[int(x)/bs] = true
				}
			}
			perWeight := 0
			for o := 0; o < m.Out; o++ {
				for b := 0; b < rowBlocks; b++ {
					off := (o*rowBlocks + b) * ts
					diff := !bytes.Equal(old[off:off+ts], after[name][off:off+ts])
					inRegion := touchedRows[o] || (v == adapters.FA && touchedCols[b])
					if diff && !inRegion {
						t.Fatalf("%s: %s block (row %d, block %d) changed outside the adapter's region", v, name, o, b)
					}
					if diff {
						perWeight++
					}
					if inRegion {
						region++
					}
				}
			}
			if v == adapters.FB && perWeight != r*rowBlocks {
				t.Errorf("FB: %s has %d changed blocks, want r·blocks-per-row = %d", name, perWeight, r*rowBlocks)
			}
			changed += perWeight
			// Within quantization tolerance of W0 + scale·ΔW.
			w0, _ := ggmlx.Dequantize(uint32(gguf.TypeQ8_0), old, in*m.Out)
			w1, _ := ggmlx.Dequantize(uint32(gguf.TypeQ8_0), after[name], in*m.Out)
			d := a.DeltaW(m, 0.75*float64(a.Scale()))
			for k := range w1 {
				want := float64(w0[k]) + d[k]
				blockMax := 0.0
				for j := k / bs * bs; j < k/bs*bs+bs; j++ {
					blockMax = math.Max(blockMax, math.Abs(float64(w0[j])+d[j]))
				}
				if math.Abs(float64(w1[k])-want) > blockMax/127+1e-6 {
					t.Fatalf("%s: %s[%d] = %g, want %g within Q8_0 rounding %g", v, name, k, w1[k], want, blockMax/127)
				}
			}
		}
		// Merge re-quantizes exactly the region's blocks; a block whose
		// update rounds away can come out byte-identical, so differing
		// blocks are at most that many.
		if stats.BlocksChanged != region || changed > region {
			t.Errorf("%s: region %d blocks, Merge reported %d, %d differ", v, region, stats.BlocksChanged, changed)
		}
		t.Logf("%s rank %d on q, v, down: %d of %d blocks rewritten (%.2f%%)", v, r, stats.BlocksChanged, stats.Blocks, 100*float64(stats.BlocksChanged)/float64(stats.Blocks))
	}
}

func targetOf(name string) adapters.Target {
	for l := 0; l < 2; l++ {
		for _, m := range adapters.AllModules {
			t := adapters.Target{Layer: l, Module: m}
			if t.WeightName() == name {
				return t
			}
		}
	}
	return adapters.Target{Layer: -1}
}
