package adapters

import (
	"fmt"
	"strings"
)

// Module is one of the seven projections of a LLaMA layer.
type Module int

const (
	Q Module = iota
	K
	V
	O
	Gate
	Up
	Down
	NumModules
)

// AllModules lists every module in canonical order.
var AllModules = []Module{Q, K, V, O, Gate, Up, Down}

var moduleNames = [NumModules]struct{ short, gguf, hf string }{
	Q:    {"q", "attn_q", "self_attn.q_proj"},
	K:    {"k", "attn_k", "self_attn.k_proj"},
	V:    {"v", "attn_v", "self_attn.v_proj"},
	O:    {"o", "attn_output", "self_attn.o_proj"},
	Gate: {"gate", "ffn_gate", "mlp.gate_proj"},
	Up:   {"up", "ffn_up", "mlp.up_proj"},
	Down: {"down", "ffn_down", "mlp.down_proj"},
}

// String is the short name: q, k, v, o, gate, up, down.
func (m Module) String() string {
	if m < 0 || m >= NumModules {
		return fmt.Sprintf("module(%d)", int(m))
	}
	return moduleNames[m].short
}

// GGUFName is the tensor-name stem in a GGUF, e.g. "attn_q".
func (m Module) GGUFName() string { return moduleNames[m].gguf }

// HFName is the Hugging Face module path inside a layer, e.g. "self_attn.q_proj".
func (m Module) HFName() string { return moduleNames[m].hf }

// ParseModule accepts a short name (q), a GGUF stem (attn_q) or a Hugging
// Face name (q_proj, self_attn.q_proj).
func ParseModule(s string) (Module, error) {
	s = strings.TrimSpace(s)
	for m, n := range moduleNames {
		hfLeaf := n.hf[strings.LastIndexByte(n.hf, '.')+1:]
		if s == n.short || s == n.gguf || s == n.hf || s == hfLeaf {
			return Module(m), nil
		}
	}
	return 0, fmt.Errorf("unknown module %q (want one of q, k, v, o, gate, up, down)", s)
}

// ParseModules parses a comma-separated module list; "all" means every module.
func ParseModules(s string) ([]Module, error) {
	if strings.TrimSpace(s) == "all" {
		return append([]Module(nil), AllModules...), nil
	}
	var out []Module
	seen := map[Module]bool{}
	for _, part := range strings.Split(s, ",") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		m, err := ParseModule(part)
		if err != nil {
			return nil, err
		}
		if !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no modules in %q", s)
	}
	return out, nil
}

// Target is one module of one layer.
type Target struct {
	Layer  int
	Module Module
}

// WeightName is the base tensor the target adapts, e.g. "blk.3.attn_q.weight".
func (t Target) WeightName() string {
	return fmt.Sprintf("blk.%d.%s.weight", t.Layer, t.Module.GGUFName())
}

func (t Target) String() string { return fmt.Sprintf("layer %d %s", t.Layer, t.Module) }

// parseWeightName inverts WeightName.
func parseWeightName(name string) (Target, bool) {
	var layer int
	var rest string
	if !strings.HasPrefix(name, "blk.") {
		return Target{}, false
	}
	dot := strings.IndexByte(name[4:], '.')
	if dot < 0 {
		return Target{}, false
	}
	if _, err := fmt.Sscanf(name[4:4+dot], "%d", &layer); err != nil || fmt.Sprint(layer) != name[4:4+dot] {
		return Target{}, false
	}
	rest = name[4+dot+1:]
	stem, ok := strings.CutSuffix(rest, ".weight")
	if !ok {
		return Target{}, false
	}
	for m, n := range moduleNames {
		if n.gguf == stem {
			return Target{Layer: layer, Module: Module(m)}, true
		}
	}
	return Target{}, false
}
