package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
)

func runModel(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: sbora-serve model random|quantize|info [flags]")
	}
	switch args[0] {
	case "random":
		return runModelRandom(args[1:])
	case "quantize":
		return runModelQuantize(args[1:])
	case "info":
		return runModelInfo(args[1:])
	}
	return fmt.Errorf("unknown model command %q (want random, quantize or info)", args[0])
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
