package serve

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func newID(prefix string) string {
	var b [12]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// paramsRequest is a decoded request body that validates into genParams.
type paramsRequest interface {
	params() (*genParams, error)
}

// generateHandler decodes a request of type R, validates it and generates.
func generateHandler[R any, P interface {
	*R
	paramsRequest
}](s *Server, endpoint string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		req := P(new(R))
		if err := decodeJSON(r.Body, req); err != nil {
			writeError(w, err)
			return
		}
		p, err := req.params()
		if err != nil {
			writeError(w, err)
			return
		}
		s.generate(w, r, p, endpoint)
	}
}

// resolveAdapters maps the model field and the adapters extension to
// registrations: the base model's name selects no adapter.
func (s *Server) resolveAdapters(p *genParams) ([]adapterUse, error) {
	var uses []adapterUse
	add := func(name string, scale float32, param string) error {
		e, ok := s.registry.Get(name)
		if !ok {
			return errNotFound("model_not_found", "the model %q does not exist: it is neither the base model %q nor a registered adapter", name, s.cfg.ModelName)
		}
		for _, u := range uses {
			if u.entry.Name == name {
				return errBadRequest(param, "adapter %q is listed twice", name)
			}
		}
		uses = append(uses, adapterUse{entry: e, scale: scale})
		return nil
	}
	if p.model != s.cfg.ModelName {
		if err := add(p.model, 1, "model"); err != nil {
			return nil, err
		}
	}
	for i, a := range p.adapters {
		scale := float32(1)
		if a.Scale != nil {
			scale = float32(*a.Scale)
		}
		if err := add(a.Name, scale, fmt.Sprintf("adapters[%d]", i)); err != nil {
			return nil, err
		}
	}
	if len(uses) > 4 {
		return nil, errBadRequest("adapters", "at most 4 adapters compose (model plus adapters), got %d", len(uses))
	}
	if len(uses) > s.cfg.MaxResident {
		return nil, errBadRequest("adapters", "the request needs %d adapters at once but the server keeps at most %d resident", len(uses), s.cfg.MaxResident)
	}
	return uses, nil
}

// maxPromptBytesPerToken bounds prompt text before tokenizing: no
// tokenizer averages that many bytes per token, so longer text cannot fit
// the context and is refused without spending CPU on it.
const maxPromptBytesPerToken = 64

func (s *Server) generate(w http.ResponseWriter, r *http.Request, p *genParams, endpoint string) {
	uses, err := s.resolveAdapters(p)
	if err != nil {
		writeError(w, err)
		return
	}
	ctxLen := s.engine.MaxSeqLen
	tooLong := func(what string, n int) *apiError {
		return &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: what, Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt is %d bytes: more than a %d-token context can hold", n, ctxLen)}
	}
	prompt := p.promptTokens
	switch {
	case p.messages != nil:
		text, err := s.chat.Render(p.messages)
		if err != nil {
			writeError(w, errBadRequest("messages", "%v", err))
			return
		}
		if len(text) > ctxLen*maxPromptBytesPerToken {
			writeError(w, tooLong("messages", len(text)))
			return
		}
		if prompt, err = encodePrompt(s, text); err != nil {
			writeError(w, err)
			return
		}
		p.stop = append(p.stop, s.chat.Stop...)
	case prompt == nil:
		if len(p.promptText) > ctxLen*maxPromptBytesPerToken {
			writeError(w, tooLong("prompt", len(p.promptText)))
			return
		}
		if prompt, err = s.model.Tokenizer.Encode(p.promptText, true); err != nil {
			writeError(w, err)
			return
		}
	}
	vocab := int32(s.model.Params.VocabSize)
	for id := range p.sampler.LogitBias {
		if id >= vocab {
			writeError(w, errBadRequest("logit_bias", "token id %d is outside the vocabulary [0, %d)", id, vocab))
			return
		}
	}
	for _, t := range prompt {
		if t < 0 || t >= vocab {
			writeError(w, errBadRequest("prompt", "token id %d is outside the vocabulary [0, %d)", t, vocab))
			return
		}
	}
	param := "prompt"
	if p.messages != nil {
		param = "messages"
	}
	if len(prompt) >= ctxLen {
		writeError(w, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param, Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt has %d tokens but the context holds %d (prompt plus completion)", len(prompt), ctxLen)})
		return
	}
	maxTokens := ctxLen - len(prompt)
	if p.maxTokens > 0 {
		if len(prompt)+p.maxTokens > ctxLen {
			writeError(w, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "max_tokens", Code: "context_length_exceeded",
				Message: fmt.Sprintf("the prompt has %d tokens and max_tokens is %d, but the context holds %d (prompt plus completion)", len(prompt), p.maxTokens, ctxLen)})
			return
		}
		maxTokens = p.maxTokens
	}
	label := s.metricLabel(p.model)
	req := &request{ctx: r.Context(), label: label, endpoint: endpoint, prompt: prompt, adapters: uses, n: 1,
		maxTokens: maxTokens, sampler: p.sampler, stop: p.stop, stopTokens: s.stopTokens(p.stop), ignoreEOS: p.ignoreEOS,
		arrived: time.Now(), events: make(chan event, eventCapacity(1, maxTokens))}
	if err := s.sched.submit(req); err != nil {
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
	id := newID("cmpl-")
	if endpoint == "chat" {
		id = newID("chatcmpl-")
	}
	created := time.Now().Unix()
	if p.stream {
		s.stream(w, r, req, p, endpoint, id, created)
		return
	}
	var text []byte
	for {
		var ev event
		select {
		case ev = <-req.events:
		case <-r.Context().Done():
			return
		}
		text = append(text, ev.text...)
		if ev.kind != evDone {
			continue
		}
		if ev.err != nil {
			if r.Context().Err() == nil {
				writeError(w, ev.err)
			}
			return
		}
		var choice map[string]any
		if endpoint == "chat" {
			choice = map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": string(text)},
				"logprobs": nil, "finish_reason": ev.finish}
		} else {
			choice = map[string]any{"index": 0, "text": string(text), "logprobs": nil, "finish_reason": ev.finish}
		}
		object := "text_completion"
		if endpoint == "chat" {
			object = "chat.completion"
		}
		writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": p.model,
			"choices": []any{choice}, "usage": ev.usage, "system_fingerprint": s.fingerprint()})
		return
	}
}

// metricLabel is the adapter label of a request's metrics: the model name
// asked for, or only whether it was the base model when adapter names
// stay out of the metrics.
func (s *Server) metricLabel(model string) string {
	if s.cfg.MetricsAdapterNames || model == s.cfg.ModelName {
		return model
	}
	return "adapter"
}

// stopTokens maps stop strings that are the text of a control token
// (<|eot_id|>, <|im_end|>) to that token: control tokens produce no text,
// so only their ids can match.
func (s *Server) stopTokens(stops []string) map[int32]bool {
	var out map[int32]bool
	for _, st := range stops {
		if id, ok := s.specialIDs[st]; ok {
			if out == nil {
				out = map[int32]bool{}
			}
			out[id] = true
		}
	}
	return out
}

func (s *Server) fingerprint() string {
	return "sbora-" + s.model.AdapterBase.Fingerprint[:12]
}

// stream writes server-sent events in OpenAI's format, ending with
// "data: [DONE]". Errors after the first byte arrive as an error event,
// followed by [DONE].
func (s *Server) stream(w http.ResponseWriter, r *http.Request, req *request, p *genParams, endpoint, id string, created int64) {
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Connection", "keep-alive")
	w.WriteHeader(http.StatusOK)
	object := "text_completion"
	if endpoint == "chat" {
		object = "chat.completion.chunk"
	}
	send := func(v any) bool {
		b, _ := json.Marshal(v)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	done := func() {
		fmt.Fprint(w, "data: [DONE]\n\n")
		if flusher != nil {
			flusher.Flush()
		}
	}
	chunk := func(text string, finish any, first bool) map[string]any {
		var choice map[string]any
		if endpoint == "chat" {
			delta := map[string]any{}
			if first {
				delta["role"] = "assistant"
			}
			if text != "" || !first {
				delta["content"] = text
			}
			if finish != nil {
				delta = map[string]any{}
			}
			choice = map[string]any{"index": 0, "delta": delta, "logprobs": nil, "finish_reason": finish}
		} else {
			choice = map[string]any{"index": 0, "text": text, "logprobs": nil, "finish_reason": finish}
		}
		return map[string]any{"id": id, "object": object, "created": created, "model": p.model,
			"system_fingerprint": s.fingerprint(), "choices": []any{choice}}
	}
	if endpoint == "chat" && !send(chunk("", nil, true)) {
		return
	}
	for {
		var ev event
		select {
		case ev = <-req.events:
		case <-r.Context().Done():
			return // client gone: the scheduler reaps the request
		}
		if ev.text != "" && !send(chunk(ev.text, nil, false)) {
			return
		}
		if ev.kind != evDone {
			continue
		}
		if ev.err != nil {
			if r.Context().Err() == nil {
				e := toAPIError(ev.err)
				send(map[string]any{"error": map[string]any{"message": e.Message, "type": e.Type, "param": nil, "code": nilIfEmpty(e.Code)}})
				done()
			}
			return
		}
		send(chunk("", ev.finish, false))
		if p.includeUsage {
			send(map[string]any{"id": id, "object": object, "created": created, "model": p.model, "choices": []any{}, "usage": ev.usage})
		}
		done()
		return
	}
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// listModels is GET /v1/models: the base and every adapter, with parent.
func (s *Server) listModels(w http.ResponseWriter, r *http.Request) {
	data := []any{s.baseModel()}
	for _, e := range s.registry.List() {
		data = append(data, s.adapterModel(e))
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *Server) getModel(w http.ResponseWriter, r *http.Request) {
	name := urlParam(r, "name")
	if name == s.cfg.ModelName {
		writeJSON(w, http.StatusOK, s.baseModel())
		return
	}
	e, ok := s.registry.Get(name)
	if !ok {
		writeError(w, errNotFound("model_not_found", "the model %q does not exist", name))
		return
	}
	writeJSON(w, http.StatusOK, s.adapterModel(e))
}

func (s *Server) baseModel() map[string]any {
	return map[string]any{"id": s.cfg.ModelName, "object": "model", "created": s.started.Unix(), "owned_by": "sbora-serve",
		"root": s.cfg.ModelName, "parent": nil, "max_model_len": s.engine.MaxSeqLen}
}

func (s *Server) adapterModel(e *adapters.Entry) map[string]any {
	return map[string]any{"id": e.Name, "object": "model", "created": e.Created.Unix(), "owned_by": "sbora-serve",
		"root": e.Name, "parent": s.cfg.ModelName, "max_model_len": s.engine.MaxSeqLen}
}
