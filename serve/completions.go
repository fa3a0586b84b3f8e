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

func (s *Server) generate(w http.ResponseWriter, r *http.Request, p *genParams, endpoint string) {
	uses, err := s.resolveAdapters(p)
	if err != nil {
		writeError(w, err)
		return
	}
	prompt := p.promptTokens
	if p.messages != nil {
		text, err := s.chat.Render(p.messages)
		if err != nil {
			writeError(w, errBadRequest("messages", "%v", err))
			return
		}
		if prompt, err = encodePrompt(s, text); err != nil {
			writeError(w, err)
			return
		}
		p.stop = append(p.stop, s.chat.Stop...)
	} else if prompt == nil {
		if prompt, err = s.model.Tokenizer.Encode(p.promptText, true); err != nil {
			writeError(w, err)
			return
		}
	}
	vocab := int32(s.model.Params.VocabSize)
	for _, t := range prompt {
		if t < 0 || t >= vocab {
			writeError(w, errBadRequest("prompt", "token id %d is outside the vocabulary [0, %d)", t, vocab))
			return
		}
	}
	ctxLen := s.engine.Cache.SlotLen
	if len(prompt) >= ctxLen {
		writeError(w, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "messages", Code: "context_length_exceeded",
			Message: fmt.Sprintf("the prompt has %d tokens but the context holds %d (prompt plus completion)", len(prompt), ctxLen)})
		return
	}
	maxTokens := ctxLen - len(prompt)
	if p.maxTokens > 0 {
		maxTokens = min(maxTokens, p.maxTokens)
	}
	req := &request{ctx: r.Context(), label: p.model, endpoint: endpoint, prompt: prompt, adapters: uses,
		maxTokens: maxTokens, sampler: p.sampler, stop: p.stop, ignoreEOS: p.ignoreEOS, arrived: time.Now(), events: make(chan event, maxTokens+2)}
	if err := s.sched.submit(req); err != nil {
		s.metrics.requests.WithLabelValues(p.model, endpoint, "rejected").Inc()
		writeError(w, err)
		return
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
	for ev := range req.events {
		text = append(text, ev.text...)
		if !ev.done {
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

func (s *Server) fingerprint() string {
	return "sbora-" + s.model.AdapterBase.Fingerprint[:12]
}

// stream writes server-sent events in OpenAI's format, ending with
// "data: [DONE]". Errors after the first byte arrive as an error event.
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
	for ev := range req.events {
		if ev.text != "" && !send(chunk(ev.text, nil, false)) {
			return // client gone: the scheduler sees the canceled context
		}
		if !ev.done {
			continue
		}
		if ev.err != nil {
			if r.Context().Err() == nil {
				e := toAPIError(ev.err)
				send(map[string]any{"error": map[string]any{"message": e.Message, "type": e.Type, "param": nil, "code": nil}})
			}
			return
		}
		send(chunk("", ev.finish, false))
		if p.includeUsage {
			send(map[string]any{"id": id, "object": object, "created": created, "model": p.model, "choices": []any{}, "usage": ev.usage})
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
		if flusher != nil {
			flusher.Flush()
		}
		return
	}
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
		"root": s.cfg.ModelName, "parent": nil, "max_model_len": s.engine.Cache.SlotLen}
}

func (s *Server) adapterModel(e *adapters.Entry) map[string]any {
	return map[string]any{"id": e.Name, "object": "model", "created": e.Created.Unix(), "owned_by": "sbora-serve",
		"root": e.Name, "parent": s.cfg.ModelName, "max_model_len": s.engine.Cache.SlotLen}
}
