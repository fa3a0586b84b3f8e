// Command train benchmarks adapter training, in one run:
//
//  1. cost: step time and memory of FA, FB and LoRA at equal rank, and of
//     FA at rank 2r against LoRA at rank r (equal trainable parameters), on
//     a synthetic 7B-shaped quantized model; ratios against LoRA at rank r.
//
//  2. quality: held-out loss of FA, FB and LoRA trained with the same data,
//     steps and learning rate on stories260K (a GSM8K subset by default),
//     our at-home check of the paper's claims.
//
//     go run ./bench/train
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/train"
)

type run struct {
	label   string
	variant adapters.Variant
	rank    int
}

func main() {
	costModel := flag.String("cost-model", "", "model for the cost runs (default: synthetic 7B-shaped, --layers)")
	layers := flag.Int("layers", 2, "layers of the synthetic model")
	typ := flag.String("type", "Q4_0", "weight type of the synthetic model")
	rank := flag.Int("rank", 16, "rank r of the cost runs")
	seqLen := flag.Int("seq-len", 128, "tokens per sequence in the cost runs")
	costSteps := flag.Int("cost-steps", 3, "timed steps per cost run (after one warm-up step)")
	qualityModel := flag.String("quality-model", "../shared/models/stories260K.gguf", "model for the quality runs")
	qualityData := flag.String("quality-data", "../shared/data/gsm8k_train.jsonl", "GSM8K-style JSONL (question/answer) for the quality runs")
	examples := flag.Int("examples", 600, "examples of the quality data to use (10% held out)")
	qualitySteps := flag.Int("quality-steps", 150, "training steps per quality run")
	qualityRank := flag.Int("quality-rank", 8, "rank r of the quality runs")
	lr := flag.Float64("lr", 5e-3, "learning rate of the quality runs")
	qualitySeqLen := flag.Int("quality-seq-len", 384, "tokens per sequence in the quality runs (longer examples are cut)")
	skipCost := flag.Bool("skip-cost", false, "only run the quality comparison")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	if !*skipCost {
		cost(*costModel, *layers, *typ, *rank, *seqLen, *costSteps)
	}
	quality(*qualityModel, *qualityData, *examples, *qualitySteps, *qualityRank, *lr, *qualitySeqLen)
}

func cost(path string, layers int, typ string, r, seqLen, steps int) {
	if path == "" {
		t, err := gguf.ParseTensorType(typ)
		if err != nil {
			fatal(err)
		}
		dir, _ := os.MkdirTemp("", "sbora-trainbench-")
		defer os.RemoveAll(dir)
		path = filepath.Join(dir, "synthetic-7b.gguf")
		if err := modelfile.WriteRandom(path, modelfile.SevenB(layers, t)); err != nil {
			fatal(err)
		}
	}
	m, err := llama.Load(path, llama.LoadOptions{})
	if err != nil {
		fatal(err)
	}
	defer m.Close()
	// One sequence of seqLen random tokens, loss on the second half.
	ex := &train.Example{}
	for i := 0; i < seqLen; i++ {
		ex.Tokens = append(ex.Tokens, int32(1+(i*7919)%(m.Params.VocabSize-1)))
		ex.Loss = append(ex.Loss, i >= seqLen/2)
	}
	runs := []run{{"LoRA r", adapters.LoRA, r}, {"FA r", adapters.FA, r}, {"FB r", adapters.FB, r}, {"FA 2r", adapters.FA, 2 * r}}
	fmt.Printf("training cost: %s (%d layers, %d wide), 1×%d tokens per step, all 7 projections, median of %d steps\n",
		filepath.Base(path), m.Params.Layers, m.Params.Embedding, seqLen, steps)
	fmt.Printf("%-8s %6s %12s %10s %9s %14s %12s %9s\n", "adapter", "rank", "params", "step", "vs LoRA r", "compute buffer", "params+Adam", "vs LoRA r")
	var baseTime time.Duration
	var baseMem int
	for _, ru := range runs {
		tr, err := train.New(m, train.Config{Variant: ru.variant, Rank: ru.rank, LR: 1e-4, Steps: steps + 1, Batch: 1}, []*train.Example{ex}, nil)
		if err != nil {
			fatal(err)
		}
		var times []time.Duration
		last := time.Now()
		tr.OnEvent = func(train.Event) {
			times = append(times, time.Since(last))
			last = time.Now()
		}
		if err := tr.Run(context.Background()); err != nil {
			fatal(err)
		}
		step := median(times[1:])
		// Host and device copies of the values plus two Adam moments.
		paramMem := tr.Params().Count() * 4 * 4
		mem := tr.ComputeBytes + paramMem
		if baseTime == 0 {
			baseTime, baseMem = step, mem
		}
		fmt.Printf("%-8s %6d %12d %9.2fs %8.2fx %12.1f MiB %9.1f MiB %8.2fx\n", ru.label, ru.rank, tr.Params().Count(),
			step.Seconds(), float64(step)/float64(baseTime), float64(tr.ComputeBytes)/(1<<20), float64(paramMem)/(1<<20),
			float64(mem)/float64(baseMem))
		tr.Params().Close()
	}
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}

func quality(modelPath, dataPath string, n, steps, r int, lr float64, seqLen int) {
	m, err := llama.Load(modelPath, llama.LoadOptions{})
	if err != nil {
		fatal(err)
	}
	defer m.Close()
	raw, err := os.ReadFile(dataPath)
	if err != nil {
		fatal(err)
	}
	tok, err := train.NewTokenizer(m)
	if err != nil {
		fatal(err)
	}
	// GSM8K lines are {"question","answer"}: turn them into prompt/completion
	// and keep those whose question leaves room for an answer in seqLen.
	var exs []*train.Example
	skipped := 0
	for i, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		if len(exs) >= n {
			break
		}
		var q struct{ Question, Answer string }
		if err := json.Unmarshal([]byte(line), &q); err != nil {
			fatalf("%s:%d: %v", dataPath, i+1, err)
		}
		js, _ := json.Marshal(map[string]string{"prompt": "Question: " + q.Question + "\nAnswer:", "completion": " " + q.Answer})
		ex, err := train.ReadJSONL(strings.NewReader(string(js)), dataPath, tok, seqLen)
		if err != nil {
			skipped++
			continue
		}
		exs = append(exs, ex...)
	}
	trainSet, evalSet := train.Split(exs, 0.1, 1)
	base, err := train.BaseEvalLoss(m, evalSet, 8)
	if err != nil {
		fatal(err)
	}
	fmt.Printf("\nquality: %s on %d examples of %s (%d held out; %d skipped: question too long for %d tokens), %d steps × batch 8, lr %g, all 7 projections\n",
		filepath.Base(modelPath), len(trainSet), filepath.Base(dataPath), len(evalSet), skipped, seqLen, steps, lr)
	fmt.Printf("%-8s %6s %10s %15s\n", "adapter", "rank", "params", "held-out loss")
	fmt.Printf("%-8s %6s %10s %15.4f\n", "base", "-", "0", base)
	for _, ru := range []run{{"LoRA", adapters.LoRA, r}, {"FA", adapters.FA, r}, {"FB", adapters.FB, r}, {"FA", adapters.FA, 2 * r}} {
		tr, err := train.New(m, train.Config{Variant: ru.variant, Rank: ru.rank, LR: lr, Steps: steps, Batch: 8, Seed: 1}, trainSet, evalSet)
		if err != nil {
			fatal(err)
		}
		if err := tr.Run(context.Background()); err != nil {
			fatal(err)
		}
		l, err := tr.EvalLoss(evalSet)
		if err != nil {
			fatal(err)
		}
		fmt.Printf("%-8s %6d %10d %15.4f\n", ru.label, ru.rank, tr.Params().Count(), l)
		tr.Params().Close()
	}
}

// fatal reports err and exits. (log.Fatal would be swallowed: slog's
// default handler, set to warnings only, also carries the log package.)
func fatal(err any) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}

func fatalf(format string, args ...any) { fatal(fmt.Sprintf(format, args...)) }
