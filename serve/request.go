package serve

import (
	"context"
	"encoding/binary"
	"hash/fnv"
	"math"
	"strings"
	"time"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/kernels"
	"github.com/sbora-serve/sbora-serve/llama"
	"github.com/sbora-serve/sbora-serve/llama/constrain"
)

// adapterUse is a request's resolved adapter: a registration and a scale.
type adapterUse struct {
	entry *adapters.Entry
	scale float32
}

// request is one API call submitted to the scheduler. Its n choices are
// sequences that share the prompt (the first prefills it, the others fork
// its KV blocks).
type request struct {
	ctx        context.Context
	label      string // metrics label: the model name asked for (or "adapter")
	endpoint   string
	prompt     []int32
	adapters   []adapterUse
	n          int
	maxTokens  int
	sampler    llama.SamplerOptions
	stop       []string
	stopTokens map[int32]bool // control tokens named as stop strings
	ignoreEOS  bool           // benchmarks: generate maxTokens whatever the model says
	// logprobs is how many alternatives each token's logprob entry lists;
	// -1: no logprobs. promptLogprobs: the first choice also reports the
	// prompt's (echo), computed while it prefills.
	logprobs       int
	promptLogprobs bool
	// grammar constrains the output (response_format, forced tool calls);
	// vocab is the tokens' texts it masks and eos the token ending it.
	grammar *constrain.Matcher
	vocab   *constrain.Vocab
	pieces  [][]byte
	eos     int32
	arrived time.Time
	events  chan event

	// Owned by the scheduler.
	promptLP []tokenLogprob // by prompt position (promptLogprobs)
	seqs     []*sequence
	admitted bool // its first sequence got KV blocks
	open     int  // sequences not finished
}

// salt names the request's adapter set for the prefix cache: sequences
// share cached blocks only when the same adapters (and generations) at the
// same scales computed them. The base model is 0.
func (r *request) salt() uint64 {
	if len(r.adapters) == 0 {
		return 0
	}
	h := fnv.New64a()
	var b [8]byte
	for _, u := range r.adapters {
		h.Write([]byte(u.entry.Name))
		h.Write([]byte{0})
		binary.LittleEndian.PutUint64(b[:], u.entry.Gen)
		h.Write(b[:])
		binary.LittleEndian.PutUint32(b[:4], math.Float32bits(u.scale))
		h.Write(b[:4])
	}
	return h.Sum64() | 1 // never 0
}

type eventKind int

const (
	evAdmitted       eventKind = iota // the request holds KV blocks and its adapters: generation starts
	evText                            // text of one choice
	evDone                            // one choice ended (finish or err)
	evPromptLogprobs                  // the prompt's token logprobs (echo), once, before any text
)

// event is what the scheduler tells a handler.
type event struct {
	kind     eventKind
	choice   int
	text     string
	logprobs []tokenLogprob // of the tokens whose text this is (evText), or the prompt's
	finish   string         // stop | length (evDone)
	err      error          // evDone
	usage    usage          // evDone: this choice's completion tokens
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// sequence is one choice of a request. Its input is the prompt followed by
// the tokens generated so far; whenever it is running, its KV blocks hold
// a prefix of the input and each step feeds the rest (a prefill chunk, or
// the one token just sampled). A preempted sequence gives its blocks back
// and, when readmitted, finds most of them again in the prefix cache.
type sequence struct {
	req       *request
	choice    int
	input     []int32
	kv        *llama.SeqKV // nil while waiting
	uses      []kernels.Use
	keys      []adapters.Key // pinned while running
	sampler   *llama.Sampler
	stream    *llama.TextStream
	text      strings.Builder // generated text not yet sent
	logprobs  []tokenLogprob  // entries of tokens not yet sent
	grammar   *constrain.State
	mask      *constrain.Mask
	allowed   []bool
	generated int
	admitted  time.Time
	lastToken time.Time
	done      bool
}

func (q *sequence) prompt() []int32 { return q.req.prompt }

// prefilled reports whether the whole prompt has gone through the model.
func (q *sequence) prefilled() bool { return q.generated > 0 }

// wantsPromptLogprobs reports whether q computes the prompt's logprobs:
// the first choice of an echo request, until its prefill is complete. It
// prefills without the prefix cache (cached positions have no logits).
func (q *sequence) wantsPromptLogprobs() bool {
	return q.req.promptLogprobs && q.choice == 0 && !q.prefilled()
}

// eventCapacity bounds the events one request can produce, so the
// scheduler never blocks on a slow handler: per choice an admission, one
// text event per token and the end.
func eventCapacity(n, maxTokens int) int { return n*(maxTokens+3) + 2 }
