package llama

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
	"github.com/sbora-serve/sbora-serve/llama/oracle"
)

// TestBlockAllocatorRandomized drives the allocator with random sequences
// (reserve, commit, share prefixes, fork, release in any order, invalidate)
// and checks its invariants after every operation and that every block is
// free or cached once all sequences are gone.
func TestBlockAllocatorRandomized(t *testing.T) {
	const blocks, bs = 64, 4
	pool := &KVPool{BlockSize: bs, alloc: newBlockAllocator(blocks, bs, true)}
	rng := rand.New(rand.NewPCG(1, 2))
	prompts := make([][]int32, 6) // few distinct prompts so prefixes repeat
	for i := range prompts {
		for j := 0; j < 5+rng.IntN(30); j++ {
			prompts[i] = append(prompts[i], int32(rng.IntN(3)))
		}
	}
	var live []*SeqKV
	check := func(op string) {
		t.Helper()
		held := map[int32]int32{}
		for _, s := range live {
			for _, b := range s.blocks {
				held[b]++
			}
		}
		a := pool.alloc
		inFree := map[int32]bool{}
		for _, b := range a.free {
			if inFree[b] {
				t.Fatalf("%s: block %d twice on the free list", op, b)
			}
			inFree[b] = true
		}
		for b := int32(0); b < blocks; b++ {
			if a.refs[b] != held[b] {
				t.Fatalf("%s: block %d has %d refs, %d holders", op, b, a.refs[b], held[b])
			}
			onLRU := a.elem[b] != nil
			switch {
			case held[b] > 0 && (inFree[b] || onLRU):
				t.Fatalf("%s: held block %d is also free (%v) or evictable (%v)", op, b, inFree[b], onLRU)
			case held[b] == 0 && inFree[b] == onLRU:
				t.Fatalf("%s: unheld block %d: free %v, evictable %v", op, b, inFree[b], onLRU)
			case onLRU && !a.indexed[b]:
				t.Fatalf("%s: evictable block %d holds no registered content", op, b)
			}
		}
		if a.available()+len(held) != blocks {
			t.Fatalf("%s: %d available + %d held != %d", op, a.available(), len(held), blocks)
		}
	}
	for step := 0; step < 5000; step++ {
		switch r := rng.IntN(10); {
		case r < 3 || len(live) == 0: // a new sequence, maybe sharing a cached prefix
			salt := uint64(rng.IntN(2))
			s := pool.NewSeq(salt)
			p := prompts[rng.IntN(len(prompts))]
			n := s.MatchPrefix(p)
			if n%bs != 0 || n >= len(p) {
				t.Fatalf("matched %d of %d tokens", n, len(p))
			}
			if !slices.Equal(s.tokens, p[:n]) {
				t.Fatalf("matched tokens %v, prompt %v", s.tokens, p[:n])
			}
			if err := s.Reserve(len(p) - n); err != nil {
				s.Release()
				check("reserve failed")
				continue
			}
			s.commit(p[n:])
			live = append(live, s)
			check("new")
		case r < 6: // decode a few tokens
			s := live[rng.IntN(len(live))]
			k := 1 + rng.IntN(6)
			if s.Reserve(k) == nil {
				toks := make([]int32, k)
				for i := range toks {
					toks[i] = int32(rng.IntN(3))
				}
				s.commit(toks)
			}
			check("decode")
		case r < 7: // fork
			s := live[rng.IntN(len(live))]
			if c, err := s.Fork(); err == nil {
				if !slices.Equal(c.tokens, s.tokens) || c.Len() != s.Len() {
					t.Fatal("fork has other tokens")
				}
				live = append(live, c)
			}
			check("fork")
		case r < 9: // finish or cancel
			i := rng.IntN(len(live))
			live[i].Release()
			live = slices.Delete(live, i, i+1)
			check("release")
		default:
			pool.Invalidate(uint64(rng.IntN(2)))
			check("invalidate")
		}
	}
	for _, s := range live {
		s.Release()
	}
	live = nil
	check("end")
	if pool.alloc.held() != 0 || pool.FreeBlocks() != blocks {
		t.Fatalf("after all sequences ended: %d held, %d available of %d", pool.alloc.held(), pool.FreeBlocks(), blocks)
	}
	st := pool.Stats()
	t.Logf("prefix cache: %d of %d prompt tokens hit, %d blocks evicted", st.PrefixHit, st.PrefixQueried, st.Evicted)
	if st.PrefixHit == 0 || st.Evicted == 0 {
		t.Fatal("the random walk never hit the prefix cache or never evicted: it tests too little")
	}
}

// TestPrefixCacheHitEqualsColdRun checks that a prompt whose prefix comes
// from the cache gives the logits of a cold run, that a different adapter
// set (salt) never matches, and that a forked sequence decodes exactly like
// its parent would.
func TestPrefixCacheHitEqualsColdRun(t *testing.T) {
	m := loadModel(t, testutil.Shared(t, "models/stories260K.gguf"))
	e := newEngine(t, m, EngineOptions{KVTokens: 512, MaxSeqLen: 128, BlockSize: 16, CacheF32: true})
	prompt, err := m.Tokenizer.Encode(storiesText, true)
	if err != nil {
		t.Fatal(err)
	}
	prompt = prompt[:70] // 4 full blocks and a partial one

	cold := e.Pool.NewSeq(7)
	want := step(t, e, Seq{KV: cold, Tokens: prompt, AllLogits: true})[0]
	coldNext := greedyFrom(t, e, cold, oracle.Argmax(want[len(want)-1]), 8)
	cold.Release()

	warm := e.Pool.NewSeq(7)
	n := warm.MatchPrefix(prompt)
	if n != 64 {
		t.Fatalf("prefix cache matched %d tokens, want 64 (4 blocks of 16)", n)
	}
	got := step(t, e, Seq{KV: warm, Tokens: prompt[n:], AllLogits: true})[0]
	diff, scale := maxAbs(got, want[n:])
	t.Logf("prefix hit vs cold run: max |Δ| %.3g (max |logit| %.3g)", diff, scale)
	if diff > 1e-5*scale {
		t.Fatalf("logits after a prefix hit differ from a cold run by %.3g", diff)
	}
	// Fork after the prompt: parent and child decode the same tokens as the
	// cold run did.
	child, err := warm.Fork()
	if err != nil {
		t.Fatal(err)
	}
	first := oracle.Argmax(got[len(got)-1])
	if p, c := greedyFrom(t, e, warm, first, 8), greedyFrom(t, e, child, first, 8); !slices.Equal(p, coldNext) || !slices.Equal(c, coldNext) {
		t.Fatalf("after a fork: parent %v, child %v, cold run %v", p, c, coldNext)
	}
	warm.Release()
	child.Release()

	other := e.Pool.NewSeq(8)
	if n := other.MatchPrefix(prompt); n != 0 {
		t.Fatalf("another adapter set matched %d cached tokens", n)
	}
	other.Release()
	if dropped := e.Pool.Invalidate(7); dropped == 0 {
		t.Fatal("invalidating the salt dropped no block")
	}
	again := e.Pool.NewSeq(7)
	if n := again.MatchPrefix(prompt); n != 0 {
		t.Fatalf("after invalidation %d tokens still matched", n)
	}
	again.Release()
	if e.Pool.HeldBlocks() != 0 {
		t.Fatalf("%d blocks still held", e.Pool.HeldBlocks())
	}
}

// greedyFrom feeds next and decodes n greedy tokens on kv.
func greedyFrom(t *testing.T, e *Engine, kv *SeqKV, next int32, n int) []int32 {
	t.Helper()
	var out []int32
	for len(out) < n {
		out = append(out, next)
		res := step(t, e, Seq{KV: kv, Tokens: []int32{next}})
		next = oracle.Argmax(res[0][0])
	}
	return out
}

// TestPoolFullIsAnError checks that a sequence cannot reserve beyond the
// pool and that a failed reservation takes nothing.
func TestPoolFullIsAnError(t *testing.T) {
	m := loadModel(t, testutil.Shared(t, "models/stories260K.gguf"))
	e := newEngine(t, m, EngineOptions{KVTokens: 64, BlockSize: 16})
	a, b := e.Pool.NewSeq(0), e.Pool.NewSeq(0)
	if err := a.Reserve(40); err != nil { // 3 blocks
		t.Fatal(err)
	}
	if err := b.Reserve(20); err != ErrPoolFull {
		t.Fatalf("reserving 2 blocks with 1 free: %v", err)
	}
	if b.Blocks() != 0 || e.Pool.FreeBlocks() != 1 {
		t.Fatalf("a failed reservation took blocks: %d held by b, %d free", b.Blocks(), e.Pool.FreeBlocks())
	}
	if _, err := e.Step([]Seq{{KV: b, Tokens: []int32{1, 2}}}); err == nil {
		t.Fatal("a step without reserved room succeeded")
	}
	a.Release()
	if e.Pool.FreeBlocks() != 4 {
		t.Fatalf("%d blocks free after release, want 4", e.Pool.FreeBlocks())
	}
}

// TestPagedAttentionMatchesGathered runs the same steps through an engine
// whose CPU layers read the KV pool in place (ggmlx.PagedAttention) and one
// that gathers every sequence's keys and values for ggml's flash attention
// (the GPU layers' path): prefill chunks, batched decode over sequences
// whose small blocks interleave in the pool, a prefill next to decodes, GQA
// and MHA, F16 and F32 caches, a quantized model. The paged op does ggml's
// arithmetic in another loop order, so every logit must be bit-identical.
func TestPagedAttentionMatchesGathered(t *testing.T) {
	dir := derived(t)
	for _, c := range []struct {
		name, path string
		f32        bool
	}{
		{"stories-mha-f16-cache", testutil.Shared(t, "models/stories260K.gguf"), false},
		{"stories-mha-f32-cache", testutil.Shared(t, "models/stories260K.gguf"), true},
		{"gqa-f32-f16-cache", dir + "/random-f32.gguf", false},
		{"gqa-q4_0-f16-cache", dir + "/random-Q4_0.gguf", false},
		{"gqa-q4_0-f32-cache", dir + "/random-Q4_0.gguf", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := loadModel(t, c.path)
			opts := EngineOptions{KVTokens: 512, MaxSeqLen: 128, BlockSize: 4, CacheF32: c.f32, NoPrefixCache: true}
			paged := newEngine(t, m, opts)
			opts.GatherAttention = true
			gathered := newEngine(t, m, opts)
			if p, g := paged.Pool.readModes(); !p || g {
				t.Fatalf("CPU pool: paged %v, gathered %v; want every layer paged", p, g)
			}
			if p, g := gathered.Pool.readModes(); p || !g {
				t.Fatalf("GatherAttention pool: paged %v, gathered %v", p, g)
			}
			prompt, err := m.Tokenizer.Encode(storiesText, true)
			if err != nil {
				t.Fatal(err)
			}
			vocab := int32(m.Params.VocabSize)
			for i := range prompt {
				prompt[i] %= vocab
			}
			type pair struct{ p, g *SeqKV }
			var live []pair
			newPair := func() pair {
				s := pair{paged.Pool.NewSeq(0), gathered.Pool.NewSeq(0)}
				live = append(live, s)
				return s
			}
			defer func() {
				for _, s := range live {
					s.p.Release()
					s.g.Release()
				}
			}()
			// run steps both engines with the same tokens and returns the
			// paged engine's logits, after comparing.
			run := func(name string, seqs []Seq, which []pair) [][][]float32 {
				t.Helper()
				ps, gs := slices.Clone(seqs), slices.Clone(seqs)
				for i := range seqs {
					ps[i].KV, gs[i].KV = which[i].p, which[i].g
				}
				got, want := step(t, paged, ps...), step(t, gathered, gs...)
				for i := range want {
					for j := range want[i] {
						for k := range want[i][j] {
							if got[i][j][k] != want[i][j][k] {
								t.Fatalf("%s: sequence %d row %d logit %d: paged %v, gathered %v", name, i, j, k, got[i][j][k], want[i][j][k])
							}
						}
					}
				}
				return got
			}
			a, b, cc := newPair(), newPair(), newPair()
			res := run("prefill", []Seq{{Tokens: prompt[:10], AllLogits: true}, {Tokens: prompt[3:10]}, {Tokens: prompt[20:23], AllLogits: true}}, []pair{a, b, cc})
			next := []int32{oracle.Argmax(res[0][9]), oracle.Argmax(res[1][0]), oracle.Argmax(res[2][2])}
			for s := 0; s < 12; s++ {
				res = run("decode", []Seq{{Tokens: next[:1]}, {Tokens: next[1:2]}, {Tokens: next[2:3]}}, []pair{a, b, cc})
				for i := range next {
					next[i] = oracle.Argmax(res[i][0])
				}
			}
			d := newPair()
			run("prefill among decodes", []Seq{{Tokens: next[:1]}, {Tokens: prompt[30:45], AllLogits: true}, {Tokens: next[2:3]}}, []pair{a, d, cc})
		})
	}
}
