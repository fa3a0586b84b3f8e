// Package modelfile writes LLaMA GGUF files: quantized copies of a model,
// copies with adapters merged into the weights, and random-weight models of
// any shape (for benchmarks at realistic sizes without downloading one).
//
// Every writer streams tensor by tensor and writes atomically.
package modelfile
