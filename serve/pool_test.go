package serve_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

// waitMetric polls /metrics until name equals want (or fails after 10 s).
func (s *server) waitMetric(t *testing.T, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := s.metric(t, name)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", name, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPoolAccountingUnderRandomLoad sends 1,000 random requests (prompt
// lengths, completion lengths, streaming or not, adapters composed or not,
// clients that give up at random moments) to a server with a small KV pool
// and checks that afterwards every KV block is free (or cached for reuse)
// and no sequence is left running.
func TestPoolAccountingUnderRandomLoad(t *testing.T) {
	dir := t.TempDir()
	names := writeAdapters(t, dir, 6, 500)
	s := startServer(t, dir, "--parallel", "8", "--kv-tokens", "384", "--ctx", "128", "--max-resident", "3", "--max-queue", "2000")
	rng := rand.New(rand.NewPCG(3, 4))
	// Half the prompts start with one of three shared 40-token prefixes.
	prefixes := make([][]int, 3)
	for i := range prefixes {
		prefixes[i] = []int{1}
		for len(prefixes[i]) < 40 {
			prefixes[i] = append(prefixes[i], 3+rng.IntN(500))
		}
	}
	type job struct {
		body    map[string]any
		timeout time.Duration
	}
	var jobs []job
	for i := 0; i < 1000; i++ {
		var prompt []int
		if rng.IntN(2) == 0 {
			prompt = append(prompt, prefixes[rng.IntN(len(prefixes))]...)
		} else {
			prompt = append(prompt, 1)
		}
		for n := 1 + rng.IntN(30); len(prompt) < n; {
			prompt = append(prompt, 3+rng.IntN(500))
		}
		body := map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": 1 + rng.IntN(32), "temperature": rng.Float64(),
			"stream": rng.IntN(2) == 0, "ignore_eos": rng.IntN(3) == 0}
		if k := rng.IntN(4); k > 0 {
			body["model"] = names[rng.IntN(len(names))]
			var extra []map[string]any
			for _, m := range rng.Perm(len(names))[:k-1] {
				if names[m] != body["model"] {
					extra = append(extra, map[string]any{"name": names[m], "scale": rng.Float64()})
				}
			}
			body["adapters"] = extra
		}
		j := job{body: body}
		if rng.IntN(5) == 0 {
			j.timeout = time.Duration(rng.IntN(300)) * time.Millisecond
		}
		jobs = append(jobs, j)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 24)
	var mu sync.Mutex
	statuses := map[int]int{}
	for _, j := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx := context.Background()
			if j.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, j.timeout)
				defer cancel()
			}
			status := sendJob(ctx, s.URL, j.body)
			mu.Lock()
			statuses[status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("statuses (0 = client gave up): %v", statuses)
	if statuses[200] < 500 {
		t.Fatalf("only %d of 1000 requests succeeded", statuses[200])
	}
	for status := range statuses {
		if status != 200 && status != 0 {
			t.Errorf("%d requests answered %d", statuses[status], status)
		}
	}
	s.waitMetric(t, "sbora_active_sequences", 0)
	s.waitMetric(t, "sbora_queue_depth", 0)
	s.waitMetric(t, "sbora_kv_blocks_used", 0)
	hits, pre := s.metric(t, "sbora_prefix_cache_hits_total"), s.metric(t, "sbora_preemptions_total")
	t.Logf("prefix cache: %v of %v prompt tokens hit; %v preemptions", hits, s.metric(t, "sbora_prefix_cache_queries_total"), pre)
	if hits == 0 || pre == 0 {
		t.Error("the load never hit the prefix cache or never filled the pool: it tests too little")
	}
}

// sendJob posts a completion and reads it to the end; it returns the
// status, or 0 when ctx ended first.
func sendJob(ctx context.Context, url string, body map[string]any) int {
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/completions", jsonBody(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
	}
	if sc.Err() != nil {
		return 0
	}
	return resp.StatusCode
}

// TestSmallPoolServesManyShortSequences runs a pool of 512 tokens with a
// 256-token context: preallocated slots would fit two sequences; the pool
// runs eight short ones at once.
func TestSmallPoolServesManyShortSequences(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "8", "--kv-tokens", "512", "--ctx", "256")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sendJob(ctx, s.URL, map[string]any{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 40, "stream": true,
				"ignore_eos": true, "temperature": 0})
		}()
	}
	peak := 0.0
	deadline := time.Now().Add(20 * time.Second)
	for peak < 8 && time.Now().Before(deadline) {
		peak = max(peak, s.metric(t, "sbora_active_sequences"))
	}
	cancel()
	wg.Wait()
	if peak < 8 {
		t.Fatalf("at most %v sequences ran at once; the pool has room for 8 short ones", peak)
	}
}

// TestContextLimits checks admission's documented limits: a prompt plus
// max_tokens above the context is refused with context_length_exceeded,
// one that exactly fills it is served, and so is one without max_tokens.
func TestContextLimits(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "64", "--kv-tokens", "128")
	prompt := make([]int, 14)
	prompt[0] = 1
	for i := 1; i < len(prompt); i++ {
		prompt[i] = 100 + i
	}
	status, body := s.do(t, "POST", "/v1/completions", map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": 51})
	checkError(t, "prompt + max_tokens over the context", status, body, 400, "invalid_request_error", "context_length_exceeded")
	for _, extra := range []map[string]any{{"max_tokens": 50, "ignore_eos": true}, {"ignore_eos": true}} {
		req := map[string]any{"model": "stories260K", "prompt": prompt, "temperature": 0}
		for k, v := range extra {
			req[k] = v
		}
		status, body := s.do(t, "POST", "/v1/completions", req)
		if status != 200 || !strings.Contains(string(body), `"completion_tokens":50`) {
			t.Errorf("%v: %d %s", extra, status, body)
		}
	}
}

// TestPreemptionKeepsOutputs runs four greedy generations that together
// outgrow a 256-token pool: sequences are preempted (their blocks go back
// to the pool and are recomputed, mostly from the prefix cache, when they
// resume), and every output equals the one the request gets alone.
func TestPreemptionKeepsOutputs(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "4", "--kv-tokens", "256", "--ctx", "256", "--cache-f32")
	starts := []string{"Once upon a time", "The little dog", "Lily and Tom went to", "One day, a big bird"}
	want := map[string]string{}
	for _, p := range starts {
		text, err := s.complete(t, "stories260K", p, 100, map[string]any{"ignore_eos": true})
		if err != nil {
			t.Fatal(err)
		}
		want[p] = text
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(starts))
	for _, p := range starts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := s.complete(t, "stories260K", p, 100, map[string]any{"ignore_eos": true})
			if err == nil && got != want[p] {
				err = fmt.Errorf("%q after preemption:\n got  %q\n want %q", p, got, want[p])
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	pre := s.metric(t, "sbora_preemptions_total")
	t.Logf("%v preemptions; prefix cache hits %v tokens", pre, s.metric(t, "sbora_prefix_cache_hits_total"))
	if pre == 0 {
		t.Fatal("no sequence was preempted: the test did not exercise a full pool")
	}
	s.waitMetric(t, "sbora_kv_blocks_used", 0)
}

// TestPrefixCacheSharesPromptsAndForgetsReplacedAdapters sends the same
// long prompt twice (the second reuses the first one's blocks, which
// /metrics reports), then replaces the adapter: the same prompt must now
// give the new adapter's output, as on a server that never saw the old one.
func TestPrefixCacheSharesPromptsAndForgetsReplacedAdapters(t *testing.T) {
	dir := t.TempDir()
	base, err := llama.ReadBase(testutil.Shared(t, "models/stories260K.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	write := func(path string, seed uint64) {
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: "x", Variant: adapters.FA, Rank: 8, Seed: seed, Std: 0.03})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Save(path, adapters.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "tenant.gguf"), 1)
	other := t.TempDir()
	write(filepath.Join(other, "tenant.gguf"), 2)
	long := strings.Repeat("The little dog ran to the park and played with a red ball. ", 6)
	// The new adapter's output, from a server that only ever had it.
	fresh := startServer(t, other, "--cache-f32", "--ctx", "512")
	wantNew, err := fresh.complete(t, "tenant", long, 24, nil)
	if err != nil {
		t.Fatal(err)
	}

	s := startServer(t, dir, "--cache-f32", "--ctx", "512")
	first, err := s.complete(t, "tenant", long, 24, nil)
	if err != nil {
		t.Fatal(err)
	}
	hits0 := s.metric(t, "sbora_prefix_cache_hits_total")
	second, err := s.complete(t, "tenant", long, 24, nil)
	if err != nil {
		t.Fatal(err)
	}
	hits := s.metric(t, "sbora_prefix_cache_hits_total") - hits0
	t.Logf("second request: %v prompt tokens from the prefix cache", hits)
	if second != first || hits < 64 {
		t.Fatalf("repeat: %q vs %q, %v cached tokens reused", second, first, hits)
	}
	if first == wantNew {
		t.Fatal("the two adapters give the same text: the test would be vacuous")
	}
	raw, err := os.ReadFile(filepath.Join(other, "tenant.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("POST", s.URL+"/v1/adapters?name=tenant&replace=true", strings.NewReader(string(raw)))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 201 {
		t.Fatalf("replace: %v %v", resp, err)
	}
	resp.Body.Close()
	got, err := s.complete(t, "tenant", long, 24, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got != wantNew {
		t.Fatalf("after replacing the adapter:\n got  %q (old adapter: %q)\n want %q", got, first, wantNew)
	}
}

func jsonBody(v any) *strings.Reader {
	b, _ := json.Marshal(v)
	return strings.NewReader(string(b))
}
