// Command decode measures sbora-serve's engine against llama.cpp (its C
// API, the same ggml build, the same threads and model, llama.cpp at its
// defaults: CPU weights repacked) in one run: batched decode of B = 1, 8
// and 32 sequences with the base model and with B distinct FA adapters,
// and prefill of one long prompt. Engines are stepped in turn so all see
// the same machine; tok/s come from median step times.
//
//	go run ./bench/decode --synthetic 7b --layers 2     # 7B-shaped Q4_0
//	go run ./bench/decode --model ../shared/models/stories260K.gguf --batches 1
//	go run ./bench/decode --synthetic 7b --context 512 --batches 8 --prefill 0   # long contexts
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ollama/ollama/ml"

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
	tokens := flag.Int("tokens", 32, "decode steps per measurement")
	threads := flag.Int("threads", 2, "CPU threads")
	batches := flag.String("batches", "1,8,32", "batch sizes (sequences decoded together)")
	rank := flag.Int("rank", 16, "adapter rank")
	variant := flag.String("variant", "fa", "adapter variant: fa, fb or lora")
	bankType := flag.String("bank-type", "f16", "adapter bank storage: f16, f32 or q8_0")
	noRepack := flag.Bool("no-repack", false, "do not repack our CPU weights (llama.cpp keeps its default)")
	prefill := flag.Int("prefill", 442, "prompt tokens of the prefill measurement (0: skip)")
	context := flag.Int("context", 0, "prompt tokens of each decoding sequence (0: a one-line prompt); long contexts weigh attention")
	threadsPerGraph := flag.Bool("threads-per-graph", false, "start worker threads for every graph (ggml's default) instead of a persistent pool")
	gather := flag.Bool("gather-attention", false, "gather each sequence's keys and values for ggml's flash attention instead of reading the pool in place")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	if *synthetic != "" {
		if *synthetic != "7b" {
			fatalf("unknown synthetic model %q", *synthetic)
		}
		t, err := gguf.ParseTensorType(*typ)
		check(err)
		dir, err := os.MkdirTemp("", "sbora-bench-")
		check(err)
		defer os.RemoveAll(dir)
		*modelPath = filepath.Join(dir, "synthetic.gguf")
		check(modelfile.WriteRandom(*modelPath, modelfile.SevenB(*layers, t)))
	}
	if *modelPath == "" {
		fatal("--model or --synthetic is required")
	}
	var bs []int
	for _, f := range strings.Split(*batches, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		check(err)
		bs = append(bs, n)
	}
	v, err := adapters.ParseVariant(*variant)
	check(err)
	bankDType := map[string]ml.DType{"f16": ml.DTypeF16, "f32": ml.DTypeF32, "q8_0": ml.DTypeQ80}[*bankType]

	opts := llama.ServingOptions(*threads)
	opts.Repack, opts.PersistentThreads = !*noRepack, !*threadsPerGraph
	m, err := llama.Load(*modelPath, opts)
	check(err)
	defer m.Close()
	nRepacked, _ := m.Repacked()
	prompt, _ := m.Tokenizer.Encode("Once upon a time, there was a", true)
	if *context > 0 {
		prompt = repeatTo(prompt, *context)
	}
	maxB := slices.Max(bs)
	seqLen := len(prompt) + *tokens + 2
	e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: 2 * (maxB + 1) * (seqLen + 64), MaxSeqLen: max(seqLen, *prefill+2), NoPrefixCache: true, HugePages: true, GatherAttention: *gather,
		Bank: kernels.Config{Slots: maxB, MaxRank: *rank, DType: bankDType}})
	check(err)
	defer e.Close()
	var res []*kernels.Resident
	for i := 0; i < maxB; i++ {
		a, err := adapters.NewRandom(m.AdapterBase, adapters.RandomOptions{Variant: v, Rank: *rank, Seed: uint64(i + 1)})
		check(err)
		r, err := e.Bank.Load(a)
		check(err)
		res = append(res, r)
	}
	fmt.Printf("model %s (%d layers, %d wide), %d threads, %d decode steps per run; ours: %d weights repacked, %s bank; llama.cpp: defaults (repacking on)\n",
		filepath.Base(*modelPath), m.Params.Layers, m.Params.Embedding, *threads, *tokens, nRepacked, *bankType)
	fmt.Printf("%6s %14s %22s %32s\n", "batch", "llama.cpp", "sbora-serve base", fmt.Sprintf("sbora-serve, B distinct %s r%d", v, *rank))
	for _, b := range bs {
		o, err := oracle.Open(*modelPath, nil, oracle.Options{Context: b * (seqLen + 8), Threads: *threads, Sequences: b, Repack: true, Defaults: true})
		check(err)
		uses := make([][]kernels.Use, b)
		for i := range uses {
			uses[i] = []kernels.Use{{Adapter: res[i%len(res)], Scale: 1}}
		}
		r := alternate(o, e, prompt, *tokens, b, uses)
		o.Close()
		fmt.Printf("%6d %10.1f tok/s %10.1f tok/s %5.2fx %14.1f tok/s %5.2fx base\n", b, r.ref, r.base, r.baseRatio, r.adapted, r.adapterRatio)
	}
	if *prefill > 0 {
		long := repeatTo(prompt, *prefill)
		o, err := oracle.Open(*modelPath, nil, oracle.Options{Context: *prefill + 8, Threads: *threads, Repack: true, Defaults: true})
		check(err)
		var ref, ours []time.Duration
		for i := 0; i < 3; i++ {
			start := time.Now()
			_, err := o.Prefill(long)
			check(err)
			ref = append(ref, time.Since(start))
			kv := e.Pool.NewSeq(0)
			check(kv.Reserve(len(long)))
			start = time.Now()
			_, err = e.Step([]llama.Seq{{KV: kv, Tokens: long}})
			check(err)
			ours = append(ours, time.Since(start))
			kv.Release()
		}
		o.Close()
		r, s := float64(*prefill)/median(ref).Seconds(), float64(*prefill)/median(ours).Seconds()
		fmt.Printf("prefill %d tokens: llama.cpp %.1f tok/s, sbora-serve %.1f tok/s (%.2fx)\n", *prefill, r, s, s/r)
	}
}

// result is one batch size's measurement: each engine's tok/s from its
// median step, and ratios as the median over turns of the time ratio of
// the engines' turns (robust to the machine's speed drifting during the
// run: each ratio compares turns a few milliseconds apart).
type result struct {
	ref, base, adapted      float64
	baseRatio, adapterRatio float64
}

// alternate prefills b sequences in each engine, then decodes steps
// tokens, the engines taking turns: llama.cpp, ours with the base model,
// ours with uses.
func alternate(o *oracle.Oracle, e *llama.Engine, prompt []int32, steps, b int, uses [][]kernels.Use) result {
	// llama.cpp: all prompts in one batch.
	var entries []oracle.Entry
	for s := 0; s < b; s++ {
		for i, t := range prompt {
			entries = append(entries, oracle.Entry{Token: t, Pos: i, Seq: s, Logits: i == len(prompt)-1})
		}
	}
	logits, err := o.EvalBatch(entries)
	check(err)
	next := make([]int32, b)
	for s := range next {
		next[s] = oracle.Argmax(logits[s])
	}
	ours := func(withAdapters bool) []llama.Seq {
		seqs := make([]llama.Seq, b)
		for i := range seqs {
			seqs[i] = llama.Seq{KV: e.Pool.NewSeq(0), Tokens: prompt}
			if withAdapters {
				seqs[i].Adapters = uses[i]
			}
			check(seqs[i].KV.Reserve(len(prompt)))
		}
		res, err := e.Step(seqs)
		check(err)
		for i := range seqs {
			seqs[i].Tokens = []int32{oracle.Argmax(res[i][0])}
		}
		return seqs
	}
	plain, withAdapters := ours(false), ours(true)
	defer func() {
		for i := range plain {
			plain[i].KV.Release()
			withAdapters[i].KV.Release()
		}
	}()
	step := func(seqs []llama.Seq) time.Duration {
		for _, s := range seqs {
			check(s.KV.Reserve(1))
		}
		start := time.Now()
		res, err := e.Step(seqs)
		check(err)
		d := time.Since(start)
		for i := range seqs {
			seqs[i].Tokens = []int32{oracle.Argmax(res[i][0])}
		}
		return d
	}
	// Each engine runs a few consecutive steps in turn: a server decodes
	// the same batch step after step (our engine reuses the graph of a
	// repeated step shape), and the turns keep the machine fair.
	const turn = 4
	var times [3][]time.Duration
	var baseRatios, adapterRatios []float64
	sum := func(d []time.Duration) (s time.Duration) {
		for _, x := range d[len(d)-turn:] {
			s += x
		}
		return s
	}
	pos := len(prompt)
	for k := 0; k < steps; k += turn {
		for j := 0; j < turn; j++ {
			entries = entries[:0]
			for s := 0; s < b; s++ {
				entries = append(entries, oracle.Entry{Token: next[s], Pos: pos, Seq: s, Logits: true})
			}
			start := time.Now()
			logits, err := o.EvalBatch(entries)
			check(err)
			times[0] = append(times[0], time.Since(start))
			for s := range next {
				next[s] = oracle.Argmax(logits[s])
			}
			pos++
		}
		for j := 0; j < turn; j++ {
			times[1] = append(times[1], step(plain))
		}
		for j := 0; j < turn; j++ {
			times[2] = append(times[2], step(withAdapters))
		}
		baseRatios = append(baseRatios, float64(sum(times[0]))/float64(sum(times[1])))
		adapterRatios = append(adapterRatios, float64(sum(times[1]))/float64(sum(times[2])))
	}
	tps := func(d []time.Duration) float64 { return float64(b) / median(d).Seconds() }
	return result{ref: tps(times[0]), base: tps(times[1]), adapted: tps(times[2]),
		baseRatio: medianFloat(baseRatios), adapterRatio: medianFloat(adapterRatios)}
}

// repeatTo repeats tokens to n tokens.
func repeatTo(tokens []int32, n int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = tokens[i%len(tokens)]
	}
	return out
}

func medianFloat(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func check(err error) {
	if err != nil {
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
