// Command soak is a chaos soak of sbora-serve: the real binary on loopback
// under concurrent chat and text completions (streaming or not) over two
// dozen FA, FB and LoRA adapters composed up to four at a time, with a
// small bank and KV pool so adapters are evicted and sequences preempted,
// while clients disconnect at random moments, adapters in use are
// uploaded, replaced and deleted, and malformed, oversized and slow bodies
// and special-token floods arrive. At the end it checks that the process
// is alive, that file descriptors, goroutines and memory are back near
// their baseline, that every completed greedy response equals the same
// request run alone (F32 KV cache) and so never came from the wrong
// adapter, and it prints the faults injected and the requests lost.
//
//	go run ./bench/soak --duration 5m
//
// A one-minute run is part of make test (soak_test.go).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/llama"
)

// Config is one soak run.
type Config struct {
	Binary, Model string
	Duration      time.Duration
	Workers       int // inference clients
	Seed          uint64
	Log           io.Writer
	ServerLog     io.Writer // the server's stderr, when set
}

// Report is what a run found.
type Report struct {
	Requests, Completed, Verified int
	Ties                          int // verified responses that parted from the solo run at a near tie
	Mismatched                    []string
	Lost                          []string
	Faults                        map[string]int
	Outcomes                      map[string]int
	FDs, Goroutines               [2]float64 // baseline, end (FDs: besides registered adapters')
	RSS                           [2]int64
	Alive                         bool
}

// Failed lists what went wrong, empty when the run passed.
func (r *Report) Failed() []string {
	var f []string
	if !r.Alive {
		f = append(f, "the server died")
	}
	if len(r.Lost) > 0 {
		f = append(f, fmt.Sprintf("%d requests lost: %v", len(r.Lost), head(r.Lost, 5)))
	}
	if len(r.Mismatched) > 0 {
		f = append(f, fmt.Sprintf("%d greedy responses differ from the same request alone: %v", len(r.Mismatched), head(r.Mismatched, 3)))
	}
	if r.FDs[1] > r.FDs[0]+4 {
		f = append(f, fmt.Sprintf("file descriptors %v → %v", r.FDs[0], r.FDs[1]))
	}
	if r.Goroutines[1] > r.Goroutines[0]+8 {
		f = append(f, fmt.Sprintf("goroutines %v → %v", r.Goroutines[0], r.Goroutines[1]))
	}
	if float64(r.RSS[1]) > 1.3*float64(r.RSS[0])+64<<20 {
		f = append(f, fmt.Sprintf("RSS %d MiB → %d MiB", r.RSS[0]>>20, r.RSS[1]>>20))
	}
	if r.Completed == 0 || r.Verified == 0 {
		f = append(f, "nothing completed or nothing was verified")
	}
	return f
}

func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "requests %d: completed %d (%d greedy, verified against solo runs), parted at a near tie %d, mismatched %d, lost %d\n",
		r.Requests, r.Completed, r.Verified, r.Ties, len(r.Mismatched), len(r.Lost))
	fmt.Fprintf(&b, "outcomes: %s\n", counts(r.Outcomes))
	fmt.Fprintf(&b, "faults injected: %s\n", counts(r.Faults))
	fmt.Fprintf(&b, "file descriptors %v → %v, goroutines %v → %v, RSS %d → %d MiB, alive %v",
		r.FDs[0], r.FDs[1], r.Goroutines[0], r.Goroutines[1], r.RSS[0]>>20, r.RSS[1]>>20, r.Alive)
	return b.String()
}

func counts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func head(s []string, n int) []string { return s[:min(n, len(s))] }

const (
	apiKey   = "soak-key"
	adminKey = "soak-admin"
)

// Run executes a soak.
func Run(cfg Config) (*Report, error) {
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	work, err := os.MkdirTemp("", "sbora-soak-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	dir := filepath.Join(work, "adapters")
	spare := filepath.Join(work, "versions")
	os.MkdirAll(dir, 0o755)
	os.MkdirAll(spare, 0o755)
	base, err := llama.ReadBase(cfg.Model)
	if err != nil {
		return nil, err
	}
	variants := []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA}
	var stable []string
	for i := 0; i < 24; i++ {
		name := fmt.Sprintf("t%02d-%s", i, variants[i%3])
		if err := writeAdapter(base, filepath.Join(dir, name+".gguf"), variants[i%3], 4+2*(i%3), uint64(100+i)); err != nil {
			return nil, err
		}
		stable = append(stable, name)
	}
	// Churned adapters: two versions each, uploaded, replaced and deleted
	// while in use.
	churn := []string{"churn-fa", "churn-lora"}
	for i, name := range churn {
		for v := 0; v < 2; v++ {
			if err := writeAdapter(base, filepath.Join(spare, fmt.Sprintf("%s.v%d.gguf", name, v)), variants[2*i], 6, uint64(900+10*i+v)); err != nil {
				return nil, err
			}
		}
	}
	srv, err := startServer(cfg.Binary, cfg.Model, dir, cfg.ServerLog)
	if err != nil {
		return nil, err
	}
	defer srv.kill()
	s := &soak{cfg: cfg, srv: srv, stable: stable, churn: churn, spare: spare, rng: rand.New(rand.NewPCG(cfg.Seed, 7)),
		report: &Report{Faults: map[string]int{}, Outcomes: map[string]int{}}, versions: map[string][]int{}}
	for _, name := range churn {
		if err := s.upload(name, 0); err != nil {
			return nil, err
		}
	}
	// Warm up, then the baseline.
	for _, m := range append([]string{"stories260K"}, stable[:4]...) {
		if _, err := srv.post("/v1/completions", map[string]any{"model": m, "prompt": "Once upon a time", "max_tokens": 4}); err != nil {
			return nil, err
		}
	}
	http.DefaultClient.CloseIdleConnections()
	time.Sleep(200 * time.Millisecond)
	s.report.FDs[0], s.report.Goroutines[0], s.report.RSS[0] = srv.fds(), srv.metric("go_goroutines"), srv.rss()

	ctx, cancel := context.WithTimeout(context.Background(), cfg.Duration)
	defer cancel()
	var wg sync.WaitGroup
	for w := 0; w < cfg.Workers; w++ {
		rng := rand.New(rand.NewPCG(cfg.Seed, uint64(w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				s.inference(rng)
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(cfg.Seed, 1000))
		for ctx.Err() == nil {
			s.fault(rng)
		}
	}()
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(cfg.Seed, 2000))
		for ctx.Err() == nil {
			s.churnOnce(rng)
			time.Sleep(time.Duration(50+rng.IntN(200)) * time.Millisecond)
		}
	}()
	wg.Wait()
	fmt.Fprintf(cfg.Log, "chaos phase over: %d requests\n", s.report.Requests)

	// Verify greedy responses against solo runs.
	s.verify()
	http.DefaultClient.CloseIdleConnections()
	time.Sleep(500 * time.Millisecond)
	s.report.Alive = srv.alive()
	s.report.FDs[1], s.report.Goroutines[1], s.report.RSS[1] = srv.fds(), srv.metric("go_goroutines"), srv.rss()
	return s.report, nil
}

func writeAdapter(base *adapters.Base, path string, v adapters.Variant, rank int, seed uint64) error {
	a, err := adapters.NewRandom(base, adapters.RandomOptions{Name: filepath.Base(path), Variant: v, Rank: rank, Seed: seed, Std: 0.02})
	if err != nil {
		return err
	}
	return a.Save(path, adapters.SaveOptions{})
}

type soak struct {
	cfg    Config
	srv    *server
	stable []string
	churn  []string
	spare  string
	rng    *rand.Rand
	mu     sync.Mutex
	report *Report
	done   []completed
	// versions[name] lists the churned versions registered under name
	// (appended on every upload; -1 marks a deletion), for verification.
	versions map[string][]int
}

// completed is a greedy response to verify.
type completed struct {
	endpoint string
	body     map[string]any
	out      output
	churned  map[string][2]int // churned adapter → range of versions that may have served it
}

var prompts = []string{"Once upon a time", "The little dog", "Lily and Tom went to", "One day, a big bird", "Mom said",
	"The sun was hot and", "Ben had a red ball.", "In the park there was", "The cat jumped", "Sara found a box"}

func (s *soak) note(outcome string) {
	s.mu.Lock()
	s.report.Outcomes[outcome]++
	s.mu.Unlock()
}

func (s *soak) lost(what string) {
	s.mu.Lock()
	s.report.Lost = append(s.report.Lost, what)
	s.mu.Unlock()
}

func (s *soak) fault(rng *rand.Rand) {
	kinds := []string{"malformed-json", "oversized-body", "slow-body", "special-token-flood", "garbage-upload", "bad-params",
		"wrong-key", "unknown-adapter"}
	kind := kinds[rng.IntN(len(kinds))]
	s.mu.Lock()
	s.report.Faults[kind]++
	s.mu.Unlock()
	want := 400
	var status int
	var err error
	switch kind {
	case "malformed-json":
		status, err = s.srv.raw("/v1/chat/completions", "application/json", []byte(`{"model": "stories260K", "messages": [`), apiKey)
	case "oversized-body":
		want = 413
		big := fmt.Sprintf(`{"model": "stories260K", "prompt": %q}`, strings.Repeat("a", 300<<10))
		status, err = s.srv.raw("/v1/completions", "application/json", []byte(big), apiKey)
	case "slow-body":
		err = s.srv.slowBody()
		status = want
	case "special-token-flood":
		prompt := strings.Repeat("<s>", 1+rng.IntN(20000))
		status, err = s.srv.raw("/v1/completions", "application/json", mustJSON(map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": 2}), apiKey)
		if status == 200 {
			want = 200 // short floods fit the context
		}
	case "garbage-upload":
		garbage := make([]byte, 1+rng.IntN(4096))
		for i := range garbage {
			garbage[i] = byte(rng.IntN(256))
		}
		if rng.IntN(2) == 0 {
			copy(garbage, "GGUF\x03\x00\x00\x00")
		}
		status, err = s.srv.raw("/v1/adapters?name=garbage&replace=true", "application/octet-stream", garbage, adminKey)
	case "bad-params":
		status, err = s.srv.raw("/v1/completions", "application/json", []byte(`{"model": "stories260K", "prompt": "x", "temperature": 7, "top_p": -1}`), apiKey)
	case "wrong-key":
		want = 401
		status, err = s.srv.raw("/v1/completions", "application/json", []byte(`{"model": "stories260K", "prompt": "x"}`), "nope")
	case "unknown-adapter":
		want = 404
		status, err = s.srv.raw("/v1/completions", "application/json", []byte(`{"model": "nobody", "prompt": "x"}`), apiKey)
	}
	if err != nil || status != want {
		s.lost(fmt.Sprintf("fault %s: status %d (want %d) %v", kind, status, want, err))
	}
}

// churnOnce uploads a new version of a churned adapter, replaces it, or
// deletes it.
func (s *soak) churnOnce(rng *rand.Rand) {
	name := s.churn[rng.IntN(len(s.churn))]
	if rng.IntN(4) == 0 {
		s.mu.Lock()
		s.versions[name] = append(s.versions[name], -1)
		s.mu.Unlock()
		s.srv.do("DELETE", "/v1/adapters/"+name, nil, adminKey)
		s.mu.Lock()
		s.report.Faults["delete-in-use"]++
		s.mu.Unlock()
		return
	}
	if err := s.upload(name, rng.IntN(2)); err != nil {
		s.lost("churn upload: " + err.Error())
	}
	s.mu.Lock()
	s.report.Faults["replace-in-use"]++
	s.mu.Unlock()
}

func (s *soak) upload(name string, v int) error {
	raw, err := os.ReadFile(filepath.Join(s.spare, fmt.Sprintf("%s.v%d.gguf", name, v)))
	if err != nil {
		return err
	}
	// Record the version before it can serve anything.
	s.mu.Lock()
	s.versions[name] = append(s.versions[name], v)
	s.mu.Unlock()
	status, err := s.srv.raw("/v1/adapters?name="+name+"&replace=true", "application/octet-stream", raw, adminKey)
	if err != nil || status != 201 {
		return fmt.Errorf("upload %s v%d: %d %v", name, v, status, err)
	}
	return nil
}

// inference sends one random request, maybe giving up at a random moment.
func (s *soak) inference(rng *rand.Rand) {
	s.mu.Lock()
	s.report.Requests++
	s.mu.Unlock()
	endpoint := "/v1/completions"
	body := map[string]any{"max_tokens": 1 + rng.IntN(40)}
	prompt := prompts[rng.IntN(len(prompts))]
	if rng.IntN(2) == 0 {
		endpoint = "/v1/chat/completions"
		body["messages"] = []map[string]any{{"role": "user", "content": prompt}}
	} else {
		body["prompt"] = prompt
	}
	names := append(slices.Clone(s.stable), s.churn...)
	model := "stories260K"
	var used []string
	if rng.IntN(5) > 0 {
		model = names[rng.IntN(len(names))]
		used = append(used, model)
	}
	var extra []map[string]any
	for k := rng.IntN(4); k > 0; k-- {
		n := names[rng.IntN(len(names))]
		if !slices.Contains(used, n) {
			used = append(used, n)
			extra = append(extra, map[string]any{"name": n, "scale": float64(rng.IntN(15)+1) / 10})
		}
	}
	body["model"] = model
	if len(extra) > 0 {
		body["adapters"] = extra
	}
	greedy := rng.IntN(10) < 7
	if greedy {
		body["temperature"] = 0
		// Logprobs let verification tell a near tie (two tokens whose
		// logits differ by float32 summation order between batch shapes)
		// from a wrong computation.
		if endpoint == "/v1/completions" {
			body["logprobs"] = 5
		} else {
			body["logprobs"], body["top_logprobs"] = true, 5
		}
	} else {
		body["temperature"] = 0.8
		body["seed"] = rng.IntN(1000)
	}
	stream := rng.IntN(2) == 0
	body["stream"] = stream
	churnedAt := s.churnState(used)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	giveUp := rng.IntN(6) == 0
	if giveUp {
		// Queued, mid-prefill or mid-stream: anywhere in the first 400 ms.
		time.AfterFunc(time.Duration(rng.IntN(400))*time.Millisecond, cancel)
	}
	out, status, err := s.srv.generate(ctx, endpoint, body, stream)
	text := out.text
	switch {
	case giveUp && ctx.Err() != nil:
		s.note("client-gave-up")
	case err != nil:
		s.lost(fmt.Sprintf("%s %v: %v", endpoint, body["model"], err))
	case status == 200:
		s.note("ok")
		s.mu.Lock()
		s.report.Completed++
		if greedy {
			s.done = append(s.done, completed{endpoint: endpoint, body: body, out: out, churned: s.churnRange(churnedAt)})
		}
		s.mu.Unlock()
	case status == 404 && len(churnedAt) > 0:
		s.note("churned-adapter-absent")
	case status == 429:
		s.note("rejected-queue-full")
	default:
		s.lost(fmt.Sprintf("%s %v: status %d: %s", endpoint, body["model"], status, text))
	}
}

// churnState notes how many versions each churned adapter in used had
// when the request was sent.
func (s *soak) churnState(used []string) map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for _, n := range used {
		if slices.Contains(s.churn, n) {
			out[n] = len(s.versions[n])
		}
	}
	return out
}

// churnRange turns the state at send time into the range of version
// records that may have served the request: from the one before the last
// recorded then (a version is recorded before its upload or deletion is
// sent, so the server may still have had the previous one) to the newest
// now.
func (s *soak) churnRange(at map[string]int) map[string][2]int {
	out := map[string][2]int{}
	for n, k := range at {
		out[n] = [2]int{k - 2, len(s.versions[n]) - 1}
	}
	return out
}

// verify reruns every distinct completed greedy request alone and checks
// the response equals one a version it could have used gives. A response
// that parts from the solo one at a near tie (the token it took is within
// tieTolerance nats of the solo run's choice: batch shapes change float32
// summation order by ~1e-7 of the logits) counts as a tie, not a mismatch;
// a wrong adapter or corrupted cache does not produce ties.
func (s *soak) verify() {
	type key string
	solo := map[key]output{}
	for _, c := range s.done {
		alternatives := []map[string]any{c.body}
		for name, rg := range c.churned {
			var next []map[string]any
			seen := map[int]bool{}
			for i := max(rg[0], 0); i <= rg[1]; i++ {
				v := s.versions[name][i]
				if v < 0 || seen[v] {
					continue
				}
				seen[v] = true
				alias := fmt.Sprintf("verify-%s-v%d", name, v)
				s.ensureAlias(alias, name, v)
				for _, b := range alternatives {
					next = append(next, renamed(b, name, alias))
				}
			}
			alternatives = next
		}
		ok, tie := false, false
		var wants []string
		for _, b := range alternatives {
			b = clone(b)
			b["stream"] = false
			k := key(c.endpoint + string(mustJSON(b)))
			want, cached := solo[k]
			if !cached {
				out, status, err := s.srv.generate(context.Background(), c.endpoint, b, false)
				if err != nil || status != 200 {
					continue
				}
				solo[k], want = out, out
			}
			wants = append(wants, want.text)
			if want.text == c.out.text {
				ok = true
				break
			}
			if nearTie(c.out, want) {
				tie = true
			}
		}
		s.report.Verified++
		switch {
		case ok:
		case tie:
			s.report.Ties++
		default:
			s.report.Mismatched = append(s.report.Mismatched, fmt.Sprintf("%s %s: got %q, alone %q", c.endpoint, mustJSON(c.body), c.out.text, wants))
		}
	}
}

// tieTolerance is the largest logprob gap verification takes for a tie.
const tieTolerance = 2e-3

// eosPiece is how logprobs show stories260K's end-of-sequence token.
const eosPiece = "</s>"

// nearTie reports whether got and alone agree token by token up to a
// position where the token one took was within tieTolerance of the
// other's (by either run's logprobs), ending the sequence counting as a
// token.
func nearTie(got, alone output) bool {
	close := func(at tokenLP, a, b string) bool { // is b nearly as likely as a at this position?
		la, oka := at.top[a]
		lb, okb := at.top[b]
		return oka && okb && math.Abs(la-lb) <= tieTolerance
	}
	n := min(len(got.tokens), len(alone.tokens))
	for i := 0; i < n; i++ {
		g, a := got.tokens[i], alone.tokens[i]
		if g.token == a.token {
			continue
		}
		return close(a, a.token, g.token) || close(g, g.token, a.token)
	}
	switch {
	case len(got.tokens) < len(alone.tokens): // got ended where alone went on
		a := alone.tokens[n]
		return close(a, a.token, eosPiece)
	case len(alone.tokens) < len(got.tokens):
		g := got.tokens[n]
		return close(g, g.token, eosPiece)
	}
	return false
}

func (s *soak) ensureAlias(alias, name string, v int) {
	if status, _, _ := s.srv.do("GET", "/v1/adapters/"+alias, nil, apiKey); status == 200 {
		return
	}
	raw, _ := os.ReadFile(filepath.Join(s.spare, fmt.Sprintf("%s.v%d.gguf", name, v)))
	s.srv.raw("/v1/adapters?name="+alias, "application/octet-stream", raw, adminKey)
}

func renamed(b map[string]any, from, to string) map[string]any {
	out := clone(b)
	if out["model"] == from {
		out["model"] = to
	}
	if ex, ok := out["adapters"].([]map[string]any); ok {
		var n []map[string]any
		for _, a := range ex {
			c := map[string]any{"name": a["name"], "scale": a["scale"]}
			if c["name"] == from {
				c["name"] = to
			}
			n = append(n, c)
		}
		out["adapters"] = n
	}
	return out
}

func clone(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// server is the binary under test.
type server struct {
	cmd    *exec.Cmd
	url    string
	exited chan struct{}
	client *http.Client
}

var listenRE = regexp.MustCompile(`listening on (http://\S+)`)

func startServer(binary, model, dir string, log io.Writer) (*server, error) {
	cmd := exec.Command(binary, "serve", "--model", model, "--adapter-dir", dir, "--addr", "127.0.0.1:0", "--threads", "2",
		"--parallel", "6", "--ctx", "256", "--kv-tokens", "768", "--max-resident", "4", "--cache-f32", "--max-queue", "48",
		"--api-key", apiKey, "--admin-key", adminKey, "--max-request-bytes", "262144", "--body-timeout", "2s", "--drain-timeout", "5s")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{cmd: cmd, exited: make(chan struct{}), client: &http.Client{Timeout: 2 * time.Minute}}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if log != nil {
				fmt.Fprintln(log, sc.Text())
			}
			if m := listenRE.FindStringSubmatch(sc.Text()); m != nil {
				found <- m[1]
			}
		}
	}()
	go func() { cmd.Wait(); close(s.exited) }()
	select {
	case s.url = <-found:
		return s, nil
	case <-s.exited:
		return nil, errors.New("the server exited at start")
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		return nil, errors.New("the server did not start")
	}
}

func (s *server) alive() bool {
	select {
	case <-s.exited:
		return false
	default:
	}
	status, _, err := s.do("GET", "/health", nil, "")
	return err == nil && status == 200
}

func (s *server) kill() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(15 * time.Second):
		s.cmd.Process.Kill()
	}
}

// fds counts the server's open file descriptors beyond the one each
// registered adapter holds by design (its registered version stays
// readable after the file is replaced or deleted).
func (s *server) fds() float64 {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	return float64(len(ents)) - s.metric("sbora_registered_adapters")
}

func (s *server) rss() int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func (s *server) metric(name string) float64 {
	_, body, err := s.do("GET", "/metrics", nil, "")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(body), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == name {
			v, _ := strconv.ParseFloat(f[1], 64)
			return v
		}
	}
	return -1
}

func (s *server) do(method, path string, body []byte, key string) (int, []byte, error) {
	req, _ := http.NewRequest(method, s.url+path, bytes.NewReader(body))
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return resp.StatusCode, out, err
}

func (s *server) raw(path, contentType string, body []byte, key string) (int, error) {
	req, _ := http.NewRequest("POST", s.url+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

func (s *server) post(path string, body map[string]any) (string, error) {
	out, status, err := s.generate(context.Background(), path, body, false)
	if err == nil && status != 200 {
		err = fmt.Errorf("%s: status %d: %s", path, status, out.text)
	}
	return out.text, err
}

// slowBody sends headers and half a body, then stalls past the server's
// body timeout: the server must drop the connection on its own.
func (s *server) slowBody() error {
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		return err
	}
	defer conn.Close()
	body := `{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 2}`
	fmt.Fprintf(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		apiKey, len(body), body[:10])
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	// The server answers (408/400) or closes once its 2 s body timeout ends.
	buf := make([]byte, 512)
	_, err = conn.Read(buf)
	if err == nil || errors.Is(err, io.EOF) {
		return nil
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errors.New("the server kept a stalled body open for 10 s")
	}
	return nil
}

// output is a response's text (all choices' deltas joined) and, when it
// asked for logprobs, its tokens with their logprobs and alternatives.
type output struct {
	text   string
	tokens []tokenLP
}

type tokenLP struct {
	token string
	top   map[string]float64 // the alternatives and the token itself
}

// choiceLogprobs is a choice's logprobs in either endpoint's shape.
type choiceLogprobs struct {
	// Completions.
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	// Chat.
	Content []struct {
		Token       string  `json:"token"`
		Logprob     float64 `json:"logprob"`
		TopLogprobs []struct {
			Token   string  `json:"token"`
			Logprob float64 `json:"logprob"`
		} `json:"top_logprobs"`
	} `json:"content"`
}

func (o *output) add(lp *choiceLogprobs) {
	if lp == nil {
		return
	}
	for i, t := range lp.Tokens {
		e := tokenLP{token: t, top: map[string]float64{}}
		if i < len(lp.TopLogprobs) {
			for k, v := range lp.TopLogprobs[i] {
				e.top[k] = v
			}
		}
		if i < len(lp.TokenLogprobs) {
			e.top[t] = lp.TokenLogprobs[i]
		}
		o.tokens = append(o.tokens, e)
	}
	for _, c := range lp.Content {
		e := tokenLP{token: c.Token, top: map[string]float64{c.Token: c.Logprob}}
		for _, a := range c.TopLogprobs {
			e.top[a.Token] = a.Logprob
		}
		o.tokens = append(o.tokens, e)
	}
}

// generate sends a completion and returns its output and status (the
// error body as text when not 200).
func (s *server) generate(ctx context.Context, path string, body map[string]any, stream bool) (output, int, error) {
	var out output
	req, _ := http.NewRequestWithContext(ctx, "POST", s.url+path, bytes.NewReader(mustJSON(body)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := s.client.Do(req)
	if err != nil {
		return out, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !stream {
		raw, err := io.ReadAll(resp.Body)
		if err != nil {
			return out, resp.StatusCode, err
		}
		if resp.StatusCode != 200 {
			return output{text: string(raw)}, resp.StatusCode, nil
		}
		var r struct {
			Choices []struct {
				Text    string `json:"text"`
				Message struct {
					Content string `json:"content"`
				} `json:"message"`
				Logprobs *choiceLogprobs `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(raw, &r); err != nil || len(r.Choices) != 1 {
			return out, resp.StatusCode, fmt.Errorf("bad response %s", raw)
		}
		out.text = r.Choices[0].Text + r.Choices[0].Message.Content
		out.add(r.Choices[0].Logprobs)
		return out, 200, nil
	}
	var text strings.Builder
	sc := bufio.NewScanner(resp.Body)
	done := false
	for sc.Scan() {
		line := sc.Text()
		if line == "data: [DONE]" {
			done = true
			continue
		}
		if !strings.HasPrefix(line, "data: {") {
			continue
		}
		var c struct {
			Choices []struct {
				Text  string `json:"text"`
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
				Logprobs *choiceLogprobs `json:"logprobs"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(line[6:]), &c); err != nil {
			return out, 200, fmt.Errorf("bad chunk %s", line)
		}
		if c.Error != nil {
			return out, 200, fmt.Errorf("error chunk: %s", c.Error.Message)
		}
		for _, ch := range c.Choices {
			text.WriteString(ch.Text + ch.Delta.Content)
			out.add(ch.Logprobs)
		}
	}
	if err := sc.Err(); err != nil {
		return out, 200, err
	}
	if !done {
		return out, 200, errors.New("stream ended without [DONE]")
	}
	out.text = text.String()
	return out, 200, nil
}

func main() {
	var cfg Config
	flag.StringVar(&cfg.Binary, "binary", "bin/sbora-serve", "the sbora-serve binary (make build)")
	flag.StringVar(&cfg.Model, "model", "../shared/models/stories260K.gguf", "model GGUF")
	flag.DurationVar(&cfg.Duration, "duration", 2*time.Minute, "length of the chaos phase")
	flag.IntVar(&cfg.Workers, "workers", 12, "concurrent inference clients")
	flag.Uint64Var(&cfg.Seed, "seed", 1, "random seed")
	serverLog := flag.String("server-log", "", "write the server's log to this file")
	flag.Parse()
	if *serverLog != "" {
		f, err := os.Create(*serverLog)
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		defer f.Close()
		cfg.ServerLog = f
	}
	cfg.Log = os.Stderr
	r, err := Run(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	fmt.Println(r)
	if f := r.Failed(); len(f) > 0 {
		fmt.Println("FAILED:")
		for _, x := range f {
			fmt.Println(" -", x)
		}
		os.Exit(1)
	}
	fmt.Println("PASS")
}
