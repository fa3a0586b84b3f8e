package serve

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/constrain"
)

// AdapterRef names an adapter and its scale in the "adapters" extension.
type AdapterRef struct {
	Name  string   `json:"name"`
	Scale *float64 `json:"scale,omitempty"`
}

// samplingFields are shared by chat and text completion requests.
type samplingFields struct {
	Model               string             `json:"model"`
	MaxTokens           *int               `json:"max_tokens"`
	MaxCompletionTokens *int               `json:"max_completion_tokens"`
	Temperature         *float64           `json:"temperature"`
	TopP                *float64           `json:"top_p"`
	TopK                *int               `json:"top_k"`
	MinP                *float64           `json:"min_p"`
	N                   *int               `json:"n"`
	Stream              bool               `json:"stream"`
	StreamOptions       *streamOptions     `json:"stream_options"`
	Stop                json.RawMessage    `json:"stop"`
	Seed                *int64             `json:"seed"`
	PresencePenalty     *float64           `json:"presence_penalty"`
	FrequencyPenalty    *float64           `json:"frequency_penalty"`
	RepetitionPenalty   *float64           `json:"repetition_penalty"`
	IgnoreEOS           bool               `json:"ignore_eos"`
	Logprobs            json.RawMessage    `json:"logprobs"`
	TopLogprobs         *int               `json:"top_logprobs"`
	LogitBias           map[string]float64 `json:"logit_bias"`
	ResponseFormat      *responseFormat    `json:"response_format"`
	Adapters            []AdapterRef       `json:"adapters"`
	User                string             `json:"user"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// responseFormat is OpenAI's response_format: text, json_object or
// json_schema (generation constrained to the schema).
type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
		Strict *bool           `json:"strict"`
	} `json:"json_schema"`
}

// CompletionRequest is POST /v1/completions.
type CompletionRequest struct {
	samplingFields
	Prompt json.RawMessage `json:"prompt"`
	Echo   bool            `json:"echo"`
	Suffix *string         `json:"suffix"`
}

// ChatRequest is POST /v1/chat/completions.
type ChatRequest struct {
	samplingFields
	Messages            []chatMessage              `json:"messages"`
	Tools               json.RawMessage            `json:"tools"`
	ToolChoice          json.RawMessage            `json:"tool_choice"`
	ParallelToolCalls   *bool                      `json:"parallel_tool_calls"`
	AddGenerationPrompt *bool                      `json:"add_generation_prompt"`
	ChatTemplateKwargs  map[string]json.RawMessage `json:"chat_template_kwargs"`
}

type chatMessage struct {
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content"`
	Name       string          `json:"name,omitempty"`
	ToolCalls  []chatToolCall  `json:"tool_calls,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
}

type chatToolCall struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// genParams is a validated request, independent of its endpoint.
type genParams struct {
	model        string
	adapters     []AdapterRef
	maxTokens    int // -1: up to the context; 0 only with echo
	n            int
	sampler      llama.SamplerOptions
	stop         []string
	stream       bool
	includeUsage bool
	ignoreEOS    bool
	// logprobs: report each token's log probability and topLogprobs
	// alternatives; echo: completions return the prompt first (with its
	// logprobs when asked).
	logprobs    bool
	topLogprobs int
	echo        bool
	// format constrains the output to JSON (response_format); nil: text.
	format *constrain.Schema
	// exactly one of these
	promptText   string
	promptTokens []int32
	messages     []llama.Message
	// chat only
	render llama.RenderOptions
	tools  *toolRequest
}

// decodeJSON reads one JSON object from r (unknown fields are ignored, as
// OpenAI-compatible servers do, so newer clients keep working).
func decodeJSON(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return err
		}
		if err == io.EOF {
			return errBadRequest("", "request body is empty; send a JSON object")
		}
		return errBadRequest("", "invalid JSON body: %v", err)
	}
	if dec.More() {
		return errBadRequest("", "request body has data after the JSON object")
	}
	// Read to the end (only whitespace is left): that lifts the body's
	// read deadline (see limitBody).
	io.Copy(io.Discard, r)
	return nil
}

func (f *samplingFields) validate(p *genParams) error {
	if strings.TrimSpace(f.Model) == "" {
		return errBadRequest("model", "model is required: the base model's name or an adapter's name (GET /v1/models)")
	}
	p.model = f.Model
	p.stream = f.Stream
	p.ignoreEOS = f.IgnoreEOS
	if f.StreamOptions != nil {
		if !f.Stream {
			return errBadRequest("stream_options", "stream_options requires stream: true")
		}
		p.includeUsage = f.StreamOptions.IncludeUsage
	}
	max := f.MaxTokens
	if f.MaxCompletionTokens != nil {
		max = f.MaxCompletionTokens
	}
	p.maxTokens = -1
	if max != nil {
		if *max < 0 {
			return errBadRequest("max_tokens", "max_tokens must be at least 1 (0 only with echo), got %d", *max)
		}
		p.maxTokens = *max
	}
	s := &p.sampler
	s.Temperature = 1
	if f.Temperature != nil {
		if t := *f.Temperature; t < 0 || t > 2 || math.IsNaN(t) {
			return errBadRequest("temperature", "temperature must be in [0, 2], got %v", t)
		}
		s.Temperature = float32(*f.Temperature)
	}
	if f.TopP != nil {
		if v := *f.TopP; !(v > 0 && v <= 1) {
			return errBadRequest("top_p", "top_p must be in (0, 1], got %v", v)
		}
		s.TopP = float32(*f.TopP)
	}
	if f.TopK != nil {
		if *f.TopK < 0 {
			return errBadRequest("top_k", "top_k must be ≥ 0, got %d", *f.TopK)
		}
		s.TopK = *f.TopK
	}
	if f.MinP != nil {
		if v := *f.MinP; !(v >= 0 && v <= 1) {
			return errBadRequest("min_p", "min_p must be in [0, 1], got %v", v)
		}
		s.MinP = float32(*f.MinP)
	}
	for _, pen := range []struct {
		name string
		v    *float64
		dst  *float32
	}{{"presence_penalty", f.PresencePenalty, &s.PresencePenalty}, {"frequency_penalty", f.FrequencyPenalty, &s.FrequencyPenalty}} {
		if pen.v != nil {
			if v := *pen.v; !(v >= -2 && v <= 2) {
				return errBadRequest(pen.name, "%s must be in [-2, 2], got %v", pen.name, v)
			}
			*pen.dst = float32(*pen.v)
		}
	}
	if f.RepetitionPenalty != nil {
		if v := *f.RepetitionPenalty; !(v > 0 && v <= 10) {
			return errBadRequest("repetition_penalty", "repetition_penalty must be in (0, 10], got %v", v)
		}
		s.RepeatPenalty = float32(*f.RepetitionPenalty)
	}
	if f.Seed != nil {
		// Seed 0 would mean "random" to the sampler; shift user seeds.
		s.Seed = uint64(*f.Seed) + 1
		if s.Seed == 0 {
			s.Seed = 1
		}
	}
	if len(f.LogitBias) > 300 {
		return errBadRequest("logit_bias", "logit_bias may name at most 300 tokens, got %d", len(f.LogitBias))
	}
	for k, v := range f.LogitBias {
		id, err := strconv.ParseInt(k, 10, 32)
		if err != nil || id < 0 {
			return errBadRequest("logit_bias", "logit_bias keys must be token ids, got %q", k)
		}
		if !(v >= -100 && v <= 100) {
			return errBadRequest("logit_bias", "logit_bias values must be in [-100, 100], got %v for token %s", v, k)
		}
		if s.LogitBias == nil {
			s.LogitBias = map[int32]float32{}
		}
		s.LogitBias[int32(id)] = float32(v)
	}
	p.n = 1
	if f.N != nil {
		if *f.N < 1 || *f.N > maxChoices {
			return errBadRequest("n", "n must be in [1, %d], got %d", maxChoices, *f.N)
		}
		p.n = *f.N
	}
	if err := f.ResponseFormat.compile(p); err != nil {
		return err
	}
	stop, err := parseStop(f.Stop)
	if err != nil {
		return err
	}
	p.stop = stop
	if len(f.Adapters) > kernels.MaxCompose {
		return errBadRequest("adapters", "at most %d adapters compose, got %d", kernels.MaxCompose, len(f.Adapters))
	}
	for i, a := range f.Adapters {
		if a.Name == "" {
			return errBadRequest(fmt.Sprintf("adapters[%d].name", i), "adapter name is required")
		}
		if a.Scale != nil && (math.IsNaN(*a.Scale) || math.IsInf(*a.Scale, 0) || math.Abs(*a.Scale) > 100) {
			return errBadRequest(fmt.Sprintf("adapters[%d].scale", i), "adapter scale must be finite and at most 100 in magnitude")
		}
	}
	p.adapters = f.Adapters
	return nil
}

// maxChoices bounds n: choices share the prompt but each holds its own
// KV blocks and a running slot.
const maxChoices = 16

func (f *responseFormat) compile(p *genParams) error {
	if f == nil {
		return nil
	}
	switch f.Type {
	case "", "text":
	case "json_object":
		p.format = constrain.AnyObject()
	case "json_schema":
		if f.JSONSchema == nil || len(bytes.TrimSpace(f.JSONSchema.Schema)) == 0 {
			return errBadRequest("response_format.json_schema.schema", "response_format json_schema needs json_schema.schema")
		}
		schema, err := constrain.Compile(f.JSONSchema.Schema)
		if err != nil {
			return errBadRequest("response_format.json_schema.schema", "%v", err)
		}
		p.format = schema
	default:
		return errBadRequest("response_format.type", "response_format type %q is not supported (text, json_object or json_schema)", f.Type)
	}
	return nil
}

func isNullOrFalse(raw json.RawMessage) bool {
	t := string(bytes.TrimSpace(raw))
	return t == "null" || t == "false"
}

func parseStop(raw json.RawMessage) ([]string, error) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		if one == "" {
			return nil, nil
		}
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, errBadRequest("stop", "stop must be a string or an array of strings")
	}
	if len(many) > 4 {
		return nil, errBadRequest("stop", "at most 4 stop sequences, got %d", len(many))
	}
	var out []string
	for _, s := range many {
		if s != "" {
			out = append(out, s)
		}
	}
	return out, nil
}

func (r *CompletionRequest) params() (*genParams, error) {
	p := &genParams{}
	if err := r.validate(p); err != nil {
		return nil, err
	}
	p.echo = r.Echo
	if t := bytes.TrimSpace(r.Logprobs); len(t) > 0 && string(t) != "null" {
		var k int
		if err := json.Unmarshal(t, &k); err != nil || k < 0 || k > 5 {
			return nil, errBadRequest("logprobs", "logprobs must be an integer in [0, 5] (alternatives per token), got %s", t)
		}
		p.logprobs, p.topLogprobs = true, k
	}
	if r.TopLogprobs != nil {
		return nil, errBadRequest("top_logprobs", "top_logprobs is a chat parameter; completions take logprobs: <count>")
	}
	if p.maxTokens == 0 && !p.echo {
		return nil, errBadRequest("max_tokens", "max_tokens must be at least 1 (0 only with echo)")
	}
	if r.Suffix != nil && *r.Suffix != "" {
		return nil, errBadRequest("suffix", "suffix is not supported")
	}
	raw := bytes.TrimSpace(r.Prompt)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, errBadRequest("prompt", "prompt is required")
	}
	var text string
	if err := json.Unmarshal(raw, &text); err == nil {
		p.promptText = text
		return p, nil
	}
	var texts []string
	if err := json.Unmarshal(raw, &texts); err == nil {
		if len(texts) != 1 {
			return nil, errBadRequest("prompt", "a prompt array must hold exactly one prompt (batch prompts are not supported), got %d", len(texts))
		}
		p.promptText = texts[0]
		return p, nil
	}
	var toks []int32
	if err := json.Unmarshal(raw, &toks); err == nil {
		if len(toks) == 0 {
			return nil, errBadRequest("prompt", "prompt has no tokens")
		}
		p.promptTokens = toks
		return p, nil
	}
	var tokLists [][]int32
	if err := json.Unmarshal(raw, &tokLists); err == nil && len(tokLists) == 1 && len(tokLists[0]) > 0 {
		p.promptTokens = tokLists[0]
		return p, nil
	}
	return nil, errBadRequest("prompt", "prompt must be a string, an array of one string, or an array of token ids")
}

func (r *ChatRequest) params() (*genParams, error) {
	p := &genParams{}
	if err := r.validate(p); err != nil {
		return nil, err
	}
	if p.maxTokens == 0 {
		return nil, errBadRequest("max_tokens", "max_tokens must be at least 1")
	}
	if t := bytes.TrimSpace(r.Logprobs); len(t) > 0 && string(t) != "null" {
		var on bool
		if err := json.Unmarshal(t, &on); err != nil {
			return nil, errBadRequest("logprobs", "logprobs must be a boolean in chat completions, got %s", t)
		}
		p.logprobs = on
	}
	if r.TopLogprobs != nil {
		if *r.TopLogprobs < 0 || *r.TopLogprobs > 20 {
			return nil, errBadRequest("top_logprobs", "top_logprobs must be in [0, 20], got %d", *r.TopLogprobs)
		}
		if !p.logprobs && *r.TopLogprobs > 0 {
			return nil, errBadRequest("top_logprobs", "top_logprobs requires logprobs: true")
		}
		p.topLogprobs = *r.TopLogprobs
	}
	if len(r.Messages) == 0 {
		return nil, errBadRequest("messages", "messages must hold at least one message")
	}
	for i, m := range r.Messages {
		msg, err := m.message(i)
		if err != nil {
			return nil, err
		}
		p.messages = append(p.messages, msg)
	}
	p.render = llama.RenderOptions{AddGenerationPrompt: true, Extra: r.ChatTemplateKwargs}
	if r.AddGenerationPrompt != nil {
		p.render.AddGenerationPrompt = *r.AddGenerationPrompt
	}
	tools, err := parseTools(r.Tools, r.ToolChoice)
	if err != nil {
		return nil, err
	}
	if tools != nil {
		if r.ParallelToolCalls != nil && !*r.ParallelToolCalls {
			tools.single = true
		}
		p.tools = tools
		p.render.Tools = tools.raw
		if tools.forced() && p.format != nil {
			return nil, errBadRequest("tool_choice", "tool_choice %q and response_format both constrain the output; use one", tools.choice)
		}
	}
	return p, nil
}

// message validates one chat message.
func (m chatMessage) message(i int) (llama.Message, error) {
	field := func(name string) string { return fmt.Sprintf("messages[%d].%s", i, name) }
	role := m.Role
	if role == "developer" {
		role = "system"
	}
	content, err := messageText(m.Content)
	if err != nil {
		return llama.Message{}, errBadRequest(field("content"), "%v", err)
	}
	msg := llama.Message{Role: role, Content: content, Name: m.Name}
	switch role {
	case "system", "user":
	case "assistant":
		for j, tc := range m.ToolCalls {
			if tc.Type != "" && tc.Type != "function" {
				return llama.Message{}, errBadRequest(field(fmt.Sprintf("tool_calls[%d].type", j)), "tool call type %q is not supported (function)", tc.Type)
			}
			if tc.Function.Name == "" {
				return llama.Message{}, errBadRequest(field(fmt.Sprintf("tool_calls[%d].function.name", j)), "a tool call needs a function name")
			}
			args := bytes.TrimSpace(tc.Function.Arguments)
			if len(args) > 0 && !json.Valid(args) {
				return llama.Message{}, errBadRequest(field(fmt.Sprintf("tool_calls[%d].function.arguments", j)), "arguments must be JSON (an object or a string holding one)")
			}
			msg.ToolCalls = append(msg.ToolCalls, llama.ToolCall{ID: tc.ID, Name: tc.Function.Name, Arguments: json.RawMessage(args)})
		}
	case "tool":
		msg.ToolCallID = m.ToolCallID
	default:
		return llama.Message{}, errBadRequest(field("role"), "unsupported role %q (want system, developer, user, assistant or tool)", m.Role)
	}
	if role != "assistant" && len(m.ToolCalls) > 0 {
		return llama.Message{}, errBadRequest(field("tool_calls"), "only assistant messages carry tool_calls")
	}
	return msg, nil
}

// messageText accepts a string, null, or an array of text parts.
func messageText(raw json.RawMessage) (string, error) {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || string(t) == "null" {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(t, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string  `json:"type"`
		Text *string `json:"text"`
	}
	if err := json.Unmarshal(t, &parts); err != nil {
		return "", fmt.Errorf("content must be a string or an array of text parts")
	}
	var b strings.Builder
	for _, part := range parts {
		if part.Type != "text" || part.Text == nil {
			return "", fmt.Errorf("content part of type %q is not supported (text only)", part.Type)
		}
		b.WriteString(*part.Text)
	}
	return b.String(), nil
}
