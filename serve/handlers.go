package serve

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/sbora-serve/sbora-serve/adapters"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // text as the model wrote it, as OpenAI sends it
	enc.Encode(v)
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
// registrations: the base model's name selects no adapter. Each is held
// (its file version pinned) until releaseUses.
func (s *Server) resolveAdapters(p *genParams) (uses []adapterUse, err error) {
	defer func() {
		if err != nil {
			releaseUses(uses)
			uses = nil
		}
	}()
	add := func(name string, scale float32, param string) error {
		e, ok := s.registry.Get(name)
		if !ok || !e.Acquire() { // removed meanwhile: as if never there
			return errNotFound("model_not_found", "the model %q does not exist: it is neither the base model %q nor a registered adapter", name, s.cfg.ModelName)
		}
		for _, u := range uses {
			if u.entry.Name == name {
				e.Release()
				return errBadRequest(param, "adapter %q is listed twice", name)
			}
		}
		uses = append(uses, adapterUse{entry: e, scale: scale})
		return nil
	}
	if p.model != s.cfg.ModelName {
		if err := add(p.model, 1, "model"); err != nil {
			return uses, err
		}
	}
	for i, a := range p.adapters {
		scale := float32(1)
		if a.Scale != nil {
			scale = float32(*a.Scale)
		}
		if err := add(a.Name, scale, fmt.Sprintf("adapters[%d]", i)); err != nil {
			return uses, err
		}
	}
	if len(uses) > 4 {
		return uses, errBadRequest("adapters", "at most 4 adapters compose (model plus adapters), got %d", len(uses))
	}
	if len(uses) > s.cfg.MaxResident {
		return uses, errBadRequest("adapters", "the request needs %d adapters at once but the server keeps at most %d resident", len(uses), s.cfg.MaxResident)
	}
	return uses, nil
}

// releaseUses drops a request's holds on its registrations.
func releaseUses(uses []adapterUse) {
	for _, u := range uses {
		u.entry.Release()
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
