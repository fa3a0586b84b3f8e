package serve

import (
	"bytes"
	"testing"
)

// FuzzRequestDecoder feeds arbitrary bodies to both request decoders and
// their validation: errors are fine, panics are not.
func FuzzRequestDecoder(f *testing.F) {
	for _, seed := range []string{
		`{"model": "m", "prompt": "hi", "max_tokens": 5, "stop": ["a", "b"], "temperature": 0.5}`,
		`{"model": "m", "prompt": [[1, 2, 3]], "adapters": [{"name": "x", "scale": 0.5}]}`,
		`{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stream": true, "stream_options": {"include_usage": true}}`,
		`{"model": "m", "messages": [{"role": "system", "content": null}], "seed": -1, "top_p": 1, "n": 1}`,
		`{"prompt": {"nested": true}}`, `[]`, `null`, ``,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var c CompletionRequest
		if decodeJSON(bytes.NewReader(body), &c) == nil {
			c.params()
		}
		var ch ChatRequest
		if decodeJSON(bytes.NewReader(body), &ch) == nil {
			ch.params()
		}
	})
}
