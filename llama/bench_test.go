package llama

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// BenchmarkDecodeStep times batched decode steps of a 2-layer
// LLaMA-7B-shaped Q4_0 model (repacked), with the base model and with a
// distinct FA rank-16 adapter per sequence. For profiles:
//
//	go test -run '^$' -bench DecodeStep -cpuprofile cpu.out ./llama
func BenchmarkDecodeStep(b *testing.B) {
	path := os.Getenv("SBORA_BENCH_MODEL")
	if path == "" {
		path = filepath.Join(b.TempDir(), "7b2.gguf")
		if err := modelfile.WriteRandom(path, modelfile.SevenB(2, gguf.TypeQ4_0)); err != nil {
			b.Fatal(err)
		}
	}
	m, err := Load(path, LoadOptions{Threads: 2, Repack: true})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	for _, batch := range []int{1, 8, 32} {
		e, err := NewEngine(m, EngineOptions{KVTokens: 4 * batch * 256, MaxSeqLen: 1024, NoPrefixCache: true, Bank: kernels.Config{Slots: batch, MaxRank: 16}})
		if err != nil {
			b.Fatal(err)
		}
		var res []*kernels.Resident
		for i := 0; i < batch; i++ {
			a, err := adapters.NewRandom(m.AdapterBase, adapters.RandomOptions{Variant: adapters.FA, Rank: 16, Seed: uint64(i + 1)})
			if err != nil {
				b.Fatal(err)
			}
			r, err := e.Bank.Load(a)
			if err != nil {
				b.Fatal(err)
			}
			res = append(res, r)
		}
		for _, withAdapters := range []bool{false, true} {
			b.Run(fmt.Sprintf("B%d/adapters-%v", batch, withAdapters), func(b *testing.B) {
				seqs := make([]Seq, batch)
				for i := range seqs {
					seqs[i] = Seq{KV: e.Pool.NewSeq(0), Tokens: []int32{1, 400, 401, 402, 403, 404, 405, 406}}
					if withAdapters {
						seqs[i].Adapters = []kernels.Use{{Adapter: res[i], Scale: 1}}
					}
				}
				run := func() {
					for _, s := range seqs {
						if err := s.KV.Reserve(len(s.Tokens)); err != nil {
							b.Fatal(err)
						}
					}
					out, err := e.Step(seqs)
					if err != nil {
						b.Fatal(err)
					}
					for i := range seqs {
						seqs[i].Tokens = []int32{oracle.Argmax(out[i][0])}
					}
				}
				run()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if seqs[0].KV.Len() > 900 {
						b.StopTimer()
						for i := range seqs {
							seqs[i].KV.Release()
							seqs[i].KV = e.Pool.NewSeq(0)
							seqs[i].Tokens = []int32{1, 400, 401}
						}
						run()
						b.StartTimer()
					}
					run()
				}
				b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "tok/s")
				for i := range seqs {
					seqs[i].KV.Release()
				}
			})
		}
		e.Close()
	}
}

// BenchmarkTinyDecodeStep times single-stream decode steps of stories260K,
// where a step is a fraction of a millisecond and per-step overhead shows.
func BenchmarkTinyDecodeStep(b *testing.B) {
	m, err := Load(testutil.Shared(b, "models/stories260K.gguf"), LoadOptions{Threads: 2, Repack: true})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	e, err := NewEngine(m, EngineOptions{KVTokens: 1024, MaxSeqLen: 512, NoPrefixCache: true})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	seq := Seq{KV: e.Pool.NewSeq(0), Tokens: []int32{1, 403, 407, 261, 378}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if seq.KV.Len() > 500 {
			seq.KV.Release()
			seq = Seq{KV: e.Pool.NewSeq(0), Tokens: []int32{1, 403, 407, 261, 378}}
		}
		if err := seq.KV.Reserve(len(seq.Tokens)); err != nil {
			b.Fatal(err)
		}
		out, err := e.Step([]Seq{seq})
		if err != nil {
			b.Fatal(err)
		}
		seq.Tokens = []int32{oracle.Argmax(out[0][0])}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tok/s")
}
