// Package ggmlx reaches the parts of ggml that ollama's ml interface does not
// expose: raw tensor reads and writes at an offset, quantization, the
// scheduler's graph capacity, weight repacking, threadpools, and (for
// training) autodiff; and it adds CPU ops of sbora-serve's own: the fused
// adapter ops and paged attention (attention read through KV block tables).
//
// It links against the ggml that github.com/ollama/ollama/ml/backend/ggml
// compiles, so there is exactly one ggml in the binary. Access to the
// backend's unexported fields goes through offsets that reflect discovers
// at start-up and checks by name and type, so an ollama upgrade that changes
// the layout fails loudly at init instead of corrupting memory. The pinned
// version is v0.17.4.
//
// Build note: cgo needs ggml's headers on the include path; the Makefile
// sets CGO_CPPFLAGS to the module's ml/backend/ggml/ggml/include.
package ggmlx
