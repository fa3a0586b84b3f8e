package serve_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

// writeVariant writes one random adapter of variant v named name.
func writeVariant(t *testing.T, dir, name string, v adapters.Variant, rank int, seed uint64) {
	t.Helper()
	base, err := llama.ReadBase(testutil.Shared(t, "models/stories260K.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: name, Variant: v, Rank: rank, Seed: seed, Std: 0.02})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Save(filepath.Join(dir, name+".gguf"), adapters.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
}

// fds counts the server's open file descriptors.
func (s *server) fds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// stop sends SIGTERM and returns the exit error and how long the server
// took to exit.
func (s *server) stop(t *testing.T, limit time.Duration) (error, time.Duration) {
	t.Helper()
	start := time.Now()
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		return err, time.Since(start)
	case <-time.After(limit):
		s.cmd.Process.Kill()
		<-done
		t.Fatalf("the server did not exit within %v of SIGTERM", limit)
		return nil, 0
	}
}

// TestComposedAdapterEvictionDoesNotCrash is a regression test: with two
// resident slots, requesting B, then X, then A composed with B made the
// scheduler evict B (while admitting A) and then try to load B without its
// file: a nil-pointer panic that killed the process.
func TestComposedAdapterEvictionDoesNotCrash(t *testing.T) {
	dir := t.TempDir()
	for i, n := range []string{"A", "B", "X"} {
		writeVariant(t, dir, n, adapters.LoRA, 4, uint64(i+1))
	}
	s := startServer(t, dir, "--max-resident", "2", "--ctx", "128")
	for _, step := range []struct {
		model string
		extra map[string]any
	}{{"B", nil}, {"X", nil}, {"A", map[string]any{"adapters": []map[string]any{{"name": "B"}}}}, {"X", nil}, {"B", map[string]any{"adapters": []map[string]any{{"name": "A"}}}}} {
		if _, err := s.complete(t, step.model, "Once upon a time", 8, step.extra); err != nil {
			t.Fatalf("%s %v: %v", step.model, step.extra, err)
		}
	}
	if status, _ := s.do(t, "GET", "/health", nil); status != 200 {
		t.Fatalf("health %d after the composed requests", status)
	}
}

// TestQueuedClientsThatGiveUpLeakNothing is a regression test: requests
// dropped from the queue were never answered, so their handlers waited
// forever (CLOSE_WAIT sockets, file descriptors) and shutdown always ran
// into its deadline.
func TestQueuedClientsThatGiveUpLeakNothing(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "1", "--ctx", "512")
	if _, err := s.complete(t, "stories260K", "Once upon a time", 2, nil); err != nil {
		t.Fatal(err)
	}
	http.DefaultClient.CloseIdleConnections()
	baseline := s.fds(t)
	ctx, cancel := context.WithCancel(context.Background())
	long := make(chan int, 1)
	go func() {
		long <- sendJob(ctx, s.URL, map[string]any{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 480,
			"stream": true, "ignore_eos": true})
	}()
	s.waitMetric(t, "sbora_active_sequences", 1)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			tr := &http.Transport{}
			defer tr.CloseIdleConnections()
			req, _ := http.NewRequestWithContext(c, "POST", s.URL+"/v1/completions", jsonBody(map[string]any{"model": "stories260K", "prompt": "x", "max_tokens": 4}))
			req.Header.Set("Content-Type", "application/json")
			if resp, err := (&http.Client{Transport: tr}).Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	s.waitMetric(t, "sbora_queue_depth", 0)
	deadline := time.Now().Add(5 * time.Second)
	for s.fds(t) > baseline+2 { // the long stream's connection
		if time.Now().After(deadline) {
			t.Fatalf("%d file descriptors open, %d before 20 clients gave up while queued", s.fds(t), baseline)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c := s.metric(t, "sbora_requests_total", `status="canceled"`); c < 20 {
		t.Errorf("%v requests counted as canceled, want 20", c)
	}
	cancel()
	<-long
	err, took := s.stop(t, 8*time.Second)
	if err != nil {
		t.Fatalf("exit after SIGTERM: %v (%v)", err, took)
	}
	t.Logf("file descriptors back to %d; exited in %v", baseline, took)
}

// TestPromptSizeIsBoundedBeforeTokenizing is a regression test: a prompt
// of 960 KB of "<s>" cost 30-40 s of CPU in the tokenizer before any limit
// applied; a prompt longer than the context can hold is now refused first,
// and the tokenizer is linear anyway.
func TestPromptSizeIsBoundedBeforeTokenizing(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "4096", "--kv-tokens", "4096")
	for _, c := range []struct {
		prompt string
		status int
	}{
		{strings.Repeat("<s>", 320<<10), 400},          // 960 KB: over 64 bytes per token of context
		{strings.Repeat("<s>", 80<<10), 400},           // 240 KB: 81920 tokens, over the context
		{strings.Repeat("<s> hello ", 256) + "x", 200}, // fits
	} {
		start := time.Now()
		status, body := s.do(t, "POST", "/v1/completions", map[string]any{"model": "stories260K", "prompt": c.prompt, "max_tokens": 1})
		d := time.Since(start)
		t.Logf("%d KB prompt: %d in %v", len(c.prompt)>>10, status, d)
		if status != c.status {
			t.Errorf("%d KB prompt: status %d, want %d: %.200s", len(c.prompt)>>10, status, c.status, body)
		}
		if c.status == 400 && !strings.Contains(string(body), "context_length_exceeded") {
			t.Errorf("%d KB prompt: %s", len(c.prompt)>>10, body)
		}
		if d > 3*time.Second {
			t.Errorf("%d KB prompt took %v", len(c.prompt)>>10, d)
		}
	}
}

// TestAdapterAboveMaxRankIsRefused is a regression test: an adapter above
// --max-rank registered (201) and then failed every request with a 500.
func TestAdapterAboveMaxRankIsRefused(t *testing.T) {
	dir := t.TempDir()
	writeVariant(t, dir, "big", adapters.FA, 16, 1)
	raw, err := os.ReadFile(filepath.Join(dir, "big.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	os.Rename(filepath.Join(dir, "big.gguf"), filepath.Join(dir, "big.bin"))
	s := startServer(t, dir, "--max-rank", "8")
	req, _ := http.NewRequest("POST", s.URL+"/v1/adapters?name=big", strings.NewReader(string(raw)))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var body [512]byte
	n, _ := resp.Body.Read(body[:])
	resp.Body.Close()
	checkError(t, "upload above max rank", resp.StatusCode, body[:n], 400, "invalid_request_error", "invalid_adapter")
	status, b := s.do(t, "POST", "/v1/adapters", map[string]any{"name": "big", "path": "big.bin"})
	checkError(t, "register above max rank", status, b, 400, "invalid_request_error", "invalid_adapter")
	if status, _ := s.do(t, "GET", "/v1/adapters/big", nil); status != 404 {
		t.Fatalf("the refused adapter is registered (%d)", status)
	}
}

// TestStarvedAdapterGetsIn is a regression test: a request whose adapter
// needs the only slot, held by a stream of requests for another adapter,
// waited as long as that stream went on (waiting requests never aged).
func TestStarvedAdapterGetsIn(t *testing.T) {
	dir := t.TempDir()
	writeVariant(t, dir, "hot", adapters.LoRA, 4, 1)
	writeVariant(t, dir, "cold", adapters.LoRA, 4, 2)
	s := startServer(t, dir, "--max-resident", "1", "--parallel", "4", "--ctx", "128")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failed atomic.Int64
	// Twice as many clients as running slots: a queue of requests for the
	// hot adapter is always waiting, so it never stops being pinned unless
	// admission lets the cold request's age count.
	// Their lengths differ so they never all finish in the same step.
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.complete(t, "hot", "Once upon a time", 16+9*i, map[string]any{"ignore_eos": true}); err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	s.waitMetric(t, "sbora_queue_depth", 4)
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := s.complete(t, "cold", "Once upon a time", 8, nil)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Error(err)
		}
		t.Logf("the cold adapter got in after %v while the hot one was in constant use", time.Since(start))
	case <-time.After(20 * time.Second):
		t.Error("a request for the other adapter starved for 20 s")
	}
	close(stop)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("%d requests for the hot adapter failed", n)
	}
}

// TestControlTokenStops is a regression test: a stop string that is a
// control token (here </s>; for Llama 3 <|eot_id|>) can never match text,
// because control tokens produce none; it now stops by token id. A logit
// bias makes the model emit </s> after a few tokens (ignore_eos keeps EOS
// itself from stopping it).
func TestControlTokenStops(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "512")
	status, body := s.do(t, "POST", "/v1/completions", map[string]any{"model": "stories260K", "prompt": "Once upon a time",
		"max_tokens": 400, "temperature": 0, "ignore_eos": true, "stop": []string{"</s>"}, "logit_bias": map[string]float64{"2": 100}})
	var resp struct {
		Choices []struct {
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			Completion int `json:"completion_tokens"`
		} `json:"usage"`
	}
	if status != 200 || json.Unmarshal(body, &resp) != nil {
		t.Fatalf("%d %s", status, body)
	}
	if resp.Choices[0].FinishReason != "stop" || resp.Usage.Completion >= 400 {
		t.Fatalf("stop at </s> with ignore_eos: finish %q after %d tokens", resp.Choices[0].FinishReason, resp.Usage.Completion)
	}
}

// TestAdminAndMetricsAccess is a regression test for the auth defaults:
// with an API key and no admin key the API key could upload and delete
// adapters; metrics named every adapter (tenant) to anyone.
func TestAdminAndMetricsAccess(t *testing.T) {
	dir := t.TempDir()
	writeVariant(t, dir, "tenant-a", adapters.FA, 4, 1)
	s := startServer(t, dir, "--api-key", "k")
	s.header.Set("Authorization", "Bearer k")
	status, body := s.do(t, "DELETE", "/v1/adapters/tenant-a", nil)
	checkError(t, "delete with the API key and no admin key", status, body, 403, "permission_error", "admin_disabled")
	if _, err := s.complete(t, "tenant-a", "Once upon a time", 2, nil); err != nil {
		t.Fatal(err)
	}
	_, metrics := s.do(t, "GET", "/metrics", nil)
	if strings.Contains(string(metrics), "tenant-a") || !strings.Contains(string(metrics), `adapter="adapter"`) {
		t.Errorf("/metrics names adapters by default:\n%s", grepLines(string(metrics), "sbora_requests_total"))
	}
	s2 := startServer(t, dir, "--api-key", "k", "--metrics-auth", "--metrics-adapter-names")
	status, body = s2.do(t, "GET", "/metrics", nil)
	checkError(t, "metrics without the key", status, body, 401, "authentication_error", "invalid_api_key")
	s2.header.Set("Authorization", "Bearer k")
	if _, err := s2.complete(t, "tenant-a", "Once upon a time", 2, nil); err != nil {
		t.Fatal(err)
	}
	if status, metrics := s2.do(t, "GET", "/metrics", nil); status != 200 || !strings.Contains(string(metrics), `adapter="tenant-a"`) {
		t.Errorf("metrics with the key and --metrics-adapter-names: %d", status)
	}
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestErrorsBeforeTheStreamStarts is a regression test: streams sent 200
// before admission, so an adapter that failed to load arrived as 200 and
// an error chunk. It also covers registration with curl -d's content type
// (form-urlencoded, which was refused with 415).
func TestErrorsBeforeTheStreamStarts(t *testing.T) {
	dir := t.TempDir()
	writeVariant(t, dir, "broken", adapters.FA, 4, 1)
	writeVariant(t, dir, "spare", adapters.FB, 4, 2)
	s := startServer(t, dir)
	// The file breaks after registration.
	if err := os.WriteFile(filepath.Join(dir, "broken.gguf"), []byte("GGUF broken"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, stream := range []bool{true, false} {
		status, body := s.do(t, "POST", "/v1/completions", map[string]any{"model": "broken", "prompt": "x", "max_tokens": 2, "stream": stream})
		checkError(t, fmt.Sprintf("broken adapter (stream %v)", stream), status, body, 500, "server_error", "adapter_load_failed")
	}
	req, _ := http.NewRequest("POST", s.URL+"/v1/adapters", strings.NewReader(`{"name": "again", "path": "spare.gguf"}`))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 201 {
		t.Fatalf("registration with curl -d's content type: %d", resp.StatusCode)
	}
}

// drainOutcome is what a streaming client saw.
type drainOutcome struct {
	status    int
	lastData  []string // the last three data lines
	completed bool     // a finish_reason "length" chunk arrived
}

func streamUntilEnd(url string, maxTokens int, out chan<- drainOutcome) {
	req, _ := http.NewRequest("POST", url+"/v1/completions", jsonBody(map[string]any{"model": "stories260K", "prompt": "Once upon a time",
		"max_tokens": maxTokens, "stream": true, "ignore_eos": true}))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		out <- drainOutcome{}
		return
	}
	defer resp.Body.Close()
	o := drainOutcome{status: resp.StatusCode}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "data: ") {
			o.lastData = append(o.lastData, line)
			if strings.Contains(line, `"finish_reason":"length"`) {
				o.completed = true
			}
			if len(o.lastData) > 3 {
				o.lastData = o.lastData[1:]
			}
		}
	}
	out <- o
}

func exitStatus(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return fmt.Sprintf("exit status %d", ee.ExitCode())
	}
	return err.Error()
}

// TestDrainOnSIGTERM checks graceful shutdown: the listener closes, a
// request that finishes within --drain-timeout finishes normally, one that
// does not ends with an error chunk and [DONE], a queued one gets a 503,
// and the process exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	// Finishes within the drain timeout.
	a := startServer(t, t.TempDir(), "--parallel", "1", "--ctx", "4096", "--kv-tokens", "4096", "--drain-timeout", "20s")
	done := make(chan drainOutcome, 1)
	go streamUntilEnd(a.URL, 1500, done)
	a.waitMetric(t, "sbora_active_sequences", 1)
	if err, _ := a.stop(t, 30*time.Second); err != nil {
		t.Errorf("SIGTERM: %s", exitStatus(err))
	}
	if o := <-done; !o.completed || o.lastData[len(o.lastData)-1] != "data: [DONE]" {
		t.Errorf("a stream that finishes within the drain timeout was cut: %v", o.lastData)
	}

	// Outlasts it, with another request queued behind it.
	b := startServer(t, t.TempDir(), "--parallel", "1", "--ctx", "4096", "--kv-tokens", "4096", "--drain-timeout", "1s")
	long, queued := make(chan drainOutcome, 1), make(chan drainOutcome, 1)
	go streamUntilEnd(b.URL, 4000, long)
	b.waitMetric(t, "sbora_active_sequences", 1)
	go streamUntilEnd(b.URL, 10, queued)
	b.waitMetric(t, "sbora_queue_depth", 1)
	err, took := b.stop(t, 15*time.Second)
	if err != nil {
		t.Errorf("SIGTERM: %s", exitStatus(err))
	}
	o := <-long
	if n := len(o.lastData); n < 2 || !strings.Contains(o.lastData[n-2], `"error"`) || o.lastData[n-1] != "data: [DONE]" {
		t.Errorf("a stream past the drain timeout should end with an error chunk and [DONE]: %v", o.lastData)
	}
	if q := <-queued; q.status != 503 {
		t.Errorf("a queued request got %d, want 503", q.status)
	}
	t.Logf("exited %v after SIGTERM with a 1 s drain timeout", took)
	if took > 6*time.Second {
		t.Errorf("drain took %v", took)
	}
}

// TestSlowBodyIsCutOff checks that a client sending its body too slowly
// cannot hold a handler and a connection: the server gives up after
// --body-timeout.
func TestSlowBodyIsCutOff(t *testing.T) {
	s := startServer(t, t.TempDir(), "--body-timeout", "1s")
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := `{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 2}`
	fmt.Fprintf(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:10])
	start := time.Now()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := io.ReadAll(conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the connection was still open %v after the body stalled", time.Since(start))
	}
	t.Logf("after %v: %q", time.Since(start), strings.SplitN(string(resp), "\r\n", 2)[0])
	if !strings.HasPrefix(string(resp), "HTTP/1.1 400") {
		t.Errorf("response %q", resp)
	}
}
