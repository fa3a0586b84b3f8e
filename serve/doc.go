// Package serve is sbora-serve's HTTP server: an OpenAI-compatible API
// (chat and text completions, streaming or not, models list) over one base
// model and any number of registered adapters, an adapter admin API
// (register, upload, list, delete, plus vLLM's load/unload aliases),
// /health and Prometheus /metrics.
//
// Requests flow from the HTTP handlers to a single scheduler goroutine that
// owns the engine. Each step it admits waiting requests into free KV slots
// (making their adapters resident, loading files in the background), gives
// every decoding sequence one token, spends a bounded prefill budget on
// prompts, runs one batched forward pass in which every sequence may use
// different adapters, samples, and streams text back. A client that goes
// away is dropped at the next step and its slot and adapter pins freed.
package serve
