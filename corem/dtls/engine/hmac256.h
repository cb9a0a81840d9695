/* HMAC-SHA256 (RFC 2104) on OpenSSL's EVP digest, with SHA-256 fetched once and the key's inner and
 * outer pads hashed once per key: each MAC then costs two context copies and two finals, not
 * HMAC_Init_ex's implicit fetch and key setup (OpenSSL 3).  For _prf.c and _hello.c. */
#ifndef COREM_HMAC256_H
#define COREM_HMAC256_H

#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define HMAC256_LEN 32
#define HMAC256_BLOCK 64

static EVP_MD *hmac256_md; /* fetched at module init */

typedef struct {
    EVP_MD_CTX *inner, *outer, *work;
} hmac256_key;

static inline int hmac256_fetch(void) {
    if (hmac256_md == NULL) hmac256_md = EVP_MD_fetch(NULL, "SHA2-256", NULL);
    return hmac256_md != NULL;
}

static inline void hmac256_free(hmac256_key *k) {
    EVP_MD_CTX_free(k->inner);
    EVP_MD_CTX_free(k->outer);
    EVP_MD_CTX_free(k->work);
    k->inner = k->outer = k->work = NULL;
}

/* 1, or 0 (k freed) */
static inline int hmac256_init(hmac256_key *k, const unsigned char *key, size_t keylen) {
    unsigned char block[HMAC256_BLOCK], pad[HMAC256_BLOCK];
    unsigned int n;
    k->inner = EVP_MD_CTX_new();
    k->outer = EVP_MD_CTX_new();
    k->work = EVP_MD_CTX_new();
    if (k->inner == NULL || k->outer == NULL || k->work == NULL) goto fail;
    memset(block, 0, sizeof block);
    if (keylen > HMAC256_BLOCK) {
        if (!EVP_DigestInit_ex2(k->work, hmac256_md, NULL) || !EVP_DigestUpdate(k->work, key, keylen) ||
            !EVP_DigestFinal_ex(k->work, block, &n))
            goto fail;
    } else if (keylen) {
        memcpy(block, key, keylen);
    }
    for (int i = 0; i < HMAC256_BLOCK; i++) pad[i] = block[i] ^ 0x36;
    if (!EVP_DigestInit_ex2(k->inner, hmac256_md, NULL) || !EVP_DigestUpdate(k->inner, pad, sizeof pad)) goto fail;
    for (int i = 0; i < HMAC256_BLOCK; i++) pad[i] = block[i] ^ 0x5c;
    if (!EVP_DigestInit_ex2(k->outer, hmac256_md, NULL) || !EVP_DigestUpdate(k->outer, pad, sizeof pad)) goto fail;
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    return 1;
fail:
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    hmac256_free(k);
    return 0;
}

/* HMAC(key, a || b) into out (32 bytes); b may be empty */
static inline int hmac256(hmac256_key *k, const void *a, size_t alen, const void *b, size_t blen, unsigned char *out) {
    unsigned char inner[HMAC256_LEN];
    unsigned int n;
    return EVP_MD_CTX_copy_ex(k->work, k->inner) && EVP_DigestUpdate(k->work, a, alen) &&
           (blen == 0 || EVP_DigestUpdate(k->work, b, blen)) && EVP_DigestFinal_ex(k->work, inner, &n) &&
           EVP_MD_CTX_copy_ex(k->work, k->outer) && EVP_DigestUpdate(k->work, inner, sizeof inner) &&
           EVP_DigestFinal_ex(k->work, out, &n);
}

/* The key of `secret` with its pads hashed, from a cache of the last two secrets seen (the cookie
 * secrets: the current one and the one before, replaced once a minute), or NULL (libcrypto failed, or
 * a secret over 64 bytes: the caller keys one itself).
 * Valid until the next call; the module's own cache (the GIL serializes its callers). */
static inline hmac256_key *hmac256_cached(const unsigned char *secret, size_t len) {
    static struct {
        unsigned char secret[64];
        size_t len;
        hmac256_key key;
    } cache[2];
    static int next;
    if (len > sizeof cache[0].secret) return NULL;
    for (int i = 0; i < 2; i++)
        if (cache[i].key.inner != NULL && cache[i].len == len && memcmp(cache[i].secret, secret, len) == 0)
            return &cache[i].key;
    int i = next;
    next ^= 1;
    hmac256_free(&cache[i].key);
    if (!hmac256_init(&cache[i].key, secret, len)) return NULL;
    memcpy(cache[i].secret, secret, len);
    cache[i].len = len;
    return &cache[i].key;
}

#endif
