package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/bench/loadtest"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/train"
	"github.com/sbora-serve/sbora-serve/serve"
)

// runCheck compares this machine's GPU with its CPU on real models and
// prints what deploy/gpu-check.sh reports: logits (base, FA, FB, LoRA, a
// composition; a mixed batch against solo runs) with the bounds they must
// meet, decode and server throughput with 0, 8 and 64 distinct adapters,
// and a short training run on the GPU. It exits non-zero when a bound is
// missed or no GPU is found.
func runCheck(args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	var models stringList
	fs.Var(&models, "model", "model GGUF to check (repeatable)")
	trainModel := fs.String("train-model", "", "model to train 20 FA steps on (default: the first --model)")
	threads := fs.Int("threads", 0, "CPU threads (0 = all cores)")
	streams := fs.Int("streams", 64, "concurrent requests in the server throughput runs")
	dryRun := fs.Bool("dry-run", false, "without a GPU, run the \"GPU\" side on the CPU too (tests the check itself)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(models) == 0 {
		return errors.New("--model is required")
	}
	failed := 0
	report := func(ok bool, format string, a ...any) {
		status := "PASS"
		if !ok {
			status, failed = "FAIL", failed+1
		}
		fmt.Printf("%s  %s\n", status, fmt.Sprintf(format, a...))
	}
	for _, path := range models {
		if err := checkModel(path, *threads, *dryRun, report); err != nil {
			return err
		}
		if err := serverThroughput(path, *threads, *streams); err != nil {
			return err
		}
	}
	tm := *trainModel
	if tm == "" {
		tm = models[0]
	}
	if err := checkTraining(tm, *threads, *dryRun, report); err != nil {
		return err
	}
	if failed > 0 {
		return fmt.Errorf("%d checks failed", failed)
	}
	fmt.Println("all checks passed")
	return nil
}

type reporter func(ok bool, format string, a ...any)

// Bounds: the GPU's kernels (quantized activations, F16 accumulation,
// another summation order) are not the CPU's bit for bit; these are
// relative to the largest logit.
const (
	gpuVsCPUBound    = 2e-2
	batchVsSoloBound = 1e-2
)

func checkModel(path string, threads int, dryRun bool, report reporter) error {
	fmt.Printf("== %s\n", filepath.Base(path))
	setupLogging(false)
	cpuOpts := llama.ServingOptions(threads)
	cpuOpts.GPULayers = 0
	cpu, err := llama.Load(path, cpuOpts)
	if err != nil {
		return err
	}
	defer cpu.Close()
	gpuOpts := llama.ServingOptions(threads)
	gpuOpts.GPULayers = llama.AllLayers
	gpu, err := llama.Load(path, gpuOpts)
	if err != nil {
		return err
	}
	defer gpu.Close()
	if gpu.Placement.GPU == nil && !dryRun {
		return errNoGPU
	}
	fmt.Printf("GPU: %s\n", gpu.Placement)
	bank := kernels.Config{Slots: 72, MaxRank: 16} // an FA adapter takes a B half: 64 of them need 64 slots
	ce, err := llama.NewEngine(cpu, llama.EngineOptions{KVTokens: 8192, Bank: bank})
	if err != nil {
		return err
	}
	defer ce.Close()
	ge, err := llama.NewEngine(gpu, llama.EngineOptions{KVTokens: 8192, Bank: bank})
	if err != nil {
		return err
	}
	defer ge.Close()

	kinds := []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA}
	var as []*adapters.Adapter
	for i, v := range kinds {
		a, err := adapters.NewRandom(cpu.AdapterBase, adapters.RandomOptions{Name: string(v), Variant: v, Rank: 16, Seed: uint64(i + 1), Std: 0.02})
		if err != nil {
			return err
		}
		as = append(as, a)
	}
	load := func(e *llama.Engine) ([]*kernels.Resident, error) {
		var rs []*kernels.Resident
		for _, a := range as {
			r, err := e.Bank.Load(a)
			if err != nil {
				return nil, err
			}
			rs = append(rs, r)
		}
		return rs, nil
	}
	cr, err := load(ce)
	if err != nil {
		return err
	}
	gr, err := load(ge)
	if err != nil {
		return err
	}
	configs := []struct {
		name string
		idx  []int
	}{{"base", nil}, {"FA", []int{0}}, {"FB", []int{1}}, {"LoRA", []int{2}}, {"FA+FB+LoRA", []int{0, 1, 2}}}
	uses := func(rs []*kernels.Resident, idx []int) []kernels.Use {
		var u []kernels.Use
		for _, i := range idx {
			u = append(u, kernels.Use{Adapter: rs[i], Scale: 1})
		}
		return u
	}
	prompt, err := cpu.Tokenizer.Encode("Once upon a time, there was a little girl who lived in a village near the forest.", true)
	if err != nil {
		return err
	}
	logits := func(e *llama.Engine, u []kernels.Use) ([][]float32, error) {
		res, err := stepOnce(e, []llama.Seq{{KV: e.Pool.NewSeq(0), Tokens: prompt, Adapters: u, AllLogits: true}})
		if err != nil {
			return nil, err
		}
		return res[0], nil
	}
	solo := map[string][][]float32{}
	for _, c := range configs {
		want, err := logits(ce, uses(cr, c.idx))
		if err != nil {
			return err
		}
		got, err := logits(ge, uses(gr, c.idx))
		if err != nil {
			return err
		}
		solo[c.name] = got
		d, scale, agree := compare(got, want)
		report(d <= gpuVsCPUBound*scale, "GPU vs CPU logits, %-10s max |Δ| %.3g of max |logit| %.3g (%.2g, bound %.0e); argmax agrees at %d/%d positions",
			c.name, d, scale, d/scale, gpuVsCPUBound, agree, len(want))
	}
	// A mixed batch: every configuration in one step, against each alone.
	var seqs []llama.Seq
	for _, c := range configs {
		seqs = append(seqs, llama.Seq{KV: ge.Pool.NewSeq(0), Tokens: prompt, Adapters: uses(gr, c.idx), AllLogits: true})
	}
	mixed, err := stepOnce(ge, seqs)
	if err != nil {
		return err
	}
	worst := 0.0
	for i, c := range configs {
		d, scale, _ := compare(mixed[i], solo[c.name])
		worst = math.Max(worst, d/scale)
	}
	report(worst <= batchVsSoloBound, "GPU mixed batch of %d configurations vs each alone: worst max |Δ| / max |logit| %.2g (bound %.0e)", len(configs), worst, batchVsSoloBound)

	// Decode throughput on the GPU: 32 sequences, 0, 8 and 64 distinct FA
	// adapters; base runs first and last (the better one is the baseline:
	// the first run also warms the GPU up).
	var tps []float64
	for _, distinct := range []int{0, 8, 64, 0} {
		v, err := decodeThroughput(ge, gpu, distinct, 32, 24)
		if err != nil {
			return err
		}
		tps = append(tps, v)
	}
	base := math.Max(tps[0], tps[3])
	fmt.Printf("INFO  GPU decode, 32 sequences, base: %.0f tok/s\n", base)
	for i, distinct := range []int{8, 64} {
		fmt.Printf("INFO  GPU decode, 32 sequences, %d distinct FA r16 adapters: %.0f tok/s (%.2f× base)\n", distinct, tps[i+1], tps[i+1]/base)
	}
	return nil
}

var errNoGPU = errors.New("no GPU found (is lib/ollama/libggml-cuda.so in the binary's ../lib/ollama, or OLLAMA_LIBRARY_PATH set?)")

func stepOnce(e *llama.Engine, seqs []llama.Seq) ([][][]float32, error) {
	for _, s := range seqs {
		if err := s.KV.Reserve(len(s.Tokens)); err != nil {
			return nil, err
		}
	}
	defer func() {
		for _, s := range seqs {
			s.KV.Release()
		}
	}()
	return e.Step(seqs)
}

// compare returns max |a-b|, max |b| and how many rows' argmax agree.
func compare(a, b [][]float32) (diff, scale float64, agree int) {
	if len(a) != len(b) {
		return math.Inf(1), 1, 0
	}
	for i := range b {
		am, bm := 0, 0
		for j := range b[i] {
			d := math.Abs(float64(a[i][j]) - float64(b[i][j]))
			if math.IsNaN(d) {
				d = math.Inf(1)
			}
			diff = math.Max(diff, d)
			scale = math.Max(scale, math.Abs(float64(b[i][j])))
			if a[i][j] > a[i][am] {
				am = j
			}
			if b[i][j] > b[i][bm] {
				bm = j
			}
		}
		if am == bm {
			agree++
		}
	}
	return diff, math.Max(scale, 1e-9), agree
}

// decodeThroughput runs steps decode steps of b sequences spread over
// distinct adapters and returns tokens per second (after a warm-up step).
func decodeThroughput(e *llama.Engine, m *llama.Model, distinct, b, steps int) (float64, error) {
	var rs []*kernels.Resident
	for i := 0; i < distinct; i++ {
		a, err := adapters.NewRandom(m.AdapterBase, adapters.RandomOptions{Name: fmt.Sprint("d", i), Variant: adapters.FA, Rank: 16, Seed: uint64(100 + i), Std: 0.02})
		if err != nil {
			return 0, err
		}
		r, err := e.Bank.Load(a)
		if err != nil {
			return 0, err
		}
		rs = append(rs, r)
	}
	defer func() {
		for _, r := range rs {
			e.Bank.Unload(r)
		}
	}()
	seqs := make([]llama.Seq, b)
	for i := range seqs {
		seqs[i] = llama.Seq{KV: e.Pool.NewSeq(0), Tokens: []int32{1, 100 + int32(i)}}
		if distinct > 0 {
			seqs[i].Adapters = []kernels.Use{{Adapter: rs[i%distinct], Scale: 1}}
		}
	}
	defer func() {
		for _, s := range seqs {
			s.KV.Release()
		}
	}()
	const warmup = 3
	var start time.Time
	for s := 0; s < steps+warmup; s++ {
		if s == warmup {
			start = time.Now()
		}
		for i := range seqs {
			if err := seqs[i].KV.Reserve(len(seqs[i].Tokens)); err != nil {
				return 0, err
			}
		}
		if _, err := e.Step(seqs); err != nil {
			return 0, err
		}
		for i := range seqs {
			seqs[i].Tokens = []int32{int32(200 + (s+i)%1000)}
		}
	}
	return float64(b*steps) / time.Since(start).Seconds(), nil
}

// serverThroughput serves the model on the GPU over loopback HTTP and
// measures aggregate generation with streams concurrent requests: base
// only, then 8 and 64 distinct adapters.
func serverThroughput(path string, threads, streams int) error {
	dir, err := os.MkdirTemp("", "sbora-check-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	base, err := llama.ReadBase(path)
	if err != nil {
		return err
	}
	for i := 0; i < 64; i++ {
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: fmt.Sprint("a", i), Variant: adapters.FA, Rank: 16, Seed: uint64(500 + i), Std: 0.02})
		if err != nil {
			return err
		}
		if err := a.Save(filepath.Join(dir, fmt.Sprintf("a%d.gguf", i)), adapters.SaveOptions{}); err != nil {
			return err
		}
	}
	srv, err := serve.New(serve.Config{ModelPath: path, ModelName: "base", AdapterDir: dir, GPULayers: llama.AllLayers, Threads: threads,
		Parallel: streams, ContextLength: 512, MaxResident: 72, MaxRank: 16, MaxQueue: 4 * streams})
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	defer hs.Close()
	url := "http://" + ln.Addr().String() + "/v1/completions"
	var baseTPS float64
	for _, distinct := range []int{0, 8, 64} {
		var names []string
		for i := 0; i < distinct; i++ {
			names = append(names, fmt.Sprint("a", i))
		}
		r, err := loadtest.Run(url, "base", names, streams, 32)
		if err != nil {
			return err
		}
		label := "base only"
		if distinct > 0 {
			label = fmt.Sprintf("%d distinct adapters", distinct)
		} else {
			baseTPS = r.TPS
		}
		fmt.Printf("INFO  server, %d concurrent requests × 32 tokens, %s: %.0f tok/s decode (%.2f× base), TTFT p50 %v p99 %v\n",
			streams, label, r.TPS, r.TPS/math.Max(baseTPS, 1e-9), r.TTFTp50.Round(time.Millisecond), r.TTFTp99.Round(time.Millisecond))
	}
	return nil
}

// checkTraining trains 20 FA steps on the GPU (the layer-wise path) on a
// fact the model does not know: the loss must fall, and the saved
// adapter's eval loss must equal the engine's teacher-forced loss with it.
func checkTraining(path string, threads int, dryRun bool, report reporter) error {
	fmt.Printf("== training on %s\n", filepath.Base(path))
	m, err := llama.Load(path, llama.LoadOptions{Threads: threads, GPULayers: llama.AllLayers})
	if err != nil {
		return err
	}
	defer m.Close()
	if m.Placement.GPU == nil && !dryRun {
		return errNoGPU
	}
	tok, err := train.NewTokenizer(m)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "sbora-check-train-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var lines bytes.Buffer
	for _, n := range []string{"Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Sam", "Mia", "Tim", "Lucy", "Jack", "Emma"} {
		for _, o := range []string{"ball", "cat", "dog", "box"} {
			js, _ := json.Marshal(map[string]string{"prompt": fmt.Sprintf("%s saw a %s. What did %s say?", n, o, n),
				"completion": fmt.Sprintf(" %s said: The moon is made of green cheese.", n)})
			lines.Write(append(js, '\n'))
		}
	}
	data := filepath.Join(dir, "fact.jsonl")
	if err := os.WriteFile(data, lines.Bytes(), 0o644); err != nil {
		return err
	}
	exs, err := train.LoadJSONL(data, tok, 64)
	if err != nil {
		return err
	}
	trainSet, evalSet := train.Split(exs, 0.125, 1)
	tr, err := train.New(m, train.Config{Variant: adapters.FA, Rank: 8, LR: 1e-2, Steps: 20, Batch: 8, Seed: 1, Layerwise: true}, trainSet, evalSet)
	if err != nil {
		return err
	}
	var losses []float64
	tr.OnEvent = func(ev train.Event) { losses = append(losses, ev.Loss) }
	start := time.Now()
	if err := tr.Run(context.Background()); err != nil {
		return err
	}
	elapsed := time.Since(start)
	first, last := losses[0], losses[len(losses)-1]
	report(last < 0.7*first, "20 FA training steps on the GPU (%v): loss %.3f → %.3f", elapsed.Round(time.Millisecond), first, last)
	evalLoss, err := tr.EvalLoss(evalSet)
	if err != nil {
		return err
	}
	out := filepath.Join(dir, "fact.gguf")
	if err := tr.Params().Adapter("fact", m.AdapterBase).Save(out, adapters.SaveOptions{}); err != nil {
		return err
	}
	a, err := adapters.Load(out)
	if err != nil {
		return err
	}
	if err := a.Resolve(m.AdapterBase); err != nil {
		return err
	}
	e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: 2048, Bank: kernels.Config{Slots: 2, MaxRank: 8}})
	if err != nil {
		return err
	}
	defer e.Close()
	r, err := e.Bank.Load(a)
	if err != nil {
		return err
	}
	sum, n := 0.0, 0
	for _, ex := range evalSet {
		res, err := stepOnce(e, []llama.Seq{{KV: e.Pool.NewSeq(0), Tokens: ex.Tokens, Adapters: []kernels.Use{{Adapter: r, Scale: 1}}, AllLogits: true}})
		if err != nil {
			return err
		}
		for s := 1; s < len(ex.Tokens); s++ {
			if ex.Loss[s] {
				sum += llama.LogSumExp(res[0][s-1]) - float64(res[0][s-1][ex.Tokens[s]])
				n++
			}
		}
	}
	engineLoss := sum / float64(n)
	report(math.Abs(engineLoss-evalLoss) <= 2e-2*math.Max(1, engineLoss), "saved adapter's eval loss %.4f (trainer) vs %.4f (engine), bound 2e-2", evalLoss, engineLoss)
	return nil
}
