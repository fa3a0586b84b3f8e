package serve

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/constrain"
)

// maxPromptBytesPerToken bounds prompt text before tokenizing: no
// tokenizer averages that many bytes per token, so longer text cannot fit
// the context and is refused without spending CPU on it.
const maxPromptBytesPerToken = 64

// prepared is a request ready for the scheduler, with what its response
// needs besides the generated text.
type prepared struct {
	prompt   []int32
	echoText string // completions with echo: the prompt as text
	grammar  *constrain.Matcher
	tools    *toolRequest // parse tool calls out of the output
}

// prepare renders and tokenizes the prompt and checks it against the
// context and the vocabulary.
func (s *Server) prepare(p *genParams) (*prepared, error) {
	ctxLen := s.engine.MaxSeqLen
	tooLong := func(what string, n int) *apiError {
		return &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: what, Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt is %d bytes: more than a %d-token context can hold", n, ctxLen)}
	}
	out := &prepared{prompt: p.promptTokens}
	var err error
	param := "prompt"
	switch {
	case p.messages != nil:
		param = "messages"
		if p.tools != nil && p.tools.choice != "none" {
			if s.chat.Tools == llama.ToolsNone {
				return nil, errBadRequest("tools", "the model's chat template has no tool-call format, so tool calls could not be read from its output (tool_choice \"none\" renders the tools anyway)")
			}
			out.tools = p.tools
		}
		if out.prompt, err = s.chatPrompt(p.messages, p.render); err != nil {
			return nil, err
		}
		p.stop = append(p.stop, s.chat.Stop...)
	case out.prompt == nil:
		if len(p.promptText) > ctxLen*maxPromptBytesPerToken {
			return nil, tooLong("prompt", len(p.promptText))
		}
		if out.prompt, err = s.model.Tokenizer.Encode(p.promptText, true); err != nil {
			return nil, err
		}
		out.echoText = p.promptText
	default:
		if err := s.checkTokens("prompt", out.prompt); err != nil {
			return nil, err
		}
		out.echoText = s.detokenize(out.prompt)
	}
	vocab := int32(s.model.Params.VocabSize)
	for id := range p.sampler.LogitBias {
		if id >= vocab {
			return nil, errBadRequest("logit_bias", "token id %d is outside the vocabulary [0, %d)", id, vocab)
		}
	}
	if len(out.prompt) == 0 {
		return nil, errBadRequest(param, "the prompt has no tokens")
	}
	if len(out.prompt) >= ctxLen {
		return nil, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param, Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt has %d tokens but the context holds %d (prompt plus completion)", len(out.prompt), ctxLen)}
	}
	if p.maxTokens > 0 && len(out.prompt)+p.maxTokens > ctxLen {
		return nil, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "max_tokens", Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt has %d tokens and max_tokens is %d, but the context holds %d (prompt plus completion)", len(out.prompt), p.maxTokens, ctxLen)}
	}
	if p.format != nil {
		out.grammar = constrain.NewMatcher(p.format, "", "")
	} else if out.tools != nil && out.tools.forced() {
		c, err := out.tools.constraint(s.chat.Tools)
		if err != nil {
			return nil, err
		}
		schema, err := constrain.Compile(c.schema)
		if err != nil {
			return nil, errBadRequest("tools", "tool_choice %q needs every tool's parameters to be a supported schema: %v", out.tools.choice, err)
		}
		out.grammar = constrain.NewMatcher(schema, c.prefix, c.suffix)
	}
	return out, nil
}

// chatPrompt renders messages with the model's template and tokenizes
// the result as transformers does (no BOS added: the template writes it),
// or with BOS for the fallback format.
func (s *Server) chatPrompt(msgs []llama.Message, o llama.RenderOptions) ([]int32, error) {
	text, err := s.chat.Render(msgs, o)
	if err != nil {
		if errors.Is(err, llama.ErrTemplate) {
			return nil, errBadRequest("messages", "%v", err)
		}
		return nil, err
	}
	if len(text) > s.engine.MaxSeqLen*maxPromptBytesPerToken {
		return nil, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "messages", Code: "context_length_exceeded",
			Message: fmt.Sprintf("the rendered prompt is %d bytes: more than a %d-token context can hold", len(text), s.engine.MaxSeqLen)}
	}
	if s.chat.Name == "jinja" {
		return s.model.Tokenizer.Encode(text, false)
	}
	return llama.EncodePrompt(s.model, text)
}

func (s *Server) checkTokens(param string, toks []int32) error {
	vocab := int32(s.model.Params.VocabSize)
	for _, t := range toks {
		if t < 0 || t >= vocab {
			return errBadRequest(param, "token id %d is outside the vocabulary [0, %d)", t, vocab)
		}
	}
	return nil
}

// detokenize is the text of tokens (control tokens print nothing).
func (s *Server) detokenize(toks []int32) string {
	ts := llama.NewTextStream(s.model.Tokenizer)
	var out []byte
	for _, t := range toks {
		out = append(out, ts.Add(t)...)
	}
	return string(append(out, ts.Flush()...))
}

func (s *Server) generate(w http.ResponseWriter, r *http.Request, p *genParams, endpoint string) {
	uses, err := s.resolveAdapters(p)
	if err != nil {
		writeError(w, err)
		return
	}
	prep, err := s.prepare(p)
	if err != nil {
		releaseUses(uses)
		writeError(w, err)
		return
	}
	maxTokens := s.engine.MaxSeqLen - len(prep.prompt)
	if p.maxTokens >= 0 {
		maxTokens = p.maxTokens
	}
	label := s.metricLabel(p.model)
	req := &request{ctx: r.Context(), label: label, endpoint: endpoint, prompt: prep.prompt, adapters: uses, n: p.n,
		maxTokens: maxTokens, sampler: p.sampler, stop: p.stop, stopTokens: s.stopTokens(p.stop), ignoreEOS: p.ignoreEOS,
		logprobs: -1, arrived: time.Now(), events: make(chan event, eventCapacity(p.n, maxTokens))}
	if p.logprobs {
		req.logprobs = p.topLogprobs
		req.promptLogprobs = p.echo
	}
	if prep.grammar != nil {
		req.grammar, req.vocab, req.pieces, req.eos = prep.grammar, s.grammarVocab(), s.pieces, s.eos
	}
	// From here the scheduler releases the adapters when the request ends.
	if err := s.sched.submit(req); err != nil {
		releaseUses(uses)
		s.metrics.requests.WithLabelValues(label, endpoint, "rejected").Inc()
		writeError(w, err)
		return
	}
	// Nothing is written until the request is admitted (its adapters are
	// resident and it holds KV blocks): errors before that get their own
	// HTTP status, streaming or not.
	select {
	case ev := <-req.events:
		if ev.kind == evDone {
			if ev.err != nil && r.Context().Err() == nil {
				writeError(w, ev.err)
			}
			return
		}
	case <-r.Context().Done():
		return // the scheduler reaps the request
	}
	out := &response{s: s, p: p, prep: prep, req: req, endpoint: endpoint, id: newID("cmpl-"), created: time.Now().Unix()}
	if endpoint == "chat" {
		out.id = newID("chatcmpl-")
	}
	if p.stream {
		out.stream(w, r)
		return
	}
	out.collect(w, r)
}
