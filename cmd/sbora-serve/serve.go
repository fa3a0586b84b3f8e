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
	"sync"
	"syscall"
	"time"

	"github.com/sbora-serve/sbora-serve/serve"
)

func runServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var cfg serve.Config
	serveFlags(fs, &cfg)
	addr := fs.String("addr", "127.0.0.1:8080", "listen address (port 0 picks a free port)")
	drain := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long running requests may finish before they are ended")
	verbose := fs.Bool("verbose", false, "log engine details to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	setupLogging(*verbose)
	if cfg.ModelPath == "" {
		return errors.New("--model is required")
	}
	if err := checkGPULayers(cfg.GPULayers); err != nil {
		return err
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
	fmt.Fprintf(os.Stderr, "sbora-serve: %s\n", srv.Plan())
	fmt.Fprintf(os.Stderr, "sbora-serve: running on %s\n", srv.Placement())
	fmt.Fprintf(os.Stderr, "sbora-serve: model %s (%s), %d adapters registered from %s, chat template %s\n",
		eff.ModelName, eff.ModelPath, srv.Registry().Len(), srv.Registry().Dir(), srv.ChatTemplate())
	fmt.Fprintf(os.Stderr, "sbora-serve: listening on http://%s\n", ln.Addr())
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintf(os.Stderr, "sbora-serve: draining (up to %s)\n", *drain)
	// Stop accepting connections and let requests in flight finish; after
	// the drain timeout the scheduler ends what is left (streams get an
	// error chunk and [DONE]), so every handler returns.
	drainCtx, cancelDrain := context.WithTimeout(context.Background(), *drain)
	defer cancelDrain()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv.Drain(drainCtx)
	}()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), *drain+10*time.Second)
	defer cancel()
	err = hs.Shutdown(shutdownCtx)
	wg.Wait()
	if err != nil {
		hs.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	fmt.Fprintln(os.Stderr, "sbora-serve: stopped")
	return nil
}

// serveFlags defines the server's configuration flags (serve, and model
// plan, which sizes a server without starting it).
func serveFlags(fs *flag.FlagSet, cfg *serve.Config) {
	fs.StringVar(&cfg.ModelPath, "model", "", "base model GGUF (llama architecture)")
	fs.StringVar(&cfg.ModelName, "model-name", "", "the base model's id in the API (default: file name)")
	fs.StringVar(&cfg.AdapterDir, "adapter-dir", "adapters", "directory of adapter files; every *.gguf is registered at start")
	fs.Float64Var(&cfg.MemoryFraction, "memory-fraction", 0.8, "share of the available memory the server plans to use")
	fs.IntVar(&cfg.MaxResident, "max-resident", 0, "adapter bank size in LoRA-sized slots; an FA or FB adapter takes half a slot (0 = planned: up to 16)")
	fs.IntVar(&cfg.MaxRank, "max-rank", 0, "largest adapter rank accepted (0 = 64)")
	fs.IntVar(&cfg.Parallel, "parallel", 0, "most sequences running at once (0 = 16)")
	fs.IntVar(&cfg.ContextLength, "ctx", 0, "longest sequence, prompt plus completion (0 = the model's, at most 4096)")
	fs.IntVar(&cfg.KVTokens, "kv-tokens", 0, "KV pool size in tokens, shared by all sequences (0 = planned)")
	fs.IntVar(&cfg.PrefillBudget, "prefill-budget", 512, "prompt tokens per engine step (chunked prefill)")
	fs.IntVar(&cfg.MaxQueue, "max-queue", 256, "requests waiting beyond which new ones get 429")
	fs.IntVar(&cfg.MaxLoading, "max-loading", 2, "adapter files read at once")
	fs.IntVar(&cfg.Threads, "threads", 0, "CPU threads (0 = all cores)")
	fs.IntVar(&cfg.GPULayers, "gpu-layers", -1, gpuLayersUsage)
	fs.BoolVar(&cfg.CacheF32, "cache-f32", false, "keep the KV cache in F32 instead of F16")
	fs.BoolVar(&cfg.NoPrefixCache, "no-prefix-cache", false, "do not reuse the KV blocks of shared prompt prefixes")
	fs.BoolVar(&cfg.NoRepack, "no-repack", false, "keep CPU weights in their file layout instead of ggml-cpu's faster repacked layouts")
	fs.StringVar(&cfg.BankType, "bank-type", "f16", "adapter bank storage: f16, f32 or q8_0")
	fs.StringVar(&cfg.APIKey, "api-key", os.Getenv("SBORA_API_KEY"), "Bearer key for inference endpoints (env SBORA_API_KEY)")
	fs.StringVar(&cfg.AdminKey, "admin-key", os.Getenv("SBORA_ADMIN_KEY"), "Bearer key for adapter changes (env SBORA_ADMIN_KEY); without it the admin API is off when --api-key is set, and answers loopback clients only otherwise")
	fs.BoolVar(&cfg.MetricsAuth, "metrics-auth", false, "require the API key for /metrics")
	fs.BoolVar(&cfg.MetricsAdapterNames, "metrics-adapter-names", false, "label metrics with adapter names (they are tenant names; off: \"adapter\")")
	fs.Int64Var(&cfg.MaxRequestBytes, "max-request-bytes", 8<<20, "largest inference request body")
	fs.Int64Var(&cfg.MaxUploadBytes, "max-upload-bytes", 512<<20, "largest adapter upload")
	fs.DurationVar(&cfg.BodyTimeout, "body-timeout", 30*time.Second, "how long a client may take to send a request body (uploads: 10×)")
	fs.DurationVar(&cfg.AdapterRescan, "adapter-rescan", 2*time.Second, "rescan the adapter directory this often for files other replicas or operators changed (file events rescan sooner; negative: off)")
}

const gpuLayersUsage = "transformer layers to run on the GPU, from the last, with their KV cache and adapter slots (-1 = all and the output head; 0 = CPU only); without a GPU everything runs on the CPU"

// checkGPULayers refuses counts below -1.
func checkGPULayers(n int) error {
	if n < -1 {
		return fmt.Errorf("--gpu-layers %d: want -1 (all), 0 (CPU only) or a layer count", n)
	}
	return nil
}
