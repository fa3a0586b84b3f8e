// Package gguf reads and writes GGUF files: the container of base models,
// SBoRA adapters and llama.cpp LoRA adapters.
//
// The reader is hardened for untrusted input (adapters arrive over HTTP):
// every count and length is checked against the bytes that remain in the
// file before anything is allocated, so a corrupt or hostile file yields an
// error, never a panic or a giant allocation. The writer is atomic: it
// writes a temporary file in the destination directory, fsyncs it and
// renames it into place, so readers never see a half-written file.
//
// ollama's fs/ggml decoder is still what the ggml backend uses to load base
// models; this package exists because adapters need the hardened reader and
// the tools (quantize, merge, random models) need a writer with full control
// over tensor order and data.
package gguf
