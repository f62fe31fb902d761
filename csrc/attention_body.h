/* The decoding steps' attention of panel_products.c for one instruction set; the includer defines
 * NAME(x), the suffix of this copy's functions. */

/* s[t] = q . k_t for the `length` keys of one item: transposed keys (k_t[d] = keys[d * ld + t]) are
 * read row by row, each row once; key rows (k_t[d] = keys[t * ld + d]) one dot product each. */
static void NAME(scores)(const float *q, long dim, long length, const float *keys, int transposed, long ld,
                         float *s) {
    if (!transposed) {
        for (long t = 0; t < length; ++t) {
            vf acc = (vf){0};
            for (long d = 0; d < dim; d += PANEL) acc += LOAD(q + d) * LOAD(keys + t * ld + d);
            float total = 0;
            for (int j = 0; j < PANEL; ++j) total += acc[j];
            s[t] = total;
        }
        return;
    }
    long whole = length - length % PANEL;
    for (long t = 0; t < length; ++t) s[t] = 0;
    for (long d = 0; d < dim; d += 4) { /* four rows at a time, summed in pairs: fewer roundings of s */
        const float *r0 = keys + d * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        float q0 = q[d], q1 = q[d + 1], q2 = q[d + 2], q3 = q[d + 3];
        for (long t = 0; t < whole; t += PANEL) {
            vf pair = q0 * LOAD(r0 + t) + q1 * LOAD(r1 + t), other = q2 * LOAD(r2 + t) + q3 * LOAD(r3 + t);
            STORE(s + t, LOAD(s + t) + (pair + other));
        }
        for (long t = whole; t < length; ++t) s[t] += (q0 * r0[t] + q1 * r1[t]) + (q2 * r2[t] + q3 * r3[t]);
    }
}

/* s[t] = exp(s[t] - max s) over `length` scores (whose vector tail is padded in place); returns their sum. */
static float NAME(softmax_numerators)(float *s, long length) {
    long padded = (length + PANEL - 1) / PANEL * PANEL;
    float top = s[0];
    for (long t = 1; t < length; ++t) top = s[t] > top ? s[t] : top;
    for (long t = length; t < padded; ++t) s[t] = -__builtin_inff();
    /* exp(x) for x = s - top <= 0: Cephes' expf, a degree-6 polynomial on [-ln2/2, ln2/2] times 2^n;
     * below -87 (and at -inf, the mask's) the result is 0 */
    const vf lowest = (vf){0} - 87.0f, shifter = (vf){0} + 12582912.0f; /* adding 1.5 * 2^23 rounds */
    vf sum = (vf){0};
    for (long t = 0; t < padded; t += PANEL) {
        vf x = LOAD(s + t) - top;
        vi below = x < lowest;
        x = (vf)(((vi)x & ~below) | ((vi)lowest & below));
        vf n = (x * 1.44269504088896341f + shifter) - shifter;
        vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
        vf p = (vf){0} + 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * (r * r) + r + 1.0f;
        vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
        vf e = (vf)((vi)(p * (vf)scale) & ~below);
        STORE(s + t, e);
        sum += e;
    }
    float total = 0;
    for (int j = 0; j < PANEL; ++j) total += sum[j];
    return total;
}

/* out[d] = sum_t p[t] values[t][d] / total, the value rows `dim` floats apart (dim <= MAX_HEAD_DIM). */
static void NAME(weighted_values)(const float *p, float total, long dim, long length, const float *values,
                                  float *out) {
    vf acc[MAX_HEAD_DIM / PANEL];
    long blocks = dim / PANEL;
    for (long b = 0; b < blocks; ++b) acc[b] = (vf){0};
    for (long t = 0; t < length; ++t) {
        float pt = p[t];
        for (long b = 0; b < blocks; ++b) acc[b] += pt * LOAD(values + t * dim + b * PANEL);
    }
    for (long b = 0; b < blocks; ++b) STORE(out + b * PANEL, acc[b] / total);
}

static void NAME(attend)(const struct attention *a, long first, long last, float *s) {
    for (long item = first; item < last; ++item) {
        const float *keys = a->keys + item * a->key_item_stride;
        const float *values = a->values + item * a->value_item_stride;
        const float *mask = a->mask ? a->mask + item / a->n_head * a->mask_row_stride : 0;
        for (long l = 0; l < a->n_queries; ++l) {
            long row = item * a->n_queries + l;
            NAME(scores)(a->q + row * a->dim, a->dim, a->length, keys, a->transposed, a->key_ld, s);
            if (mask)
                for (long t = 0; t < a->length; ++t) s[t] += mask[t];
            float total = NAME(softmax_numerators)(s, a->length);
            NAME(weighted_values)(s, total, a->dim, a->length, values, a->out + row * a->dim);
        }
    }
}
