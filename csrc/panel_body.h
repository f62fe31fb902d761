/* The kernels of panel_products.c for one instruction set. The includer defines NAME(x) (the suffix
 * of this copy's functions), PANELS_PER_BLOCK and MAX_ROWS: a block's accumulators, MAX_ROWS rows by
 * PANELS_PER_BLOCK panels of PANEL floats, must fit in this instruction set's vector registers. */

/* The block of `R` rows by PANELS_PER_BLOCK panels: out[r][c] = sum over k of x[r][k] w[c][k], one
 * fused multiply-add per k in ascending order, so a row's result is the same bits whatever the rows
 * beside it and whichever block of columns a thread computes. */
#define ROWS_BLOCK(R)                                                                                  \
    static void NAME(rows_##R)(const float *x, long ldx, long k_len, const float *panels, float *out,   \
                               long ldo) {                                                             \
        vf acc[R][PANELS_PER_BLOCK];                                                                   \
        for (int r = 0; r < R; ++r)                                                                    \
            for (int q = 0; q < PANELS_PER_BLOCK; ++q) acc[r][q] = (vf){0};                            \
        for (long k = 0; k < k_len; ++k) {                                                             \
            vf w[PANELS_PER_BLOCK];                                                                    \
            for (int q = 0; q < PANELS_PER_BLOCK; ++q) w[q] = LOAD(panels + (q * k_len + k) * PANEL);  \
            for (int r = 0; r < R; ++r) {                                                              \
                float s = x[r * ldx + k];                                                              \
                for (int q = 0; q < PANELS_PER_BLOCK; ++q) acc[r][q] += s * w[q];                      \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; ++r)                                                                    \
            for (int q = 0; q < PANELS_PER_BLOCK; ++q) STORE(out + r * ldo + q * PANEL, acc[r][q]);    \
    }

ROWS_BLOCK(1)
ROWS_BLOCK(2)
ROWS_BLOCK(3)
ROWS_BLOCK(4)
ROWS_BLOCK(5)
ROWS_BLOCK(6)
#if MAX_ROWS > 6
ROWS_BLOCK(7)
ROWS_BLOCK(8)
ROWS_BLOCK(9)
ROWS_BLOCK(10)
ROWS_BLOCK(11)
ROWS_BLOCK(12)
#endif
#undef ROWS_BLOCK

/* The block kernels by their row count (entry 0 unused). */
static void (*const NAME(rows_blocks)[MAX_ROWS + 1])(const float *, long, long, const float *, float *, long) = {
    0, NAME(rows_1), NAME(rows_2), NAME(rows_3), NAME(rows_4), NAME(rows_5), NAME(rows_6),
#if MAX_ROWS > 6
    NAME(rows_7), NAME(rows_8), NAME(rows_9), NAME(rows_10), NAME(rows_11), NAME(rows_12),
#endif
};

static void NAME(panel_product)(const float *x, long rows, long k_len, long ldx, const float *panels, long width,
                                long first, long last, const float *bias, float *out, long ldo) {
    float spill[MAX_ROWS * PANELS_PER_BLOCK * PANEL]; /* a block that reaches past `width` */
    const long block_width = PANELS_PER_BLOCK * PANEL;
    /* rows inside panels: a block of panels (24-48 KB for tiny.en) stays in cache for all the rows */
    for (long p = first; p < last && p * PANEL < width; p += PANELS_PER_BLOCK) { /* (past width: padding) */
        long column = p * PANEL, columns = width - column < block_width ? width - column : block_width;
        for (long m = 0; m < rows; m += MAX_ROWS) {
            long r_len = rows - m < MAX_ROWS ? rows - m : MAX_ROWS;
            float *dst = columns == block_width ? out + m * ldo + column : spill;
            long ld = columns == block_width ? ldo : block_width;
            NAME(rows_blocks)[r_len](x + m * ldx, ldx, k_len, panels + p * k_len * PANEL, dst, ld);
            for (long r = 0; r < r_len; ++r) {
                float *row = out + (m + r) * ldo + column;
                if (dst == spill) __builtin_memcpy(row, spill + r * block_width, columns * sizeof(float));
                if (bias)
                    for (long c = 0; c < columns; ++c) row[c] += bias[column + c];
            }
        }
    }
}
