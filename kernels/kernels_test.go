package kernels

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend/ggml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Quiet()
	os.Exit(m.Run())
}

// oneWeight is a backend holding a single projection weight
// (blk.0.attn_q.weight, in → out) and the adapters.Base describing it.
type oneWeight struct {
	backend ml.Backend
	base    *adapters.Base
	w       ml.Tensor
	values  []float32 // dequantized weight, out rows of in
	in, out int
}

func newOneWeight(tb testing.TB, in, out int, typ gguf.TensorType) *oneWeight {
	tb.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	v := make([]float32, in*out)
	for i := range v {
		v[i] = (2*rng.Float32() - 1) / float32(math.Sqrt(float64(in)))
	}
	var data []byte
	var err error
	if typ == gguf.TypeF32 {
		data = make([]byte, 4*len(v))
		for i, x := range v {
			u := math.Float32bits(x)
			data[4*i], data[4*i+1], data[4*i+2], data[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
		}
	} else if data, err = ggmlx.Quantize(uint32(typ), v, out, in); err != nil {
		tb.Fatal(err)
	}
	if v, err = ggmlx.Dequantize(uint32(typ), data, in*out); err != nil {
		tb.Fatal(err)
	}
	w := gguf.NewWriter()
	w.KV.Set("general.architecture", "llama")
	w.KV.Set("llama.block_count", uint32(1))
	const name = "blk.0.attn_q.weight"
	if err := w.AddTensor(name, typ, []uint64{uint64(in), uint64(out)}, data); err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(tb.TempDir(), "weight.gguf")
	if err := w.WriteFile(path); err != nil {
		tb.Fatal(err)
	}
	b, err := ml.NewBackend(path, ml.BackendParams{AllocMemory: true, NumThreads: 2, FlashAttention: ml.FlashAttentionEnabled})
	if err != nil {
		tb.Fatal(err)
	}
	if err := b.Load(tb.Context(), nil); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(b.Close)
	base := adapters.NewBase("llama", 1, []adapters.TensorShape{{Name: name, Shape: []uint64{uint64(in), uint64(out)}}})
	return &oneWeight{backend: b, base: base, w: b.Get(name), values: v, in: in, out: out}
}

func (o *oneWeight) randomAdapter(tb testing.TB, v adapters.Variant, rank int, seed uint64) *adapters.Adapter {
	tb.Helper()
	a, err := adapters.NewRandom(o.base, adapters.RandomOptions{Name: fmt.Sprintf("%s%d-%d", v, rank, seed), Variant: v, Rank: rank,
		Modules: []adapters.Module{adapters.Q}, Seed: seed, Std: 0.1})
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// run computes W·x plus the routed updates for T tokens on the backend.
func (o *oneWeight) run(tb testing.TB, bank *Bank, x []float32, uses [][]Use) []float32 {
	tb.Helper()
	r, err := bank.Route(uses)
	if err != nil {
		tb.Fatal(err)
	}
	ctx := o.backend.NewContext()
	defer ctx.Close()
	T := len(uses)
	xt := ctx.Input().FromFloats(x, o.in, T)
	h := o.w.Mulmat(ctx, xt)
	if !r.Empty() {
		h = r.Bind(ctx).Project(ctx, adapters.Target{Layer: 0, Module: adapters.Q}, xt, h)
	}
	ctx.Forward(h).Compute(h)
	return h.Floats()
}

// TestOpsMatchFloat64 routes tokens to FA, FB and LoRA adapters of
// different ranks, alone and composed (with overlapping FB rows and a
// negative scale), and checks each token's output against float64 loops
// over the dequantized weight: W·x + Σ scale·alpha/r·ΔW·x.
func TestOpsMatchFloat64(t *testing.T) {
	for _, c := range []struct {
		typ     gguf.TensorType
		bank    ml.DType
		generic bool
	}{{gguf.TypeF32, ml.DTypeF32, false}, {gguf.TypeF32, ml.DTypeF32, true}, {gguf.TypeF32, ml.DTypeF16, false}, {gguf.TypeF32, ml.DTypeF16, true},
		{gguf.TypeQ8_0, ml.DTypeF16, false}, {gguf.TypeQ4_0, ml.DTypeF16, false}, {gguf.TypeQ4_0, ml.DTypeF16, true}, {gguf.TypeF32, ml.DTypeQ80, false}} {
		typ := c.typ
		path := map[bool]string{false: "fused", true: "generic"}[c.generic]
		t.Run(typ.String()+"/bank-"+bankName(c.bank)+"/"+path, func(t *testing.T) {
			o := newOneWeight(t, 96, 64, typ)
			bank, err := NewBank(o.backend, o.base, Config{Slots: 6, MaxRank: 32, DType: c.bank, Generic: c.generic})
			if err != nil {
				t.Fatal(err)
			}
			defer bank.Close()
			fa8 := o.randomAdapter(t, adapters.FA, 8, 1)
			fa16 := o.randomAdapter(t, adapters.FA, 16, 2)
			fb4 := o.randomAdapter(t, adapters.FB, 4, 3)
			fb12 := o.randomAdapter(t, adapters.FB, 12, 4)
			// fb12 writes the four rows fb4 writes, and eight more.
			overlap := append([]int32(nil), fb4.Modules[0].Index...)
			for r := int32(0); len(overlap) < 12; r++ {
				if !slices.Contains(overlap, r) {
					overlap = append(overlap, r)
				}
			}
			fb12.Modules[0].Index = overlap
			lora := o.randomAdapter(t, adapters.LoRA, 6, 5)
			res := map[*adapters.Adapter]*Resident{}
			for _, a := range []*adapters.Adapter{fa8, fa16, fb4, fb12, lora} {
				if res[a], err = bank.Load(a); err != nil {
					t.Fatal(err)
				}
			}
			use := func(a *adapters.Adapter, s float32) Use { return Use{Adapter: res[a], Scale: s} }
			type applied struct {
				a *adapters.Adapter
				s float32
			}
			plans := [][]applied{
				nil,
				{{fa8, 1}},
				{{fa16, 0.5}},
				{{fb4, 1}},
				{{fb12, -2}},
				{{lora, 1}},
				{{fa8, 1}, {fb4, 1}},
				{{fb4, 0.7}, {fb12, 1.3}, {fa16, -1}, {lora, 0.25}},
				{{fa8, 1}, {fa16, 1}},
			}
			rng := rand.New(rand.NewPCG(9, 9))
			x := make([]float32, o.in*len(plans))
			for i := range x {
				x[i] = 2*rng.Float32() - 1
			}
			uses := make([][]Use, len(plans))
			for tok, p := range plans {
				for _, ap := range p {
					uses[tok] = append(uses[tok], use(ap.a, ap.s))
				}
			}
			got := o.run(t, bank, x, uses)
			worst := 0.0
			for tok, p := range plans {
				xt := x[tok*o.in : (tok+1)*o.in]
				want := make([]float64, o.out)
				termL1 := make([]float64, o.out) // Σ|terms| of the adapter update
				for r := 0; r < o.out; r++ {
					for i := 0; i < o.in; i++ {
						want[r] += float64(o.values[r*o.in+i]) * float64(xt[i])
					}
				}
				for _, ap := range p {
					d := ap.a.DeltaW(ap.a.Modules[0], float64(ap.s)*float64(ap.a.Scale()))
					for r := 0; r < o.out; r++ {
						for i := 0; i < o.in; i++ {
							want[r] += d[r*o.in+i] * float64(xt[i])
							termL1[r] += math.Abs(d[r*o.in+i] * float64(xt[i]))
						}
					}
				}
				for r := 0; r < o.out; r++ {
					diff := math.Abs(float64(got[tok*o.out+r]) - want[r])
					worst = max(worst, diff)
					// Q8_0/Q4_0 matmuls quantize x to 8 bits; the adapter
					// term adds the bank's own rounding.
					tol := 1e-5 * (1 + math.Abs(want[r]))
					if typ != gguf.TypeF32 {
						tol = 2e-2 * (1 + math.Abs(want[r]))
					}
					tol += bankTolerance(c.bank) * termL1[r]
					if diff > tol {
						t.Fatalf("token %d row %d: got %g, want %g", tok, r, got[tok*o.out+r], want[r])
					}
				}
			}
			t.Logf("%s, %s bank, %s ops: worst |Δ| %.2g over %d tokens", typ, bankName(c.bank), path, worst, len(plans))
		})
	}
}

// bankTolerance bounds the bank's rounding relative to the adapter term's
// L1 norm (Σ|terms|): F16 stores matrices and products' inputs with 11
// significant bits (LoRA rounds twice: A·x, then B·(A·x)), Q8_0 with 8.
func bankTolerance(d ml.DType) float64 {
	switch d {
	case ml.DTypeF16:
		return 2e-3
	case ml.DTypeQ80:
		return 2.5e-2
	}
	return 0
}

func bankName(d ml.DType) string {
	return map[ml.DType]string{ml.DTypeF32: "F32", ml.DTypeF16: "F16", ml.DTypeQ80: "Q8_0"}[d]
}

// TestAdapterTermMatchesFloat64 isolates the adapter term (output minus the
// base output) so quantized bases are held to the bank's precision: F32
// banks to float32 accuracy, F16 and Q8_0 banks to their own rounding
// (relative to the term's L1 norm); the measured errors are logged.
func TestAdapterTermMatchesFloat64(t *testing.T) {
	for _, d := range []ml.DType{ml.DTypeF32, ml.DTypeF16, ml.DTypeQ80} {
		t.Run(bankName(d), func(t *testing.T) {
			o := newOneWeight(t, 64, 48, gguf.TypeQ4_0)
			bank, err := NewBank(o.backend, o.base, Config{Slots: 3, MaxRank: 32, DType: d})
			if err != nil {
				t.Fatal(err)
			}
			defer bank.Close()
			var uses [][]Use
			var as []*adapters.Adapter
			for i, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
				a := o.randomAdapter(t, v, 8, uint64(10+i))
				r, err := bank.Load(a)
				if err != nil {
					t.Fatal(err)
				}
				as = append(as, a)
				uses = append(uses, []Use{{Adapter: r, Scale: 1}})
			}
			x := make([]float32, o.in*len(uses))
			for i := range x {
				x[i] = float32(math.Sin(float64(i)))
			}
			with := o.run(t, bank, x, uses)
			without := o.run(t, bank, x, make([][]Use, len(uses)))
			worst := 0.0
			for tok, a := range as {
				dw := a.DeltaW(a.Modules[0], float64(a.Scale()))
				for r := 0; r < o.out; r++ {
					want, l1 := 0.0, 0.0
					for i := 0; i < o.in; i++ {
						want += dw[r*o.in+i] * float64(x[tok*o.in+i])
						l1 += math.Abs(dw[r*o.in+i] * float64(x[tok*o.in+i]))
					}
					got := float64(with[tok*o.out+r] - without[tok*o.out+r])
					if l1 > 0 {
						worst = max(worst, math.Abs(got-want)/l1)
					}
					if math.Abs(got-want) > 1e-5*(1+math.Abs(want))+bankTolerance(d)*l1 {
						t.Fatalf("%s token %d row %d: adapter term %g, want %g", a.Variant, tok, r, got, want)
					}
				}
			}
			t.Logf("%s bank: worst |Δ| / Σ|terms| of the adapter term = %.2g", bankName(d), worst)
		})
	}
}

// TestBankSlots checks residency bookkeeping: slots run out, unloading frees
// one, a reused slot carries no trace of the previous occupant, and routing
// to an unloaded adapter is an error.
func TestBankSlots(t *testing.T) {
	o := newOneWeight(t, 32, 32, gguf.TypeF32)
	bank, err := NewBank(o.backend, o.base, Config{Slots: 2, MaxRank: 8, DType: ml.DTypeF32})
	if err != nil {
		t.Fatal(err)
	}
	defer bank.Close()
	a1, _ := bank.Load(o.randomAdapter(t, adapters.FA, 8, 1))
	a2, err := bank.Load(o.randomAdapter(t, adapters.FA, 4, 2))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bank.Load(o.randomAdapter(t, adapters.FA, 4, 3)); err == nil {
		t.Fatal("third FA adapter loaded into a 2-slot bank")
	}
	if bank.Free(adapters.FB) != 2 {
		t.Fatal("FB slots are shared with FA")
	}
	bank.Unload(a1)
	if _, err := bank.Route([][]Use{{{Adapter: a1, Scale: 1}}}); err == nil {
		t.Fatal("routing to an unloaded adapter succeeded")
	}
	small := o.randomAdapter(t, adapters.FA, 2, 4)
	a3, err := bank.Load(small)
	if err != nil {
		t.Fatal(err)
	}
	if a3.Slot() != a1.Slot() {
		t.Fatalf("expected slot %d to be reused, got %d", a1.Slot(), a3.Slot())
	}
	// The step rank is 4 (a2); a3's slot columns 2..7 must be zero even
	// though the previous rank-8 occupant filled them.
	x := make([]float32, 32*2)
	for i := range x {
		x[i] = 1
	}
	got := o.run(t, bank, x, [][]Use{{{Adapter: a3, Scale: 1}}, {{Adapter: a2, Scale: 1}}})
	base := o.run(t, bank, x, [][]Use{nil, nil})
	d := small.DeltaW(small.Modules[0], float64(small.Scale()))
	for r := 0; r < 32; r++ {
		want := 0.0
		for i := 0; i < 32; i++ {
			want += d[r*32+i]
		}
		if diff := float64(got[r]-base[r]) - want; math.Abs(diff) > 1e-5 {
			t.Fatalf("row %d: reused slot adds %g, want %g", r, got[r]-base[r], want)
		}
	}
}

// TestBankHalvesAreShared checks the slot budget: FA adapters take B halves
// and FB adapters A halves, so a bank of n slots holds n of each at once;
// a LoRA needs both halves, and Helps names the residents whose eviction
// would make room for it.
func TestBankHalvesAreShared(t *testing.T) {
	o := newOneWeight(t, 32, 32, gguf.TypeF32)
	bank, err := NewBank(o.backend, o.base, Config{Slots: 2, MaxRank: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer bank.Close()
	var fas, fbs []*Resident
	for i := 0; i < 2; i++ {
		fa, err := bank.Load(o.randomAdapter(t, adapters.FA, 4, uint64(1+i)))
		if err != nil {
			t.Fatal(err)
		}
		fb, err := bank.Load(o.randomAdapter(t, adapters.FB, 4, uint64(3+i)))
		if err != nil {
			t.Fatal(err)
		}
		fas, fbs = append(fas, fa), append(fbs, fb)
	}
	if bank.Free(adapters.FA) != 0 || bank.Free(adapters.FB) != 0 || bank.Free(adapters.LoRA) != 0 {
		t.Fatalf("free after 2 FA + 2 FB in 2 slots: FA %d, FB %d, LoRA %d", bank.Free(adapters.FA), bank.Free(adapters.FB), bank.Free(adapters.LoRA))
	}
	lora := o.randomAdapter(t, adapters.LoRA, 4, 9)
	if _, err := bank.Load(lora); !errors.Is(err, adapters.ErrNoSlot) {
		t.Fatalf("LoRA into a full bank: %v", err)
	}
	if !bank.Helps(fas[0], adapters.LoRA) || !bank.Helps(fbs[0], adapters.LoRA) || bank.Helps(fas[0], adapters.FB) {
		t.Fatal("Helps disagrees with the halves each variant needs")
	}
	bank.Unload(fas[0])
	if _, err := bank.Load(lora); !errors.Is(err, adapters.ErrNoSlot) {
		t.Fatalf("LoRA with only a B half free: %v", err)
	}
	bank.Unload(fbs[1])
	if _, err := bank.Load(lora); err != nil {
		t.Fatalf("LoRA with both halves free: %v", err)
	}
}

// TestStreamedUploadEqualsMemory uploads an adapter streamed from its F16
// file and the same adapter decoded into memory: the outputs are identical.
// A file whose values are not finite fails to upload.
func TestStreamedUploadEqualsMemory(t *testing.T) {
	o := newOneWeight(t, 64, 48, gguf.TypeF32)
	bank, err := NewBank(o.backend, o.base, Config{Slots: 4, MaxRank: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer bank.Close()
	dir := t.TempDir()
	for i, v := range []adapters.Variant{adapters.FA, adapters.FB, adapters.LoRA} {
		path := filepath.Join(dir, string(v)+".gguf")
		if err := o.randomAdapter(t, v, 12, uint64(30+i)).Save(path, adapters.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		inMemory, err := adapters.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		mem, err := bank.Load(inMemory)
		if err != nil {
			t.Fatal(err)
		}
		rd, err := adapters.OpenReader(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := rd.Adapter.Resolve(o.base); err != nil {
			t.Fatal(err)
		}
		streamed, err := bank.Reserve(rd.Adapter.Name, rd.Adapter.Variant, rd.Adapter.Rank)
		if err != nil {
			t.Fatal(err)
		}
		if err := streamed.Upload(rd.Adapter, rd); err != nil {
			t.Fatal(err)
		}
		rd.Close()
		bank.Activate(streamed)
		x := make([]float32, o.in*2) // the same input for both tokens
		for j := range x {
			x[j] = float32(math.Cos(float64(j % o.in)))
		}
		got := o.run(t, bank, x, [][]Use{{{Adapter: mem, Scale: 1}}, {{Adapter: streamed, Scale: 1}}})
		if !slices.Equal(got[:o.out], got[o.out:]) {
			t.Fatalf("%s: streamed upload differs from the in-memory one", v)
		}
		bank.Unload(mem)
		bank.Unload(streamed)
	}
	// A NaN in the file's B matrix: reading succeeds, uploading fails.
	path := filepath.Join(dir, "nan.gguf")
	if err := o.randomAdapter(t, adapters.FA, 4, 40).Save(path, adapters.SaveOptions{F32: true}); err != nil {
		t.Fatal(err)
	}
	f, err := gguf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := f.Tensor("blk.0.attn_q.weight.sbora_b")
	off := f.DataOffset + int64(info.Offset) + 4*5
	f.Close()
	raw, _ := os.ReadFile(path)
	binary.LittleEndian.PutUint32(raw[off:], 0x7fc00000)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	rd, err := adapters.OpenReader(path)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	rd.Adapter.Resolve(o.base)
	res, err := bank.Reserve(rd.Adapter.Name, rd.Adapter.Variant, rd.Adapter.Rank)
	if err != nil {
		t.Fatal(err)
	}
	var nf ggmlx.ErrNonFinite
	if err := res.Upload(rd.Adapter, rd); !errors.As(err, &nf) || nf.Index != 5 {
		t.Fatalf("uploading a NaN: %v", err)
	}
	bank.Unload(res)
}
