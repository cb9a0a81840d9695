/* The TLS 1.2 PRF (RFC 5246 §5, P_SHA256) on the system's OpenSSL libcrypto: one call instead of
 * one HMAC object per iteration from Python (crypto.py `prf_py`, its pure-Python twin, the
 * reference; tests/test_dtls_engine.py checks both against the published vector and each other).
 *
 *   prf_sha256(secret, label_and_seed, length) -> bytes
 *
 * The key's pads are hashed once per call (hmac256.h). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "hmac256.h"

#define MAX_PRF 4096

static PyObject *prf_sha256(PyObject *self, PyObject *args) {
    Py_buffer secret, seed;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "y*y*n", &secret, &seed, &length))
        return NULL;
    PyObject *out = NULL;
    hmac256_key key = {NULL, NULL, NULL};
    if (length < 0 || length > MAX_PRF) {
        PyErr_SetString(PyExc_ValueError, "length must be 0..4096");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char a[HMAC256_LEN], block[HMAC256_LEN];
    /* A(1) = HMAC(secret, seed) */
    if (!hmac256_init(&key, secret.buf, (size_t)secret.len) || !hmac256(&key, seed.buf, seed.len, NULL, 0, a))
        goto fail;
    for (Py_ssize_t filled = 0; filled < length;) {
        /* HMAC(secret, A(i) + seed), then A(i+1) = HMAC(secret, A(i)) */
        if (!hmac256(&key, a, sizeof a, seed.buf, seed.len, block))
            goto fail;
        Py_ssize_t take = length - filled < HMAC256_LEN ? length - filled : HMAC256_LEN;
        memcpy(dst + filled, block, take);
        filled += take;
        if (filled < length && !hmac256(&key, a, sizeof a, NULL, 0, a))
            goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
done:
    hmac256_free(&key);
    PyBuffer_Release(&secret);
    PyBuffer_Release(&seed);
    return out;
}

static PyMethodDef methods[] = {
    {"prf_sha256", prf_sha256, METH_VARARGS,
     "prf_sha256(secret, label_and_seed, length) -> bytes: P_SHA256 (RFC 5246 section 5)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prf", NULL, -1, methods};

PyMODINIT_FUNC PyInit__prf(void) {
    if (!hmac256_fetch()) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA2-256");
        return NULL;
    }
    return PyModule_Create(&module);
}
