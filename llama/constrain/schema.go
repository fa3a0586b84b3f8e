// Package constrain limits generation to JSON that matches a schema (the
// OpenAI API's response_format json_object and json_schema, and forced
// tool calls): a character-level matcher driven by the schema, and a
// token-level mask over a vocabulary built on it.
//
// Supported schema features: type (one or several), properties (emitted in
// schema order; required ones cannot be skipped; no other keys),
// required, additionalProperties (false, or a schema for map-like objects
// without properties), items, minItems, maxItems, minLength, maxLength,
// minimum, maximum, exclusiveMinimum, exclusiveMaximum (integers), enum,
// const, anyOf, oneOf, allOf with one member, $ref into $defs or
// definitions, and an empty schema (any JSON value). Anything else
// (pattern, format, number ranges, ...) is refused with an error naming
// it, rather than silently not enforced.
package constrain

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
)

// kind is a JSON value type a schema node accepts.
type kind uint8

const (
	kObject kind = 1 << iota
	kArray
	kString
	kInteger
	kNumber
	kBoolean
	kNull
	kAny = kObject | kArray | kString | kInteger | kNumber | kBoolean | kNull
)

// node is a compiled schema.
type node struct {
	kinds kind
	// objects
	props      []prop
	hasProps   bool
	additional *node // map-like objects (no properties): the values' schema
	// arrays
	items              *node
	minItems, maxItems int // maxItems -1: unbounded
	// strings
	minLen, maxLen int // maxLen -1: unbounded
	// integers: inclusive bounds
	min, max       int64
	hasMin, hasMax bool
	// enum/const: canonical JSON texts; the value must be one of them
	literals []string
	// anyOf: alternatives (kinds is 0)
	anyOf []*node
}

type prop struct {
	name     string
	key      string // the name as JSON text, quotes included
	node     *node
	required bool
}

// Schema is a compiled JSON schema.
type Schema struct{ root *node }

// AnyObject is the schema of response_format json_object: any JSON object.
func AnyObject() *Schema {
	return &Schema{root: &node{kinds: kObject, additional: anyValue(), maxItems: -1, maxLen: -1}}
}

func anyValue() *node {
	n := &node{kinds: kAny, maxItems: -1, maxLen: -1}
	n.items, n.additional = n, n
	return n
}

// Compile compiles a JSON schema.
func Compile(schema json.RawMessage) (*Schema, error) {
	var root map[string]any
	dec := json.NewDecoder(bytes.NewReader(schema))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("schema is not JSON: %v", err)
	}
	switch t := v.(type) {
	case map[string]any:
		root = t
	case bool:
		if t {
			return &Schema{root: anyValue()}, nil
		}
		return nil, fmt.Errorf("schema false accepts nothing")
	default:
		return nil, fmt.Errorf("schema must be an object")
	}
	// Property order matters (keys are generated in schema order), so
	// read each "properties" object's key order from the raw text.
	orders, err := propertyOrders(schema)
	if err != nil {
		return nil, err
	}
	c := &compiler{root: root, refs: map[string]*node{}, orders: orders}
	n, err := c.compile(root, "#")
	if err != nil {
		return nil, err
	}
	return &Schema{root: n}, nil
}

type compiler struct {
	root   map[string]any
	refs   map[string]*node
	orders map[string][]string // JSON pointer of a properties object → key order
	depth  int
}

// unsupported lists the assertions the matcher cannot enforce. ("format"
// is an annotation in JSON Schema 2020-12, so it is accepted and ignored.)
var unsupported = []string{"pattern", "patternProperties", "propertyNames", "if", "then", "else", "not",
	"dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "contains", "prefixItems",
	"uniqueItems", "multipleOf", "minProperties", "maxProperties"}

func (c *compiler) compile(s map[string]any, path string) (*node, error) {
	c.depth++
	defer func() { c.depth-- }()
	if c.depth > 64 {
		return nil, fmt.Errorf("schema nests too deep at %s", path)
	}
	for _, k := range unsupported {
		if _, ok := s[k]; ok {
			return nil, fmt.Errorf("schema feature %q (at %s) is not supported", k, path)
		}
	}
	if ref, ok := s["$ref"].(string); ok {
		return c.ref(ref)
	}
	n := &node{maxItems: -1, maxLen: -1}
	if v, ok := s["const"]; ok {
		n.literals = []string{canonical(v)}
		n.kinds = kAny
		return n, nil
	}
	if v, ok := s["enum"]; ok {
		list, ok := v.([]any)
		if !ok || len(list) == 0 {
			return nil, fmt.Errorf("enum at %s must be a non-empty array", path)
		}
		for _, x := range list {
			n.literals = append(n.literals, canonical(x))
		}
		n.kinds = kAny
		return n, nil
	}
	for _, key := range []string{"anyOf", "oneOf"} {
		if v, ok := s[key]; ok {
			list, ok := v.([]any)
			if !ok || len(list) == 0 {
				return nil, fmt.Errorf("%s at %s must be a non-empty array", key, path)
			}
			for i, x := range list {
				m, ok := x.(map[string]any)
				if !ok {
					return nil, fmt.Errorf("%s[%d] at %s must be a schema object", key, i, path)
				}
				alt, err := c.compile(m, fmt.Sprintf("%s/%s/%d", path, key, i))
				if err != nil {
					return nil, err
				}
				n.anyOf = append(n.anyOf, alt)
			}
			return n, nil
		}
	}
	if v, ok := s["allOf"]; ok {
		list, ok := v.([]any)
		if !ok || len(list) != 1 {
			return nil, fmt.Errorf("allOf at %s is supported only with one member", path)
		}
		m, ok := list[0].(map[string]any)
		if !ok {
			return nil, fmt.Errorf("allOf[0] at %s must be a schema object", path)
		}
		return c.compile(m, path+"/allOf/0")
	}
	switch t := s["type"].(type) {
	case nil:
		n.kinds = kAny
		if _, ok := s["properties"]; ok {
			n.kinds = kObject
		}
		if _, ok := s["items"]; ok {
			n.kinds = kArray
		}
	case string:
		k, err := kindOf(t, path)
		if err != nil {
			return nil, err
		}
		n.kinds = k
	case []any:
		for _, x := range t {
			name, _ := x.(string)
			k, err := kindOf(name, path)
			if err != nil {
				return nil, err
			}
			n.kinds |= k
		}
	default:
		return nil, fmt.Errorf("type at %s must be a string or an array of strings", path)
	}
	if n.kinds&kNumber != 0 {
		for _, k := range []string{"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} {
			if _, ok := s[k]; ok {
				return nil, fmt.Errorf("schema feature %q on a number (at %s) is not supported (use an integer)", k, path)
			}
		}
	} else if n.kinds&kInteger != 0 {
		if err := c.integerBounds(n, s, path); err != nil {
			return nil, err
		}
	}
	var err error
	if n.minLen, n.maxLen, err = bounds(s, "minLength", "maxLength", path); err != nil {
		return nil, err
	}
	if n.minItems, n.maxItems, err = bounds(s, "minItems", "maxItems", path); err != nil {
		return nil, err
	}
	if n.kinds&kObject != 0 {
		if err := c.object(n, s, path); err != nil {
			return nil, err
		}
	}
	if n.kinds&kArray != 0 {
		n.items = anyValue()
		if v, ok := s["items"]; ok {
			m, ok := v.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("items at %s must be a schema object", path)
			}
			if n.items, err = c.compile(m, path+"/items"); err != nil {
				return nil, err
			}
		}
	}
	if n.kinds == kAny && !n.hasProps && n.items == nil {
		n.items, n.additional = anyValue(), anyValue()
	}
	return n, nil
}

func kindOf(name, path string) (kind, error) {
	switch name {
	case "object":
		return kObject, nil
	case "array":
		return kArray, nil
	case "string":
		return kString, nil
	case "integer":
		return kInteger, nil
	case "number":
		return kNumber, nil
	case "boolean":
		return kBoolean, nil
	case "null":
		return kNull, nil
	}
	return 0, fmt.Errorf("unknown type %q at %s", name, path)
}

func (c *compiler) ref(ref string) (*node, error) {
	if n, ok := c.refs[ref]; ok {
		return n, nil
	}
	var target map[string]any
	for _, prefix := range []string{"#/$defs/", "#/definitions/"} {
		if name, ok := strings.CutPrefix(ref, prefix); ok {
			defs, _ := c.root[strings.Trim(prefix[1:], "/")].(map[string]any)
			target, _ = defs[name].(map[string]any)
		}
	}
	if ref == "#" {
		target = c.root
	}
	if target == nil {
		return nil, fmt.Errorf("$ref %q: only local references into $defs or definitions are supported", ref)
	}
	// Register before compiling so recursive schemas terminate.
	n := &node{}
	c.refs[ref] = n
	m, err := c.compile(target, ref)
	if err != nil {
		return nil, err
	}
	*n = *m
	return n, nil
}

func (c *compiler) object(n *node, s map[string]any, path string) error {
	required := map[string]bool{}
	if v, ok := s["required"]; ok {
		list, ok := v.([]any)
		if !ok {
			return fmt.Errorf("required at %s must be an array", path)
		}
		for _, x := range list {
			name, ok := x.(string)
			if !ok {
				return fmt.Errorf("required at %s must list strings", path)
			}
			required[name] = true
		}
	}
	if v, ok := s["properties"]; ok {
		props, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("properties at %s must be an object", path)
		}
		n.hasProps = true
		order := c.orders[path+"/properties"]
		if len(order) != len(props) {
			order = nil
			for k := range props {
				order = append(order, k)
			}
			sort.Strings(order)
		}
		for _, name := range order {
			m, ok := props[name].(map[string]any)
			if !ok {
				if b, isBool := props[name].(bool); isBool && b {
					m = map[string]any{}
				} else {
					return fmt.Errorf("property %q at %s must be a schema object", name, path)
				}
			}
			pn, err := c.compile(m, path+"/properties/"+name)
			if err != nil {
				return err
			}
			key, _ := json.Marshal(name)
			n.props = append(n.props, prop{name: name, key: string(key), node: pn, required: required[name]})
			delete(required, name)
		}
	}
	for name := range required {
		return fmt.Errorf("required property %q at %s has no schema in properties", name, path)
	}
	if v, ok := s["additionalProperties"]; ok && !n.hasProps {
		switch t := v.(type) {
		case bool:
			if t {
				n.additional = anyValue()
			}
		case map[string]any:
			a, err := c.compile(t, path+"/additionalProperties")
			if err != nil {
				return err
			}
			n.additional = a
		}
	} else if !n.hasProps {
		n.additional = anyValue()
	}
	return nil
}

func (c *compiler) integerBounds(n *node, s map[string]any, path string) error {
	get := func(key string) (int64, bool, error) {
		v, ok := s[key]
		if !ok {
			return 0, false, nil
		}
		num, ok := v.(json.Number)
		if !ok {
			return 0, false, fmt.Errorf("%s at %s must be a number", key, path)
		}
		f, err := num.Float64()
		if err != nil || math.Abs(f) > 1e15 {
			return 0, false, fmt.Errorf("%s at %s must be a number below 1e15 in magnitude", key, path)
		}
		return int64(f), true, nil
	}
	lo, hasLo, err := get("minimum")
	if err != nil {
		return err
	}
	hi, hasHi, err := get("maximum")
	if err != nil {
		return err
	}
	if x, ok, err := get("exclusiveMinimum"); err != nil {
		return err
	} else if ok && (!hasLo || x+1 > lo) {
		lo, hasLo = x+1, true
	}
	if x, ok, err := get("exclusiveMaximum"); err != nil {
		return err
	} else if ok && (!hasHi || x-1 < hi) {
		hi, hasHi = x-1, true
	}
	if hasLo && hasHi && lo > hi {
		return fmt.Errorf("integer range at %s is empty", path)
	}
	n.min, n.hasMin, n.max, n.hasMax = lo, hasLo, hi, hasHi
	return nil
}

func bounds(s map[string]any, minKey, maxKey, path string) (int, int, error) {
	lo, hi := 0, -1
	for _, k := range []string{minKey, maxKey} {
		v, ok := s[k]
		if !ok {
			continue
		}
		num, ok := v.(json.Number)
		x, err := num.Int64()
		if !ok || err != nil || x < 0 || x > 1<<20 {
			return 0, 0, fmt.Errorf("%s at %s must be a non-negative integer", k, path)
		}
		if k == minKey {
			lo = int(x)
		} else {
			hi = int(x)
		}
	}
	if hi >= 0 && lo > hi {
		return 0, 0, fmt.Errorf("%s above %s at %s", minKey, maxKey, path)
	}
	return lo, hi, nil
}

// canonical is a JSON value as the matcher generates it: compact, keys in
// the order the schema wrote them.
func canonical(v any) string {
	var b strings.Builder
	writeCanonical(&b, v)
	return b.String()
}

func writeCanonical(b *strings.Builder, v any) {
	switch t := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(t))
		for k := range t {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			kb, _ := json.Marshal(k)
			b.Write(kb)
			b.WriteByte(':')
			writeCanonical(b, t[k])
		}
		b.WriteByte('}')
	case []any:
		b.WriteByte('[')
		for i, x := range t {
			if i > 0 {
				b.WriteByte(',')
			}
			writeCanonical(b, x)
		}
		b.WriteByte(']')
	default:
		var buf bytes.Buffer
		e := json.NewEncoder(&buf)
		e.SetEscapeHTML(false)
		e.Encode(t)
		b.WriteString(strings.TrimSuffix(buf.String(), "\n"))
	}
}

// propertyOrders maps the JSON pointer of every "properties" object in a
// schema to its keys in document order.
func propertyOrders(raw []byte) (map[string][]string, error) {
	out := map[string][]string{}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var walk func(path string, inProps bool) error
	walk = func(path string, inProps bool) error {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch d := tok.(type) {
		case json.Delim:
			switch d {
			case '{':
				var keys []string
				for dec.More() {
					k, err := dec.Token()
					if err != nil {
						return err
					}
					key := k.(string)
					keys = append(keys, key)
					if err := walk(path+"/"+key, !inProps && key == "properties"); err != nil {
						return err
					}
				}
				if inProps {
					out[path] = keys
				}
				_, err := dec.Token()
				return err
			case '[':
				for i := 0; dec.More(); i++ {
					if err := walk(fmt.Sprintf("%s/%d", path, i), false); err != nil {
						return err
					}
				}
				_, err := dec.Token()
				return err
			}
		}
		return nil
	}
	if err := walk("#", false); err != nil {
		return nil, fmt.Errorf("schema: %v", err)
	}
	return out, nil
}
