// Package loadtest drives a running sbora-serve with concurrent streaming
// completions and measures what a client sees: aggregate decode tok/s and
// time to first token. bench/loadgen and `sbora-serve check` both use it,
// so the two report the same quantity.
package loadtest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Prompt is what every request completes.
const Prompt = "Once upon a time, in a small village by the sea, there lived"

// Result is one scenario's measurement.
type Result struct {
	// TPS is decode throughput: tokens after each stream's first, over the
	// time from the median first token to the end.
	TPS float64
	// TTFTp50 and TTFTp99 are times to first token.
	TTFTp50, TTFTp99 time.Duration
}

// Run sends streams concurrent streaming requests of tokens tokens
// (ignore_eos, greedy) to url (a /v1/completions endpoint), stream i
// using model names[i % len(names)], or base when names is empty. It
// fails on the first request that fails.
func Run(url, base string, names []string, streams, tokens int) (Result, error) {
	var wg sync.WaitGroup
	ttft := make([]time.Duration, streams)
	decodeTokens := make([]int, streams)
	firsts := make([]time.Time, streams)
	errs := make([]error, streams)
	for i := 0; i < streams; i++ {
		model := base
		if len(names) > 0 {
			model = names[i%len(names)]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			first, n, err := stream(url, model, tokens)
			ttft[i], firsts[i], decodeTokens[i], errs[i] = first.Sub(t0), first, n-1, err
		}()
	}
	wg.Wait()
	end := time.Now()
	for _, err := range errs {
		if err != nil {
			return Result{}, err
		}
	}
	total := 0
	for _, n := range decodeTokens {
		total += n
	}
	slices.SortFunc(firsts, func(a, b time.Time) int { return a.Compare(b) })
	window := end.Sub(firsts[len(firsts)/2]).Seconds()
	slices.Sort(ttft)
	return Result{TPS: float64(total) / window, TTFTp50: ttft[len(ttft)/2], TTFTp99: ttft[min(len(ttft)-1, len(ttft)*99/100)]}, nil
}

// Request sends one non-streaming request (a warm-up: it makes model's
// adapter resident and sizes the server's buffers).
func Request(url, model string, maxTokens int) error {
	resp, err := http.Post(url, "application/json", bytes.NewReader(body(model, maxTokens, false)))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s: status %d", model, resp.StatusCode)
	}
	return nil
}

func body(model string, maxTokens int, stream bool) []byte {
	m := map[string]any{"model": model, "prompt": Prompt,
		"max_tokens": maxTokens, "temperature": 0, "stream": stream, "ignore_eos": true,
	}
	if stream {
		m["stream_options"] = map[string]any{"include_usage": true}
	}
	b, _ := json.Marshal(m)
	return b
}

// stream runs one streaming request and returns when its first token
// arrived and how many tokens were generated (from the usage chunk).
func stream(url, model string, maxTokens int) (time.Time, int, error) {
	resp, err := http.Post(url, "application/json", bytes.NewReader(body(model, maxTokens, true)))
	if err != nil {
		return time.Time{}, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return time.Time{}, 0, fmt.Errorf("%s: status %d", model, resp.StatusCode)
	}
	var first time.Time
	n := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "data: {") {
			continue
		}
		var chunk struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
			Usage *struct {
				Completion int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if json.Unmarshal([]byte(line[6:]), &chunk) != nil {
			continue
		}
		if first.IsZero() && len(chunk.Choices) > 0 && chunk.Choices[0].Text != "" {
			first = time.Now()
		}
		if chunk.Usage != nil {
			n = chunk.Usage.Completion
		}
	}
	if err := sc.Err(); err != nil {
		return first, n, err
	}
	if first.IsZero() || n == 0 {
		return first, n, fmt.Errorf("%s: the stream carried no tokens or no usage", model)
	}
	return first, n, nil
}
