package adapters

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
)

// Base describes a base model as adapters see it: architecture, layer count,
// and the [in, out] shape of every 2-D weight.
type Base struct {
	Arch   string
	Layers int
	// Heads and KVHeads (query and key/value attention heads), needed to
	// map Hugging Face q/k rows to GGUF order on import; 0 when unknown.
	Heads, KVHeads int
	// Weights maps a tensor name to its ggml shape [ne0 (in), ne1 (out)].
	Weights map[string][2]int
	// Fingerprint is a hash of the architecture and all tensor shapes
	// (not types: an adapter trained on an F32 base serves on its Q4_0 copy).
	Fingerprint string
}

// TensorShape is a tensor's name and ggml shape.
type TensorShape struct {
	Name  string
	Shape []uint64
}

// NewBase builds a Base from a model's architecture and tensor list.
func NewBase(arch string, layers int, tensors []TensorShape) *Base {
	b := &Base{Arch: arch, Layers: layers, Weights: map[string][2]int{}}
	lines := make([]string, 0, len(tensors))
	for _, t := range tensors {
		dims := make([]string, len(t.Shape))
		for i, d := range t.Shape {
			dims[i] = fmt.Sprint(d)
		}
		lines = append(lines, t.Name+":"+strings.Join(dims, "x"))
		if len(t.Shape) == 2 {
			b.Weights[t.Name] = [2]int{int(t.Shape[0]), int(t.Shape[1])}
		}
	}
	sort.Strings(lines)
	h := sha256.New()
	fmt.Fprintf(h, "arch:%s\n", arch)
	for _, l := range lines {
		fmt.Fprintln(h, l)
	}
	b.Fingerprint = hex.EncodeToString(h.Sum(nil))
	return b
}

// Shape returns the [in, out] shape of target t on this base.
func (b *Base) Shape(t Target) (in, out int, ok bool) {
	s, ok := b.Weights[t.WeightName()]
	return s[0], s[1], ok
}
