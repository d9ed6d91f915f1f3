/* One-pass kernels for the CPU hot loops, called from shadowgraft/native.py:
 * the similarity sums of `stats` (sums, sums_files), the plain graft into
 * bf16 (graft) and the fp32 delta `diff` stores (delta).
 *
 * Why C: torch runs a chunk's arithmetic as a dozen separate passes over
 * memory (upcast, subtract, abs, square, sum, ...). Here each element is
 * read once, from the bytes as stored (bf16, fp16, fp32 or fp64), and
 * everything a chunk needs is done in the same pass. The functions release
 * the GIL, so one thread per core runs them at once.
 *
 * Reproducible: the order of every floating-point operation is fixed by
 * this source (LANES independent fp32 accumulators per sum, each flushed
 * every BLOCK elements into its own float64 lane, the lanes added in order
 * at the end), the build forbids contracting a * b + c into a fused
 * multiply-add (-ffp-contract=off), and no flag lets the compiler
 * reassociate; so the vector width that runs them (4 lanes with SSE2 or
 * NEON, 8 with AVX2, 16 with AVX-512) cannot change a bit of the result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define LANES 16 /* part of the results: another count adds in another order */
#define BLOCK 256 /* elements per flush: 32 fp32 additions per lane */

/* Dtype codes shared with native.py. */
enum { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
static const size_t WIDTH[] = {4, 2, 2, 8};

/* Columns of a row of sums, shared with metrics.py (ABS_A ... NEG_DOT). */
enum { ABS_A, ABS_B, ABS_D, N_DIFF, SQ_A, SQ_B, SQ_D, MAX_ABS, SQ_T, NEG_DOT, COLS };

/* One binary, the best instructions the running CPU has (picked at load by an ifunc, hence glibc). GCC 11
 * names the x86-64 levels (v4 is twice as fast here as GCC's plain "avx512f"); clang takes feature names. */
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11
#define CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#elif defined(__x86_64__) && defined(__GLIBC__) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 6)
#define CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define CLONES
#endif

typedef union {
    float f[BLOCK];
    uint32_t u[BLOCK];
} block_t;

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* fp16 to fp32 bits, exact for every code, branch-free (so it vectorizes), and never through an fp32
 * subnormal (a DAZ mode could read one as zero): normals move exponent and mantissa into fp32's places
 * and rebias the exponent; subnormals are their 10-bit integer mantissa times 2^-24; Inf/NaN keep theirs. */
static inline uint32_t f16_bits(uint16_t h) {
    uint32_t e = h & 0x7c00u, m = h & 0x3ffu;
    uint32_t normal = ((uint32_t)(h & 0x7fffu) << 13) + (112u << 23);
    uint32_t mag = e == 0 ? f32_bits((float)m * 0x1p-24f) : e == 0x7c00u ? 0x7f800000u | (m << 13) : normal;
    return ((uint32_t)(h & 0x8000u) << 16) | mag;
}

/* Elements [0, n) of p (n <= BLOCK) as fp32, zero padded to BLOCK: padding adds nothing to any sum.
 * The conversions are torch's: bf16 and fp16 exactly, fp64 rounded to nearest even. */
static inline void load_block(block_t *dst, const void *p, int code, size_t n) {
    if (code == BF16) {
        const uint16_t *s = (const uint16_t *)p;
        for (size_t i = 0; i < n; i++)
            dst->u[i] = (uint32_t)s[i] << 16; /* bf16 is the top half of an fp32 */
    } else if (code == F16) {
        const uint16_t *s = (const uint16_t *)p;
        for (size_t i = 0; i < n; i++)
            dst->u[i] = f16_bits(s[i]);
    } else if (code == F64) {
        const double *s = (const double *)p;
        for (size_t i = 0; i < n; i++)
            dst->f[i] = (float)s[i];
    } else {
        memcpy(dst->f, p, n * sizeof(float));
    }
    for (size_t i = n; i < BLOCK; i++)
        dst->u[i] = 0;
}

static inline const void *advance(const void *p, int code, size_t n) { return (const char *)p + n * WIDTH[code]; }

/* Running sums of one call: LANES fp32 lanes per sum within a BLOCK, LANES float64 lanes across blocks. */
typedef struct {
    double tot[COLS][LANES];
    int64_t n_diff[LANES];
    int32_t mx[LANES]; /* bits of max |A - B| (sign bit clear, so integer order is float order) */
} acc_t;

typedef void (*add_range_fn)(acc_t *, const void *, int, const void *, int, const void *, int, size_t);

/* The sums at each vector width this build has (_sums.h), and the one the running CPU gets. Portable
 * code has 4-wide vectors (SSE2, NEON); on x86-64, GCC 7+ and clang add the AVX2 and AVX-512 ones, the widest
 * the CPU runs picked at import. */
#define W 4
#define SPLIT 1
#define ATTR
#include "_sums.h"
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 7))
#define WIDE_X86 1
#define AVX512 "avx512f,avx512bw,avx512dq,avx512vl" /* the AVX-512 of x86-64-v4 */
#define W 8
#define SPLIT 1
#define ATTR __attribute__((target("avx2")))
#include "_sums.h"
#define W 16
#define SPLIT 0 /* 32 registers hold every accumulator */
#define ATTR __attribute__((target(AVX512)))
#include "_sums.h"
#endif

/* Whether the running CPU has the instructions of each width's sums. */
static int portable(void) { return 1; } /* the 4-wide code runs on every CPU */
#ifdef WIDE_X86
static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

/* The widths this build has, widest first; the sums run at WIDTHS[current]. */
static const struct {
    int w;
    add_range_fn add_range;
    int (*runs)(void);
} WIDTHS[] = {
#ifdef WIDE_X86
    {16, add_range_16, has_avx512},
    {8, add_range_8, has_avx2},
#endif
    {4, add_range_4, portable},
};
#define N_WIDTHS ((int)(sizeof WIDTHS / sizeof WIDTHS[0]))
static int current = N_WIDTHS - 1; /* set at import */

/* The float64 totals of a step into out[0..COLS), as metrics.range_sums reads them. MAX_ABS is
 * max |A - B| for finite inputs; metrics.py recounts everything non-finite itself. */
static void finish(const acc_t *acc, double *out) {
    int32_t mx = 0;
    int64_t nd = 0;
    for (int c = 0; c < COLS; c++) {
        out[c] = 0.0;
        for (int l = 0; l < LANES; l++)
            out[c] += acc->tot[c][l];
    }
    for (int l = 0; l < LANES; l++) {
        mx = acc->mx[l] > mx ? acc->mx[l] : mx;
        nd += acc->n_diff[l];
    }
    float m;
    memcpy(&m, &mx, sizeof m);
    out[N_DIFF] = (double)nd;
    out[MAX_ABS] = m;
}

#define ANY ((1u << F32) | (1u << BF16) | (1u << F16) | (1u << F64))
#define WIDENED ((1u << F32) | (1u << BF16) | (1u << F16)) /* exact in fp32 */
#define HALF ((1u << BF16) | (1u << F16))

/* 1 when each of the k dtype codes is one of `allowed` (a bit per code); else a ValueError naming `what`. */
static int codes_ok(const int *codes, int k, unsigned allowed, const char *what) {
    for (int i = 0; i < k; i++)
        if (codes[i] < F32 || codes[i] > F64 || !(allowed >> codes[i] & 1u)) {
            PyErr_Format(PyExc_ValueError, "%s: dtype code %d is not accepted here", what, codes[i]);
            return 0;
        }
    return 1;
}

/* sums(a, ca, b, cb, t, ct, n, step, out): row i of out (float64, COLS per row) gets the sums over
 * elements [i*step, (i+1)*step). Addresses are integers (torch's data_ptr()); t = 0 for none. */
static PyObject *py_sums(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long a, b, t, out;
    int ca, cb, ct;
    Py_ssize_t n, step;
    if (!PyArg_ParseTuple(args, "KiKiKinnK", &a, &ca, &b, &cb, &t, &ct, &n, &step, &out))
        return NULL;
    if (!codes_ok((int[]){ca, cb, ct}, 3, ANY, "sums"))
        return NULL;
    if (n < 0 || step <= 0 || !a || !b || !out) {
        PyErr_SetString(PyExc_ValueError, "sums: bad length, step or address");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    size_t i = 0;
    for (Py_ssize_t s = 0; s < n; s += step, i++) {
        size_t m = (size_t)(n - s < step ? n - s : step);
        acc_t acc = {0};
        WIDTHS[current].add_range(&acc, advance((const void *)a, ca, s), ca, advance((const void *)b, cb, s), cb,
                  t ? advance((const void *)t, ct, s) : NULL, ct, m);
        finish(&acc, (double *)out + i * COLS);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* fp32 to bf16 as torch rounds it: to nearest even, every NaN to 0xffff. */
static inline uint16_t bf16_round(uint32_t u) {
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? 0xffffu : (uint16_t)r;
}

/* out[i] = bf16(x[i] + alpha * (t[i] - b[i])) over one block of inputs widened to fp32, each operation an IEEE fp32
 * operation in the order fused.py performs them (no fused multiply-add, alpha rounded to fp32, the product
 * skipped for alpha 1), so the bits are the TorchScript kernel's. Returns how many outputs are NaN or Inf. */
static inline __attribute__((always_inline)) int graft_block(const block_t *x, const block_t *b, const block_t *t,
                                                             float alpha, int scaled, uint16_t *out, size_t m) {
    int bad = 0;
    for (size_t i = 0; i < m; i++) {
        float d = b ? t->f[i] - b->f[i] : t->f[i];
        float acc = x->f[i] + (scaled ? d * alpha : d);
        uint16_t o = bf16_round(f32_bits(acc));
        out[i] = o;
        bad += (o & 0x7f80u) == 0x7f80u;
    }
    return bad;
}

CLONES static int64_t graft_range(const void *x, int cx, const void *b, int cb, const void *t, int ct, size_t n,
                                  float alpha, uint16_t *out) {
    block_t xx, bb, tt;
    int64_t bad = 0;
    int scaled = alpha != 1.0f;
    for (size_t s = 0; s < n; s += BLOCK) {
        size_t m = n - s < BLOCK ? n - s : BLOCK;
        load_block(&xx, advance(x, cx, s), cx, m);
        if (b)
            load_block(&bb, advance(b, cb, s), cb, m);
        load_block(&tt, advance(t, ct, s), ct, m);
        bad += graft_block(&xx, b ? &bb : NULL, &tt, alpha, scaled, out + s, m);
    }
    return bad;
}

/* graft(x, cx, b, cb, t, ct, n, alpha, out): the plain graft of n elements into bf16 `out`; b = 0 when `t` is
 * already the change. Inputs bf16, fp16 or fp32, the arithmetic fp32: the engine calls it only where its
 * working dtype is fp32 (16-bit inputs, or an fp32 stored delta of a 16-bit model). Returns the NaN/Inf count. */
static PyObject *py_graft(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, b, t, out;
    int cx, cb, ct;
    Py_ssize_t n;
    double alpha;
    if (!PyArg_ParseTuple(args, "KiKiKindK", &x, &cx, &b, &cb, &t, &ct, &n, &alpha, &out))
        return NULL;
    if (!codes_ok((int[]){cx, b ? cb : BF16, ct}, 3, WIDENED, "graft"))
        return NULL;
    if (n < 0 || !x || !t || !out) {
        PyErr_SetString(PyExc_ValueError, "graft: bad length or address");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS;
    bad = graft_range((const void *)x, cx, b ? (const void *)b : NULL, cb, (const void *)t, ct, (size_t)n, (float)alpha,
                      (uint16_t *)out);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLongLong(bad);
}

/* out[i] = fp32(t[i]) - fp32(b[i]) for 16-bit inputs: the delta `diff` stores for a 16-bit model. One IEEE
 * subtraction, correctly rounded, so the same bits as the exact difference rounded once to fp32 (what the
 * engine's float64 path computes). Returns how many outputs are NaN or Inf. */
CLONES static int64_t delta_range(const void *b, int cb, const void *t, int ct, size_t n, float *out) {
    block_t bb, tt;
    int64_t bad = 0;
    for (size_t s = 0; s < n; s += BLOCK) {
        size_t m = n - s < BLOCK ? n - s : BLOCK;
        load_block(&bb, advance(b, cb, s), cb, m);
        load_block(&tt, advance(t, ct, s), ct, m);
        for (size_t i = 0; i < m; i++) {
            float d = tt.f[i] - bb.f[i];
            out[s + i] = d;
            bad += (f32_bits(d) & 0x7f800000u) == 0x7f800000u;
        }
    }
    return bad;
}

/* delta(b, cb, t, ct, n, out): see delta_range; inputs bf16 or fp16, out fp32. */
static PyObject *py_delta(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long b, t, out;
    int cb, ct;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KiKinK", &b, &cb, &t, &ct, &n, &out))
        return NULL;
    if (!codes_ok((int[]){cb, ct}, 2, HALF, "delta"))
        return NULL;
    if (n < 0 || !b || !t || !out) {
        PyErr_SetString(PyExc_ValueError, "delta: bad length or address");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS;
    bad = delta_range((const void *)b, cb, (const void *)t, ct, (size_t)n, (float *)out);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLongLong(bad);
}

/* Fills buf with len bytes of fd from off: 0, an errno, or -1 where the file ends first. */
static int read_full(int fd, char *buf, size_t len, off_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, off + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

/* sums_files(fa, oa, ca, fb, ob, cb, ft, ot, ct, n, step, out, buf, piece): as sums, reading the inputs
 * from file descriptors at byte offsets, `piece` elements at a time (a multiple of BLOCK) into buf (at
 * least 3 * piece * 8 bytes), so each byte goes from the page cache into cache-sized buffers once and is
 * summed there. Same operations in the same order as sums, so the same bits. ft = -1 for no T.
 * Returns None, or (input index 0/1/2, errno or -1 for end of file) when a read fails. */
static PyObject *py_sums_files(PyObject *self, PyObject *args) {
    (void)self;
    int fd[3], code[3];
    long long off[3];
    Py_ssize_t n, step, piece;
    unsigned long long out, buf;
    if (!PyArg_ParseTuple(args, "iLiiLiiLinnKKn", &fd[0], &off[0], &code[0], &fd[1], &off[1], &code[1], &fd[2],
                          &off[2], &code[2], &n, &step, &out, &buf, &piece))
        return NULL;
    int k = fd[2] >= 0 ? 3 : 2;
    if (!codes_ok(code, k, ANY, "sums_files"))
        return NULL;
    if (n < 0 || step <= 0 || piece <= 0 || piece % BLOCK || !out || !buf) {
        PyErr_SetString(PyExc_ValueError, "sums_files: bad length, step, piece or address");
        return NULL;
    }
    int bad = -1, err = 0;
    Py_BEGIN_ALLOW_THREADS;
    char *p[3];
    for (int i = 0; i < 3; i++)
        p[i] = (char *)buf + (size_t)i * (size_t)piece * 8;
    size_t row = 0;
    for (Py_ssize_t s = 0; s < n && bad < 0; s += step, row++) {
        Py_ssize_t m = n - s < step ? n - s : step;
        acc_t acc = {0};
        for (Py_ssize_t q = 0; q < m && bad < 0; q += piece) {
            size_t c = (size_t)(m - q < piece ? m - q : piece);
            for (int i = 0; i < k && bad < 0; i++) {
                err = read_full(fd[i], p[i], c * WIDTH[code[i]], (off_t)(off[i] + (s + q) * (long long)WIDTH[code[i]]));
                if (err)
                    bad = i;
            }
            if (bad < 0)
                WIDTHS[current].add_range(&acc, p[0], code[0], p[1], code[1], k == 3 ? p[2] : NULL, code[2], c);
        }
        if (bad < 0)
            finish(&acc, (double *)out + row * COLS);
    }
    Py_END_ALLOW_THREADS;
    if (bad >= 0)
        return Py_BuildValue("(ii)", bad, err);
    Py_RETURN_NONE;
}

/* widths(): the vector widths of the sums this CPU runs, the one in use first. */
static PyObject *py_widths(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    PyObject *out = PyList_New(0);
    for (int i = -1; out && i < N_WIDTHS; i++) {
        int k = i < 0 ? current : i;
        if ((i >= 0 && k == current) || !WIDTHS[k].runs())
            continue;
        PyObject *v = PyLong_FromLong(WIDTHS[k].w);
        if (!v || PyList_Append(out, v) < 0)
            Py_CLEAR(out);
        Py_XDECREF(v);
    }
    return out;
}

/* use_width(w): the sums run at width w from now on (one of widths(); for tests, which compare their
 * bits); returns the width used before. Not for use while another thread sums. */
static PyObject *py_use_width(PyObject *self, PyObject *args) {
    (void)self;
    int w, before = WIDTHS[current].w;
    if (!PyArg_ParseTuple(args, "i", &w))
        return NULL;
    for (int k = 0; k < N_WIDTHS; k++)
        if (WIDTHS[k].w == w && WIDTHS[k].runs()) {
            current = k;
            return PyLong_FromLong(before);
        }
    PyErr_Format(PyExc_ValueError, "use_width: width %d does not run here", w);
    return NULL;
}

static PyMethodDef methods[] = {
    {"widths", py_widths, METH_NOARGS, "The vector widths of the sums this CPU runs, the one in use first."},
    {"use_width", py_use_width, METH_VARARGS, "Run the sums at this vector width; returns the previous one."},
    {"sums", py_sums, METH_VARARGS, "Per-step similarity sums of two (or three) arrays in one pass."},
    {"sums_files", py_sums_files, METH_VARARGS, "sums, reading the arrays from files piece by piece."},
    {"graft", py_graft, METH_VARARGS, "The plain graft into bf16 with fp32 arithmetic, in one pass."},
    {"delta", py_delta, METH_VARARGS, "tuned - base of 16-bit inputs into fp32, in one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    for (current = 0; !WIDTHS[current].runs(); current++) /* the widest this CPU runs; the last always does */
        ;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "LANES", LANES) || PyModule_AddIntConstant(m, "BLOCK", BLOCK) ||
              PyModule_AddIntConstant(m, "COLS", COLS))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
