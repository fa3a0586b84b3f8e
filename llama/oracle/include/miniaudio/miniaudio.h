/*
 * Stand-in for miniaudio.h, which the Go module zip of ollama omits (module zips drop vendor/).
 * llama.cpp's mtmd-helper.cpp only uses miniaudio to decode audio input; sbora-serve uses the
 * llama.cpp C API solely as a numeric oracle for text models, so every call reports failure.
 */
#ifndef SBORA_MINIAUDIO_STUB_H
#define SBORA_MINIAUDIO_STUB_H

#include <stddef.h>
#include <stdint.h>

#ifndef MA_API
#define MA_API static
#endif

typedef int ma_result;
typedef uint32_t ma_uint32;
typedef uint64_t ma_uint64;
#define MA_SUCCESS 0
#define MA_NOT_IMPLEMENTED -29

typedef enum { ma_format_unknown = 0, ma_format_f32 = 5 } ma_format;
typedef enum { ma_encoding_format_unknown = 0, ma_encoding_format_wav } ma_encoding_format;

typedef struct { ma_format format; ma_uint32 channels; ma_uint32 sampleRate; } ma_decoder_config;
typedef struct { int unused; } ma_decoder;
typedef struct { ma_encoding_format encodingFormat; ma_format format; ma_uint32 channels; ma_uint32 sampleRate; } ma_encoder_config;
typedef struct { int unused; } ma_encoder;

static inline ma_decoder_config ma_decoder_config_init(ma_format f, ma_uint32 ch, ma_uint32 sr) {
    ma_decoder_config c; c.format = f; c.channels = ch; c.sampleRate = sr; return c;
}
static inline ma_result ma_decoder_init_memory(const void *d, size_t n, const ma_decoder_config *c, ma_decoder *dec) {
    (void)d; (void)n; (void)c; (void)dec; return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_decoder_get_length_in_pcm_frames(ma_decoder *d, ma_uint64 *n) {
    (void)d; *n = 0; return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_decoder_read_pcm_frames(ma_decoder *d, void *o, ma_uint64 n, ma_uint64 *r) {
    (void)d; (void)o; (void)n; *r = 0; return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_decoder_uninit(ma_decoder *d) { (void)d; return MA_SUCCESS; }

static inline ma_encoder_config ma_encoder_config_init(ma_encoding_format e, ma_format f, ma_uint32 ch, ma_uint32 sr) {
    ma_encoder_config c; c.encodingFormat = e; c.format = f; c.channels = ch; c.sampleRate = sr; return c;
}
static inline ma_result ma_encoder_init_file(const char *p, const ma_encoder_config *c, ma_encoder *e) {
    (void)p; (void)c; (void)e; return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_encoder_write_pcm_frames(ma_encoder *e, const void *f, ma_uint64 n, ma_uint64 *w) {
    (void)e; (void)f; (void)n; if (w) *w = 0; return MA_NOT_IMPLEMENTED;
}
static inline void ma_encoder_uninit(ma_encoder *e) { (void)e; }

#endif
