// Command fit7b serves a full-depth (32-layer) LLaMA-7B-shaped Q4_0 model
// with the server's default flags, as a new user would, and reports what
// that costs: the memory plan printed at start, resident memory after start
// and at peak under 16 concurrent streams over 8 distinct FA rank-16
// adapters plus the base model, time to first token with a shared
// 512-token system prompt with the prefix cache on and off, and how long
// the adapters took to become resident.
//
//	go run ./bench/fit7b                          # generates the model (3.6 GiB)
//	go run ./bench/fit7b --model m.gguf --binary bin/sbora-serve
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
)

func main() {
	modelPath := flag.String("model", "", "model GGUF (default: generate a 32-layer 7B-shaped Q4_0 model)")
	binary := flag.String("binary", "bin/sbora-serve", "the sbora-serve binary (make build)")
	layers := flag.Int("layers", 32, "layers of the generated model")
	streams := flag.Int("streams", 16, "concurrent streams")
	tokens := flag.Int("tokens", 16, "tokens per stream")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	work, err := os.MkdirTemp("", "sbora-fit7b-")
	check(err)
	defer os.RemoveAll(work)
	if *modelPath == "" {
		*modelPath = filepath.Join(work, "7b.gguf")
		start := time.Now()
		check(modelfile.WriteRandom(*modelPath, modelfile.SevenB(*layers, gguf.TypeQ4_0)))
		fmt.Printf("generated %d-layer 7B-shaped Q4_0 model in %.0fs\n", *layers, time.Since(start).Seconds())
	}
	base, err := llama.ReadBase(*modelPath)
	check(err)
	adapterDir := filepath.Join(work, "adapters")
	check(os.MkdirAll(adapterDir, 0o755))
	var names []string
	for i := 0; i < 8; i++ {
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Variant: adapters.FA, Rank: 16, Seed: uint64(i + 1)})
		check(err)
		name := fmt.Sprintf("tenant%d", i)
		check(a.Save(filepath.Join(adapterDir, name+".gguf"), adapters.SaveOptions{}))
		names = append(names, name)
	}
	total := memTotal()
	fmt.Printf("machine: %.1f GiB RAM\n", float64(total)/(1<<30))

	// Prefix cache on (the default).
	srv := start(*binary, *modelPath, adapterDir)
	fmt.Println(srv.plan)
	fmt.Printf("RSS after start: %.2f GiB (%.0f%% of RAM)\n", gib(srv.rss()), 100*float64(srv.rss())/float64(total))
	tok, err := llama.LoadTokenizer(*modelPath)
	check(err)
	system, err := tok.Encode(systemPrompt(512), true)
	check(err)
	system = system[:512]
	ask := func(q string) []int32 {
		ids, err := tok.Encode(q, false)
		check(err)
		return append(append([]int32(nil), system...), ids...)
	}
	cold := srv.ttft(ask(" Question one: who was there?"), "")
	warm := srv.ttft(ask(" Question two: what did they see?"), "")
	fmt.Printf("TTFT with a 512-token system prompt, prefix cache on: first request %.1fs, next request %.1fs (%v prompt tokens reused)\n",
		cold, warm, srv.metric("sbora_prefix_cache_hits_total"))

	// 16 streams over 8 adapters and the base model.
	var wg sync.WaitGroup
	failures := 0
	var mu sync.Mutex
	startLoad := time.Now()
	for i := 0; i < *streams; i++ {
		model := "7b"
		if i < *streams-*streams/8 {
			model = names[i%len(names)]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := srv.stream(model, "Once upon a time, in a small village by the sea, there lived", *tokens); err != nil {
				mu.Lock()
				failures++
				mu.Unlock()
				fmt.Fprintln(os.Stderr, "stream:", err)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("%d streams (%d over 8 FA rank-16 adapters, the rest base) × %d tokens: %d failed, %.0fs\n",
		*streams, *streams-*streams/8, *tokens, failures, time.Since(startLoad).Seconds())
	fmt.Printf("peak RSS: %.2f GiB (%.0f%% of RAM; goal ≤ 85%%)\n", gib(srv.peakRSS()), 100*float64(srv.peakRSS())/float64(total))
	loads := max(1, srv.metric("sbora_adapter_upload_seconds_count"))
	fmt.Printf("adapter loads: %v; upload (read, check, copy into the bank, in the background) %.0f ms each; first use %.1f s after the load began (the step running meanwhile ends first)\n",
		srv.metric("sbora_adapter_upload_seconds_count"), 1000*srv.metric("sbora_adapter_upload_seconds_sum")/loads,
		srv.metric("sbora_adapter_load_seconds_sum")/loads)
	srv.stop()

	// Prefix cache off.
	off := start(*binary, *modelPath, adapterDir, "--no-prefix-cache")
	off.ttft(ask(" Question one: who was there?"), "")
	offWarm := off.ttft(ask(" Question two: what did they see?"), "")
	off.stop()
	fmt.Printf("TTFT of the second request, prefix cache off: %.1fs (on: %.1fs, %.1fx faster)\n", offWarm, warm, offWarm/warm)
}

type server struct {
	cmd  *exec.Cmd
	url  string
	plan string
}

var listenRE = regexp.MustCompile(`listening on (http://\S+)`)

func start(binary, model, dir string, extra ...string) *server {
	args := append([]string{"serve", "--model", model, "--model-name", "7b", "--adapter-dir", dir, "--addr", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(binary, args...)
	stderr, err := cmd.StderrPipe()
	check(err)
	check(cmd.Start())
	s := &server{cmd: cmd}
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "memory plan") {
			s.plan = strings.TrimPrefix(line, "sbora-serve: ")
		}
		if m := listenRE.FindStringSubmatch(line); m != nil {
			s.url = m[1]
			break
		}
	}
	if s.url == "" {
		cmd.Wait()
		fatal("the server did not start")
	}
	go io.Copy(io.Discard, stderr)
	return s
}

func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.cmd.Wait()
}

// rss and peakRSS read the server's resident memory now and at its peak.
func (s *server) rss() int64     { return statusKB(s.cmd.Process.Pid, "VmRSS") }
func (s *server) peakRSS() int64 { return statusKB(s.cmd.Process.Pid, "VmHWM") }

func statusKB(pid int, key string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	check(err)
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == key+":" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func memTotal() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	check(err)
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func (s *server) metric(name string) float64 {
	resp, err := http.Get(s.url + "/metrics")
	check(err)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == name {
			v, _ := strconv.ParseFloat(f[1], 64)
			return v
		}
	}
	return 0
}

// ttft streams one token and returns the seconds until it arrived.
func (s *server) ttft(prompt any, model string) float64 {
	if model == "" {
		model = "7b"
	}
	t0 := time.Now()
	first, err := s.stream(model, prompt, 1)
	check(err)
	return first.Sub(t0).Seconds()
}

func (s *server) stream(model string, prompt any, maxTokens int) (time.Time, error) {
	b, _ := json.Marshal(map[string]any{"model": model, "prompt": prompt, "max_tokens": maxTokens, "temperature": 0,
		"stream": true, "ignore_eos": true})
	resp, err := http.Post(s.url+"/v1/completions", "application/json", bytes.NewReader(b))
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		body, _ := io.ReadAll(resp.Body)
		return time.Time{}, fmt.Errorf("%s: %d %s", model, resp.StatusCode, body)
	}
	var first time.Time
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if first.IsZero() && strings.HasPrefix(sc.Text(), "data: {") {
			first = time.Now()
		}
	}
	return first, sc.Err()
}

// systemPrompt is at least n tokens of plain English.
func systemPrompt(n int) string {
	words := strings.Fields("You are a helpful assistant for a small shop that sells books, maps and tea. Answer briefly and politely, " +
		"never invent prices, and when you do not know something say so and offer to ask a colleague.")
	var b strings.Builder
	for i := 0; b.Len() < 8*n; i++ {
		b.WriteString(words[i%len(words)])
		b.WriteByte(' ')
	}
	return b.String()
}

func gib(n int64) float64 { return float64(n) / (1 << 30) }

func check(err error) {
	if err != nil {
		fatal(err)
	}
}

func fatal(err any) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}
