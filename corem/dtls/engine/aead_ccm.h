/*
 * AES-CCM on libcrypto's EVP -- a context's set-up, and one operation in the call sequence CCM needs
 * (the length first, then the AAD, then the data) -- for every CCM of corem's C: the DTLS records (dtls_records.h) and OSCORE in
 * the fast lane (corem/fastlane/oscore.h).  Header-only (static).
 */
#ifndef COREM_AEAD_CCM_H
#define COREM_AEAD_CCM_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

/* AES-128-CCM, fetched once (an EVP_aes_128_ccm() would be fetched again at each context's init). */
static inline const EVP_CIPHER *aead_ccm_cipher(void) {
    static EVP_CIPHER *ccm;
    if (ccm == NULL) ccm = EVP_CIPHER_fetch(NULL, "AES-128-CCM", NULL);
    return ccm;
}

/* `ctx` made (again) an AES-128-CCM context for one direction (`enc`): `ivlen`-byte nonces and
 * `taglen`-byte tags (CCM wants both before the key), keyed with `key`.  1, or 0 (libcrypto could
 * not; its error queue is the caller's to clear). */
static inline int aead_ccm_init(EVP_CIPHER_CTX *ctx, int enc, const uint8_t *key, int ivlen, int taglen) {
    const EVP_CIPHER *c = aead_ccm_cipher();
    return c != NULL && EVP_CipherInit_ex(ctx, c, NULL, NULL, NULL, enc) &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, ivlen, NULL) > 0 &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, taglen, NULL) > 0 &&
           EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, enc);
}

/* One AES-CCM operation on `ctx` (keyed again with `key`, or NULL: as it is): `n` bytes of `in` to
 * `out` (in == out is fine) -- the length first, then the AAD, then the data --, the tag (`taglen`
 * bytes) read from or written to `tag`.  1 done, 0 the tag did not match (decryption: OpenSSL has
 * wiped `out`), -1 libcrypto failed otherwise.  The DTLS records' CCM and OSCORE's (the fast lane's
 * oscore.h: a 13-byte nonce, the nonce length set when its context was made) alike. */
static inline int aead_ccm(EVP_CIPHER_CTX *ctx, int enc, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad,
                           size_t aad_len, const uint8_t *in, uint8_t *out, size_t n, uint8_t *tag, size_t taglen) {
    static const uint8_t none[1] = {0};
    int outl = 0;
    OSSL_PARAM params[2] = {OSSL_PARAM_END, OSSL_PARAM_END};
    if (in == NULL) in = none; /* (an update with no input would be taken for the final) */
    if (!enc) params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, taglen);
    if (!EVP_CipherInit_ex2(ctx, NULL, key, nonce, enc, params)) goto fail;
    if (!EVP_CipherUpdate(ctx, NULL, &outl, NULL, (int)n)) goto fail;
    if (!EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len)) goto fail;
    if (!EVP_CipherUpdate(ctx, out, &outl, in, (int)n)) {
        if (enc) goto fail;
        ERR_clear_error();
        return 0;
    }
    if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)taglen, tag) <= 0) goto fail;
    return 1;
fail:
    ERR_clear_error();
    return -1;
}

#endif
