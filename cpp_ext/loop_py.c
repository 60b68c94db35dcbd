/* runtime._native.Loop as a Python type: arguments in, events and checks out (the algorithm is loop.c). */
#include "loop.h"

static const char *WHY[] = {"every", "max_gap", "entropy", "margin", "sentence", "end"};
static const char *POLICY_FIELDS[] = {"enabled", "every", "max_gap", "entropy_trigger", "margin_trigger",
                                      "sentence_ends", "threshold", "patience", NULL};
static const char *EVENT[] = {"none", "release", "unsafe", "done", "error"};

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
    double t0 = loop_now();
    Py_BEGIN_ALLOW_THREADS
    ev = step_until_event(L);
    Py_END_ALLOW_THREADS
    L->seconds += loop_now() - t0;
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

/* A sequence of at most `max` token ids, each in [0, n_vocab), into out; its length, or -1 with a ValueError
   naming `what` (shared by Loop's side and excluded ids and by row_stats in native.c). */
int read_token_ids(PyObject *obj, const char *what, long *out, int max, long n_vocab) {
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of token ids");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int bad = n > max;
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        bad = (t == -1 && PyErr_Occurred()) || t < 0 || t >= n_vocab;
        out[i] = t;
    }
    Py_DECREF(seq);
    if (bad) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: at most %d token ids, each in [0, n_vocab)", what, max);
        return -1;
    }
    return (int)n;
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
    long side_ids[MAX_SIDE];
    int n_ex = read_token_ids(excluded, "excluded", L->excluded, MAX_EXCLUDED, L->n_vocab);
    int n_side = n_ex < 0 ? -1 : read_token_ids(side, "side", side_ids, MAX_SIDE, L->n_vocab);
    if (n_side < 0) return -1;
    L->n_excluded = n_ex;
    L->n_side = n_side;
    for (int i = 0; i < n_side; i++) L->side[i] = (llama_token)side_ids[i];
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
