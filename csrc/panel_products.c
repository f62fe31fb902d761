/* Products of a few rows by a weight matrix copied into panels (whisper_mlx/.../panels.py): the decoding
 * steps' linear layers and logits, which a BLAS computes well below the speed of reading the weights
 * on some CPUs (docs/performance.md); here each panel is read once per MAX_ROWS rows. And the decoding
 * steps' attention (a few queries per window and head), one pass over the keys and one over the values,
 * where numpy's and the BLAS's calls per step cost more than reading the cache.
 *
 * Loaded with ctypes (no Python API). x86-64 builds by GCC carry an AVX-512, an AVX2 and a baseline
 * copy of the kernels, chosen at run time by the CPU's features; other builds the baseline copy (the
 * compiler's vectors for its default target, NEON on arm64). */

#include <stdlib.h>

#define PANEL 16 /* floats of one weight panel: its 16 output columns side by side */
typedef float vf __attribute__((vector_size(PANEL * sizeof(float))));
#define LOAD(p) ({ vf v_; __builtin_memcpy(&v_, (p), sizeof v_); v_; })
#define STORE(p, v) do { vf v_ = (v); __builtin_memcpy((p), &v_, sizeof v_); } while (0)
typedef int vi __attribute__((vector_size(PANEL * sizeof(int))));

#define MAX_HEAD_DIM 128 /* Whisper's heads have 64 dimensions */

/* softmax(q kᵀ + mask) v for items (a window's head) of n_queries queries each, as kernels.attend lays
 * them out: q and out (items, n_queries, dim); keys transposed (item, d, t) at
 * keys[item * key_item_stride + d * key_ld + t], or as rows (item, t, d) at [... + t * key_ld + d];
 * values (item, t, d) at values[item * value_item_stride + t * dim + d]; mask, additive, (length) per
 * window (item / n_head) mask_row_stride apart, or null. */
struct attention {
    const float *q;
    const float *keys;
    const float *values;
    const float *mask;
    float *out;
    long n_head, n_queries, dim, length;
    long key_item_stride, key_ld, value_item_stride, mask_row_stride;
    long transposed;
};

/* GCC on x86-64 compiles a copy of the kernels per instruction set (its target pragmas) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COPIES_PER_INSTRUCTION_SET 1
#else
#define COPIES_PER_INSTRUCTION_SET 0
#endif

#if COPIES_PER_INSTRUCTION_SET
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define NAME(x) x##_avx512
#define PANELS_PER_BLOCK 2
#define MAX_ROWS 12
#include "panel_body.h"
#include "attention_body.h"
#undef NAME
#undef PANELS_PER_BLOCK
#undef MAX_ROWS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAME(x) x##_avx2
#define PANELS_PER_BLOCK 1
#define MAX_ROWS 6
#include "panel_body.h"
#include "attention_body.h"
#undef NAME
#undef PANELS_PER_BLOCK
#undef MAX_ROWS
#pragma GCC pop_options
#endif

#define NAME(x) x##_base
#define PANELS_PER_BLOCK 1
#define MAX_ROWS 6
#include "panel_body.h"
#include "attention_body.h"
#undef NAME
#undef PANELS_PER_BLOCK
#undef MAX_ROWS

enum { BASELINE, AVX2, AVX512 };
static int level = -1; /* the instruction set in use; -1 until chosen */

static int best_level(void) {
#if COPIES_PER_INSTRUCTION_SET
    if (__builtin_cpu_supports("avx512f")) return AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
    return BASELINE;
}

/* Use the kernels of `wanted` (0 baseline, 1 AVX2, 2 AVX-512), or of the best instruction set this
 * CPU has when it lacks that one or `wanted` is negative; returns the level in use. */
int use_instruction_set(int wanted) {
    int best = best_level();
    level = wanted < 0 || wanted > best ? best : wanted;
    return level;
}

static int current_level(void) { return level < 0 ? use_instruction_set(-1) : level; }

/* The level in use (chosen on first use when no caller chose it). */
int instruction_set(void) { return current_level(); }

/* Panels per block of the kernels in use: the panel ranges given to panel_product start at
 * multiples of it (panels.py pads the panels to a multiple of 2). */
int panels_per_block(void) { return current_level() == AVX512 ? 2 : 1; }

/* out[r][c] = sum_k x[r][k] w[c][k] (+ bias[c]) for rows r < rows and the columns of panels
 * [first, last) below width; the weights w (width, k_len) are in panels: panels[p][k][j] =
 * w[p * PANEL + j][k], zero past width. */
void panel_product(const float *x, long rows, long k_len, long ldx, const float *panels, long width, long first,
                   long last, const float *bias, float *out, long ldo) {
    switch (current_level()) {
#if COPIES_PER_INSTRUCTION_SET
    case AVX512: panel_product_avx512(x, rows, k_len, ldx, panels, width, first, last, bias, out, ldo); return;
    case AVX2: panel_product_avx2(x, rows, k_len, ldx, panels, width, first, last, bias, out, ldo); return;
#endif
    default: panel_product_base(x, rows, k_len, ldx, panels, width, first, last, bias, out, ldo);
    }
}

/* The attention of items [first, last) (see struct attention); dim must be a multiple of 16 up to
 * MAX_HEAD_DIM. Returns 0, or -1 when out of memory (nothing written). */
int attend_step(const struct attention *a, long first, long last) {
    float *s = malloc(sizeof(float) * (size_t)((a->length + PANEL - 1) / PANEL * PANEL));
    if (!s) return -1;
    switch (current_level()) {
#if COPIES_PER_INSTRUCTION_SET
    case AVX512: attend_avx512(a, first, last, s); break;
    case AVX2: attend_avx2(a, first, last, s); break;
#endif
    default: attend_base(a, first, last, s);
    }
    free(s);
    return 0;
}
