// Command decode measures decode throughput of sbora-serve's engine against
// llama.cpp (same model, same threads, same run): single-stream tok/s with
// and without an adapter, and aggregate tok/s of batched streams.
//
//	go run ./bench/decode --model ../shared/models/stories260K.gguf
//	go run ./bench/decode --synthetic 7b --layers 2     # 7B-shaped Q4_0
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

func main() {
	modelPath := flag.String("model", "", "model GGUF")
	synthetic := flag.String("synthetic", "", "generate a random model instead: 7b")
	layers := flag.Int("layers", 2, "layers of the synthetic model")
	typ := flag.String("type", "Q4_0", "weight type of the synthetic model")
	tokens := flag.Int("tokens", 64, "tokens to decode per stream")
	threads := flag.Int("threads", 2, "CPU threads")
	batch := flag.Int("batch", 16, "streams in the batched run")
	rank := flag.Int("rank", 16, "adapter rank")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	if *synthetic != "" {
		if *synthetic != "7b" {
			fatalf("unknown synthetic model %q", *synthetic)
		}
		t, err := gguf.ParseTensorType(*typ)
		if err != nil {
			fatal(err)
		}
		dir, err := os.MkdirTemp("", "sbora-bench-")
		if err != nil {
			fatal(err)
		}
		defer os.RemoveAll(dir)
		*modelPath = filepath.Join(dir, "synthetic.gguf")
		start := time.Now()
		if err := modelfile.WriteRandom(*modelPath, modelfile.SevenB(*layers, t)); err != nil {
			fatal(err)
		}
		fmt.Printf("synthetic 7B-shaped model: %d layers, %s, written in %.1fs\n", *layers, t, time.Since(start).Seconds())
	}
	if *modelPath == "" {
		fatal("--model or --synthetic is required")
	}

	m, err := llama.Load(*modelPath, llama.LoadOptions{Threads: *threads})
	if err != nil {
		fatal(err)
	}
	prompt, _ := m.Tokenizer.Encode("Once upon a time, there was a", true)
	slotLen := len(prompt) + *tokens + 1

	o, err := oracle.Open(*modelPath, nil, oracle.Options{Context: slotLen, Threads: *threads})
	if err != nil {
		fatal(err)
	}
	defer o.Close()

	e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: (*batch + 2) * slotLen, MaxSeqLen: slotLen, NoPrefixCache: true,
		Bank: kernels.Config{Slots: *batch, MaxRank: *rank}})
	if err != nil {
		fatal(err)
	}
	var res []*kernels.Resident
	for i := 0; i < *batch; i++ {
		a, err := adapters.NewRandom(m.AdapterBase, adapters.RandomOptions{Variant: adapters.FA, Rank: *rank, Seed: uint64(i + 1)})
		if err != nil {
			fatal(err)
		}
		r, err := e.Bank.Load(a)
		if err != nil {
			fatal(err)
		}
		res = append(res, r)
	}
	ref, ours, withAdapter := alternate(o, e, prompt, *tokens, []kernels.Use{{Adapter: res[0], Scale: 1}})
	fmt.Printf("model %s (%d layers, %d wide), %d threads, %d decode tokens\n", filepath.Base(*modelPath), m.Params.Layers, m.Params.Embedding, *threads, *tokens)
	fmt.Printf("  (single streams: medians of alternating decode steps)\n")
	fmt.Printf("  llama.cpp          1 stream : %8.1f tok/s  (baseline)\n", ref)
	fmt.Printf("  sbora-serve        1 stream : %8.1f tok/s  %.2fx llama.cpp\n", ours, ours/ref)
	fmt.Printf("  sbora-serve FA r%-3d 1 stream : %8.1f tok/s  %.2fx llama.cpp, %.2fx base\n", *rank, withAdapter, withAdapter/ref, withAdapter/ours)

	base := greedyStreams(e, prompt, *tokens, *batch, nil)
	var perStream [][]kernels.Use
	for i := 0; i < *batch; i++ {
		perStream = append(perStream, []kernels.Use{{Adapter: res[i], Scale: 1}})
	}
	distinct := greedyStreamsPer(e, prompt, *tokens, perStream)
	fmt.Printf("  sbora-serve %3d streams, base           : %8.1f tok/s aggregate (baseline for the next line)\n", *batch, base)
	fmt.Printf("  sbora-serve %3d streams, %3d FA adapters: %8.1f tok/s aggregate  %.2fx base\n", *batch, *batch, distinct, distinct/base)
}

// alternate decodes n tokens on three single streams, stepping them in
// turn so all see the same machine: llama.cpp, our engine with the base,
// and our engine with uses. It returns each one's tok/s from its median
// decode step time.
func alternate(o *oracle.Oracle, e *llama.Engine, prompt []int32, n int, uses []kernels.Use) (ref, base, adapted float64) {
	seqs := []llama.Seq{{KV: e.Pool.NewSeq(0), Tokens: prompt}, {KV: e.Pool.NewSeq(0), Tokens: prompt, Adapters: uses}}
	defer seqs[0].KV.Release()
	defer seqs[1].KV.Release()
	times := [3][]time.Duration{}
	logits, err := o.Prefill(prompt)
	if err != nil {
		fatal(err)
	}
	pos := len(prompt)
	for step := 0; step <= n; step++ {
		if step > 0 {
			start := time.Now()
			if logits, err = o.Decode(oracle.Argmax(logits), pos); err != nil {
				fatal(err)
			}
			times[2] = append(times[2], time.Since(start))
			pos++
		}
		for i := range seqs {
			start := time.Now()
			reserve(seqs[i])
			res, err := e.Step([]llama.Seq{seqs[i]})
			if err != nil {
				fatal(err)
			}
			if step > 0 { // the prefill is not a decode step
				times[i] = append(times[i], time.Since(start))
			}
			seqs[i].Tokens = []int32{oracle.Argmax(res[0][0])}
		}
	}
	med := func(d []time.Duration) float64 {
		slices.Sort(d)
		return 1 / d[len(d)/2].Seconds()
	}
	return med(times[2]), med(times[0]), med(times[1])
}

// greedyStreams decodes n tokens on k streams that all use uses.
func greedyStreams(e *llama.Engine, prompt []int32, n, k int, uses []kernels.Use) float64 {
	per := make([][]kernels.Use, k)
	for i := range per {
		per[i] = uses
	}
	return greedyStreamsPer(e, prompt, n, per)
}

// greedyStreamsPer prefills every stream, then times n batched decode steps
// and returns aggregate decode tok/s.
func greedyStreamsPer(e *llama.Engine, prompt []int32, n int, uses [][]kernels.Use) float64 {
	k := len(uses)
	seqs := make([]llama.Seq, k)
	for i := range seqs {
		seqs[i] = llama.Seq{KV: e.Pool.NewSeq(0), Tokens: prompt, Adapters: uses[i]}
		reserve(seqs[i])
		defer seqs[i].KV.Release()
	}
	res, err := e.Step(seqs)
	if err != nil {
		fatal(err)
	}
	start := time.Now()
	for step := 0; step < n; step++ {
		for i := range seqs {
			seqs[i].Tokens = []int32{oracle.Argmax(res[i][0])}
			reserve(seqs[i])
		}
		if res, err = e.Step(seqs); err != nil {
			fatal(err)
		}
	}
	return float64(n*k) / time.Since(start).Seconds()
}

// reserve makes room for a sequence's next tokens.
func reserve(s llama.Seq) {
	if err := s.KV.Reserve(len(s.Tokens)); err != nil {
		fatal(err)
	}
}

// fatal reports err and exits. (log.Fatal would be swallowed: slog's
// default handler, set to warnings only, also carries the log package.)
func fatal(err any) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}

func fatalf(format string, args ...any) { fatal(fmt.Sprintf(format, args...)) }
