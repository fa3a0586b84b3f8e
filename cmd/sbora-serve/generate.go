package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
)

func runGenerate(args []string) error {
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	modelPath := fs.String("model", "", "base model GGUF (llama architecture)")
	var adapterList adapterArgs
	fs.Var(&adapterList, "adapter", "adapter file PATH[:SCALE] (repeatable, up to 4 compose)")
	prompt := fs.String("prompt", "", "prompt text")
	maxTokens := fs.Int("max-tokens", 128, "tokens to generate at most")
	temperature := fs.Float64("temperature", 0, "sampling temperature (0 = greedy)")
	topK := fs.Int("top-k", 0, "top-k cut (0 = off)")
	topP := fs.Float64("top-p", 1, "nucleus cut (1 = off)")
	minP := fs.Float64("min-p", 0, "min-p cut (0 = off)")
	seed := fs.Uint64("seed", 0, "sampling seed (0 = random)")
	threads := fs.Int("threads", 0, "CPU threads (0 = all cores)")
	ctxLen := fs.Int("ctx", 0, "context length (0 = the model's, at most 4096)")
	noBOS := fs.Bool("no-bos", false, "do not add the BOS token to the prompt")
	gpuLayers := fs.Int("gpu-layers", -1, gpuLayersUsage)
	verbose := fs.Bool("verbose", false, "log engine details to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	setupLogging(*verbose)
	if *modelPath == "" {
		return errors.New("--model is required")
	}
	if err := checkGPULayers(*gpuLayers); err != nil {
		return err
	}
	if *maxTokens < 0 {
		return errors.New("--max-tokens must be ≥ 0")
	}
	if len(adapterList) > kernels.MaxCompose {
		return fmt.Errorf("at most %d adapters compose, got %d", kernels.MaxCompose, len(adapterList))
	}
	lo := llama.ServingOptions(*threads)
	lo.GPULayers = *gpuLayers
	m, err := llama.Load(*modelPath, lo)
	if err != nil {
		return err
	}
	defer m.Close()
	toks, err := m.Tokenizer.Encode(*prompt, !*noBOS)
	if err != nil {
		return err
	}
	slotLen := *ctxLen
	if slotLen == 0 {
		slotLen = min(max(m.Params.ContextLength, len(toks)+*maxTokens), 4096)
	}
	if len(toks) >= slotLen {
		return fmt.Errorf("prompt has %d tokens, the context holds %d", len(toks), slotLen)
	}
	maxRank := 1
	var loaded []*adapters.Adapter
	for _, a := range adapterList {
		ad, err := adapters.Load(a.Path)
		if err != nil {
			return err
		}
		if err := ad.Resolve(m.AdapterBase); err != nil {
			return fmt.Errorf("%s: %w", a.Path, err)
		}
		maxRank = max(maxRank, ad.Rank)
		loaded = append(loaded, ad)
	}
	e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: slotLen, MaxSeqLen: slotLen,
		Bank: kernels.Config{Slots: max(1, len(loaded)), MaxRank: maxRank}})
	if err != nil {
		return err
	}
	defer e.Close()
	var uses []kernels.Use
	for i, ad := range loaded {
		r, err := e.Bank.Load(ad)
		if err != nil {
			return fmt.Errorf("%s: %w", adapterList[i].Path, err)
		}
		uses = append(uses, kernels.Use{Adapter: r, Scale: adapterList[i].Scale})
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	stream := llama.NewTextStream(m.Tokenizer)
	_, err = e.Generate(ctx, toks, llama.GenerateOptions{
		MaxTokens: *maxTokens,
		Adapters:  uses,
		Sampler: llama.SamplerOptions{Temperature: float32(*temperature), TopK: *topK, TopP: float32(*topP),
			MinP: float32(*minP), Seed: *seed},
	}, func(t int32) bool {
		out.WriteString(stream.Add(t))
		out.Flush()
		return true
	})
	out.WriteString(stream.Flush())
	out.WriteString("\n")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
