package serve_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

var binary string

func TestMain(m *testing.M) {
	testutil.Quiet()
	path, cleanup, err := testutil.BuildBinary("../cmd/sbora-serve")
	if err != nil {
		panic(err)
	}
	binary = path
	code := m.Run()
	cleanup()
	os.RemoveAll(tmpRoot)
	os.Exit(code)
}

// server is the real binary listening on a loopback port.
type server struct {
	URL    string
	dir    string // adapter directory
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	header http.Header
}

var listenRE = regexp.MustCompile(`listening on (http://\S+)`)

// startServer runs sbora-serve on stories260K with the adapters in dir.
func startServer(t *testing.T, dir string, args ...string) *server {
	t.Helper()
	return startServerModel(t, testutil.Shared(t, "models/stories260K.gguf"), dir, args...)
}

// startServerModel runs sbora-serve on model with the adapters in dir.
func startServerModel(t *testing.T, model, dir string, args ...string) *server {
	t.Helper()
	all := append([]string{"serve", "--model", model, "--adapter-dir", dir, "--addr", "127.0.0.1:0", "--threads", "2"}, args...)
	cmd := exec.Command(binary, all...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{dir: dir, cmd: cmd, stderr: &bytes.Buffer{}, header: http.Header{}}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			s.stderr.WriteString(line + "\n")
			if m := listenRE.FindStringSubmatch(line); m != nil {
				found <- m[1]
			}
		}
		close(found)
	}()
	select {
	case url, ok := <-found:
		if !ok {
			cmd.Wait()
			t.Fatalf("server exited: %s", s.stderr)
		}
		s.URL = url
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("server did not start")
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			t.Errorf("server did not shut down on SIGTERM")
		}
	})
	return s
}

// do sends a request and returns status and body.
func (s *server) do(t *testing.T, method, path string, body any) (int, []byte) {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		r = bytes.NewReader(b)
	case string:
		r = strings.NewReader(b)
	default:
		js, _ := json.Marshal(b)
		r = bytes.NewReader(js)
	}
	req, _ := http.NewRequest(method, s.URL+path, r)
	for k, v := range s.header {
		req.Header[k] = v
	}
	if req.Header.Get("Content-Type") == "" && body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// complete runs a greedy text completion and returns its text.
func (s *server) complete(t *testing.T, model, prompt string, maxTokens int, extra map[string]any) (string, error) {
	req := map[string]any{"model": model, "prompt": prompt, "max_tokens": maxTokens, "temperature": 0}
	for k, v := range extra {
		req[k] = v
	}
	status, body := s.do(t, "POST", "/v1/completions", req)
	if status != 200 {
		return "", fmt.Errorf("status %d: %s", status, body)
	}
	var resp struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &resp); err != nil || len(resp.Choices) != 1 {
		return "", fmt.Errorf("bad response %s", body)
	}
	return resp.Choices[0].Text, nil
}

// metric reads one sample of /metrics (sum over label sets matching).
func (s *server) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	_, body := s.do(t, "GET", "/metrics", nil)
	total := 0.0
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		total += v
	}
	return total
}

// writeAdapters makes n random adapters (FA, FB and LoRA in turn) in dir
// and returns their names.
func writeAdapters(t *testing.T, dir string, n int, seed uint64) []string {
	t.Helper()
	base, err := llama.ReadBase(testutil.Shared(t, "models/stories260K.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	variants := []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA}
	var names []string
	for i := 0; i < n; i++ {
		v := variants[i%3]
		name := fmt.Sprintf("ad%d-%s", i, v)
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: name, Variant: v, Rank: 4 + 2*(i%3), Seed: seed + uint64(i), Std: 0.015})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Save(filepath.Join(dir, name+".gguf"), adapters.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	return names
}
