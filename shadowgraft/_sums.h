/* The similarity sums at one vector width, included by _native.c once per width it builds, with
 *   W      fp32 elements per vector (4, 8 or 16),
 *   SPLIT  1 to take a block's sums in two passes over it (fewer live accumulators; for targets with
 *          16 vector registers), 0 for one pass,
 *   ATTR   the function attribute that selects the target's instructions (or nothing).
 * Defines add_range_W. Every width performs the same fp32 operations on the same lanes in the same
 * order (a sum's LANES lanes are K = LANES / W vectors, vector k holding lanes [k*W, (k+1)*W)), so
 * every width gives the same bits; test_native.py checks that for each width the running CPU has. */

#define CAT_(x, y) x##y
#define CAT(x, y) CAT_(x, y)
#define VF CAT(vf, W)
#define VI CAT(vi, W)
#define VU CAT(vu, W)
#define VD CAT(vd, W)
#define VL CAT(vl, W)
#define K (LANES / W)

typedef float VF __attribute__((vector_size(W * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t VU __attribute__((vector_size(W * sizeof(uint32_t))));
typedef double VD __attribute__((vector_size(W * sizeof(double))));
typedef int64_t VL __attribute__((vector_size(W * sizeof(int64_t))));

static inline __attribute__((always_inline)) VF CAT(load, W)(const float *p) {
    VF v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* One BLOCK of fp32 A, B (and T) added to `acc`: the one place the sums are taken. The count of
 * differences and the max work on the bits of |A - B| (sign bit clear, so integer order is float order),
 * which no floating-point mode (denormals as zero) can change. */
static inline __attribute__((always_inline)) void CAT(block, W)(const float *a, const float *b, const float *t,
                                                                acc_t *acc) {
    /* |A|, |B|, |A-B|, A^2, B^2, (A-B)^2, (T-A)^2, <T-A, A-B>, in the order of `col` below */
    VF s[8][K] = {{{0}}};
    VI nd[K] = {{0}}, mx[K];
    memcpy(mx, acc->mx, sizeof mx);
    /* SPLIT: the absolute values in a first pass over the block, the squares in a second (it is in L1) */
#pragma GCC unroll 2 /* a pass loop in the code would keep the body of both passes in each */
    for (int pass = 0; pass <= SPLIT; pass++)
        for (size_t j = 0; j < BLOCK; j += LANES)
            for (int k = 0; k < K; k++) {
                VF x = CAT(load, W)(a + j + k * W), y = CAT(load, W)(b + j + k * W), d = x - y;
                if (pass == 0) {
                    VI bits = (VI)d & 0x7fffffff;
                    s[0][k] += (VF)((VI)x & 0x7fffffff);
                    s[1][k] += (VF)((VI)y & 0x7fffffff);
                    s[2][k] += (VF)bits;
                    nd[k] += (VI)((0u - (VU)bits) >> 31); /* 1 where d != 0 (NaN too, as d != 0 says) */
                    VI gt = bits > mx[k];
                    mx[k] = (bits & gt) | (mx[k] & ~gt);
                }
                if (pass == SPLIT) {
                    s[3][k] += x * x;
                    s[4][k] += y * y;
                    s[5][k] += d * d;
                    if (t) {
                        VF e = CAT(load, W)(t + j + k * W) - x;
                        s[6][k] += e * e;
                        s[7][k] += e * d; /* <T - A, A - B> = -<T - A, B - A> */
                    }
                }
            }
    static const int col[8] = {ABS_A, ABS_B, ABS_D, SQ_A, SQ_B, SQ_D, SQ_T, NEG_DOT};
    memcpy(acc->mx, mx, sizeof mx);
    for (int k = 0; k < K; k++) {
        for (int c = 0; c < 8; c++) {
            VD tot;
            memcpy(&tot, &acc->tot[col[c]][k * W], sizeof tot);
            tot += __builtin_convertvector(s[c][k], VD);
            memcpy(&acc->tot[col[c]][k * W], &tot, sizeof tot);
        }
        VL n;
        memcpy(&n, &acc->n_diff[k * W], sizeof n);
        n += __builtin_convertvector(nd[k], VL);
        memcpy(&acc->n_diff[k * W], &n, sizeof n);
    }
}

/* Adds elements [0, n) of A, B (and T) to `acc`. fp32 inputs are read in place; other dtypes, mixed
 * ones, and a last partial block are first converted into fp32 blocks in L1 (zero padded: padding adds
 * nothing to any sum; converting a block apart measured faster for bf16 than widening in registers).
 * Both routes perform the same fp32 operations on the same values, so they give the same bits. Only
 * the last call of a step may pass n that is not a multiple of BLOCK. */
ATTR static void CAT(add_range_, W)(acc_t *acc, const void *a, int ca, const void *b, int cb, const void *t, int ct,
                                    size_t n) {
    block_t xa, xb, xt;
    int same = ca == cb && (!t || ct == ca) ? ca : -1;
    size_t s = 0;
    if (same == F32)
        for (; s + BLOCK <= n; s += BLOCK)
            CAT(block, W)((const float *)a + s, (const float *)b + s, t ? (const float *)t + s : NULL, acc);
    for (; s < n; s += BLOCK) {
        size_t m = n - s < BLOCK ? n - s : BLOCK;
        load_block(&xa, advance(a, ca, s), ca, m);
        load_block(&xb, advance(b, cb, s), cb, m);
        if (t)
            load_block(&xt, advance(t, ct, s), ct, m);
        CAT(block, W)(xa.f, xb.f, t ? xt.f : NULL, acc);
    }
}

#undef K
#undef VL
#undef VD
#undef VU
#undef VI
#undef VF
#undef CAT
#undef CAT_
#undef W
#undef SPLIT
#undef ATTR
