package train

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/llama"
)

// Example is one training sequence: Loss[i] marks tokens the model is
// trained to predict (from position i-1).
type Example struct {
	Tokens []int32
	Loss   []bool
}

// Targets counts the loss tokens.
func (e *Example) Targets() int {
	n := 0
	for i, l := range e.Loss {
		if l && i > 0 {
			n++
		}
	}
	return n
}

// record is one JSONL line in any of the accepted shapes.
type record struct {
	Prompt     *string         `json:"prompt"`
	Completion *string         `json:"completion"`
	Text       *string         `json:"text"`
	Messages   []llama.Message `json:"messages"`
}

// Tokenizer is what the data loader needs of a model.
type Tokenizer struct {
	Tok  tokenizer.Tokenizer
	Chat *llama.ChatTemplate
	EOS  int32
	// BOSText is the BOS token's text (chat templates may render it).
	BOSText string
}

// NewTokenizer collects m's tokenizer, chat template and EOS.
func NewTokenizer(m *llama.Model) (*Tokenizer, error) {
	chat, err := llama.NewChatTemplate(m.Backend().Config())
	if err != nil {
		return nil, err
	}
	v := m.Tokenizer.Vocabulary()
	t := &Tokenizer{Tok: m.Tokenizer, Chat: chat, EOS: v.EOS[0]}
	if len(v.BOS) > 0 && int(v.BOS[0]) < len(v.Values) {
		t.BOSText = v.Values[v.BOS[0]]
	}
	return t, nil
}

func (t *Tokenizer) encode(text string) ([]int32, error) {
	return t.Tok.Encode(text, !strings.HasPrefix(text, t.BOSText) || t.BOSText == "")
}

// LoadJSONL reads examples: {"prompt","completion"} (loss on the
// completion), {"text"} (loss on everything) or {"messages"} (chat template
// applied, loss on assistant turns). Every example ends with EOS, which is
// trained too. Sequences are cut to seqLen tokens. A bad line is an error
// naming it.
func LoadJSONL(path string, tok *Tokenizer, seqLen int) ([]*Example, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadJSONL(f, path, tok, seqLen)
}

// ReadJSONL is LoadJSONL on a reader; name labels errors.
func ReadJSONL(r io.Reader, name string, tok *Tokenizer, seqLen int) ([]*Example, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	var out []*Example
	line := 0
	for sc.Scan() {
		line++
		raw := bytes.TrimSpace(sc.Bytes())
		if len(raw) == 0 {
			continue
		}
		ex, err := tok.example(raw)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, line, err)
		}
		if len(ex.Tokens) > seqLen {
			ex.Tokens, ex.Loss = ex.Tokens[:seqLen], ex.Loss[:seqLen]
		}
		if ex.Targets() == 0 {
			return nil, fmt.Errorf("%s:%d: no tokens to learn after cutting to --seq-len %d (the prompt fills the sequence)", name, line, seqLen)
		}
		out = append(out, ex)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s:%d: %w", name, line+1, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no examples", name)
	}
	return out, nil
}

func (t *Tokenizer) example(raw []byte) (*Example, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var r record
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("invalid JSON: %v (want {\"prompt\",\"completion\"}, {\"text\"} or {\"messages\"})", err)
	}
	kinds := 0
	if r.Prompt != nil || r.Completion != nil {
		kinds++
	}
	if r.Text != nil {
		kinds++
	}
	if r.Messages != nil {
		kinds++
	}
	if kinds != 1 {
		return nil, fmt.Errorf("a line needs exactly one of prompt+completion, text or messages")
	}
	switch {
	case r.Text != nil:
		if *r.Text == "" {
			return nil, fmt.Errorf("empty text")
		}
		toks, err := t.encode(*r.Text)
		if err != nil {
			return nil, err
		}
		return t.finish(toks, 1), nil
	case r.Messages != nil:
		return t.chatExample(r.Messages)
	default:
		if r.Prompt == nil || r.Completion == nil {
			return nil, fmt.Errorf("prompt and completion go together")
		}
		if *r.Completion == "" {
			return nil, fmt.Errorf("empty completion")
		}
		full, err := t.encode(*r.Prompt + *r.Completion)
		if err != nil {
			return nil, err
		}
		prefix, err := t.encode(*r.Prompt)
		if err != nil {
			return nil, err
		}
		return t.finish(full, commonPrefix(full, prefix)), nil
	}
}

// finish appends EOS and marks tokens from `from` on as targets.
func (t *Tokenizer) finish(toks []int32, from int) *Example {
	toks = append(toks, t.EOS)
	loss := make([]bool, len(toks))
	for i := max(from, 1); i < len(toks); i++ {
		loss[i] = true
	}
	return &Example{Tokens: toks, Loss: loss}
}

// genPrompt renders conversations as a prompt for the assistant's next
// turn (the turn boundaries below are found from such renderings).
var genPrompt = llama.RenderOptions{AddGenerationPrompt: true}

// chatExample renders the conversation and trains on each assistant turn:
// from where the template starts the turn to where it ends it.
func (t *Tokenizer) chatExample(msgs []llama.Message) (*Example, error) {
	if len(msgs) == 0 {
		return nil, fmt.Errorf("messages is empty")
	}
	last := -1
	for i, m := range msgs {
		switch m.Role {
		case "system", "user", "assistant":
		default:
			return nil, fmt.Errorf("message %d has role %q (want system, user or assistant)", i, m.Role)
		}
		if m.Role == "assistant" {
			last = i
		}
	}
	if last < 0 {
		return nil, fmt.Errorf("no assistant message to learn")
	}
	msgs = msgs[:last+1]
	full, err := t.Chat.Render(msgs, genPrompt)
	if err != nil {
		return nil, err
	}
	// Where does assistant turn i end inside the full rendering? Render
	// the conversation up to it twice, once followed by the template's
	// generation prompt and once by a further user turn: the text shared
	// with the full rendering ends where the turn's own markup ends.
	turnEnd := func(i int) (int, error) {
		withPrompt, err := t.Chat.Render(msgs[:i+1], genPrompt)
		if err != nil {
			return 0, err
		}
		nextUser, err := t.Chat.Render(append(append([]llama.Message(nil), msgs[:i+1]...), llama.Message{Role: "user", Content: "\x00"}), genPrompt)
		if err != nil {
			return 0, err
		}
		return min(commonPrefixString(full, withPrompt), commonPrefixString(full, nextUser)), nil
	}
	end, err := turnEnd(last)
	if err != nil {
		return nil, err
	}
	full = full[:end]
	toks, err := t.encode(full)
	if err != nil {
		return nil, err
	}
	loss := make([]bool, len(toks)+1)
	for i, m := range msgs {
		if m.Role != "assistant" {
			continue
		}
		start, err := t.Chat.Render(msgs[:i], genPrompt)
		if err != nil {
			return nil, err
		}
		end, err := turnEnd(i)
		if err != nil {
			return nil, err
		}
		s, err := t.tokenOffset(toks, full[:min(len(start), len(full))])
		if err != nil {
			return nil, err
		}
		e, err := t.tokenOffset(toks, full[:end])
		if err != nil {
			return nil, err
		}
		for k := max(s, 1); k < e; k++ {
			loss[k] = true
		}
	}
	toks = append(toks, t.EOS)
	loss[len(toks)-1] = true
	return &Example{Tokens: toks, Loss: loss}, nil
}

// tokenOffset is how many leading tokens of toks encode prefix.
func (t *Tokenizer) tokenOffset(toks []int32, prefix string) (int, error) {
	p, err := t.encode(prefix)
	if err != nil {
		return 0, err
	}
	return commonPrefix(toks, p), nil
}

func commonPrefix(a, b []int32) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

func commonPrefixString(a, b string) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}
