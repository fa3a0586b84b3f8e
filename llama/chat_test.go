package llama

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

// chatCase is a conversation in the server's form (Messages, tools as the
// request's JSON) and in the form transformers receives (hf, JSON).
type chatCase struct {
	name  string
	msgs  []Message
	tools string
	gen   bool
	// hf is the messages as transformers gets them; "%ARGS%" stands for
	// the tool call arguments, an object or a JSON string depending on
	// the template (see ChatTemplate.argumentsValue).
	hf string
}

const weatherTool = `[{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
 "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]`

// stressTools has what printing JSON gets wrong most easily: HTML
// characters, non-ASCII, floats with integral values, nested schemas.
var stressTools = `[{"type": "function", "function": {"name": "book", "description": "Book <b>rooms</b> & more \"now\"; 1.0 = one",
 "parameters": {"type": "object", "properties": {"rooms": {"type": "integer", "minimum": 1, "maximum": 9},
 "nights": {"type": "number", "default": 1.0, "enum": [1.0, 2.5, 1e21]},
 "guest": {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}},
 "required": ["rooms"]}}}, ` + weatherTool[1:]

func chatCases() []chatCase {
	return []chatCase{
		{name: "system and user", gen: true,
			msgs: []Message{{Role: "system", Content: "You are terse."}, {Role: "user", Content: "Hi there!"}},
			hf:   `[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}]`},
		{name: "multi-turn", gen: true,
			msgs: []Message{{Role: "user", Content: "What is 2+2?"}, {Role: "assistant", Content: "4."}, {Role: "user", Content: "And 3+3?"}},
			hf:   `[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]`},
		{name: "no generation prompt", gen: false,
			msgs: []Message{{Role: "user", Content: "Say hi"}, {Role: "assistant", Content: "Hi!"}},
			hf:   `[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]`},
		{name: "non-ASCII", gen: true,
			msgs: []Message{{Role: "system", Content: "Réponds en français. 中文也可以。"}, {Role: "user", Content: "Ça va? 🚀 \"quotes\" and\nnewlines\t"}},
			hf:   `[{"role": "system", "content": "Réponds en français. 中文也可以。"}, {"role": "user", "content": "Ça va? 🚀 \"quotes\" and\nnewlines\t"}]`},
		{name: "tools", gen: true, tools: weatherTool,
			msgs: []Message{{Role: "system", Content: "You help with weather."}, {Role: "user", Content: "Weather in Paris?"}},
			hf:   `[{"role": "system", "content": "You help with weather."}, {"role": "user", "content": "Weather in Paris?"}]`},
		{name: "tool call and result", gen: true, tools: weatherTool,
			msgs: []Message{{Role: "user", Content: "Weather in Paris?"},
				{Role: "assistant", ToolCalls: []ToolCall{{ID: "call_1", Name: "get_weather", Arguments: json.RawMessage(`"{\"city\": \"Paris\"}"`)}}},
				{Role: "tool", ToolCallID: "call_1", Name: "get_weather", Content: `{"temperature": 21}`}},
			hf: `[{"role": "user", "content": "Weather in Paris?"},
				{"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": %ARGS%}}]},
				{"role": "tool", "content": "{\"temperature\": 21}", "name": "get_weather", "tool_call_id": "call_1"}]`},
		{name: "tool schema stress", gen: true, tools: stressTools,
			msgs: []Message{{Role: "system", Content: "Use tools <when> needed & \"only\" then."}, {Role: "user", Content: "Book 2 rooms for 3.0 nights, café ☕"},
				{Role: "assistant", Content: "", ToolCalls: []ToolCall{
					{ID: "a", Name: "book", Arguments: json.RawMessage(`{"rooms": 2, "nights": 3.0, "guest": {"name": "Zoë", "tags": ["vip", "<x>"]}}`)},
					{ID: "b", Name: "get_weather", Arguments: json.RawMessage(`{"city": "Köln", "unit": "celsius"}`)}}},
				{Role: "tool", ToolCallID: "a", Name: "book", Content: "ok"}, {Role: "tool", ToolCallID: "b", Name: "get_weather", Content: "rain"}},
			hf: `[{"role": "system", "content": "Use tools <when> needed & \"only\" then."}, {"role": "user", "content": "Book 2 rooms for 3.0 nights, café ☕"},
				{"role": "assistant", "content": null, "tool_calls": [
					{"id": "a", "type": "function", "function": {"name": "book", "arguments": %ARGS1%}},
					{"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": %ARGS2%}}]},
				{"role": "tool", "content": "ok", "name": "book", "tool_call_id": "a"}, {"role": "tool", "content": "rain", "name": "get_weather", "tool_call_id": "b"}]`},
		{name: "assistant first", gen: true,
			msgs: []Message{{Role: "assistant", Content: "Hello, how can I help?"}, {Role: "user", Content: "Nothing."}},
			hf:   `[{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Nothing."}]`},
	}
}

// TestChatTemplatesMatchJinja2 renders every shared chat template ×
// conversation with our renderer and with Debian's python3-jinja2 set up
// as transformers' apply_chat_template sets it up; texts (or the fact that
// the template raised an error) must be identical.
func TestChatTemplatesMatchJinja2(t *testing.T) {
	dir := filepath.Dir(testutil.Shared(t, "templates/README.md"))
	files, err := filepath.Glob(filepath.Join(dir, "*.jinja"))
	if err != nil || len(files) < 8 {
		t.Fatalf("shared templates: %v %v", files, err)
	}
	now := time.Date(2025, 3, 9, 14, 5, 0, 0, time.UTC)
	type pyCase struct {
		Template            string          `json:"template"`
		Messages            json.RawMessage `json:"messages"`
		Tools               json.RawMessage `json:"tools,omitempty"`
		AddGenerationPrompt bool            `json:"add_generation_prompt"`
		BOS                 string          `json:"bos_token"`
		EOS                 string          `json:"eos_token"`
		Now                 string          `json:"now"`
		Extra               map[string]any  `json:"extra,omitempty"`
	}
	type goCase struct {
		file string
		c    chatCase
		ct   *ChatTemplate
	}
	var py []pyCase
	var ours []goCase
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		ct, err := ParseChatTemplate(string(src), "<|begin_of_text|>", "<|eot_id|>")
		if err != nil {
			t.Fatalf("%s: %v", filepath.Base(f), err)
		}
		ct.Now = func() time.Time { return now }
		for _, c := range chatCases() {
			args := `"{\"city\": \"Paris\"}"`
			if strings.Contains(string(src), "arguments | tojson") || strings.Contains(string(src), "arguments|tojson") {
				args = `{"city": "Paris"}`
			}
			args1, args2 := `"{\"rooms\": 2, \"nights\": 3.0, \"guest\": {\"name\": \"Zoë\", \"tags\": [\"vip\", \"<x>\"]}}"`, `"{\"city\": \"Köln\", \"unit\": \"celsius\"}"`
			if !strings.HasPrefix(args, `"`) {
				args1, args2 = `{"rooms": 2, "nights": 3.0, "guest": {"name": "Zoë", "tags": ["vip", "<x>"]}}`, `{"city": "Köln", "unit": "celsius"}`
			}
			hf := strings.NewReplacer("%ARGS%", args, "%ARGS1%", args1, "%ARGS2%", args2).Replace(c.hf)
			p := pyCase{Template: string(src), Messages: json.RawMessage(hf),
				AddGenerationPrompt: c.gen, BOS: "<|begin_of_text|>", EOS: "<|eot_id|>", Now: now.Format("2006-01-02")}
			extra := map[string]any{}
			if strings.Contains(string(src), "datetime") {
				extra["datetime"] = now.Format("2006-01-02")
			}
			if strings.Contains(string(src), "functions") {
				extra["functions"] = "[]"
			}
			if c.tools != "" {
				p.Tools = json.RawMessage(c.tools)
				if strings.Contains(string(src), "functions") {
					extra["functions"] = functionsJSON(json.RawMessage(c.tools))
				}
			}
			p.Extra = extra
			py = append(py, p)
			ours = append(ours, goCase{filepath.Base(f), c, ct})
		}
	}
	in, _ := json.Marshal(py)
	cmd := exec.Command("/usr/bin/python3", "testdata/chat/render.py")
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the reference renderer needs Debian's python3-jinja2 (apt-get install python3-jinja2): %v\n%s", err, stderr.String())
	}
	var want []struct{ Text, Error string }
	if err := json.Unmarshal(out, &want); err != nil || len(want) != len(ours) {
		t.Fatalf("reference output: %v (%d results for %d cases)", err, len(want), len(ours))
	}
	same, raised := 0, 0
	for i, g := range ours {
		got, err := g.ct.Render(g.c.msgs, RenderOptions{Tools: json.RawMessage(g.c.tools), AddGenerationPrompt: g.c.gen})
		switch {
		case want[i].Error != "" && err != nil:
			if !errors.Is(err, ErrTemplate) {
				t.Errorf("%s / %s: error %v does not wrap ErrTemplate", g.file, g.c.name, err)
			}
			raised++
		case want[i].Error != "":
			t.Errorf("%s / %s: jinja2 raised %s; we rendered %q", g.file, g.c.name, want[i].Error, got)
		case err != nil:
			t.Errorf("%s / %s: we failed (%v); jinja2 rendered %q", g.file, g.c.name, err, want[i].Text)
		case got != want[i].Text:
			t.Errorf("%s / %s differs:\n ours   %q\n jinja2 %q", g.file, g.c.name, got, want[i].Text)
		default:
			same++
		}
	}
	t.Logf("%d renderings identical to jinja2's, %d raised in both, of %d (%d templates)", same, raised, len(ours), len(files))
	if same < len(ours)*3/4 {
		t.Errorf("only %d renderings compared: the cases test too little", same)
	}
}

// TestToolCallParsing reads tool calls back in each format.
func TestToolCallParsing(t *testing.T) {
	for _, c := range []struct {
		f    ToolFormat
		text string
		want []ParsedCall
	}{
		{ToolsLlama3, `{"name": "get_weather", "parameters": {"city": "Paris"}}`, []ParsedCall{{"get_weather", `{"city":"Paris"}`}}},
		{ToolsLlama3, `<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": [1, ";"]}}`, []ParsedCall{{"a", `{}`}, {"b", `{"x":[1,";"]}`}}},
		{ToolsLlama3, `The weather is {"nice"}.`, nil},
		{ToolsHermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", []ParsedCall{{"get_weather", `{"city":"Paris"}`}}},
		{ToolsHermes, "<tool_call>{\"name\": \"a\", \"arguments\": \"{\\\"k\\\": 1}\"}</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>", []ParsedCall{{"a", `{"k":1}`}, {"b", `{}`}}},
		{ToolsHermes, "Sure! <tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>", nil},
		{ToolsMistral, `[TOOL_CALLS][{"name": "a", "arguments": {"q": "x"}}]`, []ParsedCall{{"a", `{"q":"x"}`}}},
		{ToolsFunctools, `functools[{"name": "a", "arguments": {}}]`, []ParsedCall{{"a", `{}`}}},
	} {
		got := c.f.ParseToolCalls(c.text)
		if len(got) != len(c.want) {
			t.Errorf("%s %q: %v, want %v", c.f, c.text, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s %q: call %d %v, want %v", c.f, c.text, i, got[i], c.want[i])
			}
		}
	}
	if !ToolsHermes.MayStartToolCall("<tool") || ToolsHermes.MayStartToolCall("Hello") || !ToolsLlama3.MayStartToolCall("  {\"na") {
		t.Error("MayStartToolCall")
	}
}
