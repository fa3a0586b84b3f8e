// Package jinja is a Jinja2 template engine for chat templates: the
// subset of Jinja that Hugging Face chat templates use, rendering as
// Python's jinja2 does (whitespace control, trim_blocks and lstrip_blocks,
// loop controls, filters, tests, methods of Python strings, lists and
// dicts, Python's printing of values).
//
// It is vendored from github.com/ardanlabs/jinja v1.8.0 (Apache License
// 2.0, see LICENSE) and changed here to match python3-jinja2 on the
// shared templates: tojson prints like Python's json.dumps (key order kept,
// indent, no HTML escaping, floats as Python writes them), strings print
// with Python's escaping and repr, None prints as "None", integral floats
// keep their ".0". The oracle tests are llama's TestChatTemplatesMatchJinja2.
package jinja
