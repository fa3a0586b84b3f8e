// Command sbora-serve serves one quantized LLaMA base model with many SBoRA
// and LoRA adapters behind an OpenAI-compatible API, trains those adapters,
// and converts them. Run "sbora-serve help" for the commands.
package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
)

type command struct {
	name, summary string
	run           func(args []string) error
}

var commands []command

func init() {
	commands = []command{
		{"serve", "serve the model and adapters over an OpenAI-compatible API (default)", runServe},
		{"generate", "generate a continuation of a prompt (optionally with adapters)", runGenerate},
		{"train", "train an SBoRA (fa, fb) or LoRA adapter on a frozen base", runTrain},
		{"adapters", "adapter tools: import, export, merge, inspect, random", runAdapters},
		{"model", "model tools: random, quantize, info, plan", runModel},
		{"check", "compare this machine's GPU with its CPU: logits, throughput, training (deploy/gpu-check.sh)", runCheck},
		{"version", "print the version", func([]string) error { fmt.Println(version); return nil }},
	}
}

const version = "0.1.0"

func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: sbora-serve <command> [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun \"sbora-serve <command> -h\" for a command's flags.\n")
}

func main() {
	args := os.Args[1:]
	if len(args) > 0 && (args[0] == "help" || args[0] == "-h" || args[0] == "--help") {
		usage(os.Stdout)
		return
	}
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		args = append([]string{"serve"}, args...) // serve is the default command
	}
	for _, c := range commands {
		if c.name == args[0] {
			if err := c.run(args[1:]); err != nil {
				fmt.Fprintf(os.Stderr, "sbora-serve %s: %v\n", c.name, err)
				os.Exit(1)
			}
			return
		}
	}
	fmt.Fprintf(os.Stderr, "sbora-serve: unknown command %q\n\n", args[0])
	usage(os.Stderr)
	os.Exit(2)
}

// setupLogging sends logs to stderr: warnings only, everything with verbose.
func setupLogging(verbose bool) {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
}

// adapterArg is a repeatable PATH[:SCALE] flag.
type adapterArg struct {
	Path  string
	Scale float32
}

type adapterArgs []adapterArg

func (a *adapterArgs) String() string { return fmt.Sprint(*a) }

func (a *adapterArgs) Set(s string) error {
	arg, err := parseAdapterArg(s)
	if err != nil {
		return err
	}
	*a = append(*a, arg)
	return nil
}

// parseAdapterArg splits PATH[:SCALE]; a suffix after the last colon that is
// not a number is part of the path.
func parseAdapterArg(s string) (adapterArg, error) {
	if s == "" {
		return adapterArg{}, fmt.Errorf("empty adapter argument")
	}
	if i := strings.LastIndexByte(s, ':'); i > 0 {
		if f, err := strconv.ParseFloat(s[i+1:], 32); err == nil {
			return adapterArg{Path: s[:i], Scale: float32(f)}, nil
		}
	}
	return adapterArg{Path: s, Scale: 1}, nil
}
