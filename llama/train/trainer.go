package train

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/ggmlx"
	"github.com/sbora-serve/sbora-serve/llama"
)

// Config is a training run.
type Config struct {
	Variant     adapters.Variant
	Rank        int
	Alpha       float32
	Targets     []adapters.Module
	LR          float64
	Epochs      int // used when Steps is 0
	Steps       int
	Batch       int // sequences per micro-batch
	GradAccum   int
	SeqLen      int
	Warmup      int
	Schedule    string // constant | cosine
	MaxGradNorm float64
	WeightDecay float64
	Seed        uint64
	// EvalEvery steps (0 = only at the end).
	EvalEvery int
	// CheckpointEvery steps into CheckpointDir (0 = none).
	CheckpointEvery int
	CheckpointDir   string
	// Avoid: adapters whose indices the new one must not reuse.
	Avoid []*adapters.Adapter
	Name  string
	// Layerwise differentiates one layer at a time through F32 copies of
	// its weights (see layerwise.go): what runs on GPUs, which cannot
	// backpropagate through quantized weights. Models on a GPU always
	// train this way.
	Layerwise bool
}

func (c *Config) defaults() error {
	if c.Rank <= 0 {
		return errors.New("rank must be positive")
	}
	if c.Alpha == 0 {
		c.Alpha = float32(2 * c.Rank)
	}
	if len(c.Targets) == 0 {
		c.Targets = adapters.AllModules
	}
	if c.LR <= 0 {
		c.LR = 2e-4
	}
	if c.Batch <= 0 {
		c.Batch = 4
	}
	if c.GradAccum <= 0 {
		c.GradAccum = 1
	}
	if c.SeqLen <= 0 {
		c.SeqLen = 256
	}
	if c.Epochs <= 0 && c.Steps <= 0 {
		c.Epochs = 1
	}
	switch c.Schedule {
	case "":
		c.Schedule = "constant"
	case "constant", "cosine":
	default:
		return fmt.Errorf("unknown learning-rate schedule %q (want constant or cosine)", c.Schedule)
	}
	return nil
}

// Event reports progress.
type Event struct {
	Step, Steps int
	Loss        float64 // training loss of the step
	GradNorm    float64
	LR          float64
	TokensPerS  float64
	Elapsed     time.Duration
	EvalLoss    float64 // NaN when this event is not an evaluation
}

// Trainer trains one adapter on a model.
type Trainer struct {
	m      *llama.Model
	cfg    Config
	train  []*Example
	eval   []*Example
	params *Params
	opt    *AdamW
	step   int
	// ComputeBytes is the largest compute buffer a step needed so far.
	ComputeBytes int
	// OnEvent receives progress (may be nil).
	OnEvent func(Event)
}

// New prepares a run over train (and eval, possibly empty).
func New(m *llama.Model, cfg Config, trainSet, evalSet []*Example) (*Trainer, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	for _, l := range m.Layers {
		for _, w := range []ml.Tensor{l.Attention.Query.Weight, l.MLP.Down.Weight} {
			if ggmlx.TypeOf(w) == 1 && !cfg.Layerwise && m.Placement.GPU == nil { // F16
				return nil, errors.New("the base model has F16 weights, which ggml cannot backpropagate through on the CPU: train --layerwise, or use an F32, Q8_0 or Q4_0 copy (sbora-serve model quantize)")
			}
		}
	}
	if len(trainSet) == 0 {
		return nil, errors.New("no training examples")
	}
	p, err := NewParams(m, InitOptions{Variant: cfg.Variant, Rank: cfg.Rank, Alpha: cfg.Alpha, Targets: cfg.Targets, Seed: cfg.Seed, Avoid: cfg.Avoid})
	if err != nil {
		return nil, err
	}
	t := &Trainer{m: m, cfg: cfg, train: trainSet, eval: evalSet, params: p}
	_, vals := p.tensors()
	t.opt = newAdamW(vals, cfg.WeightDecay)
	return t, nil
}

// Params is the adapter being trained.
func (t *Trainer) Params() *Params { return t.params }

// Steps is the run's total number of optimizer steps.
func (t *Trainer) Steps() int {
	if t.cfg.Steps > 0 {
		return t.cfg.Steps
	}
	per := t.cfg.Batch * t.cfg.GradAccum
	return max(1, (t.cfg.Epochs*len(t.train)+per-1)/per)
}

// Step is the number of optimizer steps done.
func (t *Trainer) Step() int { return t.step }

// order returns the training example indices of epoch e (seeded shuffle).
func (t *Trainer) order(epoch int) []int {
	idx := make([]int, len(t.train))
	for i := range idx {
		idx[i] = i
	}
	rng := rand.New(rand.NewPCG(t.cfg.Seed, uint64(epoch)+1))
	rng.Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
	return idx
}

// examplesFor returns the micro-batches of optimizer step s: the data
// order depends only on the seed and s, so a resumed run sees the same.
func (t *Trainer) examplesFor(s int) [][]*Example {
	per := t.cfg.Batch * t.cfg.GradAccum
	first := s * per
	var out [][]*Example
	var cur []*Example
	orderEpoch, order := -1, []int(nil)
	for k := 0; k < per; k++ {
		i := first + k
		epoch, pos := i/len(t.train), i%len(t.train)
		if epoch != orderEpoch {
			orderEpoch, order = epoch, t.order(epoch)
		}
		cur = append(cur, t.train[order[pos]])
		if len(cur) == t.cfg.Batch {
			out = append(out, cur)
			cur = nil
		}
	}
	return out
}

func graphSize(m *llama.Model, p *Params) int {
	per := 80
	if p != nil {
		per += 12 * len(p.Targets())
	}
	return 256 + 4*m.Params.Layers*per
}

// Targets lists the module kinds trained.
func (p *Params) Targets() []adapters.Module {
	var out []adapters.Module
	for _, m := range p.Modules {
		if !slices.Contains(out, m.Module) {
			out = append(out, m.Module)
		}
	}
	return out
}

// Run trains until the last step (or ctx ends, returning ctx.Err()).
func (t *Trainer) Run(ctx context.Context) error {
	if err := t.params.upload(t.m.Backend()); err != nil {
		return err
	}
	ts, vals := t.params.tensors()
	grads := make([][]float64, len(vals))
	buf := make([][]float32, len(vals))
	for i, v := range vals {
		grads[i] = make([]float64, len(v))
		buf[i] = make([]float32, len(v))
	}
	total := t.Steps()
	start := time.Now()
	tokens := 0
	for t.step < total {
		if err := ctx.Err(); err != nil {
			return err
		}
		micro := t.examplesFor(t.step)
		targets := 0
		for _, mb := range micro {
			for _, ex := range mb {
				targets += ex.Targets()
			}
		}
		for i := range grads {
			clear(grads[i])
		}
		stepLoss := 0.0
		for _, mb := range micro {
			b := makeBatch(mb, maxLen(mb))
			if len(b.rows) == 0 {
				continue
			}
			// Weight each micro-batch's mean by its share of the step's
			// targets: the step optimizes the mean over all of them.
			w := float64(len(b.rows)) / float64(targets)
			loss, err := t.compute(b, w, ts, buf)
			if err != nil {
				return err
			}
			stepLoss += loss
			for i := range grads {
				for j, g := range buf[i] {
					grads[i][j] += float64(g)
				}
			}
			tokens += len(b.tokens)
		}
		norm := clipGrads(grads, t.cfg.MaxGradNorm)
		lr := learningRate(t.cfg.LR, t.step, t.cfg.Warmup, total, t.cfg.Schedule)
		t.opt.Update(vals, grads, lr)
		for i, tn := range ts {
			ggmlx.WriteFloats(tn, 0, vals[i])
		}
		t.step++
		ev := Event{Step: t.step, Steps: total, Loss: stepLoss, GradNorm: norm, LR: lr, Elapsed: time.Since(start),
			TokensPerS: float64(tokens) / time.Since(start).Seconds(), EvalLoss: math.NaN()}
		if len(t.eval) > 0 && ((t.cfg.EvalEvery > 0 && t.step%t.cfg.EvalEvery == 0) || t.step == total) {
			el, err := t.EvalLoss(t.eval)
			if err != nil {
				return err
			}
			ev.EvalLoss = el
		}
		if t.OnEvent != nil {
			t.OnEvent(ev)
		}
		if t.cfg.CheckpointDir != "" && t.cfg.CheckpointEvery > 0 && (t.step%t.cfg.CheckpointEvery == 0 || t.step == total) {
			if err := t.SaveCheckpoint(t.cfg.CheckpointDir); err != nil {
				return err
			}
		}
	}
	return nil
}

func maxLen(exs []*Example) int {
	n := 0
	for _, e := range exs {
		n = max(n, len(e.Tokens))
	}
	return n
}

// compute runs forward and backward for one micro-batch, leaving the
// gradients in buf; it returns the weighted loss.
func (t *Trainer) compute(b *batch, weight float64, ts []ml.Tensor, buf [][]float32) (float64, error) {
	if t.layerwise() {
		return t.computeLayerwise(b, weight, ts, buf)
	}
	size := graphSize(t.m, t.params)
	ggmlx.EnsureGraphNodes(t.m.Backend(), size)
	ctx := t.m.Backend().NewContextSize(size)
	defer ctx.Close()
	return t.backward(ctx, lossGraph(ctx, t.m, newProjector(t.params), b, weight), ts, size, buf)
}

// backward computes out (a scalar) and its gradients for params, copying
// the gradient of params[i] into grads[i] (nil: not wanted); it returns
// out's value and records the graph's compute memory.
func (t *Trainer) backward(ctx ml.Context, out ml.Tensor, params []ml.Tensor, size int, grads [][]float32) (float64, error) {
	g, err := ggmlx.NewGraph(ctx, out, params, size)
	if err != nil {
		return 0, err
	}
	defer g.Free()
	if err := g.Compute(); err != nil {
		return 0, err
	}
	t.ComputeBytes = max(t.ComputeBytes, g.ComputeBytes)
	for i, dst := range grads {
		if dst != nil {
			g.Grad(i, dst)
		}
	}
	return float64(g.Loss()), nil
}

// EvalLoss is the mean cross-entropy over every target token of exs with
// the current adapter (no gradients).
func (t *Trainer) EvalLoss(exs []*Example) (float64, error) {
	if err := t.params.upload(t.m.Backend()); err != nil {
		return 0, err
	}
	return EvalLoss(t.m, newProjector(t.params), exs, t.cfg.Batch)
}

// EvalLoss is the mean cross-entropy over every target of exs, computed by
// the training graph with proj (nil = the base model).
func EvalLoss(m *llama.Model, proj *projector, exs []*Example, batchSize int) (float64, error) {
	size := graphSize(m, nil)
	if proj != nil {
		size = graphSize(m, proj.p)
	}
	ggmlx.EnsureGraphNodes(m.Backend(), size)
	sum, n := 0.0, 0
	for i := 0; i < len(exs); i += batchSize {
		mb := exs[i:min(len(exs), i+batchSize)]
		b := makeBatch(mb, maxLen(mb))
		if len(b.rows) == 0 {
			continue
		}
		ctx := m.Backend().NewContextSize(size)
		loss := lossGraph(ctx, m, proj, b, 1)
		g, err := ggmlx.NewGraph(ctx, loss, nil, size)
		if err != nil {
			ctx.Close()
			return 0, err
		}
		err = g.Compute()
		l := g.Loss()
		g.Free()
		ctx.Close()
		if err != nil {
			return 0, err
		}
		sum += float64(l) * float64(len(b.rows))
		n += len(b.rows)
	}
	if n == 0 {
		return 0, errors.New("no evaluation targets")
	}
	return sum / float64(n), nil
}

// BaseEvalLoss is the base model's loss on exs (no adapter).
func BaseEvalLoss(m *llama.Model, exs []*Example, batchSize int) (float64, error) {
	return EvalLoss(m, nil, exs, batchSize)
}

// Split divides examples into train and eval sets deterministically.
func Split(exs []*Example, fraction float64, seed uint64) (trainSet, evalSet []*Example) {
	if fraction <= 0 {
		return exs, nil
	}
	idx := make([]int, len(exs))
	for i := range idx {
		idx[i] = i
	}
	rand.New(rand.NewPCG(seed, 0xe7a1)).Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
	nEval := max(1, int(math.Round(fraction*float64(len(exs)))))
	if nEval >= len(exs) {
		nEval = len(exs) - 1
	}
	for k, i := range idx {
		if k < len(exs)-nEval {
			trainSet = append(trainSet, exs[i])
		} else {
			evalSet = append(evalSet, exs[i])
		}
	}
	return trainSet, evalSet
}

// Progress renders events: a redrawn bar on a terminal, log lines
// otherwise.
func Progress(w io.Writer, tty bool) func(Event) {
	lastLine := time.Time{}
	return func(e Event) {
		eta := time.Duration(0)
		if e.Step > 0 {
			eta = time.Duration(float64(e.Elapsed) / float64(e.Step) * float64(e.Steps-e.Step))
		}
		evalStr := ""
		if !math.IsNaN(e.EvalLoss) {
			evalStr = fmt.Sprintf(" eval_loss %.4f", e.EvalLoss)
		}
		if tty {
			const width = 24
			done := width * e.Step / max(1, e.Steps)
			fmt.Fprintf(w, "\r[%s%s] step %d/%d loss %.4f %0.f tok/s ETA %s%s\033[K",
				strings.Repeat("#", done), strings.Repeat(".", width-done), e.Step, e.Steps, e.Loss, e.TokensPerS,
				eta.Round(time.Second), evalStr)
			if evalStr != "" || e.Step == e.Steps {
				fmt.Fprintln(w)
			}
			return
		}
		if evalStr != "" || e.Step == e.Steps || e.Step == 1 || time.Since(lastLine) > 5*time.Second {
			fmt.Fprintf(w, "step %d/%d loss %.4f grad_norm %.3g lr %.3g tok/s %.0f eta %s%s\n",
				e.Step, e.Steps, e.Loss, e.GradNorm, e.LR, e.TokensPerS, eta.Round(time.Second), evalStr)
			lastLine = time.Now()
		}
	}
}
