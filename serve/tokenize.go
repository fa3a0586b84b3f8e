package serve

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
)

// TokenizeRequest is vLLM's POST /tokenize: a prompt, or chat messages
// rendered with the model's template.
type TokenizeRequest struct {
	Model               string                     `json:"model"`
	Prompt              *string                    `json:"prompt"`
	AddSpecialTokens    *bool                      `json:"add_special_tokens"`
	Messages            []chatMessage              `json:"messages"`
	AddGenerationPrompt *bool                      `json:"add_generation_prompt"`
	Tools               json.RawMessage            `json:"tools"`
	ChatTemplateKwargs  map[string]json.RawMessage `json:"chat_template_kwargs"`
}

// tokenize answers {"tokens", "count", "max_model_len"}: exactly the
// tokens a completion or chat request with the same input would prefill.
func (s *Server) tokenize(w http.ResponseWriter, r *http.Request) {
	var req TokenizeRequest
	if err := decodeJSON(r.Body, &req); err != nil {
		writeError(w, err)
		return
	}
	if err := s.checkModel(req.Model); err != nil {
		writeError(w, err)
		return
	}
	var toks []int32
	switch {
	case req.Prompt != nil && req.Messages != nil:
		writeError(w, errBadRequest("messages", "send prompt or messages, not both"))
		return
	case req.Messages != nil:
		if len(req.Messages) == 0 {
			writeError(w, errBadRequest("messages", "messages must hold at least one message"))
			return
		}
		chat := ChatRequest{Messages: req.Messages, Tools: req.Tools, AddGenerationPrompt: req.AddGenerationPrompt,
			ChatTemplateKwargs: req.ChatTemplateKwargs}
		chat.Model = req.Model
		p, err := chat.params()
		if err != nil {
			writeError(w, err)
			return
		}
		if toks, err = s.chatPrompt(p.messages, p.render); err != nil {
			writeError(w, err)
			return
		}
	case req.Prompt != nil:
		if len(*req.Prompt) > s.engine.MaxSeqLen*maxPromptBytesPerToken {
			writeError(w, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: "prompt", Code: "context_length_exceeded",
				Message: "the prompt is longer than the context can hold"})
			return
		}
		add := req.AddSpecialTokens == nil || *req.AddSpecialTokens
		var err error
		if toks, err = s.model.Tokenizer.Encode(*req.Prompt, add); err != nil {
			writeError(w, err)
			return
		}
	default:
		writeError(w, errBadRequest("prompt", "prompt or messages is required"))
		return
	}
	if toks == nil {
		toks = []int32{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"tokens": toks, "count": len(toks), "max_model_len": s.engine.MaxSeqLen})
}

// detokenizeHandler is vLLM's POST /detokenize: {"model", "tokens"} →
// {"prompt"}.
func (s *Server) detokenizeHandler(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model  string          `json:"model"`
		Tokens json.RawMessage `json:"tokens"`
	}
	if err := decodeJSON(r.Body, &req); err != nil {
		writeError(w, err)
		return
	}
	if err := s.checkModel(req.Model); err != nil {
		writeError(w, err)
		return
	}
	var toks []int32
	if t := bytes.TrimSpace(req.Tokens); len(t) == 0 || json.Unmarshal(t, &toks) != nil {
		writeError(w, errBadRequest("tokens", "tokens must be an array of token ids"))
		return
	}
	if len(toks) > s.engine.MaxSeqLen*4 {
		writeError(w, errBadRequest("tokens", "at most %d tokens", s.engine.MaxSeqLen*4))
		return
	}
	if err := s.checkTokens("tokens", toks); err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"prompt": s.detokenize(toks)})
}

// checkModel accepts the base model's name or a registered adapter's.
func (s *Server) checkModel(name string) error {
	if strings.TrimSpace(name) == "" {
		return errBadRequest("model", "model is required: the base model's name or an adapter's name (GET /v1/models)")
	}
	if name == s.cfg.ModelName {
		return nil
	}
	if _, ok := s.registry.Get(name); !ok {
		return errNotFound("model_not_found", "the model %q does not exist", name)
	}
	return nil
}
