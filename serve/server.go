package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/llama"
)

// Config configures a Server.
type Config struct {
	ModelPath string
	// ModelName is the base model's id in the API (default: file name
	// without extension).
	ModelName  string
	AdapterDir string
	// MaxResident adapters live in engine memory (LRU beyond that).
	MaxResident int
	// MaxRank is the largest adapter rank accepted.
	MaxRank int
	// Parallel is the number of sequences decoded together (KV slots).
	Parallel int
	// ContextLength per sequence (prompt + completion).
	ContextLength int
	// PrefillBudget bounds prompt tokens per engine step.
	PrefillBudget int
	MaxQueue      int
	Threads       int
	// CacheF32 stores keys and values in F32 (default F16).
	CacheF32 bool
	APIKey   string
	AdminKey string
	// MaxBodyBytes limits request bodies (adapter uploads included).
	MaxBodyBytes int64
}

func (c *Config) defaults() {
	if c.ModelName == "" {
		c.ModelName = strings.TrimSuffix(filepath.Base(c.ModelPath), filepath.Ext(c.ModelPath))
	}
	if c.MaxResident <= 0 {
		c.MaxResident = 16
	}
	if c.MaxRank <= 0 {
		c.MaxRank = 64
	}
	if c.Parallel <= 0 {
		c.Parallel = 16
	}
	if c.PrefillBudget <= 0 {
		c.PrefillBudget = 512
	}
	if c.MaxQueue <= 0 {
		c.MaxQueue = 256
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 512 << 20
	}
}

// Server is a running model with its adapters and HTTP API.
type Server struct {
	cfg      Config
	model    *llama.Model
	engine   *llama.Engine
	registry *adapters.Registry
	sched    *scheduler
	metrics  *metrics
	chat     *llama.ChatTemplate
	handler  http.Handler
	cancel   context.CancelFunc
	started  time.Time
}

// New loads the model, registers every adapter file in the adapter
// directory and starts the scheduler.
func New(cfg Config) (*Server, error) {
	cfg.defaults()
	if cfg.AdapterDir == "" {
		return nil, errors.New("an adapter directory is required")
	}
	m, err := llama.Load(cfg.ModelPath, llama.LoadOptions{Threads: cfg.Threads})
	if err != nil {
		return nil, err
	}
	if cfg.ContextLength <= 0 {
		cfg.ContextLength = min(m.Params.ContextLength, 4096)
	}
	chat, err := llama.NewChatTemplate(m.Backend().Config())
	if err != nil {
		m.Close()
		return nil, err
	}
	reg, err := adapters.NewRegistry(cfg.AdapterDir, m.AdapterBase, cfg.ModelName)
	if err != nil {
		m.Close()
		return nil, err
	}
	for _, r := range reg.Scan() {
		if r.Err != nil {
			slog.Warn("skipping adapter file", "path", r.Path, "error", r.Err)
		}
	}
	e, err := llama.NewEngine(m, llama.EngineOptions{Slots: cfg.Parallel, SlotLen: cfg.ContextLength, CacheF32: cfg.CacheF32,
		AdapterSlots: cfg.MaxResident, MaxRank: cfg.MaxRank})
	if err != nil {
		m.Close()
		return nil, err
	}
	met := newMetrics()
	sched, err := newScheduler(schedulerConfig{MaxQueue: cfg.MaxQueue, PrefillBudget: cfg.PrefillBudget}, e, reg, cfg.MaxResident, met)
	if err != nil {
		e.Close()
		m.Close()
		return nil, err
	}
	s := &Server{cfg: cfg, model: m, engine: e, registry: reg, sched: sched, metrics: met, chat: chat, started: time.Now()}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go sched.run(ctx)
	s.handler = s.routes()
	return s, nil
}

// Handler is the server's HTTP API.
func (s *Server) Handler() http.Handler { return s.handler }

// Config returns the effective configuration.
func (s *Server) Config() Config { return s.cfg }

// ChatTemplate names the chat format in use.
func (s *Server) ChatTemplate() string { return s.chat.Name }

// Registry is the adapter registry.
func (s *Server) Registry() *adapters.Registry { return s.registry }

// Close stops the scheduler (failing requests in flight) and frees the model.
func (s *Server) Close() {
	s.cancel()
	<-s.sched.stopped
	s.engine.Close()
	s.model.Close()
}

func (s *Server) routes() http.Handler {
	r := chi.NewRouter()
	r.Use(middleware.Recoverer)
	r.Use(s.limitBody)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errNotFound("not_found", "no route for %s %s", r.Method, r.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: "invalid_request_error",
			Message: fmt.Sprintf("method %s is not allowed on %s", r.Method, r.URL.Path)})
	})
	r.Get("/health", s.health)
	r.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	r.Group(func(r chi.Router) {
		r.Use(s.auth(false))
		r.Post("/v1/chat/completions", generateHandler[ChatRequest](s, "chat"))
		r.Post("/v1/completions", generateHandler[CompletionRequest](s, "completions"))
		r.Get("/v1/models", s.listModels)
		r.Get("/v1/models/{name}", s.getModel)
		r.Get("/v1/adapters", s.listAdapters)
		r.Get("/v1/adapters/{name}", s.getAdapter)
	})
	r.Group(func(r chi.Router) {
		r.Use(s.auth(true))
		r.Post("/v1/adapters", s.registerAdapter)
		r.Delete("/v1/adapters/{name}", s.deleteAdapter)
		r.Post("/v1/load_lora_adapter", s.vllmLoad)
		r.Post("/v1/unload_lora_adapter", s.vllmUnload)
	})
	return r
}

func (s *Server) limitBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		next.ServeHTTP(w, r)
	})
}

// auth checks the Bearer key: the API key for inference, the admin key
// (or, without one, the API key) for adapter changes.
func (s *Server) auth(admin bool) func(http.Handler) http.Handler {
	key := s.cfg.APIKey
	if admin && s.cfg.AdminKey != "" {
		key = s.cfg.AdminKey
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if key != "" {
				got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
				if !ok || !constantTimeEqual(got, key) {
					what := "API key"
					if admin {
						what = "admin key"
					}
					writeError(w, &apiError{Status: http.StatusUnauthorized, Type: "authentication_error", Code: "invalid_api_key",
						Message: "missing or invalid " + what + ": send Authorization: Bearer <key>"})
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	}
}

func constantTimeEqual(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	var v byte
	for i := 0; i < len(a); i++ {
		v |= a[i] ^ b[i]
	}
	return v == 0
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "model": s.cfg.ModelName,
		"adapters": s.registry.Len(), "uptime_seconds": int(time.Since(s.started).Seconds())})
}
