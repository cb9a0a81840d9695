/*
 * DTLS 1.2 record protection (RFC 6347 §4.1, AEAD records of RFC 5246 §6.2.3.3 / RFC 5288 /
 * RFC 6655, Connection ID records of RFC 9146 §4-5) on OpenSSL's libcrypto (EVP), for every C
 * reader and writer of records: the extension module (_records.c) and, later, the fast lane.
 * Header-only (static): each extension is one translation unit.  records.py is the reference
 * (the same layouts, the same refusals in the same order, checked by tests/test_dtls_records_c.py).
 *
 * A dtls_prot is one direction of one epoch: the EVP_CIPHER_CTX is made and keyed once
 * (dtls_prot_init) and only re-initialised with each record's nonce (no allocation per record).
 * Nothing here reads at or past the end of what it is given; a refusal is a dtls_status > 0
 * (dtls_status_alert / dtls_status_reason name it as records.py does), never a partial result:
 * the window moves only after a record authenticated, and a plaintext is only handed out whole.
 */
/* -- the C API _records exports to the fast lane (issue 27) --------------------------------------
 * A capsule (PyCapsule_Import(DTLS_LANE_API_NAME)) holding this table: the lane opens and seals
 * the records of established sessions with the session's own Protection and Window objects (the
 * ones records.py's Connection holds), so the replay window and the write sequence number stay
 * ONE state whichever side takes a record.  A reader that wants only this table (the lane, which
 * calls the records through it) defines DTLS_RECORDS_API_ONLY before including this file, after
 * Python.h. */
#if defined(Py_PYTHON_H) && !defined(COREM_DTLS_LANE_API)
#define COREM_DTLS_LANE_API
#include <stdint.h>
#define DTLS_LANE_API_NAME "corem.dtls.engine._records._LANE_API"
#define DTLS_LANE_API_VERSION 1
typedef struct {
    int version;
    PyTypeObject *protection, *window; /* the types the objects given must be (exactly) */
    /* The datagram buf[0..len) when it is exactly one record of epoch 1 (application_data, or
     * tls12_cid carrying `cid`, cid_len bytes; application_data when cid_len is 0) whose number
     * is fresh in `window` and which authenticates under `prot`: 0, with its content type, its
     * plaintext in `out` (room for `len` bytes) and its sequence number; the window is NOT marked
     * (`mark` it once the record is taken).  Anything else: a dtls_status > 0, or -1 when the
     * datagram is not one whole record; nothing changed. */
    int (*open_one)(PyObject *prot, PyObject *window, const uint8_t *buf, size_t len, const uint8_t *cid,
                    size_t cid_len, uint8_t *out, size_t *plain_len, uint8_t *ctype, uint64_t *seq);
    void (*mark)(PyObject *window, uint64_t seq);
    /* The next record of epoch 1 sealed into `out` (room bytes) under `prot` with its own next
     * sequence number (then counted): its size; 0 when that number is at or past the protection's
     * limit (a stored copy reserved the rest: nothing consumed) or the record would not fit in
     * `room`; -1 when the numbers are exhausted or libcrypto failed (nothing consumed). */
    Py_ssize_t (*seal_next)(PyObject *prot, uint8_t ctype, const uint8_t *plain, size_t plain_len,
                            const uint8_t *cid, size_t cid_len, uint8_t *out, size_t room);
    /* The window's top: the highest sequence number authenticated (-1: none); it only grows. */
    int64_t (*window_top)(PyObject *window);
} dtls_lane_api;
#endif

/* -- the record header, for every reader of records (the lane too: no libcrypto needed) -------- */
#ifndef COREM_DTLS_FRAMING
#define COREM_DTLS_FRAMING
#include <stddef.h>
#include <stdint.h>

#define DTLS_HEADER 13
#define DTLS_MAX_FRAGMENT ((1 << 14) + 2048)
#define DTLS_1_2 0xFEFD
#define DTLS_1_0 0xFEFF

static inline uint64_t dtls_be48(const uint8_t *p) {
    return (uint64_t)p[0] << 40 | (uint64_t)p[1] << 32 | (uint64_t)p[2] << 24 | (uint64_t)p[3] << 16 |
           (uint64_t)p[4] << 8 | p[5];
}

/* records.py lone_epoch0_record_untrusted: is the datagram d[0..n) exactly one epoch-0 record of
 * `type` that the record parser would take (its version, length and size rules)?  1 with its
 * sequence number in *seq, else 0 (the caller parses it the long way, which names what is wrong). */
static inline int dtls_lone_epoch0(const uint8_t *d, size_t n, uint8_t type, uint64_t *seq) {
    if (n <= DTLS_HEADER || d[0] != type || d[3] || d[4]) return 0;
    unsigned version = (unsigned)d[1] << 8 | d[2];
    if ((version != DTLS_1_2 && version != DTLS_1_0) || (size_t)(d[11] << 8 | d[12]) != n - DTLS_HEADER ||
        n - DTLS_HEADER > DTLS_MAX_FRAGMENT)
        return 0;
    *seq = dtls_be48(d + 5);
    return 1;
}
#endif

#if !defined(DTLS_RECORDS_API_ONLY) && !defined(COREM_DTLS_RECORDS_H)
#define COREM_DTLS_RECORDS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "aead_ccm.h"

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "dtls_records.h needs OpenSSL 3.0 or later (EVP_CipherInit_ex2, EVP_CIPHER_fetch)"
#endif

#define DTLS_EXPLICIT_NONCE 8
#define DTLS_MAX_PLAINTEXT (1 << 14)
#define DTLS_SEQ_MAX ((UINT64_C(1) << 48) - 1)
#define DTLS_TLS12_CID 25
#define DTLS_MAX_CID 255

typedef enum { DTLS_CCM8 = 0, DTLS_CCM = 1, DTLS_GCM = 2 } dtls_aead;

typedef enum {
    DTLS_OK = 0,
    DTLS_R_TRUNCATED,           /* decode_error */
    DTLS_R_CID_NOT_NEGOTIATED,  /* unexpected_message */
    DTLS_R_UNKNOWN_TYPE,        /* unexpected_message */
    DTLS_R_VERSION,             /* protocol_version */
    DTLS_R_OVERFLOW,            /* record_overflow */
    DTLS_R_EPOCH,               /* unexpected_message */
    DTLS_R_CID_MISMATCH,        /* unexpected_message */
    DTLS_R_REPLAYED,            /* bad_record_mac */
    DTLS_R_TOO_SHORT,           /* bad_record_mac */
    DTLS_R_BAD_MAC,             /* bad_record_mac */
    DTLS_R_INNER_TYPE,          /* unexpected_message */
    DTLS_R_INTERNAL,            /* internal_error: libcrypto failed other than on the tag */
    DTLS_STATUS_COUNT
} dtls_status;

/* the alert description (errors.py) and the reason (records.py) of each refusal */
static inline int dtls_status_alert(dtls_status s) {
    static const int alerts[DTLS_STATUS_COUNT] = {0, 50, 10, 10, 70, 22, 10, 10, 20, 20, 20, 10, 80};
    return (unsigned)s < DTLS_STATUS_COUNT ? alerts[s] : 80;
}

static inline const char *dtls_status_reason(dtls_status s) {
    static const char *const reasons[DTLS_STATUS_COUNT] = {
        "ok", "record_truncated", "cid_not_negotiated", "unknown_content_type", "record_version",
        "record_overflow", "epoch", "cid_mismatch", "replayed", "record_too_short", "bad_record_mac",
        "inner_content_type", "crypto_failure"};
    return (unsigned)s < DTLS_STATUS_COUNT ? reasons[s] : "crypto_failure";
}

static inline int dtls_content_type(unsigned t) { return t >= 20 && t <= 23; }

/* -- the replay window (RFC 6347 §4.1.2.6): records.ReplayWindow ------------------------------- */

typedef struct {
    int64_t top;   /* the highest sequence number authenticated (-1: none yet) */
    uint64_t bits; /* bit i: top - i was seen */
} dtls_window;

static inline int dtls_window_fresh(const dtls_window *w, int64_t seq) {
    if (seq > w->top) return 1;
    uint64_t d = (uint64_t)w->top - (uint64_t)seq;
    return d < 64 && !((w->bits >> d) & 1);
}

/* (after the record authenticated; a number 64 or more below the top changes nothing) */
static inline void dtls_window_mark(dtls_window *w, int64_t seq) {
    if (seq > w->top) {
        uint64_t shift = (uint64_t)seq - (uint64_t)w->top;
        w->bits = shift < 64 ? (w->bits << shift) | 1 : 1;
        w->top = seq;
    } else {
        uint64_t d = (uint64_t)w->top - (uint64_t)seq;
        if (d < 64) w->bits |= UINT64_C(1) << d;
    }
}

/* -- parsing: records.parse_record_untrusted ------------------------------------------------- */

typedef struct {
    uint8_t type;
    uint16_t version;
    uint16_t epoch;
    uint64_t seq;
    const uint8_t *cid; /* (NULL, 0) unless type is tls12_cid */
    size_t cid_len;
    const uint8_t *fragment;
    size_t length;
} dtls_record;

static inline void dtls_put48(uint8_t *p, uint64_t v) {
    for (int i = 5; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

/* The record at buf[*off]; on DTLS_OK *off is past it.  `cid_length`: the length of the CID this
 * side chose (tls12_cid records carry it; the length is not on the wire). */
static inline dtls_status dtls_parse(const uint8_t *buf, size_t len, size_t *off, size_t cid_length,
                                     dtls_record *r) {
    size_t o = *off;
    if (o > len || len - o < DTLS_HEADER) return DTLS_R_TRUNCATED;
    const uint8_t *p = buf + o;
    size_t start;
    r->type = p[0];
    if (p[0] == DTLS_TLS12_CID) {
        if (cid_length == 0) return DTLS_R_CID_NOT_NEGOTIATED;
        if (len - o < DTLS_HEADER + cid_length) return DTLS_R_TRUNCATED;
        r->cid = p + 11;
        r->cid_len = cid_length;
        r->length = (size_t)p[11 + cid_length] << 8 | p[12 + cid_length];
        start = 13 + cid_length;
    } else if (dtls_content_type(p[0])) {
        r->cid = NULL;
        r->cid_len = 0;
        r->length = (size_t)p[11] << 8 | p[12];
        start = DTLS_HEADER;
    } else {
        return DTLS_R_UNKNOWN_TYPE;
    }
    r->version = (uint16_t)(p[1] << 8 | p[2]);
    r->epoch = (uint16_t)(p[3] << 8 | p[4]);
    r->seq = dtls_be48(p + 5);
    if (r->version != DTLS_1_2 && !(r->version == DTLS_1_0 && r->epoch == 0)) return DTLS_R_VERSION;
    if (r->length > DTLS_MAX_FRAGMENT) return DTLS_R_OVERFLOW;
    if (r->length > len - o - start) return DTLS_R_TRUNCATED;
    r->fragment = p + start;
    *off = o + start + r->length;
    return DTLS_OK;
}

/* -- protection: records.RecordProtection ----------------------------------------------------- */

typedef struct {
    EVP_CIPHER_CTX *ctx;
    uint8_t key[16];
    uint8_t iv[4]; /* the implicit part of the nonce */
    uint8_t tag;   /* 8 or 16 */
    uint8_t aead;  /* dtls_aead */
    int8_t enc;    /* the direction the context is keyed for (CCM only: see dtls_aead_run) */
    int8_t tls;    /* CCM: the context is in OpenSSL's TLS record mode (dtls_ccm_record) */
} dtls_prot;

/* the ciphers, fetched once (an EVP_aes_128_* would be fetched again at each context's init) */
static inline const EVP_CIPHER *dtls_cipher(dtls_aead a) {
    static EVP_CIPHER *gcm;
    if (a == DTLS_GCM) {
        if (gcm == NULL) gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
        return gcm;
    }
    return aead_ccm_cipher();
}

static inline void dtls_prot_free(dtls_prot *p) {
    EVP_CIPHER_CTX_free(p->ctx);
    p->ctx = NULL;
    OPENSSL_cleanse(p->key, sizeof p->key);
}

/* 0, or -1 (libcrypto could not: out of memory, or no AES in its providers) */
static inline int dtls_prot_init(dtls_prot *p, dtls_aead a, const uint8_t key[16], const uint8_t iv[4]) {
    const EVP_CIPHER *c = dtls_cipher(a);
    p->ctx = NULL;
    if (c == NULL) goto fail;
    p->ctx = EVP_CIPHER_CTX_new();
    if (p->ctx == NULL) goto fail;
    memcpy(p->key, key, 16);
    memcpy(p->iv, iv, 4);
    p->aead = (uint8_t)a;
    p->enc = 1;
    p->tls = 0;
    p->tag = a == DTLS_CCM8 ? 8 : 16;
    if (a != DTLS_GCM ? !aead_ccm_init(p->ctx, 1, key, 12, p->tag) /* (a 12-byte nonce: L = 3) */
                      : !EVP_CipherInit_ex(p->ctx, c, NULL, key, NULL, 1))
        goto fail;
    return 0;
fail:
    ERR_clear_error();
    dtls_prot_free(p);
    return -1;
}

/* A CCM context made again for one direction (`enc`) and mode (`tls`: OpenSSL's TLS record mode,
 * whose state -- the saved AAD -- the general mode cannot share: a new provider context).  Only
 * when a protection is first used, or used the other way round: a protection serves one
 * direction, and a session's records have a CID or never.  0, or -1 (the context is gone). */
static inline int dtls_ccm_rekey(dtls_prot *p, int enc, int tls) {
    EVP_CIPHER_CTX *ctx = p->ctx;
    if (!aead_ccm_init(ctx, enc, p->key, 12, p->tag) ||
        (tls && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_CCM_SET_IV_FIXED, 4, p->iv) <= 0)) {
        ERR_clear_error();
        dtls_prot_free(p); /* (dtls_prot's users take a NULL ctx for "not initialised") */
        return -1;
    }
    p->enc = (int8_t)enc;
    p->tls = (int8_t)tls;
    return 0;
}

/* One CCM record without a CID (its AAD is TLS 1.2's 13 bytes) through OpenSSL's TLS record mode:
 * one parameter and one EVP_Cipher call in place, as libssl seals and opens TLS 1.2's CCM records
 * (the general EVP calls cost twice the AES itself on a small record: their parameter lookups).
 * `rec` is the explicit nonce, the text and the tag (`len` bytes in all); `aad` the 13 bytes with
 * the length OpenSSL expects there: the whole `len` when opening, without the tag when sealing
 * (it takes the explicit nonce to write from the AAD's first 8 bytes: the epoch and sequence
 * number, as DTLS's own nonce).  1 done, 0 the tag did not match (`rec` wiped), -1 failed. */
static inline int dtls_ccm_record(dtls_prot *p, int enc, uint8_t aad[13], uint8_t *rec, size_t len) {
    if ((p->enc != enc || !p->tls) && dtls_ccm_rekey(p, enc, 1) < 0) return -1;
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TLS1_AAD, aad, 13),
                            OSSL_PARAM_END};
    if (!EVP_CIPHER_CTX_set_params(p->ctx, params)) {
        ERR_clear_error();
        return -1;
    }
    if (EVP_Cipher(p->ctx, rec, rec, (unsigned int)len) <= 0) {
        ERR_clear_error();
        if (enc) return -1;
        OPENSSL_cleanse(rec, len);
        return 0;
    }
    return 1;
}

/* RFC 5246 §6.2.3.3's 13 bytes with DTLS's epoch + sequence number (no CID) */
static inline void dtls_aad13(uint8_t a[13], uint8_t type, uint16_t version, uint16_t epoch, uint64_t seq,
                              size_t length) {
    a[0] = (uint8_t)(epoch >> 8);
    a[1] = (uint8_t)epoch;
    dtls_put48(a + 2, seq);
    a[8] = type;
    a[9] = (uint8_t)(version >> 8);
    a[10] = (uint8_t)version;
    a[11] = (uint8_t)(length >> 8);
    a[12] = (uint8_t)length;
}

static inline size_t dtls_aad(uint8_t *a, uint8_t type, uint16_t version, uint16_t epoch, uint64_t seq,
                              const uint8_t *cid, size_t cid_len, size_t length) {
    if (type == DTLS_TLS12_CID) { /* RFC 9146 §5 */
        memset(a, 0xff, 8);
        a[8] = DTLS_TLS12_CID;
        a[9] = (uint8_t)cid_len;
        a[10] = DTLS_TLS12_CID;
        a[11] = (uint8_t)(version >> 8);
        a[12] = (uint8_t)version;
        a[13] = (uint8_t)(epoch >> 8);
        a[14] = (uint8_t)epoch;
        dtls_put48(a + 15, seq);
        if (cid_len) memcpy(a + 21, cid, cid_len);
        size_t n = 21 + cid_len;
        a[n] = (uint8_t)(length >> 8);
        a[n + 1] = (uint8_t)length;
        return n + 2;
    }
    dtls_aad13(a, type, version, epoch, seq, length);
    return 13;
}

/* One AEAD operation: `n` bytes of `in` to `out` (in == out is fine), the tag read from or written
 * to `tag`.  1 done, 0 the tag did not match (decryption), -1 libcrypto failed otherwise. */
static inline int dtls_aead_run(dtls_prot *p, int enc, const uint8_t nonce[12], const uint8_t *aad,
                                size_t aad_len, const uint8_t *in, uint8_t *out, size_t n, uint8_t *tag) {
    EVP_CIPHER_CTX *ctx = p->ctx;
    int outl = 0;
    /* OpenSSL's CCM picks its block function (AES-NI's ccm64 encrypt or decrypt) when it is keyed:
     * a context used the other way round is keyed again (once: a protection serves one direction) */
    const uint8_t *key = NULL;
    if (p->aead != DTLS_GCM && p->tls) {
        if (dtls_ccm_rekey(p, enc, 0) < 0) return -1;
        ctx = p->ctx;
    } else if (p->aead != DTLS_GCM && p->enc != enc) {
        key = p->key;
        p->enc = (int8_t)enc;
    }
    if (p->aead != DTLS_GCM) return aead_ccm(ctx, enc, key, nonce, aad, aad_len, in, out, n, tag, p->tag);
    OSSL_PARAM params[2] = {OSSL_PARAM_END, OSSL_PARAM_END};
    if (!enc) params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, p->tag);
    if (!EVP_CipherInit_ex2(ctx, NULL, key, nonce, enc, params)) goto fail;
    if (!EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len)) goto fail;
    if (n && !EVP_CipherUpdate(ctx, out, &outl, in, (int)n)) goto fail;
    int fin = 0;
    if (!EVP_CipherFinal_ex(ctx, out + outl, &fin)) {
        if (enc) goto fail;
        ERR_clear_error();
        OPENSSL_cleanse(out, n);
        return 0;
    }
    if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) <= 0) goto fail;
    return 1;
fail:
    ERR_clear_error();
    return -1;
}

/* Open a parsed record into `out` (room for r->length bytes at least): *ctype and *plain_len
 * (for a tls12_cid record the DTLSInnerPlaintext's content and real type). */
static inline dtls_status dtls_open(dtls_prot *p, const dtls_record *r, uint8_t *out, size_t *plain_len,
                                    uint8_t *ctype) {
    if (r->length > DTLS_MAX_FRAGMENT) return DTLS_R_OVERFLOW;
    if (r->length < (size_t)DTLS_EXPLICIT_NONCE + p->tag) return DTLS_R_TOO_SHORT;
    size_t n = r->length - DTLS_EXPLICIT_NONCE - p->tag;
    if (p->aead != DTLS_GCM && r->type != DTLS_TLS12_CID) {
        uint8_t tls_aad[13];
        dtls_aad13(tls_aad, r->type, r->version, r->epoch, r->seq, r->length); /* (OpenSSL's length) */
        memcpy(out, r->fragment, r->length); /* (in place: the datagram stays as it came) */
        int done = dtls_ccm_record(p, 0, tls_aad, out, r->length);
        if (done < 0) return DTLS_R_INTERNAL;
        if (done == 0) return DTLS_R_BAD_MAC;
        memmove(out, out + DTLS_EXPLICIT_NONCE, n);
        *ctype = r->type;
        *plain_len = n;
        return DTLS_OK;
    }
    uint8_t nonce[12], aad[21 + DTLS_MAX_CID + 2], tag[16];
    memcpy(nonce, p->iv, 4);
    memcpy(nonce + 4, r->fragment, 8);
    memcpy(tag, r->fragment + DTLS_EXPLICIT_NONCE + n, p->tag);
    size_t aad_len = dtls_aad(aad, r->type, r->version, r->epoch, r->seq, r->cid, r->cid_len, n);
    int ok = dtls_aead_run(p, 0, nonce, aad, aad_len, r->fragment + DTLS_EXPLICIT_NONCE, out, n, tag);
    if (ok < 0) return DTLS_R_INTERNAL;
    if (ok == 0) return DTLS_R_BAD_MAC;
    if (r->type != DTLS_TLS12_CID) {
        *ctype = r->type;
        *plain_len = n;
        return DTLS_OK;
    }
    while (n > 0 && out[n - 1] == 0) n--; /* DTLSInnerPlaintext: content, real type, zeros */
    if (n == 0 || !dtls_content_type(out[n - 1])) return DTLS_R_INNER_TYPE;
    *ctype = out[n - 1];
    *plain_len = n - 1;
    return DTLS_OK;
}

/* The one call of the receive path: parse the record at buf[*off] (a tls12_cid record carries
 * `cid`, of cid_len bytes: the one this side chose, and no other), refuse another epoch, a record
 * whose CID is not `cid` (or that has one when cid_len is 0), a replay; open it into `out` (room
 * for the record's length: DTLS_MAX_FRAGMENT always suffices); then mark it in the window.
 * *off moves past the record whenever it could be framed (even if refused). */
static inline dtls_status dtls_open_record(dtls_prot *p, dtls_window *w, const uint8_t *buf, size_t len,
                                           size_t *off, const uint8_t *cid, size_t cid_len, uint16_t epoch,
                                           uint8_t *out, size_t *plain_len, uint8_t *ctype,
                                           uint64_t *number) {
    dtls_record r;
    dtls_status s = dtls_parse(buf, len, off, cid_len, &r);
    if (s != DTLS_OK) return s;
    if (r.epoch != epoch) return DTLS_R_EPOCH;
    if ((r.type == DTLS_TLS12_CID) != (cid_len > 0) || (cid_len && memcmp(r.cid, cid, cid_len) != 0))
        return DTLS_R_CID_MISMATCH;
    if (!dtls_window_fresh(w, (int64_t)r.seq)) return DTLS_R_REPLAYED;
    s = dtls_open(p, &r, out, plain_len, ctype);
    if (s != DTLS_OK) return s;
    dtls_window_mark(w, (int64_t)r.seq);
    *number = (uint64_t)r.epoch << 48 | r.seq;
    return DTLS_OK;
}

/* The size of a sealed record, 0 if it cannot be one: a plaintext over 2^14 bytes, a fragment over
 * DTLS_MAX_FRAGMENT, a CID over 255 bytes. */
static inline size_t dtls_sealed_size(const dtls_prot *p, size_t plain_len, size_t cid_len, size_t padding) {
    if (plain_len > DTLS_MAX_PLAINTEXT || cid_len > DTLS_MAX_CID || (cid_len && padding > DTLS_MAX_FRAGMENT))
        return 0;
    size_t inner = plain_len + (cid_len ? 1 + padding : 0);
    size_t fragment = DTLS_EXPLICIT_NONCE + inner + p->tag;
    if (fragment > DTLS_MAX_FRAGMENT) return 0;
    return DTLS_HEADER + cid_len + fragment;
}

/* Seal into `out` (dtls_sealed_size bytes; `plain` may not overlap it): the whole record, a
 * tls12_cid one when cid_len > 0.  0, or -1 (the sizes, a sequence number over 2^48 - 1, or
 * libcrypto failed). */
static inline int dtls_seal(dtls_prot *p, uint8_t ctype, uint16_t epoch, uint64_t seq, const uint8_t *plain,
                            size_t plain_len, const uint8_t *cid, size_t cid_len, size_t padding,
                            uint8_t *out) {
    size_t total = dtls_sealed_size(p, plain_len, cid_len, padding);
    if (total == 0 || seq > DTLS_SEQ_MAX) return -1;
    size_t inner = plain_len + (cid_len ? 1 + padding : 0);
    size_t fragment = total - DTLS_HEADER - cid_len;
    uint8_t *h = out;
    h[0] = cid_len ? DTLS_TLS12_CID : ctype;
    h[1] = 0xFE;
    h[2] = 0xFD;
    h[3] = (uint8_t)(epoch >> 8);
    h[4] = (uint8_t)epoch;
    dtls_put48(h + 5, seq);
    if (cid_len) memcpy(h + 11, cid, cid_len);
    h[11 + cid_len] = (uint8_t)(fragment >> 8);
    h[12 + cid_len] = (uint8_t)fragment;
    uint8_t *explicit = h + DTLS_HEADER + cid_len;
    memcpy(explicit, h + 3, 8); /* the explicit nonce: epoch + sequence number */
    uint8_t *body = explicit + DTLS_EXPLICIT_NONCE;
    if (plain_len) memcpy(body, plain, plain_len);
    if (cid_len) {
        body[plain_len] = ctype;
        memset(body + plain_len + 1, 0, padding);
    }
    if (p->aead != DTLS_GCM && !cid_len) {
        uint8_t tls_aad[13];
        dtls_aad13(tls_aad, ctype, DTLS_1_2, epoch, seq, DTLS_EXPLICIT_NONCE + inner); /* (OpenSSL's length) */
        return dtls_ccm_record(p, 1, tls_aad, explicit, fragment) == 1 ? 0 : -1;
    }
    uint8_t nonce[12], aad[21 + DTLS_MAX_CID + 2];
    memcpy(nonce, p->iv, 4);
    memcpy(nonce + 4, explicit, 8);
    size_t aad_len = dtls_aad(aad, cid_len ? DTLS_TLS12_CID : ctype, DTLS_1_2, epoch, seq, cid, cid_len, inner);
    if (dtls_aead_run(p, 1, nonce, aad, aad_len, body, body, inner, body + inner) != 1) return -1;
    return 0;
}

#endif
