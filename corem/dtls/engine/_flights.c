/* The server's two PSK flights in C, on the system's OpenSSL libcrypto: the common handshake of a
 * device fleet (cookie, PSK suite, extended master secret, maybe a Connection ID, every message
 * whole) in two calls, where the Python state machine (connection.py) costs ~20 calls a message.
 * Each is the twin of a Python path and answers only what that path would answer, byte for byte
 * (tests/test_dtls_engine.py drives both with the same randomness); anything else, malformed or
 * merely unusual, returns None and the Python path decides, names the error and sends the alert.
 *
 *   server_hello(fragment, record_seq, addr, secrets, prefs, require_ems, server_random, cid, mtu)
 *       A ClientHello record with a valid cookie -> (datagram, client_random, suite, ems,
 *       secure_renegotiation, cid_in, cid_out, message_seq, hello, server_hello, server_hello_done)
 *       (engine.py `_hello` + Connection.server_start); with a cookie of the cookie's length that
 *       is not valid, the HelloVerifyRequest record (bytes), as the hello without one gets.  `prefs`: the server's suites in order, 3
 *       bytes each (code, 0 PSK / 1 ECDHE): the first one the client offers must be a PSK one.
 *       `cid`: the CID to hand out if the client offers RFC 9146 (b"": none).
 *
 *   psk_finish(datagram, psk_for, recv_seq, transcript, client_random, server_random, cipher, ems,
 *              cid_in, cid_out, send_seq, seq0, mtu)
 *       The client's ClientKeyExchange, ChangeCipherSpec and Finished in one datagram ->
 *       (identity, client_key, server_key, client_iv, server_iv, finished_record_seq, our_finished,
 *       datagram): keys derived (RFC 5246 §8.1 / RFC 7627 §4, §6.3), the client's Finished opened
 *       and verified, ours made, our ChangeCipherSpec and Finished records (Connection's
 *       _server_message for CLIENT_KEY_EXCHANGE and FINISHED).  An unknown identity, `psk_for`
 *       raising an Exception or a Finished that does not verify returns None: the Python path fails
 *       the handshake as it does (with the same answer of `psk_for`: connection.py asks it once). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "client_hello.h"
#include "dtls_records.h"
#include "hmac256.h"

/* (the handshake header, a message's and a hello's limits and the cookie's length: client_hello.h's) */
#define SCSV_RENEGOTIATION 0x00FF
#define CLIENT_HELLO 1
#define SERVER_HELLO 2
#define SERVER_HELLO_DONE 14
#define CLIENT_KEY_EXCHANGE 16
#define FINISHED 20
#define CT_CCS 20
#define CT_HANDSHAKE 22
#define MAX_PSK 256
#define MAX_TRANSCRIPT 4096

static void put_hs_header(unsigned char *h, unsigned type, size_t len, unsigned seq) {
    h[0] = (unsigned char)type;
    h[1] = (unsigned char)(len >> 16); h[2] = (unsigned char)(len >> 8); h[3] = (unsigned char)len;
    h[4] = (unsigned char)(seq >> 8); h[5] = (unsigned char)seq;
    h[6] = h[7] = h[8] = 0;
    h[9] = h[1]; h[10] = h[2]; h[11] = h[3];
}

/* a plaintext record header (records.plaintext_record), DTLS 1.2 */
static void put_record_header(unsigned char *r, unsigned type, uint16_t epoch, uint64_t seq, size_t len) {
    r[0] = (unsigned char)type; r[1] = 0xFE; r[2] = 0xFD;
    r[3] = (unsigned char)(epoch >> 8); r[4] = (unsigned char)epoch;
    dtls_put48(r + 5, seq);
    r[11] = (unsigned char)(len >> 8); r[12] = (unsigned char)len;
}

static PyObject *server_hello(PyObject *self, PyObject *args) {
    Py_buffer frag, addr, random, cid, prefs;
    unsigned long long seq;
    PyObject *secrets;
    int require_ems;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "y*Ky*O!y*py*y*n", &frag, &seq, &addr, &PyList_Type, &secrets, &prefs,
                          &require_ems, &random, &cid, &mtu))
        return NULL;
    PyObject *out = NULL;
    const unsigned char *p = frag.buf;
    size_t n = (size_t)frag.len;
    /* one record, one fragment: the hello whole (as engine._hello takes only the first fragment,
     * anything after it goes to the Python path) */
    if (n < HELLO_HS_HEADER || p[0] != CLIENT_HELLO || random.len != 32 || cid.len > 32 || seq >> 48) goto none;
    size_t length = hello_u24(p + 1), offset = hello_u24(p + 6), flen = hello_u24(p + 9);
    unsigned message_seq = hello_u16(p + 4);
    if (offset != 0 || flen != length || length > HELLO_MAX_MESSAGE || HELLO_HS_HEADER + flen != n || message_seq > HELLO_MAX_SEQ)
        goto none;
    const unsigned char *body = p + HELLO_HS_HEADER;
    client_hello h;
    if (!client_hello_parse(body, flen, &h) || h.cookie_end - h.cookie_start != HELLO_COOKIE_LENGTH || addr.len > 0xFFFF)
        goto none;
    /* the cookie, under either secret (CookieJar.valid); none valid: a HelloVerifyRequest with the
     * current secret's (CookieJar.make), as engine._hello answers it */
    int valid = 0;
    Py_ssize_t nsecrets = PyList_GET_SIZE(secrets);
    unsigned char current[HMAC256_LEN] = {0};
    for (Py_ssize_t i = 0; i < nsecrets && !valid; i++) {
        PyObject *s = PyList_GET_ITEM(secrets, i);
        if (!PyBytes_Check(s)) goto none;
        unsigned char mac[HMAC256_LEN];
        if (!hello_cookie((const unsigned char *)PyBytes_AS_STRING(s), (size_t)PyBytes_GET_SIZE(s), addr.buf,
                          (size_t)addr.len, body, &h, mac)) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
            goto done;
        }
        if (i == 0) memcpy(current, mac, sizeof mac);
        valid = CRYPTO_memcmp(mac, body + h.cookie_start, HELLO_COOKIE_LENGTH) == 0;
    }
    if (!valid) {
        if (nsecrets == 0) goto none;
        unsigned char r[HELLO_VERIFY_RECORD];
        hello_verify_record(r, seq, message_seq, current);
        out = PyBytes_FromStringAndSize((const char *)r, sizeof r);
        goto done;
    }
    /* Connection.server_start's checks: any refusal is the Python path's to send */
    unsigned version = hello_u16(body);
    if (version > 0xFEFD) goto none;
    int null_compression = 0, scsv = 0;
    for (size_t i = h.comp_start; i < h.comp_end; i++) null_compression |= body[i] == 0;
    if (!null_compression) goto none;
    unsigned suite = 0;
    const unsigned char *pr = prefs.buf;
    int ecdhe = 0; /* (the server has a certificate: it reads the ECDHE extensions of every hello) */
    for (Py_ssize_t k = 0; k + 3 <= prefs.len; k += 3) ecdhe |= pr[k + 2] != 0;
    if (ecdhe && !hello_ecdhe_extensions_ok(&h)) goto none;
    for (Py_ssize_t k = 0; k + 3 <= prefs.len && !suite; k += 3) {
        unsigned code = hello_u16(pr + k);
        for (size_t i = h.suites_start; i < h.suites_end; i += 2) {
            if (hello_u16(body + i) != code) continue;
            if (pr[k + 2] != 0) goto none; /* an ECDHE suite first: the Python path weighs it */
            suite = code;
            break;
        }
    }
    if (!suite) goto none;
    for (size_t i = h.suites_start; i < h.suites_end; i += 2) scsv |= hello_u16(body + i) == SCSV_RENEGOTIATION;
    if (!h.ems && require_ems) goto none;
    if (h.reneg != NULL && !(h.reneg_len == 1 && h.reneg[0] == 0)) goto none;
    int secure = h.reneg != NULL || scsv;
    int give_cid = h.cid != NULL && cid.len > 0;
    /* ServerHello: version, random, empty session_id, suite, null compression, extensions
     * (extended_master_secret, renegotiation_info, connection_id: Connection.server_start's order) */
    unsigned char sh[HELLO_HS_HEADER + 38 + 2 + 4 + 5 + 5 + 32];
    unsigned char *b = sh + HELLO_HS_HEADER;
    size_t len = 0;
    b[len++] = 0xFE; b[len++] = 0xFD;
    memcpy(b + len, random.buf, 32); len += 32;
    b[len++] = 0;
    b[len++] = (unsigned char)(suite >> 8); b[len++] = (unsigned char)suite;
    b[len++] = 0;
    size_t ext_len = (h.ems ? 4 : 0) + (secure ? 5 : 0) + (give_cid ? 5 + (size_t)cid.len : 0);
    if (ext_len) {
        b[len++] = (unsigned char)(ext_len >> 8); b[len++] = (unsigned char)ext_len;
        if (h.ems) { b[len++] = 0; b[len++] = EXT_EXTENDED_MASTER_SECRET; b[len++] = 0; b[len++] = 0; }
        if (secure) { b[len++] = 0xFF; b[len++] = 0x01; b[len++] = 0; b[len++] = 1; b[len++] = 0; }
        if (give_cid) {
            b[len++] = 0; b[len++] = EXT_CONNECTION_ID; b[len++] = 0; b[len++] = (unsigned char)(1 + cid.len);
            b[len++] = (unsigned char)cid.len;
            memcpy(b + len, cid.buf, cid.len); len += (size_t)cid.len;
        }
    }
    put_hs_header(sh, SERVER_HELLO, len, message_seq);
    size_t sh_len = HELLO_HS_HEADER + len;
    unsigned char shd[HELLO_HS_HEADER];
    put_hs_header(shd, SERVER_HELLO_DONE, 0, message_seq + 1);
    /* two records (the server's numbering goes on from the hello's record number, under 2^32) */
    size_t total = 13 + sh_len + 13 + HELLO_HS_HEADER;
    if ((Py_ssize_t)total > mtu) goto none; /* (fragments, or two datagrams: the Python path's) */
    uint64_t s0 = seq < (UINT64_C(1) << 32) ? seq : 0;
    unsigned char d[13 + sizeof sh + 13 + HELLO_HS_HEADER];
    put_record_header(d, CT_HANDSHAKE, 0, s0, sh_len);
    memcpy(d + 13, sh, sh_len);
    put_record_header(d + 13 + sh_len, CT_HANDSHAKE, 0, s0 + 1, HELLO_HS_HEADER);
    memcpy(d + 26 + sh_len, shd, HELLO_HS_HEADER);
    /* (cid_out: the CID the client asked for in records to it, when one is handed out) */
    out = Py_BuildValue("(y#y#IOOy#y#Iy#y#y#)", (const char *)d, (Py_ssize_t)total, (const char *)body + 2,
                        (Py_ssize_t)32, suite, h.ems ? Py_True : Py_False, secure ? Py_True : Py_False,
                        (const char *)cid.buf, give_cid ? cid.len : (Py_ssize_t)0,
                        give_cid ? (const char *)h.cid : "", give_cid ? (Py_ssize_t)h.cid_len : (Py_ssize_t)0, message_seq,
                        (const char *)p, (Py_ssize_t)n, (const char *)sh, (Py_ssize_t)sh_len, (const char *)shd,
                        (Py_ssize_t)HELLO_HS_HEADER);
    goto done;
none:
    out = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&frag);
    PyBuffer_Release(&addr);
    PyBuffer_Release(&prefs);
    PyBuffer_Release(&random);
    PyBuffer_Release(&cid);
    return out;
}

/* P_SHA256(key, label + seed) into out (RFC 5246 §5; _prf.c's loop), the key's pads hashed once by
 * the caller (the master secret serves three); 1, or 0 */
static int prf_keyed(hmac256_key *key, const char *label, const unsigned char *seed, size_t seed_len,
                     unsigned char *out, size_t length) {
    unsigned char ls[64 + 64], a[HMAC256_LEN], block[HMAC256_LEN];
    size_t label_len = strlen(label);
    if (label_len + seed_len > sizeof ls) return 0;
    memcpy(ls, label, label_len);
    memcpy(ls + label_len, seed, seed_len);
    size_t n = label_len + seed_len;
    int ok = hmac256(key, ls, n, NULL, 0, a);
    for (size_t filled = 0; ok && filled < length;) {
        ok = hmac256(key, a, sizeof a, ls, n, block);
        size_t take = length - filled < HMAC256_LEN ? length - filled : HMAC256_LEN;
        memcpy(out + filled, block, take);
        filled += take;
        if (ok && filled < length) ok = hmac256(key, a, sizeof a, NULL, 0, a);
    }
    OPENSSL_cleanse(block, sizeof block);
    return ok;
}

static int sha256_of(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen, unsigned char *out) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int n;
    int ok = c != NULL && EVP_DigestInit_ex2(c, hmac256_md, NULL) && EVP_DigestUpdate(c, a, alen) &&
             (blen == 0 || EVP_DigestUpdate(c, b, blen)) && EVP_DigestFinal_ex(c, out, &n);
    EVP_MD_CTX_free(c);
    return ok;
}

/* a record whose fragment is exactly one whole handshake message of `type` numbered `seq`: its
 * body's length, or -1 */
static long whole_message(const unsigned char *f, size_t n, unsigned type, unsigned seq) {
    if (n < HELLO_HS_HEADER || f[0] != type || hello_u16(f + 4) != seq) return -1;
    size_t length = hello_u24(f + 1);
    if (hello_u24(f + 6) != 0 || hello_u24(f + 9) != length || HELLO_HS_HEADER + length != n || length > HELLO_MAX_MESSAGE) return -1;
    return (long)length;
}

static PyObject *psk_finish(PyObject *self, PyObject *args) {
    Py_buffer dg, transcript, cr, sr, cid_in, cid_out;
    PyObject *psk_for;
    unsigned recv_seq, send_seq;
    int cipher, ems;
    unsigned long long seq0;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "y*OIy*y*y*ipy*y*IKn", &dg, &psk_for, &recv_seq, &transcript, &cr, &sr, &cipher,
                          &ems, &cid_in, &cid_out, &send_seq, &seq0, &mtu))
        return NULL;
    PyObject *out = NULL, *psk = NULL, *identity = NULL;
    dtls_prot rp = {NULL}, wp = {NULL};
    hmac256_key pk = {NULL, NULL, NULL}, mk = {NULL, NULL, NULL}; /* the premaster's and the master's */
    unsigned char premaster[4 + 2 * MAX_PSK], master[48], block[40], hash[32], expect[12], plain[64];
    const unsigned char *buf = dg.buf;
    size_t len = (size_t)dg.len, off = 0;
    dtls_record cke, ccs, fin;
    if (cr.len != 32 || sr.len != 32 || cipher < 0 || cipher > 2 || cid_in.len > 32 || cid_out.len > 255 ||
        transcript.len > MAX_TRANSCRIPT || seq0 > DTLS_SEQ_MAX || send_seq > 0xFFFF || recv_seq > 0xFFFE)
        goto none;
    /* [ClientKeyExchange][ChangeCipherSpec] at epoch 0, [Finished] at epoch 1, nothing else */
    if (dtls_parse(buf, len, &off, (size_t)cid_in.len, &cke) != DTLS_OK || cke.type != CT_HANDSHAKE || cke.epoch != 0)
        goto none;
    if (dtls_parse(buf, len, &off, (size_t)cid_in.len, &ccs) != DTLS_OK || ccs.type != CT_CCS || ccs.epoch != 0 ||
        ccs.length != 1 || ccs.fragment[0] != 1)
        goto none;
    if (dtls_parse(buf, len, &off, (size_t)cid_in.len, &fin) != DTLS_OK || fin.epoch != 1 || off != len)
        goto none;
    if (cid_in.len ? (fin.type != DTLS_TLS12_CID || memcmp(fin.cid, cid_in.buf, cid_in.len) != 0)
                   : fin.type != CT_HANDSHAKE)
        goto none;
    long body = whole_message(cke.fragment, cke.length, CLIENT_KEY_EXCHANGE, recv_seq);
    if (body < 2 || (size_t)body != 2 + hello_u16(cke.fragment + HELLO_HS_HEADER)) goto none;
    identity = PyBytes_FromStringAndSize((const char *)cke.fragment + HELLO_HS_HEADER + 2, body - 2);
    if (identity == NULL) goto done;
    psk = PyObject_CallOneArg(psk_for, identity);
    if (psk == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto done; /* (KeyboardInterrupt and the like: raised) */
        PyErr_Clear(); /* (the Python path asks again: `psk_for` answers once, connection.py, and names it) */
        goto none;
    }
    if (!PyBytes_Check(psk) || PyBytes_GET_SIZE(psk) == 0 || PyBytes_GET_SIZE(psk) > MAX_PSK) goto none;
    /* RFC 4279 §2: uint16 N, N zeros, uint16 N, the PSK */
    size_t k = (size_t)PyBytes_GET_SIZE(psk), pm = 4 + 2 * k;
    premaster[0] = premaster[2 + k] = (unsigned char)(k >> 8);
    premaster[1] = premaster[3 + k] = (unsigned char)k;
    memset(premaster + 2, 0, k);
    memcpy(premaster + 4 + k, PyBytes_AS_STRING(psk), k);
    /* the session hash: the transcript up to and including the ClientKeyExchange (RFC 7627 §3), the
     * hash the client's Finished is made over too (no CertificateVerify in PSK) */
    if (!sha256_of(transcript.buf, (size_t)transcript.len, cke.fragment, cke.length, hash)) goto crypto;
    unsigned char seed[64];
    memcpy(seed, cr.buf, 32);
    memcpy(seed + 32, sr.buf, 32);
    if (!hmac256_init(&pk, premaster, pm)) goto crypto;
    if (!(ems ? prf_keyed(&pk, "extended master secret", hash, 32, master, 48)
              : prf_keyed(&pk, "master secret", seed, 64, master, 48)))
        goto crypto;
    memcpy(seed, sr.buf, 32);
    memcpy(seed + 32, cr.buf, 32);
    if (!hmac256_init(&mk, master, sizeof master) || !prf_keyed(&mk, "key expansion", seed, 64, block, sizeof block))
        goto crypto;
    /* client_key | server_key | client_iv | server_iv */
    if (dtls_prot_init(&rp, (dtls_aead)cipher, block, block + 32) < 0 ||
        dtls_prot_init(&wp, (dtls_aead)cipher, block + 16, block + 36) < 0)
        goto crypto;
    if (fin.length > sizeof plain) goto none; /* (dtls_open writes fewer bytes than the record's length) */
    size_t plain_len;
    uint8_t ctype;
    if (dtls_open(&rp, &fin, plain, &plain_len, &ctype) != DTLS_OK || ctype != CT_HANDSHAKE) goto none;
    if (whole_message(plain, plain_len, FINISHED, recv_seq + 1) != 12) goto none;
    if (!prf_keyed(&mk, "client finished", hash, 32, expect, 12)) goto crypto;
    if (CRYPTO_memcmp(expect, plain + HELLO_HS_HEADER, 12) != 0) goto none; /* (Python: bad_finished, its alert) */
    /* ours: over the transcript with the client's Finished */
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int hn;
    int ok = c != NULL && EVP_DigestInit_ex2(c, hmac256_md, NULL) && EVP_DigestUpdate(c, transcript.buf, transcript.len) &&
             EVP_DigestUpdate(c, cke.fragment, cke.length) && EVP_DigestUpdate(c, plain, plain_len) &&
             EVP_DigestFinal_ex(c, hash, &hn);
    EVP_MD_CTX_free(c);
    unsigned char mine[HELLO_HS_HEADER + 12];
    put_hs_header(mine, FINISHED, 12, send_seq);
    if (!ok || !prf_keyed(&mk, "server finished", hash, 32, mine + HELLO_HS_HEADER, 12)) goto crypto;
    /* our ChangeCipherSpec (epoch 0, its next number) and Finished (epoch 1, number 0) */
    unsigned char d[14 + DTLS_HEADER + 255 + DTLS_EXPLICIT_NONCE + sizeof mine + 1 + 16];
    put_record_header(d, CT_CCS, 0, seq0, 1);
    d[13] = 1;
    size_t sealed = dtls_sealed_size(&wp, sizeof mine, (size_t)cid_out.len, 0);
    if (sealed != 0 && (Py_ssize_t)(14 + sealed) > mtu) goto none; /* (two datagrams: the Python path's) */
    if (sealed == 0 || dtls_seal(&wp, CT_HANDSHAKE, 1, 0, mine, sizeof mine, cid_out.buf, (size_t)cid_out.len, 0, d + 14) != 0)
        goto crypto;
    out = Py_BuildValue("(Oy#y#y#y#Ky#y#)", identity, (const char *)block, (Py_ssize_t)16, (const char *)block + 16,
                        (Py_ssize_t)16, (const char *)block + 32, (Py_ssize_t)4, (const char *)block + 36, (Py_ssize_t)4,
                        (unsigned long long)fin.seq, (const char *)mine, (Py_ssize_t)sizeof mine, (const char *)d,
                        (Py_ssize_t)(14 + sealed));
    goto done;
crypto:
    ERR_clear_error();
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed in the PSK flight");
    goto done;
none:
    out = Py_NewRef(Py_None);
done:
    OPENSSL_cleanse(premaster, sizeof premaster);
    OPENSSL_cleanse(master, sizeof master);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(plain, sizeof plain);
    hmac256_free(&pk);
    hmac256_free(&mk);
    if (rp.ctx) dtls_prot_free(&rp);
    if (wp.ctx) dtls_prot_free(&wp);
    Py_XDECREF(psk);
    Py_XDECREF(identity);
    PyBuffer_Release(&dg);
    PyBuffer_Release(&transcript);
    PyBuffer_Release(&cr);
    PyBuffer_Release(&sr);
    PyBuffer_Release(&cid_in);
    PyBuffer_Release(&cid_out);
    return out;
}

static PyMethodDef methods[] = {
    {"server_hello", server_hello, METH_VARARGS,
     "server_hello(fragment, record_seq, addr, secrets, prefs, require_ems, server_random, cid, mtu) -> tuple | None"},
    {"psk_finish", psk_finish, METH_VARARGS,
     "psk_finish(datagram, psk_for, recv_seq, transcript, client_random, server_random, cipher, ems, cid_in, "
     "cid_out, send_seq, seq0, mtu) -> tuple | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flights", NULL, -1, methods};

PyMODINIT_FUNC PyInit__flights(void) {
    if (!hmac256_fetch()) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA2-256");
        return NULL;
    }
    return PyModule_Create(&module);
}
