/* A ClientHello's body read as messages.parse_client_hello_untrusted reads it, for the C answers to
 * hellos (_hello.c: the stateless HelloVerifyRequest; _flights.c: the ServerHello flight).  It only
 * says "well-formed, here are its parts" or "let the Python path decide" (which names the error):
 * so the C answers are never other than the Python ones. */
#ifndef COREM_CLIENT_HELLO_H
#define COREM_CLIENT_HELLO_H

#include <stddef.h>

#include "hmac256.h"

#define HELLO_MAX_EXTENSIONS 64
#define EXT_EXTENDED_MASTER_SECRET 23
#define EXT_CONNECTION_ID 54
#define EXT_RENEGOTIATION_INFO 0xFF01

typedef struct {
    /* body[0..session_end) = version, random, session_id; body[cookie_end..comp_end) = the suites and
     * compression methods with their lengths: together the bytes a cookie is made over (CookieJar) */
    size_t session_end, cookie_start, cookie_end, suites_start, suites_end, comp_start, comp_end;
    int ems;                          /* extended_master_secret offered */
    const unsigned char *reneg;       /* renegotiation_info's data (NULL: not sent) */
    size_t reneg_len;
    const unsigned char *cid;         /* connection_id's CID (NULL: not offered) */
    size_t cid_len;
    /* the extensions the ECDHE suites read (supported_groups, ec_point_formats, signature_algorithms),
     * as sent: a server with a certificate refuses the hello when one is malformed (connection.py
     * `_ecdhe_possible`) whichever suite it picks */
    const unsigned char *ecdhe_ext[3];
    size_t ecdhe_ext_len[3];
} client_hello;

#define EXT_SUPPORTED_GROUPS 10
#define EXT_EC_POINT_FORMATS 11
#define EXT_SIGNATURE_ALGORITHMS 13

static inline unsigned hello_u16(const unsigned char *p) { return (unsigned)p[0] << 8 | p[1]; }

/* 1: well-formed (and at most HELLO_MAX_EXTENSIONS extensions), its parts in *h; 0: the Python path
 * decides (it raises the named error, or takes an unusual hello) */
static inline int client_hello_parse(const unsigned char *b, size_t n, client_hello *h) {
    if (n < 35) return 0;
    size_t end = 35 + (size_t)b[34];
    if (end > n || b[34] > 32 || end >= n) return 0;
    h->session_end = end;
    h->cookie_start = end + 1;
    end = end + 1 + (size_t)b[end];
    if (end > n) return 0;
    h->cookie_end = end;
    if (end + 2 > n) return 0;
    size_t suites = hello_u16(b + end);
    h->suites_start = end + 2;
    end = end + 2 + suites;
    if (end > n || suites == 0 || suites % 2) return 0;
    h->suites_end = end;
    if (end >= n) return 0;
    size_t comp = b[end];
    h->comp_start = end + 1;
    end = end + 1 + comp;
    if (end > n || comp == 0) return 0;
    h->comp_end = end;
    h->ems = 0;
    h->reneg = h->cid = NULL;
    h->reneg_len = h->cid_len = 0;
    for (int i = 0; i < 3; i++) {
        h->ecdhe_ext[i] = NULL;
        h->ecdhe_ext_len[i] = 0;
    }
    if (end == n) return 1;
    if (end + 2 > n) return 0;
    size_t pos = end + 2;
    end = pos + hello_u16(b + end);
    if (end != n) return 0; /* (past the block: truncated; short of it: trailing bytes) */
    unsigned seen[HELLO_MAX_EXTENSIONS];
    int count = 0;
    while (pos < end) {
        if (pos + 4 > end || count == HELLO_MAX_EXTENSIONS) return 0;
        unsigned ext = hello_u16(b + pos);
        size_t len = hello_u16(b + pos + 2), stop = pos + 4 + len;
        if (stop > end) return 0;
        for (int i = 0; i < count; i++)
            if (seen[i] == ext) return 0;
        seen[count++] = ext;
        if (ext == EXT_CONNECTION_ID) {
            /* ClientHello.cid_offered: one length byte, then exactly that many bytes */
            if (len == 0 || (size_t)b[pos + 4] + 1 != len) return 0;
            h->cid = b + pos + 5;
            h->cid_len = b[pos + 4];
        } else if (ext == EXT_EXTENDED_MASTER_SECRET) {
            h->ems = 1;
        } else if (ext == EXT_RENEGOTIATION_INFO) {
            h->reneg = b + pos + 4;
            h->reneg_len = len;
        } else if (ext == EXT_SUPPORTED_GROUPS || ext == EXT_EC_POINT_FORMATS || ext == EXT_SIGNATURE_ALGORITHMS) {
            int i = ext == EXT_SUPPORTED_GROUPS ? 0 : ext == EXT_EC_POINT_FORMATS ? 1 : 2;
            h->ecdhe_ext[i] = b + pos + 4;
            h->ecdhe_ext_len[i] = len;
        }
        pos = stop;
    }
    return 1;
}

/* 1 when the ECDHE extensions sent are well-formed as messages.py reads them (a u16 list of an even
 * length; a u8 list), each exactly filling its extension */
static inline int hello_ecdhe_extensions_ok(const client_hello *h) {
    for (int i = 0; i < 3; i++) {
        const unsigned char *e = h->ecdhe_ext[i];
        size_t n = h->ecdhe_ext_len[i];
        if (e == NULL) continue;
        if (i == 1 ? (n < 1 || (size_t)e[0] + 1 != n) : (n < 2 || (size_t)hello_u16(e) + 2 != n || n % 2)) return 0;
    }
    return 1;
}

/* The HelloVerifyRequest record (RFC 6347 §4.2.1) carrying `cookie` (16 bytes) into r (44 bytes):
 * its record numbered as the hello's, its message as the hello's message_seq, server_version DTLS
 * 1.0 whatever is negotiated later */
#define HELLO_VERIFY_RECORD 44
static inline void hello_verify_record(unsigned char *r, unsigned long long seq, unsigned message_seq,
                                       const unsigned char *cookie) {
    const unsigned hvr_len = 3 + 16, msg_len = 12 + hvr_len;
    r[0] = 22; r[1] = 0xFE; r[2] = 0xFD; r[3] = 0; r[4] = 0;
    for (int i = 0; i < 6; i++) r[5 + i] = (unsigned char)(seq >> (8 * (5 - i)));
    r[11] = (unsigned char)(msg_len >> 8); r[12] = (unsigned char)msg_len;
    unsigned char *h = r + 13;
    h[0] = 3; h[1] = 0; h[2] = 0; h[3] = (unsigned char)hvr_len;
    h[4] = (unsigned char)(message_seq >> 8); h[5] = (unsigned char)message_seq;
    h[6] = h[7] = h[8] = 0; h[9] = 0; h[10] = 0; h[11] = (unsigned char)hvr_len;
    h[12] = 0xFE; h[13] = 0xFF; h[14] = 16;
    memcpy(h + 15, cookie, 16);
}

/* The cookie of a hello (engine.CookieJar): HMAC-SHA256(secret, len(addr) addr version random
 * session_id suites compression) into mac; 1, or 0 (libcrypto failed, or a secret over 64 bytes) */
static inline int hello_cookie(const unsigned char *secret, size_t secret_len, const unsigned char *addr,
                               size_t addr_len, const unsigned char *body, const client_hello *h,
                               unsigned char mac[HMAC256_LEN]) {
    unsigned char inner[HMAC256_LEN], prefix[2] = {(unsigned char)(addr_len >> 8), (unsigned char)addr_len};
    unsigned int n;
    hmac256_key own = {NULL, NULL, NULL}, *key = hmac256_cached(secret, secret_len);
    if (key == NULL) { /* (a secret the cache does not hold: over 64 bytes) */
        if (!hmac256_init(&own, secret, secret_len)) return 0;
        key = &own;
    }
    EVP_MD_CTX *w = key->work;
    int ok = EVP_MD_CTX_copy_ex(w, key->inner) && EVP_DigestUpdate(w, prefix, 2) && EVP_DigestUpdate(w, addr, addr_len) &&
             EVP_DigestUpdate(w, body, h->session_end) &&
             EVP_DigestUpdate(w, body + h->cookie_end, h->comp_end - h->cookie_end) &&
             EVP_DigestFinal_ex(w, inner, &n) && EVP_MD_CTX_copy_ex(w, key->outer) &&
             EVP_DigestUpdate(w, inner, sizeof inner) && EVP_DigestFinal_ex(w, mac, &n);
    hmac256_free(&own);
    return ok;
}

/* The stateless answer to a cookie-less ClientHello (RFC 6347 §4.2.1), the whole rule in one place
 * for the engine (_hello.c) and the fast lane (which answers a new peer's hello without Python):
 * `frag` (n bytes) is the epoch-0 handshake record's fragment, `seq` its record number, `addr` the
 * peer as the engine names it (repr(peer), UTF-8) and `secret` the cookie secret.  Every fragment
 * framed as parse_fragments_untrusted frames it, the first one whole; the hello parsed with every
 * check messages.parse_client_hello_untrusted makes.  1: the HelloVerifyRequest record is in `out`;
 * 0: the Python path decides (anything malformed -- it names the error --, a hello carrying a cookie
 * of the cookie's length -- it may be valid --, an unusual shape); -1: libcrypto failed. */
#define HELLO_HS_HEADER 12
#define HELLO_MAX_MESSAGE 8192
#define HELLO_MAX_SEQ 255
#define HELLO_COOKIE_LENGTH 16
static inline unsigned hello_u24(const unsigned char *p) { return (unsigned)p[0] << 16 | (unsigned)p[1] << 8 | p[2]; }

static inline int hello_verify_answer(const unsigned char *p, size_t n, unsigned long long seq,
                                      const unsigned char *addr, size_t addr_len, const unsigned char *secret,
                                      size_t secret_len, unsigned char out[HELLO_VERIFY_RECORD]) {
    size_t pos = 0, body_len = 0;
    const unsigned char *body = NULL;
    unsigned message_seq = 0;
    while (pos < n) {
        if (n - pos < HELLO_HS_HEADER) return 0;
        unsigned length = hello_u24(p + pos + 1), offset = hello_u24(p + pos + 6), flen = hello_u24(p + pos + 9);
        if ((size_t)offset + flen > length || pos + HELLO_HS_HEADER + flen > n || length > HELLO_MAX_MESSAGE) return 0;
        if (body == NULL) {
            if (offset != 0 || flen != length) return 0;
            message_seq = hello_u16(p + pos + 4);
            body = p + pos + HELLO_HS_HEADER;
            body_len = flen;
        }
        pos += HELLO_HS_HEADER + flen;
    }
    client_hello ch;
    if (body == NULL || message_seq > HELLO_MAX_SEQ || seq >> 48 || addr_len > 0xFFFF ||
        !client_hello_parse(body, body_len, &ch) || ch.cookie_end - ch.cookie_start == HELLO_COOKIE_LENGTH)
        return 0;
    unsigned char mac[HMAC256_LEN];
    if (!hello_cookie(secret, secret_len, addr, addr_len, body, &ch, mac)) return -1;
    hello_verify_record(out, seq, message_seq, mac);
    return 1;
}

#endif
