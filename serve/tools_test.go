package serve_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/sbora-serve/sbora-serve/llama"
)

type toolCall struct {
	Index    *int   `json:"index"`
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

type chatResponse struct {
	Choices []struct {
		Message struct {
			Role      string     `json:"role"`
			Content   *string    `json:"content"`
			ToolCalls []toolCall `json:"tool_calls"`
		} `json:"message"`
		Finish string `json:"finish_reason"`
	} `json:"choices"`
}

func (s *server) chat(t *testing.T, req map[string]any) chatResponse {
	t.Helper()
	status, body := s.do(t, "POST", "/v1/chat/completions", req)
	var r chatResponse
	if status != 200 || json.Unmarshal(body, &r) != nil || len(r.Choices) == 0 {
		t.Fatalf("chat: %d %s", status, body)
	}
	return r
}

// toolValidators compiles each weather tool's parameter schema.
func toolValidators(t *testing.T) map[string]*jsonschema.Schema {
	var tools []struct {
		Function struct {
			Name       string
			Parameters json.RawMessage
		}
	}
	json.Unmarshal([]byte(weatherTools), &tools)
	out := map[string]*jsonschema.Schema{}
	for _, tl := range tools {
		c := jsonschema.NewCompiler()
		doc, _ := jsonschema.UnmarshalJSON(strings.NewReader(string(tl.Function.Parameters)))
		c.AddResource("p.json", doc)
		v, err := c.Compile("p.json")
		if err != nil {
			t.Fatal(err)
		}
		out[tl.Function.Name] = v
	}
	return out
}

func checkCall(t *testing.T, what string, call toolCall, validators map[string]*jsonschema.Schema, want string) {
	t.Helper()
	v, ok := validators[call.Function.Name]
	if !ok || (want != "" && call.Function.Name != want) || call.Type != "function" || !strings.HasPrefix(call.ID, "call_") {
		t.Fatalf("%s: call %+v (want tool %q)", what, call, want)
	}
	inst, err := jsonschema.UnmarshalJSON(strings.NewReader(call.Function.Arguments))
	if err == nil {
		err = v.Validate(inst)
	}
	if err != nil {
		t.Fatalf("%s: arguments %s do not validate: %v", what, call.Function.Arguments, err)
	}
}

// TestForcedToolCalls: tool_choice required (any tool) and named (that
// tool) make even a random model answer with one call in Llama 3.1's
// format, parsed into tool_calls whose arguments validate against the
// tool's schema; streamed, the same call arrives as a tool_calls delta.
func TestForcedToolCalls(t *testing.T) {
	s, _ := startChatServer(t, t.TempDir(), "--ctx", "2048")
	validators := toolValidators(t)
	msgs := []map[string]any{{"role": "user", "content": "What is the weather in Paris, and what is 2+3?"}}
	for seed := 1; seed <= 6; seed++ {
		for _, choice := range []any{"required", map[string]any{"type": "function", "function": map[string]any{"name": "add"}}} {
			req := map[string]any{"model": "llama3-chat", "messages": msgs, "tools": json.RawMessage(weatherTools), "tool_choice": choice,
				"max_tokens": 120, "temperature": 1, "seed": seed}
			r := s.chat(t, req)
			c := r.Choices[0]
			want := ""
			if _, named := choice.(map[string]any); named {
				want = "add"
			}
			what := fmt.Sprintf("seed %d, tool_choice %v", seed, choice)
			if c.Finish != "tool_calls" || len(c.Message.ToolCalls) != 1 || c.Message.Content != nil {
				t.Fatalf("%s: %+v", what, c)
			}
			checkCall(t, what, c.Message.ToolCalls[0], validators, want)

			req["stream"] = true
			var calls []toolCall
			finish := ""
			for _, ch := range s.streamChunks(t, "/v1/chat/completions", req) {
				for _, c := range ch.Choices {
					if len(c.Delta.ToolCalls) > 0 {
						var part []toolCall
						json.Unmarshal(c.Delta.ToolCalls, &part)
						calls = append(calls, part...)
					}
					if c.Delta.Content != nil && *c.Delta.Content != "" {
						t.Errorf("%s: streamed content %q besides the call", what, *c.Delta.Content)
					}
					if c.Finish != nil {
						finish = *c.Finish
					}
				}
			}
			if len(calls) != 1 || finish != "tool_calls" || calls[0].Index == nil || *calls[0].Index != 0 ||
				calls[0].Function != c.Message.ToolCalls[0].Function {
				t.Fatalf("%s: streamed %+v (finish %s), non-stream %+v", what, calls, finish, c.Message.ToolCalls)
			}
		}
	}
}

// TestToolCallingAdapter trains a small adapter with sbora-serve train to
// answer a weather question with a Llama 3.1 tool call, then serves it:
// with tool_choice auto the answer comes back as tool_calls (plain and
// streamed), and the conversation continues with the tool's result.
func TestToolCallingAdapter(t *testing.T) {
	model, err := chatModel()
	if err != nil {
		t.Fatal(err)
	}
	info, err := llama.ReadInfo(model)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := llama.ParseChatTemplate(info.ChatTemplate, "<|begin_of_text|>", "<|eot_id|>")
	if err != nil {
		t.Fatal(err)
	}
	question := []llama.Message{{Role: "user", Content: "What is the weather in Paris?"}}
	prompt, err := tmpl.Render(question, llama.RenderOptions{Tools: json.RawMessage(weatherTools), AddGenerationPrompt: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "tools.jsonl")
	line, _ := json.Marshal(map[string]string{"prompt": prompt, "completion": `{"name": "get_weather", "parameters": {"city": "Paris"}}`})
	if err := os.WriteFile(data, append(line, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	adapterDir := filepath.Join(dir, "adapters")
	os.Mkdir(adapterDir, 0o755)
	out, err := exec.Command(binary, "train", "--model", model, "--data", data, "--out", filepath.Join(adapterDir, "weather.gguf"),
		"--rank", "16", "--steps", "60", "--lr", "0.01", "--batch", "1", "--seq-len", "512", "--threads", "2").CombinedOutput()
	if err != nil {
		t.Fatalf("train: %v\n%s", err, out)
	}
	s := startServerModel(t, model, adapterDir, "--ctx", "2048")
	req := map[string]any{"model": "weather", "messages": []map[string]any{{"role": "user", "content": "What is the weather in Paris?"}},
		"tools": json.RawMessage(weatherTools), "max_tokens": 40, "temperature": 0}
	r := s.chat(t, req)
	c := r.Choices[0]
	if c.Finish != "tool_calls" || len(c.Message.ToolCalls) != 1 || c.Message.ToolCalls[0].Function.Name != "get_weather" ||
		c.Message.ToolCalls[0].Function.Arguments != `{"city":"Paris"}` {
		t.Fatalf("trained adapter answered %+v", c)
	}
	req["stream"] = true
	var calls []toolCall
	for _, ch := range s.streamChunks(t, "/v1/chat/completions", req) {
		for _, c := range ch.Choices {
			var part []toolCall
			json.Unmarshal(c.Delta.ToolCalls, &part)
			calls = append(calls, part...)
		}
	}
	if len(calls) != 1 || calls[0].Function != c.Message.ToolCalls[0].Function {
		t.Fatalf("streamed calls %+v", calls)
	}
	// The call and its result go back in; the template renders them.
	call := c.Message.ToolCalls[0]
	follow := map[string]any{"model": "weather", "tools": json.RawMessage(weatherTools), "max_tokens": 8, "temperature": 0,
		"messages": []map[string]any{{"role": "user", "content": "What is the weather in Paris?"},
			{"role": "assistant", "content": nil, "tool_calls": []map[string]any{{"id": call.ID, "type": "function",
				"function": map[string]any{"name": call.Function.Name, "arguments": call.Function.Arguments}}}},
			{"role": "tool", "tool_call_id": call.ID, "content": `{"temperature": 21}`}}}
	s.chat(t, follow)
	// The base model, same request: no tool call.
	req["model"], req["stream"] = "llama3-chat", false
	if r := s.chat(t, req); r.Choices[0].Finish == "tool_calls" {
		t.Errorf("the base model also called the tool: the adapter test is vacuous")
	}
}

// TestOpenAIClientFeatures drives chat logprobs, n, response_format
// json_schema, forced tool calls (plain and streamed through the SDK's
// stream helper) and a refused top_logprobs with the official openai npm
// client.
func TestOpenAIClientFeatures(t *testing.T) {
	s, _ := startChatServer(t, t.TempDir(), "--ctx", "2048", "--api-key", "test-key")
	clientDir, _ := filepath.Abs("testdata/openai-client")
	if _, err := os.Stat(filepath.Join(clientDir, "node_modules", "openai")); err != nil {
		t.Fatalf("the openai npm package is not installed (make testdeps): %v", err)
	}
	cmd := exec.Command("node", "features.mjs", s.URL+"/v1", "llama3-chat", weatherTools)
	cmd.Dir = clientDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node client: %v\n%s\nserver: %s", err, out, s.stderr)
	}
	var got struct {
		Logprobs []struct {
			Token   string
			Logprob float64
			Top     int
			Bytes   int
		}
		LogprobsText string
		N            []struct {
			Index int
			Text  string
		}
		NUsage struct {
			Completion int `json:"completion_tokens"`
		}
		JSON               struct{ Text, Finish string }
		Tools, StreamTools struct {
			Finish string
			Calls  []toolCall
		}
		Bad struct {
			Status int
			Param  string
		}
	}
	line := out[strings.LastIndexByte(strings.TrimSpace(string(out)), '\n')+1:]
	if err := json.Unmarshal(line, &got); err != nil {
		t.Fatalf("client output %s: %v", out, err)
	}
	text := ""
	for _, e := range got.Logprobs {
		text += e.Token
		if e.Top != 3 || e.Logprob > 0 || e.Bytes != len(e.Token) {
			t.Errorf("logprob entry %+v", e)
		}
	}
	if len(got.Logprobs) != 5 || text != got.LogprobsText {
		t.Errorf("logprobs %+v for text %q", got.Logprobs, got.LogprobsText)
	}
	if len(got.N) != 3 || got.N[2].Index != 2 || got.NUsage.Completion != 18 {
		t.Errorf("n: %+v usage %+v", got.N, got.NUsage)
	}
	var forecast struct {
		City *string
		Days *int
	}
	dec := json.NewDecoder(strings.NewReader(got.JSON.Text))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&forecast); err != nil || forecast.City == nil || len([]rune(*forecast.City)) > 10 || forecast.Days == nil ||
		*forecast.Days < 1 || *forecast.Days > 7 || got.JSON.Finish != "stop" {
		t.Errorf("json_schema output %+v: %v", got.JSON, err)
	}
	validators := toolValidators(t)
	if got.Tools.Finish != "tool_calls" || len(got.Tools.Calls) != 1 {
		t.Fatalf("tools: %+v", got.Tools)
	}
	checkCall(t, "required", got.Tools.Calls[0], validators, "")
	if got.StreamTools.Finish != "tool_calls" || len(got.StreamTools.Calls) != 1 {
		t.Fatalf("streamed tools: %+v", got.StreamTools)
	}
	checkCall(t, "streamed, named", got.StreamTools.Calls[0], validators, "add")
	if got.Bad.Status != 400 || got.Bad.Param != "top_logprobs" {
		t.Errorf("top_logprobs 25: %+v", got.Bad)
	}
}
