package gguf

import (
	"fmt"
	"math"
)

// KV is the ordered metadata of a GGUF file.
type KV struct {
	keys   []string
	values map[string]any
}

// Keys returns the keys in file order.
func (kv *KV) Keys() []string { return kv.keys }

// Len is the number of keys.
func (kv *KV) Len() int { return len(kv.keys) }

// Value returns the raw value of key.
func (kv *KV) Value(key string) (any, bool) {
	v, ok := kv.values[key]
	return v, ok
}

// Set sets key to v, keeping the position of an existing key.
func (kv *KV) Set(key string, v any) {
	if kv.values == nil {
		kv.values = map[string]any{}
	}
	if _, ok := kv.values[key]; !ok {
		kv.keys = append(kv.keys, key)
	}
	kv.values[key] = v
}

// Delete removes key.
func (kv *KV) Delete(key string) {
	if _, ok := kv.values[key]; !ok {
		return
	}
	delete(kv.values, key)
	for i, k := range kv.keys {
		if k == key {
			kv.keys = append(kv.keys[:i], kv.keys[i+1:]...)
			break
		}
	}
}

// String returns the string value of key.
func (kv *KV) String(key string) (string, bool) {
	v, ok := kv.values[key].(string)
	return v, ok
}

// Strings returns the string-array value of key.
func (kv *KV) Strings(key string) ([]string, bool) {
	v, ok := kv.values[key].([]string)
	return v, ok
}

// Int returns an integer value of key, whatever its stored width or sign.
func (kv *KV) Int(key string) (int64, bool) {
	switch v := kv.values[key].(type) {
	case uint8:
		return int64(v), true
	case int8:
		return int64(v), true
	case uint16:
		return int64(v), true
	case int16:
		return int64(v), true
	case uint32:
		return int64(v), true
	case int32:
		return int64(v), true
	case uint64:
		if v > math.MaxInt64 {
			return 0, false
		}
		return int64(v), true
	case int64:
		return v, true
	}
	return 0, false
}

// Float returns a numeric value of key as float64.
func (kv *KV) Float(key string) (float64, bool) {
	switch v := kv.values[key].(type) {
	case float32:
		return float64(v), true
	case float64:
		return v, true
	}
	if i, ok := kv.Int(key); ok {
		return float64(i), true
	}
	return 0, false
}

// Bool returns the bool value of key.
func (kv *KV) Bool(key string) (bool, bool) {
	v, ok := kv.values[key].(bool)
	return v, ok
}

// Ints returns an integer-array value of key as int64s.
func (kv *KV) Ints(key string) ([]int64, bool) {
	switch v := kv.values[key].(type) {
	case []int32:
		out := make([]int64, len(v))
		for i, x := range v {
			out[i] = int64(x)
		}
		return out, true
	case []uint32:
		out := make([]int64, len(v))
		for i, x := range v {
			out[i] = int64(x)
		}
		return out, true
	case []int64:
		return v, true
	}
	return nil, false
}

// Floats returns a float32-array value of key.
func (kv *KV) Floats(key string) ([]float32, bool) {
	v, ok := kv.values[key].([]float32)
	return v, ok
}

func valueType(v any) (uint32, error) {
	switch v.(type) {
	case uint8:
		return kvUint8, nil
	case int8:
		return kvInt8, nil
	case uint16:
		return kvUint16, nil
	case int16:
		return kvInt16, nil
	case uint32:
		return kvUint32, nil
	case int32:
		return kvInt32, nil
	case float32:
		return kvFloat32, nil
	case bool:
		return kvBool, nil
	case string:
		return kvString, nil
	case uint64:
		return kvUint64, nil
	case int64:
		return kvInt64, nil
	case float64:
		return kvFloat64, nil
	case []uint8, []int8, []uint16, []int16, []uint32, []int32, []float32, []bool, []string, []uint64, []int64, []float64:
		return kvArray, nil
	}
	return 0, fmt.Errorf("gguf: unsupported metadata value type %T", v)
}
