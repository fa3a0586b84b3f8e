package llama

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ToolFormat is how a model writes tool calls in its output.
type ToolFormat string

const (
	// ToolsNone: the template has no tool support.
	ToolsNone ToolFormat = ""
	// ToolsLlama3: a JSON object {"name": ..., "parameters": {...}}
	// (Llama 3.1, 3.2 and 3.3; "arguments" is accepted too), several
	// separated by ";", optionally after <|python_tag|>.
	ToolsLlama3 ToolFormat = "llama3-json"
	// ToolsHermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
	// (NousResearch Hermes 2 Pro and 3, Qwen).
	ToolsHermes ToolFormat = "hermes"
	// ToolsMistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...].
	ToolsMistral ToolFormat = "mistral"
	// ToolsFunctools: functools[{"name": ..., "arguments": {...}}, ...]
	// (firefunction v2).
	ToolsFunctools ToolFormat = "functools"
)

// detectToolFormat recognizes the tool-call format a template teaches.
func detectToolFormat(src string) ToolFormat {
	switch {
	case strings.Contains(src, "<tool_call>"):
		return ToolsHermes
	case strings.Contains(src, "[TOOL_CALLS]"):
		return ToolsMistral
	case strings.Contains(src, "functools"):
		return ToolsFunctools
	case strings.Contains(src, "tools") && (strings.Contains(src, `"parameters"`) || strings.Contains(src, "<|python_tag|>")):
		return ToolsLlama3
	}
	return ToolsNone
}

// ParsedCall is a tool call found in generated text.
type ParsedCall struct {
	Name      string
	Arguments string // JSON object text
}

// MayStartToolCall reports whether generated text so far could be the
// beginning of a tool call in format f (a stream holds such text back
// until it knows).
func (f ToolFormat) MayStartToolCall(text string) bool {
	t := strings.TrimLeft(text, " \t\r\n")
	if t == "" {
		return true
	}
	for _, p := range f.prefixes() {
		if strings.HasPrefix(t, p) || strings.HasPrefix(p, t) {
			return true
		}
	}
	return false
}

func (f ToolFormat) prefixes() []string {
	switch f {
	case ToolsLlama3:
		return []string{"{", "<|python_tag|>"}
	case ToolsHermes:
		return []string{"<tool_call>"}
	case ToolsMistral:
		return []string{"[TOOL_CALLS]"}
	case ToolsFunctools:
		return []string{"functools"}
	}
	return nil
}

// ParseToolCalls extracts the tool calls of generated text in format f; it
// returns none when the text is not a tool call (then it is content).
func (f ToolFormat) ParseToolCalls(text string) []ParsedCall {
	t := strings.TrimSpace(text)
	switch f {
	case ToolsLlama3:
		t = strings.TrimSpace(strings.TrimPrefix(t, "<|python_tag|>"))
		var calls []ParsedCall
		for _, part := range splitTopLevel(t, ';') {
			c, ok := parseCallObject(part, "parameters", "arguments")
			if !ok {
				return nil
			}
			calls = append(calls, c)
		}
		return calls
	case ToolsHermes:
		var calls []ParsedCall
		rest := t
		for {
			i := strings.Index(rest, "<tool_call>")
			if i < 0 {
				break
			}
			if i == 0 || strings.TrimSpace(rest[:i]) == "" || len(calls) > 0 {
				rest = rest[i+len("<tool_call>"):]
			} else {
				return nil // text before the first call: content
			}
			end := strings.Index(rest, "</tool_call>")
			body := rest
			if end >= 0 {
				body, rest = rest[:end], rest[end+len("</tool_call>"):]
			} else {
				rest = ""
			}
			c, ok := parseCallObject(body, "arguments", "parameters")
			if !ok {
				return nil
			}
			calls = append(calls, c)
		}
		if strings.TrimSpace(rest) != "" {
			return nil
		}
		return calls
	case ToolsMistral, ToolsFunctools:
		prefix := "[TOOL_CALLS]"
		if f == ToolsFunctools {
			prefix = "functools"
		}
		if !strings.HasPrefix(t, prefix) {
			return nil
		}
		var list []json.RawMessage
		if json.Unmarshal([]byte(strings.TrimSpace(t[len(prefix):])), &list) != nil {
			return nil
		}
		var calls []ParsedCall
		for _, item := range list {
			c, ok := parseCallObject(string(item), "arguments", "parameters")
			if !ok {
				return nil
			}
			calls = append(calls, c)
		}
		return calls
	}
	return nil
}

// parseCallObject reads {"name": ..., <args key>: {...}}.
func parseCallObject(s string, keys ...string) (ParsedCall, bool) {
	var obj map[string]json.RawMessage
	if json.Unmarshal([]byte(strings.TrimSpace(s)), &obj) != nil {
		return ParsedCall{}, false
	}
	var name string
	if json.Unmarshal(obj["name"], &name) != nil || name == "" {
		return ParsedCall{}, false
	}
	args := json.RawMessage("{}")
	for _, k := range keys {
		if a, ok := obj[k]; ok {
			args = a
			break
		}
	}
	// Arguments as a JSON string holding an object: unwrap.
	var inner string
	if json.Unmarshal(args, &inner) == nil && json.Valid([]byte(inner)) {
		args = json.RawMessage(inner)
	}
	var compact bytes.Buffer
	if json.Compact(&compact, args) != nil {
		return ParsedCall{}, false
	}
	return ParsedCall{Name: name, Arguments: compact.String()}, true
}

// splitTopLevel splits s at sep outside JSON strings and brackets.
func splitTopLevel(s string, sep byte) []string {
	var parts []string
	depth, inString, escaped, start := 0, false, false, 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			depth--
		case c == sep && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	parts = append(parts, s[start:])
	var out []string
	for _, p := range parts {
		if strings.TrimSpace(p) != "" {
			out = append(out, p)
		}
	}
	return out
}

// ToolSpec is a tool a request offers: its name and its parameters' JSON
// schema (nil: any object).
type ToolSpec struct {
	Name       string
	Parameters json.RawMessage
}

// CallGrammar describes one tool call in format f as text around a JSON
// value and the value's schema, for constrained generation (tool_choice
// required or named): the value is an object naming one of tools with
// arguments that match its parameters.
func (f ToolFormat) CallGrammar(tools []ToolSpec) (prefix, suffix string, schema json.RawMessage, err error) {
	argsKey := "arguments"
	switch f {
	case ToolsLlama3:
		argsKey = "parameters"
	case ToolsHermes:
		prefix, suffix = "<tool_call>\n", "\n</tool_call>"
	case ToolsFunctools:
		prefix, suffix = "functools[", "]"
	case ToolsMistral:
		return "", "", nil, errors.New("forced tool calls are not supported for Mistral's format ([TOOL_CALLS] is a control token)")
	default:
		return "", "", nil, errors.New("the model's chat template has no tool-call format")
	}
	var b strings.Builder
	b.WriteString(`{"anyOf":[`)
	for i, t := range tools {
		if i > 0 {
			b.WriteByte(',')
		}
		name, _ := json.Marshal(t.Name)
		params := t.Parameters
		if len(params) == 0 {
			params = json.RawMessage(`{"type":"object"}`)
		}
		fmt.Fprintf(&b, `{"type":"object","properties":{"name":{"const":%s},"%s":%s},"required":["name","%s"]}`, name, argsKey, params, argsKey)
	}
	b.WriteString(`]}`)
	return prefix, suffix, json.RawMessage(b.String()), nil
}
