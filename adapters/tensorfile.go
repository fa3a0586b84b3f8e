package adapters

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"path"
	"sort"
	"strings"

	"github.com/nlpodyssey/gopickle/pickle"
	"github.com/nlpodyssey/gopickle/types"
	"github.com/x448/float16"
)

// hfTensor is a tensor read from a PyTorch or safetensors checkpoint:
// floats for floating-point dtypes, ints for integer dtypes.
type hfTensor struct {
	shape  []int
	floats []float32
	ints   []int64
	dtype  string
}

func (t *hfTensor) isInt() bool { return t.ints != nil }

func numel(shape []int) (int, error) {
	n := 1
	for _, d := range shape {
		if d < 0 || (d > 0 && n > math.MaxInt32/d) {
			return 0, fmt.Errorf("tensor shape %v is too large", shape)
		}
		n *= d
	}
	return n, nil
}

// decodeElems turns raw little-endian bytes of dtype into a tensor.
func decodeElems(dtype string, raw []byte, shape []int) (*hfTensor, error) {
	n, err := numel(shape)
	if err != nil {
		return nil, err
	}
	t := &hfTensor{shape: shape, dtype: dtype}
	size := map[string]int{"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}[dtype]
	if size == 0 {
		return nil, fmt.Errorf("unsupported tensor dtype %s", dtype)
	}
	if len(raw) != n*size {
		return nil, fmt.Errorf("%s tensor %v needs %d bytes, has %d", dtype, shape, n*size, len(raw))
	}
	switch dtype {
	case "F32", "F16", "BF16", "F64":
		t.floats = make([]float32, n)
		for i := range t.floats {
			switch dtype {
			case "F32":
				t.floats[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
			case "F16":
				t.floats[i] = float16.Frombits(binary.LittleEndian.Uint16(raw[2*i:])).Float32()
			case "BF16":
				t.floats[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(raw[2*i:])) << 16)
			case "F64":
				t.floats[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])))
			}
		}
	default:
		t.ints = make([]int64, n)
		for i := range t.ints {
			switch dtype {
			case "I64":
				t.ints[i] = int64(binary.LittleEndian.Uint64(raw[8*i:]))
			case "I32":
				t.ints[i] = int64(int32(binary.LittleEndian.Uint32(raw[4*i:])))
			case "I16":
				t.ints[i] = int64(int16(binary.LittleEndian.Uint16(raw[2*i:])))
			case "I8":
				t.ints[i] = int64(int8(raw[i]))
			case "U8":
				t.ints[i] = int64(raw[i])
			}
		}
	}
	return t, nil
}

// readSafetensors parses a safetensors file: an 8-byte header length, a
// JSON header, then the data.
func readSafetensors(data []byte) (map[string]*hfTensor, error) {
	if len(data) < 8 {
		return nil, fmt.Errorf("safetensors: file of %d bytes is too short", len(data))
	}
	n := binary.LittleEndian.Uint64(data)
	if n > uint64(len(data)-8) || n > 100<<20 {
		return nil, fmt.Errorf("safetensors: header length %d exceeds the file", n)
	}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(data[8:8+n], &header); err != nil {
		return nil, fmt.Errorf("safetensors: header: %v", err)
	}
	body := data[8+n:]
	out := map[string]*hfTensor{}
	for name, raw := range header {
		if name == "__metadata__" {
			continue
		}
		var info struct {
			DType   string    `json:"dtype"`
			Shape   []int     `json:"shape"`
			Offsets [2]uint64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &info); err != nil {
			return nil, fmt.Errorf("safetensors: tensor %q: %v", name, err)
		}
		if info.Offsets[0] > info.Offsets[1] || info.Offsets[1] > uint64(len(body)) {
			return nil, fmt.Errorf("safetensors: tensor %q data %v lies outside the file", name, info.Offsets)
		}
		t, err := decodeElems(info.DType, body[info.Offsets[0]:info.Offsets[1]], info.Shape)
		if err != nil {
			return nil, fmt.Errorf("safetensors: tensor %q: %v", name, err)
		}
		out[name] = t
	}
	return out, nil
}

// torchStorage is a storage class found in a PyTorch pickle.
type torchStorage struct{ dtype string }

func (s *torchStorage) Call(args ...interface{}) (interface{}, error) { return s, nil }

// loadedStorage is a storage's decoded bytes.
type loadedStorage struct {
	dtype string
	raw   []byte
	elem  int
}

// torchTensor is what torch._utils._rebuild_tensor_v2 returns.
type torchTensor struct {
	storage *loadedStorage
	offset  int
	size    []int
	stride  []int
}

type rebuildTensor struct{}

func (rebuildTensor) Call(args ...interface{}) (interface{}, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("_rebuild_tensor_v2: %d arguments", len(args))
	}
	st, ok := args[0].(*loadedStorage)
	off, ok2 := args[1].(int)
	size, ok3 := args[2].(*types.Tuple)
	stride, ok4 := args[3].(*types.Tuple)
	if !ok || !ok2 || !ok3 || !ok4 {
		return nil, fmt.Errorf("_rebuild_tensor_v2: unexpected arguments")
	}
	t := &torchTensor{storage: st, offset: off}
	for i := 0; i < size.Len(); i++ {
		v, ok := size.Get(i).(int)
		if !ok {
			return nil, fmt.Errorf("_rebuild_tensor_v2: bad size")
		}
		t.size = append(t.size, v)
	}
	for i := 0; i < stride.Len(); i++ {
		v, ok := stride.Get(i).(int)
		if !ok {
			return nil, fmt.Errorf("_rebuild_tensor_v2: bad stride")
		}
		t.stride = append(t.stride, v)
	}
	if len(t.size) != len(t.stride) {
		return nil, fmt.Errorf("_rebuild_tensor_v2: %d sizes, %d strides", len(t.size), len(t.stride))
	}
	return t, nil
}

var torchStorages = map[string]string{
	"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
	"LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
}

var dtypeSize = map[string]int{"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}

// readTorchZip parses a PyTorch zip checkpoint (torch.save of a state
// dict) without trusting it: storage sizes are checked against the archive
// before any allocation, and unpickler panics become errors.
func readTorchZip(data []byte) (out map[string]*hfTensor, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, fmt.Errorf("torch checkpoint: malformed pickle (%v)", r)
		}
	}()
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, fmt.Errorf("torch checkpoint: not a zip archive (legacy or corrupt file): %v", err)
	}
	records := map[string]*zip.File{}
	var pkl *zip.File
	for _, f := range zr.File {
		_, base := path.Split(f.Name)
		if base == "data.pkl" {
			pkl = f
		}
		records[f.Name] = f
		// storages live in <archive>/data/<key>
		if dir := path.Base(path.Dir(f.Name)); dir == "data" {
			records["data/"+base] = f
		}
	}
	if pkl == nil {
		return nil, fmt.Errorf("torch checkpoint: no data.pkl in the archive")
	}
	if pkl.UncompressedSize64 > 64<<20 {
		return nil, fmt.Errorf("torch checkpoint: data.pkl of %d bytes is too large", pkl.UncompressedSize64)
	}
	rc, err := pkl.Open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	u := pickle.NewUnpickler(io.LimitReader(rc, int64(pkl.UncompressedSize64)))
	u.FindClass = func(module, name string) (interface{}, error) {
		switch {
		case module == "torch._utils" && name == "_rebuild_tensor_v2":
			return rebuildTensor{}, nil
		case module == "torch" && torchStorages[name] != "":
			return &torchStorage{dtype: torchStorages[name]}, nil
		case module == "collections" && name == "OrderedDict":
			return &types.OrderedDictClass{}, nil
		}
		return nil, fmt.Errorf("unsupported class %s.%s in a state dict", module, name)
	}
	loaded := map[string]*loadedStorage{}
	u.PersistentLoad = func(id interface{}) (interface{}, error) {
		tup, ok := id.(*types.Tuple)
		if !ok || tup.Len() < 5 {
			return nil, fmt.Errorf("unexpected persistent id")
		}
		kind, _ := tup.Get(0).(string)
		cls, ok1 := tup.Get(1).(*torchStorage)
		key, ok2 := tup.Get(2).(string)
		n, ok3 := tup.Get(4).(int)
		if kind != "storage" || !ok1 || !ok2 || !ok3 || n < 0 {
			return nil, fmt.Errorf("unexpected storage reference")
		}
		if st, ok := loaded[key]; ok {
			return st, nil
		}
		f, ok := records["data/"+key]
		if !ok {
			return nil, fmt.Errorf("storage %q is missing from the archive", key)
		}
		elem := dtypeSize[cls.dtype]
		if uint64(n)*uint64(elem) != f.UncompressedSize64 {
			return nil, fmt.Errorf("storage %q claims %d elements but holds %d bytes", key, n, f.UncompressedSize64)
		}
		r, err := f.Open()
		if err != nil {
			return nil, err
		}
		defer r.Close()
		raw := make([]byte, f.UncompressedSize64)
		if _, err := io.ReadFull(r, raw); err != nil {
			return nil, fmt.Errorf("storage %q: %v", key, err)
		}
		st := &loadedStorage{dtype: cls.dtype, raw: raw, elem: elem}
		loaded[key] = st
		return st, nil
	}
	obj, err := u.Load()
	if err != nil {
		return nil, fmt.Errorf("torch checkpoint: %v", err)
	}
	entries := map[string]interface{}{}
	switch d := obj.(type) {
	case *types.OrderedDict:
		for k, e := range d.Map {
			ks, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("torch checkpoint: non-string key %v", k)
			}
			entries[ks] = e.Value
		}
	case *types.Dict:
		for _, e := range *d {
			ks, ok := e.Key.(string)
			if !ok {
				return nil, fmt.Errorf("torch checkpoint: non-string key %v", e.Key)
			}
			entries[ks] = e.Value
		}
	default:
		return nil, fmt.Errorf("torch checkpoint: top level is %T, want a state dict", obj)
	}
	out = map[string]*hfTensor{}
	for name, v := range entries {
		tt, ok := v.(*torchTensor)
		if !ok {
			return nil, fmt.Errorf("torch checkpoint: %q is %T, not a tensor", name, v)
		}
		t, err := tt.materialize()
		if err != nil {
			return nil, fmt.Errorf("torch checkpoint: %q: %v", name, err)
		}
		out[name] = t
	}
	return out, nil
}

// materialize copies a (possibly strided) view out of its storage.
func (t *torchTensor) materialize() (*hfTensor, error) {
	n, err := numel(t.size)
	if err != nil {
		return nil, err
	}
	total := len(t.storage.raw) / t.storage.elem
	if n > 0 {
		last := t.offset
		for i, s := range t.size {
			if t.stride[i] < 0 {
				return nil, fmt.Errorf("negative stride")
			}
			last += (s - 1) * t.stride[i]
		}
		if t.offset < 0 || last >= total {
			return nil, fmt.Errorf("view [%d..%d] outside a storage of %d elements", t.offset, last, total)
		}
	}
	e := t.storage.elem
	contiguous, want := true, 1
	for i := len(t.size) - 1; i >= 0; i-- {
		if t.size[i] != 1 && t.stride[i] != want {
			contiguous = false
		}
		want *= t.size[i]
	}
	if contiguous {
		return decodeElems(t.storage.dtype, t.storage.raw[t.offset*e:(t.offset+n)*e], t.size)
	}
	raw := make([]byte, 0, n*e)
	idx := make([]int, len(t.size))
	for k := 0; k < n; k++ {
		off := t.offset
		for i := range idx {
			off += idx[i] * t.stride[i]
		}
		raw = append(raw, t.storage.raw[off*e:(off+1)*e]...)
		for i := len(idx) - 1; i >= 0; i-- {
			idx[i]++
			if idx[i] < t.size[i] {
				break
			}
			idx[i] = 0
		}
	}
	return decodeElems(t.storage.dtype, raw, t.size)
}

// readCheckpoint reads a safetensors or PyTorch file by content.
func readCheckpoint(data []byte) (map[string]*hfTensor, error) {
	if len(data) >= 4 && string(data[:4]) == "PK\x03\x04" {
		return readTorchZip(data)
	}
	return readSafetensors(data)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func quoteList(names []string, max int) string {
	if len(names) > max {
		return strings.Join(names[:max], ", ") + fmt.Sprintf(" and %d more", len(names)-max)
	}
	return strings.Join(names, ", ")
}
