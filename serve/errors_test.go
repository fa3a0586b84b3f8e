package serve_test

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

type apiErr struct {
	Error *struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func checkError(t *testing.T, name string, status int, body []byte, wantStatus int, wantType, wantCode string) {
	t.Helper()
	if status != wantStatus {
		t.Errorf("%s: status %d, want %d (%s)", name, status, wantStatus, body)
		return
	}
	var e apiErr
	if err := json.Unmarshal(body, &e); err != nil || e.Error == nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Errorf("%s: not an OpenAI error object: %s", name, body)
		return
	}
	if wantType != "" && e.Error.Type != wantType {
		t.Errorf("%s: type %q, want %q", name, e.Error.Type, wantType)
	}
	if wantCode != "" && (e.Error.Code == nil || *e.Error.Code != wantCode) {
		t.Errorf("%s: code %v, want %q (%s)", name, e.Error.Code, wantCode, body)
	}
}

func TestErrorResponses(t *testing.T) {
	dir := t.TempDir()
	names := writeAdapters(t, dir, 5, 1)
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "x.gguf"), []byte("x"), 0o644)
	os.Symlink(filepath.Join(outside, "x.gguf"), filepath.Join(dir, "escape.gguf"))
	os.WriteFile(filepath.Join(dir, "garbage.bin"), []byte("GGUF but not really"), 0o644)
	s := startServer(t, dir, "--api-key", "inference-key", "--admin-key", "admin-key", "--ctx", "64", "--max-request-bytes", "200000")
	s.header.Set("Authorization", "Bearer inference-key")
	longPrompt := strings.Repeat("the big dog ran to the park ", 20)
	completion := func(fields string) string {
		return `{"model": "stories260K", "prompt": "Once upon a time"` + fields + `}`
	}
	cases := []struct {
		name, method, path string
		body               any
		status             int
		typ, code          string
	}{
		{"bad JSON", "POST", "/v1/completions", `{"model": `, 400, "invalid_request_error", ""},
		{"empty body", "POST", "/v1/chat/completions", ``, 400, "invalid_request_error", ""},
		{"missing model", "POST", "/v1/completions", `{"prompt": "x"}`, 400, "invalid_request_error", ""},
		{"missing prompt", "POST", "/v1/completions", `{"model": "stories260K"}`, 400, "invalid_request_error", ""},
		{"no messages", "POST", "/v1/chat/completions", `{"model": "stories260K", "messages": []}`, 400, "invalid_request_error", ""},
		{"bad role", "POST", "/v1/chat/completions", `{"model": "stories260K", "messages": [{"role": "wizard", "content": "x"}]}`, 400, "invalid_request_error", ""},
		{"unknown model", "POST", "/v1/completions", `{"model": "gpt-5", "prompt": "x"}`, 404, "invalid_request_error", "model_not_found"},
		{"unknown adapter", "POST", "/v1/completions", completion(`, "adapters": [{"name": "nope"}]`), 404, "", "model_not_found"},
		{"five adapters", "POST", "/v1/completions", `{"model": "` + names[0] + `", "prompt": "x", "adapters": [{"name": "` + names[1] + `"}, {"name": "` + names[2] + `"}, {"name": "` + names[3] + `"}, {"name": "` + names[4] + `"}]}`, 400, "invalid_request_error", ""},
		{"adapter twice", "POST", "/v1/completions", `{"model": "` + names[0] + `", "prompt": "x", "adapters": [{"name": "` + names[0] + `"}]}`, 400, "invalid_request_error", ""},
		{"temperature", "POST", "/v1/completions", completion(`, "temperature": 3`), 400, "invalid_request_error", ""},
		{"top_p", "POST", "/v1/completions", completion(`, "top_p": 0`), 400, "invalid_request_error", ""},
		{"max_tokens", "POST", "/v1/completions", completion(`, "max_tokens": 0`), 400, "invalid_request_error", ""},
		{"n", "POST", "/v1/completions", completion(`, "n": 17`), 400, "invalid_request_error", ""},
		{"stop type", "POST", "/v1/completions", completion(`, "stop": 5`), 400, "invalid_request_error", ""},
		{"logprobs", "POST", "/v1/completions", completion(`, "logprobs": 6`), 400, "invalid_request_error", ""},
		{"tools", "POST", "/v1/chat/completions", `{"model": "stories260K", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}`, 400, "invalid_request_error", ""},
		{"prompt too long", "POST", "/v1/completions", `{"model": "stories260K", "prompt": "` + longPrompt + `"}`, 400, "invalid_request_error", "context_length_exceeded"},
		{"token out of vocabulary", "POST", "/v1/completions", `{"model": "stories260K", "prompt": [1, 99999]}`, 400, "invalid_request_error", ""},
		{"body too large", "POST", "/v1/completions", `{"model": "stories260K", "prompt": "` + strings.Repeat("a", 300000) + `"}`, 413, "invalid_request_error", ""},
		{"no route", "GET", "/v1/nothing", nil, 404, "", ""},
		{"wrong method", "PUT", "/v1/completions", `{}`, 405, "", ""},
		{"admin with inference key", "POST", "/v1/adapters", `{"name": "a", "path": "x.gguf"}`, 401, "authentication_error", "invalid_api_key"},
		{"delete with inference key", "DELETE", "/v1/adapters/" + names[0], nil, 401, "authentication_error", ""},
		{"unknown adapter info", "GET", "/v1/adapters/nope", nil, 404, "", "adapter_not_found"},
	}
	for _, c := range cases {
		status, body := s.do(t, c.method, c.path, c.body)
		checkError(t, c.name, status, body, c.status, c.typ, c.code)
	}
	// Without a key, or with the wrong one.
	s.header.Del("Authorization")
	status, body := s.do(t, "POST", "/v1/completions", completion(""))
	checkError(t, "no key", status, body, 401, "authentication_error", "invalid_api_key")
	s.header.Set("Authorization", "Bearer wrong")
	status, body = s.do(t, "GET", "/v1/models", nil)
	checkError(t, "wrong key", status, body, 401, "authentication_error", "invalid_api_key")

	// Admin API with the admin key.
	s.header.Set("Authorization", "Bearer admin-key")
	admin := []struct {
		name   string
		method string
		path   string
		body   any
		status int
		code   string
	}{
		{"path with ..", "POST", "/v1/adapters", `{"name": "a", "path": "../x.gguf"}`, 403, ""},
		{"absolute path", "POST", "/v1/adapters", `{"name": "a", "path": "` + filepath.Join(outside, "x.gguf") + `"}`, 403, ""},
		{"symlink escaping", "POST", "/v1/adapters", `{"name": "a", "path": "escape.gguf"}`, 403, ""},
		{"missing file", "POST", "/v1/adapters", `{"name": "a", "path": "missing.gguf"}`, 404, "adapter_not_found"},
		{"not a GGUF", "POST", "/v1/adapters", `{"name": "a", "path": "garbage.bin"}`, 400, ""},
		{"bad name", "POST", "/v1/adapters", `{"name": "../a", "path": "` + names[0] + `.gguf"}`, 400, ""},
		{"base model name", "POST", "/v1/adapters", `{"name": "stories260K", "path": "` + names[0] + `.gguf"}`, 400, ""},
		{"duplicate", "POST", "/v1/adapters", `{"name": "` + names[0] + `", "path": "` + names[1] + `.gguf"}`, 409, "adapter_exists"},
		{"vLLM load escaping", "POST", "/v1/load_lora_adapter", `{"lora_name": "a", "lora_path": "/etc/passwd"}`, 403, ""},
		{"vLLM unload unknown", "POST", "/v1/unload_lora_adapter", `{"lora_name": "nope"}`, 404, ""},
		{"delete unknown", "DELETE", "/v1/adapters/nope", nil, 404, ""},
	}
	for _, c := range admin {
		status, body := s.do(t, c.method, c.path, c.body)
		checkError(t, c.name, status, body, c.status, "", c.code)
	}
	// A corrupt upload is refused and leaves no file behind.
	req, _ := http.NewRequest("POST", s.URL+"/v1/adapters?name=corrupt", strings.NewReader("GGUF\x03\x00\x00\x00\xff\xff"))
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Authorization", "Bearer admin-key")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var e apiErr
	json.NewDecoder(resp.Body).Decode(&e)
	resp.Body.Close()
	if resp.StatusCode != 400 || e.Error == nil {
		t.Errorf("corrupt upload: %d %+v", resp.StatusCode, e)
	}
	if _, err := os.Stat(filepath.Join(dir, "corrupt.gguf")); err == nil {
		t.Error("corrupt upload was written to the adapter directory")
	}
	// vLLM aliases work end to end.
	status, body = s.do(t, "POST", "/v1/load_lora_adapter", `{"lora_name": "alias", "lora_path": "`+names[1]+`.gguf"}`)
	if status != 200 || !strings.Contains(string(body), "Success") {
		t.Errorf("vLLM load: %d %s", status, body)
	}
	status, body = s.do(t, "POST", "/v1/unload_lora_adapter", `{"lora_name": "alias"}`)
	if status != 200 {
		t.Errorf("vLLM unload: %d %s", status, body)
	}
}

// TestQueueFull fills a one-slot, one-queue-place server and expects 429s.
func TestQueueFull(t *testing.T) {
	s := startServer(t, t.TempDir(), "--parallel", "1", "--max-queue", "1", "--ctx", "512")
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body := s.do(t, "POST", "/v1/completions", `{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}`)
			if status == 429 {
				checkError(t, "queue full", status, body, 429, "rate_limit_error", "rate_limit_exceeded")
			}
			mu.Lock()
			statuses[status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if statuses[429] == 0 || statuses[200] == 0 || statuses[200]+statuses[429] != 6 {
		t.Fatalf("statuses %v: want some 200 and some 429", statuses)
	}
	t.Logf("statuses: %v", statuses)
}
