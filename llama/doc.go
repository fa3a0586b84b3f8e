// Package llama is sbora-serve's LLaMA runtime on ggml: the model definition
// (loaded from GGUF through ollama's fs/ggml and ml/backend/ggml), the
// tokenizer from the GGUF, the paged KV pool (fixed-size blocks shared by all
// sequences, with prefix caching), and the Engine that runs batches in which
// every sequence may use its own SBoRA/LoRA adapters.
//
// There is one forward pass (Model.Transformer). Inference feeds it the
// pool's attention — read in place through block tables on the CPU
// (ggmlx.PagedAttention, ggml's flash-attention arithmetic), gathered for
// ggml's flash attention on a GPU; training feeds it full-sequence
// attention and trainable adapter tensors. Adapters enter through the
// Projector interface, called for every projection (q, k, v, o, gate, up,
// down) of every layer.
//
// Hyper-parameter defaults follow llama.cpp, the reference implementation of
// the GGUF format (ollama's own llama model defaults rope.freq_base to 1e5,
// which changes the output of models that omit the key).
package llama
