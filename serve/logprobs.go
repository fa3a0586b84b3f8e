package serve

import (
	"math"
	"strings"
	"unicode/utf8"

	"github.com/sbora-serve/sbora-serve/llama"
)

// tokenLogprob is one token's log probability under the model (the raw
// logits' log-softmax: before penalties, temperature and cuts, as OpenAI
// and vLLM report it) and the most likely alternatives at its position.
type tokenLogprob struct {
	token   int32
	logprob float64 // NaN: none (a prompt's first token)
	top     []altLogprob
}

type altLogprob struct {
	token   int32
	logprob float64
}

// logprobOf computes tok's entry from the logits of its position, with k
// alternatives.
func logprobOf(logits []float32, tok int32, k int) tokenLogprob {
	lse := llama.LogSumExp(logits)
	e := tokenLogprob{token: tok, logprob: float64(logits[tok]) - lse}
	if k > 0 {
		for _, id := range topIDs(logits, k) {
			e.top = append(e.top, altLogprob{token: id, logprob: float64(logits[id]) - lse})
		}
	}
	return e
}

// topIDs returns the k largest logits' ids, best first (ties: lower id),
// keeping a sorted k-element window: O(n·k) with k ≤ 20, no allocation of
// the vocabulary.
func topIDs(logits []float32, k int) []int32 {
	k = min(k, len(logits))
	ids := make([]int32, 0, k)
	better := func(a, b int32) bool { return logits[a] > logits[b] || logits[a] == logits[b] && a < b }
	for i := range logits {
		id := int32(i)
		if len(ids) == k && !better(id, ids[k-1]) {
			continue
		}
		if len(ids) < k {
			ids = append(ids, id)
		} else {
			ids[k-1] = id
		}
		for j := len(ids) - 1; j > 0 && better(ids[j], ids[j-1]); j-- {
			ids[j], ids[j-1] = ids[j-1], ids[j]
		}
	}
	return ids
}

// tokenText is a token's text for logprobs: its bytes as text (invalid
// UTF-8, as in a byte token, shown as U+FFFD) and the bytes themselves.
func (s *Server) tokenText(tok int32) (string, []byte) {
	piece := s.piece(tok)
	if utf8.Valid(piece) {
		return string(piece), piece
	}
	return strings.ToValidUTF8(string(piece), "\uFFFD"), piece
}

// piece is a token's bytes; control tokens show their name (<|eot_id|>).
func (s *Server) piece(tok int32) []byte {
	if tok < 0 || int(tok) >= len(s.pieces) {
		return nil
	}
	if p := s.pieces[tok]; p != nil {
		return p
	}
	v := s.model.Tokenizer.Vocabulary()
	if int(tok) < len(v.Values) {
		return []byte(v.Values[tok])
	}
	return nil
}

// jsonLogprob keeps logprobs finite in JSON (a banned token's is -inf).
func jsonLogprob(lp float64) float64 {
	if math.IsInf(lp, -1) || lp < -9999 {
		return -9999
	}
	return lp
}

// chatLogprobs is a chat choice's logprobs object.
func (s *Server) chatLogprobs(entries []tokenLogprob) map[string]any {
	content := make([]any, 0, len(entries))
	for _, e := range entries {
		text, b := s.tokenText(e.token)
		top := make([]any, 0, len(e.top))
		for _, a := range e.top {
			at, ab := s.tokenText(a.token)
			top = append(top, map[string]any{"token": at, "logprob": jsonLogprob(a.logprob), "bytes": byteList(ab)})
		}
		content = append(content, map[string]any{"token": text, "logprob": jsonLogprob(e.logprob), "bytes": byteList(b), "top_logprobs": top})
	}
	return map[string]any{"content": content, "refusal": nil}
}

func byteList(b []byte) []int {
	out := make([]int, len(b))
	for i, c := range b {
		out[i] = int(c)
	}
	return out
}

// completionLogprobs is a text completion choice's logprobs object (the
// legacy format lm-evaluation-harness reads); offsets count bytes of the
// choice's text from offset.
func (s *Server) completionLogprobs(entries []tokenLogprob, withTop bool, offset int) map[string]any {
	tokens := make([]any, 0, len(entries))
	lps := make([]any, 0, len(entries))
	tops := make([]any, 0, len(entries))
	offsets := make([]int, 0, len(entries))
	for _, e := range entries {
		text, b := s.tokenText(e.token)
		tokens = append(tokens, text)
		offsets = append(offsets, offset)
		offset += len(b)
		if math.IsNaN(e.logprob) {
			lps = append(lps, nil)
			tops = append(tops, nil)
			continue
		}
		lps = append(lps, jsonLogprob(e.logprob))
		if !withTop {
			tops = append(tops, nil)
			continue
		}
		top := map[string]float64{}
		for _, a := range e.top {
			at, _ := s.tokenText(a.token)
			if _, seen := top[at]; !seen {
				top[at] = jsonLogprob(a.logprob)
			}
		}
		tops = append(tops, top)
	}
	return map[string]any{"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
}
