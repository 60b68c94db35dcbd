/* runtime._native: the per-step verdict read straight from llama.cpp's logits buffer.
 *
 * A check needs two values of a 49k-wide logits row; reading them through ctypes and
 * numpy costs more than the arithmetic. `p_unsafe(address, safe_id, unsafe_id)` takes the
 * address of the row (as returned by llama_get_logits_ith) and returns softmax over the
 * two label logits, computed stably; NaN in, NaN out (the runtime then fails closed).
 * `row_stats(address, n_vocab, excluded)` returns (entropy, top-2 margin) of the softmax of a
 * logits row, skipping the excluded ids (the safety tokens): the "hesitation" signals that
 * trigger an extra check in the adaptive policy, in one pass over 49k floats without copies.
 * The full native decode loop is a later issue.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

static double p_unsafe_from(const float *row, long safe_id, long unsafe_id) {
    double d = (double)row[unsafe_id] - (double)row[safe_id];
    if (isnan(d)) return NAN;
    if (d >= 0) return 1.0 / (1.0 + exp(-d));
    double e = exp(d);
    return e / (1.0 + e);
}

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
    PyObject *seq = PySequence_Fast(excluded, "excluded must be a sequence of token ids");
    if (!seq) return NULL;
    Py_ssize_t n_ex = PySequence_Fast_GET_SIZE(seq);
    long ex[8];
    if (n_ex > 8) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "at most 8 excluded ids");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n_ex; i++) {
        ex[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (ex[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    const float *row = (const float *)(uintptr_t)addr;
    double m1 = -INFINITY, m2 = -INFINITY;
    Py_BEGIN_ALLOW_THREADS
    for (long i = 0; i < n; i++) {
        int skip = 0;
        for (Py_ssize_t j = 0; j < n_ex; j++) skip |= (ex[j] == i);
        if (skip) continue;
        double v = row[i];
        if (v > m1) { m2 = m1; m1 = v; } else if (v > m2) { m2 = v; }
    }
    Py_END_ALLOW_THREADS
    double z = 0.0, ez = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (long i = 0; i < n; i++) {
        int skip = 0;
        for (Py_ssize_t j = 0; j < n_ex; j++) skip |= (ex[j] == i);
        if (skip) continue;
        double d = (double)row[i] - m1;
        double e = exp(d);
        z += e;
        ez += e * d;
    }
    Py_END_ALLOW_THREADS
    /* entropy = log z - E[d]; margin = p1 - p2 = (1 - exp(m2 - m1)) / z */
    double entropy = log(z) - ez / z;
    double margin = (1.0 - exp(m2 - m1)) / z;
    return Py_BuildValue("dd", entropy, margin);
}

static PyMethodDef methods[] = {
    {"p_unsafe", py_p_unsafe, METH_VARARGS,
     "p_unsafe(address, safe_id, unsafe_id) -> float: softmax([row[safe], row[unsafe]])[1]"},
    {"row_stats", py_row_stats, METH_VARARGS,
     "row_stats(address, n_vocab, excluded) -> (entropy, top-2 probability margin) of softmax(row)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
