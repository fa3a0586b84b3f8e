package main

import (
	"os"
	"testing"
	"time"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

var binary string

func TestMain(m *testing.M) {
	testutil.Quiet()
	path, cleanup, err := testutil.BuildBinary("../../cmd/sbora-serve")
	if err != nil {
		panic(err)
	}
	binary = path
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// TestSoak is the short chaos soak of make test (about a minute): see the
// package documentation for what it injects and checks.
func TestSoak(t *testing.T) {
	r, err := Run(Config{Binary: binary, Model: testutil.Shared(t, "models/stories260K.gguf"), Duration: 30 * time.Second,
		Workers: 10, Seed: 1, Log: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + r.String())
	for _, f := range r.Failed() {
		t.Error(f)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestNearTie checks the verifier's tie rule: a divergence passes only
// where the two tokens' logprobs are within tieTolerance in a run's own
// alternatives, ending the sequence counting as a token.
func TestNearTie(t *testing.T) {
	at := func(tok string, top map[string]float64) tokenLP { return tokenLP{token: tok, top: top} }
	same := at(" the", map[string]float64{" the": -0.1})
	cases := []struct {
		name       string
		got, alone []tokenLP
		want       bool
	}{
		{"tie in alone's logprobs", []tokenLP{same, at(" a", nil)},
			[]tokenLP{same, at(" b", map[string]float64{" b": -0.6930, " a": -0.6935})}, true},
		{"tie in got's logprobs", []tokenLP{same, at(" a", map[string]float64{" a": -1.0, " b": -1.001})},
			[]tokenLP{same, at(" b", nil)}, true},
		{"gap too wide", []tokenLP{same, at(" a", map[string]float64{" a": -1.0, " b": -1.01})},
			[]tokenLP{same, at(" b", map[string]float64{" b": -0.9, " a": -1.0})}, false},
		{"other token not among the alternatives", []tokenLP{same, at(" a", map[string]float64{" a": -1})},
			[]tokenLP{same, at(" b", map[string]float64{" b": -1})}, false},
		{"got ended at a tie with the end token", []tokenLP{same},
			[]tokenLP{same, at(".", map[string]float64{".": -0.7, eosPiece: -0.7001})}, true},
		{"got ended where the end token was unlikely", []tokenLP{same},
			[]tokenLP{same, at(".", map[string]float64{".": -0.1, eosPiece: -3})}, false},
		{"alone ended at a tie", []tokenLP{same, at(".", map[string]float64{".": -0.7, eosPiece: -0.7001})},
			[]tokenLP{same}, true},
		{"identical tokens are not a tie", []tokenLP{same}, []tokenLP{same}, false},
	}
	for _, c := range cases {
		if got := nearTie(output{tokens: c.got}, output{tokens: c.alone}); got != c.want {
			t.Errorf("%s: nearTie = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestChurnRange checks that a request may have been served by the version
// before the last one recorded when it was sent (that upload or deletion
// may still have been in flight).
func TestChurnRange(t *testing.T) {
	s := &soak{versions: map[string][]int{"churn-fa": {0, 1, -1, 0}}}
	got := s.churnRange(map[string]int{"churn-fa": 2})["churn-fa"]
	if got != [2]int{0, 3} {
		t.Fatalf("churnRange = %v, want [0 3]: from the version before the last recorded at send time to the newest", got)
	}
}
