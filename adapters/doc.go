// Package adapters defines SBoRA and LoRA adapters: the in-memory form, the
// native GGUF file format, llama.cpp LoRA interop, validation against a base
// model, and (in the server) the registry with LRU residency.
//
// SBoRA fixes one LoRA factor to one-hot standard-basis vectors, stored as r
// indices per target module:
//
//	FA: A is r one-hot rows (input columns Index), B (out×r) trains:
//	    h = W0·x + s·B·x[Index]      (ΔW touches r columns)
//	FB: B is r one-hot columns (output rows Index), A (r×in) trains:
//	    h = W0·x;  h[Index] += s·A·x (ΔW touches r rows)
//
// with s = alpha/r. Plain LoRA (h = W0·x + s·B·A·x) shares the same types so
// the engine can serve all three side by side.
//
// # Native file format (GGUF)
//
// Metadata: general.type = "adapter", general.architecture = the base's
// architecture, general.name, adapter.type = "sbora" | "lora",
// adapter.sbora.variant = "fa" | "fb", adapter.rank, adapter.lora.alpha,
// adapter.targets (short module names), adapter.base.fingerprint.
// Tensors per target module, named after the base weight W (e.g.
// "blk.3.attn_q.weight"), shapes in ggml order (row length first):
//
//	FA:   W.sbora_idx I32 [r]   W.sbora_b F32|F16 [r, out]   (PyTorch B: out×r)
//	FB:   W.sbora_idx I32 [r]   W.sbora_a F32|F16 [in, r]    (PyTorch A: r×in)
//	LoRA: W.lora_a F32|F16 [in, r]   W.lora_b F32|F16 [r, out]
//
// The LoRA layout is exactly llama.cpp's, so a LoRA written here loads in
// llama.cpp and ollama, and llama.cpp LoRA files load here.
package adapters
