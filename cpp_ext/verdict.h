/* The arithmetic both the Python-facing helpers and the native decode loop use. */
#ifndef SAFECHAT_VERDICT_H
#define SAFECHAT_VERDICT_H
#include <math.h>
#include <string.h>

/* softmax([row[safe], row[unsafe]])[1], computed stably; NaN in, NaN out. */
static inline double p_unsafe_from(const float *row, long safe_id, long unsafe_id) {
    double d = (double)row[unsafe_id] - (double)row[safe_id];
    if (isnan(d)) return NAN;
    if (d >= 0) return 1.0 / (1.0 + exp(-d));
    double e = exp(d);
    return e / (1.0 + e);
}

/* (entropy in nats, top-1 minus top-2 probability) of softmax(row) without the excluded ids. */
static inline void row_stats_from(const float *row, long n, const long *ex, int n_ex,
                                  double *entropy, double *margin) {
    double m1 = -INFINITY, m2 = -INFINITY;
    for (long i = 0; i < n; i++) {
        int skip = 0;
        for (int j = 0; j < n_ex; j++) skip |= (ex[j] == i);
        if (skip) continue;
        double v = row[i];
        if (v > m1) { m2 = m1; m1 = v; } else if (v > m2) { m2 = v; }
    }
    double z = 0.0, ez = 0.0;
    for (long i = 0; i < n; i++) {
        int skip = 0;
        for (int j = 0; j < n_ex; j++) skip |= (ex[j] == i);
        if (skip) continue;
        double d = (double)row[i] - m1;
        double e = exp(d);
        z += e;
        ez += e * d;
    }
    *entropy = log(z) - ez / z;              /* log z - E[d] */
    *margin = (1.0 - exp(m2 - m1)) / z;      /* p1 - p2 */
}

/* log softmax(row)[token] without the excluded ids (-inf when token is excluded; NaN in, NaN out): the
   log-probability of a prompt token, for the prompt surprisal rule (runtime/surprisal.py). One pass for the
   maximum, one for the sum; the excluded ids (at most 64) are sorted once so each pass skips them in step. */
static inline double logprob_from(const float *row, long n, const long *ex, int n_ex, long token) {
    long sx[64];
    int k = 0;
    for (int j = 0; j < n_ex && k < 64; j++) {  /* insertion sort, duplicates dropped */
        long v = ex[j];
        if (v == token) return -INFINITY;
        int at = k;
        while (at > 0 && sx[at - 1] > v) at--;
        if (at > 0 && sx[at - 1] == v) continue;
        memmove(sx + at + 1, sx + at, (size_t)(k - at) * sizeof(long));
        sx[at] = v;
        k++;
    }
    double m = -INFINITY;
    int nan = 0;
    for (long i = 0, j = 0; i < n; i++) {
        if (j < k && sx[j] == i) { j++; continue; }
        double v = row[i];
        if (isnan(v)) nan = 1;
        if (v > m) m = v;
    }
    if (nan || !isfinite(m)) return NAN;
    double z = 0.0;
    for (long i = 0, j = 0; i < n; i++) {
        if (j < k && sx[j] == i) { j++; continue; }
        z += exp((double)row[i] - m);
    }
    return (double)row[token] - m - log(z);
}

#endif
