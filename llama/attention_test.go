package llama

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/x448/float16"

	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
)

// TestPagedAttentionOp checks ggmlx.PagedAttention on a pool whose blocks
// are scattered and shared out of order between sequences (a prefill chunk,
// a decode and a short prefill in one call, GQA) against a float64
// reference, and against ggml's flash attention run on each sequence's
// keys and values gathered on the host: the paged op does ggml's
// arithmetic (F16 rounding of the query and the accumulator for an F16
// cache included) in another order, so the two must be bit-identical.
func TestPagedAttentionOp(t *testing.T) {
	m := loadModel(t, derived(t)+"/random-f32.gguf")
	const D, H, KVH, bs, nBlocks = 64, 4, 2, 4, 8
	type seq struct {
		blocks []int32
		pos0   int // first query position
		n      int // query tokens
	}
	seqs := []seq{{[]int32{5, 2, 7}, 6, 4}, {[]int32{0, 6}, 6, 1}, {[]int32{3}, 0, 3}}
	for _, f16 := range []bool{false, true} {
		t.Run(fmt.Sprintf("f16=%v", f16), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(3, 4))
			rnd := func(n int) []float32 {
				v := make([]float32, n)
				for i := range v {
					v[i] = 2*rng.Float32() - 1
				}
				return v
			}
			kPool, vPool := rnd(D*KVH*bs*nBlocks), rnd(D*KVH*bs*nBlocks)
			// What the pool stores (and the reference reads).
			stored := func(x float32) float64 {
				if f16 {
					return float64(float16.Fromfloat32(x).Float32())
				}
				return float64(x)
			}
			var N int
			for _, s := range seqs {
				N += s.n
			}
			q := rnd(D * H * N)
			maxBlocks := 3
			table := make([]int32, maxBlocks*len(seqs))
			var where []int32
			for i, s := range seqs {
				copy(table[i*maxBlocks:], s.blocks)
				for j := 0; j < s.n; j++ {
					where = append(where, int32(i), int32(s.pos0+j))
				}
			}
			const scale = 0.125
			ctx := m.Backend().NewContext()
			defer ctx.Close()
			pool := func(v []float32) ml.Tensor {
				p := ctx.Input().FromFloats(v, D*KVH, bs*nBlocks)
				if f16 {
					p = p.Cast(ctx, ml.DTypeF16)
				}
				return p
			}
			paged := ggmlx.PagedAttention(ctx, ctx.Input().FromFloats(q, D, H, N), pool(kPool), pool(vPool),
				ctx.Input().FromInts(table, maxBlocks, len(seqs)), ctx.Input().FromInts(where, 2, N), bs, scale)
			outs := []ml.Tensor{paged}
			row := func(s seq, pos int) int { return int(s.blocks[pos/bs])*bs + pos%bs }
			tok := 0
			for _, s := range seqs {
				L := s.pos0 + s.n
				var kg, vg, mask []float32
				for p := 0; p < L; p++ {
					r := row(s, p)
					kg = append(kg, kPool[r*D*KVH:(r+1)*D*KVH]...)
					vg = append(vg, vPool[r*D*KVH:(r+1)*D*KVH]...)
				}
				for j := 0; j < s.n; j++ {
					for p := 0; p < L; p++ {
						if p <= s.pos0+j {
							mask = append(mask, 0)
						} else {
							mask = append(mask, float32(math.Inf(-1)))
						}
					}
				}
				kt, vt := ctx.Input().FromFloats(kg, D, KVH, L, 1), ctx.Input().FromFloats(vg, D, KVH, L, 1)
				if f16 {
					kt, vt = kt.Cast(ctx, ml.DTypeF16), vt.Cast(ctx, ml.DTypeF16)
				}
				qt := ctx.Input().FromFloats(q[tok*D*H:(tok+s.n)*D*H], D, H, s.n, 1)
				mt := ctx.Input().FromFloats(mask, L, s.n).Cast(ctx, ml.DTypeF16)
				outs = append(outs, qt.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, kt, vt, mt, nil, nil, scale, true))
				tok += s.n
			}
			if err := ggmlx.ComputeOutputs(ctx, outs, 1024); err != nil {
				t.Fatal(err)
			}
			got := ggmlx.ReadFloats(paged)
			var fa []float32
			for _, o := range outs[1:] {
				fa = append(fa, ggmlx.ReadFloats(o)...)
			}
			var errPaged, errFA, apart float64
			tok = 0
			for _, s := range seqs {
				for j := 0; j < s.n; j++ {
					for h := 0; h < H; h++ {
						kvh := h / (H / KVH)
						qv := q[(tok*H+h)*D : (tok*H+h+1)*D]
						var w []float64
						top := math.Inf(-1)
						for p := 0; p <= s.pos0+j; p++ {
							r := row(s, p)
							dot := 0.0
							for d := 0; d < D; d++ {
								dot += float64(qv[d]) * stored(kPool[(r*KVH+kvh)*D+d])
							}
							w = append(w, dot*scale)
							top = math.Max(top, dot*scale)
						}
						sum := 0.0
						for i := range w {
							w[i] = math.Exp(w[i] - top)
							sum += w[i]
						}
						for d := 0; d < D; d++ {
							ref := 0.0
							for p, wp := range w {
								ref += wp * stored(vPool[(row(s, p)*KVH+kvh)*D+d])
							}
							ref /= sum
							i := (tok*H+h)*D + d
							errPaged = math.Max(errPaged, math.Abs(float64(got[i])-ref))
							errFA = math.Max(errFA, math.Abs(float64(fa[i])-ref))
							apart = math.Max(apart, math.Abs(float64(got[i])-float64(fa[i])))
						}
					}
					tok++
				}
			}
			t.Logf("max error vs float64: paged %.3g, ggml flash attention %.3g; max |paged - ggml| %.3g", errPaged, errFA, apart)
			tol := 1e-6 // F32: rounding of a few float32 operations
			if f16 {
				tol = 1e-3 // the query rounded to F16 and an F16 accumulator, as in ggml
			}
			if errPaged > tol || apart != 0 {
				t.Fatalf("paged attention: error %.3g (tolerance %.g; ggml's %.3g), %.3g from ggml's", errPaged, tol, errFA, apart)
			}
		})
	}
}
