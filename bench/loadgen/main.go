// Command loadgen measures sbora-serve under concurrent streaming load over
// real HTTP: aggregate decode tok/s and time-to-first-token p50/p99 with the
// base model only, one adapter, and 8 and 64 distinct adapters spread over
// the streams. Mixed loads print as ratios to base-only, measured in the
// same run.
//
//	go run ./bench/loadgen                      # synthetic 7B-shaped Q4_0, 2 layers
//	go run ./bench/loadgen --model m.gguf --streams 16
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/serve"
)

func main() {
	modelPath := flag.String("model", "", "model GGUF (default: a synthetic 7B-shaped model)")
	layers := flag.Int("layers", 2, "layers of the synthetic model")
	typ := flag.String("type", "Q4_0", "weight type of the synthetic model")
	streams := flag.Int("streams", 64, "concurrent streams")
	tokens := flag.Int("tokens", 32, "tokens generated per request")
	rank := flag.Int("rank", 16, "adapter rank")
	variant := flag.String("variant", "fa", "adapter variant: fa, fb or lora")
	scenarios := flag.String("scenarios", "0,1,8,64", "distinct adapters per scenario (0 = base only)")
	threads := flag.Int("threads", 0, "CPU threads (0 = all cores)")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	work, err := os.MkdirTemp("", "sbora-loadgen-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(work)
	if *modelPath == "" {
		t, err := gguf.ParseTensorType(*typ)
		if err != nil {
			fatal(err)
		}
		*modelPath = filepath.Join(work, "synthetic-7b.gguf")
		if err := modelfile.WriteRandom(*modelPath, modelfile.SevenB(*layers, t)); err != nil {
			fatal(err)
		}
	}
	var counts []int
	for _, f := range strings.Split(*scenarios, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fatalf("bad scenario %q", f)
		}
		counts = append(counts, n)
	}
	maxAdapters := slices.Max(counts)
	v, err := adapters.ParseVariant(*variant)
	if err != nil {
		fatal(err)
	}
	base, err := llama.ReadBase(*modelPath)
	if err != nil {
		fatal(err)
	}
	adapterDir := filepath.Join(work, "adapters")
	os.MkdirAll(adapterDir, 0o755)
	for i := 0; i < maxAdapters; i++ {
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Variant: v, Rank: *rank, Seed: uint64(i + 1)})
		if err != nil {
			fatal(err)
		}
		if err := a.Save(filepath.Join(adapterDir, fmt.Sprintf("a%02d.gguf", i)), adapters.SaveOptions{}); err != nil {
			fatal(err)
		}
	}
	srv, err := serve.New(serve.Config{ModelPath: *modelPath, ModelName: "base", AdapterDir: adapterDir,
		MaxResident: max(1, maxAdapters), MaxRank: *rank, Parallel: *streams, ContextLength: 128, Threads: *threads,
		PrefillBudget: 512, MaxQueue: 4 * *streams})
	if err != nil {
		fatal(err)
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal(err)
	}
	go http.Serve(ln, srv.Handler())
	url := "http://" + ln.Addr().String() + "/v1/completions"

	fmt.Printf("model %s, %d streams × %d tokens, %s adapters rank %d\n", filepath.Base(*modelPath), *streams, *tokens, v, *rank)
	// Warm up: every adapter resident, graphs and buffers sized.
	for i := 0; i < maxAdapters; i++ {
		if _, err := request(url, fmt.Sprintf("a%02d", i), 2); err != nil {
			fatal(err)
		}
	}
	runScenario(url, nil, *streams, *tokens)

	var baseTPS float64
	fmt.Printf("%-22s %12s %10s %10s %8s\n", "scenario", "decode tok/s", "TTFT p50", "TTFT p99", "vs base")
	for _, n := range counts {
		var names []string
		for i := 0; i < n; i++ {
			names = append(names, fmt.Sprintf("a%02d", i))
		}
		r := runScenario(url, names, *streams, *tokens)
		label := "base only"
		if n > 0 {
			label = fmt.Sprintf("%d distinct adapters", n)
		}
		ratio := "1.00 (base)"
		if n == 0 {
			baseTPS = r.tps
		} else if baseTPS > 0 {
			ratio = fmt.Sprintf("%.2fx", r.tps/baseTPS)
		}
		fmt.Printf("%-22s %12.1f %9.0fms %9.0fms %8s\n", label, r.tps, r.p50*1000, r.p99*1000, ratio)
	}
}

type result struct{ tps, p50, p99 float64 }

// runScenario runs `streams` concurrent streaming requests, stream i using
// adapter names[i % len(names)] (the base model when names is empty).
func runScenario(url string, names []string, streams, tokens int) result {
	var wg sync.WaitGroup
	ttft := make([]float64, streams)
	decodeTokens := make([]int, streams)
	start := time.Now()
	firstAll := make([]time.Time, streams)
	for i := 0; i < streams; i++ {
		model := "base"
		if len(names) > 0 {
			model = names[i%len(names)]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			first, n, err := stream(url, model, tokens)
			if err != nil {
				fatal(err)
			}
			ttft[i] = first.Sub(t0).Seconds()
			firstAll[i] = first
			decodeTokens[i] = n - 1 // tokens after the first
		}()
	}
	wg.Wait()
	end := time.Now()
	total := 0
	for _, n := range decodeTokens {
		total += n
	}
	// Decode throughput: tokens after each stream's first, over the time
	// from the median first token to the end.
	sorted := slices.Clone(firstAll)
	slices.SortFunc(sorted, func(a, b time.Time) int { return a.Compare(b) })
	window := end.Sub(sorted[len(sorted)/2]).Seconds()
	_ = start
	slices.Sort(ttft)
	return result{tps: float64(total) / window, p50: ttft[len(ttft)/2], p99: ttft[min(len(ttft)-1, len(ttft)*99/100)]}
}

func body(model string, maxTokens int, stream bool) []byte {
	m := map[string]any{"model": model, "prompt": "Once upon a time, in a small village by the sea, there lived",
		"max_tokens": maxTokens, "temperature": 0, "stream": stream, "ignore_eos": true,
	}
	if stream {
		m["stream_options"] = map[string]any{"include_usage": true}
	}
	b, _ := json.Marshal(m)
	return b
}

func request(url, model string, maxTokens int) (string, error) {
	resp, err := http.Post(url, "application/json", bytes.NewReader(body(model, maxTokens, false)))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("%s: status %d", model, resp.StatusCode)
	}
	return "", nil
}

// stream runs one streaming request and returns when its first token
// arrived and how many tokens were generated (from the usage chunk).
func stream(url, model string, maxTokens int) (time.Time, int, error) {
	resp, err := http.Post(url, "application/json", bytes.NewReader(body(model, maxTokens, true)))
	if err != nil {
		return time.Time{}, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return time.Time{}, 0, fmt.Errorf("%s: status %d", model, resp.StatusCode)
	}
	var first time.Time
	n := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "data: {") {
			continue
		}
		var chunk struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
			Usage *struct {
				Completion int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if json.Unmarshal([]byte(line[6:]), &chunk) != nil {
			continue
		}
		if first.IsZero() && len(chunk.Choices) > 0 && chunk.Choices[0].Text != "" {
			first = time.Now()
		}
		if chunk.Usage != nil {
			n = chunk.Usage.Completion
		}
	}
	return first, n, sc.Err()
}

// fatal reports err and exits. (log.Fatal would be swallowed: slog's
// default handler, set to warnings only, also carries the log package.)
func fatal(err any) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}

func fatalf(format string, args ...any) { fatal(fmt.Sprintf(format, args...)) }
