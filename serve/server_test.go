package serve_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// TestOpenAIClient drives the server with the official openai npm client:
// models.list, chat (plain and streaming), completions (plain and
// streaming), and a 404 surfacing as the client's error type.
func TestOpenAIClient(t *testing.T) {
	dir := t.TempDir()
	names := writeAdapters(t, dir, 1, 1)
	s := startServer(t, dir, "--api-key", "test-key", "--ctx", "256")
	clientDir, _ := filepath.Abs("testdata/openai-client")
	if _, err := os.Stat(filepath.Join(clientDir, "node_modules", "openai")); err != nil {
		t.Fatalf("the openai npm package is not installed (make testdeps): %v", err)
	}
	cmd := exec.Command("node", "client.mjs", s.URL+"/v1", "stories260K", names[0])
	cmd.Dir = clientDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node client: %v\n%s\nserver: %s", err, out, s.stderr)
	}
	var got struct {
		Models []struct {
			ID     string  `json:"id"`
			Parent *string `json:"parent"`
		}
		Chat, ChatStream struct {
			Text   string
			Finish string
			Chunks int
			Usage  *struct {
				Prompt     int `json:"prompt_tokens"`
				Completion int `json:"completion_tokens"`
				Total      int `json:"total_tokens"`
			}
		}
		Completion, CompletionStream struct {
			Text   string
			Finish string
		}
		NotFound struct {
			Status int
			Type   string
		}
	}
	if err := json.Unmarshal(out[strings.LastIndexByte(strings.TrimSpace(string(out)), '\n')+1:], &got); err != nil {
		t.Fatalf("client output %s: %v", out, err)
	}
	if len(got.Models) != 2 || got.Models[0].ID != "stories260K" || got.Models[0].Parent != nil ||
		got.Models[1].ID != names[0] || got.Models[1].Parent == nil || *got.Models[1].Parent != "stories260K" {
		t.Errorf("models.list: %+v", got.Models)
	}
	if got.Chat.Text == "" || got.Chat.Finish != "length" || got.Chat.Usage == nil || got.Chat.Usage.Completion != 24 ||
		got.Chat.Usage.Total != got.Chat.Usage.Prompt+24 {
		t.Errorf("chat: %+v", got.Chat)
	}
	if got.ChatStream.Text != got.Chat.Text || got.ChatStream.Finish != "length" || got.ChatStream.Chunks < 3 ||
		got.ChatStream.Usage == nil || got.ChatStream.Usage.Completion != 24 {
		t.Errorf("chat stream %+v differs from chat %+v", got.ChatStream, got.Chat)
	}
	if got.NotFound.Status != 404 {
		t.Errorf("unknown model: %+v", got.NotFound)
	}
	// The base completion is llama.cpp's greedy continuation.
	model := testutil.Shared(t, "models/stories260K.gguf")
	o, err := oracle.Open(model, nil, oracle.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	prompt, _ := o.Tokenize("Once upon a time", true)
	want, _ := o.Greedy(prompt, 16)
	tok, _ := llama.LoadTokenizer(model)
	wantText, _ := tok.Decode(want)
	if got.Completion.Text != wantText || got.CompletionStream.Text != wantText || got.Completion.Finish != "length" {
		t.Errorf("completion %q / stream %q, llama.cpp greedy %q", got.Completion.Text, got.CompletionStream.Text, wantText)
	}
}

type job struct {
	model, prompt string
	extra         map[string]any
	want          string
}

const genTokens = 120

var prompts = []string{
	"Once upon a time", "The little dog", "Lily and Tom went to", "One day, a big bird",
	"Mom said", "The sun was hot and", "Ben had a red ball.", "In the park there was",
	"The cat jumped", "Sara found a box",
}

// TestConcurrentRequestsMatchAloneUnderChurn sends 18 concurrent greedy
// requests spread over 8 adapters, a two-adapter composition and the base,
// and checks each returns exactly its text when sent alone; meanwhile
// adapters are uploaded, used, unregistered (one while a request is using
// it) and re-registered over and over, and none of those requests may fail
// or change either.
func TestConcurrentRequestsMatchAloneUnderChurn(t *testing.T) {
	dir := t.TempDir()
	names := writeAdapters(t, dir, 9, 100)
	churnFile := filepath.Join(dir, names[8]+".gguf")
	churnBytes, err := os.ReadFile(churnFile)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(churnFile) // registered only through the API below
	s := startServer(t, dir, "--parallel", "16", "--cache-f32", "--max-resident", "12", "--ctx", "256")

	var jobs []job
	for i := 0; i < 16; i++ {
		jobs = append(jobs, job{model: names[i%8], prompt: prompts[i%len(prompts)]})
	}
	jobs = append(jobs, job{model: "stories260K", prompt: prompts[0]}, job{model: "stories260K", prompt: prompts[3]},
		job{model: names[0], prompt: prompts[5], extra: map[string]any{"adapters": []map[string]any{{"name": names[1], "scale": 0.5}}}})
	for i := range jobs {
		text, err := s.complete(t, jobs[i].model, jobs[i].prompt, genTokens, jobs[i].extra)
		if err != nil {
			t.Fatal(err)
		}
		jobs[i].want = text
	}
	if jobs[0].want == jobs[16].want {
		t.Fatal("adapter output equals the base's: the check would be vacuous")
	}
	// The churn adapter's expected text, measured alone before the load.
	if status, body := s.do(t, "POST", "/v1/adapters?name=churn", nil); status == 201 {
		t.Fatalf("register without body succeeded: %s", body)
	}
	upload := func(name string) {
		req, _ := http.NewRequest("POST", s.URL+"/v1/adapters?name="+name+"&replace=true", strings.NewReader(string(churnBytes)))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			return
		}
		resp.Body.Close()
		if resp.StatusCode != 201 {
			t.Errorf("upload %s: status %d", name, resp.StatusCode)
		}
	}
	upload("churn")
	churnWant, err := s.complete(t, "churn", prompts[2], 24, nil)
	if err != nil {
		t.Fatal(err)
	}

	// Each job runs repeatedly in its own goroutine until the churn rounds
	// are over, so load and churn overlap by construction.
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	churnDone := make(chan struct{})
	var mu sync.Mutex
	completed := 0
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				got, err := s.complete(t, j.model, j.prompt, genTokens, j.extra)
				if err != nil {
					errs <- fmt.Errorf("%s %q: %v", j.model, j.prompt, err)
				} else if got != j.want {
					errs <- fmt.Errorf("%s %q under load:\n got  %q\n want %q", j.model, j.prompt, got, j.want)
				}
				mu.Lock()
				completed++
				mu.Unlock()
				select {
				case <-churnDone:
					return
				default:
				}
			}
		}()
	}
	const churns = 5
	for round := 0; round < churns; round++ {
		// Register (upload), use, unregister, re-register from the file.
		upload("churn")
		if got, err := s.complete(t, "churn", prompts[2], 24, nil); err != nil || got != churnWant {
			errs <- fmt.Errorf("churn round %d: %q %v", round, got, err)
		}
		// Unregister while a request uses it: the request must finish intact.
		inflight := make(chan error, 1)
		go func() {
			got, err := s.complete(t, "churn", prompts[2], 24, nil)
			if err == nil && got != churnWant {
				err = fmt.Errorf("altered: %q", got)
			}
			if err != nil && !strings.Contains(err.Error(), "404") {
				inflight <- err
				return
			}
			inflight <- nil
		}()
		time.Sleep(5 * time.Millisecond)
		if status, body := s.do(t, "DELETE", "/v1/adapters/churn", nil); status != 200 {
			errs <- fmt.Errorf("delete churn: %d %s", status, body)
		}
		if err := <-inflight; err != nil {
			errs <- fmt.Errorf("in-flight request on an unregistered adapter: %v", err)
		}
		if status, _ := s.do(t, "POST", "/v1/completions", map[string]any{"model": "churn", "prompt": "x"}); status != 404 {
			errs <- fmt.Errorf("unregistered adapter answered %d", status)
		}
	}
	close(churnDone)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d concurrent requests (%d streams) matched their solo outputs while %d register/use/unregister rounds ran", completed, len(jobs), churns)
	if loads := s.metric(t, "sbora_adapter_loads_total"); loads < float64(8+churns) {
		t.Errorf("sbora_adapter_loads_total = %v", loads)
	}
}

// TestDisconnectFreesSlot starts a long streaming completion, drops the
// connection after the first chunk, and watches /metrics free its slot.
func TestDisconnectFreesSlot(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "1", "--ctx", "512")
	ctx, cancel := context.WithCancel(context.Background())
	body := `{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 480, "stream": true}`
	req, _ := http.NewRequestWithContext(ctx, "POST", s.URL+"/v1/completions", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "data: ") {
		t.Fatalf("first chunk %q %v", line, err)
	}
	if active := s.metric(t, "sbora_active_sequences"); active != 1 {
		t.Fatalf("active sequences while streaming = %v", active)
	}
	cancel()
	resp.Body.Close()
	deadline := time.Now().Add(5 * time.Second)
	for s.metric(t, "sbora_active_sequences") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("slot not freed 5s after the client disconnected")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c := s.metric(t, "sbora_requests_total", `status="canceled"`); c != 1 {
		t.Errorf("canceled requests = %v", c)
	}
	if gen := s.metric(t, "sbora_generation_tokens_total"); gen >= 480 {
		t.Errorf("generation ran to the end (%v tokens) after the disconnect", gen)
	}
	// The single slot serves the next request.
	if _, err := s.complete(t, "stories260K", "Once upon a time", 8, nil); err != nil {
		t.Fatal(err)
	}
}

// TestChunkedPrefillKeepsDecoding streams one completion, then submits a
// long prompt on a server with a small prefill budget: the first stream
// must keep receiving tokens while the long prompt is prefilled.
func TestChunkedPrefillKeepsDecoding(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "2", "--ctx", "512", "--prefill-budget", "16")
	streamTimes := func(body string, first chan<- time.Time, all *[]time.Time, done chan<- struct{}) {
		resp, err := http.Post(s.URL+"/v1/completions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Error(err)
			close(done)
			return
		}
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		n := 0
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "data: {") && strings.Contains(sc.Text(), `"text":"`) && !strings.Contains(sc.Text(), `"text":""`) {
				now := time.Now()
				if all != nil {
					*all = append(*all, now)
				}
				if n == 0 && first != nil {
					first <- now
				}
				n++
			}
		}
		close(done)
	}
	var aTimes []time.Time
	aFirst, aDone := make(chan time.Time, 1), make(chan struct{})
	go streamTimes(`{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 400, "stream": true, "ignore_eos": true}`, aFirst, &aTimes, aDone)
	<-aFirst
	long := strings.Repeat("The little dog ran to the park and played with a red ball. ", 14)
	bSent := time.Now()
	bFirst, bDone := make(chan time.Time, 1), make(chan struct{})
	go streamTimes(`{"model": "stories260K", "prompt": "`+long+`", "max_tokens": 4, "stream": true}`, bFirst, nil, bDone)
	var bAt time.Time
	select {
	case bAt = <-bFirst:
	case <-time.After(30 * time.Second):
		t.Fatal("the long prompt never produced a token")
	}
	<-bDone
	<-aDone
	during := 0
	for _, at := range aTimes {
		if at.After(bSent) && at.Before(bAt) {
			during++
		}
	}
	t.Logf("the running stream got %d tokens while a ~%d-character prompt was prefilled 16 tokens per step", during, len(long))
	if during < 10 {
		t.Errorf("only %d tokens of the running stream during the prefill: prefill is stalling decode", during)
	}
}

// TestLRUEvictionUnderLoad serves five adapters (FA, FB, LoRA) with a
// bank of two LoRA-sized slots:
// concurrent requests must wait for pinned adapters rather than evict them,
// every response must match its solo output, and evictions must show in
// /metrics.
func TestLRUEvictionUnderLoad(t *testing.T) {
	dir := t.TempDir()
	names := writeAdapters(t, dir, 5, 40)
	s := startServer(t, dir, "--parallel", "4", "--max-resident", "2", "--cache-f32", "--ctx", "256")
	want := map[string]string{}
	for _, n := range names {
		text, err := s.complete(t, n, "Once upon a time", 32, nil)
		if err != nil {
			t.Fatal(err)
		}
		want[n] = text
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 20; i++ {
		n := names[i%len(names)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := s.complete(t, n, "Once upon a time", 32, nil)
			if err != nil {
				errs <- err
			} else if got != want[n] {
				errs <- fmt.Errorf("%s after eviction and reload: %q, want %q", n, got, want[n])
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if ev := s.metric(t, "sbora_adapter_evictions_total"); ev < 3 {
		t.Errorf("sbora_adapter_evictions_total = %v with 5 adapters and 2 resident slots", ev)
	}
	// Two LoRA-sized slots: two A halves (FB, LoRA) and two B halves (FA,
	// LoRA).
	_, body := s.do(t, "GET", "/v1/adapters", nil)
	var list struct {
		Data []struct {
			Variant  string `json:"variant"`
			Resident bool   `json:"resident"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatal(err)
	}
	aHalves, bHalves := 0, 0
	for _, a := range list.Data {
		if a.Resident {
			aHalves += map[string]int{"fb": 1, "lora": 1}[a.Variant]
			bHalves += map[string]int{"fa": 1, "lora": 1}[a.Variant]
		}
	}
	if aHalves > 2 || bHalves > 2 {
		t.Errorf("resident adapters take %d A and %d B halves, the bank has 2 of each", aHalves, bHalves)
	}
	t.Logf("evictions %v, loads %v", s.metric(t, "sbora_adapter_evictions_total"), s.metric(t, "sbora_adapter_loads_total"))
}

// TestStopSequencesAndSeeds checks stop sequences (plain and streaming: the
// text ends right before the stop string, finish_reason "stop") and that a
// seed makes sampled output reproducible.
func TestStopSequencesAndSeeds(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "256")
	full, err := s.complete(t, "stories260K", "Once upon a time", 40, nil)
	if err != nil {
		t.Fatal(err)
	}
	cut := strings.Index(full, "Lily")
	if cut <= 0 {
		t.Fatalf("greedy text %q lacks the stop word the test relies on", full)
	}
	status, body := s.do(t, "POST", "/v1/completions", map[string]any{"model": "stories260K", "prompt": "Once upon a time",
		"max_tokens": 40, "temperature": 0, "stop": []string{"Lily", "never-there"}})
	var resp struct {
		Choices []struct {
			Text         string `json:"text"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
	}
	if status != 200 || json.Unmarshal(body, &resp) != nil || resp.Choices[0].Text != full[:cut] || resp.Choices[0].FinishReason != "stop" {
		t.Fatalf("stop: %d %s; want text %q", status, body, full[:cut])
	}
	// Streaming: the held-back tail never leaks the stop string.
	req, _ := http.NewRequest("POST", s.URL+"/v1/completions", strings.NewReader(
		`{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stop": "Lily", "stream": true}`))
	req.Header.Set("Content-Type", "application/json")
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var streamed strings.Builder
	finish := ""
	sc := bufio.NewScanner(r.Body)
	for sc.Scan() {
		line := strings.TrimPrefix(sc.Text(), "data: ")
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var chunk struct {
			Choices []struct {
				Text         string  `json:"text"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
		}
		json.Unmarshal([]byte(line), &chunk)
		streamed.WriteString(chunk.Choices[0].Text)
		if chunk.Choices[0].FinishReason != nil {
			finish = *chunk.Choices[0].FinishReason
		}
	}
	r.Body.Close()
	if streamed.String() != full[:cut] || finish != "stop" {
		t.Fatalf("streamed %q (finish %q), want %q", streamed.String(), finish, full[:cut])
	}
	// Seeds.
	sample := func(seed int) string {
		text, err := s.complete(t, "stories260K", "Once upon a time", 40, map[string]any{"temperature": 1.0, "seed": seed})
		if err != nil {
			t.Fatal(err)
		}
		return text
	}
	a, b, c := sample(42), sample(42), sample(43)
	if a != b {
		t.Errorf("same seed, different text:\n%q\n%q", a, b)
	}
	if a == c {
		t.Errorf("seeds 42 and 43 sampled the same 40 tokens: %q", a)
	}
}
