package gguf

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
)

// Writer assembles a GGUF file: metadata in insertion order, then tensors in
// the order they were added.
type Writer struct {
	KV        KV
	Alignment uint64
	tensors   []writerTensor
	names     map[string]bool
}

type writerTensor struct {
	TensorInfo
	write func(io.Writer) error
}

// NewWriter returns an empty writer with the default alignment.
func NewWriter() *Writer {
	return &Writer{Alignment: DefaultAlignment, names: map[string]bool{}}
}

// AddTensor adds a tensor whose bytes are data.
func (w *Writer) AddTensor(name string, typ TensorType, shape []uint64, data []byte) error {
	return w.AddTensorFunc(name, typ, shape, func(out io.Writer) error {
		_, err := out.Write(data)
		return err
	}, uint64(len(data)))
}

// AddTensorFunc adds a tensor of size bytes that write produces when the
// file is written, so large tensors can be streamed from another file.
func (w *Writer) AddTensorFunc(name string, typ TensorType, shape []uint64, write func(io.Writer) error, size uint64) error {
	if w.names[name] {
		return fmt.Errorf("gguf: duplicate tensor %q", name)
	}
	if len(shape) == 0 || len(shape) > maxDims {
		return fmt.Errorf("gguf: tensor %q has %d dimensions", name, len(shape))
	}
	t := TensorInfo{Name: name, Type: typ, Shape: append([]uint64(nil), shape...)}
	if _, err := typ.RowSize(shape[0]); err != nil {
		return fmt.Errorf("gguf: tensor %q: %w", name, err)
	}
	if t.Size() != size {
		return fmt.Errorf("gguf: tensor %q of %s %v needs %d bytes, got %d", name, typ, shape, t.Size(), size)
	}
	w.names[name] = true
	w.tensors = append(w.tensors, writerTensor{TensorInfo: t, write: write})
	return nil
}

// WriteTo writes the whole file to out.
func (w *Writer) WriteTo(out io.Writer) (int64, error) {
	cw := &countingWriter{w: bufio.NewWriterSize(out, 1<<20)}
	align := w.Alignment
	if align == 0 {
		align = DefaultAlignment
	}
	kv := w.KV
	if align != DefaultAlignment {
		kv.Set("general.alignment", uint32(align))
	}
	cw.bytes([]byte(Magic))
	cw.u32(3)
	cw.u64(uint64(len(w.tensors)))
	cw.u64(uint64(kv.Len()))
	for _, k := range kv.Keys() {
		v, _ := kv.Value(k)
		cw.str(k)
		if err := cw.value(v); err != nil {
			return cw.n, fmt.Errorf("gguf: key %q: %w", k, err)
		}
	}
	offset := uint64(0)
	for i := range w.tensors {
		t := &w.tensors[i]
		t.Offset = offset
		cw.str(t.Name)
		cw.u32(uint32(len(t.Shape)))
		for _, d := range t.Shape {
			cw.u64(d)
		}
		cw.u32(uint32(t.Type))
		cw.u64(t.Offset)
		offset = pad(offset+t.Size(), align)
	}
	cw.zeros(pad(uint64(cw.n), align) - uint64(cw.n))
	for _, t := range w.tensors {
		start := cw.n
		if cw.err == nil {
			if err := t.write(cw); err != nil {
				return cw.n, fmt.Errorf("gguf: writing tensor %q: %w", t.Name, err)
			}
		}
		if got := uint64(cw.n - start); cw.err == nil && got != t.Size() {
			return cw.n, fmt.Errorf("gguf: tensor %q wrote %d bytes, want %d", t.Name, got, t.Size())
		}
		cw.zeros(pad(uint64(cw.n), align) - uint64(cw.n))
	}
	if cw.err != nil {
		return cw.n, cw.err
	}
	return cw.n, cw.w.Flush()
}

// WriteFile writes the file to path atomically: a temporary file in the same
// directory is written, synced and renamed over path.
func (w *Writer) WriteFile(path string) error {
	return WriteFileAtomic(path, func(f io.Writer) error {
		_, err := w.WriteTo(f)
		return err
	})
}

// WriteFileAtomic calls write with a temporary file next to path and renames
// it to path only when write, fsync and close all succeed.
func WriteFileAtomic(path string, write func(io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = write(tmp); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	// Persist the rename itself.
	if d, derr := os.Open(dir); derr == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

type countingWriter struct {
	w   *bufio.Writer
	n   int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

func (c *countingWriter) bytes(p []byte) { c.Write(p) }

func (c *countingWriter) u8(v uint8) { c.Write([]byte{v}) }

func (c *countingWriter) u16(v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	c.Write(b[:])
}

func (c *countingWriter) u32(v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	c.Write(b[:])
}

func (c *countingWriter) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	c.Write(b[:])
}

func (c *countingWriter) str(s string) {
	c.u64(uint64(len(s)))
	c.Write([]byte(s))
}

func (c *countingWriter) zeros(n uint64) {
	if n > 0 {
		c.Write(make([]byte, n))
	}
}

func (c *countingWriter) scalar(v any) {
	switch v := v.(type) {
	case uint8:
		c.u8(v)
	case int8:
		c.u8(uint8(v))
	case uint16:
		c.u16(v)
	case int16:
		c.u16(uint16(v))
	case uint32:
		c.u32(v)
	case int32:
		c.u32(uint32(v))
	case float32:
		c.u32(math.Float32bits(v))
	case bool:
		if v {
			c.u8(1)
		} else {
			c.u8(0)
		}
	case string:
		c.str(v)
	case uint64:
		c.u64(v)
	case int64:
		c.u64(uint64(v))
	case float64:
		c.u64(math.Float64bits(v))
	}
}

func writeArray[T any](c *countingWriter, s []T) error {
	if len(s) == 0 {
		var zero T
		t, _ := valueType(zero)
		c.u32(t)
		c.u64(0)
		return nil
	}
	t, err := valueType(s[0])
	if err != nil {
		return err
	}
	c.u32(t)
	c.u64(uint64(len(s)))
	for _, v := range s {
		c.scalar(v)
	}
	return nil
}

func (c *countingWriter) value(v any) error {
	t, err := valueType(v)
	if err != nil {
		return err
	}
	c.u32(t)
	switch v := v.(type) {
	case []uint8:
		return writeArray(c, v)
	case []int8:
		return writeArray(c, v)
	case []uint16:
		return writeArray(c, v)
	case []int16:
		return writeArray(c, v)
	case []uint32:
		return writeArray(c, v)
	case []int32:
		return writeArray(c, v)
	case []float32:
		return writeArray(c, v)
	case []bool:
		return writeArray(c, v)
	case []string:
		return writeArray(c, v)
	case []uint64:
		return writeArray(c, v)
	case []int64:
		return writeArray(c, v)
	case []float64:
		return writeArray(c, v)
	}
	c.scalar(v)
	return nil
}
