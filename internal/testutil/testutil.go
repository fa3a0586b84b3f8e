// Package testutil finds the shared test assets and quiets the engine's logs.
package testutil

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Shared returns the path of name inside the workplace's shared directory
// (../shared next to the repository root), failing the test if absent: the
// models and datasets there exist in CI.
func Shared(t testing.TB, name string) string {
	t.Helper()
	p, err := SharedPath(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// SharedPath is Shared for callers without a test (TestMain, once-only
// setup).
func SharedPath(name string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testutil: repository root not found")
		}
		dir = parent
	}
	p := filepath.Join(filepath.Dir(dir), "shared", name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("testutil: shared asset missing: %v", err)
	}
	return p, nil
}

// Quiet raises the default log level so ggml's and llama.cpp's info lines
// do not drown test output. Call it from TestMain.
func Quiet() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

// BuildBinary builds the sbora-serve command into a temporary directory
// and returns its path and a cleanup function. Tests that run the real
// binary call it from TestMain.
func BuildBinary(cmdDir string) (path string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "sbora-serve-bin-")
	if err != nil {
		return "", nil, err
	}
	path = filepath.Join(dir, "sbora-serve")
	build := exec.Command("go", "build", "-o", path, cmdDir)
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	return path, func() { os.RemoveAll(dir) }, nil
}
