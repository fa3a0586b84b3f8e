package serve_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

// scrape parses /metrics with Prometheus' own text parser.
func (s *server) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	status, body := s.do(t, "GET", "/metrics", nil)
	if status != 200 {
		t.Fatalf("metrics: %d %s", status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("metrics do not parse: %v", err)
	}
	return fams
}

// one returns the only series of a gauge family, failing unless there is
// exactly one.
func one(t *testing.T, fams map[string]*dto.MetricFamily, name string) (float64, map[string]string) {
	t.Helper()
	f, ok := fams[name]
	if !ok || f.GetType() != dto.MetricType_GAUGE || len(f.Metric) != 1 {
		t.Fatalf("%s: want exactly one gauge series, got %v", name, f)
	}
	labels := map[string]string{}
	for _, l := range f.Metric[0].Label {
		labels[l.GetName()] = l.GetValue()
	}
	return f.Metric[0].GetGauge().GetValue(), labels
}

// pickerView is what the endpoint picker reads of a replica.
type pickerView struct {
	waiting, running    float64
	kvUsage             float64
	running_, waitingAd string
	maxLoRA             string
	updated             float64
}

func (s *server) picker(t *testing.T) pickerView {
	t.Helper()
	fams := s.scrape(t)
	var v pickerView
	v.waiting, _ = one(t, fams, "vllm:num_requests_waiting")
	v.running, _ = one(t, fams, "vllm:num_requests_running")
	v.kvUsage, _ = one(t, fams, "vllm:kv_cache_usage_perc")
	var labels map[string]string
	v.updated, labels = one(t, fams, "vllm:lora_requests_info")
	v.running_, v.waitingAd, v.maxLoRA = labels["running_lora_adapters"], labels["waiting_lora_adapters"], labels["max_lora"]
	_, cache := one(t, fams, "vllm:cache_config_info")
	if cache["block_size"] != "32" || cache["num_gpu_blocks"] == "" {
		t.Errorf("cache_config_info labels %v", cache)
	}
	if v.kvUsage < 0 || v.kvUsage > 1 {
		t.Errorf("kv_cache_usage_perc %v outside [0, 1]", v.kvUsage)
	}
	return v
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *server) hasModel(t *testing.T, name string) bool {
	status, _ := s.do(t, "GET", "/v1/models/"+name, nil)
	return status == 200
}

func (s *server) upload(t *testing.T, name string, data []byte, replace bool) {
	t.Helper()
	req, _ := http.NewRequest("POST", fmt.Sprintf("%s/v1/adapters?name=%s&replace=%v", s.URL, name, replace), bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 201 {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("upload %s: %d %s", name, resp.StatusCode, body)
	}
}

func randomAdapterFile(t *testing.T, name string, v adapters.Variant, seed uint64) []byte {
	t.Helper()
	base, err := llama.ReadBase(testutil.Shared(t, "models/stories260K.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: name, Variant: v, Rank: 8, Seed: seed, Std: 0.02})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name+".gguf")
	if err := a.Save(path, adapters.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestFleetSharesAdapters runs three replicas on one adapter directory:
// an upload to one is served by the others within seconds (the same
// text), a replacement on another reaches all as a new version, a delete
// on a third removes it everywhere, a file copied in by hand is not
// registered while half-written and is once complete, and each replica's
// vllm:* series show its own running and waiting adapters.
func TestFleetSharesAdapters(t *testing.T) {
	dir := t.TempDir()
	var fleet []*server
	for range 3 {
		fleet = append(fleet, startServer(t, dir, "--ctx", "4096", "--parallel", "1", "--adapter-rescan", "1s"))
	}
	const limit = 5 * time.Second
	greedy := func(s *server, model string) string {
		text, err := s.complete(t, model, "Once upon a time", 24, nil)
		if err != nil {
			t.Fatalf("%s on %s: %v", model, s.URL, err)
		}
		return text
	}

	fleet[0].upload(t, "shared", randomAdapterFile(t, "shared", adapters.FA, 1), false)
	want := greedy(fleet[0], "shared")
	if want == greedy(fleet[0], "stories260K") {
		t.Fatal("the adapter does not change the output: the test would be vacuous")
	}
	for i, s := range fleet[1:] {
		eventually(t, fmt.Sprintf("replica %d sees the upload", i+1), limit, func() bool { return s.hasModel(t, "shared") })
		if got := greedy(s, "shared"); got != want {
			t.Errorf("replica %d serves %q, the uploader %q", i+1, got, want)
		}
	}

	fleet[2].upload(t, "shared", randomAdapterFile(t, "shared", adapters.FB, 2), true)
	want2 := greedy(fleet[2], "shared")
	if want2 == want {
		t.Fatal("the replacement gives the same text")
	}
	for i, s := range fleet[:2] {
		eventually(t, fmt.Sprintf("replica %d serves the replacement", i), limit, func() bool { return greedy(s, "shared") == want2 })
	}

	if status, body := fleet[1].do(t, "DELETE", "/v1/adapters/shared", nil); status != 200 {
		t.Fatalf("delete: %d %s", status, body)
	}
	for i, s := range fleet {
		eventually(t, fmt.Sprintf("replica %d drops the deleted adapter", i), limit, func() bool { return !s.hasModel(t, "shared") })
	}
	if _, err := os.Stat(filepath.Join(dir, "shared.gguf")); err == nil {
		t.Error("the deleted adapter's file is still in the directory")
	}

	// By hand, not atomically: half a file first.
	data := randomAdapterFile(t, "byhand", adapters.LoRA, 3)
	path := filepath.Join(dir, "byhand.gguf")
	if err := os.WriteFile(path, data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond) // two rescans
	for i, s := range fleet {
		if s.hasModel(t, "byhand") {
			t.Errorf("replica %d registered a half-written file", i)
		}
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(data[len(data)/2:])
	f.Close()
	for i, s := range fleet {
		eventually(t, fmt.Sprintf("replica %d registers the completed file", i), limit, func() bool { return s.hasModel(t, "byhand") })
	}

	// Affinity signals: replica 0 runs one adapter and queues another
	// (--parallel 1); the others are idle.
	fleet[0].upload(t, "second", randomAdapterFile(t, "second", adapters.FA, 4), false)
	for _, s := range fleet {
		eventually(t, "the second adapter everywhere", limit, func() bool { return s.hasModel(t, "second") })
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	started := make(chan struct{}, 2)
	for _, name := range []string{"byhand", "second"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body, _ := json.Marshal(map[string]any{"model": name, "prompt": "Once", "max_tokens": 4000, "ignore_eos": true, "stream": true})
			req, _ := http.NewRequestWithContext(ctx, "POST", fleet[0].URL+"/v1/completions", bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				started <- struct{}{}
				return
			}
			defer resp.Body.Close()
			started <- struct{}{}
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
			}
		}()
		if name == "byhand" {
			eventually(t, "the first request runs", limit, func() bool { return fleet[0].picker(t).running == 1 })
		}
	}
	var v pickerView
	eventually(t, "one running and one waiting on replica 0", limit, func() bool {
		v = fleet[0].picker(t)
		return v.running == 1 && v.waiting == 1 && v.waitingAd != ""
	})
	if v.running_ != "byhand" || v.waitingAd != "second" || v.maxLoRA == "" || v.updated < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("replica 0 lora_requests_info: running %q waiting %q max_lora %q updated %v", v.running_, v.waitingAd, v.maxLoRA, v.updated)
	}
	if v.kvUsage <= 0 {
		t.Errorf("replica 0 kv_cache_usage_perc %v with a request running", v.kvUsage)
	}
	for i, s := range fleet[1:] {
		if o := s.picker(t); o.running != 0 || o.waiting != 0 || o.running_ != "" || o.waitingAd != "" {
			t.Errorf("idle replica %d reports %+v", i+1, o)
		}
	}
	cancel()
	wg.Wait()
	eventually(t, "replica 0 idle again", limit, func() bool {
		v := fleet[0].picker(t)
		return v.running == 0 && v.waiting == 0 && v.running_ == "" && v.waitingAd == ""
	})
}
