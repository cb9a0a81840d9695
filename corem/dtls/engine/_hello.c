/* The stateless answer to a cookie-less ClientHello in C (engine.py `_hello`, RFC 6347 §4.2.1): the
 * record's handshake fragments framed, the hello parsed with every check
 * messages.parse_client_hello_untrusted makes, the cookie (CookieJar: HMAC-SHA256 over the peer's
 * address and the hello's version, random, session_id, suites and compression methods) and the
 * 44-byte HelloVerifyRequest record, in one call on the system's OpenSSL libcrypto.
 *
 *   hello_verify(fragment, record_seq, addr, secret) -> bytes | None
 *
 * None whenever the Python path is to decide: anything malformed (it raises the named error), a
 * hello carrying a cookie of the cookie's length (it may be valid), an unusual shape (a fragment,
 * a message_seq past 255, many extensions).  So the C path only ever answers what the Python one
 * answers, byte for byte (tests/test_dtls_engine.py checks it against it).  The rule is
 * client_hello.h's `hello_verify_answer`, which the fast lane calls too. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "client_hello.h"

static PyObject *hello_verify(PyObject *self, PyObject *args) {
    Py_buffer frag, addr, secret;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*Ky*y*", &frag, &seq, &addr, &secret))
        return NULL;
    unsigned char r[HELLO_VERIFY_RECORD];
    int got = hello_verify_answer(frag.buf, (size_t)frag.len, seq, addr.buf, (size_t)addr.len, secret.buf,
                                  (size_t)secret.len, r);
    PyBuffer_Release(&frag);
    PyBuffer_Release(&addr);
    PyBuffer_Release(&secret);
    if (got < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
        return NULL;
    }
    return got ? PyBytes_FromStringAndSize((const char *)r, sizeof r) : Py_NewRef(Py_None);
}

static PyMethodDef methods[] = {
    {"hello_verify", hello_verify, METH_VARARGS,
     "hello_verify(fragment, record_seq, addr, secret) -> the HelloVerifyRequest record, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hello", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hello(void) {
    if (!hmac256_fetch()) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA2-256");
        return NULL;
    }
    return PyModule_Create(&module);
}
