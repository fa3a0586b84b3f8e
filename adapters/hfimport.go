package adapters

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// peftConfig is the part of adapter_config.json the importer reads.
type peftConfig struct {
	PeftType      string          `json:"peft_type"`
	AdapterName   string          `json:"adapter_name"`
	R             int             `json:"r"`
	LoraAlpha     float64         `json:"lora_alpha"`
	TargetModules json.RawMessage `json:"target_modules"`
	UseRSLoRA     bool            `json:"use_rslora"`
	FanInFanOut   bool            `json:"fan_in_fan_out"`
	UseDoRA       bool            `json:"use_dora"`
}

// findCheckpoint locates adapter_config.json and the weights file under
// from: a file, a directory, or (QSBoRA) one adapter-name subfolder below.
func findCheckpoint(from string) (configPath, weightsPath string, err error) {
	st, err := os.Stat(from)
	if err != nil {
		return "", "", err
	}
	if !st.IsDir() {
		cfg := filepath.Join(filepath.Dir(from), "adapter_config.json")
		if _, err := os.Stat(cfg); err != nil {
			cfg = ""
		}
		return cfg, from, nil
	}
	var dirs []string
	filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if rel, _ := filepath.Rel(from, p); d.IsDir() && strings.Count(rel, string(filepath.Separator)) >= 2 {
			return filepath.SkipDir
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for _, dir := range dirs {
		for _, name := range []string{"adapter_model.safetensors", "adapter_model.bin"} {
			w := filepath.Join(dir, name)
			if _, err := os.Stat(w); err == nil {
				cfg := filepath.Join(dir, "adapter_config.json")
				if _, err := os.Stat(cfg); err != nil {
					cfg = filepath.Join(from, "adapter_config.json")
					if _, err := os.Stat(cfg); err != nil {
						cfg = ""
					}
				}
				return cfg, w, nil
			}
		}
	}
	return "", "", fmt.Errorf("%s holds no adapter_model.safetensors or adapter_model.bin (looked two levels deep)", from)
}

// hfKey matches PEFT/SBoRA state-dict keys of LLaMA projections, with an
// optional adapter-name segment (PEFT saves "lora_A.<name>.weight" for
// non-default adapters).
var hfKey = regexp.MustCompile(`^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(lora_A|lora_B)(?:\.([A-Za-z0-9_\-]+?))?(\.weight)?$`)

// ImportOptions adjust Import.
type ImportOptions struct {
	Name string
	// Alpha overrides lora_alpha (needed when there is no config file).
	Alpha float64
}

// Import reads a reference SBoRA checkpoint (peft_type SBORA, or QSBoRA's
// LORA-typed nested layout) or a PEFT LoRA checkpoint and maps it onto
// base: Hugging Face module names to GGUF tensors, and the rows of q_proj
// and k_proj through llama.cpp's rotary permutation (FA's and LoRA's B
// rows, FB's output indices). The result is validated against base.
func Import(from string, base *Base, o ImportOptions) (*Adapter, error) {
	cfgPath, weightsPath, err := findCheckpoint(from)
	if err != nil {
		return nil, err
	}
	var cfg peftConfig
	if cfgPath != "" {
		raw, err := os.ReadFile(cfgPath)
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(raw, &cfg); err != nil {
			return nil, fmt.Errorf("%s: %v", cfgPath, err)
		}
	}
	if cfg.UseRSLoRA || cfg.FanInFanOut || cfg.UseDoRA {
		return nil, fmt.Errorf("%s: use_rslora, fan_in_fan_out and use_dora adapters are not supported", cfgPath)
	}
	data, err := os.ReadFile(weightsPath)
	if err != nil {
		return nil, err
	}
	tensors, err := readCheckpoint(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", weightsPath, err)
	}
	a, err := fromHF(tensors, cfg, base, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", weightsPath, err)
	}
	return a, nil
}

// ImportBytes is Import for a weights file's bytes and a config (for tests
// and fuzzing).
func ImportBytes(weights, config []byte, base *Base, o ImportOptions) (*Adapter, error) {
	var cfg peftConfig
	if config != nil {
		if err := json.Unmarshal(config, &cfg); err != nil {
			return nil, fmt.Errorf("adapter_config.json: %v", err)
		}
	}
	tensors, err := readCheckpoint(weights)
	if err != nil {
		return nil, err
	}
	return fromHF(tensors, cfg, base, o)
}

func fromHF(tensors map[string]*hfTensor, cfg peftConfig, base *Base, o ImportOptions) (*Adapter, error) {
	type pair struct{ a, b *hfTensor }
	pairs := map[Target]*pair{}
	var unknown []string
	for _, name := range sortedKeys(tensors) {
		m := hfKey.FindStringSubmatch(name)
		if m == nil {
			unknown = append(unknown, name)
			continue
		}
		layer, err := strconv.Atoi(m[1])
		if err != nil || layer >= maxAdapterLayer {
			unknown = append(unknown, name)
			continue
		}
		mod, _ := ParseModule(m[3])
		t := Target{Layer: layer, Module: mod}
		p := pairs[t]
		if p == nil {
			p = &pair{}
			pairs[t] = p
		}
		if m[4] == "lora_A" {
			p.a = tensors[name]
		} else {
			p.b = tensors[name]
		}
	}
	if len(unknown) > 0 {
		return nil, invalid("keys that are not LLaMA projection adapters: %s", quoteList(unknown, 5))
	}
	if len(pairs) == 0 {
		return nil, invalid("no adapter tensors in the checkpoint")
	}
	a := &Adapter{Name: o.Name, BaseArch: base.Arch, BaseFingerprint: base.Fingerprint}
	for t, p := range pairs {
		if p.a == nil || p.b == nil {
			return nil, invalid("%s (%s) has only one of lora_A and lora_B", t, t.Module.HFName())
		}
		var v Variant
		switch {
		case p.a.isInt() && !p.b.isInt():
			v = FA
		case !p.a.isInt() && p.b.isInt():
			v = FB
		case !p.a.isInt() && !p.b.isInt():
			v = LoRA
		default:
			return nil, invalid("%s: both lora_A and lora_B are integer tensors", t)
		}
		if a.Variant != "" && a.Variant != v {
			return nil, invalid("%s is %s but other modules are %s", t, v, a.Variant)
		}
		a.Variant = v
		in, out, ok := base.Shape(t)
		if !ok {
			return nil, invalid("%s: the base model has no weight %s", t, t.WeightName())
		}
		mw := &ModuleWeights{Target: t, In: in, Out: out}
		var r int
		var err error
		switch v {
		case FA:
			if len(p.a.shape) != 1 || len(p.b.shape) != 2 {
				return nil, invalid("%s: FA wants a 1-D index lora_A and a 2-D lora_B.weight, got %v and %v", t, p.a.shape, p.b.shape)
			}
			r = p.a.shape[0]
			if p.b.shape[0] != out || p.b.shape[1] != r {
				return nil, invalid("%s: lora_B.weight is %v, want [%d, %d]", t, p.b.shape, out, r)
			}
			if mw.Index, err = toIndex(p.a.ints, in, t); err != nil {
				return nil, err
			}
			mw.B = p.b.floats
		case FB:
			if len(p.a.shape) != 2 || len(p.b.shape) != 1 {
				return nil, invalid("%s: FB wants a 2-D lora_A.weight and a 1-D index lora_B, got %v and %v", t, p.a.shape, p.b.shape)
			}
			r = p.b.shape[0]
			if p.a.shape[0] != r || p.a.shape[1] != in {
				return nil, invalid("%s: lora_A.weight is %v, want [%d, %d]", t, p.a.shape, r, in)
			}
			if mw.Index, err = toIndex(p.b.ints, out, t); err != nil {
				return nil, err
			}
			mw.A = p.a.floats
		case LoRA:
			if len(p.a.shape) != 2 || len(p.b.shape) != 2 {
				return nil, invalid("%s: LoRA wants 2-D lora_A.weight and lora_B.weight, got %v and %v", t, p.a.shape, p.b.shape)
			}
			r = p.a.shape[0]
			if p.a.shape[1] != in || p.b.shape[0] != out || p.b.shape[1] != r {
				return nil, invalid("%s: lora_A %v and lora_B %v do not fit a %d→%d weight", t, p.a.shape, p.b.shape, in, out)
			}
			mw.A, mw.B = p.a.floats, p.b.floats
		}
		if a.Rank != 0 && a.Rank != r {
			return nil, invalid("%s has rank %d, other modules %d", t, r, a.Rank)
		}
		a.Rank = r
		if t.Module == Q || t.Module == K {
			heads := base.Heads
			if t.Module == K {
				heads = base.KVHeads
			}
			if err := permuteRotaryRows(mw, v, r, heads); err != nil {
				return nil, err
			}
		}
		a.Modules = append(a.Modules, mw)
	}
	if cfg.R != 0 && cfg.R != a.Rank {
		return nil, invalid("adapter_config.json says r = %d but the tensors have rank %d", cfg.R, a.Rank)
	}
	switch strings.ToUpper(cfg.PeftType) {
	case "", "LORA":
	case "SBORA":
		if a.Variant == LoRA {
			return nil, invalid("peft_type SBORA but the tensors are a dense LoRA")
		}
	default:
		return nil, invalid("unsupported peft_type %q", cfg.PeftType)
	}
	if n := strings.ToLower(cfg.AdapterName); (n == "sbora_fa" && a.Variant != FA) || (n == "sbora_fb" && a.Variant != FB) {
		return nil, invalid("adapter_name %q but the tensors are %s", cfg.AdapterName, a.Variant)
	}
	switch {
	case o.Alpha != 0:
		a.Alpha = float32(o.Alpha)
	case cfg.LoraAlpha != 0:
		a.Alpha = float32(cfg.LoraAlpha)
	default:
		return nil, errors.New("no lora_alpha: the checkpoint has no adapter_config.json; pass the alpha it was trained with")
	}
	a.sortModules()
	if err := a.ValidateFor(base); err != nil {
		return nil, err
	}
	return a, nil
}

func toIndex(v []int64, limit int, t Target) ([]int32, error) {
	out := make([]int32, len(v))
	for i, x := range v {
		if x < 0 || x >= int64(limit) {
			return nil, invalid("%s: index %d out of range [0, %d)", t, x, limit)
		}
		out[i] = int32(x)
	}
	return out, nil
}

// RotaryRow maps a Hugging Face q_proj/k_proj output row to the row it
// becomes in a GGUF made by llama.cpp's converter, which reorders each
// head's rows from [first halves; second halves] to interleaved pairs:
// HF row i·hd + c·hd/2 + j becomes GGUF row i·hd + 2j + c.
func RotaryRow(h, rows, heads int) int {
	hd := rows / heads
	i, rem := h/hd, h%hd
	c, j := rem/(hd/2), rem%(hd/2)
	return i*hd + 2*j + c
}

// permuteRotaryRows moves an adapter's output rows to GGUF order.
func permuteRotaryRows(m *ModuleWeights, v Variant, r, heads int) error {
	if heads <= 0 || m.Out%heads != 0 || (m.Out/heads)%2 != 0 {
		return invalid("%s: cannot apply the rotary permutation with %d heads to %d rows", m.Target, heads, m.Out)
	}
	switch v {
	case FA, LoRA:
		b := make([]float32, len(m.B))
		for h := 0; h < m.Out; h++ {
			g := RotaryRow(h, m.Out, heads)
			copy(b[g*r:(g+1)*r], m.B[h*r:(h+1)*r])
		}
		m.B = b
	case FB:
		for k, h := range m.Index {
			m.Index[k] = int32(RotaryRow(int(h), m.Out, heads))
		}
	}
	return nil
}
