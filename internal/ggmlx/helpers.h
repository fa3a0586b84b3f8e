#include "ggml.h"
static inline void ggml_dequantize_row(ggml_to_float_t f, const void *x, float *y, int64_t n) { f(x, y, n); }
