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
 * answers, byte for byte (tests/test_dtls_engine.py checks it against it). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "client_hello.h"

#define HS_HEADER 12
#define MAX_MESSAGE 8192
#define MAX_HELLO_SEQ 255
#define COOKIE_LENGTH 16

static unsigned u24(const unsigned char *p) { return (unsigned)p[0] << 16 | (unsigned)p[1] << 8 | p[2]; }

static PyObject *hello_verify(PyObject *self, PyObject *args) {
    Py_buffer frag, addr, secret;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*Ky*y*", &frag, &seq, &addr, &secret))
        return NULL;
    PyObject *out = NULL;
    const unsigned char *p = frag.buf;
    size_t n = (size_t)frag.len, pos = 0;
    const unsigned char *body = NULL;
    size_t body_len = 0;
    unsigned message_seq = 0;
    /* every fragment framed as parse_fragments_untrusted frames it; the first one whole */
    while (pos < n) {
        if (n - pos < HS_HEADER) goto none;
        unsigned length = u24(p + pos + 1), offset = u24(p + pos + 6), flen = u24(p + pos + 9);
        if ((size_t)offset + flen > length || pos + HS_HEADER + flen > n || length > MAX_MESSAGE) goto none;
        if (body == NULL) {
            if (offset != 0 || flen != length) goto none;
            message_seq = hello_u16(p + pos + 4);
            body = p + pos + HS_HEADER;
            body_len = flen;
        }
        pos += HS_HEADER + flen;
    }
    client_hello ch;
    if (body == NULL || message_seq > MAX_HELLO_SEQ || seq >> 48 || addr.len > 0xFFFF ||
        !client_hello_parse(body, body_len, &ch) || ch.cookie_end - ch.cookie_start == COOKIE_LENGTH)
        goto none; /* (a cookie of the cookie's length may be valid: the Python path looks) */
    unsigned char mac[HMAC256_LEN];
    if (!hello_cookie(secret.buf, (size_t)secret.len, addr.buf, (size_t)addr.len, body, &ch, mac)) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
        goto done;
    }
    unsigned char r[HELLO_VERIFY_RECORD];
    hello_verify_record(r, seq, message_seq, mac);
    out = PyBytes_FromStringAndSize((const char *)r, sizeof r);
    goto done;
none:
    out = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&frag);
    PyBuffer_Release(&addr);
    PyBuffer_Release(&secret);
    return out;
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
