package train

import (
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

func storiesTokenizer(t *testing.T) (*Tokenizer, *llama.Model) {
	m := load(t, testutil.Shared(t, "models/stories260K.gguf"))
	tok, err := NewTokenizer(m)
	if err != nil {
		t.Fatal(err)
	}
	return tok, m
}

// lossText decodes the tokens an example trains on.
func lossText(t *testing.T, m *llama.Model, ex *Example) string {
	var ids []int32
	for i, l := range ex.Loss {
		if l && ex.Tokens[i] != 2 { // drop EOS
			ids = append(ids, ex.Tokens[i])
		}
	}
	s, err := m.Tokenizer.Decode(ids)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestDataFormats(t *testing.T) {
	tok, m := storiesTokenizer(t)
	in := strings.Join([]string{
		`{"prompt": "The cat sat", "completion": " on the mat."}`,
		`{"text": "Once upon a time."}`,
		`{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Good bye."}]}`,
		``,
	}, "\n")
	exs, err := ReadJSONL(strings.NewReader(in), "data.jsonl", tok, 256)
	if err != nil {
		t.Fatal(err)
	}
	if len(exs) != 3 {
		t.Fatalf("%d examples", len(exs))
	}
	for _, ex := range exs {
		if ex.Tokens[len(ex.Tokens)-1] != tok.EOS || !ex.Loss[len(ex.Loss)-1] {
			t.Error("examples must end with a trained EOS")
		}
		if ex.Loss[0] {
			t.Error("the first token has nothing to be predicted from")
		}
	}
	if got := lossText(t, m, exs[0]); got != " on the mat." {
		t.Errorf("prompt/completion trains on %q", got)
	}
	if got := lossText(t, m, exs[1]); got != " Once upon a time." { // SentencePiece's space prefix
		t.Errorf("text trains on %q", got)
	}
	// Fallback chat format: only the assistant turns (and their line ends).
	if got := lossText(t, m, exs[2]); got != " Hello there.\n Good bye.\n" {
		t.Errorf("chat example trains on %q, want the two assistant turns", got)
	}
}

func TestDataErrorsNameTheLine(t *testing.T) {
	tok, _ := storiesTokenizer(t)
	for _, c := range []struct{ data, want string }{
		{"{\"text\": \"ok\"}\n{\"text\": 5}\n", "data.jsonl:2: invalid JSON"},
		{"{\"text\": \"ok\"}\n\n{\"prompt\": \"x\"}\n", "data.jsonl:3: prompt and completion go together"},
		{"{\"prompt\": \"x\", \"completion\": \"y\", \"text\": \"z\"}\n", "data.jsonl:1: a line needs exactly one"},
		{"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n", "data.jsonl:1: no assistant message"},
		{"{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n", "data.jsonl:1: message 0 has role"},
		{"{\"text\": \"ok\", \"extra\": 1}\n", "data.jsonl:1: invalid JSON"},
		{"not json\n", "data.jsonl:1: invalid JSON"},
		{"", "data.jsonl: no examples"},
	} {
		_, err := ReadJSONL(strings.NewReader(c.data), "data.jsonl", tok, 256)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.data, err, c.want)
		}
	}
	// A prompt that fills the sequence leaves nothing to learn.
	_, err := ReadJSONL(strings.NewReader(`{"prompt": "`+strings.Repeat("the dog ", 50)+`", "completion": " ok"}`), "d", tok, 16)
	if err == nil || !strings.Contains(err.Error(), "--seq-len") {
		t.Errorf("overlong prompt: %v", err)
	}
}

// TestAvoidMakesDisjointIndices trains nothing: it checks that --avoid
// keeps a new adapter's indices disjoint from an existing one's, so the two
// compose without crosstalk.
func TestAvoidMakesDisjointIndices(t *testing.T) {
	_, m := storiesTokenizer(t)
	first, err := NewParams(m, InitOptions{Variant: "fa", Rank: 16, Targets: []adaptersModule{0, 1, 2, 3, 4, 5, 6}, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	a := first.Adapter("first", m.AdapterBase)
	second, err := NewParams(m, InitOptions{Variant: "fa", Rank: 16, Targets: []adaptersModule{0, 1, 2, 3, 4, 5, 6}, Seed: 1, Avoid: avoidList(a)})
	if err != nil {
		t.Fatal(err)
	}
	for i, mod := range second.Modules {
		used := map[int32]bool{}
		for _, x := range first.Modules[i].Index {
			used[x] = true
		}
		for _, x := range mod.Index {
			if used[x] {
				t.Fatalf("%s: index %d reused despite --avoid", mod.Target, x)
			}
		}
	}
	same, _ := NewParams(m, InitOptions{Variant: "fa", Rank: 16, Targets: []adaptersModule{0}, Seed: 1})
	if fmt_(same.Modules[0].Index) != fmt_(first.Modules[0].Index) {
		t.Fatal("index choice is not reproducible for a seed")
	}
}

type adaptersModule = adapters.Module

func avoidList(a *adapters.Adapter) []*adapters.Adapter { return []*adapters.Adapter{a} }

func fmt_(v []int32) string { return fmt.Sprint(v) }

func TestProgressRendering(t *testing.T) {
	var tty, plain strings.Builder
	for step := 1; step <= 3; step++ {
		ev := Event{Step: step, Steps: 3, Loss: 1.5, Elapsed: time.Duration(step) * time.Second, TokensPerS: 100, EvalLoss: math.NaN()}
		if step == 3 {
			ev.EvalLoss = 1.25
		}
		Progress(&tty, true)(ev)
		Progress(&plain, false)(ev)
	}
	if !strings.Contains(tty.String(), "\r[################........] step 2/3") || !strings.Contains(tty.String(), "eval_loss 1.2500\x1b[K\n") {
		t.Errorf("terminal progress: %q", tty.String())
	}
	if strings.Contains(plain.String(), "\r") || !strings.Contains(plain.String(), "step 1/3 loss 1.5000") || !strings.Contains(plain.String(), "step 3/3") {
		t.Errorf("plain progress: %q", plain.String())
	}
}
