package constrain

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama"
)

// schemas cover every supported feature; each is checked against an
// independent validator (santhosh-tekuri/jsonschema).
var schemas = map[string]string{
	"bounded": `{"type":"object","properties":{
		"name":{"type":"string","minLength":2,"maxLength":12},
		"age":{"type":"integer","minimum":18,"maximum":120},
		"score":{"type":"integer","minimum":-50,"exclusiveMaximum":-3},
		"tags":{"type":"array","items":{"type":"string","maxLength":5},"minItems":1,"maxItems":3},
		"nick":{"type":"string","maxLength":4}},
		"required":["name","age","score","tags"],"additionalProperties":false}`,
	"enum and const": `{"type":"object","properties":{
		"color":{"enum":["red","green","blue",7,null,{"a":[1,2]}]},
		"version":{"const":"v1"},
		"flag":{"type":"boolean"}},"required":["color","version"]}`,
	"anyOf": `{"type":"object","properties":{"value":{"anyOf":[
		{"type":"object","properties":{"kind":{"const":"a"},"x":{"type":"integer","minimum":0,"maximum":9}},"required":["kind","x"]},
		{"type":"object","properties":{"kind":{"const":"ab"},"y":{"type":"string","maxLength":3}},"required":["kind"]},
		{"type":"null"}]}},"required":["value"]}`,
	"nullable and numbers": `{"type":"object","properties":{
		"n":{"type":["number","null"]},"i":{"type":"integer"},"exact":{"type":"integer","minimum":7,"maximum":7},
		"big":{"type":"integer","minimum":100000,"maximum":100250}},"required":["n","i","exact","big"]}`,
	"recursive": `{"$defs":{"tree":{"type":"object","properties":{"label":{"type":"string","maxLength":3},
		"children":{"type":"array","maxItems":2,"items":{"$ref":"#/$defs/tree"}}},"required":["label"]}},
		"$ref":"#/$defs/tree"}`,
	"map":             `{"type":"object","additionalProperties":{"type":"integer","minimum":0,"maximum":3}}`,
	"any":             `{}`,
	"array root":      `{"type":"array","items":{"type":"integer","minimum":-2,"maximum":2},"minItems":2,"maxItems":4}`,
	"string root":     `{"type":"string","minLength":1,"maxLength":6}`,
	"unicode strings": `{"type":"object","properties":{"s":{"type":"string","minLength":3,"maxLength":3}},"required":["s"]}`,
	"closed empty":    `{"type":"object","additionalProperties":false}`,
	"allOf one":       `{"allOf":[{"type":"object","properties":{"k":{"type":"string","format":"date"}},"required":["k"]}]}`,
}

func validator(t *testing.T, schema string) *jsonschema.Schema {
	t.Helper()
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(schema))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func validate(t *testing.T, v *jsonschema.Schema, text string) error {
	t.Helper()
	inst, err := jsonschema.UnmarshalJSON(strings.NewReader(text))
	if err != nil {
		return err
	}
	return v.Validate(inst)
}

// accepts reports whether m accepts text as a whole document.
func accepts(m *Matcher, text string) bool {
	s, ok := m.Advance(m.Start(), []byte(text))
	return ok && m.CanEnd(s)
}

// walk generates a random document byte by byte from what the matcher
// allows; after a while it prefers closing bytes so that it ends.
func walk(t *testing.T, m *Matcher, rng *rand.Rand) string {
	t.Helper()
	s := m.Start()
	var out []byte
	closers := []byte(`"}]0ntf{[:,a`)
	for len(out) < 4000 {
		var allowed []byte
		for b := 0; b < 256; b++ {
			if next, ok := m.Advance(s, []byte{byte(b)}); ok && !next.Dead() {
				allowed = append(allowed, byte(b))
			}
		}
		canEnd := m.CanEnd(s)
		if len(allowed) == 0 {
			if !canEnd {
				t.Fatalf("dead end after %q", out)
			}
			return string(out)
		}
		finishing := len(out) > 60
		if canEnd && (finishing || rng.IntN(8) == 0) {
			return string(out)
		}
		b := allowed[rng.IntN(len(allowed))]
		if finishing {
			for _, c := range closers {
				if bytes.IndexByte(allowed, c) >= 0 {
					b = c
					break
				}
			}
		} else if b >= 0x80 && rng.IntN(4) != 0 {
			b = allowed[0] // keep most text ASCII, but not all
		}
		s, _ = m.Advance(s, []byte{b})
		out = append(out, b)
	}
	t.Fatalf("walk did not end: %q", out)
	return ""
}

func TestGeneratedDocumentsValidate(t *testing.T) {
	for name, src := range schemas {
		t.Run(name, func(t *testing.T) {
			s, err := Compile(json.RawMessage(src))
			if err != nil {
				t.Fatal(err)
			}
			m := NewMatcher(s, "", "")
			v := validator(t, src)
			for seed := uint64(1); seed <= 50; seed++ {
				doc := walk(t, m, rand.New(rand.NewPCG(seed, 7)))
				if err := validate(t, v, doc); err != nil {
					t.Fatalf("seed %d: %q does not validate: %v", seed, doc, err)
				}
			}
		})
	}
}

func TestAcceptsExactlyValidDocuments(t *testing.T) {
	cases := []struct {
		schema string
		docs   []string
	}{
		{"bounded", []string{
			`{"name":"Al","age":18,"score":-50,"tags":["a"]}`,
			`{ "name" : "Ada Lovelace", "age": 120, "score": -4, "tags": ["x","yy","zzzzz"], "nick": "" }`,
			`{"name":"A","age":18,"score":-4,"tags":["a"]}`,
			`{"name":"Al","age":17,"score":-4,"tags":["a"]}`,
			`{"name":"Al","age":121,"score":-4,"tags":["a"]}`,
			`{"name":"Al","age":18,"score":-3,"tags":["a"]}`,
			`{"name":"Al","age":18,"score":-51,"tags":["a"]}`,
			`{"name":"Al","age":18,"score":-4,"tags":[]}`,
			`{"name":"Al","age":18,"score":-4,"tags":["a","b","c","d"]}`,
			`{"name":"Al","age":18,"score":-4,"tags":["toolong"]}`,
			`{"name":"Al","age":18,"score":-4}`,
			`{"name":"Al","age":18,"score":-4,"tags":["a"],"extra":1}`,
			`{"name":"Al","age":18.5,"score":-4,"tags":["a"]}`,
			`{"name":"Al","age":018,"score":-4,"tags":["a"]}`,
			`{"name":"Al","age":18,"score":-4,"tags":["a"],}`,
			`{"name":"A\u00e9","age":30,"score":-10,"tags":["\n"]}`,
		}},
		{"enum and const", []string{
			`{"color":"red","version":"v1"}`, `{"color":7,"version":"v1","flag":false}`,
			`{"color":null,"version":"v1"}`, `{"color":{"a":[1,2]},"version":"v1"}`,
			`{"color":"Red","version":"v1"}`, `{"color":"red","version":"v2"}`, `{"color":70,"version":"v1"}`,
		}},
		{"anyOf", []string{
			`{"value":{"kind":"a","x":3}}`, `{"value":{"kind":"ab"}}`, `{"value":{"kind":"ab","y":"abc"}}`,
			`{"value":null}`, `{"value":{"kind":"a"}}`, `{"value":{"kind":"a","x":10}}`, `{"value":{"kind":"abc"}}`,
		}},
		{"nullable and numbers", []string{
			`{"n":-0.5e+10,"i":-12,"exact":7,"big":100000}`, `{"n":null,"i":0,"exact":7,"big":100250}`,
			`{"n":1.,"i":0,"exact":7,"big":100000}`, `{"n":1,"i":0,"exact":8,"big":100000}`,
			`{"n":1,"i":0,"exact":7,"big":100251}`, `{"n":1,"i":0,"exact":7,"big":99999}`, `{"n":01,"i":0,"exact":7,"big":100000}`,
		}},
		{"recursive", []string{
			`{"label":"a","children":[{"label":"b"},{"label":"c","children":[]}]}`,
			`{"label":"a","children":[{"label":"b"},{"label":"c"},{"label":"d"}]}`, `{"children":[]}`,
		}},
		{"map", []string{`{}`, `{"a":1,"b c":3,"a":0}`, `{"a":4}`, `{"a":"1"}`}},
		{"any", []string{`1`, `"x"`, `[1,{"a":null}]`, `{"a":[true,false,-1.5E-3]}`, `nul`, `[1,]`}},
		{"array root", []string{`[0,1]`, `[-2,2,0,1]`, `[3,1]`, `[1]`, `[-0,0]`}},
		{"string root", []string{`"x"`, `"日本語"`, `""`, `"1234567"`, `"a\"b"`, `"a\qb"`}},
		{"unicode strings", []string{`{"s":"日本語"}`, `{"s":"ab\u00e9"}`, `{"s":"é"}`, `{"s":"abcd"}`, `{"s":"a😀b"}`}},
		{"closed empty", []string{`{}`, `{"a":1}`, ` {} `}},
	}
	for _, c := range cases {
		src := schemas[c.schema]
		s, err := Compile(json.RawMessage(src))
		if err != nil {
			t.Fatal(err)
		}
		m := NewMatcher(s, "", "")
		v := validator(t, src)
		for _, doc := range c.docs {
			want := validate(t, v, doc) == nil
			// Trailing space after the document is not generated.
			if strings.HasSuffix(doc, " ") {
				want = false
			}
			if got := accepts(m, doc); got != want {
				t.Errorf("%s: %s accepted %v, validator says valid %v", c.schema, doc, got, want)
			}
		}
	}
}

// Random byte strings and mutations of valid documents: whatever the
// matcher accepts must validate.
func TestAcceptedMutationsValidate(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	alphabet := []byte(`{}[]":,0123-.eE "abnulltrue\`)
	for name, src := range schemas {
		s, _ := Compile(json.RawMessage(src))
		m := NewMatcher(s, "", "")
		v := validator(t, src)
		for i := 0; i < 80; i++ {
			doc := []byte(walk(t, m, rng))
			for k := rng.IntN(3) + 1; k > 0 && len(doc) > 0; k-- {
				p := rng.IntN(len(doc))
				switch rng.IntN(3) {
				case 0:
					doc[p] = alphabet[rng.IntN(len(alphabet))]
				case 1:
					doc = append(doc[:p], doc[p+1:]...)
				default:
					doc = append(doc[:p], append([]byte{alphabet[rng.IntN(len(alphabet))]}, doc[p:]...)...)
				}
			}
			if accepts(m, string(doc)) {
				if err := validate(t, v, string(doc)); err != nil {
					t.Fatalf("%s: matcher accepted invalid %q: %v", name, doc, err)
				}
			}
		}
	}
}

// Escaped surrogates are refused although JSON parsers accept them: a
// lone one is not text, and a pair would make lengths disagree.
func TestRefusesEscapedSurrogates(t *testing.T) {
	s, _ := Compile(json.RawMessage(`{"type":"string"}`))
	m := NewMatcher(s, "", "")
	for _, doc := range []string{`"\ud800"`, `"\uDBFF\uDC00"`} {
		if accepts(m, doc) {
			t.Errorf("%s accepted", doc)
		}
	}
	if !accepts(m, `"\ue000\u00e9\uD7FF"`) {
		t.Error("non-surrogate escapes refused")
	}
}

func TestPrefixAndSuffix(t *testing.T) {
	s, _ := Compile(json.RawMessage(`{"type":"object","properties":{"name":{"const":"f"}},"required":["name"]}`))
	m := NewMatcher(s, "<tool_call>\n", "\n</tool_call>")
	if !accepts(m, "<tool_call>\n{\"name\":\"f\"}\n</tool_call>") {
		t.Error("wrapped call refused")
	}
	for _, bad := range []string{`{"name":"f"}`, "<tool_call>\n{\"name\":\"f\"}", "<tool_call>\n{\"name\":\"g\"}\n</tool_call>"} {
		if accepts(m, bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestRefusesUnsupportedFeatures(t *testing.T) {
	for _, src := range []string{
		`{"type":"string","pattern":"^a"}`, `{"type":"number","minimum":0}`, `{"not":{}}`,
		`{"type":"object","required":["a"]}`, `{"$ref":"http://example.com/s"}`, `{"type":"strin"}`,
		`{"type":"integer","minimum":5,"maximum":4}`, `{"type":"string","minLength":-1}`, `[1]`, `false`,
		`{"enum":[]}`, `{"allOf":[{},{}]}`, `{"type":"array","uniqueItems":true}`,
	} {
		if _, err := Compile(json.RawMessage(src)); err == nil {
			t.Errorf("%s compiled", src)
		}
	}
}

func llama3Vocab(t testing.TB) ([][]byte, *Vocab) {
	t.Helper()
	tok, err := llama.LoadTokenizer(testutil.Shared(t, "models/ggml-vocab-llama-bpe.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	pieces := llama.TokenPieces(tok)
	return pieces, NewVocab(pieces)
}

// The token mask agrees with feeding each token's bytes to the matcher,
// and token-level generation yields valid documents.
func TestMaskMatchesMatcher(t *testing.T) {
	pieces, vocab := llama3Vocab(t)
	allowed := make([]bool, vocab.Size())
	for _, name := range []string{"bounded", "anyOf", "recursive"} {
		src := schemas[name]
		s, _ := Compile(json.RawMessage(src))
		m := NewMatcher(s, "", "")
		v := validator(t, src)
		mask := NewMask(vocab, m)
		for seed := uint64(1); seed <= 5; seed++ {
			rng := rand.New(rand.NewPCG(seed, 11))
			st := m.Start()
			var out []byte
			for steps := 0; ; steps++ {
				count := mask.Fill(st, allowed)
				if seed == 1 && steps < 12 { // brute force on the start of one walk per schema
					for id, p := range pieces {
						next, ok := m.Advance(st, p)
						want := len(p) > 0 && ok && !next.Dead()
						if allowed[id] != want {
							t.Fatalf("%s after %q: token %d %q mask %v, matcher %v", name, out, id, p, allowed[id], want)
						}
					}
				}
				if m.CanEnd(st) && (count == 0 || steps > 40 || rng.IntN(6) == 0) {
					break
				}
				if count == 0 {
					t.Fatalf("%s: no token allowed after %q", name, out)
				}
				var ids []int
				for id, ok := range allowed {
					if ok {
						ids = append(ids, id)
					}
				}
				id := ids[rng.IntN(len(ids))]
				if steps > 40 { // steer towards the end: shortest pieces first
					for _, c := range ids {
						if len(pieces[c]) < len(pieces[id]) || len(pieces[c]) == len(pieces[id]) && strings.ContainsAny(string(pieces[c]), "}]\"") {
							id = c
						}
					}
				}
				var ok bool
				if st, ok = m.Advance(st, pieces[id]); !ok {
					t.Fatalf("masked token %q refused", pieces[id])
				}
				out = append(out, pieces[id]...)
				if steps > 400 {
					t.Fatalf("%s: no end after %q", name, out)
				}
			}
			if err := validate(t, v, string(out)); err != nil {
				t.Fatalf("%s seed %d: %q: %v", name, seed, out, err)
			}
		}
	}
}

// BenchmarkMask measures one mask over the Llama-3 vocabulary (128256
// tokens) inside a string, where nearly every token is allowed (the worst
// case), and between object members, where few are.
func BenchmarkMask(b *testing.B) {
	_, vocab := llama3Vocab(b)
	s, _ := Compile(json.RawMessage(schemas["bounded"]))
	m := NewMatcher(s, "", "")
	allowed := make([]bool, vocab.Size())
	for _, c := range []struct{ name, prefix string }{{"in-string", `{"name":"Ad`}, {"between-members", `{"name":"Ada",`}} {
		st, ok := m.Advance(m.Start(), []byte(c.prefix))
		if !ok {
			b.Fatal(c.prefix)
		}
		mask := NewMask(vocab, m)
		b.Run(c.name, func(b *testing.B) {
			n := 0
			for i := 0; i < b.N; i++ {
				n = mask.Fill(st, allowed)
			}
			b.ReportMetric(float64(n), "allowed")
		})
	}
}

// BenchmarkAcceptToken measures the cheap path of constrained sampling:
// checking that the sampled token is allowed and advancing past it (the
// full mask is computed only when the check fails).
func BenchmarkAcceptToken(b *testing.B) {
	tok, err := llama.LoadTokenizer(testutil.Shared(b, "models/ggml-vocab-llama-bpe.gguf"))
	if err != nil {
		b.Fatal(err)
	}
	s, _ := Compile(json.RawMessage(schemas["bounded"]))
	m := NewMatcher(s, "", "")
	doc := `{"name": "Ada Lovelace", "age": 36, "score": -10, "tags": ["math", "poet"], "nick": "Ada"}`
	ids, _ := tok.Encode(doc, false)
	pieces := llama.TokenPieces(tok)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		st := m.Start()
		for _, id := range ids {
			next, ok := m.Advance(st, pieces[id])
			if !ok {
				b.Fatalf("token %q refused", pieces[id])
			}
			st = next
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(ids)), "ns/token")
}
