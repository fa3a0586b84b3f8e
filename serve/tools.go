package serve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"

	"github.com/sbora-serve/sbora-serve/llama"
)

// toolRequest is a chat request's tools and tool_choice, validated.
type toolRequest struct {
	raw    json.RawMessage // the tools array as sent: the template renders it
	specs  []llama.ToolSpec
	choice string // auto, none, required, or function (the one named)
	name   string // tool_choice's function
	single bool   // parallel_tool_calls: false
}

// forced reports whether the output must be a tool call.
func (t *toolRequest) forced() bool { return t.choice == "required" || t.choice == "function" }

// toolName is OpenAI's rule for function names.
var toolName = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,64}$`)

// parseTools validates tools and tool_choice; nil when no tools are given.
func parseTools(raw, choiceRaw json.RawMessage) (*toolRequest, error) {
	raw = bytes.TrimSpace(raw)
	choice, name, err := parseToolChoice(choiceRaw)
	if err != nil {
		return nil, err
	}
	if len(raw) == 0 || string(raw) == "null" || string(raw) == "[]" {
		if choice == "required" || choice == "function" {
			return nil, errBadRequest("tool_choice", "tool_choice %q needs tools", choice)
		}
		return nil, nil
	}
	var list []struct {
		Type     string `json:"type"`
		Function *struct {
			Name        string          `json:"name"`
			Description string          `json:"description"`
			Parameters  json.RawMessage `json:"parameters"`
		} `json:"function"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, errBadRequest("tools", "tools must be an array of {\"type\": \"function\", \"function\": {...}}: %v", err)
	}
	if len(list) > 128 {
		return nil, errBadRequest("tools", "at most 128 tools, got %d", len(list))
	}
	t := &toolRequest{raw: raw, choice: choice, name: name}
	for i, item := range list {
		if item.Type != "function" {
			return nil, errBadRequest(fmt.Sprintf("tools[%d].type", i), "tool type %q is not supported (function)", item.Type)
		}
		if item.Function == nil || !toolName.MatchString(item.Function.Name) {
			return nil, errBadRequest(fmt.Sprintf("tools[%d].function.name", i), "a function needs a name of 1-64 letters, digits, _ . or -")
		}
		params := bytes.TrimSpace(item.Function.Parameters)
		if len(params) > 0 && string(params) != "null" {
			var obj map[string]json.RawMessage
			if json.Unmarshal(params, &obj) != nil {
				return nil, errBadRequest(fmt.Sprintf("tools[%d].function.parameters", i), "parameters must be a JSON schema object")
			}
		} else {
			params = nil
		}
		t.specs = append(t.specs, llama.ToolSpec{Name: item.Function.Name, Parameters: json.RawMessage(params)})
	}
	if choice == "function" && !t.has(name) {
		return nil, errBadRequest("tool_choice", "tool_choice names %q, which is not among the tools", name)
	}
	return t, nil
}

func (t *toolRequest) has(name string) bool {
	for _, s := range t.specs {
		if s.Name == name {
			return true
		}
	}
	return false
}

func parseToolChoice(raw json.RawMessage) (choice, name string, err error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "auto", "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "auto", "none", "required":
			return s, "", nil
		}
		return "", "", errBadRequest("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}, got %q", s)
	}
	var named struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if json.Unmarshal(raw, &named) != nil || named.Type != "function" || named.Function.Name == "" {
		return "", "", errBadRequest("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
	}
	return "function", named.Function.Name, nil
}

// constraint is the grammar a forced tool call follows in the template's
// format: one call to one of the allowed tools, its arguments matching the
// tool's parameter schema.
func (t *toolRequest) constraint(f llama.ToolFormat) (*callConstraint, error) {
	specs := t.specs
	if t.choice == "function" {
		for _, s := range t.specs {
			if s.Name == t.name {
				specs = []llama.ToolSpec{s}
			}
		}
	}
	prefix, suffix, schema, err := f.CallGrammar(specs)
	if err != nil {
		return nil, errBadRequest("tool_choice", "tool_choice %q: %v", t.choice, err)
	}
	return &callConstraint{prefix: prefix, suffix: suffix, schema: schema}, nil
}

type callConstraint struct {
	prefix, suffix string
	schema         json.RawMessage
}
