package serve

import (
	"strings"
	"time"

	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/llama/constrain"
)

// sample picks q's next token from the logits of its last input token and
// streams the text it completes.
func (s *scheduler) sample(q *sequence, logits []float32) {
	r := q.req
	if r.maxTokens == 0 { // echo only: the prompt was all that was asked for
		s.flush(q, true)
		s.finish(q, "length", nil)
		return
	}
	tok := s.pick(q, logits)
	now := time.Now()
	if q.generated == 0 {
		s.m.ttft.Observe(now.Sub(r.arrived).Seconds())
	} else {
		s.m.itl.Observe(now.Sub(q.lastToken).Seconds())
	}
	q.lastToken = now
	if tok < 0 || (s.tok.Is(tok, tokenizer.SpecialEOS) && !r.ignoreEOS) || r.stopTokens[tok] {
		s.flush(q, true)
		s.finish(q, "stop", nil)
		return
	}
	if r.logprobs >= 0 {
		q.logprobs = append(q.logprobs, logprobOf(logits, tok, r.logprobs))
	}
	q.sampler.Accept(tok)
	q.generated++
	q.input = append(q.input, tok)
	s.m.generationTokens.WithLabelValues(r.label).Inc()
	q.text.WriteString(q.stream.Add(tok))
	if s.checkStop(q) {
		s.finish(q, "stop", nil)
		return
	}
	if q.grammar != nil {
		q.grammar, _ = r.grammar.Advance(q.grammar, r.pieces[tok])
		if r.grammar.Finished(q.grammar) {
			s.flush(q, true)
			s.finish(q, "stop", nil)
			return
		}
	}
	if q.generated >= r.maxTokens || len(q.input) >= s.engine.MaxSeqLen {
		s.flush(q, true)
		s.finish(q, "length", nil)
		return
	}
	s.flush(q, false)
}

// pick draws q's next token. Under a grammar it draws from the whole
// distribution first and keeps the token when the grammar accepts it,
// which is the same as drawing from the distribution restricted to the
// allowed tokens (P(t) + P(rejected)·P(t)/P(allowed) = P(t)/P(allowed)),
// and computes the full mask only when it must. -1: nothing is allowed.
func (s *scheduler) pick(q *sequence, logits []float32) int32 {
	r := q.req
	tok := q.sampler.Sample(logits)
	if q.grammar == nil {
		return tok
	}
	if tok == r.eos {
		if r.grammar.CanEnd(q.grammar) {
			return tok
		}
	} else if p := r.pieces[tok]; p != nil {
		if next, ok := r.grammar.Advance(q.grammar, p); ok && !next.Dead() {
			return tok
		}
	}
	if q.mask == nil {
		q.mask = constrain.NewMask(r.vocab, r.grammar)
		q.allowed = make([]bool, len(logits))
	}
	q.mask.Fill(q.grammar, q.allowed)
	if r.grammar.CanEnd(q.grammar) {
		q.allowed[r.eos] = true
	}
	return q.sampler.SampleAllowed(logits, func(t int32) bool { return int(t) < len(q.allowed) && q.allowed[t] })
}

// checkStop cuts the text at the first stop sequence; it reports whether
// one was found (and sends the text before it).
func (s *scheduler) checkStop(q *sequence) bool {
	text := q.text.String()
	cut := -1
	for _, st := range q.req.stop {
		if i := strings.Index(text, st); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut < 0 {
		return false
	}
	if cut > 0 || len(q.logprobs) > 0 {
		q.req.events <- event{kind: evText, choice: q.choice, text: text[:cut], logprobs: q.takeLogprobs()}
	}
	q.text.Reset()
	return true
}

// flush sends generated text, holding back a tail that could still grow
// into a stop sequence unless final.
func (s *scheduler) flush(q *sequence, final bool) {
	text := q.text.String()
	if final {
		text += q.stream.Flush()
	}
	hold := 0
	if !final {
		for _, st := range q.req.stop {
			for n := min(len(st)-1, len(text)); n > hold; n-- {
				if strings.HasSuffix(text, st[:n]) {
					hold = n
					break
				}
			}
		}
	}
	// Logprob entries travel with the first text sent after them.
	if send := text[:len(text)-hold]; send != "" || final && len(q.logprobs) > 0 {
		q.req.events <- event{kind: evText, choice: q.choice, text: send, logprobs: q.takeLogprobs()}
	}
	q.text.Reset()
	q.text.WriteString(text[len(text)-hold:])
}

func (q *sequence) takeLogprobs() []tokenLogprob {
	out := q.logprobs
	q.logprobs = nil
	return out
}
