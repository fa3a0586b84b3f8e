package train

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"

	"github.com/sbora-serve/sbora-serve/adapters"
	"github.com/sbora-serve/sbora-serve/internal/gguf"
)

// checkpoint state besides the adapter and the optimizer moments.
type state struct {
	Step     int     `json:"step"`
	OptStep  int     `json:"opt_step"`
	Variant  string  `json:"variant"`
	Rank     int     `json:"rank"`
	Alpha    float32 `json:"alpha"`
	Seed     uint64  `json:"seed"`
	Batch    int     `json:"batch"`
	Accum    int     `json:"grad_accum"`
	Examples int     `json:"train_examples"`
	Steps    int     `json:"steps"`
}

// SaveCheckpoint writes step-N/ (adapter.gguf, optimizer.bin, state.json)
// into dir and points dir/latest at it; each file is written atomically
// and "latest" moves only after the whole checkpoint is on disk.
func (t *Trainer) SaveCheckpoint(dir string) error {
	sub := filepath.Join(dir, fmt.Sprintf("step-%06d", t.step))
	if err := os.MkdirAll(sub, 0o755); err != nil {
		return err
	}
	a := t.params.Adapter(t.cfg.Name, t.m.AdapterBase)
	// F32: a resumed run must continue from exactly these values.
	if err := a.Save(filepath.Join(sub, "adapter.gguf"), adapters.SaveOptions{F32: true}); err != nil {
		return err
	}
	if err := gguf.WriteFileAtomic(filepath.Join(sub, "optimizer.bin"), func(w io.Writer) error {
		for _, vs := range [][][]float32{t.opt.M, t.opt.V} {
			for _, v := range vs {
				if err := binary.Write(w, binary.LittleEndian, v); err != nil {
					return err
				}
			}
		}
		return nil
	}); err != nil {
		return err
	}
	st := state{Step: t.step, OptStep: t.opt.Step, Variant: string(t.cfg.Variant), Rank: t.cfg.Rank, Alpha: t.cfg.Alpha,
		Seed: t.cfg.Seed, Batch: t.cfg.Batch, Accum: t.cfg.GradAccum, Examples: len(t.train), Steps: t.Steps()}
	js, _ := json.MarshalIndent(st, "", "  ")
	if err := gguf.WriteFileAtomic(filepath.Join(sub, "state.json"), func(w io.Writer) error {
		_, err := w.Write(js)
		return err
	}); err != nil {
		return err
	}
	return gguf.WriteFileAtomic(filepath.Join(dir, "latest"), func(w io.Writer) error {
		_, err := io.WriteString(w, filepath.Base(sub)+"\n")
		return err
	})
}

// Resume loads the latest checkpoint in dir; the run must have the same
// adapter shape, seed, batching and data as the one that wrote it.
func (t *Trainer) Resume(dir string) error {
	latest, err := os.ReadFile(filepath.Join(dir, "latest"))
	if err != nil {
		return fmt.Errorf("no checkpoint in %s: %w", dir, err)
	}
	sub := filepath.Join(dir, string(trimNewline(latest)))
	js, err := os.ReadFile(filepath.Join(sub, "state.json"))
	if err != nil {
		return err
	}
	var st state
	if err := json.Unmarshal(js, &st); err != nil {
		return fmt.Errorf("%s: %w", sub, err)
	}
	want := state{Variant: string(t.cfg.Variant), Rank: t.cfg.Rank, Alpha: t.cfg.Alpha, Seed: t.cfg.Seed, Batch: t.cfg.Batch,
		Accum: t.cfg.GradAccum, Examples: len(t.train), Steps: t.Steps()}
	got := st
	got.Step, got.OptStep = 0, 0
	if got != want {
		return fmt.Errorf("checkpoint %s was made by a different run (%+v, this run %+v)", sub, got, want)
	}
	a, err := adapters.Load(filepath.Join(sub, "adapter.gguf"))
	if err != nil {
		return err
	}
	if err := a.Resolve(t.m.AdapterBase); err != nil {
		return err
	}
	p := FromAdapter(a)
	if len(p.Modules) != len(t.params.Modules) {
		return fmt.Errorf("checkpoint adapter has %d modules, this run %d", len(p.Modules), len(t.params.Modules))
	}
	t.params.Close()
	t.params = p
	_, vals := p.tensors()
	opt := newAdamW(vals, t.cfg.WeightDecay)
	f, err := os.Open(filepath.Join(sub, "optimizer.bin"))
	if err != nil {
		return err
	}
	defer f.Close()
	for _, vs := range [][][]float32{opt.M, opt.V} {
		for _, v := range vs {
			if err := binary.Read(f, binary.LittleEndian, v); err != nil {
				return fmt.Errorf("%s/optimizer.bin: %w", sub, err)
			}
		}
	}
	for _, vs := range [][][]float32{opt.M, opt.V} {
		for _, v := range vs {
			for _, x := range v {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					return fmt.Errorf("%s/optimizer.bin holds non-finite moments", sub)
				}
			}
		}
	}
	opt.Step = st.OptStep
	t.opt = opt
	t.step = st.Step
	return nil
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
