package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sbora-serve/sbora-serve/serve"
)

func runServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var cfg serve.Config
	fs.StringVar(&cfg.ModelPath, "model", "", "base model GGUF (llama architecture)")
	fs.StringVar(&cfg.ModelName, "model-name", "", "the base model's id in the API (default: file name)")
	fs.StringVar(&cfg.AdapterDir, "adapter-dir", "adapters", "directory of adapter files; every *.gguf is registered at start")
	addr := fs.String("addr", "127.0.0.1:8080", "listen address (port 0 picks a free port)")
	fs.IntVar(&cfg.MaxResident, "max-resident", 16, "adapters kept in engine memory (LRU beyond)")
	fs.IntVar(&cfg.MaxRank, "max-rank", 64, "largest adapter rank accepted")
	fs.IntVar(&cfg.Parallel, "parallel", 16, "sequences decoded together (KV slots)")
	fs.IntVar(&cfg.ContextLength, "ctx", 0, "context length per sequence (0 = the model's, at most 4096)")
	fs.IntVar(&cfg.PrefillBudget, "prefill-budget", 512, "prompt tokens per engine step (chunked prefill)")
	fs.IntVar(&cfg.MaxQueue, "max-queue", 256, "requests waiting beyond which new ones get 429")
	fs.IntVar(&cfg.Threads, "threads", 0, "CPU threads (0 = all cores)")
	fs.BoolVar(&cfg.CacheF32, "cache-f32", false, "keep the KV cache in F32 instead of F16")
	fs.StringVar(&cfg.APIKey, "api-key", os.Getenv("SBORA_API_KEY"), "Bearer key for inference endpoints (env SBORA_API_KEY)")
	fs.StringVar(&cfg.AdminKey, "admin-key", os.Getenv("SBORA_ADMIN_KEY"), "Bearer key for adapter changes (env SBORA_ADMIN_KEY; default: the API key)")
	fs.Int64Var(&cfg.MaxBodyBytes, "max-body", 512<<20, "largest request body in bytes (adapter uploads included)")
	verbose := fs.Bool("verbose", false, "log engine details to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	setupLogging(*verbose)
	if cfg.ModelPath == "" {
		return errors.New("--model is required")
	}
	srv, err := serve.New(cfg)
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	eff := srv.Config()
	fmt.Fprintf(os.Stderr, "sbora-serve: model %s (%s), %d adapters registered from %s, chat template %s\n",
		eff.ModelName, eff.ModelPath, srv.Registry().Len(), srv.Registry().Dir(), srv.ChatTemplate())
	fmt.Fprintf(os.Stderr, "sbora-serve: listening on http://%s\n", ln.Addr())
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 30 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintln(os.Stderr, "sbora-serve: shutting down")
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return hs.Shutdown(shutdown)
}
