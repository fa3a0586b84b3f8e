package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
)

// Magic is the first four bytes of every GGUF file.
const Magic = "GGUF"

// DefaultAlignment is the data alignment when general.alignment is absent.
const DefaultAlignment = 32

// maxDims is GGML_MAX_DIMS.
const maxDims = 4

// TensorInfo describes one tensor of a file.
type TensorInfo struct {
	Name string
	Type TensorType
	// Shape in ggml order: Shape[0] is the row length (ne0).
	Shape []uint64
	// Offset of the data from the start of the data section.
	Offset uint64
}

// Elements is the number of elements of the tensor.
func (t TensorInfo) Elements() uint64 {
	n := uint64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Size is the number of bytes of the tensor's data.
func (t TensorInfo) Size() uint64 {
	return t.Elements() / t.Type.BlockSize() * t.Type.TypeSize()
}

// File is an opened GGUF file. Tensor data is read on demand.
type File struct {
	Version    uint32
	KV         KV
	Tensors    []TensorInfo
	Alignment  uint64
	DataOffset int64 // absolute offset of the data section

	r      io.ReaderAt
	size   int64
	closer io.Closer
	byName map[string]int
}

// Open opens and parses the GGUF file at path.
func Open(path string) (*File, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := fh.Stat()
	if err != nil {
		fh.Close()
		return nil, err
	}
	f, err := Read(fh, st.Size())
	if err != nil {
		fh.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f.closer = fh
	return f, nil
}

// Close releases the underlying file, if Open opened one.
func (f *File) Close() error {
	if f.closer != nil {
		return f.closer.Close()
	}
	return nil
}

// Tensor returns the named tensor's description.
func (f *File) Tensor(name string) (TensorInfo, bool) {
	i, ok := f.byName[name]
	if !ok {
		return TensorInfo{}, false
	}
	return f.Tensors[i], true
}

// ReadTensor returns the raw bytes of t.
func (f *File) ReadTensor(t TensorInfo) ([]byte, error) {
	buf := make([]byte, t.Size())
	if _, err := f.r.ReadAt(buf, f.DataOffset+int64(t.Offset)); err != nil {
		return nil, fmt.Errorf("reading tensor %s: %w", t.Name, err)
	}
	return buf, nil
}

// TensorReader returns a reader over the raw bytes of t.
func (f *File) TensorReader(t TensorInfo) *io.SectionReader {
	return io.NewSectionReader(f.r, f.DataOffset+int64(t.Offset), int64(t.Size()))
}

// ErrFormat wraps every structural error of a GGUF file.
var ErrFormat = errors.New("invalid GGUF")

func formatErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
}

// decoder reads little-endian values and tracks how many bytes remain, so
// that no count read from the file can make it allocate more than the file
// could possibly hold.
type decoder struct {
	r         *bufio.Reader
	pos, size int64
	err       error
}

func (d *decoder) remaining() int64 { return d.size - d.pos }

func (d *decoder) read(n int64) []byte {
	if d.err != nil {
		return nil
	}
	if n > d.remaining() {
		d.err = formatErr("truncated at byte %d (need %d more bytes, %d left)", d.pos, n, d.remaining())
		return nil
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(d.r, buf); err != nil {
		d.err = formatErr("truncated at byte %d: %v", d.pos, err)
		return nil
	}
	d.pos += n
	return buf
}

func (d *decoder) u8() uint8 {
	if b := d.read(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if b := d.read(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.read(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.read(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

// count reads a uint64 count of items of at least minSize bytes each and
// fails unless that many items could fit in the rest of the file.
func (d *decoder) count(what string, minSize int64) int64 {
	n := d.u64()
	if d.err != nil {
		return 0
	}
	if n > uint64(d.remaining()/minSize) {
		d.err = formatErr("%s count %d does not fit in the %d remaining bytes", what, n, d.remaining())
		return 0
	}
	return int64(n)
}

func (d *decoder) str() string {
	n := d.count("string byte", 1)
	return string(d.read(n))
}

// GGUF metadata value types.
const (
	kvUint8   = 0
	kvInt8    = 1
	kvUint16  = 2
	kvInt16   = 3
	kvUint32  = 4
	kvInt32   = 5
	kvFloat32 = 6
	kvBool    = 7
	kvString  = 8
	kvArray   = 9
	kvUint64  = 10
	kvInt64   = 11
	kvFloat64 = 12
)

var kvSizes = map[uint32]int64{
	kvUint8: 1, kvInt8: 1, kvUint16: 2, kvInt16: 2, kvUint32: 4, kvInt32: 4, kvFloat32: 4,
	kvBool: 1, kvString: 8, kvUint64: 8, kvInt64: 8, kvFloat64: 8,
}

func (d *decoder) scalar(t uint32) any {
	switch t {
	case kvUint8:
		return d.u8()
	case kvInt8:
		return int8(d.u8())
	case kvUint16:
		return d.u16()
	case kvInt16:
		return int16(d.u16())
	case kvUint32:
		return d.u32()
	case kvInt32:
		return int32(d.u32())
	case kvFloat32:
		return math.Float32frombits(d.u32())
	case kvBool:
		b := d.u8()
		if b > 1 && d.err == nil {
			d.err = formatErr("bool value %d", b)
		}
		return b == 1
	case kvString:
		return d.str()
	case kvUint64:
		return d.u64()
	case kvInt64:
		return int64(d.u64())
	case kvFloat64:
		return math.Float64frombits(d.u64())
	}
	if d.err == nil {
		d.err = formatErr("unknown value type %d", t)
	}
	return nil
}

func readArray[T any](d *decoder, n int64, elem uint32) []T {
	out := make([]T, 0, n)
	for i := int64(0); i < n && d.err == nil; i++ {
		v, _ := d.scalar(elem).(T)
		out = append(out, v)
	}
	return out
}

func (d *decoder) value(t uint32) any {
	if t != kvArray {
		return d.scalar(t)
	}
	elem := d.u32()
	if d.err != nil {
		return nil
	}
	size, ok := kvSizes[elem]
	if !ok {
		d.err = formatErr("unsupported array element type %d", elem)
		return nil
	}
	n := d.count("array element", size)
	switch elem {
	case kvUint8:
		return readArray[uint8](d, n, elem)
	case kvInt8:
		return readArray[int8](d, n, elem)
	case kvUint16:
		return readArray[uint16](d, n, elem)
	case kvInt16:
		return readArray[int16](d, n, elem)
	case kvUint32:
		return readArray[uint32](d, n, elem)
	case kvInt32:
		return readArray[int32](d, n, elem)
	case kvFloat32:
		return readArray[float32](d, n, elem)
	case kvBool:
		return readArray[bool](d, n, elem)
	case kvString:
		return readArray[string](d, n, elem)
	case kvUint64:
		return readArray[uint64](d, n, elem)
	case kvInt64:
		return readArray[int64](d, n, elem)
	default: // kvFloat64
		return readArray[float64](d, n, elem)
	}
}

// Read parses a GGUF file of the given size from r.
func Read(r io.ReaderAt, size int64) (*File, error) {
	d := &decoder{r: bufio.NewReaderSize(io.NewSectionReader(r, 0, size), 1<<16), size: size}
	if magic := d.read(4); d.err != nil || string(magic) != Magic {
		if d.err != nil {
			return nil, d.err
		}
		return nil, formatErr("bad magic %q", magic)
	}
	f := &File{r: r, size: size, byName: map[string]int{}}
	f.Version = d.u32()
	if d.err == nil && (f.Version < 2 || f.Version > 3) {
		return nil, formatErr("unsupported version %d", f.Version)
	}
	// A tensor info takes at least 8+1 (name) + 4 (dims) + 8 (one dim) + 4 + 8 bytes;
	// a key-value pair at least 8+1 (key) + 4 (type) + 1 (value).
	nTensors := d.count("tensor", 33)
	nKV := d.count("key-value", 14)
	f.KV = KV{values: map[string]any{}}
	for i := int64(0); i < nKV && d.err == nil; i++ {
		key := d.str()
		t := d.u32()
		v := d.value(t)
		if d.err != nil {
			break
		}
		if _, dup := f.KV.values[key]; dup {
			return nil, formatErr("duplicate key %q", key)
		}
		f.KV.Set(key, v)
	}
	if d.err != nil {
		return nil, d.err
	}
	f.Alignment = DefaultAlignment
	if v, ok := f.KV.values["general.alignment"]; ok {
		a, ok := v.(uint32)
		if !ok || a == 0 || a&(a-1) != 0 {
			return nil, formatErr("general.alignment must be a power-of-two uint32, got %v", v)
		}
		f.Alignment = uint64(a)
	}
	f.Tensors = make([]TensorInfo, 0, nTensors)
	for i := int64(0); i < nTensors && d.err == nil; i++ {
		t := TensorInfo{Name: d.str()}
		nd := d.u32()
		if d.err == nil && (nd == 0 || nd > maxDims) {
			return nil, formatErr("tensor %q has %d dimensions", t.Name, nd)
		}
		elems := uint64(1)
		for j := uint32(0); j < nd && d.err == nil; j++ {
			dim := d.u64()
			if d.err == nil && (dim == 0 || dim > math.MaxInt64/elems) {
				return nil, formatErr("tensor %q has bad dimension %d", t.Name, dim)
			}
			elems *= dim
			t.Shape = append(t.Shape, dim)
		}
		t.Type = TensorType(d.u32())
		t.Offset = d.u64()
		if d.err != nil {
			break
		}
		if !t.Type.Known() {
			return nil, formatErr("tensor %q has unknown type %d", t.Name, uint32(t.Type))
		}
		if _, err := t.Type.RowSize(t.Shape[0]); err != nil {
			return nil, formatErr("tensor %q: %v", t.Name, err)
		}
		if _, dup := f.byName[t.Name]; dup {
			return nil, formatErr("duplicate tensor %q", t.Name)
		}
		if t.Offset%f.Alignment != 0 {
			return nil, formatErr("tensor %q offset %d is not aligned to %d", t.Name, t.Offset, f.Alignment)
		}
		f.byName[t.Name] = len(f.Tensors)
		f.Tensors = append(f.Tensors, t)
	}
	if d.err != nil {
		return nil, d.err
	}
	f.DataOffset = int64(pad(uint64(d.pos), f.Alignment))
	dataSize := uint64(0)
	if size > f.DataOffset {
		dataSize = uint64(size - f.DataOffset)
	}
	for _, t := range f.Tensors {
		if t.Offset > dataSize || t.Size() > dataSize-t.Offset {
			return nil, formatErr("tensor %q data [%d, +%d) runs past the end of the file (data section is %d bytes)", t.Name, t.Offset, t.Size(), dataSize)
		}
	}
	// Tensors must not share bytes: otherwise a small file could describe
	// many tensors over the same data and make readers allocate many times
	// its size.
	order := make([]int, len(f.Tensors))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(i, j int) bool { return f.Tensors[order[i]].Offset < f.Tensors[order[j]].Offset })
	for k := 1; k < len(order); k++ {
		prev, t := f.Tensors[order[k-1]], f.Tensors[order[k]]
		if prev.Offset+prev.Size() > t.Offset {
			return nil, formatErr("tensors %q and %q overlap (data [%d, +%d) and [%d, +%d))", prev.Name, t.Name, prev.Offset, prev.Size(), t.Offset, t.Size())
		}
	}
	return f, nil
}

func pad(n, align uint64) uint64 { return (n + align - 1) / align * align }
