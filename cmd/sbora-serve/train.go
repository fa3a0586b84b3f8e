package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"

	"golang.org/x/term"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/train"
)

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runTrain(args []string) error {
	fs := flag.NewFlagSet("train", flag.ContinueOnError)
	modelPath := fs.String("model", "", "base model GGUF (stays frozen; may be quantized)")
	data := fs.String("data", "", "training data JSONL: {prompt,completion}, {text} or {messages}")
	out := fs.String("out", "", "output adapter GGUF")
	variant := fs.String("variant", "fa", "fa, fb or lora")
	rank := fs.Int("rank", 8, "rank")
	alpha := fs.Float64("alpha", 0, "alpha (default 2·rank); the update is scaled by alpha/rank")
	targets := fs.String("targets", "q,k,v,o,gate,up,down", "target modules")
	lr := fs.Float64("lr", 2e-4, "peak learning rate")
	epochs := fs.Int("epochs", 1, "epochs over the data (ignored with --steps)")
	steps := fs.Int("steps", 0, "optimizer steps (0 = from --epochs)")
	batch := fs.Int("batch", 4, "sequences per micro-batch")
	accum := fs.Int("grad-accum", 1, "micro-batches per optimizer step")
	seqLen := fs.Int("seq-len", 256, "tokens per sequence (longer examples are cut)")
	warmup := fs.Int("warmup", 0, "linear warmup steps")
	schedule := fs.String("lr-schedule", "constant", "constant or cosine")
	maxNorm := fs.Float64("max-grad-norm", 1.0, "clip the global gradient norm (0 = off)")
	wd := fs.Float64("weight-decay", 0, "AdamW weight decay")
	seed := fs.Uint64("seed", 1, "seed for indices, initialisation, data order and the eval split")
	evalFile := fs.String("eval", "", "held-out JSONL")
	evalSplit := fs.Float64("eval-split", 0, "hold out this fraction of --data instead")
	evalEvery := fs.Int("eval-every", 0, "evaluate every N steps (0 = at the end)")
	ckptEvery := fs.Int("checkpoint-every", 0, "checkpoint every N steps into --checkpoint-dir")
	ckptDir := fs.String("checkpoint-dir", "", "checkpoint directory (default OUT.checkpoints)")
	resume := fs.String("resume", "", "resume from the latest checkpoint in this directory")
	threads := fs.Int("threads", 0, "CPU threads (0 = all cores)")
	name := fs.String("name", "", "adapter name stored in the file")
	var avoid stringList
	fs.Var(&avoid, "avoid", "adapter file whose indices the new adapter must not reuse (repeatable)")
	gpuLayers := fs.Int("gpu-layers", -1, gpuLayersUsage)
	layerwise := fs.Bool("layerwise", false, "differentiate one layer at a time through F32 copies of its weights (always on a GPU; bounded memory on the CPU too)")
	verbose := fs.Bool("verbose", false, "log engine details to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	setupLogging(*verbose)
	if *modelPath == "" || *data == "" || *out == "" {
		return errors.New("--model, --data and --out are required")
	}
	if err := checkGPULayers(*gpuLayers); err != nil {
		return err
	}
	v, err := adapters.ParseVariant(*variant)
	if err != nil {
		return err
	}
	mods, err := adapters.ParseModules(*targets)
	if err != nil {
		return err
	}
	if *evalFile != "" && *evalSplit > 0 {
		return errors.New("use --eval or --eval-split, not both")
	}
	if *evalSplit < 0 || *evalSplit >= 1 {
		return errors.New("--eval-split must be in [0, 1)")
	}
	m, err := llama.Load(*modelPath, llama.LoadOptions{Threads: *threads, GPULayers: *gpuLayers})
	if err != nil {
		return err
	}
	defer m.Close()
	tok, err := train.NewTokenizer(m)
	if err != nil {
		return err
	}
	exs, err := train.LoadJSONL(*data, tok, *seqLen)
	if err != nil {
		return err
	}
	trainSet, evalSet := train.Split(exs, *evalSplit, *seed)
	if *evalFile != "" {
		if evalSet, err = train.LoadJSONL(*evalFile, tok, *seqLen); err != nil {
			return err
		}
	}
	var avoidAdapters []*adapters.Adapter
	for _, p := range avoid {
		a, err := adapters.Load(p)
		if err != nil {
			return err
		}
		if err := a.Resolve(m.AdapterBase); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		avoidAdapters = append(avoidAdapters, a)
	}
	if *ckptDir == "" && (*ckptEvery > 0 || *resume != "") {
		*ckptDir = *out + ".checkpoints"
	}
	if *resume != "" {
		*ckptDir = *resume
	}
	cfg := train.Config{Variant: v, Rank: *rank, Alpha: float32(*alpha), Targets: mods, LR: *lr, Epochs: *epochs, Steps: *steps,
		Batch: *batch, GradAccum: *accum, SeqLen: *seqLen, Warmup: *warmup, Schedule: *schedule, MaxGradNorm: *maxNorm,
		WeightDecay: *wd, Seed: *seed, EvalEvery: *evalEvery, CheckpointEvery: *ckptEvery, CheckpointDir: *ckptDir,
		Avoid: avoidAdapters, Name: *name, Layerwise: *layerwise}
	tr, err := train.New(m, cfg, trainSet, evalSet)
	if err != nil {
		return err
	}
	if *resume != "" {
		if err := tr.Resume(*resume); err != nil {
			return err
		}
	}
	tty := term.IsTerminal(int(os.Stderr.Fd()))
	fmt.Fprintf(os.Stderr, "training %s rank %d (%d trainable values) on %d examples (%d held out), %d steps from step %d, on %s\n",
		v, *rank, tr.Params().Count(), len(trainSet), len(evalSet), tr.Steps(), tr.Step(), m.Placement)
	if len(evalSet) > 0 && tr.Step() == 0 {
		base, err := train.BaseEvalLoss(m, evalSet, *batch)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "eval loss before training: %.4f\n", base)
	}
	tr.OnEvent = train.Progress(os.Stderr, tty)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := tr.Run(ctx); err != nil {
		if errors.Is(err, context.Canceled) {
			if *ckptDir == "" {
				*ckptDir = *out + ".checkpoints"
			}
			if err := tr.SaveCheckpoint(*ckptDir); err != nil {
				return err
			}
			return fmt.Errorf("interrupted at step %d; checkpoint saved, continue with --resume %s", tr.Step(), *ckptDir)
		}
		return err
	}
	a := tr.Params().Adapter(*name, m.AdapterBase)
	if err := a.Save(*out, adapters.SaveOptions{}); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "adapter written to %s\n", *out)
	return nil
}
