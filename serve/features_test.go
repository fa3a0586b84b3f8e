package serve_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// streamChunk is one server-sent event of a chat or text completion.
type streamChunk struct {
	Choices []struct {
		Index int    `json:"index"`
		Text  string `json:"text"`
		Delta struct {
			Role      string          `json:"role"`
			Content   *string         `json:"content"`
			ToolCalls json.RawMessage `json:"tool_calls"`
		} `json:"delta"`
		Logprobs *struct {
			Content []chatLogprob `json:"content"`
		} `json:"logprobs"`
		Finish *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		Completion int `json:"completion_tokens"`
	} `json:"usage"`
}

// streamChunks posts a streaming request and returns its events up to
// [DONE] (which must come).
func (s *server) streamChunks(t *testing.T, path string, req map[string]any) []streamChunk {
	t.Helper()
	body, _ := json.Marshal(req)
	hr, _ := http.NewRequest("POST", s.URL+path, bytes.NewReader(body))
	for k, v := range s.header {
		hr.Header[k] = v
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("stream: status %d", resp.StatusCode)
	}
	var out []streamChunk
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			return out
		}
		var c streamChunk
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			t.Fatalf("chunk %s: %v", line, err)
		}
		out = append(out, c)
	}
	t.Fatal("stream ended without [DONE]")
	return nil
}

// TestChoicesShareThePrompt: n choices with a seed are n distinct samples,
// the first equal to the same request with n = 1 (choice c's seed is
// derived from the seed and c); greedy choices are all the greedy text;
// usage counts the prompt once; a stream carries every index.
func TestChoicesShareThePrompt(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "256")
	base := map[string]any{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1, "seed": 7}
	with := func(extra map[string]any) map[string]any {
		m := map[string]any{}
		for k, v := range base {
			m[k] = v
		}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	one := s.completion(t, base)
	four := s.completion(t, with(map[string]any{"n": 4}))
	if len(four.Choices) != 4 {
		t.Fatalf("n=4 gave %d choices", len(four.Choices))
	}
	seen := map[string]bool{}
	total := 0
	for i, c := range four.Choices {
		if c.Index != i {
			t.Errorf("choice %d has index %d", i, c.Index)
		}
		seen[c.Text] = true
		total += len(c.Text)
	}
	if len(seen) < 3 {
		t.Errorf("4 sampled choices hold only %d distinct texts: %+v", len(seen), four.Choices)
	}
	if four.Choices[0].Text != one.Choices[0].Text {
		t.Errorf("choice 0 %q differs from n=1 %q with the same seed", four.Choices[0].Text, one.Choices[0].Text)
	}
	if four.Usage.Prompt != one.Usage.Prompt || four.Usage.Completion != 4*20 {
		t.Errorf("usage %+v, want prompt %d once and 80 completion tokens", four.Usage, one.Usage.Prompt)
	}
	greedy := s.completion(t, with(map[string]any{"n": 3, "temperature": 0}))
	for _, c := range greedy.Choices {
		if c.Text != greedy.Choices[0].Text {
			t.Errorf("greedy choices differ: %+v", greedy.Choices)
		}
	}
	texts := map[int]string{}
	for _, ch := range s.streamChunks(t, "/v1/completions", with(map[string]any{"n": 4, "stream": true})) {
		for _, c := range ch.Choices {
			texts[c.Index] += c.Text
		}
	}
	for i, c := range four.Choices {
		if texts[i] != c.Text {
			t.Errorf("streamed choice %d %q, non-stream %q", i, texts[i], c.Text)
		}
	}
}

// chatModel is a random two-layer model with the Llama-3 vocabulary and
// Llama 3.1 Instruct's chat template, written once per test binary.
var chatModel = sync.OnceValues(func() (string, error) {
	vocab, err := testutil.SharedPath("models/llama3.1-chat-vocab.gguf")
	if err != nil {
		return "", err
	}
	path := filepath.Join(tmpRoot, "llama3-chat.gguf")
	out, err := exec.Command(binary, "model", "random", "--vocab-from", vocab, "--embd", "64", "--heads", "4", "--layers", "2",
		"--type", "F32", "--ctx", "2048", "--seed", "3", "--out", path).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("model random: %v: %s", err, out)
	}
	return path, nil
})

func startChatServer(t *testing.T, dir string, args ...string) (*server, string) {
	t.Helper()
	model, err := chatModel()
	if err != nil {
		t.Fatal(err)
	}
	return startServerModel(t, model, dir, args...), model
}

// renderHF renders conversations with python3-jinja2 the way transformers
// does (../llama/testdata/chat/render.py).
func renderHF(t *testing.T, template string, cases []map[string]any) []string {
	t.Helper()
	for _, c := range cases {
		c["template"] = template
		c["bos_token"] = "<|begin_of_text|>"
		c["eos_token"] = "<|eot_id|>"
	}
	in, _ := json.Marshal(cases)
	cmd := exec.Command("/usr/bin/python3", "../llama/testdata/chat/render.py")
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("render.py (python3-jinja2 is needed: make testdeps): %v", err)
	}
	var res []struct{ Text, Error string }
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatal(err)
	}
	texts := make([]string, len(res))
	for i, r := range res {
		if r.Error != "" {
			t.Fatalf("case %d: jinja2: %s", i, r.Error)
		}
		texts[i] = r.Text
	}
	return texts
}

const weatherTools = `[{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
 "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"], "additionalProperties": false}}},
 {"type": "function", "function": {"name": "add", "description": "Add two integers",
 "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
 "b": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["a", "b"], "additionalProperties": false}}}]`

// TestTokenizeMatchesTransformers: /tokenize of chat messages (system,
// multi-turn, tools, a tool call and its result, non-ASCII) is exactly
// llama.cpp's tokenization of python3-jinja2's rendering of the model's
// own template; a chat request prefills those tokens (its usage says so);
// /tokenize of a prompt is llama.cpp's tokenization with BOS;
// /detokenize inverts it.
func TestTokenizeMatchesTransformers(t *testing.T) {
	s, model := startChatServer(t, t.TempDir(), "--ctx", "2048")
	o, err := oracle.Open(model, nil, oracle.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	tok, _ := llama.LoadTokenizer(model)
	template := readChatTemplate(t, model)
	cases := []struct {
		name  string
		msgs  string // OpenAI form
		hf    string // transformers form
		tools bool
	}{
		{"system and user", `[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]`, "", false},
		{"multi-turn", `[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]`, "", false},
		{"non-ASCII", `[{"role": "user", "content": "Ça va? 中文 🚀 \"q\"\n\ttabs"}]`, "", false},
		{"tools", `[{"role": "system", "content": "You call tools."}, {"role": "user", "content": "Weather in Paris?"}]`, "", true},
		{"tool call and result",
			`[{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]`,
			`[{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]`,
			true},
	}
	var hfCases []map[string]any
	for _, c := range cases {
		hf := c.hf
		if hf == "" {
			hf = c.msgs
		}
		// Raw JSON keeps key order, which the rendering shows.
		hc := map[string]any{"messages": json.RawMessage(hf), "add_generation_prompt": true}
		if c.tools {
			hc["tools"] = json.RawMessage(weatherTools)
		}
		hfCases = append(hfCases, hc)
	}
	texts := renderHF(t, template, hfCases)
	for i, c := range cases {
		want, err := o.Tokenize(texts[i], false)
		if err != nil {
			t.Fatal(err)
		}
		req := map[string]any{"model": "llama3-chat", "messages": json.RawMessage(c.msgs)}
		if c.tools {
			req["tools"] = json.RawMessage(weatherTools)
		}
		var got struct {
			Tokens []int32
			Count  int
			Max    int `json:"max_model_len"`
		}
		status, body := s.do(t, "POST", "/tokenize", req)
		if status != 200 || json.Unmarshal(body, &got) != nil {
			t.Fatalf("%s: tokenize %d %s", c.name, status, body)
		}
		if !equalTokens(got.Tokens, want) || got.Count != len(want) || got.Max != 2048 {
			t.Errorf("%s: /tokenize gave %d tokens, transformers' rendering is %d:\n got  %v\n want %v\n text %q", c.name, got.Count, len(want), got.Tokens, want, texts[i])
		}
		req["max_tokens"] = 1
		if c.tools {
			req["tool_choice"] = "none"
		}
		status, body = s.do(t, "POST", "/v1/chat/completions", req)
		var usage struct {
			Usage struct {
				Prompt int `json:"prompt_tokens"`
			} `json:"usage"`
		}
		if status != 200 || json.Unmarshal(body, &usage) != nil || usage.Usage.Prompt != len(want) {
			t.Errorf("%s: chat prompt tokens %d (status %d %s), want %d", c.name, usage.Usage.Prompt, status, body, len(want))
		}
	}
	text := "Hello world, ça va? 🚀"
	want, _ := o.Tokenize(text, true)
	var got struct{ Tokens []int32 }
	_, body := s.do(t, "POST", "/tokenize", map[string]any{"model": "llama3-chat", "prompt": text})
	json.Unmarshal(body, &got)
	if !equalTokens(got.Tokens, want) {
		t.Errorf("prompt tokens %v, llama.cpp %v", got.Tokens, want)
	}
	_, body = s.do(t, "POST", "/tokenize", map[string]any{"model": "llama3-chat", "prompt": text, "add_special_tokens": false})
	json.Unmarshal(body, &got)
	if want, _ := o.Tokenize(text, false); !equalTokens(got.Tokens, want) {
		t.Errorf("prompt tokens without specials %v, llama.cpp %v", got.Tokens, want)
	}
	var de struct{ Prompt string }
	_, body = s.do(t, "POST", "/detokenize", map[string]any{"model": "llama3-chat", "tokens": got.Tokens})
	if json.Unmarshal(body, &de) != nil || de.Prompt != text {
		t.Errorf("detokenize %s, want %q", body, text)
	}
	if want, _ := tok.Encode(text, false); !equalTokens(got.Tokens, want) {
		t.Errorf("tokenizer disagrees with itself")
	}
}

func equalTokens(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func readChatTemplate(t *testing.T, model string) string {
	t.Helper()
	info, err := llama.ReadInfo(model)
	if err != nil {
		t.Fatal(err)
	}
	return info.ChatTemplate
}

// boundedSchema has what the issue asks of a bounded schema: strings with
// maxLength, integers with ranges, required keys, no extra keys.
const boundedSchema = `{"type": "object", "properties": {
  "name": {"type": "string", "minLength": 1, "maxLength": 12},
  "age": {"type": "integer", "minimum": 0, "maximum": 120},
  "score": {"type": "integer", "minimum": -40, "maximum": -3},
  "mood": {"enum": ["happy", "sad", "calm"]},
  "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
  "admin": {"type": "boolean"}},
  "required": ["name", "age", "score", "mood"], "additionalProperties": false}`

// TestJSONSchemaOutput: response_format json_schema outputs parse and
// validate (an independent validator) for 50 seeds at temperature 1, from
// a model that knows nothing of JSON; json_object gives an object;
// unsupported schema features are refused naming the parameter.
func TestJSONSchemaOutput(t *testing.T) {
	s := startServer(t, t.TempDir(), "--ctx", "512", "--parallel", "8")
	c := jsonschema.NewCompiler()
	doc, _ := jsonschema.UnmarshalJSON(strings.NewReader(boundedSchema))
	c.AddResource("s.json", doc)
	validator, err := c.Compile("s.json")
	if err != nil {
		t.Fatal(err)
	}
	format := map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "person", "strict": true, "schema": json.RawMessage(boundedSchema)}}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for seed := 1; seed <= 50; seed++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := map[string]any{"model": "stories260K", "messages": []map[string]any{{"role": "user", "content": "Describe a person."}},
				"max_tokens": 400, "temperature": 1, "seed": seed, "response_format": format}
			status, body := s.do(t, "POST", "/v1/chat/completions", req)
			var r struct {
				Choices []struct {
					Message struct{ Content string }
					Finish  string `json:"finish_reason"`
				}
			}
			if status != 200 || json.Unmarshal(body, &r) != nil {
				errs <- fmt.Errorf("seed %d: %d %s", seed, status, body)
				return
			}
			text := r.Choices[0].Message.Content
			inst, err := jsonschema.UnmarshalJSON(strings.NewReader(text))
			if err == nil {
				err = validator.Validate(inst)
			}
			if err != nil || r.Choices[0].Finish != "stop" {
				errs <- fmt.Errorf("seed %d: %q (finish %s): %v", seed, text, r.Choices[0].Finish, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// json_object, streamed.
	var text string
	for _, ch := range s.streamChunks(t, "/v1/chat/completions", map[string]any{"model": "stories260K", "stream": true, "seed": 3,
		"messages": []map[string]any{{"role": "user", "content": "JSON please"}}, "max_tokens": 60, "response_format": map[string]any{"type": "json_object"}}) {
		for _, c := range ch.Choices {
			if c.Delta.Content != nil {
				text += *c.Delta.Content
			}
		}
	}
	if !strings.HasPrefix(strings.TrimSpace(text), "{") {
		t.Errorf("json_object output %q does not start an object", text)
	}
	for _, c := range []struct{ name, format, param string }{
		{"pattern", `{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a"}}}`, "response_format.json_schema.schema"},
		{"no schema", `{"type": "json_schema", "json_schema": {"name": "x"}}`, "response_format.json_schema.schema"},
		{"type", `{"type": "yaml"}`, "response_format.type"},
	} {
		status, body := s.do(t, "POST", "/v1/chat/completions", `{"model": "stories260K", "messages": [{"role": "user", "content": "x"}], "response_format": `+c.format+`}`)
		checkParam(t, c.name, status, body, c.param)
	}
}

// checkParam expects a 400 naming param.
func checkParam(t *testing.T, name string, status int, body []byte, param string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message string
			Type    string
			Param   *string
		}
	}
	if json.Unmarshal(body, &e) != nil || status != 400 || e.Error == nil || e.Error.Type != "invalid_request_error" ||
		e.Error.Param == nil || *e.Error.Param != param {
		t.Errorf("%s: status %d %s, want 400 naming %s", name, status, body, param)
	}
}

// TestParameterErrors: bad values of the newer parameters get a 400
// naming the parameter, never a 500.
func TestParameterErrors(t *testing.T) {
	s, _ := startChatServer(t, t.TempDir(), "--ctx", "512")
	msgs := `"messages": [{"role": "user", "content": "x"}]`
	chat := func(extra string) string { return `{"model": "llama3-chat", ` + msgs + extra + `}` }
	for _, c := range []struct{ name, path, body, param string }{
		{"top_logprobs over 20", "/v1/chat/completions", chat(`, "logprobs": true, "top_logprobs": 21`), "top_logprobs"},
		{"top_logprobs without logprobs", "/v1/chat/completions", chat(`, "top_logprobs": 2`), "top_logprobs"},
		{"chat logprobs not bool", "/v1/chat/completions", chat(`, "logprobs": 3`), "logprobs"},
		{"completion logprobs over 5", "/v1/completions", `{"model": "llama3-chat", "prompt": "x", "logprobs": 6}`, "logprobs"},
		{"max_tokens 0 without echo", "/v1/completions", `{"model": "llama3-chat", "prompt": "x", "max_tokens": 0}`, "max_tokens"},
		{"n", "/v1/chat/completions", chat(`, "n": 0`), "n"},
		{"tool type", "/v1/chat/completions", chat(`, "tools": [{"type": "retrieval"}]`), "tools[0].type"},
		{"tool name", "/v1/chat/completions", chat(`, "tools": [{"type": "function", "function": {"name": "a b"}}]`), "tools[0].function.name"},
		{"unknown tool_choice", "/v1/chat/completions", chat(`, "tools": ` + weatherTools + `, "tool_choice": {"type": "function", "function": {"name": "nope"}}`), "tool_choice"},
		{"tool_choice without tools", "/v1/chat/completions", chat(`, "tool_choice": "required"`), "tool_choice"},
		{"tool schema unsupported", "/v1/chat/completions", chat(`, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string", "pattern": "x"}}}}}], "tool_choice": "required"`), "tools"},
		{"tool_choice and response_format", "/v1/chat/completions", chat(`, "tools": ` + weatherTools + `, "tool_choice": "required", "response_format": {"type": "json_object"}`), "tool_choice"},
		{"template raises", "/v1/chat/completions", `{"model": "llama3-chat", "messages": [{"role": "system", "content": "no user turn"}], "tools": ` + weatherTools + `}`, "messages"},
		{"bad role", "/v1/chat/completions", `{"model": "llama3-chat", "messages": [{"role": "robot", "content": "x"}]}`, "messages[0].role"},
		{"bad tool call arguments", "/v1/chat/completions", `{"model": "llama3-chat", "messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}]}]}`, ""},
		{"tokenize nothing", "/tokenize", `{"model": "llama3-chat"}`, "prompt"},
		{"detokenize out of vocabulary", "/detokenize", `{"model": "llama3-chat", "tokens": [1, 999999]}`, "tokens"},
	} {
		status, body := s.do(t, "POST", c.path, c.body)
		if c.param == "" {
			if status != 200 && status != 400 {
				t.Errorf("%s: status %d %s", c.name, status, body)
			}
			continue
		}
		checkParam(t, c.name, status, body, c.param)
	}
	status, body := s.do(t, "POST", "/tokenize", `{"model": "nope", "prompt": "x"}`)
	if status != 404 {
		t.Errorf("tokenize with an unknown model: %d %s", status, body)
	}
}

var tmpRoot = func() string {
	dir, err := os.MkdirTemp("", "sbora-serve-test-")
	if err != nil {
		panic(err)
	}
	return dir
}()
