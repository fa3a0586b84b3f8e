package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/serve"
)

func runModel(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: sbora-serve model random|quantize|info|plan [flags]")
	}
	switch args[0] {
	case "random":
		return runModelRandom(args[1:])
	case "quantize":
		return runModelQuantize(args[1:])
	case "info":
		return runModelInfo(args[1:])
	case "plan":
		return runModelPlan(args[1:])
	}
	return fmt.Errorf("unknown model command %q (want random, quantize, info or plan)", args[0])
}

func runModelRandom(args []string) error {
	fs := flag.NewFlagSet("model random", flag.ContinueOnError)
	out := fs.String("out", "", "output GGUF")
	preset := fs.String("preset", "", "shape preset: 7b (LLaMA-2-7B layer shapes)")
	layers := fs.Int("layers", 2, "transformer layers")
	embd := fs.Int("embd", 256, "hidden size")
	ff := fs.Int("ff", 0, "feed-forward size (default 8/3·embd rounded to 256)")
	heads := fs.Int("heads", 8, "attention heads")
	kvHeads := fs.Int("kv-heads", 0, "key/value heads (default = heads)")
	vocab := fs.Int("vocab", 32000, "vocabulary size (synthetic SentencePiece vocabulary)")
	vocabFrom := fs.String("vocab-from", "", "copy the tokenizer of this GGUF instead")
	typ := fs.String("type", "Q4_0", "weight type: F32, F16, Q8_0, Q4_0, Q4_K, Q6_K, ...")
	seed := fs.Uint64("seed", 1, "random seed")
	ctx := fs.Int("ctx", 4096, "context length")
	tied := fs.Bool("tied", false, "tie the output head to the token embedding")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("--out is required")
	}
	t, err := gguf.ParseTensorType(*typ)
	if err != nil {
		return err
	}
	spec := modelfile.Spec{Layers: *layers, Embedding: *embd, FeedForward: *ff, Heads: *heads, KVHeads: *kvHeads,
		Vocab: *vocab, ContextLength: *ctx, Type: t, Seed: *seed, TiedOutput: *tied, VocabFrom: *vocabFrom}
	if *preset == "7b" {
		spec = modelfile.SevenB(*layers, t)
		spec.Seed, spec.VocabFrom, spec.TiedOutput = *seed, *vocabFrom, *tied
	} else if *preset != "" {
		return fmt.Errorf("unknown preset %q", *preset)
	}
	if spec.FeedForward == 0 {
		spec.FeedForward = (spec.Embedding*8/3 + 255) / 256 * 256
	}
	if err := modelfile.WriteRandom(*out, spec); err != nil {
		return err
	}
	st, _ := os.Stat(*out)
	fmt.Printf("wrote %s (%d layers, %d wide, %s, %.1f MiB)\n", *out, spec.Layers, spec.Embedding, t, float64(st.Size())/(1<<20))
	return nil
}

func runModelQuantize(args []string) error {
	fs := flag.NewFlagSet("model quantize", flag.ContinueOnError)
	in := fs.String("in", "", "input GGUF")
	out := fs.String("out", "", "output GGUF")
	typ := fs.String("type", "Q8_0", "weight type")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *in == "" || *out == "" {
		return errors.New("--in and --out are required")
	}
	t, err := gguf.ParseTensorType(*typ)
	if err != nil {
		return err
	}
	if err := modelfile.Quantize(*in, *out, t); err != nil {
		return err
	}
	fmt.Printf("wrote %s (%s)\n", *out, t)
	return nil
}

func runModelInfo(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: sbora-serve model info FILE...")
	}
	for _, p := range args {
		f, err := gguf.Open(p)
		if err != nil {
			return err
		}
		fmt.Printf("%s: GGUF v%d, %d tensors, %d metadata keys\n", p, f.Version, len(f.Tensors), f.KV.Len())
		tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
		for _, k := range f.KV.Keys() {
			v, _ := f.KV.Value(k)
			s := fmt.Sprint(v)
			if len(s) > 80 {
				s = s[:77] + "..."
			}
			fmt.Fprintf(tw, "  %s\t%s\n", k, s)
		}
		tw.Flush()
		f.Close()
	}
	return nil
}

// runModelPlan prints the memory plan serve would use for a model and a
// memory size (a container's limit), with the matching Kubernetes
// resources: how to size a pod without starting one.
func runModelPlan(args []string) error {
	fs := flag.NewFlagSet("model plan", flag.ContinueOnError)
	var cfg serve.Config
	serveFlags(fs, &cfg)
	memory := fs.String("memory", "", "memory the server gets (the container's limit), e.g. 24Gi; default: this machine's available memory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cfg.ModelPath == "" {
		return errors.New("--model is required")
	}
	avail, source, err := llama.AvailableMemory()
	if err != nil {
		return err
	}
	if *memory != "" {
		if avail, err = parseBytes(*memory); err != nil {
			return fmt.Errorf("--memory: %w", err)
		}
		source = *memory + " (--memory)"
	}
	plan, err := serve.PlanMemory(cfg, avail, source)
	if err != nil {
		return err
	}
	fmt.Println(plan)
	limit := fmt.Sprintf("%dMi", (avail+(1<<20)-1)>>20)
	if *memory != "" {
		limit = *memory
	}
	fmt.Printf("kubernetes: resources: {requests: {memory: %s}, limits: {memory: %s}}  # the plan uses %.0f%% of it; the rest is headroom\n",
		limit, limit, 100*float64(plan.Total())/float64(avail))
	return nil
}

// parseBytes reads a size: a number with an optional K, M, G or T suffix,
// binary (Ki, KiB, ...) or decimal (K, KB, ...), as Kubernetes writes them.
func parseBytes(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "B")
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"K", 1e3}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}} {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = rest, u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v <= 0 || v*float64(mult) > 1<<62 {
		return 0, fmt.Errorf("%q is not a size (e.g. 24Gi)", s)
	}
	return int64(v * float64(mult)), nil
}
