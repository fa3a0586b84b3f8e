package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
)

func runAdaptersImport(args []string) error {
	fs := flag.NewFlagSet("adapters import", flag.ContinueOnError)
	from := fs.String("from", "", "checkpoint directory or file: reference SBoRA (adapter_model.bin + adapter_config.json), QSBoRA, or PEFT LoRA (.safetensors or .bin)")
	base := fs.String("base", "", "base model GGUF the adapter belongs to")
	out := fs.String("out", "", "output adapter GGUF")
	name := fs.String("name", "", "adapter name stored in the file (default: the output file's name)")
	alpha := fs.Float64("alpha", 0, "lora_alpha when the checkpoint has no adapter_config.json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *from == "" || *base == "" || *out == "" {
		return errors.New("--from, --base and --out are required")
	}
	b, err := loadBase(*base)
	if err != nil {
		return err
	}
	if *name == "" {
		*name = strings.TrimSuffix(filepath.Base(*out), filepath.Ext(*out))
	}
	a, err := adapters.Import(*from, b, adapters.ImportOptions{Name: *name, Alpha: *alpha})
	if err != nil {
		return err
	}
	if err := a.Save(*out, adapters.SaveOptions{}); err != nil {
		return err
	}
	fmt.Printf("imported %s: %s rank %d alpha %g on %d modules -> %s\n", *from, a.Variant, a.Rank, a.Alpha, len(a.Modules), *out)
	return nil
}

func runAdaptersExport(args []string) error {
	fs := flag.NewFlagSet("adapters export", flag.ContinueOnError)
	format := fs.String("format", "llama.cpp-lora", "output format: llama.cpp-lora")
	in := fs.String("in", "", "adapter GGUF (SBoRA or LoRA)")
	out := fs.String("out", "", "output GGUF")
	f32 := fs.Bool("f32", false, "store the matrices as F32 (default F16, as llama.cpp's converter writes them)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *format != "llama.cpp-lora" {
		return fmt.Errorf("unknown format %q (want llama.cpp-lora)", *format)
	}
	if *in == "" || *out == "" {
		return errors.New("--in and --out are required")
	}
	a, err := adapters.Load(*in)
	if err != nil {
		return err
	}
	l := a.ToLoRA()
	if err := l.Save(*out, adapters.SaveOptions{F32: *f32}); err != nil {
		return err
	}
	fmt.Printf("exported %s (%s rank %d) as a dense llama.cpp LoRA -> %s\n", *in, a.Variant, a.Rank, *out)
	return nil
}

func runAdaptersMerge(args []string) error {
	fs := flag.NewFlagSet("adapters merge", flag.ContinueOnError)
	base := fs.String("base", "", "base model GGUF")
	var list adapterArgs
	fs.Var(&list, "adapter", "adapter PATH[:SCALE] (repeatable)")
	out := fs.String("out", "", "output model GGUF")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *base == "" || *out == "" || len(list) == 0 {
		return errors.New("--base, --out and at least one --adapter are required")
	}
	b, err := loadBase(*base)
	if err != nil {
		return err
	}
	var ws []modelfile.Weighted
	for _, a := range list {
		ad, err := adapters.Load(a.Path)
		if err != nil {
			return err
		}
		ws = append(ws, modelfile.Weighted{Adapter: ad, Scale: a.Scale})
	}
	st, err := modelfile.Merge(*base, *out, b, ws)
	if err != nil {
		return err
	}
	fmt.Printf("merged %d adapter(s) into %s: %d weights updated, %d of %d blocks re-quantized (%.2f%%, %d bytes); every other byte is copied\n",
		len(ws), *out, st.Tensors, st.BlocksChanged, st.Blocks, 100*float64(st.BlocksChanged)/float64(max(1, st.Blocks)), st.Bytes)
	return nil
}

func runAdaptersInspect(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: sbora-serve adapters inspect FILE...")
	}
	var all []*adapters.Adapter
	for _, p := range args {
		a, err := adapters.Load(p)
		if err != nil {
			return err
		}
		if a.Name == "" {
			a.Name = filepath.Base(p)
		}
		all = append(all, a)
		st, _ := os.Stat(p)
		fmt.Printf("%s: %s, rank %d, alpha %g (scale %.4g), %d modules on %d layers, %d bytes on disk, %d weight bytes\n",
			p, a.Variant, a.Rank, a.Alpha, a.Scale(), len(a.Modules), layersOf(a), st.Size(), a.Bytes())
		if a.BaseFingerprint != "" {
			fmt.Printf("  base fingerprint %s\n", a.BaseFingerprint[:16])
		}
		tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  module\tshape\ttouched\tfraction of W")
		for _, m := range a.Modules {
			touched, frac := touchedRegion(a, m)
			fmt.Fprintf(tw, "  %s\t%d→%d\t%s\t%.2f%%\n", m.Target, m.In, m.Out, touched, 100*frac)
		}
		tw.Flush()
	}
	if len(all) > 1 {
		fmt.Println("pairwise overlap (shared index positions, summed over modules; 0 means they compose without crosstalk):")
		for i := 0; i < len(all); i++ {
			for j := i + 1; j < len(all); j++ {
				fmt.Printf("  %s × %s: %s\n", all[i].Name, all[j].Name, overlap(all[i], all[j]))
			}
		}
	}
	return nil
}

func layersOf(a *adapters.Adapter) int {
	seen := map[int]bool{}
	for _, m := range a.Modules {
		seen[m.Layer] = true
	}
	return len(seen)
}

// touchedRegion describes which part of W the module changes.
func touchedRegion(a *adapters.Adapter, m *adapters.ModuleWeights) (string, float64) {
	r := float64(a.Rank)
	switch a.Variant {
	case adapters.FA:
		return fmt.Sprintf("%d columns", a.Rank), r / float64(m.In)
	case adapters.FB:
		return fmt.Sprintf("%d rows", a.Rank), r / float64(m.Out)
	}
	return "all (dense)", 1
}

// overlap reports how two adapters' touched regions intersect.
func overlap(x, y *adapters.Adapter) string {
	if x.Variant == adapters.LoRA || y.Variant == adapters.LoRA {
		return "dense LoRA involved: overlaps everywhere both touch"
	}
	if x.Variant != y.Variant {
		// FA columns × FB rows always cross where both modules exist.
		shared := 0
		for _, m := range x.Modules {
			if y.Module(m.Target) != nil {
				shared++
			}
		}
		if shared == 0 {
			return "0 (no shared modules)"
		}
		return fmt.Sprintf("FA columns cross FB rows in %d shared modules (r×r cells each)", shared)
	}
	total, mods := 0, 0
	var worst []string
	for _, m := range x.Modules {
		o := y.Module(m.Target)
		if o == nil {
			continue
		}
		set := map[int32]bool{}
		for _, v := range m.Index {
			set[v] = true
		}
		n := 0
		for _, v := range o.Index {
			if set[v] {
				n++
			}
		}
		if n > 0 {
			mods++
			worst = append(worst, fmt.Sprintf("%s:%d", m.Target, n))
		}
		total += n
	}
	if total == 0 {
		return "0 (disjoint: no crosstalk)"
	}
	sort.Strings(worst)
	if len(worst) > 4 {
		worst = append(worst[:4], "...")
	}
	return fmt.Sprintf("%d shared %s in %d modules (%s)", total, map[adapters.Variant]string{adapters.FA: "columns", adapters.FB: "rows"}[x.Variant], mods, strings.Join(worst, ", "))
}
