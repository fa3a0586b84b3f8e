package main

import (
	"errors"
	"flag"
	"fmt"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/llama"
)

func runAdapters(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: sbora-serve adapters import|export|merge|inspect|random [flags]")
	}
	switch args[0] {
	case "import":
		return runAdaptersImport(args[1:])
	case "export":
		return runAdaptersExport(args[1:])
	case "merge":
		return runAdaptersMerge(args[1:])
	case "inspect":
		return runAdaptersInspect(args[1:])
	case "random":
		return runAdaptersRandom(args[1:])
	}
	return fmt.Errorf("unknown adapters command %q (want import, export, merge, inspect or random)", args[0])
}

// loadBase reads a base model's shape (not its weights) for adapter tools.
func loadBase(path string) (*adapters.Base, error) {
	return llama.ReadBase(path)
}

func runAdaptersRandom(args []string) error {
	fs := flag.NewFlagSet("adapters random", flag.ContinueOnError)
	base := fs.String("base", "", "base model GGUF the adapter is for")
	out := fs.String("out", "", "output adapter GGUF")
	variant := fs.String("variant", "fa", "fa, fb or lora")
	rank := fs.Int("rank", 8, "rank")
	alpha := fs.Float64("alpha", 0, "alpha (default 2·rank)")
	targets := fs.String("targets", "q,k,v,o,gate,up,down", "target modules")
	seed := fs.Uint64("seed", 1, "seed for indices and values")
	std := fs.Float64("std", 0.02, "standard deviation of the trainable values")
	name := fs.String("name", "", "adapter name stored in the file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *base == "" || *out == "" {
		return errors.New("--base and --out are required")
	}
	v, err := adapters.ParseVariant(*variant)
	if err != nil {
		return err
	}
	mods, err := adapters.ParseModules(*targets)
	if err != nil {
		return err
	}
	b, err := loadBase(*base)
	if err != nil {
		return err
	}
	a, err := adapters.NewRandom(b, adapters.RandomOptions{Name: *name, Variant: v, Rank: *rank, Alpha: float32(*alpha),
		Modules: mods, Seed: *seed, Std: float32(*std)})
	if err != nil {
		return err
	}
	if err := a.Save(*out, adapters.SaveOptions{}); err != nil {
		return err
	}
	fmt.Printf("wrote %s: %s rank %d on %d modules (%d bytes of weights)\n", *out, v, *rank, len(a.Modules), a.Bytes())
	return nil
}
