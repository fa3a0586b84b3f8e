package serve

import (
	"strings"
	"time"

	"github.com/ollama/ollama/tokenizer"
)

// sample picks q's next token from the logits of its last input token and
// streams the text it completes.
func (s *scheduler) sample(q *sequence, logits []float32) {
	tok := q.sampler.Sample(logits)
	now := time.Now()
	if q.generated == 0 {
		s.m.ttft.Observe(now.Sub(q.req.arrived).Seconds())
	} else {
		s.m.itl.Observe(now.Sub(q.lastToken).Seconds())
	}
	q.lastToken = now
	r := q.req
	if (s.tok.Is(tok, tokenizer.SpecialEOS) && !r.ignoreEOS) || r.stopTokens[tok] {
		s.flush(q, true)
		s.finish(q, "stop", nil)
		return
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
	if q.generated >= r.maxTokens || len(q.input) >= s.engine.MaxSeqLen {
		s.flush(q, true)
		s.finish(q, "length", nil)
		return
	}
	s.flush(q, false)
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
	if cut > 0 {
		q.req.events <- event{kind: evText, choice: q.choice, text: text[:cut]}
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
	if send := text[:len(text)-hold]; send != "" {
		q.req.events <- event{kind: evText, choice: q.choice, text: send}
	}
	q.text.Reset()
	q.text.WriteString(text[len(text)-hold:])
}
