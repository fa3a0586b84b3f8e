package llama

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"strings"
	"sync"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend/ggml" // registers the ggml backend
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	"github.com/ollama/ollama/tokenizer"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// Model is a LLaMA-architecture model whose weights live in a ggml backend.
// Field tags name the GGUF tensors, as in ollama's model definitions.
type Model struct {
	model.Base

	TokenEmbedding *nn.Embedding `gguf:"token_embd"`
	Layers         []Layer       `gguf:"blk"`
	OutputNorm     *nn.RMSNorm   `gguf:"output_norm"`
	Output         *nn.Linear    `gguf:"output,alt:token_embd"`

	Params    Config
	Tokenizer tokenizer.Tokenizer
	// AdapterBase describes the model's weights for adapter validation.
	AdapterBase *adapters.Base
	// Path is the GGUF the model was loaded from.
	Path string
	// Threads is the CPU thread count of the backend.
	Threads int
	// Placement is where the layers run (CPU, or some on a GPU).
	Placement Placement
	// repacked holds the weights moved to ggml-cpu's repacked layouts.
	repacked *ggmlx.Repacked
	threads  *ggmlx.Threadpool
}

// Layer is one transformer block.
type Layer struct {
	AttentionNorm *nn.RMSNorm `gguf:"attn_norm"`
	Attention     *Attention
	MLPNorm       *nn.RMSNorm `gguf:"ffn_norm"`
	MLP           *MLP
}

// Attention holds the attention projections and optional llama3 rope factors.
type Attention struct {
	Query       *nn.Linear `gguf:"attn_q"`
	Key         *nn.Linear `gguf:"attn_k"`
	Value       *nn.Linear `gguf:"attn_v"`
	Output      *nn.Linear `gguf:"attn_output"`
	RopeFactors ml.Tensor  `gguf:"rope_freqs.weight"`
}

// MLP is the SwiGLU feed-forward block.
type MLP struct {
	Gate *nn.Linear `gguf:"ffn_gate"`
	Up   *nn.Linear `gguf:"ffn_up"`
	Down *nn.Linear `gguf:"ffn_down"`
}

// Forward satisfies ollama's model.Model; sbora-serve drives the model
// through Engine and the trainer instead.
func (m *Model) Forward(ml.Context, input.Batch) (ml.Tensor, error) {
	return nil, errors.New("llama: use Engine.Step")
}

var registerOnce sync.Once

// newForRegistry is the constructor registered with ollama's model package,
// which then fills the tagged weights from the backend.
func newForRegistry(c fs.Config) (model.Model, error) {
	cfg, err := configFrom(c)
	if err != nil {
		return nil, err
	}
	tok, err := NewTokenizer(c)
	if err != nil {
		return nil, err
	}
	return &Model{Layers: make([]Layer, cfg.Layers), Params: cfg, Tokenizer: tok}, nil
}

// LoadOptions configure Load.
type LoadOptions struct {
	// Threads for CPU compute; 0 means the number of cores.
	Threads int
	// Progress receives the fraction of weights loaded.
	Progress func(float32)
	// Repack converts the projection and output weights to ggml-cpu's
	// repacked layouts after loading (llama.cpp's default on the CPU;
	// faster matmuls). A repacked model can only run inference: the
	// trainer's backward pass and weight readers need the plain layout.
	Repack bool
	// PersistentThreads gives the CPU backend a pool of worker threads that
	// sleep between graphs, instead of threads started for every graph.
	PersistentThreads bool
	// HugePages backs the weights with transparent huge pages (fewer TLB
	// misses on the matrices read every step).
	HugePages bool
	// GPULayers is how many transformer layers go to the GPU, counted from
	// the last (with their KV cache and adapter bank slots); the output
	// head goes too when all do. AllLayers (-1) offloads everything; 0
	// keeps the model on the CPU. Without a GPU the model runs on the CPU
	// and Load logs why.
	GPULayers int
}

// AllLayers offloads every layer (LoadOptions.GPULayers).
const AllLayers = -1

// Placement is where a model's layers run.
type Placement struct {
	GPU       *ggmlx.GPU // nil: CPU only
	GPULayers int        // transformer layers on the GPU
	Output    bool       // the output head is on the GPU
}

func (p Placement) String() string {
	if p.GPU == nil {
		return "CPU"
	}
	head := ""
	if p.Output {
		head = " and the output head"
	}
	return fmt.Sprintf("%s (%s, %.0f GiB free): %d layers%s", p.GPU.Description, p.GPU.ID.Library, float64(p.GPU.FreeMemory)/(1<<30), p.GPULayers, head)
}

// place decides which layers go to the first GPU.
func place(layers, want int, gpus []ggmlx.GPU) (Placement, ml.GPULayersList) {
	if want == 0 || len(gpus) == 0 {
		return Placement{}, nil
	}
	if want < 0 || want > layers {
		want = layers
	}
	g := gpus[0]
	var ids []int
	for i := layers - want; i < layers; i++ {
		ids = append(ids, i)
	}
	pl := Placement{GPU: &g, GPULayers: want, Output: want == layers}
	if pl.Output {
		ids = append(ids, layers) // ollama's index of the output head
	}
	return pl, ml.GPULayersList{{DeviceID: g.ID, Layers: ids}}
}

// ServingOptions are the load options of inference: repacked weights,
// persistent worker threads and huge pages.
func ServingOptions(threads int) LoadOptions {
	return LoadOptions{Threads: threads, Repack: true, PersistentThreads: true, HugePages: true}
}

// ReadBase reads only the metadata of a base model GGUF and describes its
// weights for adapters (architecture, layers, shapes, fingerprint).
func ReadBase(path string) (*adapters.Base, error) {
	info, err := ReadInfo(path)
	if err != nil {
		return nil, err
	}
	return info.Base, nil
}

// Load opens a LLaMA GGUF, builds the model and reads its weights.
func Load(path string, opts LoadOptions) (*Model, error) {
	registerOnce.Do(func() { model.Register("llama", newForRegistry) })
	base, err := ReadBase(path)
	if err != nil {
		return nil, err
	}
	threads := opts.Threads
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	var gpus []ggmlx.GPU
	if opts.GPULayers != 0 {
		gpus = ggmlx.GPUs()
		if len(gpus) == 0 {
			slog.Warn("no GPU found: running on the CPU", "looked_in", strings.Join(ggmlx.LibraryPaths(), ":"),
				"hint", "build the CUDA backend with make cuda (lib/ollama next to bin/) or set OLLAMA_LIBRARY_PATH; --gpu-layers 0 silences this")
		}
	}
	placement, gpuLayers := place(base.Layers, opts.GPULayers, gpus)
	mm, err := newModel(path, ml.BackendParams{AllocMemory: true, NumThreads: threads, FlashAttention: ml.FlashAttentionEnabled, GPULayers: gpuLayers})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m, ok := mm.(*Model)
	if !ok {
		return nil, fmt.Errorf("%s: architecture is not handled by sbora-serve's llama model", path)
	}
	if err := m.validate(); err != nil {
		m.Backend().Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := m.Backend().Load(context.Background(), opts.Progress); err != nil {
		m.Backend().Close()
		return nil, fmt.Errorf("%s: loading weights: %w", path, err)
	}
	m.Path = path
	m.Threads = threads
	m.AdapterBase = base
	m.Placement = placement
	if opts.HugePages {
		ggmlx.HugePages(m.matmulWeights())
	}
	if opts.PersistentThreads {
		m.threads = ggmlx.UseThreadpool(m.Backend(), threads, 0)
	}
	if opts.Repack {
		if m.repacked, err = ggmlx.Repack(m.matmulWeights()); err != nil {
			m.Backend().Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	return m, nil
}

// matmulWeights lists the weights used only as matrix-product operands
// (not the token embedding, which is gathered from, even when the output
// head shares its values: ggml's backend gives the head its own copy).
func (m *Model) matmulWeights() []ml.Tensor {
	var ws []ml.Tensor
	for _, l := range m.Layers {
		for _, lin := range []*nn.Linear{l.Attention.Query, l.Attention.Key, l.Attention.Value, l.Attention.Output, l.MLP.Gate, l.MLP.Up, l.MLP.Down} {
			ws = append(ws, lin.Weight)
		}
	}
	if !ggmlx.SameTensor(m.Output.Weight, m.TokenEmbedding.Weight) {
		ws = append(ws, m.Output.Weight)
	}
	return ws
}

// Repacked reports how many weights (and bytes) were repacked.
func (m *Model) Repacked() (int, int64) {
	if m.repacked == nil {
		return 0, 0
	}
	return m.repacked.Count, m.repacked.Bytes
}

// newModel wraps model.New, which panics (ml.ErrNoMem) when memory runs out.
func newModel(path string, params ml.BackendParams) (m model.Model, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("creating backend: %v", p)
		}
	}()
	return model.New(path, params)
}

func (m *Model) validate() error {
	if m.TokenEmbedding == nil || m.OutputNorm == nil || m.Output == nil {
		return errors.New("missing token_embd, output_norm or output weights")
	}
	if m.Params.VocabSize != m.TokenEmbedding.Weight.Dim(1) {
		return fmt.Errorf("tokenizer has %d tokens but token_embd has %d rows", m.Params.VocabSize, m.TokenEmbedding.Weight.Dim(1))
	}
	for i, l := range m.Layers {
		if l.AttentionNorm == nil || l.MLPNorm == nil || l.Attention == nil || l.MLP == nil ||
			l.Attention.Query == nil || l.Attention.Key == nil || l.Attention.Value == nil || l.Attention.Output == nil ||
			l.MLP.Gate == nil || l.MLP.Up == nil || l.MLP.Down == nil {
			return fmt.Errorf("layer %d is missing weights", i)
		}
		if q := l.Attention.Query.Weight; q.Dim(1) != m.Params.QDim() {
			return fmt.Errorf("layer %d attn_q has %d outputs, want heads×head_dim = %d", i, q.Dim(1), m.Params.QDim())
		}
		if k := l.Attention.Key.Weight; k.Dim(1) != m.Params.KVDim() {
			return fmt.Errorf("layer %d attn_k has %d outputs, want kv_heads×head_dim = %d", i, k.Dim(1), m.Params.KVDim())
		}
	}
	return nil
}

// Close frees the model's backend memory.
func (m *Model) Close() {
	m.threads.Close(m.Backend())
	m.Backend().Close()
	m.repacked.Free()
}

// Projector adds adapter updates to each projection (see kernels.Projector).
type Projector = kernels.Projector

// Attender computes attention for one layer: q [headDim, heads, T] and
// k, v [headDim, kvHeads, T] after RoPE; it returns [headDim·heads, T].
type Attender interface {
	Attend(ctx ml.Context, layer int, q, k, v ml.Tensor) ml.Tensor
}

func (m *Model) project(ctx ml.Context, p Projector, lin *nn.Linear, t adapters.Target, x ml.Tensor) ml.Tensor {
	h := lin.Forward(ctx, x)
	if p != nil {
		h = p.Project(ctx, t, x, h)
	}
	return h
}

func (m *Model) rope(ctx ml.Context, x, positions, factors ml.Tensor) ml.Tensor {
	c := m.Params
	return nn.RoPE(ctx, x, positions, c.RopeDim, c.RopeBase, c.RopeScale, rope.WithFactors(factors))
}

// Transformer runs the layers over a batch of T tokens and returns the final
// hidden states of the rows in outputs (all rows when nil), before the
// output norm: [embedding, len(outputs)]. It is the one LLaMA forward pass:
// the engine feeds it cached attention, the trainer full-sequence attention.
func (m *Model) Transformer(ctx ml.Context, tokens, positions, outputs ml.Tensor, att Attender, p Projector) ml.Tensor {
	hidden := m.TokenEmbedding.Forward(ctx, tokens)
	for i := range m.Layers {
		var rows ml.Tensor
		if i == len(m.Layers)-1 {
			rows = outputs
		}
		hidden = m.Layer(ctx, i, hidden, positions, rows, att, p, LayerOptions{})
	}
	return hidden
}

// LayerOptions vary how Layer computes.
type LayerOptions struct {
	// Dequantize multiplies by F32 copies of the weights made in the
	// graph instead of the stored (quantized) ones: every backend can
	// differentiate through that (CUDA's OUT_PROD takes F32 only), at the
	// memory cost of one layer's weights in F32 while the graph runs.
	Dequantize bool
}

// Layer is transformer block i over hidden [embedding, T]; with outputs
// only those rows leave it (the last layer, before the head).
func (m *Model) Layer(ctx ml.Context, i int, hidden, positions, outputs ml.Tensor, att Attender, p Projector, o LayerOptions) ml.Tensor {
	c := m.Params
	T := hidden.Dim(1)
	l := &m.Layers[i]
	project := func(lin *nn.Linear, mod adapters.Module, x ml.Tensor) ml.Tensor {
		t := adapters.Target{Layer: i, Module: mod}
		if !o.Dequantize {
			return m.project(ctx, p, lin, t, x)
		}
		w := lin.Weight
		if w.DType() != ml.DTypeF32 {
			w = w.Cast(ctx, ml.DTypeF32)
		}
		h := w.Mulmat(ctx, x)
		if p != nil {
			h = p.Project(ctx, t, x, h)
		}
		return h
	}
	residual := hidden
	x := l.AttentionNorm.Forward(ctx, hidden, c.Eps)
	q := project(l.Attention.Query, adapters.Q, x)
	k := project(l.Attention.Key, adapters.K, x)
	v := project(l.Attention.Value, adapters.V, x)
	q = m.rope(ctx, q.Reshape(ctx, c.HeadDim, c.Heads, T), positions, l.Attention.RopeFactors)
	k = m.rope(ctx, k.Reshape(ctx, c.HeadDim, c.KVHeads, T), positions, l.Attention.RopeFactors)
	v = v.Reshape(ctx, c.HeadDim, c.KVHeads, T)
	a := att.Attend(ctx, i, q, k, v)
	hidden = project(l.Attention.Output, adapters.O, a)
	if outputs != nil {
		// Only the requested rows need the MLP and the output head.
		hidden = hidden.Rows(ctx, outputs)
		residual = residual.Rows(ctx, outputs)
		if p != nil {
			p = p.Select(ctx, outputs)
		}
	}
	hidden = hidden.Add(ctx, residual)
	residual = hidden
	x = l.MLPNorm.Forward(ctx, hidden, c.Eps)
	gate := project(l.MLP.Gate, adapters.Gate, x)
	up := project(l.MLP.Up, adapters.Up, x)
	hidden = project(l.MLP.Down, adapters.Down, gate.SILU(ctx, up))
	return hidden.Add(ctx, residual)
}

// Logits applies the output norm and head: [vocab, rows].
func (m *Model) Logits(ctx ml.Context, hidden ml.Tensor) ml.Tensor {
	return m.Output.Forward(ctx, m.OutputNorm.Forward(ctx, hidden, m.Params.Eps))
}

// AttentionScale is 1/sqrt(head_dim).
func (m *Model) AttentionScale() float64 { return 1 / math.Sqrt(float64(m.Params.HeadDim)) }
