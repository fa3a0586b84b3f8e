package gguf

import "fmt"

// TensorType is a ggml tensor element type, numbered as in ggml.h.
type TensorType uint32

const (
	TypeF32  TensorType = 0
	TypeF16  TensorType = 1
	TypeQ4_0 TensorType = 2
	TypeQ4_1 TensorType = 3
	TypeQ5_0 TensorType = 6
	TypeQ5_1 TensorType = 7
	TypeQ8_0 TensorType = 8
	TypeQ8_1 TensorType = 9
	TypeQ2_K TensorType = 10
	TypeQ3_K TensorType = 11
	TypeQ4_K TensorType = 12
	TypeQ5_K TensorType = 13
	TypeQ6_K TensorType = 14
	TypeQ8_K TensorType = 15
	TypeI8   TensorType = 24
	TypeI16  TensorType = 25
	TypeI32  TensorType = 26
	TypeI64  TensorType = 27
	TypeF64  TensorType = 28
	TypeBF16 TensorType = 30
)

type typeInfo struct {
	name      string
	blockSize uint64 // elements per block
	typeSize  uint64 // bytes per block
}

// The layouts of the types this project reads or writes. Checked against
// ggml's own type traits in the ggmlx tests.
var typeInfos = map[TensorType]typeInfo{
	TypeF32:  {"F32", 1, 4},
	TypeF16:  {"F16", 1, 2},
	TypeQ4_0: {"Q4_0", 32, 18},
	TypeQ4_1: {"Q4_1", 32, 20},
	TypeQ5_0: {"Q5_0", 32, 22},
	TypeQ5_1: {"Q5_1", 32, 24},
	TypeQ8_0: {"Q8_0", 32, 34},
	TypeQ8_1: {"Q8_1", 32, 36},
	TypeQ2_K: {"Q2_K", 256, 84},
	TypeQ3_K: {"Q3_K", 256, 110},
	TypeQ4_K: {"Q4_K", 256, 144},
	TypeQ5_K: {"Q5_K", 256, 176},
	TypeQ6_K: {"Q6_K", 256, 210},
	TypeQ8_K: {"Q8_K", 256, 292},
	TypeI8:   {"I8", 1, 1},
	TypeI16:  {"I16", 1, 2},
	TypeI32:  {"I32", 1, 4},
	TypeI64:  {"I64", 1, 8},
	TypeF64:  {"F64", 1, 8},
	TypeBF16: {"BF16", 1, 2},
}

// Known reports whether this package knows the byte layout of t.
func (t TensorType) Known() bool { _, ok := typeInfos[t]; return ok }

func (t TensorType) String() string {
	if info, ok := typeInfos[t]; ok {
		return info.name
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// BlockSize is the number of elements in one quantization block.
func (t TensorType) BlockSize() uint64 { return typeInfos[t].blockSize }

// TypeSize is the number of bytes of one block.
func (t TensorType) TypeSize() uint64 { return typeInfos[t].typeSize }

// Quantized reports whether t stores blocks of more than one element.
func (t TensorType) Quantized() bool { return typeInfos[t].blockSize > 1 }

// RowSize is the byte size of a row of n elements, or an error when n is not
// a whole number of blocks.
func (t TensorType) RowSize(n uint64) (uint64, error) {
	info, ok := typeInfos[t]
	if !ok {
		return 0, fmt.Errorf("unknown tensor type %d", uint32(t))
	}
	if n%info.blockSize != 0 {
		return 0, fmt.Errorf("row of %d elements is not a multiple of the %s block size %d", n, info.name, info.blockSize)
	}
	return n / info.blockSize * info.typeSize, nil
}

// ParseTensorType parses a type name such as "Q4_0" or "f16".
func ParseTensorType(s string) (TensorType, error) {
	for t, info := range typeInfos {
		if equalFold(info.name, s) {
			return t, nil
		}
	}
	return 0, fmt.Errorf("unknown tensor type %q", s)
}

func equalFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'a' <= x && x <= 'z' {
			x -= 'a' - 'A'
		}
		if 'a' <= y && y <= 'z' {
			y -= 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
