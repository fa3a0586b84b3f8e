package serve

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"path/filepath"

	"github.com/go-chi/chi/v5"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

func urlParam(r *http.Request, name string) string { return chi.URLParam(r, name) }

// adapterJSON describes a registered adapter.
func (s *Server) adapterJSON(e *adapters.Entry, resident bool) map[string]any {
	targets := make([]string, len(e.Targets))
	for i, t := range e.Targets {
		targets[i] = t.String()
	}
	rel, err := filepath.Rel(s.registry.Dir(), e.Path)
	if err != nil {
		rel = filepath.Base(e.Path)
	}
	return map[string]any{"id": e.Name, "object": "adapter", "created": e.Created.Unix(), "parent": s.cfg.ModelName,
		"variant": e.Variant, "rank": e.Rank, "alpha": e.Alpha, "scale": e.Alpha / float32(e.Rank), "targets": targets,
		"bytes": e.Bytes, "path": rel, "resident": resident}
}

func (s *Server) listAdapters(w http.ResponseWriter, r *http.Request) {
	resident := s.sched.residentKeys()
	data := []any{}
	for _, e := range s.registry.List() {
		data = append(data, s.adapterJSON(e, resident[e.Key()]))
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *Server) getAdapter(w http.ResponseWriter, r *http.Request) {
	e, ok := s.registry.Get(urlParam(r, "name"))
	if !ok {
		writeError(w, fmt.Errorf("%w: %q", adapters.ErrNotFound, urlParam(r, "name")))
		return
	}
	writeJSON(w, http.StatusOK, s.adapterJSON(e, s.sched.residentKeys()[e.Key()]))
}

// registerAdapter is POST /v1/adapters. Three forms:
//
//	application/json          {"name": "x", "path": "rel/x.gguf", "replace": false}
//	application/octet-stream  the GGUF itself; ?name=x[&replace=true]
//	multipart/form-data       fields name, replace and file
//
// Uploads are validated in memory, then written atomically to
// <adapter-dir>/<name>.gguf.
func (s *Server) registerAdapter(w http.ResponseWriter, r *http.Request) {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	var name, path string
	var replace bool
	var upload []byte
	if ct == "application/x-www-form-urlencoded" {
		// curl -d sends JSON with this content type unless told otherwise.
		ct = "application/json"
	}
	switch ct {
	case "application/json", "":
		var body struct {
			Name    string `json:"name"`
			Path    string `json:"path"`
			Replace bool   `json:"replace"`
		}
		if err := decodeJSON(r.Body, &body); err != nil {
			writeError(w, err)
			return
		}
		name, path, replace = body.Name, body.Path, body.Replace
		if path == "" {
			writeError(w, errBadRequest("path", "path is required (relative to the adapter directory); or upload the file"))
			return
		}
	case "application/octet-stream":
		name, replace = r.URL.Query().Get("name"), r.URL.Query().Get("replace") == "true"
		data, err := io.ReadAll(r.Body)
		if err != nil {
			writeError(w, err)
			return
		}
		upload = data
	case "multipart/form-data":
		f, _, err := r.FormFile("file")
		if err != nil {
			writeError(w, errBadRequest("file", "multipart upload needs a file field: %v", err))
			return
		}
		defer f.Close()
		data, err := io.ReadAll(f)
		if err != nil {
			writeError(w, err)
			return
		}
		name, replace, upload = r.FormValue("name"), r.FormValue("replace") == "true", data
	default:
		writeError(w, &apiError{Status: http.StatusUnsupportedMediaType, Type: "invalid_request_error",
			Message: fmt.Sprintf("unsupported content type %q: send JSON, application/octet-stream or multipart/form-data", ct)})
		return
	}
	e, err := s.register(name, path, upload, replace)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, s.adapterJSON(e, false))
}

// register binds name to a file in the adapter directory or to an upload.
func (s *Server) register(name, path string, upload []byte, replace bool) (*adapters.Entry, error) {
	if err := s.registry.CheckName(name); err != nil {
		return nil, err
	}
	if upload != nil {
		// Validate before taking the lock: it reads the whole upload.
		if err := validateUpload(upload, s.model.AdapterBase, s.registry); err != nil {
			return nil, err
		}
	}
	s.adminMu.Lock()
	defer s.adminMu.Unlock()
	old, existed := s.registry.Get(name)
	if existed && !replace {
		return nil, fmt.Errorf("%w: %q (pass replace to swap it)", adapters.ErrExists, name)
	}
	if upload != nil {
		// Not a symlink target: the name is validated, so this stays inside.
		path = filepath.Join(s.registry.Dir(), name+".gguf")
		if err := gguf.WriteFileAtomic(path, func(w io.Writer) error {
			_, err := io.Copy(w, bytes.NewReader(upload))
			return err
		}); err != nil {
			return nil, err
		}
	} else {
		real, err := s.registry.Resolve(path)
		if err != nil {
			return nil, err
		}
		path = real
	}
	e, err := s.registry.Register(name, path, replace)
	if err != nil {
		if errors.Is(err, gguf.ErrFormat) {
			return nil, errBadRequest("path", "%v", err)
		}
		return nil, err
	}
	if existed {
		s.sched.drop(old.Key())
	}
	return e, nil
}

func (s *Server) deleteAdapter(w http.ResponseWriter, r *http.Request) {
	e, err := s.unregister(urlParam(r, "name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": e.Name, "object": "adapter", "deleted": true})
}

// unregister removes an adapter. Its file goes too when it is the name's
// own file in the directory (<name>.gguf), so that the removal reaches
// every replica sharing the directory and survives a restart; an adapter
// registered from another path leaves that file alone.
func (s *Server) unregister(name string) (*adapters.Entry, error) {
	s.adminMu.Lock()
	defer s.adminMu.Unlock()
	e, ok := s.registry.Get(name)
	if !ok {
		return nil, fmt.Errorf("%w: %q", adapters.ErrNotFound, name)
	}
	// The file first: otherwise a directory sync in between would see the
	// file without its registration and register it again.
	if e.Path == s.registry.CanonicalPath(e.Name) {
		if err := os.Remove(e.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing %s: %w", filepath.Base(e.Path), err)
		}
	}
	s.registry.RemoveEntry(e)
	s.sched.drop(e.Key())
	return e, nil
}

// vllmLoad is vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"}
// (the path must be relative to the adapter directory).
func (s *Server) vllmLoad(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Name string `json:"lora_name"`
		Path string `json:"lora_path"`
	}
	if err := decodeJSON(r.Body, &body); err != nil {
		writeError(w, err)
		return
	}
	if body.Name == "" || body.Path == "" {
		writeError(w, errBadRequest("lora_name", "lora_name and lora_path are required"))
		return
	}
	if _, err := s.register(body.Name, body.Path, nil, false); err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintf(w, "Success: LoRA adapter '%s' added successfully.", body.Name)
}

func (s *Server) vllmUnload(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Name string `json:"lora_name"`
	}
	if err := decodeJSON(r.Body, &body); err != nil {
		writeError(w, err)
		return
	}
	e, err := s.unregister(body.Name)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintf(w, "Success: LoRA adapter '%s' removed successfully.", e.Name)
}

// validateUpload checks an uploaded adapter file completely (format,
// shapes, indices, values, base, rank) before anything is written.
func validateUpload(data []byte, base *adapters.Base, reg *adapters.Registry) error {
	a, err := adapters.Parse(data)
	if err != nil {
		if errors.Is(err, gguf.ErrFormat) {
			return errBadRequest("file", "%v", err)
		}
		return err
	}
	if err := a.Resolve(base); err != nil {
		return err
	}
	return reg.CheckRank(a)
}
