// Package llama is sbora-serve's LLaMA runtime on ggml: the model definition
// (loaded from GGUF through ollama's fs/ggml and ml/backend/ggml), the
// tokenizer from the GGUF, a slot-based KV cache, and the Engine that runs
// batches in which every sequence may use its own SBoRA/LoRA adapters.
//
// There is one forward pass (Model.forward). Inference feeds it the cached
// attention of this package's Engine; training feeds it full-sequence
// attention and trainable adapter tensors. Adapters enter through the
// Projector interface, called for every projection (q, k, v, o, gate, up,
// down) of every layer.
//
// Hyper-parameter defaults follow llama.cpp, the reference implementation of
// the GGUF format (ollama's own llama model defaults rope.freq_base to 1e5,
// which changes the output of models that omit the key).
package llama
