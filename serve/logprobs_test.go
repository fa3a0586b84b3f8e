package serve_test

import (
	"encoding/json"
	"math"
	"path/filepath"
	"slices"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/modelfile"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// completionLogprobs is the legacy logprobs object of a text completion.
type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float64           `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

type completionResponse struct {
	Choices []struct {
		Index    int                 `json:"index"`
		Text     string              `json:"text"`
		Logprobs *completionLogprobs `json:"logprobs"`
		Finish   string              `json:"finish_reason"`
	} `json:"choices"`
	Usage struct {
		Prompt     int `json:"prompt_tokens"`
		Completion int `json:"completion_tokens"`
	} `json:"usage"`
}

func (s *server) completion(t *testing.T, req map[string]any) completionResponse {
	t.Helper()
	status, body := s.do(t, "POST", "/v1/completions", req)
	if status != 200 {
		t.Fatalf("completion %v: %d %s", req, status, body)
	}
	var out completionResponse
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// logSoftmax in float64: the reference log probabilities of logits.
func logSoftmax(logits []float32) []float64 {
	m := math.Inf(-1)
	for _, l := range logits {
		m = math.Max(m, float64(l))
	}
	sum := 0.0
	for _, l := range logits {
		sum += math.Exp(float64(l) - m)
	}
	lse := m + math.Log(sum)
	out := make([]float64, len(logits))
	for i, l := range logits {
		out[i] = float64(l) - lse
	}
	return out
}

// topK is the k most likely ids (ties: lower id first).
func topK(lp []float64, k int) []int32 {
	ids := make([]int32, len(lp))
	for i := range ids {
		ids[i] = int32(i)
	}
	slices.SortStableFunc(ids, func(a, b int32) int {
		switch {
		case lp[a] > lp[b]:
			return -1
		case lp[a] < lp[b]:
			return 1
		}
		return 0
	})
	return ids[:k]
}

// close enough: the server's F16 KV cache and kernels are not the
// oracle's bit for bit; the logits of this tiny model differ in the third
// decimal, more for unlikely tokens.
func near(got, want float64) bool { return math.Abs(got-want) <= 2e-3+5e-4*math.Abs(want) }

// checkAgainst compares a completion's logprobs (generated tokens only,
// from entry first on) with the reference logits of every position of
// prompt+generated.
func checkAgainst(t *testing.T, what string, tok interface {
	Decode([]int32) (string, error)
}, lp *completionLogprobs, first int, tokens []int32, ref [][]float32, from int, k int) {
	t.Helper()
	for i := from; i < len(tokens); i++ {
		e := first + i - from
		if e >= len(lp.TokenLogprobs) {
			t.Fatalf("%s: %d logprob entries, want more", what, len(lp.TokenLogprobs))
		}
		want := logSoftmax(ref[i-1])
		got := lp.TokenLogprobs[e]
		if got == nil || !near(*got, want[tokens[i]]) {
			t.Fatalf("%s: token %d (%d): logprob %v, reference %.5f", what, i, tokens[i], got, want[tokens[i]])
		}
		text, _ := tok.Decode([]int32{tokens[i]})
		if lp.Tokens[e] != text {
			t.Errorf("%s: token %d is %q, want %q", what, i, lp.Tokens[e], text)
		}
		if k > 0 {
			for _, id := range topK(want, k) {
				text, _ := tok.Decode([]int32{id})
				v, ok := lp.TopLogprobs[e][text]
				if !ok || !near(v, want[id]) {
					t.Fatalf("%s: position %d: top %q = %v (present %v), reference %.5f; got %v", what, i, text, v, ok, want[id], lp.TopLogprobs[e])
				}
			}
		}
	}
}

// TestLogprobsMatchLlamaCpp: completion logprobs and top alternatives are
// the log-softmax of llama.cpp's logits (C API) at every position;
// echo's prompt logprobs are llama.cpp's teacher-forced ones (the first
// null), also when the prompt comes from the prefix cache; chat logprobs,
// streamed or not, are the same numbers.
func TestLogprobsMatchLlamaCpp(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	s := startServer(t, t.TempDir(), "--ctx", "256")
	o, err := oracle.Open(model, nil, oracle.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	tok, err := llama.LoadTokenizer(model)
	if err != nil {
		t.Fatal(err)
	}
	prompt, _ := o.Tokenize("Once upon a time, there was a little", true)
	gen, _ := o.Greedy(prompt, 8)
	all := append(slices.Clone(prompt), gen...)
	ref, err := o.Logits(all)
	if err != nil {
		t.Fatal(err)
	}

	r := s.completion(t, map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3})
	lp := r.Choices[0].Logprobs
	if lp == nil || len(lp.TokenLogprobs) != 8 {
		t.Fatalf("logprobs %+v", lp)
	}
	checkAgainst(t, "completion", tok, lp, 0, all, ref, len(prompt), 3)

	// Echo: the prompt's logprobs first; run twice (the second finds the
	// prompt in the prefix cache) and with max_tokens 0.
	for _, maxTokens := range []int{1, 1, 0} {
		r := s.completion(t, map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": maxTokens, "temperature": 0, "logprobs": 2, "echo": true})
		lp := r.Choices[0].Logprobs
		if lp == nil || len(lp.TokenLogprobs) != len(prompt)+maxTokens || lp.TokenLogprobs[0] != nil || lp.TopLogprobs[0] != nil {
			t.Fatalf("echo (max_tokens %d): %+v", maxTokens, lp)
		}
		checkAgainst(t, "echo", tok, lp, 1, all[:len(prompt)+maxTokens], ref, 1, 2)
		want := s.detokenize(t, prompt)
		if maxTokens == 0 && r.Choices[0].Text != want {
			t.Errorf("echo text %q, want the prompt %q", r.Choices[0].Text, want)
		}
	}

	// Chat: the prompt as /tokenize renders it, logprobs as above.
	msgs := []map[string]any{{"role": "user", "content": "Tell me about a cat."}}
	var tk struct{ Tokens []int32 }
	status, body := s.do(t, "POST", "/tokenize", map[string]any{"model": "stories260K", "messages": msgs})
	if status != 200 || json.Unmarshal(body, &tk) != nil {
		t.Fatalf("tokenize: %d %s", status, body)
	}
	chatGen, _ := o.Greedy(tk.Tokens, 6)
	chatAll := append(slices.Clone(tk.Tokens), chatGen...)
	chatRef, _ := o.Logits(chatAll)
	req := map[string]any{"model": "stories260K", "messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2}
	var chat struct {
		Choices []struct {
			Logprobs struct {
				Content []chatLogprob `json:"content"`
			} `json:"logprobs"`
		} `json:"choices"`
	}
	status, body = s.do(t, "POST", "/v1/chat/completions", req)
	if status != 200 || json.Unmarshal(body, &chat) != nil || len(chat.Choices) != 1 {
		t.Fatalf("chat: %d %s", status, body)
	}
	content := chat.Choices[0].Logprobs.Content
	asLegacy := &completionLogprobs{}
	for _, c := range content {
		lp := c.Logprob
		asLegacy.Tokens = append(asLegacy.Tokens, c.Token)
		asLegacy.TokenLogprobs = append(asLegacy.TokenLogprobs, &lp)
		top := map[string]float64{}
		for _, a := range c.Top {
			top[a.Token] = a.Logprob
		}
		asLegacy.TopLogprobs = append(asLegacy.TopLogprobs, top)
		if string(c.Bytes) != c.Token {
			t.Errorf("chat token %q has bytes %v", c.Token, c.Bytes)
		}
	}
	checkAgainst(t, "chat", tok, asLegacy, 0, chatAll, chatRef, len(tk.Tokens), 2)

	req["stream"] = true
	var streamed []chatLogprob
	for _, ch := range s.streamChunks(t, "/v1/chat/completions", req) {
		for _, c := range ch.Choices {
			if c.Logprobs != nil {
				streamed = append(streamed, c.Logprobs.Content...)
			}
		}
	}
	if len(streamed) != len(content) {
		t.Fatalf("stream has %d logprob entries, non-stream %d", len(streamed), len(content))
	}
	for i := range content {
		if streamed[i].Token != content[i].Token || streamed[i].Logprob != content[i].Logprob || len(streamed[i].Top) != 2 {
			t.Errorf("stream entry %d %+v, non-stream %+v", i, streamed[i], content[i])
		}
	}
}

type chatLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   byteArr `json:"bytes"`
	Top     []struct {
		Token   string  `json:"token"`
		Logprob float64 `json:"logprob"`
	} `json:"top_logprobs"`
}

// byteArr decodes a JSON array of byte values.
type byteArr []byte

func (b *byteArr) UnmarshalJSON(raw []byte) error {
	var ints []int
	if err := json.Unmarshal(raw, &ints); err != nil {
		return err
	}
	*b = make([]byte, len(ints))
	for i, v := range ints {
		(*b)[i] = byte(v)
	}
	return nil
}

// TestAdapterLogprobsMatchMergedModel: with an adapter, logprobs (and the
// echoed prompt's) are those of the merged-weight model under llama.cpp.
func TestAdapterLogprobsMatchMergedModel(t *testing.T) {
	model := testutil.Shared(t, "models/stories260K.gguf")
	dir := t.TempDir()
	names := writeAdapters(t, dir, 2, 41)
	s := startServer(t, dir, "--ctx", "256", "--cache-f32", "--bank-type", "f32")
	base, err := llama.ReadBase(model)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := llama.LoadTokenizer(model)
	for _, name := range names {
		a, err := adapters.Load(filepath.Join(dir, name+".gguf"))
		if err != nil {
			t.Fatal(err)
		}
		merged := filepath.Join(t.TempDir(), "merged.gguf")
		if _, err := modelfile.Merge(model, merged, base, []modelfile.Weighted{{Adapter: a, Scale: 1}}); err != nil {
			t.Fatal(err)
		}
		o, err := oracle.Open(merged, nil, oracle.Options{CacheF32: true, NoFlashAttention: true})
		if err != nil {
			t.Fatal(err)
		}
		prompt, _ := o.Tokenize("The little dog ran to the", true)
		gen, _ := o.Greedy(prompt, 6)
		all := append(slices.Clone(prompt), gen...)
		ref, _ := o.Logits(all)
		o.Close()
		r := s.completion(t, map[string]any{"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": true})
		lp := r.Choices[0].Logprobs
		if lp == nil || len(lp.TokenLogprobs) != len(all) {
			t.Fatalf("%s: logprobs %+v", name, lp)
		}
		checkAgainst(t, name, tok, lp, 1, all, ref, 1, 2)
		// Not vacuous: the adapter moves the logprobs.
		b := s.completion(t, map[string]any{"model": "stories260K", "prompt": prompt, "max_tokens": 0, "logprobs": 0, "echo": true})
		moved := 0.0
		for i := 1; i < len(prompt); i++ {
			moved = math.Max(moved, math.Abs(*b.Choices[0].Logprobs.TokenLogprobs[i]-*lp.TokenLogprobs[i]))
		}
		if moved < 0.05 {
			t.Errorf("%s moves the prompt's logprobs by at most %.3g: the comparison is vacuous", name, moved)
		}
	}
}

func (s *server) detokenize(t *testing.T, toks []int32) string {
	t.Helper()
	var out struct{ Prompt string }
	status, body := s.do(t, "POST", "/detokenize", map[string]any{"model": "stories260K", "tokens": toks})
	if status != 200 || json.Unmarshal(body, &out) != nil {
		t.Fatalf("detokenize: %d %s", status, body)
	}
	return out.Prompt
}
