/* The TLS 1.2 PRF (RFC 5246 §5, P_SHA256) on the system's OpenSSL libcrypto: one call instead of
 * one HMAC object per iteration from Python (crypto.py `prf`, its pure-Python twin, the reference;
 * tests/test_dtls_engine.py checks both against the published vector and each other).
 *
 *   prf_sha256(secret, label_and_seed, length) -> bytes
 *
 * The key is set up once (HMAC_Init_ex with a NULL key afterwards reuses it). */

#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* HMAC_CTX: the shortest way to keep one key across calls */
#include <Python.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#define SHA256_LEN 32
#define MAX_PRF 4096

static PyObject *prf_sha256(PyObject *self, PyObject *args) {
    Py_buffer secret, seed;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "y*y*n", &secret, &seed, &length))
        return NULL;
    PyObject *out = NULL;
    HMAC_CTX *ctx = NULL;
    if (length < 0 || length > MAX_PRF) {
        PyErr_SetString(PyExc_ValueError, "length must be 0..4096");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char a[SHA256_LEN], block[SHA256_LEN];
    unsigned int n;
    ctx = HMAC_CTX_new();
    /* A(1) = HMAC(secret, seed) */
    if (ctx == NULL || !HMAC_Init_ex(ctx, secret.buf, (int)secret.len, EVP_sha256(), NULL) ||
        !HMAC_Update(ctx, seed.buf, seed.len) || !HMAC_Final(ctx, a, &n))
        goto fail;
    for (Py_ssize_t filled = 0; filled < length;) {
        /* HMAC(secret, A(i) + seed), then A(i+1) = HMAC(secret, A(i)) */
        if (!HMAC_Init_ex(ctx, NULL, 0, NULL, NULL) || !HMAC_Update(ctx, a, SHA256_LEN) ||
            !HMAC_Update(ctx, seed.buf, seed.len) || !HMAC_Final(ctx, block, &n))
            goto fail;
        Py_ssize_t take = length - filled < SHA256_LEN ? length - filled : SHA256_LEN;
        memcpy(dst + filled, block, take);
        filled += take;
        if (filled < length && (!HMAC_Init_ex(ctx, NULL, 0, NULL, NULL) || !HMAC_Update(ctx, a, SHA256_LEN) ||
                              !HMAC_Final(ctx, a, &n)))
            goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL HMAC failed");
done:
    HMAC_CTX_free(ctx);
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

PyMODINIT_FUNC PyInit__prf(void) { return PyModule_Create(&module); }
