package llama

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/ollama/ollama/ml"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
	"github.com/sbora-serve/sbora-serve/kernels"
)

// ModelInfo is what a GGUF's metadata says about a model's size, read
// without loading its weights.
type ModelInfo struct {
	Base *adapters.Base
	// Layers, Embedding, FeedForward, Heads, KVHeads, HeadDim,
	// ContextLength and VocabSize are filled.
	Config Config
	// WeightBytes is the memory the weights take once loaded (a tied output
	// head is a second copy of the token embedding in ggml's backend).
	WeightBytes int64
	// ChatTemplate is the GGUF's Jinja chat template ("" for none).
	ChatTemplate string
}

// ReadInfo reads a llama GGUF's metadata.
func ReadInfo(path string) (*ModelInfo, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	arch, _ := f.KV.String("general.architecture")
	if arch != "llama" {
		return nil, fmt.Errorf("%s: unsupported architecture %q: sbora-serve runs llama-architecture GGUFs", path, arch)
	}
	get := func(key string, def int64) int {
		if v, ok := f.KV.Int(arch + "." + key); ok {
			return int(v)
		}
		return int(def)
	}
	c := Config{Architecture: arch, Layers: get("block_count", 0), Embedding: get("embedding_length", 0),
		FeedForward: get("feed_forward_length", 0), Heads: get("attention.head_count", 0), ContextLength: get("context_length", 2048)}
	if c.Layers <= 0 || c.Embedding <= 0 || c.Heads <= 0 {
		return nil, fmt.Errorf("%s: GGUF has invalid shape: %d layers, %d embedding, %d heads", path, c.Layers, c.Embedding, c.Heads)
	}
	c.KVHeads = get("attention.head_count_kv", int64(c.Heads))
	c.HeadDim = get("attention.key_length", int64(c.Embedding/c.Heads))
	if toks, ok := f.KV.Value("tokenizer.ggml.tokens"); ok {
		if s, ok := toks.([]string); ok {
			c.VocabSize = len(s)
		}
	}
	info := &ModelInfo{Config: c}
	info.ChatTemplate, _ = f.KV.String("tokenizer.chat_template")
	shapes := make([]adapters.TensorShape, 0, len(f.Tensors))
	hasOutput := false
	var embd int64
	for _, t := range f.Tensors {
		shapes = append(shapes, adapters.TensorShape{Name: t.Name, Shape: t.Shape})
		info.WeightBytes += int64(t.Size())
		switch t.Name {
		case "output.weight":
			hasOutput = true
		case "token_embd.weight":
			embd = int64(t.Size())
		}
	}
	if !hasOutput {
		info.WeightBytes += embd
	}
	info.Base = adapters.NewBase(arch, c.Layers, shapes)
	info.Base.Heads, info.Base.KVHeads = c.Heads, c.KVHeads
	return info, nil
}

// PlanRequest asks for a memory plan. Zero fields are chosen by the plan;
// set ones are honoured or the plan fails naming them.
type PlanRequest struct {
	// Budget is the memory the server may use, and BudgetSource says where
	// it came from (for the printed plan and errors).
	Budget       int64
	BudgetSource string
	MaxSeqLen    int // --ctx
	Parallel     int // --parallel
	KVTokens     int // --kv-tokens
	MaxResident  int // --max-resident
	MaxRank      int // --max-rank
	// PrefillBudget is the prompt tokens per step (sizes the compute
	// buffer); BlockSize the KV block size.
	PrefillBudget int
	BlockSize     int
	CacheF32      bool
	BankType      ml.DType
}

// MemoryPlan is how a server divides its memory budget.
type MemoryPlan struct {
	Budget       int64
	BudgetSource string
	Weights      int64
	KV           int64
	Bank         int64
	Compute      int64
	// ComputeReserved is the compute buffer the engine actually reserved
	// for its largest step (0 until the server has reserved it).
	ComputeReserved int64
	Runtime         int64
	KVTokens        int
	BlockSize       int
	MaxSeqLen       int
	Parallel        int
	MaxResident     int
	MaxRank         int
	CacheType       ml.DType
	BankType        ml.DType
}

// Total is the memory the plan uses.
func (p *MemoryPlan) Total() int64 { return p.Weights + p.KV + p.Bank + p.Compute + p.Runtime }

// Defaults the plan starts from when the flags are not given.
const (
	DefaultParallel    = 16
	DefaultMaxRank     = 64
	DefaultMaxResident = 16
	// bankShare is the most of the memory left after weights and compute
	// that the default adapter bank takes; the KV pool gets the rest.
	bankShare = 0.2
)

// Plan divides req.Budget between the weights, the KV pool, the adapter
// bank and the compute buffers.
func Plan(info *ModelInfo, req PlanRequest) (*MemoryPlan, error) {
	c := info.Config
	p := &MemoryPlan{Budget: req.Budget, BudgetSource: req.BudgetSource, Weights: info.WeightBytes,
		BlockSize: req.BlockSize, MaxSeqLen: req.MaxSeqLen, Parallel: req.Parallel, MaxRank: req.MaxRank,
		CacheType: ml.DTypeF16, BankType: req.BankType}
	if p.BlockSize <= 0 {
		p.BlockSize = DefaultBlockSize
	}
	if req.CacheF32 {
		p.CacheType = ml.DTypeF32
	}
	if p.BankType == ml.DTypeOther {
		p.BankType = ml.DTypeF16
	}
	if p.MaxSeqLen <= 0 {
		p.MaxSeqLen = min(c.ContextLength, 4096)
	}
	if p.Parallel <= 0 {
		p.Parallel = DefaultParallel
	}
	if p.MaxRank <= 0 {
		p.MaxRank = DefaultMaxRank
	}
	prefill := max(req.PrefillBudget, 1)
	p.Compute = computeBytes(c, p, prefill)
	p.Runtime = 256<<20 + int64(c.VocabSize)*64
	perToken := int64(BytesPerToken(c, p.CacheType))
	blockBytes := perToken * int64(p.BlockSize)
	bankCfg := func(slots int) kernels.Config {
		return kernels.Config{Slots: slots, MaxRank: p.MaxRank, DType: p.BankType}
	}
	slotBytes := kernels.SlotBytes(info.Base, bankCfg(1))
	left := req.Budget - p.Weights - p.Compute - p.Runtime
	fixed := fmt.Sprintf("weights %s + compute %s + runtime %s", gib(p.Weights), gib(p.Compute), gib(p.Runtime))
	if left <= 0 {
		return nil, fmt.Errorf("the model does not fit the memory budget: %s = %s, budget %s (%s); raise --memory-fraction or use a smaller quantization",
			fixed, gib(p.Weights+p.Compute+p.Runtime), gib(req.Budget), req.BudgetSource)
	}
	// The bank: as asked, or up to DefaultMaxResident slots within its share.
	p.MaxResident = req.MaxResident
	if p.MaxResident <= 0 {
		// Bytes(n) is n+1 slots (slot 0 stays zero).
		p.MaxResident = int(min(int64(DefaultMaxResident), int64(bankShare*float64(left))/max(slotBytes, 1)-1))
		if p.MaxResident < 1 {
			p.MaxResident = 1
		}
	}
	p.Bank = kernels.Bytes(info.Base, bankCfg(p.MaxResident))
	left -= p.Bank
	// The KV pool: as asked, or what is left, up to every sequence at full
	// length.
	if req.KVTokens > 0 {
		p.KVTokens = (req.KVTokens + p.BlockSize - 1) / p.BlockSize * p.BlockSize
	} else if left > 0 {
		want := int64(p.Parallel) * int64(p.MaxSeqLen)
		p.KVTokens = int(min(want, left/blockBytes*int64(p.BlockSize)))
	}
	p.KV = int64(p.KVTokens) * perToken
	if req.KVTokens <= 0 && req.MaxSeqLen <= 0 && p.KVTokens < p.MaxSeqLen && p.KVTokens >= p.BlockSize {
		p.MaxSeqLen = p.KVTokens // the default context shrinks to what fits
	}
	flags := func() string {
		var f []string
		if req.KVTokens > 0 {
			f = append(f, "--kv-tokens")
		}
		if req.MaxSeqLen > 0 {
			f = append(f, "--ctx")
		}
		if req.MaxResident > 0 {
			f = append(f, "--max-resident")
		}
		if req.MaxRank > 0 {
			f = append(f, "--max-rank")
		}
		if req.Parallel > 0 {
			f = append(f, "--parallel")
		}
		if len(f) == 0 {
			return "--memory-fraction"
		}
		return strings.Join(f, ", ") + " or --memory-fraction"
	}
	switch {
	case p.KVTokens < p.BlockSize || p.KV+p.Bank > req.Budget-p.Weights-p.Compute-p.Runtime:
		return nil, fmt.Errorf("the memory plan does not fit: %s + KV pool %d tokens (%s) + adapter bank %d slots × rank %d (%s) = %s, budget %s (%s); lower %s",
			fixed, p.KVTokens, gib(p.KV), p.MaxResident, p.MaxRank, gib(p.Bank), gib(p.Total()), gib(req.Budget), req.BudgetSource, flags())
	case p.KVTokens < p.MaxSeqLen:
		return nil, fmt.Errorf("a KV pool of %d tokens cannot hold one sequence of the %d-token context; lower --ctx or raise --kv-tokens (%s)",
			p.KVTokens, p.MaxSeqLen, flags())
	}
	return p, nil
}

// computeBytes estimates the largest step's compute buffer: activations of
// a full step's tokens, one layer's gathered keys and values for every
// sequence at full length, the attention masks and the logits.
func computeBytes(c Config, p *MemoryPlan, prefill int) int64 {
	tokens := int64(prefill + p.Parallel)
	act := tokens * int64(4*c.Embedding+2*c.QDim()+2*c.KVDim()+3*c.FeedForward) * 4
	es := int64(2)
	if p.CacheType == ml.DTypeF32 {
		es = 4
	}
	seqTokens := int64(p.Parallel+1) * int64(p.MaxSeqLen)
	gather := seqTokens * int64(c.KVDim()) * 2 * es
	masks := (int64(prefill) + int64(p.Parallel)) * int64(p.MaxSeqLen) * 2
	logits := tokens * int64(c.VocabSize) * 4
	return (act+gather+masks+logits)*5/4 + 64<<20
}

// EngineOptions returns the engine configuration of the plan.
func (p *MemoryPlan) EngineOptions() EngineOptions {
	return EngineOptions{KVTokens: p.KVTokens, BlockSize: p.BlockSize, MaxSeqLen: p.MaxSeqLen, CacheF32: p.CacheType == ml.DTypeF32,
		Bank: kernels.Config{Slots: p.MaxResident, MaxRank: p.MaxRank, DType: p.BankType}}
}

// String is the plan as printed at start-up.
func (p *MemoryPlan) String() string {
	compute := gib(p.Compute)
	if p.ComputeReserved > 0 {
		compute = fmt.Sprintf("%s (%s reserved)", compute, gib(p.ComputeReserved))
	}
	return fmt.Sprintf("memory plan: %s of %s budget (%s): weights %s, KV pool %d tokens (%s, %s, %d blocks of %d), "+
		"adapter bank %d slots × rank %d (%s, %s), compute %s, runtime %s; up to %d sequences of %d tokens",
		gib(p.Total()), gib(p.Budget), p.BudgetSource, gib(p.Weights), p.KVTokens, gib(p.KV), dtypeName(p.CacheType),
		p.KVTokens/p.BlockSize, p.BlockSize, p.MaxResident, p.MaxRank, gib(p.Bank), dtypeName(p.BankType), compute,
		gib(p.Runtime), p.Parallel, p.MaxSeqLen)
}

func dtypeName(d ml.DType) string {
	switch d {
	case ml.DTypeF32:
		return "F32"
	case ml.DTypeQ80:
		return "Q8_0"
	}
	return "F16"
}

func gib(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	default:
		return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
	}
}

// AvailableMemory returns the memory this process may use: the smaller of
// the system's available memory (MemAvailable) and what its cgroup still
// allows (containers), with a description of where it came from.
func AvailableMemory() (int64, string, error) {
	avail, err := memInfo("MemAvailable")
	if err != nil {
		return 0, "", err
	}
	source := fmt.Sprintf("%s available RAM", gib(avail))
	if limit, usage, ok := cgroupLimit(); ok && limit-usage < avail {
		avail = limit - usage
		source = fmt.Sprintf("%s left of the container's %s limit", gib(avail), gib(limit))
	}
	return avail, source, nil
}

func memInfo(key string) (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("reading available memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && strings.TrimSuffix(fields[0], ":") == key {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return 0, err
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("/proc/meminfo has no %s", key)
}

// cgroupLimit reads a cgroup v2 memory limit and usage.
func cgroupLimit() (limit, usage int64, ok bool) {
	read := func(name string) (int64, bool) {
		b, err := os.ReadFile("/sys/fs/cgroup/" + name)
		if err != nil {
			return 0, false
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0, false
		}
		v, err := strconv.ParseInt(s, 10, 64)
		return v, err == nil
	}
	if limit, ok = read("memory.max"); !ok {
		return 0, 0, false
	}
	usage, _ = read("memory.current")
	return limit, usage, true
}
