// Package kernels holds the SBoRA ops: device-resident adapter banks and the
// per-token routing that lets one batch carry tokens of many adapters.
//
// A Bank keeps, per variant and per target module, one stacked tensor whose
// slices ("slots") are the resident adapters, padded to the bank's maximum
// rank; slot 0 is an all-zero adapter. A step routes every token to up to
// MaxCompose adapters (slot ids plus per-token scales) and the ops run on
// device with no per-token host loops:
//
//	FA:   xg = x[idx_slot]       get_rows on a [1, in, T] view of x
//	      y  = B_slot · xg       mul_mat_id over the stacked B
//	      h += Σ scale · y
//	FB:   y  = A_slot · x        mul_mat_id over the stacked A
//	      h[idx_slot] += scale·y gather, add, set_rows (one adapter at a time,
//	                             so composed adapters may share rows)
//	LoRA: h += Σ scale · B_slot·(A_slot·x)
//
// Per step the ops use only the first r columns of each stack, where r is
// the largest rank among the adapters the step uses, so small-rank adapters
// do not pay for the bank's maximum rank.
package kernels
