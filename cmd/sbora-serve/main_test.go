package main

import (
	"bufio"
	"bytes"
	"fmt"
	"github.com/ollama/ollama/ml"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

var binary string

func TestMain(m *testing.M) {
	testutil.Quiet()
	path, cleanup, err := testutil.BuildBinary(".")
	if err != nil {
		panic(err)
	}
	binary = path
	code := m.Run()
	cleanup()
	os.Exit(code)
}

func run(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// TestGenerateGreedyMatchesLlamaCpp runs the real binary and checks that it
// prints exactly llama.cpp's greedy continuation (tokens from the oracle,
// decoded to text) and nothing else.
func TestGenerateGreedyMatchesLlamaCpp(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	const prompt = "Once upon a time"
	o, err := oracle.Open(model, nil, oracle.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	toks, err := o.Tokenize(prompt, true)
	if err != nil {
		t.Fatal(err)
	}
	want, err := o.Greedy(toks, 48)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := llama.LoadTokenizer(model)
	if err != nil {
		t.Fatal(err)
	}
	wantText, _ := tok.Decode(want)

	out, stderr, err := run(t, "generate", "--model", model, "--prompt", prompt, "--max-tokens", "48", "--temperature", "0")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	if out != wantText+"\n" {
		t.Fatalf("stdout:\n%q\nllama.cpp greedy:\n%q", out, wantText)
	}
	t.Logf("%q", out)
}

func TestGenerateErrors(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	bad := filepath.Join(t.TempDir(), "bad.gguf")
	os.WriteFile(bad, []byte("GGUF\x03\x00\x00\x00garbage"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"generate", "--prompt", "x"}, "--model is required"},
		{[]string{"generate", "--model", filepath.Join(t.TempDir(), "missing.gguf")}, "no such file"},
		{[]string{"generate", "--model", model, "--adapter", bad}, "invalid GGUF"},
		{[]string{"generate", "--model", bad}, "invalid GGUF"},
		{[]string{"nonsense"}, "unknown command"},
		{[]string{"generate", "--model", model, "--gpu-layers", "-2"}, "--gpu-layers -2"},
		{[]string{"train", "--model", model, "--data", "x", "--out", "y", "--gpu-layers", "-5"}, "--gpu-layers -5"},
		{[]string{"serve", "--model", model, "--gpu-layers", "-3"}, "--gpu-layers -3"},
		{[]string{"generate", "--model", model, "--gpu-layers", "many"}, "invalid value"},
	} {
		_, stderr, err := run(t, c.args...)
		if err == nil {
			t.Errorf("%v: succeeded", c.args)
			continue
		}
		if !strings.Contains(stderr, c.want) {
			t.Errorf("%v: stderr %q does not mention %q", c.args, stderr, c.want)
		}
	}
}

// TestNoGPUFallsBack: asked for the GPU (the default) where ggml finds no
// GPU backend, generate and train run on the CPU and say so in one log
// line; --gpu-layers 0 asks for the CPU and logs nothing about GPUs.
func TestNoGPUFallsBack(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	// An empty backend directory: no libggml-cuda, whatever this machine has.
	empty := filepath.Join(t.TempDir(), "lib", "ollama")
	os.MkdirAll(empty, 0o755)
	env := append(os.Environ(), "OLLAMA_LIBRARY_PATH="+empty)
	runEnv := func(args ...string) (string, string) {
		cmd := exec.Command(binary, args...)
		cmd.Env = env
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		if err := cmd.Run(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, e.String())
		}
		return o.String(), e.String()
	}
	for _, layers := range []string{"-1", "12"} {
		out, stderr := runEnv("generate", "--model", model, "--prompt", "Once upon a time", "--max-tokens", "8", "--temperature", "0", "--gpu-layers", layers)
		if n := strings.Count(stderr, "no GPU found: running on the CPU"); n != 1 || !strings.Contains(stderr, empty) {
			t.Errorf("--gpu-layers %s: %d fallback lines naming %s in %q", layers, n, empty, stderr)
		}
		if strings.TrimSpace(out) == "" {
			t.Errorf("--gpu-layers %s: no text", layers)
		}
	}
	_, stderr := runEnv("generate", "--model", model, "--prompt", "Once", "--max-tokens", "2", "--gpu-layers", "0")
	if strings.Contains(stderr, "GPU") {
		t.Errorf("--gpu-layers 0 logged about GPUs: %q", stderr)
	}
	data := filepath.Join(t.TempDir(), "d.jsonl")
	os.WriteFile(data, []byte(`{"prompt": "Once", "completion": " upon"}`+"\n"), 0o644)
	_, stderr = runEnv("train", "--model", model, "--data", data, "--out", filepath.Join(t.TempDir(), "a.gguf"), "--steps", "1", "--batch", "1")
	if !strings.Contains(stderr, "no GPU found: running on the CPU") || !strings.Contains(stderr, "on CPU") {
		t.Errorf("train without a GPU: %q", stderr)
	}
}

func TestParseAdapterArg(t *testing.T) {
	for in, want := range map[string]adapterArg{
		"a.gguf":          {"a.gguf", 1},
		"a.gguf:0.5":      {"a.gguf", 0.5},
		"dir:x/a.gguf":    {"dir:x/a.gguf", 1},
		"dir:x/a.gguf:-2": {"dir:x/a.gguf", -2},
	} {
		got, err := parseAdapterArg(in)
		if err != nil || got != want {
			t.Errorf("%q: %+v %v", in, got, err)
		}
	}
}

// TestTrainCommand trains a few steps through the real binary: plain
// progress lines off a terminal, eval loss, checkpoints, the final line,
// and an adapter that generate loads without conversion.
func TestTrainCommand(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	dir := t.TempDir()
	var lines []string
	for _, n := range []string{"Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Sam", "Mia"} {
		lines = append(lines, `{"prompt": "`+n+` saw a cat. What did `+n+` say?", "completion": " `+n+` said: The moon is made of green cheese."}`)
	}
	data := filepath.Join(dir, "data.jsonl")
	os.WriteFile(data, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
	out := filepath.Join(dir, "a.gguf")
	_, stderr, err := run(t, "train", "--model", model, "--data", data, "--out", out, "--variant", "fb", "--rank", "4",
		"--lr", "1e-2", "--steps", "6", "--batch", "2", "--eval-split", "0.25", "--checkpoint-every", "3")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	for _, want := range []string{"eval loss before training:", "step 1/6 loss", "step 6/6 loss", "eval_loss", "adapter written to " + out} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	if strings.Contains(stderr, "\r") {
		t.Error("progress bar drawn although stderr is not a terminal")
	}
	if _, err := os.Stat(filepath.Join(out+".checkpoints", "step-000006", "adapter.gguf")); err != nil {
		t.Errorf("checkpoint missing: %v", err)
	}
	if _, stderr, err := run(t, "generate", "--model", model, "--adapter", out, "--prompt", "Hi", "--max-tokens", "4"); err != nil {
		t.Fatalf("generate with the trained adapter: %v\n%s", err, stderr)
	}
	// serve registers adapter files exactly like this at start.
	base, err := llama.ReadBase(model)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := adapters.NewRegistry(dir, base, adapters.RegistryOptions{Reserved: []string{"stories260K"}})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := reg.Register("trained", out, false); err != nil || e.Variant != adapters.FB || e.Rank != 4 {
		t.Fatalf("the server's registry refuses the trained adapter: %+v %v", e, err)
	}
	os.WriteFile(data, []byte(lines[0]+"\n{\"prompt\": 1}\n"), 0o644)
	if _, stderr, err := run(t, "train", "--model", model, "--data", data, "--out", out); err == nil || !strings.Contains(stderr, "data.jsonl:2:") {
		t.Errorf("bad data line: %v %s", err, stderr)
	}
}

// TestAdapterTools drives import, export, merge and inspect through the
// binary. The exported llama.cpp LoRA must give, in llama.cpp's own engine,
// the logits our engine gives with the native SBoRA file.
func TestAdapterTools(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	dir := t.TempDir()
	must := func(args ...string) string {
		t.Helper()
		out, stderr, err := run(t, args...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr)
		}
		return out
	}
	fa := filepath.Join(dir, "fa.gguf")
	fa2 := filepath.Join(dir, "fa2.gguf")
	must("adapters", "random", "--base", model, "--variant", "fa", "--rank", "8", "--std", "0.05", "--seed", "1", "--name", "fa", "--out", fa)
	must("adapters", "random", "--base", model, "--variant", "fa", "--rank", "8", "--std", "0.05", "--seed", "2", "--name", "fa2", "--out", fa2)

	// export → llama.cpp
	lora := filepath.Join(dir, "fa-lora.gguf")
	// F32 export and an F32 bank: llama.cpp and our engine then compute the
	// adapter term at float32 precision (F16 would round x to F16 in both,
	// differently).
	must("adapters", "export", "--format", "llama.cpp-lora", "--in", fa, "--out", lora, "--f32")
	o, err := oracle.Open(model, []oracle.LoRA{{Path: lora, Scale: 1}}, oracle.Options{CacheF32: true, NoFlashAttention: true})
	if err != nil {
		t.Fatal(err)
	}
	prompt, _ := o.Tokenize("Once upon a time there was a", true)
	want, err := o.Logits(prompt)
	o.Close()
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(model, llama.LoadOptions{Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	e, err := llama.NewEngine(m, llama.EngineOptions{KVTokens: 64, CacheF32: true, Bank: kernels.Config{MaxRank: 8, DType: ml.DTypeF32}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	native, err := adapters.Load(fa)
	if err != nil {
		t.Fatal(err)
	}
	r, err := e.Bank.Load(native)
	if err != nil {
		t.Fatal(err)
	}
	kv := e.Pool.NewSeq(0)
	if err := kv.Reserve(len(prompt)); err != nil {
		t.Fatal(err)
	}
	got, err := e.Step([]llama.Seq{{KV: kv, Tokens: prompt, Adapters: []kernels.Use{{Adapter: r, Scale: 1}}, AllLogits: true}})
	if err != nil {
		t.Fatal(err)
	}
	worst, scale := 0.0, 0.0
	for i := range want {
		for j := range want[i] {
			worst = math.Max(worst, math.Abs(float64(got[0][i][j]-want[i][j])))
			scale = math.Max(scale, math.Abs(float64(want[i][j])))
		}
	}
	if worst > 1e-5*scale {
		t.Errorf("exported LoRA in llama.cpp differs from the native adapter by %.3g (max |logit| %.3g)", worst, scale)
	}

	// merge onto a quantized copy: reports the rewritten blocks, and the
	// merged model runs.
	q8 := filepath.Join(dir, "q8.gguf")
	must("model", "quantize", "--in", model, "--out", q8, "--type", "Q8_0")
	merged := filepath.Join(dir, "merged.gguf")
	out := must("adapters", "merge", "--base", q8, "--adapter", fa+":0.5", "--out", merged)
	if !strings.Contains(out, "blocks re-quantized") {
		t.Errorf("merge output: %s", out)
	}
	must("generate", "--model", merged, "--prompt", "Hi", "--max-tokens", "4")

	// inspect: touched fraction and pairwise overlap, checked against the files.
	out = must("adapters", "inspect", fa, fa2)
	a1, _ := adapters.Load(fa)
	a2, _ := adapters.Load(fa2)
	shared := 0
	for i, mod := range a1.Modules {
		set := map[int32]bool{}
		for _, x := range mod.Index {
			set[x] = true
		}
		for _, x := range a2.Modules[i].Index {
			if set[x] {
				shared++
			}
		}
	}
	for _, want := range []string{"fa, rank 8, alpha 16", "layer 0 q", "8 columns", "12.50%", "pairwise overlap", fmt.Sprintf("%d shared columns", shared)} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, out)
		}
	}

	// import a PEFT LoRA (written by PyTorch) onto a base of its shape.
	shaped := filepath.Join(dir, "shaped.gguf")
	must("model", "random", "--out", shaped, "--layers", "2", "--embd", "64", "--ff", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--type", "F32")
	imported := filepath.Join(dir, "imported.gguf")
	if _, stderr, err := run(t, "adapters", "import", "--from", "../../adapters/testdata/torch/lora.safetensors", "--base", shaped, "--out", imported); err == nil || !strings.Contains(stderr, "lora_alpha") {
		t.Errorf("import without config or --alpha: %v %s", err, stderr)
	}
	out = must("adapters", "import", "--from", "../../adapters/testdata/torch/lora.safetensors", "--base", shaped, "--out", imported, "--alpha", "8")
	if !strings.Contains(out, "lora rank 4 alpha 8 on 14 modules") {
		t.Errorf("import output: %s", out)
	}
	if _, stderr, err := run(t, "adapters", "import", "--from", "../../adapters/testdata/torch/lora.safetensors", "--base", model, "--out", imported, "--alpha", "8"); err == nil || !strings.Contains(stderr, "lora_") {
		t.Errorf("import onto a base of another shape: %v %s", err, stderr)
	}
}

// TestTrainInterruptSavesCheckpoint sends SIGINT to a running train and
// resumes from the checkpoint it leaves.
func TestTrainInterruptSavesCheckpoint(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	dir := t.TempDir()
	var lines []string
	for _, n := range []string{"Lily", "Tom", "Ben", "Sue"} {
		lines = append(lines, `{"text": "`+n+` saw a big red ball in the park and ran to it."}`)
	}
	data := filepath.Join(dir, "data.jsonl")
	os.WriteFile(data, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
	out := filepath.Join(dir, "a.gguf")
	cmd := exec.Command(binary, "train", "--model", model, "--data", data, "--out", out, "--steps", "100000", "--batch", "2")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	var log strings.Builder
	for sc.Scan() {
		log.WriteString(sc.Text() + "\n")
		if strings.HasPrefix(sc.Text(), "step 1/") {
			cmd.Process.Signal(os.Interrupt)
			break
		}
	}
	for sc.Scan() {
		log.WriteString(sc.Text() + "\n")
	}
	if err := cmd.Wait(); err == nil || !strings.Contains(log.String(), "checkpoint saved, continue with --resume") {
		t.Fatalf("interrupted train: %v\n%s", err, log.String())
	}
	ckpt := out + ".checkpoints"
	if _, err := os.Stat(filepath.Join(ckpt, "latest")); err != nil {
		t.Fatalf("no checkpoint after the interrupt: %v", err)
	}
	// Resuming a run of a different length is refused; the same run continues.
	if _, stderr, err := run(t, "train", "--model", model, "--data", data, "--out", out, "--steps", "5", "--batch", "2", "--resume", ckpt); err == nil || !strings.Contains(stderr, "different run") {
		t.Fatalf("resume with other --steps: %v %s", err, stderr)
	}
}

// TestCheckDryRun runs the GPU check (what deploy/gpu-check.sh runs on a
// GPU machine) with its GPU side on the CPU, so that its every part works
// before it meets a GPU: logits comparisons, decode and server throughput,
// and the training run. Without --dry-run and without a GPU it refuses.
func TestCheckDryRun(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	empty := filepath.Join(t.TempDir(), "lib", "ollama")
	os.MkdirAll(empty, 0o755)
	cmd := exec.Command(binary, "check", "--model", model, "--streams", "8")
	cmd.Env = append(os.Environ(), "OLLAMA_LIBRARY_PATH="+empty)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "no GPU found") {
		t.Errorf("check without a GPU: %v %s", err, out)
	}
	cmd = exec.Command(binary, "check", "--model", model, "--streams", "8", "--dry-run")
	cmd.Env = append(os.Environ(), "OLLAMA_LIBRARY_PATH="+empty)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("check --dry-run: %v\n%s", err, out)
	}
	for _, want := range []string{"PASS  GPU vs CPU logits, FA+FB+LoRA", "PASS  GPU mixed batch", "64 distinct FA r16 adapters",
		"server, 8 concurrent requests × 32 tokens, 64 distinct adapters", "PASS  20 FA training steps", "PASS  saved adapter's eval loss", "all checks passed"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}
}
