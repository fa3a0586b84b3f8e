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

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/bench/loadtest"
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
		if err := loadtest.Request(url, fmt.Sprintf("a%02d", i), 2); err != nil {
			fatal(err)
		}
	}
	if _, err := loadtest.Run(url, "base", nil, *streams, *tokens); err != nil {
		fatal(err)
	}

	var baseTPS float64
	fmt.Printf("%-22s %12s %10s %10s %8s\n", "scenario", "decode tok/s", "TTFT p50", "TTFT p99", "vs base")
	for _, n := range counts {
		var names []string
		for i := 0; i < n; i++ {
			names = append(names, fmt.Sprintf("a%02d", i))
		}
		r, err := loadtest.Run(url, "base", names, *streams, *tokens)
		if err != nil {
			fatal(err)
		}
		label := "base only"
		if n > 0 {
			label = fmt.Sprintf("%d distinct adapters", n)
		}
		ratio := "1.00 (base)"
		if n == 0 {
			baseTPS = r.TPS
		} else if baseTPS > 0 {
			ratio = fmt.Sprintf("%.2fx", r.TPS/baseTPS)
		}
		fmt.Printf("%-22s %12.1f %9dms %9dms %8s\n", label, r.TPS, r.TTFTp50.Milliseconds(), r.TTFTp99.Milliseconds(), ratio)
	}
}

// fatal reports err and exits. (log.Fatal would be swallowed: slog's
// default handler, set to warnings only, also carries the log package.)
func fatal(err any) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}

func fatalf(format string, args ...any) { fatal(fmt.Sprintf(format, args...)) }
