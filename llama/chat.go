package llama

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ollama/ollama/fs"
	"github.com/sbora-serve/sbora-serve/internal/jinja"
)

// Message is one chat turn.
type Message struct {
	Role    string `json:"role"` // system, user, assistant or tool
	Content string `json:"content"`
	Name    string `json:"name,omitempty"`
	// ToolCalls are an assistant turn's calls; ToolCallID names the call a
	// tool turn answers.
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// ToolCall is a function call of an assistant turn. Arguments is JSON
// (an object, or a string holding one, as OpenAI clients send it).
type ToolCall struct {
	ID        string          `json:"id,omitempty"`
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

// ChatTemplate renders chat messages into a prompt with the model's own
// Jinja template (tokenizer.chat_template), exactly as Hugging Face
// transformers' apply_chat_template does: trim_blocks and lstrip_blocks,
// loop controls, bos_token and eos_token, add_generation_prompt, tools,
// raise_exception, strftime_now, transformers' tojson (no HTML escaping,
// keys in their given order). Models without a template use
// FallbackTemplate.
type ChatTemplate struct {
	// Name is "jinja" (the model's own template) or "fallback".
	Name   string
	Source string
	// Stop sequences that end an assistant turn in this format (the
	// fallback's; Jinja templates end turns with EOS-like tokens).
	Stop []string
	// Tools is how the template's model writes tool calls.
	Tools ToolFormat
	// Now is strftime_now's clock (default time.Now).
	Now      func() time.Time
	bos, eos string
	tmpl     *jinja.Template
}

// FallbackTemplate documents the format used when the model has no chat
// template:
//
//	<system content>\n\n         (if any)
//	User: <content>\n            (each user turn)
//	Assistant: <content>\n       (each assistant turn)
//	Assistant:                   (generation prompt)
//
// with "\nUser:" as a stop sequence.
const FallbackTemplate = "<system>\\n\\nUser: <user>\\nAssistant: <assistant>\\nAssistant:"

// NewChatTemplate reads the model's chat template and its BOS and EOS
// token texts from the GGUF metadata.
func NewChatTemplate(kv fs.Config) (*ChatTemplate, error) {
	tokens := kv.Strings("tokenizer.ggml.tokens")
	text := func(key string) string {
		id := int(kv.Uint(key, ^uint32(0)))
		if id >= 0 && id < len(tokens) {
			return tokens[id]
		}
		return ""
	}
	return ParseChatTemplate(kv.String("tokenizer.chat_template"), text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))
}

// ParseChatTemplate compiles a Jinja chat template ("" for the fallback).
func ParseChatTemplate(source, bos, eos string) (*ChatTemplate, error) {
	if strings.TrimSpace(source) == "" {
		return &ChatTemplate{Name: "fallback", Stop: []string{"\nUser:"}, Now: time.Now}, nil
	}
	t, err := jinja.Compile(source)
	if err != nil {
		return nil, fmt.Errorf("the model's chat template: %w", err)
	}
	return &ChatTemplate{Name: "jinja", Source: source, Tools: detectToolFormat(source), Now: time.Now, bos: bos, eos: eos, tmpl: t}, nil
}

// RenderOptions are the parts of a chat request a template sees besides
// the messages.
type RenderOptions struct {
	// Tools is the request's tools (a JSON array), nil for none.
	Tools json.RawMessage
	// AddGenerationPrompt ends the prompt where the assistant's next turn
	// begins.
	AddGenerationPrompt bool
	// Extra variables (chat_template_kwargs): JSON values by name.
	Extra map[string]json.RawMessage
}

// ErrTemplate wraps errors the template raises or runs into (a client
// error: the conversation does not fit the model's format).
var ErrTemplate = errors.New("chat template")

// Render returns the prompt for msgs.
func (c *ChatTemplate) Render(msgs []Message, o RenderOptions) (string, error) {
	if c.tmpl == nil {
		return c.renderFallback(msgs, o)
	}
	data := map[string]jinja.Value{}
	for k, raw := range o.Extra {
		v, err := jsonValue(raw)
		if err != nil {
			return "", fmt.Errorf("%w: variable %s: %v", ErrTemplate, k, err)
		}
		data[k] = v
	}
	list := make([]jinja.Value, 0, len(msgs))
	for _, m := range msgs {
		v, err := c.messageValue(m)
		if err != nil {
			return "", err
		}
		list = append(list, v)
	}
	data["messages"] = jinja.NewList(list)
	data["add_generation_prompt"] = jinja.NewBool(o.AddGenerationPrompt)
	data["bos_token"] = jinja.NewString(c.bos)
	data["eos_token"] = jinja.NewString(c.eos)
	now := c.Now
	if now == nil {
		now = time.Now
	}
	data["strftime_now"] = jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
		format := "%Y-%m-%d"
		if len(args) > 0 {
			format = args[0].AsString()
		}
		return jinja.NewString(strftime(now(), format)), nil
	})
	if len(o.Tools) > 0 && string(bytes.TrimSpace(o.Tools)) != "null" {
		tools, err := jsonValue(o.Tools)
		if err != nil {
			return "", fmt.Errorf("%w: tools: %v", ErrTemplate, err)
		}
		data["tools"] = tools
		// Templates written for vLLM-style callers read the function
		// specs as a JSON string and today's date (firefunction v2).
		if _, ok := data["functions"]; !ok && strings.Contains(c.Source, "functions") {
			data["functions"] = jinja.NewString(functionsJSON(o.Tools))
		}
	}
	if _, ok := data["datetime"]; !ok && strings.Contains(c.Source, "datetime") {
		data["datetime"] = jinja.NewString(now().Format("2006-01-02"))
	}
	if _, ok := data["functions"]; !ok && strings.Contains(c.Source, "functions") {
		data["functions"] = jinja.NewString("[]")
	}
	out, err := c.tmpl.RenderValues(data)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrTemplate, err)
	}
	return out, nil
}

// messageValue is a message as transformers' templates see it: role,
// content (None for an assistant turn that only calls tools), name,
// tool_calls ({id, type, function: {name, arguments}}), tool_call_id.
func (c *ChatTemplate) messageValue(m Message) (jinja.Value, error) {
	d := jinja.NewDict()
	dict := d.AsDict()
	dict.Set("role", jinja.NewString(m.Role))
	if m.Content == "" && len(m.ToolCalls) > 0 {
		dict.Set("content", jinja.None())
	} else {
		dict.Set("content", jinja.NewString(m.Content))
	}
	if m.Name != "" {
		dict.Set("name", jinja.NewString(m.Name))
	}
	if len(m.ToolCalls) > 0 {
		calls := make([]jinja.Value, 0, len(m.ToolCalls))
		for _, tc := range m.ToolCalls {
			args, err := c.argumentsValue(tc.Arguments)
			if err != nil {
				return jinja.Value{}, fmt.Errorf("%w: tool call %q arguments: %v", ErrTemplate, tc.Name, err)
			}
			fn := jinja.NewDict()
			fn.AsDict().Set("name", jinja.NewString(tc.Name))
			fn.AsDict().Set("arguments", args)
			call := jinja.NewDict()
			if tc.ID != "" {
				call.AsDict().Set("id", jinja.NewString(tc.ID))
			}
			call.AsDict().Set("type", jinja.NewString("function"))
			call.AsDict().Set("function", fn)
			calls = append(calls, call)
		}
		dict.Set("tool_calls", jinja.NewList(calls))
	}
	if m.ToolCallID != "" {
		dict.Set("tool_call_id", jinja.NewString(m.ToolCallID))
	}
	return d, nil
}

// argumentsValue gives tool call arguments the type the template expects:
// templates that serialize arguments themselves (arguments | tojson) get
// an object, as vLLM passes them; the others get the JSON text, as OpenAI
// clients send it (DeepSeek's concatenates it).
func (c *ChatTemplate) argumentsValue(raw json.RawMessage) (jinja.Value, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		raw = []byte("{}")
	}
	var text string
	isString := json.Unmarshal(raw, &text) == nil
	wantsObject := strings.Contains(c.Source, "arguments | tojson") || strings.Contains(c.Source, "arguments|tojson")
	switch {
	case isString && wantsObject:
		if json.Valid([]byte(text)) {
			return jsonValue([]byte(text))
		}
		return jinja.NewString(text), nil
	case isString:
		return jinja.NewString(text), nil
	case wantsObject:
		return jsonValue(raw)
	}
	return jinja.NewString(string(raw)), nil
}

// functionsJSON is the function specs of an OpenAI tools array as JSON.
func functionsJSON(tools json.RawMessage) string {
	var list []struct {
		Function json.RawMessage `json:"function"`
	}
	if json.Unmarshal(tools, &list) != nil {
		return "[]"
	}
	var fns []json.RawMessage
	for _, t := range list {
		if len(t.Function) > 0 {
			fns = append(fns, t.Function)
		}
	}
	b, _ := json.Marshal(fns)
	return string(b)
}

// jsonValue decodes JSON into template values, keeping object keys in
// their order (as Python's json.loads does: templates print tool schemas
// with tojson, and the order shows).
func jsonValue(raw []byte) (jinja.Value, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return jinja.Value{}, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return jinja.Value{}, errors.New("data after the JSON value")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (jinja.Value, error) {
	tok, err := dec.Token()
	if err != nil {
		return jinja.Value{}, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			d := jinja.NewDict()
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return jinja.Value{}, err
				}
				v, err := decodeValue(dec)
				if err != nil {
					return jinja.Value{}, err
				}
				d.AsDict().Set(k.(string), v)
			}
			_, err := dec.Token()
			return d, err
		case '[':
			var items []jinja.Value
			for dec.More() {
				v, err := decodeValue(dec)
				if err != nil {
					return jinja.Value{}, err
				}
				items = append(items, v)
			}
			_, err := dec.Token()
			return jinja.NewList(items), err
		}
	case json.Number:
		return jinja.FromGoValue(t), nil
	case string:
		return jinja.NewString(t), nil
	case bool:
		return jinja.NewBool(t), nil
	case nil:
		return jinja.None(), nil
	}
	return jinja.Value{}, fmt.Errorf("unexpected JSON token %v", tok)
}

// strftime formats t with a C strftime format (the directives chat
// templates use).
func strftime(t time.Time, format string) string {
	var b strings.Builder
	for i := 0; i < len(format); i++ {
		if format[i] != '%' || i+1 == len(format) {
			b.WriteByte(format[i])
			continue
		}
		i++
		switch format[i] {
		case 'Y':
			fmt.Fprintf(&b, "%04d", t.Year())
		case 'y':
			fmt.Fprintf(&b, "%02d", t.Year()%100)
		case 'm':
			fmt.Fprintf(&b, "%02d", int(t.Month()))
		case 'd':
			fmt.Fprintf(&b, "%02d", t.Day())
		case 'e':
			fmt.Fprintf(&b, "%2d", t.Day())
		case 'B':
			b.WriteString(t.Month().String())
		case 'b', 'h':
			b.WriteString(t.Month().String()[:3])
		case 'A':
			b.WriteString(t.Weekday().String())
		case 'a':
			b.WriteString(t.Weekday().String()[:3])
		case 'H':
			fmt.Fprintf(&b, "%02d", t.Hour())
		case 'I':
			fmt.Fprintf(&b, "%02d", (t.Hour()+11)%12+1)
		case 'M':
			fmt.Fprintf(&b, "%02d", t.Minute())
		case 'S':
			fmt.Fprintf(&b, "%02d", t.Second())
		case 'p':
			b.WriteString(map[bool]string{true: "PM", false: "AM"}[t.Hour() >= 12])
		case 'j':
			fmt.Fprintf(&b, "%03d", t.YearDay())
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(format[i])
		}
	}
	return b.String()
}

// renderFallback renders the documented fallback format.
func (c *ChatTemplate) renderFallback(msgs []Message, o RenderOptions) (string, error) {
	if len(o.Tools) > 0 && string(bytes.TrimSpace(o.Tools)) != "null" && string(bytes.TrimSpace(o.Tools)) != "[]" {
		return "", fmt.Errorf("%w: the model has no chat template, so it has no tool format", ErrTemplate)
	}
	var b strings.Builder
	for _, m := range msgs {
		switch m.Role {
		case "system":
			b.WriteString(m.Content + "\n\n")
		case "user":
			b.WriteString("User: " + m.Content + "\n")
		case "assistant":
			b.WriteString("Assistant: " + m.Content + "\n")
		default:
			return "", fmt.Errorf("%w: the fallback format has no %q turns", ErrTemplate, m.Role)
		}
	}
	if o.AddGenerationPrompt {
		b.WriteString("Assistant:")
	}
	return b.String(), nil
}

// EncodePrompt tokenizes a rendered prompt, adding BOS unless the text
// already starts with the BOS token's text (chat templates often do).
func EncodePrompt(m *Model, text string) ([]int32, error) {
	v := m.Tokenizer.Vocabulary()
	addBOS := true
	if len(v.BOS) > 0 && int(v.BOS[0]) < len(v.Values) && strings.HasPrefix(text, v.Values[v.BOS[0]]) {
		addBOS = false
	}
	return m.Tokenizer.Encode(text, addBOS)
}
