package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

var binary string

func TestMain(m *testing.M) {
	testutil.Quiet()
	dir, err := os.MkdirTemp("", "sbora-cli-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "sbora-serve")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
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
