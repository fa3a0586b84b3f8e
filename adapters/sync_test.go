package adapters

import (
	"os"
	"path/filepath"
	"testing"
)

func writeRandom(t *testing.T, path string, v Variant, seed uint64) *Adapter {
	t.Helper()
	a, err := NewRandom(testBase(), RandomOptions{Name: "x", Variant: v, Rank: 4, Seed: seed, Std: 0.1})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Save(path, SaveOptions{F32: true}); err != nil {
		t.Fatal(err)
	}
	return a
}

// firstB reads the registered version's first module B matrix.
func firstB(t *testing.T, e *Entry) []byte {
	t.Helper()
	rd, err := e.OpenReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	m, err := rd.ReadMatrix(rd.Adapter.Modules[0], true, nil)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), m.Data...)
}

// TestSyncFollowsTheDirectory: new files register, replaced ones become a
// new generation while a holder of the old one still reads the old
// version, removed ones unregister, a broken file is reported once per
// version and registers once whole.
func TestSyncFollowsTheDirectory(t *testing.T) {
	dir := t.TempDir()
	r, err := NewRegistry(dir, testBase(), RegistryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "a.gguf")
	writeRandom(t, path, FA, 1)
	res := r.Sync()
	if len(res.Added) != 1 || res.Added[0].Name != "a" || len(res.Failed) != 0 {
		t.Fatalf("first sync %+v", res)
	}
	old := res.Added[0]
	before := firstB(t, old)
	if res := r.Sync(); res.Changed() {
		t.Fatalf("unchanged directory changed the registry: %+v", res)
	}
	if !old.Acquire() { // a request holds the old version
		t.Fatal("acquire")
	}
	tmp := filepath.Join(dir, ".a.tmp")
	writeRandom(t, tmp, FA, 2)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	res = r.Sync()
	if len(res.Replaced) != 1 || res.Replaced[0] != old || len(res.Added) != 1 || res.Added[0].Gen <= old.Gen {
		t.Fatalf("replacement sync %+v", res)
	}
	if got := firstB(t, old); string(got) != string(before) {
		t.Error("the held old generation reads the new file")
	}
	if string(firstB(t, res.Added[0])) == string(before) {
		t.Error("the new generation reads the old file")
	}
	old.Release()
	if old.Acquire() {
		t.Error("a released, replaced registration can still be acquired")
	}

	os.Remove(path)
	if res := r.Sync(); len(res.Removed) != 1 || r.Len() != 0 {
		t.Fatalf("removal sync %+v", res)
	}

	// Half a file: reported once, registered once complete.
	full := filepath.Join(t.TempDir(), "b.gguf")
	writeRandom(t, full, LoRA, 3)
	data, _ := os.ReadFile(full)
	bpath := filepath.Join(dir, "b.gguf")
	os.WriteFile(bpath, data[:len(data)/2], 0o644)
	if res := r.Sync(); len(res.Failed) != 1 || res.Changed() {
		t.Fatalf("half-written sync %+v", res)
	}
	if res := r.Sync(); len(res.Failed) != 0 {
		t.Fatalf("the same broken version is reported again: %+v", res)
	}
	os.WriteFile(bpath, data, 0o644)
	if res := r.Sync(); len(res.Added) != 1 {
		t.Fatalf("completed file sync %+v", res)
	}
}
