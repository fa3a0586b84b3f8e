package main

import (
	"os"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

var binary string

func TestMain(m *testing.M) {
	testutil.Quiet()
	path, cleanup, err := testutil.BuildBinary("../../cmd/sbora-serve")
	if err != nil {
		panic(err)
	}
	binary = path
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// TestSoak is the short chaos soak of make test (about a minute): see the
// package documentation for what it injects and checks.
func TestSoak(t *testing.T) {
	r, err := Run(Config{Binary: binary, Model: testutil.Shared(t, "models/stories260K.gguf"), Duration: 30 * time.Second,
		Workers: 10, Seed: 1, Log: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + r.String())
	for _, f := range r.Failed() {
		t.Error(f)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
