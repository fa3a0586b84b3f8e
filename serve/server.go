package serve

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/tokenizer"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/constrain"
)

// Config configures a Server. Sizes left at zero are chosen by the memory
// plan (llama.Plan); set ones are honoured, or New fails naming them.
type Config struct {
	ModelPath string
	// ModelName is the base model's id in the API (default: file name
	// without extension).
	ModelName  string
	AdapterDir string
	// MaxResident is the adapter bank's size in LoRA-sized slots (an FA
	// or FB adapter takes half of one); LRU eviction beyond.
	MaxResident int
	// MaxRank is the largest adapter rank accepted.
	MaxRank int
	// Parallel is the most sequences running at once.
	Parallel int
	// ContextLength is the longest sequence (prompt + completion).
	ContextLength int
	// KVTokens is the KV pool's size in tokens, shared by all sequences.
	KVTokens int
	// MemoryFraction of the available memory the plan may use (default 0.8).
	MemoryFraction float64
	// PrefillBudget bounds prompt tokens per engine step.
	PrefillBudget int
	MaxQueue      int
	Threads       int
	// CacheF32 stores keys and values in F32 (default F16).
	CacheF32 bool
	// NoPrefixCache turns prefix caching off.
	NoPrefixCache bool
	// NoRepack keeps CPU weights in their file layout (ggml-cpu's repacked
	// layouts are faster; llama.cpp repacks by default too).
	NoRepack bool
	// BankType stores adapter matrices: f16 (default), f32 or q8_0.
	BankType string
	// MaxLoading bounds adapter loads in flight (default 2).
	MaxLoading int
	APIKey     string
	// AdminKey guards adapter changes. Without one the admin API answers
	// only clients on the loopback interface.
	AdminKey string
	// MetricsAuth requires the API key for /metrics.
	MetricsAuth bool
	// MetricsAdapterNames labels metrics with adapter names (tenant names,
	// so off by default: series then say "base" or "adapter").
	MetricsAdapterNames bool
	// MaxRequestBytes limits inference request bodies; MaxUploadBytes
	// adapter uploads.
	MaxRequestBytes int64
	MaxUploadBytes  int64
	// BodyTimeout is how long a client may take to send an inference
	// request body (uploads get ten times as long).
	BodyTimeout time.Duration
	// GPULayers is how many transformer layers (and their KV cache and
	// bank slots) run on the GPU, counted from the last; llama.AllLayers
	// for every layer and the output head. 0 keeps everything on the CPU.
	// Without a GPU the server runs on the CPU and says so in its log.
	GPULayers int
	// AdapterRescan is how often the adapter directory is rescanned for
	// files other replicas or operators added, replaced or removed (file
	// events trigger a scan sooner); negative turns following it off.
	AdapterRescan time.Duration
}

func (c *Config) defaults() {
	if c.ModelName == "" {
		c.ModelName = strings.TrimSuffix(filepath.Base(c.ModelPath), filepath.Ext(c.ModelPath))
	}
	if c.MemoryFraction <= 0 {
		c.MemoryFraction = 0.8
	}
	if c.PrefillBudget <= 0 {
		c.PrefillBudget = 512
	}
	if c.MaxQueue <= 0 {
		c.MaxQueue = 256
	}
	if c.MaxLoading <= 0 {
		c.MaxLoading = 2
	}
	if c.MaxRequestBytes <= 0 {
		c.MaxRequestBytes = 8 << 20
	}
	if c.MaxUploadBytes <= 0 {
		c.MaxUploadBytes = 512 << 20
	}
	if c.BodyTimeout <= 0 {
		c.BodyTimeout = 30 * time.Second
	}
	if c.AdapterRescan == 0 {
		c.AdapterRescan = 2 * time.Second
	}
}

func parseBankType(s string) (ml.DType, error) {
	switch strings.ToLower(s) {
	case "", "f16":
		return ml.DTypeF16, nil
	case "f32":
		return ml.DTypeF32, nil
	case "q8_0", "q8":
		return ml.DTypeQ80, nil
	}
	return 0, fmt.Errorf("--bank-type %q: want f16, f32 or q8_0", s)
}

// PlanMemory is the memory plan New uses for cfg when avail bytes are
// available (source says where that figure comes from): what the server
// will hold, for sizing its container.
func PlanMemory(cfg Config, avail int64, source string) (*llama.MemoryPlan, error) {
	cfg.defaults()
	bankType, err := parseBankType(cfg.BankType)
	if err != nil {
		return nil, err
	}
	info, err := llama.ReadInfo(cfg.ModelPath)
	if err != nil {
		return nil, err
	}
	return llama.Plan(info, llama.PlanRequest{
		Budget: int64(cfg.MemoryFraction * float64(avail)), BudgetSource: fmt.Sprintf("%.0f%% of %s", 100*cfg.MemoryFraction, source),
		MaxSeqLen: cfg.ContextLength, Parallel: cfg.Parallel, KVTokens: cfg.KVTokens, MaxResident: cfg.MaxResident,
		MaxRank: cfg.MaxRank, PrefillBudget: cfg.PrefillBudget, CacheF32: cfg.CacheF32, BankType: bankType})
}

// Server is a running model with its adapters and HTTP API.
type Server struct {
	cfg      Config
	plan     *llama.MemoryPlan
	model    *llama.Model
	engine   *llama.Engine
	registry *adapters.Registry
	sched    *scheduler
	metrics  *metrics
	chat     *llama.ChatTemplate
	// specialIDs maps the text of every control token to its id.
	specialIDs map[string]int32
	// pieces are the tokens' texts (nil for control tokens); eos ends a
	// constrained output; grammar is their trie, built on first use.
	pieces      [][]byte
	eos         int32
	grammarOnce sync.Once
	grammar     *constrain.Vocab
	// adminMu orders registry changes (admin API, directory sync) so that
	// each replaced generation is dropped exactly once.
	adminMu sync.Mutex
	handler http.Handler
	cancel  context.CancelFunc
	started time.Time
}

// New plans memory, loads the model, registers every adapter file in the
// adapter directory and starts the scheduler.
func New(cfg Config) (*Server, error) {
	cfg.defaults()
	if cfg.AdapterDir == "" {
		return nil, errors.New("an adapter directory is required")
	}
	avail, source, err := llama.AvailableMemory()
	if err != nil {
		return nil, err
	}
	if cfg.GPULayers == llama.AllLayers {
		// The weights, KV pool and bank all live in GPU memory: plan
		// against it.
		if gpus := ggmlx.GPUs(); len(gpus) > 0 {
			g := gpus[0]
			avail, source = int64(g.FreeMemory), fmt.Sprintf("%.1f GiB free on %s", float64(g.FreeMemory)/(1<<30), g.Description)
		}
	}
	plan, err := PlanMemory(cfg, avail, source)
	if err != nil {
		return nil, err
	}
	cfg.ContextLength, cfg.Parallel, cfg.KVTokens = plan.MaxSeqLen, plan.Parallel, plan.KVTokens
	cfg.MaxResident, cfg.MaxRank = plan.MaxResident, plan.MaxRank
	lo := llama.ServingOptions(cfg.Threads)
	lo.Repack = !cfg.NoRepack
	lo.GPULayers = cfg.GPULayers
	m, err := llama.Load(cfg.ModelPath, lo)
	if err != nil {
		return nil, err
	}
	chat, err := llama.NewChatTemplate(m.Backend().Config())
	if err != nil {
		m.Close()
		return nil, err
	}
	reg, err := adapters.NewRegistry(cfg.AdapterDir, m.AdapterBase, adapters.RegistryOptions{Reserved: []string{cfg.ModelName}, MaxRank: cfg.MaxRank})
	if err != nil {
		m.Close()
		return nil, err
	}
	for _, r := range reg.Scan() {
		if r.Err != nil {
			slog.Warn("skipping adapter file", "path", r.Path, "error", r.Err)
		}
	}
	opts := plan.EngineOptions()
	opts.NoPrefixCache = cfg.NoPrefixCache
	opts.HugePages = true
	e, err := llama.NewEngine(m, opts)
	if err != nil {
		m.Close()
		return nil, err
	}
	if plan.ComputeReserved, err = e.ReserveCompute(cfg.Parallel, cfg.PrefillBudget); err != nil {
		e.Close()
		m.Close()
		return nil, err
	}
	met := newMetrics()
	sched := newScheduler(schedulerConfig{MaxQueue: cfg.MaxQueue, Parallel: cfg.Parallel, PrefillBudget: cfg.PrefillBudget,
		MaxLoading: cfg.MaxLoading, AgingLimit: 2 * time.Second, NoPrefixCache: cfg.NoPrefixCache}, e, reg, met)
	s := &Server{cfg: cfg, plan: plan, model: m, engine: e, registry: reg, sched: sched, metrics: met, chat: chat, started: time.Now(),
		specialIDs: map[string]int32{}}
	v := m.Tokenizer.Vocabulary()
	s.pieces = llama.TokenPieces(m.Tokenizer)
	s.eos = -1
	if len(v.EOS) > 0 {
		s.eos = v.EOS[0]
	}
	for id, t := range v.Types {
		if t == tokenizer.TOKEN_TYPE_CONTROL && id < len(v.Values) {
			s.specialIDs[v.Values[id]] = int32(id)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	cacheType := "f16"
	if cfg.CacheF32 {
		cacheType = "f32"
	}
	met.reg.MustRegister(newVLLMCollector(sched, cfg.ModelName, cfg.MaxResident, cacheType))
	go sched.run(ctx)
	if cfg.AdapterRescan > 0 {
		go s.watchAdapters(ctx, cfg.AdapterRescan)
	}
	s.handler = s.routes()
	return s, nil
}

// grammarVocab is the vocabulary trie constrained generation masks with.
func (s *Server) grammarVocab() *constrain.Vocab {
	s.grammarOnce.Do(func() { s.grammar = constrain.NewVocab(s.pieces) })
	return s.grammar
}

// Handler is the server's HTTP API.
func (s *Server) Handler() http.Handler { return s.handler }

// Config returns the effective configuration.
func (s *Server) Config() Config { return s.cfg }

// Plan is the memory plan the server runs with.
func (s *Server) Plan() *llama.MemoryPlan { return s.plan }

// Placement says where the model runs.
func (s *Server) Placement() llama.Placement { return s.model.Placement }

// ChatTemplate names the chat format in use.
func (s *Server) ChatTemplate() string { return s.chat.Name }

// Registry is the adapter registry.
func (s *Server) Registry() *adapters.Registry { return s.registry }

// Drain stops taking requests (new ones get 503), lets running and queued
// requests finish until ctx ends, and then ends the rest with an error
// (streams get an error chunk and [DONE]).
func (s *Server) Drain(ctx context.Context) { s.sched.drainRequests(ctx) }

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
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errNotFound("not_found", "no route for %s %s", r.Method, r.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: "invalid_request_error",
			Message: fmt.Sprintf("method %s is not allowed on %s", r.Method, r.URL.Path)})
	})
	r.Get("/health", s.health)
	r.Get("/ready", s.ready)
	r.Group(func(r chi.Router) {
		if s.cfg.MetricsAuth {
			r.Use(s.auth(s.cfg.APIKey, "API key"))
		}
		r.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	})
	r.Group(func(r chi.Router) {
		r.Use(s.limitBody(s.cfg.MaxRequestBytes, s.cfg.BodyTimeout))
		r.Use(s.auth(s.cfg.APIKey, "API key"))
		r.Post("/v1/chat/completions", generateHandler[ChatRequest](s, "chat"))
		r.Post("/v1/completions", generateHandler[CompletionRequest](s, "completions"))
		r.Post("/tokenize", s.tokenize)
		r.Post("/detokenize", s.detokenizeHandler)
		r.Get("/v1/models", s.listModels)
		r.Get("/v1/models/{name}", s.getModel)
		r.Get("/v1/adapters", s.listAdapters)
		r.Get("/v1/adapters/{name}", s.getAdapter)
	})
	r.Group(func(r chi.Router) {
		r.Use(s.limitBody(s.cfg.MaxUploadBytes, 10*s.cfg.BodyTimeout))
		r.Use(s.adminAuth)
		r.Post("/v1/adapters", s.registerAdapter)
		r.Delete("/v1/adapters/{name}", s.deleteAdapter)
		r.Post("/v1/load_lora_adapter", s.vllmLoad)
		r.Post("/v1/unload_lora_adapter", s.vllmUnload)
	})
	return r
}

// limitBody caps a request body at n bytes and gives the client timeout
// to send it (a slow body cannot hold a handler and its connection open
// forever); once the body is read, the deadline is lifted so that a long
// stream is not cut off.
func (s *Server) limitBody(n int64, timeout time.Duration) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			if rc.SetReadDeadline(time.Now().Add(timeout)) == nil {
				r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
			}
			r.Body = http.MaxBytesReader(w, r.Body, n)
			next.ServeHTTP(w, r)
		})
	}
}

// deadlineBody lifts the connection's read deadline when the body ends.
type deadlineBody struct {
	io.ReadCloser
	rc     *http.ResponseController
	lifted bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	// Only a complete body lifts it: after a timeout the connection must
	// stay doomed (the server then closes it instead of waiting to read
	// the rest).
	if err == io.EOF && !b.lifted {
		b.lifted = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// auth checks a Bearer key (none configured: open).
func (s *Server) auth(key, what string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if key != "" && !bearerIs(r, key) {
				writeError(w, &apiError{Status: http.StatusUnauthorized, Type: "authentication_error", Code: "invalid_api_key",
					Message: "missing or invalid " + what + ": send Authorization: Bearer <key>"})
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// adminAuth guards adapter changes. With an admin key only that key
// passes, never the API key. Without one the admin API is off when the
// server has an API key (its clients are tenants), and answers only
// loopback clients when it has no key at all (a local setup).
func (s *Server) adminAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case s.cfg.AdminKey != "":
			if !bearerIs(r, s.cfg.AdminKey) {
				writeError(w, &apiError{Status: http.StatusUnauthorized, Type: "authentication_error", Code: "invalid_api_key",
					Message: "missing or invalid admin key: send Authorization: Bearer <admin key>"})
				return
			}
		case s.cfg.APIKey != "":
			writeError(w, &apiError{Status: http.StatusForbidden, Type: "permission_error", Code: "admin_disabled",
				Message: "the adapter admin API is off: the server has an API key but no admin key (--admin-key)"})
			return
		case !fromLoopback(r):
			writeError(w, &apiError{Status: http.StatusForbidden, Type: "permission_error", Code: "admin_disabled",
				Message: "without an admin key (--admin-key) the adapter admin API answers only clients on the loopback interface"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func bearerIs(r *http.Request, key string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && subtle.ConstantTimeCompare([]byte(got), []byte(key)) == 1
}

func fromLoopback(r *http.Request) bool {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "model": s.cfg.ModelName,
		"adapters": s.registry.Len(), "uptime_seconds": int(time.Since(s.started).Seconds())})
}

// ready is the readiness probe: the model is loaded (the listener opens
// after that) and the server is not draining.
func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	if s.sched.draining.Load() {
		writeError(w, errShuttingDown)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ready"})
}
