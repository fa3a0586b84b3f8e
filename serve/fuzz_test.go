package serve

import (
	"bytes"
	"testing"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
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

// FuzzAdapterUpload feeds arbitrary bytes to the upload validation (the
// adapter registry's checks on stories260K's shapes): errors are fine,
// panics and huge allocations are not. Seeds in testdata/fuzz include
// valid FA, FB and LoRA files and truncations of them.
func FuzzAdapterUpload(f *testing.F) {
	stories := testutil.Shared(f, "models/stories260K.gguf")
	base, err := llama.ReadBase(stories)
	if err != nil {
		f.Fatal(err)
	}
	reg, err := adapters.NewRegistry(f.TempDir(), base, adapters.RegistryOptions{MaxRank: 16})
	if err != nil {
		f.Fatal(err)
	}
	for i, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		a, err := adapters.NewRandom(base, adapters.RandomOptions{Variant: v, Rank: 2, Seed: uint64(i), Modules: []adapters.Module{adapters.Q}})
		if err != nil {
			f.Fatal(err)
		}
		w, err := a.Encode(adapters.SaveOptions{})
		if err != nil {
			f.Fatal(err)
		}
		var buf bytes.Buffer
		w.WriteTo(&buf)
		f.Add(buf.Bytes())
		f.Add(buf.Bytes()[:buf.Len()/2])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		validateUpload(data, base, reg)
	})
}
