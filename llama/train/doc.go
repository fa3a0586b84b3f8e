// Package train fine-tunes SBoRA (FA, FB) and LoRA adapters on a frozen,
// possibly quantized base model, on the same ggml backend that serves them
// (QSBoRA when the base is quantized).
//
// Each step builds the model's one forward pass (llama.Model.Transformer)
// with full-sequence causal attention (ggml cannot differentiate flash
// attention) and a Projector that adds the trainable adapter terms as dense
// matrix products (the fixed one-hot factor written out: ggml cannot
// differentiate mul_mat_id or set_rows), takes the cross-entropy over the
// completion tokens, and lets ggml's autodiff produce the gradients of the
// adapter matrices. AdamW, warmup and the learning-rate schedule, gradient
// clipping and accumulation run on the host, in the exact order that makes
// an interrupted-and-resumed run reproduce an uninterrupted one.
package train
