/*
 * corem.codec._speedups: the CoAP decoder in C (RFC 7252 §3).
 *
 * The same rules, the same error texts and the same Message as corem/codec/message.py's
 * `decode_py`, which stays the reference: tests run every codec test against both and compare
 * them on random input.  Option values and the payload are memoryview slices of the datagram.
 *
 * The option walk is coap_options.h, shared with the fast lane.  Every read is bounds-checked
 * against the datagram length before it happens; the buffer is held
 * (PyObject_GetBuffer) for the whole parse and released on every path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "coap_options.h"

static PyObject *MessageType;        /* corem.codec.message.Message */
static PyObject *FormatError;        /* corem.codec.message.MessageFormatError */
static PyObject *EmptyPayload;       /* memoryview(b"") shared by messages without payload */
static PyObject *s_type, *s_code, *s_mid, *s_token, *s_options, *s_payload;

static PyObject *fail(const char *reason, long mid, long mtype) {
    PyObject *exc;
    if (mid >= 0)
        exc = PyObject_CallFunction(FormatError, "sll", reason, mid, mtype);
    else
        exc = PyObject_CallFunction(FormatError, "s", reason);
    if (exc) {
        PyErr_SetObject(FormatError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *make_message(long mtype, long code, long mid, PyObject *token, PyObject *options,
                              PyObject *payload) {
    PyTypeObject *tp = (PyTypeObject *)MessageType;
    PyObject *msg = tp->tp_alloc(tp, 0);
    if (!msg) return NULL;
    PyObject *t = PyLong_FromLong(mtype), *c = PyLong_FromLong(code), *m = PyLong_FromLong(mid);
    int bad = !t || !c || !m || PyObject_GenericSetAttr(msg, s_type, t) < 0 ||
              PyObject_GenericSetAttr(msg, s_code, c) < 0 || PyObject_GenericSetAttr(msg, s_mid, m) < 0 ||
              PyObject_GenericSetAttr(msg, s_token, token) < 0 ||
              PyObject_GenericSetAttr(msg, s_options, options) < 0 ||
              PyObject_GenericSetAttr(msg, s_payload, payload) < 0;
    Py_XDECREF(t);
    Py_XDECREF(c);
    Py_XDECREF(m);
    if (bad) {
        Py_DECREF(msg);
        return NULL;
    }
    return msg;
}

static PyObject *decode(PyObject *self, PyObject *data) {
    if (!MessageType) {
        PyErr_SetString(PyExc_RuntimeError, "corem.codec._speedups is not configured");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *b = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL, *mv = NULL, *token = NULL, *options = NULL, *payload = NULL;
    char reason[160];

    if (n < 4) {
        snprintf(reason, sizeof reason, "truncated header: %zd bytes, need 4", n);
        fail(reason, -1, -1);
        goto done;
    }
    long mtype = (b[0] >> 4) & 3, tkl = b[0] & 15, code = b[1], mid = (b[2] << 8) | b[3];
    long cls = code >> 5;
    if (b[0] >> 6 != 1) {
        snprintf(reason, sizeof reason, "version %d, expected 1", b[0] >> 6);
        fail(reason, -1, -1); /* (RFC 7252 §3: silently ignored -- no RST, whose header it would not be) */
        goto done;
    }
    if (tkl > 8) {
        snprintf(reason, sizeof reason, "token length %ld is reserved (9-15)", tkl);
        fail(reason, mid, mtype);
        goto done;
    }
    if (code == 0) {
        if (n != 4 || tkl) {
            fail("empty message (code 0.00) with token, options or payload", mid, mtype);
            goto done;
        }
    } else {
        if (cls == 1 || cls >= 6) {
            snprintf(reason, sizeof reason, "code %ld.%02ld is in a reserved class", cls, code & 31);
            fail(reason, mid, mtype);
            goto done;
        }
        if (mtype == 3) {
            fail("reset message must be empty", mid, mtype);
            goto done;
        }
    }
    Py_ssize_t pos = 4 + tkl;
    if (pos > n) {
        snprintf(reason, sizeof reason, "truncated token: need %ld bytes, have %zd", tkl, n - 4);
        fail(reason, mid, mtype);
        goto done;
    }
    token = PyBytes_FromStringAndSize((const char *)b + 4, tkl);
    options = PyList_New(0);
    if (!token || !options) goto done;
    payload = EmptyPayload;
    Py_INCREF(payload);
    uint64_t number = 0;
    const uint8_t *p = b + pos, *end = b + n, *value;
    size_t vlen;
    for (;;) {
        coap_option_status st = coap_next_option(&p, end, &number, &value, &vlen);
        if (st == COAP_END) break;
        if (st == COAP_DELTA_15) {
            fail("option delta nibble 15 without payload marker", mid, mtype);
            goto done;
        }
        if (st == COAP_LENGTH_15) {
            fail("option length nibble 15", mid, mtype);
            goto done;
        }
        if (st == COAP_TRUNCATED_VALUE) {
            snprintf(reason, sizeof reason, "truncated option %ld: value needs %ld bytes, have %zd", (long)number,
                     (long)vlen, (Py_ssize_t)(end - p));
            fail(reason, mid, mtype);
            goto done;
        }
        if (st != COAP_OPTION) {
            fail("truncated option header", mid, mtype);
            goto done;
        }
        if (!mv && !(mv = PyMemoryView_FromObject(data))) goto done;
        Py_ssize_t at = value - b;
        PyObject *item = PySequence_GetSlice(mv, at, at + (Py_ssize_t)vlen);
        if (!item) goto done;
        PyObject *num = PyLong_FromUnsignedLongLong(number);
        if (!num) {
            Py_DECREF(item);
            goto done;
        }
        PyObject *pair = PyTuple_Pack(2, num, item);
        Py_DECREF(num);
        Py_DECREF(item);
        if (!pair) goto done;
        int rc = PyList_Append(options, pair);
        Py_DECREF(pair);
        if (rc < 0) goto done;
    }
    if (p < end) { /* at the payload marker */
        if (++p == end) {
            fail("payload marker with no payload", mid, mtype);
            goto done;
        }
        if (!mv && !(mv = PyMemoryView_FromObject(data))) goto done;
        Py_DECREF(payload);
        payload = PySequence_GetSlice(mv, p - b, n);
        if (!payload) goto done;
    }
    if (number > 65535) {
        snprintf(reason, sizeof reason, "option number %ld exceeds 65535", (long)number);
        fail(reason, mid, mtype);
        goto done;
    }
    result = make_message(mtype, code, mid, token, options, payload);
done:
    Py_XDECREF(mv);
    Py_XDECREF(token);
    Py_XDECREF(options);
    Py_XDECREF(payload);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *msg, *err, *empty;
    if (!PyArg_ParseTuple(args, "OOO", &msg, &err, &empty)) return NULL;
    if (!PyType_Check(msg)) {
        PyErr_SetString(PyExc_TypeError, "Message must be a class");
        return NULL;
    }
    Py_XSETREF(MessageType, Py_NewRef(msg));
    Py_XSETREF(FormatError, Py_NewRef(err));
    Py_XSETREF(EmptyPayload, Py_NewRef(empty));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_O, "Parse one CoAP datagram into a Message (see message.decode_py)."},
    {"configure", configure, METH_VARARGS, "configure(Message, MessageFormatError, empty_payload)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "corem.codec._speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    s_type = PyUnicode_InternFromString("type");
    s_code = PyUnicode_InternFromString("code");
    s_mid = PyUnicode_InternFromString("mid");
    s_token = PyUnicode_InternFromString("token");
    s_options = PyUnicode_InternFromString("options");
    s_payload = PyUnicode_InternFromString("payload");
    if (!s_type || !s_code || !s_mid || !s_token || !s_options || !s_payload) return NULL;
    return PyModule_Create(&module);
}
