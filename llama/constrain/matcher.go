package constrain

import "math"

// The matcher is a pushdown automaton over bytes. A parse position is a
// stack of frames (containers below, the value being read on top); because
// anyOf and enum can leave several parses alive, a State holds a set of
// stacks. Every live stack can still be completed into a valid document
// (bounds are checked for feasibility as digits arrive), so a mask built
// from a State is never empty.

// Whitespace between tokens is llama.cpp's JSON grammar rule: nothing,
// one space, or a newline and up to maxIndent spaces or tabs, so that a
// model can pretty-print but cannot run away in whitespace.
const maxIndent = 20

// maxStacks bounds how many parses stay alive at once (ambiguous anyOf).
const maxStacks = 64

type fkind uint8

const (
	fSeq     fkind = iota // bottom: prefix text, the value, suffix text
	fValue                // a value not started yet
	fObject               // inside {...}
	fArray                // inside [...]
	fString               // inside "..."
	fNumber               // inside a number
	fLiteral              // inside a fixed text (true, null, an enum member)
)

// object states
const (
	oOpen     = iota // after '{'
	oKeyStart        // after ','
	oKey             // inside a property key
	oColon           // after the key
	oAfter           // after a member's value
)

// array states
const (
	aOpen = iota
	aAfter
	aNext
)

// string states
const (
	sBody = iota
	sEscape
	sHex
	sUTF8
)

// number states
const (
	nSign = iota
	nZero
	nInt
	nDot
	nFrac
	nE
	nESign
	nExp
)

// seq states
const (
	qPrefix = iota
	qValue
	qSuffix
	qDone
)

// frame flags
const (
	flNeg     = 1 << iota // number: a minus sign was read
	flIntOnly             // number: an integer (no fraction or exponent)
	flLowHex              // string: the \u escape began with D, so the next digit must be 0-7
)

type frame struct {
	n     *node
	lit   string // fLiteral: the text
	kind  fkind
	st    uint8
	ws    uint8 // consecutive whitespace read in this frame
	flags uint8
	i     int32 // object: next candidate property; array: items; string: code points; literal/seq: position
	j     int32 // object: the chosen/candidate property; string: hex digits or UTF-8 bytes left; number: digits in this part
	k     int32 // object: bytes of the key matched; string: allowed range of the next UTF-8 byte (lo<<8|hi)
	v     int64 // number: the integer magnitude so far
}

// Matcher accepts prefix, then one JSON value matching a schema, then
// suffix (the text a tool call wraps its JSON in, for example).
type Matcher struct {
	prefix, suffix string
	root           *node
}

// NewMatcher returns a matcher for s between prefix and suffix.
func NewMatcher(s *Schema, prefix, suffix string) *Matcher {
	return &Matcher{prefix: prefix, suffix: suffix, root: s.root}
}

// State is a set of parse positions. The zero State accepts nothing.
type State struct {
	frames []frame
	starts []int32
}

// Dead reports whether no parse is alive (the text so far cannot be
// completed).
func (s *State) Dead() bool { return len(s.starts) == 0 }

func (s *State) stack(k int) []frame {
	end := len(s.frames)
	if k+1 < len(s.starts) {
		end = int(s.starts[k+1])
	}
	return s.frames[s.starts[k]:end]
}

func (s *State) reset() {
	s.frames, s.starts = s.frames[:0], s.starts[:0]
}

// add appends a stack unless an equal one is there already.
func (s *State) add(st []frame) {
	for k := range s.starts {
		if framesEqual(s.stack(k), st) {
			return
		}
	}
	if len(s.starts) >= maxStacks {
		return
	}
	s.starts = append(s.starts, int32(len(s.frames)))
	s.frames = append(s.frames, st...)
}

func framesEqual(a, b []frame) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Start returns the state before any text.
func (m *Matcher) Start() *State {
	s := &State{}
	seq := frame{kind: fSeq, st: qPrefix}
	if m.prefix == "" {
		seq.st = qValue
		s.add([]frame{seq, {kind: fValue, n: m.root}})
	} else {
		s.add([]frame{seq})
	}
	return s
}

// Advance returns the state after text, and whether text was accepted.
func (m *Matcher) Advance(s *State, text []byte) (*State, bool) {
	cur := &State{frames: append([]frame(nil), s.frames...), starts: append([]int32(nil), s.starts...)}
	next := &State{}
	var scratch []frame
	for _, b := range text {
		next.reset()
		scratch = m.step(cur, b, next, scratch)
		if next.Dead() {
			return s, false
		}
		cur, next = next, cur
	}
	return cur, true
}

// step feeds b to every stack of src, writing the surviving stacks to dst.
func (m *Matcher) step(src *State, b byte, dst *State, scratch []frame) []frame {
	for k := range src.starts {
		scratch = append(scratch[:0], src.stack(k)...)
		m.feed(dst, scratch, b)
	}
	return scratch
}

// CanEnd reports whether the text so far is a complete document.
func (m *Matcher) CanEnd(s *State) bool {
	for k := range s.starts {
		st := s.stack(k)
		top := st[len(st)-1]
		if top.kind == fNumber && len(st) == 2 && m.suffix == "" && numberCanEnd(top) {
			return true
		}
		if len(st) == 1 && st[0].st == qDone {
			return true
		}
	}
	return false
}

func isSpace(b byte) bool { return b == ' ' || b == '\n' || b == '\t' || b == '\r' }

// space consumes whitespace in the top frame of w. ws counts the run:
// 1 after a lone space, 2+k after a newline and k indentation bytes.
func space(dst *State, w []frame, b byte) {
	top := &w[len(w)-1]
	switch {
	case top.ws == 0 && b == ' ':
		top.ws = 1
	case top.ws == 0 && b == '\n':
		top.ws = 2
	case top.ws >= 2 && top.ws < 2+maxIndent && (b == ' ' || b == '\t'):
		top.ws++
	default:
		return
	}
	dst.add(w)
}

// done pops the finished top value and moves its container on.
func (m *Matcher) done(w []frame) []frame {
	w = w[:len(w)-1]
	parent := &w[len(w)-1]
	parent.ws = 0
	if parent.kind == fSeq {
		parent.st, parent.i = qSuffix, 0
		if m.suffix == "" {
			parent.st = qDone
		}
	}
	return w
}

// feed advances the stack w (a private copy) by b, adding what survives
// to dst.
func (m *Matcher) feed(dst *State, w []frame, b byte) {
	top := &w[len(w)-1]
	switch top.kind {
	case fSeq:
		switch top.st {
		case qPrefix:
			if m.prefix[top.i] != b {
				return
			}
			top.i++
			if int(top.i) == len(m.prefix) {
				top.st = qValue
				w = append(w, frame{kind: fValue, n: m.root})
			}
			dst.add(w)
		case qSuffix:
			if m.suffix[top.i] != b {
				return
			}
			top.i++
			if int(top.i) == len(m.suffix) {
				top.st = qDone
			}
			dst.add(w)
		}
	case fValue:
		if isSpace(b) {
			space(dst, w, b)
			return
		}
		m.begin(dst, w, top.n, b)
	case fLiteral:
		if top.lit[top.i] != b {
			return
		}
		top.i++
		if int(top.i) == len(top.lit) {
			w = m.done(w)
		}
		dst.add(w)
	case fString:
		m.feedString(dst, w, b)
	case fNumber:
		if feedNumber(top, b) {
			dst.add(w)
			return
		}
		if numberCanEnd(*top) {
			m.feed(dst, m.done(w), b)
		}
	case fObject:
		m.feedObject(dst, w, b)
	case fArray:
		m.feedArray(dst, w, b)
	}
}

// begin replaces the pending value on top of w by the value that b starts.
func (m *Matcher) begin(dst *State, w []frame, n *node, b byte) {
	if len(n.anyOf) > 0 {
		for _, alt := range n.anyOf {
			cp := append([]frame(nil), w...)
			cp[len(cp)-1] = frame{kind: fValue, n: alt}
			m.begin(dst, cp, alt, b)
		}
		return
	}
	if len(n.literals) > 0 {
		for _, lit := range n.literals {
			if lit[0] != b {
				continue
			}
			cp := append([]frame(nil), w...)
			cp[len(cp)-1] = frame{kind: fLiteral, n: n, lit: lit, i: 1}
			if len(lit) == 1 {
				cp = m.done(cp)
			}
			dst.add(cp)
		}
		return
	}
	top := &w[len(w)-1]
	switch {
	case b == '{' && n.kinds&kObject != 0:
		*top = frame{kind: fObject, n: n, st: oOpen}
	case b == '[' && n.kinds&kArray != 0:
		*top = frame{kind: fArray, n: n, st: aOpen}
	case b == '"' && n.kinds&kString != 0:
		*top = frame{kind: fString, n: n, st: sBody}
	case (b == '-' || b >= '0' && b <= '9') && n.kinds&(kInteger|kNumber) != 0:
		*top = frame{kind: fNumber, n: n, st: nSign}
		if n.kinds&kNumber == 0 {
			top.flags |= flIntOnly
		}
		if b == '-' {
			top.flags |= flNeg
		} else if !feedNumber(top, b) {
			return
		}
		if !numberFeasible(*top) {
			return
		}
	case b == 't' && n.kinds&kBoolean != 0:
		*top = frame{kind: fLiteral, n: n, lit: "true", i: 1}
	case b == 'f' && n.kinds&kBoolean != 0:
		*top = frame{kind: fLiteral, n: n, lit: "false", i: 1}
	case b == 'n' && n.kinds&kNull != 0:
		*top = frame{kind: fLiteral, n: n, lit: "null", i: 1}
	default:
		return
	}
	dst.add(w)
}

// keyNode is the schema of a map-like object's keys.
var keyNode = &node{kinds: kString, maxLen: -1, maxItems: -1}

// candidates is the range of properties that may come next: from the next
// one up to and including the first required one.
func candidates(n *node, from int32) (int32, int32) {
	hi := from
	for ; int(hi) < len(n.props); hi++ {
		if n.props[hi].required {
			return from, hi + 1
		}
	}
	return from, hi
}

func requiredLeft(n *node, from int32) bool {
	for p := int(from); p < len(n.props); p++ {
		if n.props[p].required {
			return true
		}
	}
	return false
}

func (m *Matcher) feedObject(dst *State, w []frame, b byte) {
	top := &w[len(w)-1]
	n := top.n
	switch top.st {
	case oOpen, oKeyStart, oAfter:
		if isSpace(b) {
			space(dst, w, b)
			return
		}
		switch {
		case b == '"' && top.st != oAfter:
			top.ws = 0
			if !n.hasProps {
				if n.additional == nil {
					return
				}
				top.st = oColon
				dst.add(append(w, frame{kind: fString, n: keyNode, st: sBody}))
				return
			}
			lo, hi := candidates(n, top.i)
			if lo == hi {
				return
			}
			top.st, top.j, top.k = oKey, lo, 1
			dst.add(w)
		case b == '}' && top.st != oKeyStart:
			if n.hasProps && requiredLeft(n, top.i) {
				return
			}
			dst.add(m.done(w))
		case b == ',' && top.st == oAfter:
			if n.hasProps && int(top.i) >= len(n.props) {
				return
			}
			top.st, top.ws = oKeyStart, 0
			dst.add(w)
		}
	case oKey:
		prefix := n.props[top.j].key[:top.k]
		lo, hi := candidates(n, top.i)
		for p := lo; p < hi; p++ {
			key := n.props[p].key
			if len(key) > int(top.k) && key[top.k] == b && key[:top.k] == prefix {
				top.j = p
				top.k++
				if int(top.k) == len(key) {
					top.st, top.i = oColon, p+1
				}
				dst.add(w)
				return
			}
		}
	case oColon:
		if isSpace(b) {
			space(dst, w, b)
			return
		}
		if b != ':' {
			return
		}
		value := n.additional
		if n.hasProps {
			value = n.props[top.j].node
		}
		top.st, top.ws = oAfter, 0
		dst.add(append(w, frame{kind: fValue, n: value}))
	}
}

func (m *Matcher) feedArray(dst *State, w []frame, b byte) {
	top := &w[len(w)-1]
	n := top.n
	if isSpace(b) {
		space(dst, w, b)
		return
	}
	switch {
	case b == ']' && top.st != aNext:
		if top.i < int32(n.minItems) {
			return
		}
		dst.add(m.done(w))
	case b == ',' && top.st == aAfter:
		if n.maxItems >= 0 && top.i >= int32(n.maxItems) {
			return
		}
		top.st, top.ws = aNext, 0
		dst.add(w)
	case top.st == aOpen || top.st == aNext:
		if n.maxItems >= 0 && top.i >= int32(n.maxItems) {
			return
		}
		top.st, top.ws = aAfter, 0
		top.i++
		w = append(w, frame{kind: fValue, n: n.items})
		m.begin(dst, w, n.items, b)
	}
}

func isHex(b byte) bool {
	return b >= '0' && b <= '9' || b >= 'a' && b <= 'f' || b >= 'A' && b <= 'F'
}

func (m *Matcher) feedString(dst *State, w []frame, b byte) {
	top := &w[len(w)-1]
	n := top.n
	room := n.maxLen < 0 || top.i < int32(n.maxLen)
	switch top.st {
	case sBody:
		switch {
		case b == '"':
			if top.i < int32(n.minLen) {
				return
			}
			dst.add(m.done(w))
			return
		case !room || b < 0x20:
			return
		case b == '\\':
			top.st = sEscape
		case b < 0x80:
		case b >= 0xC2 && b <= 0xDF:
			top.st, top.j, top.k = sUTF8, 1, 0x80BF
		case b >= 0xE0 && b <= 0xEF:
			top.st, top.j, top.k = sUTF8, 2, 0x80BF
			if b == 0xE0 {
				top.k = 0xA0BF // no overlong forms
			} else if b == 0xED {
				top.k = 0x809F // no surrogates
			}
		case b >= 0xF0 && b <= 0xF4:
			top.st, top.j, top.k = sUTF8, 3, 0x80BF
			if b == 0xF0 {
				top.k = 0x90BF
			} else if b == 0xF4 {
				top.k = 0x808F
			}
		default:
			return
		}
		top.i++
	case sEscape:
		switch b {
		case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			top.st = sBody
		case 'u':
			top.st, top.j = sHex, 4
			top.flags &^= flLowHex
		default:
			return
		}
	case sHex:
		if !isHex(b) {
			return
		}
		// Escaped surrogates are refused: a lone one is not a character,
		// and a pair would count as one code point where this counts two.
		if top.j == 4 && (b == 'd' || b == 'D') {
			top.flags |= flLowHex
		} else if top.j == 3 && top.flags&flLowHex != 0 && !(b >= '0' && b <= '7') {
			return
		}
		top.j--
		if top.j == 0 {
			top.st = sBody
		}
	case sUTF8:
		if b < byte(top.k>>8) || b > byte(top.k) {
			return
		}
		top.j--
		top.k = 0x80BF
		if top.j == 0 {
			top.st = sBody
		}
	}
	dst.add(w)
}

// Digit limits keep int64 arithmetic exact and stop runaway numbers.
const (
	maxIntDigits  = 16
	maxFracDigits = 20
	maxExpDigits  = 3
)

// feedNumber advances a number by b, reporting whether b continues it (the
// caller checks range feasibility for integers).
func feedNumber(f *frame, b byte) bool {
	digit := b >= '0' && b <= '9'
	intOnly := f.flags&flIntOnly != 0
	old := *f
	switch f.st {
	case nSign:
		if !digit {
			return false
		}
		if b == '0' {
			f.st = nZero
		} else {
			f.st, f.v = nInt, int64(b-'0')
		}
		f.j = 1
	case nZero, nInt:
		switch {
		case digit && f.st == nInt && f.j < maxIntDigits:
			f.v = f.v*10 + int64(b-'0')
			f.j++
		case b == '.' && !intOnly:
			f.st, f.j = nDot, 0
		case (b == 'e' || b == 'E') && !intOnly:
			f.st, f.j = nE, 0
		default:
			return false
		}
	case nDot:
		if !digit {
			return false
		}
		f.st, f.j = nFrac, 1
	case nFrac:
		switch {
		case digit && f.j < maxFracDigits:
			f.j++
		case b == 'e' || b == 'E':
			f.st, f.j = nE, 0
		default:
			return false
		}
	case nE:
		switch {
		case b == '+' || b == '-':
			f.st = nESign
		case digit:
			f.st, f.j = nExp, 1
		default:
			return false
		}
	case nESign:
		if !digit {
			return false
		}
		f.st, f.j = nExp, 1
	case nExp:
		if !digit || f.j >= maxExpDigits {
			return false
		}
		f.j++
	default:
		return false
	}
	if intOnly && !numberFeasible(*f) {
		*f = old
		return false
	}
	return true
}

// numberCanEnd reports whether the number read so far is complete and,
// for an integer, in range.
func numberCanEnd(f frame) bool {
	switch f.st {
	case nZero, nInt:
		if f.flags&flIntOnly != 0 {
			return inRange(f.n, signed(f, f.v))
		}
		return true
	case nFrac, nExp:
		return true
	}
	return false
}

func signed(f frame, mag int64) int64 {
	if f.flags&flNeg != 0 {
		return -mag
	}
	return mag
}

func inRange(n *node, v int64) bool {
	return (!n.hasMin || v >= n.min) && (!n.hasMax || v <= n.max)
}

// numberFeasible reports whether some integer that starts with the digits
// read so far lies in the node's range.
func numberFeasible(f frame) bool {
	n := f.n
	if f.flags&flIntOnly == 0 || !n.hasMin && !n.hasMax {
		return true
	}
	lo, hi := int64(math.MinInt64), int64(math.MaxInt64)
	if n.hasMin {
		lo = n.min
	}
	if n.hasMax {
		hi = n.max
	}
	overlaps := func(a, b int64) bool { // magnitudes [a, b]
		x, y := signed(f, a), signed(f, b)
		if x > y {
			x, y = y, x
		}
		return x <= hi && y >= lo
	}
	switch f.st {
	case nSign:
		return overlaps(0, pow10(maxIntDigits)-1)
	case nZero:
		return overlaps(0, 0)
	case nInt:
		if overlaps(f.v, f.v) {
			return true
		}
		for k := int32(1); f.j+k <= maxIntDigits; k++ {
			p := pow10(int(k))
			if overlaps(f.v*p, f.v*p+p-1) {
				return true
			}
		}
	}
	return false
}

func pow10(k int) int64 {
	p := int64(1)
	for ; k > 0; k-- {
		p *= 10
	}
	return p
}

// Finished reports whether the document is complete and nothing may
// follow it (only the end of text).
func (m *Matcher) Finished(s *State) bool {
	if len(s.starts) == 0 {
		return false
	}
	for k := range s.starts {
		st := s.stack(k)
		if len(st) != 1 || st[0].st != qDone {
			return false
		}
	}
	return true
}
