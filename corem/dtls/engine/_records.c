/*
 * corem.dtls.engine._records: DTLS 1.2 record protection in C on OpenSSL's libcrypto (the
 * system's: Debian's libssl3), the record layer of records.py in one C call per record.
 *
 * parse_record_untrusted and Record are records.py's (the framing), Protection(cipher, key, iv) is
 * records.RecordProtection (one direction of one epoch: its
 * EVP_CIPHER_CTX is made and keyed once, re-initialised per record with the nonce), Window(top,
 * bits) is records.ReplayWindow.  Besides their methods, Protection.open_record_untrusted is the
 * whole receive path of an established session in one call: framing, epoch, CID, the window,
 * the AEAD, the window's update.  A record that is refused raises the configured DtlsDecodeError
 * (alert, reason) with the reason records.py gives; nothing else is raised for network bytes.
 * The work itself is in dtls_records.h, which the fast lane can include.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <openssl/crypto.h>
#include <openssl/opensslv.h>

#include "dtls_records.h"

static PyObject *DecodeError; /* errors.DtlsDecodeError, from configure() */
static PyObject *str_type, *str_version, *str_epoch, *str_seq, *str_cid, *str_fragment;

static PyObject *refuse(dtls_status s) {
    if (DecodeError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_records.configure() was not called");
        return NULL;
    }
    PyObject *e = PyObject_CallFunction(DecodeError, "is", dtls_status_alert(s), dtls_status_reason(s));
    if (e != NULL) {
        PyErr_SetObject(DecodeError, e);
        Py_DECREF(e);
    }
    return NULL;
}

/* -- Window ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    dtls_window w;
} WindowObject;

static PyTypeObject WindowType;

static int window_init(WindowObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"top", "bits", NULL};
    long long top = -1;
    unsigned long long bits = 0;
    PyObject *bits_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|LO:ReplayWindow", kwlist, &top, &bits_obj)) return -1;
    if (bits_obj != NULL) {
        if (!PyLong_Check(bits_obj)) {
            PyErr_SetString(PyExc_TypeError, "bits must be an int");
            return -1;
        }
        bits = PyLong_AsUnsignedLongLong(bits_obj);
        if (bits == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    self->w.top = top;
    self->w.bits = bits;
    return 0;
}

static int seq_arg(PyObject *o, int64_t *seq) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *seq = v;
    return 0;
}

static PyObject *window_fresh(WindowObject *self, PyObject *arg) {
    int64_t seq;
    if (seq_arg(arg, &seq) < 0) return NULL;
    return PyBool_FromLong(dtls_window_fresh(&self->w, seq));
}

static PyObject *window_mark(WindowObject *self, PyObject *arg) {
    int64_t seq;
    if (seq_arg(arg, &seq) < 0) return NULL;
    dtls_window_mark(&self->w, seq);
    Py_RETURN_NONE;
}

static PyObject *window_get_top(WindowObject *self, void *closure) { return PyLong_FromLongLong(self->w.top); }

static int window_set_top(WindowObject *self, PyObject *v, void *closure) {
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete top");
        return -1;
    }
    long long top = PyLong_AsLongLong(v);
    if (top == -1 && PyErr_Occurred()) return -1;
    self->w.top = top;
    return 0;
}

static PyObject *window_get_bits(WindowObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->w.bits);
}

static int window_set_bits(WindowObject *self, PyObject *v, void *closure) {
    if (v == NULL || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "bits must be an int");
        return -1;
    }
    unsigned long long bits = PyLong_AsUnsignedLongLong(v);
    if (bits == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    self->w.bits = bits;
    return 0;
}

static PyObject *window_repr(WindowObject *self) {
    char text[80];
    snprintf(text, sizeof text, "ReplayWindow(top=%lld, bits=0x%016llx)", (long long)self->w.top,
             (unsigned long long)self->w.bits);
    return PyUnicode_FromString(text);
}

static PyMethodDef window_methods[] = {
    {"fresh", (PyCFunction)window_fresh, METH_O, "Not seen, and not below the window."},
    {"mark", (PyCFunction)window_mark, METH_O, "Note an authenticated sequence number."},
    {NULL},
};

static PyGetSetDef window_getset[] = {
    {"top", (getter)window_get_top, (setter)window_set_top, NULL, NULL},
    {"bits", (getter)window_get_bits, (setter)window_set_bits, NULL, NULL},
    {NULL},
};

static PyTypeObject WindowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corem.dtls.engine._records.Window",
    .tp_basicsize = sizeof(WindowObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The anti-replay window of RFC 6347 §4.1.2.6 (records.ReplayWindowPy is the reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)window_init,
    .tp_repr = (reprfunc)window_repr,
    .tp_methods = window_methods,
    .tp_getset = window_getset,
};

/* -- Record and parse_record_untrusted -------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long type, version, epoch, seq;
    PyObject *cid;      /* bytes: b"" unless type is tls12_cid */
    PyObject *fragment; /* bytes */
} RecordObject;

static PyTypeObject RecordType;
static PyObject *empty_bytes;

static int record_init(RecordObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"type", "version", "epoch", "seq", "cid", "fragment", NULL};
    long long type, version, epoch, seq;
    PyObject *cid, *fragment;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LLLLSS:Record", kwlist, &type, &version, &epoch, &seq, &cid,
                                     &fragment))
        return -1;
    self->type = type;
    self->version = version;
    self->epoch = epoch;
    self->seq = seq;
    Py_INCREF(cid);
    Py_XSETREF(self->cid, cid);
    Py_INCREF(fragment);
    Py_XSETREF(self->fragment, fragment);
    return 0;
}

static void record_dealloc(RecordObject *self) {
    Py_XDECREF(self->cid);
    Py_XDECREF(self->fragment);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *record_number(RecordObject *self, void *closure) {
    PyObject *e = PyLong_FromLongLong(self->epoch), *sh = NULL, *n = NULL, *s = NULL, *r = NULL;
    if (e == NULL) return NULL;
    sh = PyLong_FromLong(48);
    if (sh != NULL) n = PyNumber_Lshift(e, sh);
    if (n != NULL) s = PyLong_FromLongLong(self->seq);
    if (s != NULL) r = PyNumber_Or(n, s);
    Py_DECREF(e);
    Py_XDECREF(sh);
    Py_XDECREF(n);
    Py_XDECREF(s);
    return r;
}

static PyObject *record_repr(RecordObject *self) {
    PyObject *hex = PyObject_CallMethod(self->cid ? self->cid : empty_bytes, "hex", NULL);
    if (hex == NULL) return NULL;
    PyObject *r = PyUnicode_FromFormat("Record(type=%lld, epoch=%lld, seq=%lld, cid=%U, %zd B)", self->type,
                                       self->epoch, self->seq, hex,
                                       self->fragment ? PyObject_Length(self->fragment) : (Py_ssize_t)0);
    Py_DECREF(hex);
    return r;
}

static PyMemberDef record_members[] = {
    {"type", T_LONGLONG, offsetof(RecordObject, type), 0, NULL},
    {"version", T_LONGLONG, offsetof(RecordObject, version), 0, NULL},
    {"epoch", T_LONGLONG, offsetof(RecordObject, epoch), 0, NULL},
    {"seq", T_LONGLONG, offsetof(RecordObject, seq), 0, NULL},
    {"cid", T_OBJECT_EX, offsetof(RecordObject, cid), 0, NULL},
    {"fragment", T_OBJECT_EX, offsetof(RecordObject, fragment), 0, NULL},
    {NULL},
};

static PyGetSetDef record_getset[] = {
    {"number", (getter)record_number, NULL, "epoch and sequence number as one integer (RFC 9146 §6)", NULL},
    {NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corem.dtls.engine._records.Record",
    .tp_basicsize = sizeof(RecordObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One record as parsed (records.RecordPy is the reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)record_init,
    .tp_dealloc = (destructor)record_dealloc,
    .tp_repr = (reprfunc)record_repr,
    .tp_members = record_members,
    .tp_getset = record_getset,
};

/* parse_record_untrusted(datagram, offset, cid_length) -> (Record, the offset after it) */
static PyObject *parse_record(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse_record_untrusted(datagram, offset, cid_length)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t cid_length = PyLong_AsSsize_t(args[2]);
    if (cid_length == -1 && PyErr_Occurred()) return NULL;
    if (offset < 0 || cid_length < 0 || cid_length > DTLS_MAX_CID) {
        PyErr_SetString(PyExc_ValueError, "offset or cid_length out of range");
        return NULL;
    }
    Py_buffer db;
    if (PyObject_GetBuffer(args[0], &db, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = NULL;
    size_t off = (size_t)offset;
    dtls_record r;
    dtls_status st = dtls_parse(db.buf, (size_t)db.len, &off, (size_t)cid_length, &r);
    if (st != DTLS_OK) {
        refuse(st);
        goto done;
    }
    RecordObject *rec = PyObject_New(RecordObject, &RecordType);
    if (rec == NULL) goto done;
    rec->type = r.type;
    rec->version = r.version;
    rec->epoch = r.epoch;
    rec->seq = (long long)r.seq;
    rec->cid = r.cid_len ? PyBytes_FromStringAndSize((const char *)r.cid, (Py_ssize_t)r.cid_len)
                         : Py_NewRef(empty_bytes);
    rec->fragment = PyBytes_FromStringAndSize((const char *)r.fragment, (Py_ssize_t)r.length);
    if (rec->cid == NULL || rec->fragment == NULL) {
        Py_DECREF(rec);
        goto done;
    }
    result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(rec);
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, (PyObject *)rec);
    PyObject *end = PyLong_FromSize_t(off);
    if (end == NULL) Py_CLEAR(result);
    else PyTuple_SET_ITEM(result, 1, end);
done:
    PyBuffer_Release(&db);
    return result;
}

/* -- Protection ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    dtls_prot p;
    PyObject *iv;
    /* a write protection's sequence numbers (RFC 6347 §4.1): the next one, and the first one it may
     * not use (state.export's reservation); one counter for Python's Connection and the lane */
    uint64_t next_seq, limit;
} ProtObject;

static int prot_init(ProtObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cipher", "key", "iv", NULL};
    const char *cipher;
    Py_buffer key, iv;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sy*y*:RecordProtection", kwlist, &cipher, &key, &iv))
        return -1;
    int rc = -1;
    dtls_aead a;
    if (strcmp(cipher, "ccm8") == 0) a = DTLS_CCM8;
    else if (strcmp(cipher, "ccm") == 0) a = DTLS_CCM;
    else if (strcmp(cipher, "gcm") == 0) a = DTLS_GCM;
    else {
        PyErr_Format(PyExc_ValueError, "unknown AEAD '%s'", cipher);
        goto out;
    }
    if (key.len != 16 || iv.len != 4) {
        PyErr_SetString(PyExc_ValueError, "AES-128 takes a 16-byte key and a 4-byte implicit IV");
        goto out;
    }
    if (self->p.ctx != NULL) dtls_prot_free(&self->p);
    if (dtls_prot_init(&self->p, a, key.buf, iv.buf) < 0) {
        PyErr_SetString(PyExc_MemoryError, "libcrypto could not make the AEAD context");
        goto out;
    }
    Py_XSETREF(self->iv, PyBytes_FromStringAndSize(iv.buf, 4));
    if (self->iv == NULL) goto out;
    self->next_seq = 0;
    self->limit = DTLS_SEQ_MAX;
    rc = 0;
out:
    PyBuffer_Release(&key);
    PyBuffer_Release(&iv);
    return rc;
}

static void prot_dealloc(ProtObject *self) {
    dtls_prot_free(&self->p);
    Py_XDECREF(self->iv);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(ProtObject *self) {
    if (self->p.ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "RecordProtection is not initialised");
        return 0;
    }
    return 1;
}

/* seal(ctype, epoch, seq, plaintext, cid=b"", padding=0) -> bytes (vectorcall: the argument
 * parsing of PyArg_ParseTupleAndKeywords cost as much as the AEAD) */
static PyObject *seal_names[6];

static PyObject *prot_seal(ProtObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *a[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    if (!ready(self)) return NULL;
    if (nargs > 6) goto usage;
    for (Py_ssize_t i = 0; i < nargs; i++) a[i] = args[i];
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            int j = 0;
            while (j < 6 && name != seal_names[j] && PyUnicode_Compare(name, seal_names[j]) != 0) j++;
            if (j == 6 || a[j] != NULL) goto usage;
            a[j] = args[nargs + k];
        }
    }
    if (a[0] == NULL || a[1] == NULL || a[2] == NULL || a[3] == NULL) goto usage;
    if (!PyLong_Check(a[0]) || !PyLong_Check(a[1]) || (a[5] != NULL && !PyLong_Check(a[5]))) {
        PyErr_SetString(PyExc_TypeError, "ctype, epoch and padding are ints");
        return NULL;
    }
    int ctype_overflow = 0;
    long ctype = PyLong_AsLongAndOverflow(a[0], &ctype_overflow);
    if (ctype_overflow) ctype = -1;
    int epoch_overflow = 0;
    long epoch = PyLong_AsLongAndOverflow(a[1], &epoch_overflow);
    Py_ssize_t padding = 0;
    if (a[5] != NULL) {
        padding = PyLong_AsSsize_t(a[5]);
        if (padding == -1 && PyErr_Occurred()) return NULL;
    }
    if (PyErr_Occurred()) return NULL;
    PyObject *seq_obj = a[2];
    Py_buffer plain, cid = {0};
    if (PyObject_GetBuffer(a[3], &plain, PyBUF_SIMPLE) < 0) return NULL;
    if (a[4] != NULL && PyObject_GetBuffer(a[4], &cid, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&plain);
        return NULL;
    }
    if (epoch_overflow) epoch = -1;
    PyObject *out = NULL;
    unsigned long long seq;
    if (!PyLong_Check(seq_obj)) {
        PyErr_SetString(PyExc_TypeError, "seq must be an int");
        goto done;
    }
    if (_PyLong_Sign(seq_obj) < 0) {
        PyErr_SetString(PyExc_OverflowError, "a negative sequence number");
        goto done;
    }
    seq = PyLong_AsUnsignedLongLong(seq_obj);
    if (PyErr_Occurred()) goto done;
    if (seq > DTLS_SEQ_MAX) {
        PyErr_SetString(PyExc_OverflowError, "sequence number over 2^48 - 1 (exhausted)");
        goto done;
    }
    if (ctype < 0 || ctype > 255) {
        PyErr_SetString(PyExc_ValueError, "content type out of range");
        goto done;
    }
    if (epoch < 0 || epoch > 0xFFFF) {
        PyErr_SetString(PyExc_OverflowError, "epoch out of range");
        goto done;
    }
    if (padding < 0) {
        PyErr_SetString(PyExc_ValueError, "negative padding");
        goto done;
    }
    size_t cid_len = cid.obj ? (size_t)cid.len : 0;
    size_t total = dtls_sealed_size(&self->p, (size_t)plain.len, cid_len, (size_t)padding);
    if (total == 0) {
        PyErr_SetString(PyExc_ValueError, "record_overflow: the record would be over DTLS's limits");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) goto done;
    if (dtls_seal(&self->p, (uint8_t)ctype, (uint16_t)epoch, seq, plain.buf, (size_t)plain.len,
                  cid_len ? cid.buf : NULL, cid_len, (size_t)padding, (uint8_t *)PyBytes_AS_STRING(out)) < 0) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed to seal a record");
    }
done:
    PyBuffer_Release(&plain);
    if (cid.obj) PyBuffer_Release(&cid);
    return out;
usage:
    PyErr_SetString(PyExc_TypeError, "seal(ctype, epoch, seq, plaintext, cid=b'', padding=0)");
    return NULL;
}

/* the plaintext of an opened record: `out` resized to its length */
static PyObject *opened(PyObject *out, size_t plain_len, uint8_t ctype) {
    if ((size_t)PyBytes_GET_SIZE(out) != plain_len && _PyBytes_Resize(&out, (Py_ssize_t)plain_len) < 0) return NULL;
    PyObject *t = PyTuple_New(2);
    if (t == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, PyLong_FromLong(ctype));
    PyTuple_SET_ITEM(t, 1, out);
    return t;
}

static int attr_long(PyObject *rec, PyObject *name, long long lo, long long hi, long long *v) {
    PyObject *o = PyObject_GetAttr(rec, name);
    if (o == NULL) return -1;
    *v = PyLong_AsLongLong(o);
    Py_DECREF(o);
    if (*v == -1 && PyErr_Occurred()) return -1;
    if (*v < lo || *v > hi) {
        PyErr_Format(PyExc_ValueError, "record field %S out of range", name);
        return -1;
    }
    return 0;
}

/* open_untrusted(record) -> (content type, plaintext) */
static PyObject *prot_open_untrusted(ProtObject *self, PyObject *rec) {
    if (!ready(self)) return NULL;
    long long type, version, epoch, seq;
    PyObject *cid, *frag;
    if (Py_TYPE(rec) == &RecordType) { /* (the C parser's: no attribute lookups) */
        RecordObject *ro = (RecordObject *)rec;
        type = ro->type;
        version = ro->version;
        epoch = ro->epoch;
        seq = ro->seq;
        if (type < 0 || type > 255 || version < 0 || version > 0xFFFF || epoch < 0 || epoch > 0xFFFF || seq < 0 ||
            seq > (long long)DTLS_SEQ_MAX || ro->cid == NULL || ro->fragment == NULL) {
            PyErr_SetString(PyExc_ValueError, "record field out of range");
            return NULL;
        }
        cid = Py_NewRef(ro->cid);
        frag = Py_NewRef(ro->fragment);
    } else {
        if (attr_long(rec, str_type, 0, 255, &type) < 0 || attr_long(rec, str_version, 0, 0xFFFF, &version) < 0 ||
            attr_long(rec, str_epoch, 0, 0xFFFF, &epoch) < 0 || attr_long(rec, str_seq, 0, DTLS_SEQ_MAX, &seq) < 0)
            return NULL;
        cid = PyObject_GetAttr(rec, str_cid);
        if (cid == NULL) return NULL;
        frag = PyObject_GetAttr(rec, str_fragment);
        if (frag == NULL) {
            Py_DECREF(cid);
            return NULL;
        }
    }
    PyObject *result = NULL, *out = NULL;
    Py_buffer cb = {0}, fb = {0};
    if (PyObject_GetBuffer(cid, &cb, PyBUF_SIMPLE) < 0 || PyObject_GetBuffer(frag, &fb, PyBUF_SIMPLE) < 0) goto done;
    if (cb.len > DTLS_MAX_CID) {
        PyErr_SetString(PyExc_ValueError, "a CID over 255 bytes");
        goto done;
    }
    dtls_record r = {.type = (uint8_t)type, .version = (uint16_t)version, .epoch = (uint16_t)epoch,
                     .seq = (uint64_t)seq, .cid = cb.buf, .cid_len = (size_t)cb.len, .fragment = fb.buf,
                     .length = (size_t)fb.len};
    if (r.length > DTLS_MAX_FRAGMENT) {
        refuse(DTLS_R_OVERFLOW);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)r.length);
    if (out == NULL) goto done;
    size_t plain_len = 0;
    uint8_t ctype = 0;
    dtls_status s = dtls_open(&self->p, &r, (uint8_t *)PyBytes_AS_STRING(out), &plain_len, &ctype);
    if (s != DTLS_OK) {
        refuse(s);
        goto done;
    }
    result = opened(out, plain_len, ctype);
    out = NULL;
done:
    Py_XDECREF(out);
    if (cb.obj) PyBuffer_Release(&cb);
    if (fb.obj) PyBuffer_Release(&fb);
    Py_DECREF(cid);
    Py_DECREF(frag);
    return result;
}

/* open_record_untrusted(datagram, offset, cid, window, epoch=1) -> (ctype, plaintext, number, end) */
static PyObject *prot_open_record(ProtObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self)) return NULL;
    if (nargs < 4 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "open_record_untrusted(datagram, offset, cid, window, epoch=1)");
        return NULL;
    }
    if (Py_TYPE(args[3]) != &WindowType) {
        PyErr_SetString(PyExc_TypeError, "window must be a records.ReplayWindow");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    long epoch = 1;
    if (nargs == 5) {
        epoch = PyLong_AsLong(args[4]);
        if (epoch == -1 && PyErr_Occurred()) return NULL;
    }
    if (offset < 0 || epoch < 0 || epoch > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "offset or epoch out of range");
        return NULL;
    }
    Py_buffer db, cb;
    if (PyObject_GetBuffer(args[0], &db, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &cb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&db);
        return NULL;
    }
    PyObject *result = NULL, *out = NULL;
    if (cb.len > DTLS_MAX_CID) {
        PyErr_SetString(PyExc_ValueError, "a CID over 255 bytes");
        goto done;
    }
    /* (the plaintext is at most the fragment: at most what is left of the datagram) */
    size_t left = (size_t)offset < (size_t)db.len ? (size_t)db.len - (size_t)offset : 0;
    size_t room = left < DTLS_MAX_FRAGMENT ? left : DTLS_MAX_FRAGMENT;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)room);
    if (out == NULL) goto done;
    size_t off = (size_t)offset, plain_len = 0;
    uint8_t ctype = 0;
    uint64_t number = 0;
    dtls_status s = dtls_open_record(&self->p, &((WindowObject *)args[3])->w, db.buf, (size_t)db.len, &off, cb.buf,
                                     (size_t)cb.len, (uint16_t)epoch, (uint8_t *)PyBytes_AS_STRING(out), &plain_len,
                                     &ctype, &number);
    if (s != DTLS_OK) {
        refuse(s);
        goto done;
    }
    PyObject *pair = opened(out, plain_len, ctype);
    out = NULL;
    if (pair == NULL) goto done;
    result = PyTuple_New(4);
    if (result != NULL) {
        PyObject *t = PyTuple_GET_ITEM(pair, 0), *plain = PyTuple_GET_ITEM(pair, 1);
        Py_INCREF(t);
        Py_INCREF(plain);
        PyTuple_SET_ITEM(result, 0, t);
        PyTuple_SET_ITEM(result, 1, plain);
        PyTuple_SET_ITEM(result, 2, PyLong_FromUnsignedLongLong(number));
        PyTuple_SET_ITEM(result, 3, PyLong_FromSize_t(off));
        if (PyErr_Occurred()) Py_CLEAR(result);
    }
    Py_DECREF(pair);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&db);
    PyBuffer_Release(&cb);
    return result;
}

/* The next record under this (write) protection: next_seq is used, then counted.  0 (nothing
 * consumed) when it is at or past `limit`; -1 (nothing consumed) when the numbers are exhausted or
 * libcrypto failed; -2 when it would not fit in `room`. */
static Py_ssize_t seal_next_into(ProtObject *self, uint8_t ctype, const uint8_t *plain, size_t plain_len,
                                 const uint8_t *cid, size_t cid_len, uint8_t *out, size_t room) {
    uint64_t seq = self->next_seq;
    if (seq > DTLS_SEQ_MAX || self->p.ctx == NULL) return -1; /* (exhausted first: no reservation helps) */
    if (seq >= self->limit) return 0;
    size_t total = dtls_sealed_size(&self->p, plain_len, cid_len, 0);
    if (total == 0 || total > room) return -2;
    if (dtls_seal(&self->p, ctype, 1, seq, plain, plain_len, cid, cid_len, 0, out) < 0) return -1;
    self->next_seq = seq + 1;
    return (Py_ssize_t)total;
}

/* seal_next(ctype, plaintext, cid=b"") -> the record of epoch 1 with the next sequence number, or
 * None when the reservation is used up (the number is at `limit`: nothing consumed) */
static PyObject *prot_seal_next(ProtObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self)) return NULL;
    if (nargs < 2 || nargs > 3 || !PyLong_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "seal_next(ctype, plaintext, cid=b'')");
        return NULL;
    }
    long ctype = PyLong_AsLong(args[0]);
    if (ctype == -1 && PyErr_Occurred()) return NULL;
    if (ctype < 0 || ctype > 255) {
        PyErr_SetString(PyExc_ValueError, "content type out of range");
        return NULL;
    }
    if (self->next_seq > DTLS_SEQ_MAX) { /* (exhausted first: no reservation helps) */
        PyErr_SetString(PyExc_OverflowError, "sequence number over 2^48 - 1 (exhausted)");
        return NULL;
    }
    if (self->next_seq >= self->limit) Py_RETURN_NONE;
    Py_buffer plain, cid = {0};
    if (PyObject_GetBuffer(args[1], &plain, PyBUF_SIMPLE) < 0) return NULL;
    if (nargs == 3 && PyObject_GetBuffer(args[2], &cid, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&plain);
        return NULL;
    }
    PyObject *out = NULL;
    size_t cid_len = cid.obj ? (size_t)cid.len : 0;
    size_t total = dtls_sealed_size(&self->p, (size_t)plain.len, cid_len, 0);
    if (total == 0) {
        PyErr_SetString(PyExc_ValueError, "record_overflow: the record would be over DTLS's limits");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) goto done;
    if (seal_next_into(self, (uint8_t)ctype, plain.buf, (size_t)plain.len, cid_len ? cid.buf : NULL, cid_len,
                       (uint8_t *)PyBytes_AS_STRING(out), total) != (Py_ssize_t)total) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed to seal a record");
    }
done:
    PyBuffer_Release(&plain);
    if (cid.obj) PyBuffer_Release(&cid);
    return out;
}

static PyObject *prot_get_seq(ProtObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(closure ? self->limit : self->next_seq);
}

static int prot_set_seq(ProtObject *self, PyObject *v, void *closure) {
    if (v == NULL || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "a sequence number is an int");
        return -1;
    }
    if (_PyLong_Sign(v) < 0) {
        PyErr_SetString(PyExc_OverflowError, "a negative sequence number");
        return -1;
    }
    unsigned long long n = PyLong_AsUnsignedLongLong(v);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (n > DTLS_SEQ_MAX + 1) {
        PyErr_SetString(PyExc_OverflowError, "a sequence number is at most 2^48");
        return -1;
    }
    if (closure) self->limit = n;
    else self->next_seq = n;
    return 0;
}

/* -- the fast lane's table (dtls_lane_api, in dtls_records.h) ---------------------------------- */

static int api_open_one(PyObject *prot, PyObject *window, const uint8_t *buf, size_t len, const uint8_t *cid,
                        size_t cid_len, uint8_t *out, size_t *plain_len, uint8_t *ctype, uint64_t *seq) {
    ProtObject *p = (ProtObject *)prot;
    dtls_window *w = &((WindowObject *)window)->w;
    if (p->p.ctx == NULL) return DTLS_R_INTERNAL;
    size_t off = 0;
    dtls_record r;
    dtls_status s = dtls_parse(buf, len, &off, cid_len, &r);
    if (s != DTLS_OK) return s;
    if (off != len) return -1;
    if (r.epoch != 1) return DTLS_R_EPOCH;
    if (r.type != (cid_len ? DTLS_TLS12_CID : 23) || (cid_len && memcmp(r.cid, cid, cid_len) != 0))
        return DTLS_R_CID_MISMATCH;
    if (!dtls_window_fresh(w, (int64_t)r.seq)) return DTLS_R_REPLAYED;
    s = dtls_open(&p->p, &r, out, plain_len, ctype);
    if (s != DTLS_OK) return s;
    *seq = r.seq;
    return 0;
}

static void api_mark(PyObject *window, uint64_t seq) { dtls_window_mark(&((WindowObject *)window)->w, (int64_t)seq); }

static Py_ssize_t api_seal_next(PyObject *prot, uint8_t ctype, const uint8_t *plain, size_t plain_len,
                                const uint8_t *cid, size_t cid_len, uint8_t *out, size_t room) {
    Py_ssize_t n = seal_next_into((ProtObject *)prot, ctype, plain, plain_len, cid, cid_len, out, room);
    return n == -2 ? 0 : n;
}

static int64_t api_window_top(PyObject *window) { return ((WindowObject *)window)->w.top; }

static dtls_lane_api lane_api = {DTLS_LANE_API_VERSION, NULL, NULL, api_open_one, api_mark, api_seal_next,
                                 api_window_top};

static PyObject *prot_get_iv(ProtObject *self, void *closure) {
    if (!ready(self)) return NULL;
    Py_INCREF(self->iv);
    return self->iv;
}

static PyObject *prot_get_tag(ProtObject *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyLong_FromLong(self->p.tag);
}

static PyObject *prot_get_overhead(ProtObject *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyLong_FromLong(DTLS_EXPLICIT_NONCE + self->p.tag);
}

static PyObject *prot_get_cipher(ProtObject *self, void *closure) {
    if (!ready(self)) return NULL;
    static const char *names[] = {"ccm8", "ccm", "gcm"};
    return PyUnicode_FromString(names[self->p.aead]);
}

static PyMethodDef prot_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))prot_seal, METH_FASTCALL | METH_KEYWORDS,
     "seal(ctype, epoch, seq, plaintext, cid=b'', padding=0) -> the whole record"},
    {"open_untrusted", (PyCFunction)prot_open_untrusted, METH_O,
     "open_untrusted(record) -> (content type, plaintext); DtlsDecodeError when refused"},
    {"seal_next", (PyCFunction)(void (*)(void))prot_seal_next, METH_FASTCALL,
     "seal_next(ctype, plaintext, cid=b'') -> the next record of epoch 1 (next_seq used, then counted), "
     "or None at `limit`"},
    {"open_record_untrusted", (PyCFunction)(void (*)(void))prot_open_record, METH_FASTCALL,
     "open_record_untrusted(datagram, offset, cid, window, epoch=1) -> (content type, plaintext, "
     "epoch << 48 | seq, the offset after the record); DtlsDecodeError when refused"},
    {NULL},
};

static PyGetSetDef prot_getset[] = {
    {"iv", (getter)prot_get_iv, NULL, NULL, NULL},
    {"tag", (getter)prot_get_tag, NULL, NULL, NULL},
    {"overhead", (getter)prot_get_overhead, NULL, NULL, NULL},
    {"cipher", (getter)prot_get_cipher, NULL, NULL, NULL},
    {"next_seq", (getter)prot_get_seq, (setter)prot_set_seq, "the next write sequence number", NULL},
    {"limit", (getter)prot_get_seq, (setter)prot_set_seq, "the first write sequence number not to use",
     (void *)1},
    {NULL},
};

static PyTypeObject ProtType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corem.dtls.engine._records.Protection",
    .tp_basicsize = sizeof(ProtObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One direction's AEAD state for one epoch on libcrypto (records.RecordProtectionPy is the "
              "reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)prot_init,
    .tp_dealloc = (destructor)prot_dealloc,
    .tp_methods = prot_methods,
    .tp_getset = prot_getset,
};

/* -- the module ------------------------------------------------------------------------------ */

static PyObject *configure(PyObject *module, PyObject *error_type) {
    Py_INCREF(error_type);
    Py_XSETREF(DecodeError, error_type);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)configure, METH_O, "configure(DtlsDecodeError): the error refusals raise"},
    {"parse_record_untrusted", (PyCFunction)(void (*)(void))parse_record, METH_FASTCALL,
     "parse_record_untrusted(datagram, offset, cid_length) -> (Record, the offset after it)"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "corem.dtls.engine._records", NULL, -1, methods};

PyMODINIT_FUNC PyInit__records(void) {
    if (dtls_cipher(DTLS_CCM) == NULL || dtls_cipher(DTLS_GCM) == NULL) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ImportError, "libcrypto offers no AES-128-CCM or AES-128-GCM");
        return NULL;
    }
    if (PyType_Ready(&WindowType) < 0 || PyType_Ready(&ProtType) < 0 || PyType_Ready(&RecordType) < 0) return NULL;
    if ((empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL) return NULL;
#define INTERN(v, s) if ((v = PyUnicode_InternFromString(s)) == NULL) return NULL
    INTERN(str_type, "type");
    INTERN(str_version, "version");
    INTERN(str_epoch, "epoch");
    INTERN(str_seq, "seq");
    INTERN(str_cid, "cid");
    INTERN(str_fragment, "fragment");
    static const char *const names[6] = {"ctype", "epoch", "seq", "plaintext", "cid", "padding"};
    for (int i = 0; i < 6; i++) INTERN(seal_names[i], names[i]);
    lane_api.protection = &ProtType;
    lane_api.window = &WindowType;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&WindowType);
    Py_INCREF(&ProtType);
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(m, "Record", (PyObject *)&RecordType) < 0 ||
        PyModule_AddObject(m, "Window", (PyObject *)&WindowType) < 0 ||
        PyModule_AddObject(m, "Protection", (PyObject *)&ProtType) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_HEADERS", OPENSSL_VERSION_TEXT) < 0 ||
        PyModule_AddObject(m, "_LANE_API", PyCapsule_New(&lane_api, DTLS_LANE_API_NAME, NULL)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
