/* runtime._native: the per-step verdict read straight from llama.cpp's logits buffer.
 *
 * A check needs two values of a 49k-wide logits row; reading them through ctypes and
 * numpy costs more than the arithmetic. `p_unsafe(address, safe_id, unsafe_id)` takes the
 * address of the row (as returned by llama_get_logits_ith) and returns softmax over the
 * two label logits, computed stably; NaN in, NaN out (the runtime then fails closed).
 * `row_stats(address, n_vocab, excluded)` returns (entropy, top-2 margin) of the softmax of a
 * logits row, skipping the excluded ids (the ids the sampler never picks): the "hesitation" signals that
 * trigger an extra check in the adaptive policy, in one pass over 49k floats without copies.
 * `logprob(address, n_vocab, excluded, token)`: log softmax of a row at one token, the excluded ids left out: the
 * prompt surprisal rule's per-token evidence (runtime/surprisal.py), read from the prefill's logits rows in place.
 * The native decode loop (`Loop`, `batch_layout`) lives in loop.c and loop_py.c.
 */
#include "loop.h"  /* Python.h, verdict.h, MAX_EXCLUDED, read_token_ids */

PyTypeObject *native_loop_type(void);  /* loop_py.c */
PyObject *native_batch_layout(PyObject *self, PyObject *unused);  /* loop_py.c */
PyObject *native_policy_fields(void);  /* loop_py.c */

static PyObject *py_p_unsafe(PyObject *self, PyObject *args) {
    unsigned long long addr;
    long safe_id, unsafe_id;
    if (!PyArg_ParseTuple(args, "Kll", &addr, &safe_id, &unsafe_id)) return NULL;
    if (addr == 0) {
        PyErr_SetString(PyExc_ValueError, "null logits pointer");
        return NULL;
    }
    if (safe_id < 0 || unsafe_id < 0) {
        PyErr_SetString(PyExc_ValueError, "negative token id");
        return NULL;
    }
    return PyFloat_FromDouble(p_unsafe_from((const float *)(uintptr_t)addr, safe_id, unsafe_id));
}

static PyObject *py_row_stats(PyObject *self, PyObject *args) {
    unsigned long long addr;
    long n;
    PyObject *excluded;
    if (!PyArg_ParseTuple(args, "KlO", &addr, &n, &excluded)) return NULL;
    if (addr == 0 || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "null logits pointer or empty row");
        return NULL;
    }
    long ex[MAX_EXCLUDED];
    int n_ex = read_token_ids(excluded, "excluded", ex, MAX_EXCLUDED, n);
    if (n_ex < 0) return NULL;
    const float *row = (const float *)(uintptr_t)addr;
    double entropy, margin;
    Py_BEGIN_ALLOW_THREADS
    row_stats_from(row, n, ex, n_ex, &entropy, &margin);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("dd", entropy, margin);
}

static PyObject *py_logprob(PyObject *self, PyObject *args) {
    unsigned long long addr;
    long n, token;
    PyObject *excluded;
    if (!PyArg_ParseTuple(args, "KlOl", &addr, &n, &excluded, &token)) return NULL;
    if (addr == 0 || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "null logits pointer or empty row");
        return NULL;
    }
    if (token < 0 || token >= n) {
        PyErr_SetString(PyExc_ValueError, "token id outside the row");
        return NULL;
    }
    long ex[MAX_EXCLUDED];
    int n_ex = read_token_ids(excluded, "excluded", ex, MAX_EXCLUDED, n);
    if (n_ex < 0) return NULL;
    const float *row = (const float *)(uintptr_t)addr;
    double lp;
    Py_BEGIN_ALLOW_THREADS
    lp = logprob_from(row, n, ex, n_ex, token);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(lp);
}

static PyMethodDef methods[] = {
    {"p_unsafe", py_p_unsafe, METH_VARARGS,
     "p_unsafe(address, safe_id, unsafe_id) -> float: softmax([row[safe], row[unsafe]])[1]"},
    {"row_stats", py_row_stats, METH_VARARGS,
     "row_stats(address, n_vocab, excluded) -> (entropy, top-2 probability margin) of softmax(row)"},
    {"logprob", py_logprob, METH_VARARGS,
     "logprob(address, n_vocab, excluded, token) -> float: log softmax(row)[token] without the excluded ids"},
    {"batch_layout", native_batch_layout, METH_NOARGS,
     "batch_layout() -> dict: sizeof and field offsets of llama_batch as this module was compiled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyTypeObject *loop = native_loop_type();
    if (PyType_Ready(loop) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(loop);
    if (PyModule_AddObject(m, "Loop", (PyObject *)loop) < 0) {
        Py_DECREF(loop);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *fields = native_policy_fields(); /* what Loop(policy=...) reads, in order */
    if (!fields || PyModule_AddObject(m, "POLICY_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
