/* runtime._native: the per-step verdict read straight from llama.cpp's logits buffer.
 *
 * A check needs two values of a 49k-wide logits row; reading them through ctypes and
 * numpy costs more than the arithmetic. `p_unsafe(address, safe_id, unsafe_id)` takes the
 * address of the row (as returned by llama_get_logits_ith) and returns softmax over the
 * two label logits, computed stably; NaN in, NaN out (the runtime then fails closed).
 * The full native decode loop is a later issue; this module proves the build path.
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

static PyMethodDef methods[] = {
    {"p_unsafe", py_p_unsafe, METH_VARARGS,
     "p_unsafe(address, safe_id, unsafe_id) -> float: softmax([row[safe], row[unsafe]])[1]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
