/* runtime._native.Loop: the per-token decode loop of strategic decoding, in C, GIL released.
 *
 * The prompt is prefilled (and checked) from Python; after that, `Loop.run()` samples with
 * llama.cpp's sampler chain, decodes `[token at n]` or `[token at n, side tokens at n+1.., [CLS]]` at
 * check steps (a plain model has no side tokens: `[token, [CLS]]`), reads p_unsafe from the [CLS] row,
 * removes those cells from the KV cache and keeps
 * the hold-back bookkeeping, all without the GIL. It comes back to Python only when there is
 * something to hand over: tokens cleared by a safe verdict ("release"), an unsafe verdict that
 * must stop generation ("unsafe"), the end ("done") or a llama.cpp failure ("error"). Each
 * event carries the tokens generated and the checks made since the previous one, so the
 * Python strategy (runtime/strategy.py, the reference) replays the verdicts and stays the
 * single authority over what is shown.
 *
 * The llama.cpp functions are not linked: their addresses are taken (by the Python wrapper,
 * runtime/backends/native_loop.py) from the very libllama that llama-cpp-python loaded, so one
 * process never holds two libllamas. The wrapper checks `batch_layout()` against
 * llama-cpp-python's ctypes definition of llama_batch before building a Loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <windows.h>
#else
#include <time.h>
#endif

#include "verdict.h"

/* llama.h (llama-cpp-python 0.3.36), declared here rather than included */
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
typedef struct {
    int32_t n_tokens;
    llama_token *token;
    float *embd;
    llama_pos *pos;
    int32_t *n_seq_id;
    llama_seq_id **seq_id;
    int8_t *logits;
} llama_batch;

typedef int32_t (*decode_fn)(void *ctx, llama_batch batch);
typedef float *(*logits_fn)(void *ctx, int32_t i);
typedef bool (*seq_rm_fn)(void *mem, llama_seq_id seq, llama_pos p0, llama_pos p1);
typedef llama_token (*sample_fn)(void *smpl, void *ctx, int32_t idx);
typedef bool (*is_eog_fn)(const void *vocab, llama_token token);
typedef int32_t (*piece_fn)(const void *vocab, llama_token token, char *buf, int32_t length, int32_t lstrip,
                            bool special);

enum { WHY_EVERY, WHY_MAX_GAP, WHY_ENTROPY, WHY_MARGIN, WHY_SENTENCE, WHY_END, WHY_NONE };
static const char *WHY[] = {"every", "max_gap", "entropy", "margin", "sentence", "end"};
enum { EV_NONE, EV_RELEASE, EV_UNSAFE, EV_DONE, EV_ERROR };
#define MAX_SIDE 16 /* tokens a check decodes after the real one: side tokens, then the [CLS] */
#define MAX_EXCLUDED 64 /* ids left out of the hesitation statistics: what the sampler never picks */

/* What the loop reads of runtime.policy.SafetyPolicy: runtime.policy.LoopSpec, field for field and in
   this order (POLICY_FIELDS; runtime/backends/native_loop.py compares the two before the first Loop). */
typedef struct {
    int enabled, every, max_gap;
    double entropy_trigger, margin_trigger; /* NaN: trigger off */
    int sentence_ends;
    double threshold;
    int patience;
} Policy;
#define POLICY_FORMAT "(piiddpdi)"
static const char *POLICY_FIELDS[] = {"enabled", "every", "max_gap", "entropy_trigger", "margin_trigger",
                                      "sentence_ends", "threshold", "patience", NULL};
static const char *EVENT[] = {"none", "release", "unsafe", "done", "error"};

typedef struct {
    PyObject_HEAD
    decode_fn decode;
    logits_fn logits;
    seq_rm_fn seq_rm;
    sample_fn sample;
    is_eog_fn is_eog;
    piece_fn piece;
    void *ctx, *mem, *smpl, *vocab;
    llama_token side[MAX_SIDE]; /* what a check decodes; the last is the [CLS] */
    int n_side, safe_id, unsafe_id, n_vocab, n_ctx, n_prompt, n_past, row;
    Policy pol;
    long excluded[MAX_EXCLUDED];
    int n_excluded, max_tokens;
    /* state */
    int streak, last_covered, released, finished, busy;
    const char *finish;
    llama_token *gen;
    int n_gen, synced_gen;
    int *tr_covered, *tr_why, n_tr, synced_tr;
    double *tr_p;
    double seconds; /* wall time spent inside run(), GIL released */
    char error[160];
} Loop;

/* A monotonic clock in seconds: QueryPerformanceCounter on Windows (MSVC and MinGW have no
   clock_gettime there), CLOCK_MONOTONIC elsewhere. */
#ifdef _WIN32
static double now(void) {
    LARGE_INTEGER freq, count;
    QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&count);
    return (double)count.QuadPart / (double)freq.QuadPart;
}
#else
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
#endif

/* Decode the token at n_past (+ the side tokens ending in [CLS] at n_past+1..); *p = p_unsafe for a check. */
static int advance(Loop *L, llama_token tok, int check, double *p) {
    llama_token toks[1 + MAX_SIDE] = {tok};
    llama_pos pos[1 + MAX_SIDE];
    int32_t n_seq[1 + MAX_SIDE];
    llama_seq_id seq0 = 0;
    llama_seq_id *seqs[1 + MAX_SIDE];
    int8_t out[1 + MAX_SIDE] = {1};
    int n = check ? 1 + L->n_side : 1;
    for (int i = 0; i < n; i++) {
        if (i) toks[i] = L->side[i - 1];
        pos[i] = L->n_past + i;
        n_seq[i] = 1;
        seqs[i] = &seq0;
        out[i] = i == 0 || i == n - 1; /* the real token's logits and the [CLS]'s */
    }
    llama_batch b = {n, toks, NULL, pos, n_seq, seqs, out};
    int32_t rc = L->decode(L->ctx, b);
    if (rc != 0) {
        snprintf(L->error, sizeof L->error, "llama_decode failed with code %d", (int)rc);
        return -1;
    }
    if (check) {
        const float *row = L->logits(L->ctx, n - 1);
        *p = row ? p_unsafe_from(row, L->safe_id, L->unsafe_id) : NAN;
        if (!L->seq_rm(L->mem, 0, L->n_past + 1, -1)) {
            snprintf(L->error, sizeof L->error, "could not remove the [CLS] cell from the KV cache");
            return -1;
        }
    }
    L->n_past += 1;
    L->row = 0;
    return 0;
}

static int ends_sentence(Loop *L, llama_token tok) {
    char buf[256];
    int32_t n = L->piece(L->vocab, tok, buf, (int32_t)sizeof buf, 0, false);
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == '\t')) n--;
    if (n <= 0) return 0;
    char c = buf[n - 1];
    return c == '.' || c == '!' || c == '?' || c == '\n' || c == ':';
}

/* SafetyPolicy.due: why a check is due after the n-th generated token, sampled from batch row `row`. */
static int due(Loop *L, int row, llama_token tok) {
    int n = L->n_gen;
    const Policy *P = &L->pol;
    if (P->every && n % P->every == 0) return WHY_EVERY;
    if (P->max_gap && n - L->last_covered >= P->max_gap) return WHY_MAX_GAP;
    if (!isnan(P->entropy_trigger) || !isnan(P->margin_trigger)) {
        double entropy = NAN, margin = NAN;
        const float *logits = L->logits(L->ctx, row); /* only when a hesitation trigger is on */
        if (logits) row_stats_from(logits, L->n_vocab, L->excluded, L->n_excluded, &entropy, &margin);
        if (!isnan(P->entropy_trigger) && entropy >= P->entropy_trigger) return WHY_ENTROPY;
        if (!isnan(P->margin_trigger) && margin <= P->margin_trigger) return WHY_MARGIN;
    }
    if (P->sentence_ends && ends_sentence(L, tok)) return WHY_SENTENCE;
    return WHY_NONE;
}

/* Record a verdict; the event it causes (EV_NONE while held back below patience). */
static int verdict(Loop *L, double p, int why) {
    L->tr_covered[L->n_tr] = L->n_gen;
    L->tr_p[L->n_tr] = p;
    L->tr_why[L->n_tr] = why;
    L->n_tr++;
    L->last_covered = L->n_gen;
    if (!isfinite(p) || p < 0.0 || p > 1.0) return EV_UNSAFE;
    if (p >= L->pol.threshold) {
        L->streak++;
        return L->streak >= L->pol.patience ? EV_UNSAFE : EV_NONE;
    }
    L->streak = 0;
    if (L->n_gen > L->released) {
        L->released = L->n_gen;
        return EV_RELEASE;
    }
    return EV_NONE;
}

/* The loop of runtime.strategy.generate between the prompt check and the end check. */
static int step_until_event(Loop *L) {
    for (;;) {
        if (L->n_prompt + L->n_gen + 2 >= L->n_ctx) {
            L->finish = "length";
            return EV_DONE;
        }
        int row = L->row;
        llama_token tok = L->sample(L->smpl, L->ctx, row);
        if (L->is_eog(L->vocab, tok)) {
            L->finish = "stop";
            return EV_DONE;
        }
        L->gen[L->n_gen++] = tok;
        int last = L->n_gen >= L->max_tokens;
        int why = WHY_NONE;
        if (L->pol.enabled) why = last ? WHY_END : due(L, row, tok);
        int check = why != WHY_NONE;
        double p = NAN;
        if ((check || !last) && advance(L, tok, check, &p) < 0) return EV_ERROR;
        int ev = EV_NONE;
        if (check) {
            ev = verdict(L, p, why);
        } else if (!L->pol.enabled) {
            L->released = L->n_gen;
            ev = EV_RELEASE;
        }
        if (last || ev == EV_UNSAFE) {
            L->finished = 1;
            L->finish = "length";
        }
        if (ev != EV_NONE) return ev;
        if (last) return EV_DONE;
    }
}

static PyObject *take_new(Loop *L, int ev) {
    PyObject *toks = PyList_New(L->n_gen - L->synced_gen);
    PyObject *checks = PyList_New(L->n_tr - L->synced_tr);
    if (!toks || !checks) goto fail;
    for (int i = L->synced_gen; i < L->n_gen; i++) {
        PyObject *t = PyLong_FromLong(L->gen[i]);
        if (!t) goto fail;
        PyList_SET_ITEM(toks, i - L->synced_gen, t);
    }
    for (int i = L->synced_tr; i < L->n_tr; i++) {
        PyObject *c = Py_BuildValue("(ids)", L->tr_covered[i], L->tr_p[i], WHY[L->tr_why[i]]);
        if (!c) goto fail;
        PyList_SET_ITEM(checks, i - L->synced_tr, c);
    }
    L->synced_gen = L->n_gen;
    L->synced_tr = L->n_tr;
    PyObject *info = ev == EV_DONE ? PyUnicode_FromString(L->finish)
                   : ev == EV_ERROR ? PyUnicode_FromString(L->error) : (Py_INCREF(Py_None), Py_None);
    if (!info) goto fail;
    return Py_BuildValue("(sNNN)", EVENT[ev], toks, checks, info);
fail:
    Py_XDECREF(toks);
    Py_XDECREF(checks);
    return NULL;
}

static PyObject *loop_run(Loop *L, PyObject *unused) {
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Loop.run() is already running in another thread");
        return NULL;
    }
    if (L->finished) return take_new(L, EV_DONE);
    L->busy = 1;
    int ev;
    double t0 = now();
    Py_BEGIN_ALLOW_THREADS
    ev = step_until_event(L);
    Py_END_ALLOW_THREADS
    L->seconds += now() - t0;
    L->busy = 0;
    if (ev == EV_DONE || ev == EV_ERROR) L->finished = 1;
    return take_new(L, ev);
}

static void loop_dealloc(Loop *L) {
    free(L->gen);
    free(L->tr_covered);
    free(L->tr_why);
    free(L->tr_p);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static int loop_init(Loop *L, PyObject *args, PyObject *kw) {
    static char *names[] = {"fns", "ctx", "mem", "sampler", "vocab", "side", "safe_id", "unsafe_id",
                            "n_vocab", "n_ctx", "n_prompt", "n_past", "row", "policy", "excluded",
                            "max_tokens", "streak", "last_covered", NULL};
    unsigned long long f[6], ctx, mem, smpl, vocab;
    PyObject *side, *excluded;
    Policy *P = &L->pol;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "(KKKKKK)KKKKOiiiiiii" POLICY_FORMAT "Oiii", names, &f[0], &f[1],
                                     &f[2], &f[3], &f[4], &f[5], &ctx, &mem, &smpl, &vocab, &side, &L->safe_id,
                                     &L->unsafe_id, &L->n_vocab, &L->n_ctx, &L->n_prompt, &L->n_past, &L->row,
                                     &P->enabled, &P->every, &P->max_gap, &P->entropy_trigger, &P->margin_trigger,
                                     &P->sentence_ends, &P->threshold, &P->patience, &excluded,
                                     &L->max_tokens, &L->streak, &L->last_covered))
        return -1;
    PyObject *ex = PySequence_Fast(excluded, "excluded must be a sequence of token ids");
    if (!ex) return -1;
    Py_ssize_t n_ex = PySequence_Fast_GET_SIZE(ex);
    int bad_ex = n_ex > MAX_EXCLUDED;
    for (Py_ssize_t i = 0; i < n_ex && !bad_ex; i++) {
        long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(ex, i));
        bad_ex = t == -1 && PyErr_Occurred();
        L->excluded[i] = t;
    }
    Py_DECREF(ex);
    if (bad_ex) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "excluded: at most %d token ids", MAX_EXCLUDED);
        return -1;
    }
    L->n_excluded = (int)n_ex;
    PyObject *seq = PySequence_Fast(side, "side must be a sequence of token ids");
    if (!seq) return -1;
    Py_ssize_t n_side = PySequence_Fast_GET_SIZE(seq);
    int bad = n_side > MAX_SIDE;
    for (Py_ssize_t i = 0; i < n_side && !bad; i++) {
        long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        bad = (t == -1 && PyErr_Occurred()) || t < 0 || t >= L->n_vocab;
        L->side[i] = (llama_token)t;
    }
    Py_DECREF(seq);
    if (bad) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "side: at most %d token ids, each in [0, n_vocab)", MAX_SIDE);
        return -1;
    }
    L->n_side = (int)n_side;
    for (int i = 0; i < 6; i++)
        if (!f[i]) {
            PyErr_SetString(PyExc_ValueError, "null llama.cpp function address");
            return -1;
        }
    if (!ctx || !mem || !smpl || !vocab) {
        PyErr_SetString(PyExc_ValueError, "null llama.cpp context, memory, sampler or vocabulary");
        return -1;
    }
    if (L->max_tokens < 1 || L->n_vocab < 1 || P->patience < 1 || P->every < 0 || P->max_gap < 0 ||
        (P->enabled && !P->every && !P->max_gap) ||
        (P->enabled && (L->n_side < 1 || L->safe_id < 0 || L->unsafe_id < 0 ||
                        L->safe_id >= L->n_vocab || L->unsafe_id >= L->n_vocab))) {
        PyErr_SetString(PyExc_ValueError, "invalid Loop arguments (policy or token ids)");
        return -1;
    }
    L->decode = (decode_fn)(uintptr_t)f[0];
    L->logits = (logits_fn)(uintptr_t)f[1];
    L->seq_rm = (seq_rm_fn)(uintptr_t)f[2];
    L->sample = (sample_fn)(uintptr_t)f[3];
    L->is_eog = (is_eog_fn)(uintptr_t)f[4];
    L->piece = (piece_fn)(uintptr_t)f[5];
    L->ctx = (void *)(uintptr_t)ctx;
    L->mem = (void *)(uintptr_t)mem;
    L->smpl = (void *)(uintptr_t)smpl;
    L->vocab = (void *)(uintptr_t)vocab;
    free(L->gen);
    free(L->tr_covered);
    free(L->tr_why);
    free(L->tr_p);
    L->gen = calloc((size_t)L->max_tokens, sizeof *L->gen);
    L->tr_covered = calloc((size_t)L->max_tokens + 1, sizeof *L->tr_covered);
    L->tr_why = calloc((size_t)L->max_tokens + 1, sizeof *L->tr_why);
    L->tr_p = calloc((size_t)L->max_tokens + 1, sizeof *L->tr_p);
    if (!L->gen || !L->tr_covered || !L->tr_why || !L->tr_p) {
        PyErr_NoMemory();
        return -1;
    }
    L->n_gen = L->synced_gen = L->n_tr = L->synced_tr = L->released = L->finished = L->busy = 0;
    L->finish = "length";
    L->seconds = 0.0;
    L->error[0] = 0;
    return 0;
}

static PyObject *get_n_past(Loop *L, void *c) { return PyLong_FromLong(L->n_past); }
static PyObject *get_row(Loop *L, void *c) { return PyLong_FromLong(L->row); }
static PyObject *get_streak(Loop *L, void *c) { return PyLong_FromLong(L->streak); }
static PyObject *get_seconds(Loop *L, void *c) { return PyFloat_FromDouble(L->seconds); }

static PyGetSetDef loop_getset[] = {
    {"n_past", (getter)get_n_past, NULL, "KV cache length (the next token's position)", NULL},
    {"row", (getter)get_row, NULL, "batch row of the last real token's logits", NULL},
    {"streak", (getter)get_streak, NULL, "consecutive unsafe verdicts so far", NULL},
    {"seconds", (getter)get_seconds, NULL, "wall time spent inside run(), GIL released", NULL},
    {NULL},
};

static PyMethodDef loop_methods[] = {
    {"run", (PyCFunction)loop_run, METH_NOARGS,
     "run() -> (event, new_tokens, new_checks, info): decode until there is something to hand over.\n"
     "event: 'release' | 'unsafe' | 'done' (info: 'length' or 'stop') | 'error' (info: message);\n"
     "new_checks: [(covered, p_unsafe, trigger)]"},
    {NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runtime._native.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native decode loop of strategic decoding (see cpp_ext/loop.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)loop_init,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_methods = loop_methods,
    .tp_getset = loop_getset,
};

PyTypeObject *native_loop_type(void) { return &LoopType; }

PyObject *native_policy_fields(void) {
    int n = 0;
    while (POLICY_FIELDS[n]) n++;
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t && i < n; i++) {
        PyObject *s = PyUnicode_FromString(POLICY_FIELDS[i]);
        if (!s) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

PyObject *native_batch_layout(PyObject *self, PyObject *unused) {
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n}", "size", (Py_ssize_t)sizeof(llama_batch),
                         "n_tokens", (Py_ssize_t)offsetof(llama_batch, n_tokens),
                         "token", (Py_ssize_t)offsetof(llama_batch, token),
                         "embd", (Py_ssize_t)offsetof(llama_batch, embd),
                         "pos", (Py_ssize_t)offsetof(llama_batch, pos),
                         "n_seq_id", (Py_ssize_t)offsetof(llama_batch, n_seq_id),
                         "seq_id", (Py_ssize_t)offsetof(llama_batch, seq_id),
                         "logits", (Py_ssize_t)offsetof(llama_batch, logits));
}
