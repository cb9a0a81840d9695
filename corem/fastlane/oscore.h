/*
 * OSCORE (RFC 8613) for the fast lane: a device's request opened and its first answer sealed in C,
 * on OpenSSL's libcrypto (EVP, AES-CCM-16-64-128: COSE alg 10, 16-byte key, 13-byte nonce, 8-byte
 * tag).  corem/oscore is the reference and stays the one place that refuses and explains: the lane
 * takes a request only when everything is as the common case has it, and hands anything else to
 * the Python path untouched -- its replay window untouched too.
 *
 * Two types, both made by Python:
 *  - OscoreWindow: a context's replay window (RFC 8613 §7.4, 32 numbers), the ONE window of the
 *    context -- corem/oscore/context.py's Context holds it (ReplayWindow is its Python twin) and
 *    the lane's entry shares it, so a request accepted by either path is a replay for the other.
 *  - OscoreContext: the keys the lane uses for one context (the recipient key opens the device's
 *    requests, the sender key seals corem's answers, the common IV), keyed once into two EVP
 *    contexts; the window; the device it names (tenant, device) and its target in the lane.
 * Header-only (static): _lane.c is one translation unit; include after Python.h.
 */
#ifndef COREM_LANE_OSCORE_H
#define COREM_LANE_OSCORE_H

#include <stdint.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "../dtls/engine/aead_ccm.h"

#define OSC_WINDOW 32
#define OSC_KEY 16
#define OSC_NONCE 13
#define OSC_TAG 8
#define OSC_MAX_ID 7  /* a kid is at most nonce length - 6 bytes (§3.3) */
#define OSC_MAX_PIV 5 /* a partial IV at most 5 bytes (§6.1) */
#define OSC_AAD_MAX 32 /* the Enc_structure with the longest kid and partial IV: 31 bytes */
#define OSC_OPTION 9   /* the OSCORE option */

/* -- the replay window: corem/oscore/context.py ReplayWindow ---------------------------------- */
typedef struct {
    PyObject_HEAD
    int64_t top;   /* the highest number accepted (-1: none) */
    uint32_t bits; /* bit i: top - i was accepted */
    int ready;     /* 0: unknown after a restart (Echo starts it): nothing is fresh */
} OscWindow;

static inline int osc_fresh(const OscWindow *w, int64_t seq) {
    if (!w->ready) return 0;
    if (seq > w->top) return 1;
    int64_t age = w->top - seq;
    return age < OSC_WINDOW && !((w->bits >> age) & 1);
}

/* (after the request decrypted, never before: a forged number must not move the window) */
static inline void osc_accept(OscWindow *w, int64_t seq) {
    if (seq > w->top) {
        int64_t shift = seq - w->top;
        w->bits = shift < OSC_WINDOW ? (w->bits << shift) | 1u : 1u;
        w->top = seq;
    } else if (w->top - seq < OSC_WINDOW) {
        w->bits |= 1u << (w->top - seq);
    }
}

static PyObject *OscWindow_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    int ready = 0;
    static char *names[] = {"ready", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "p", names, &ready)) return NULL;
    OscWindow *w = (OscWindow *)type->tp_alloc(type, 0);
    if (!w) return NULL;
    w->top = -1;
    w->bits = 0;
    w->ready = ready;
    return (PyObject *)w;
}

/* a sequence number from Python: 0 .. 2^40 - 1 (a Partial IV of at most 5 bytes) */
static int osc_seq(PyObject *arg, int64_t *seq) {
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > (1LL << 40) - 1) {
        PyErr_SetString(PyExc_ValueError, "an OSCORE sequence number is 0 .. 2**40 - 1");
        return -1;
    }
    *seq = v;
    return 0;
}

static PyObject *OscWindow_fresh(OscWindow *w, PyObject *arg) {
    int64_t seq;
    if (osc_seq(arg, &seq) < 0) return NULL;
    return PyBool_FromLong(osc_fresh(w, seq));
}

static PyObject *OscWindow_accept(OscWindow *w, PyObject *arg) {
    int64_t seq;
    if (osc_seq(arg, &seq) < 0) return NULL;
    osc_accept(w, seq);
    Py_RETURN_NONE;
}

/* Echo proved the request numbered `seq` fresh: nothing before it is accepted again. */
static PyObject *OscWindow_start_at(OscWindow *w, PyObject *arg) {
    int64_t seq;
    if (osc_seq(arg, &seq) < 0) return NULL;
    w->top = seq;
    w->bits = 0xffffffffu;
    w->ready = 1;
    Py_RETURN_NONE;
}

static PyObject *OscWindow_get_top(OscWindow *w, void *unused) { return PyLong_FromLongLong(w->top); }
static PyObject *OscWindow_get_bits(OscWindow *w, void *unused) { return PyLong_FromUnsignedLong(w->bits); }
static PyObject *OscWindow_get_ready(OscWindow *w, void *unused) { return PyBool_FromLong(w->ready); }

static PyMethodDef OscWindow_methods[] = {
    {"fresh", (PyCFunction)OscWindow_fresh, METH_O, "fresh(seq) -> bool: not seen, and not older than the window"},
    {"accept", (PyCFunction)OscWindow_accept, METH_O, "accept(seq): mark it seen (after it decrypted)"},
    {"start_at", (PyCFunction)OscWindow_start_at, METH_O, "start_at(seq): Echo proved `seq` fresh; nothing older"},
    {NULL},
};

static PyGetSetDef OscWindow_getset[] = {
    {"top", (getter)OscWindow_get_top, NULL, "the highest number accepted (-1: none)", NULL},
    {"bits", (getter)OscWindow_get_bits, NULL, "bit i: top - i was accepted", NULL},
    {"ready", (getter)OscWindow_get_ready, NULL, "False until Echo starts a window unknown after a restart", NULL},
    {NULL},
};

static PyTypeObject OscWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "corem.fastlane._lane.OscoreWindow",
    .tp_basicsize = sizeof(OscWindow),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An OSCORE context's replay window (RFC 8613 §7.4), shared by the lane and corem/oscore "
              "(context.py's ReplayWindow is its twin): OscoreWindow(ready)",
    .tp_new = OscWindow_new,
    .tp_methods = OscWindow_methods,
    .tp_getset = OscWindow_getset,
};

/* -- AES-CCM-16-64-128 on EVP ------------------------------------------------------------------- */
/* A context keyed once for one direction (13-byte nonce: L = 2, 8-byte tag); NULL if libcrypto
 * could not (no exception set). */
static EVP_CIPHER_CTX *osc_keyed(const uint8_t key[OSC_KEY], int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && aead_ccm_init(ctx, enc, key, OSC_NONCE, OSC_TAG)) return ctx;
    ERR_clear_error();
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* §5.2: [size of ID_PIV][ID_PIV, left-padded to 7][PIV, left-padded to 5] XOR the common IV */
static inline void osc_nonce(const uint8_t iv[OSC_NONCE], const uint8_t *kid, size_t kidlen, const uint8_t *piv,
                             size_t pivlen, uint8_t out[OSC_NONCE]) {
    memset(out, 0, OSC_NONCE);
    out[0] = (uint8_t)kidlen;
    memcpy(out + 1 + (OSC_MAX_ID - kidlen), kid, kidlen);
    memcpy(out + 8 + (OSC_MAX_PIV - pivlen), piv, pivlen);
    for (int i = 0; i < OSC_NONCE; i++) out[i] ^= iv[i];
}

/* §5.4 (protect.py `aad`): ["Encrypt0", h'', bstr(external_aad)] with external_aad
 * [1, [10], request_kid, request_piv, h''] -- the same for a request and its answers.  Its length. */
static inline size_t osc_aad(const uint8_t *kid, size_t kidlen, const uint8_t *piv, size_t pivlen,
                             uint8_t out[OSC_AAD_MAX]) {
    static const uint8_t head[] = {0x83, 0x68, 'E', 'n', 'c', 'r', 'y', 'p', 't', '0', 0x40};
    uint8_t *o = out;
    memcpy(o, head, sizeof head);
    o += sizeof head;
    *o++ = (uint8_t)(0x40 | (4 + 1 + kidlen + 1 + pivlen + 1)); /* the external AAD's bstr (< 24 bytes) */
    *o++ = 0x85;
    *o++ = 0x01;
    *o++ = 0x81;
    *o++ = 10; /* AES-CCM-16-64-128 */
    *o++ = (uint8_t)(0x40 | kidlen);
    memcpy(o, kid, kidlen);
    o += kidlen;
    *o++ = (uint8_t)(0x40 | pivlen);
    memcpy(o, piv, pivlen);
    o += pivlen;
    *o++ = 0x40;
    return (size_t)(o - out);
}

/* The OSCORE option of a request the lane may take (§6.1; protect.py `parse_option` is the
 * reference): reserved bits clear, a partial IV of 1-5 bytes, the kid flag, an optional kid
 * context, a kid of at most 7 bytes.  0 and the parts, or -1: the Python path's (it refuses or
 * explains what is wrong, or serves what the lane does not: no partial IV, no kid). */
typedef struct {
    const uint8_t *piv, *kid, *kidctx;
    size_t pivlen, kidlen, kidctxlen;
} osc_option_t;

static inline int osc_option(const uint8_t *v, size_t len, osc_option_t *o) {
    if (len < 1) return -1;
    uint8_t flags = v[0];
    size_t n = flags & 7, pos = 1;
    if ((flags & 0xE0) || n < 1 || n > OSC_MAX_PIV || pos + n > len || !(flags & 0x08)) return -1;
    o->piv = v + pos;
    o->pivlen = n;
    pos += n;
    o->kidctx = NULL;
    o->kidctxlen = 0;
    if (flags & 0x10) {
        if (pos >= len) return -1;
        size_t s = v[pos];
        if (pos + 1 + s > len) return -1;
        o->kidctx = v + pos + 1;
        o->kidctxlen = s;
        pos += 1 + s;
    }
    o->kid = v + pos;
    o->kidlen = len - pos;
    return o->kidlen <= OSC_MAX_ID ? 0 : -1;
}

/* -- a context the lane holds ------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *open, *seal; /* the recipient key's (decrypt), the sender key's (encrypt) */
    uint8_t iv[OSC_NONCE];
    OscWindow *window;
    PyObject *name;       /* (tenant, device): its device, found in the lane's positions */
    Py_ssize_t target;    /* that device's target, as of targets_gen */
    uint64_t targets_gen;
} OscContext;

static void OscContext_dealloc(OscContext *c) {
    PyObject_GC_UnTrack(c);
    EVP_CIPHER_CTX_free(c->open);
    EVP_CIPHER_CTX_free(c->seal);
    OPENSSL_cleanse(c->iv, sizeof c->iv);
    Py_CLEAR(c->window);
    Py_CLEAR(c->name);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int OscContext_traverse(OscContext *c, visitproc visit, void *arg) {
    Py_VISIT(c->window);
    Py_VISIT(c->name);
    return 0;
}

static int OscContext_clear(OscContext *c) {
    Py_CLEAR(c->window);
    Py_CLEAR(c->name);
    return 0;
}

/* OscoreContext(recipient_key, sender_key, common_iv, window, name) */
static PyObject *OscContext_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    const char *rk, *sk, *iv;
    Py_ssize_t rkl, skl, ivl;
    PyObject *window, *name;
    if (!PyArg_ParseTuple(args, "y#y#y#O!O", &rk, &rkl, &sk, &skl, &iv, &ivl, &OscWindowType, &window, &name))
        return NULL;
    if (rkl != OSC_KEY || skl != OSC_KEY || ivl != OSC_NONCE) {
        PyErr_SetString(PyExc_ValueError, "OscoreContext: keys of 16 bytes, a common IV of 13");
        return NULL;
    }
    OscContext *c = (OscContext *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    c->open = osc_keyed((const uint8_t *)rk, 0);
    c->seal = osc_keyed((const uint8_t *)sk, 1);
    if (!c->open || !c->seal) {
        Py_DECREF(c);
        PyErr_SetString(PyExc_RuntimeError, "OscoreContext: libcrypto has no AES-128-CCM");
        return NULL;
    }
    memcpy(c->iv, iv, OSC_NONCE);
    Py_INCREF(window);
    c->window = (OscWindow *)window;
    Py_INCREF(name);
    c->name = name;
    c->target = -1;
    c->targets_gen = 0;
    return (PyObject *)c;
}

/* open(kid, piv, ciphertext) -> plaintext, or None if it does not authenticate (tests: the C
 * cipher against `cryptography`'s) */
static PyObject *OscContext_open(OscContext *c, PyObject *args) {
    const char *kid, *piv, *ct;
    Py_ssize_t kl, pl, cl;
    if (!PyArg_ParseTuple(args, "y#y#y#", &kid, &kl, &piv, &pl, &ct, &cl)) return NULL;
    if (kl > OSC_MAX_ID || pl > OSC_MAX_PIV || cl <= OSC_TAG) {
        PyErr_SetString(PyExc_ValueError, "open: a kid of at most 7 bytes, a piv of at most 5, a ciphertext and tag");
        return NULL;
    }
    uint8_t nonce[OSC_NONCE], aad[OSC_AAD_MAX], tag[OSC_TAG];
    osc_nonce(c->iv, (const uint8_t *)kid, (size_t)kl, (const uint8_t *)piv, (size_t)pl, nonce);
    size_t al = osc_aad((const uint8_t *)kid, (size_t)kl, (const uint8_t *)piv, (size_t)pl, aad);
    size_t n = (size_t)cl - OSC_TAG;
    memcpy(tag, ct + n, OSC_TAG);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!out) return NULL;
    int r = aead_ccm(c->open, 0, NULL, nonce, aad, al, (const uint8_t *)ct, (uint8_t *)PyBytes_AS_STRING(out), n, tag,
                     OSC_TAG);
    if (r == 1) return out;
    Py_DECREF(out);
    if (r == 0) Py_RETURN_NONE;
    PyErr_SetString(PyExc_RuntimeError, "libcrypto failed");
    return NULL;
}

/* seal(kid, piv, plaintext) -> ciphertext and tag: an answer with the request's nonce */
static PyObject *OscContext_seal(OscContext *c, PyObject *args) {
    const char *kid, *piv, *pt;
    Py_ssize_t kl, pl, tl;
    if (!PyArg_ParseTuple(args, "y#y#y#", &kid, &kl, &piv, &pl, &pt, &tl)) return NULL;
    if (kl > OSC_MAX_ID || pl > OSC_MAX_PIV || tl < 1) {
        PyErr_SetString(PyExc_ValueError, "seal: a kid of at most 7 bytes, a piv of at most 5, a plaintext");
        return NULL;
    }
    uint8_t nonce[OSC_NONCE], aad[OSC_AAD_MAX];
    osc_nonce(c->iv, (const uint8_t *)kid, (size_t)kl, (const uint8_t *)piv, (size_t)pl, nonce);
    size_t al = osc_aad((const uint8_t *)kid, (size_t)kl, (const uint8_t *)piv, (size_t)pl, aad);
    PyObject *out = PyBytes_FromStringAndSize(NULL, tl + OSC_TAG);
    if (!out) return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    if (aead_ccm(c->seal, 1, NULL, nonce, aad, al, (const uint8_t *)pt, o, (size_t)tl, o + tl, OSC_TAG) != 1) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed");
        return NULL;
    }
    return out;
}

static PyObject *OscContext_get_window(OscContext *c, void *unused) { return Py_NewRef((PyObject *)c->window); }
static PyObject *OscContext_get_name(OscContext *c, void *unused) { return Py_NewRef(c->name); }

static PyMethodDef OscContext_methods[] = {
    {"open", (PyCFunction)OscContext_open, METH_VARARGS, "open(kid, piv, ciphertext) -> plaintext | None"},
    {"seal", (PyCFunction)OscContext_seal, METH_VARARGS, "seal(kid, piv, plaintext) -> ciphertext (the request's nonce)"},
    {NULL},
};

static PyGetSetDef OscContext_getset[] = {
    {"window", (getter)OscContext_get_window, NULL, "its replay window (the context's own)", NULL},
    {"name", (getter)OscContext_get_name, NULL, "(tenant, device)", NULL},
    {NULL},
};

static PyTypeObject OscContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "corem.fastlane._lane.OscoreContext",
    .tp_basicsize = sizeof(OscContext),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One OSCORE context as a lane holds it: OscoreContext(recipient_key, sender_key, common_iv, window, "
              "(tenant, device)) -- one per lane (it caches its device's target there)",
    .tp_new = OscContext_new,
    .tp_dealloc = (destructor)OscContext_dealloc,
    .tp_traverse = (traverseproc)OscContext_traverse,
    .tp_clear = (inquiry)OscContext_clear,
    .tp_methods = OscContext_methods,
    .tp_getset = OscContext_getset,
};

/* The lane's table key of a request's context: [len(kid context)] kid context, kid -- the same
 * lookup as the registry's (no kid context and an empty one are the same), made by FastLane too. */
static PyObject *osc_key(const osc_option_t *o) {
    uint8_t k[1 + 255 + OSC_MAX_ID];
    k[0] = (uint8_t)o->kidctxlen;
    if (o->kidctxlen) memcpy(k + 1, o->kidctx, o->kidctxlen);
    memcpy(k + 1 + o->kidctxlen, o->kid, o->kidlen);
    return PyBytes_FromStringAndSize((const char *)k, (Py_ssize_t)(1 + o->kidctxlen + o->kidlen));
}

#endif
