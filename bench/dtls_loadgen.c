/*
 * dtls_loadgen: DTLS 1.2 PSK load for corem's CoAPS benchmark (OpenSSL, written in C so the client
 * is not what limits the servers it compares).
 *
 *   dtls_loadgen HOST PORT DEVICES INFLIGHT HS_SECONDS SECONDS IDENTITY KEY METHOD PATH PAYLOAD_HEX [CF
 *                [HS_CONCURRENT]]
 *
 * Phase 1, for HS_SECONDS: full handshakes one after another (cookie exchange included), each on
 * a fresh socket, then closed (close_notify): handshakes/s, the latency of one handshake.
 * Phase 1b, with HS_CONCURRENT > 0, for HS_SECONDS: that many clients each handshaking again and
 * again at once (non-blocking, the DTLS retransmission timers kept): handshakes/s a server can
 * take, what a fleet reconnecting after an outage asks of it.
 * Phase 2: DEVICES sessions, each with INFLIGHT confirmable requests in flight, for SECONDS:
 * encrypted requests/s and latency.  Prints one JSON object.
 *
 * Phase 2's records are sealed and opened here, on libcrypto's EVP (its TLS record mode, as libssl
 * itself does), with the keys of the session libssl negotiated (RFC 5246 §6.3's key block from its
 * master secret and randoms): through SSL_write/SSL_read each request cost this generator ~7.5 us
 * against the plain generator's ~5 (bench/loadgen.c), and a slower client is a different load, not
 * only a slower one -- on a 2-core machine it holds more of the requests in flight on its own core,
 * so the server drains fewer at a time (measured on corem's plain lane with loadgen.c slowed by 2.2
 * us a request: ~220 -> 75-99 readings a commit, up to -17% requests/s).
 * DTLS_LOADGEN_SSL_RECORDS=1 keeps phase 2 on SSL_write/SSL_read (what the rows measured before
 * 2026-12-07 14:22 had).  The record code is this client's own, not corem's dtls_records.h: a
 * client sharing the server's code would share its mistakes (libcoap answering it is the check).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "coap_template.h"

#define SLOTS 1024
#define MAX_SAMPLES 2000000
#define TIMEOUT_NS 2000000000LL

static const char *g_identity;
static unsigned char g_key[64];
static unsigned g_keylen;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned psk_cb(SSL *ssl, const char *hint, char *identity, unsigned max_id, unsigned char *psk,
                       unsigned max_psk) {
    (void)ssl;
    (void)hint;
    snprintf(identity, max_id, "%s", g_identity);
    if (g_keylen > max_psk) return 0;
    memcpy(psk, g_key, g_keylen);
    return g_keylen;
}

typedef struct {
    int fd;
    SSL *ssl;
    uint16_t next_mid;
    int64_t sent_at[SLOTS];
    uint16_t mid_of[SLOTS];
    /* phase 2's records (raw_records): a context for this client's write key and implicit nonce
     * part and one for the server's (ccm8_ctx), the next sequence number of epoch 1 (the
     * client's Finished took 0) */
    EVP_CIPHER_CTX *seal, *open;
    uint64_t wseq;
} device_t;

/* Phase 2's records sealed and opened here (not DTLS_LOADGEN_SSL_RECORDS=1) */
static int raw_records = 1;
#define CCM8_TAG 8
#define REC_HEADER 13
#define EXPLICIT_NONCE 8

/* A context for one direction's records in libcrypto's TLS record mode for CCM (as libssl's own
 * records: per record one parameter, the AAD, and one EVP_Cipher in place), keyed once, its
 * implicit nonce part (`iv`) fixed. */
static EVP_CIPHER_CTX *ccm8_ctx(const uint8_t key[16], const uint8_t iv[4], int enc) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL || !EVP_CipherInit_ex(c, EVP_aes_128_ccm(), NULL, NULL, NULL, enc) ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) <= 0 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, CCM8_TAG, NULL) <= 0 ||
        !EVP_CipherInit_ex(c, NULL, NULL, key, NULL, enc) ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_CCM_SET_IV_FIXED, 4, (void *)iv) <= 0) {
        EVP_CIPHER_CTX_free(c);
        return NULL;
    }
    return c;
}

/* One record's AEAD in TLS record mode: `rec` is the explicit nonce, the text and the tag (`len`
 * bytes in all, in place).  The AAD's length is what libcrypto expects there: the text and the
 * explicit nonce when sealing (it writes that nonce from the AAD's first 8 bytes, the epoch and
 * sequence number, as DTLS's own), the whole `len` when opening.  1 done, 0 not. */
static int ccm8_record(EVP_CIPHER_CTX *c, uint8_t aad[13], uint8_t *rec, size_t len) {
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TLS1_AAD, aad, 13), OSSL_PARAM_END};
    if (EVP_CIPHER_CTX_set_params(c, params) && EVP_Cipher(c, rec, rec, (unsigned int)len) > 0) return 1;
    ERR_clear_error();
    return 0;
}

/* The session's record keys (TLS_PSK_WITH_AES_128_CCM_8: no MAC keys; client key, server key,
 * client IV, server IV: RFC 5246 §6.3, the PRF of RFC 5246 §5 with SHA-256 through libcrypto's
 * TLS1-PRF).  0, or -1. */
static int derive_keys(device_t *d) {
    uint8_t master[48], seed[13 + 64], block[40];
    const SSL_CIPHER *suite = SSL_get_current_cipher(d->ssl);
    if (suite == NULL || strcmp(SSL_CIPHER_get_name(suite), "PSK-AES128-CCM8") != 0) return -1; /* (make_ctx's) */
    SSL_SESSION *sess = SSL_get_session(d->ssl);
    if (sess == NULL || SSL_SESSION_get_master_key(sess, master, sizeof master) != sizeof master) return -1;
    memcpy(seed, "key expansion", 13);
    if (SSL_get_server_random(d->ssl, seed + 13, 32) != 32 || SSL_get_client_random(d->ssl, seed + 45, 32) != 32)
        return -1;
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "TLS1-PRF", NULL);
    EVP_KDF_CTX *kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, "SHA256", 0),
                           OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SECRET, master, sizeof master),
                           OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SEED, seed, sizeof seed), OSSL_PARAM_END};
    int ok = kctx != NULL && EVP_KDF_derive(kctx, block, sizeof block, params) > 0;
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    if (!ok) return -1;
    d->seal = ccm8_ctx(block, block + 32, 1);
    d->open = ccm8_ctx(block + 16, block + 36, 0);
    d->wseq = 1;
    return d->seal && d->open ? 0 : -1;
}

static void put48(uint8_t *p, uint64_t v) {
    for (int i = 5; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

/* RFC 5246 §6.2.3.3's additional data, DTLS's epoch and sequence number first (RFC 6347 §4.1.2.1),
 * with the length libcrypto's TLS record mode expects (ccm8_record) */
static void aad13(uint8_t a[13], const uint8_t epoch_seq[8], uint8_t type, size_t length) {
    memcpy(a, epoch_seq, 8);
    a[8] = type;
    a[9] = 0xFE;
    a[10] = 0xFD;
    a[11] = (uint8_t)(length >> 8);
    a[12] = (uint8_t)length;
}

/* One application_data record of epoch 1 holding `plain` into `out`: its length, or -1. */
static int seal_record(device_t *d, const uint8_t *plain, size_t n, uint8_t *out) {
    uint8_t *es = out + 3, aad[13];
    out[0] = 23;
    out[1] = 0xFE;
    out[2] = 0xFD;
    es[0] = 0;
    es[1] = 1;
    put48(es + 2, d->wseq++);
    size_t frag = EXPLICIT_NONCE + n + CCM8_TAG;
    out[11] = (uint8_t)(frag >> 8);
    out[12] = (uint8_t)frag;
    memcpy(out + REC_HEADER + EXPLICIT_NONCE, plain, n);
    aad13(aad, es, 23, EXPLICIT_NONCE + n);
    return ccm8_record(d->seal, aad, out + REC_HEADER, frag) ? (int)(REC_HEADER + frag) : -1;
}

/* The first application_data record of epoch 1 in the datagram `buf` opened in place: its
 * plaintext's length (moved to `buf`), or -1 (not one, or it failed to authenticate).  (Servers
 * answer each request in a datagram of its own.) */
static int open_record(device_t *d, uint8_t *buf, size_t len) {
    for (size_t off = 0; off + REC_HEADER <= len;) {
        uint8_t *r = buf + off;
        size_t frag = (size_t)r[11] << 8 | r[12];
        if (off + REC_HEADER + frag > len) return -1;
        off += REC_HEADER + frag;
        if (r[0] != 23 || r[3] != 0 || r[4] != 1 || frag < EXPLICIT_NONCE + CCM8_TAG) continue;
        uint8_t aad[13];
        aad13(aad, r + 3, 23, frag);
        if (!ccm8_record(d->open, aad, r + REC_HEADER, frag)) return -1;
        size_t n = frag - EXPLICIT_NONCE - CCM8_TAG;
        memmove(buf, r + REC_HEADER + EXPLICIT_NONCE, n);
        return (int)n;
    }
    return -1;
}

static SSL_CTX *make_ctx(void) {
    SSL_CTX *ctx = SSL_CTX_new(DTLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, DTLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(ctx, DTLS1_2_VERSION);
    SSL_CTX_set_cipher_list(ctx, "PSK-AES128-CCM8");
    SSL_CTX_set_psk_client_callback(ctx, psk_cb);
    return ctx;
}

/* A datagram BIO of this client's own on a connected socket: send and recv, nothing else.
 * OpenSSL's BIO_s_datagram wraps every read in a getsockopt and two setsockopt (it moves
 * SO_RCVTIMEO to the DTLS timer and back): ~9% of this generator's CPU while it handshakes, and in
 * the 32-at-once phase this generator's core is as busy as the server's (95-98%, measured
 * 2026-12-07), so the servers were measured partly against its syscalls.  Phase 1b's: its
 * retransmission timers are this client's (DTLSv1_handle_timeout every 10 ms). */
static int fd_bio_write(BIO *b, const char *data, int len) {
    BIO_clear_retry_flags(b);
    ssize_t r = send((int)(intptr_t)BIO_get_data(b), data, (size_t)len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
    return (int)r;
}

static int fd_bio_read(BIO *b, char *out, int len) {
    BIO_clear_retry_flags(b);
    ssize_t r = recv((int)(intptr_t)BIO_get_data(b), out, (size_t)len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(b);
    return (int)r;
}

static long fd_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)b, (void)num, (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
    case BIO_CTRL_DGRAM_SET_CONNECTED:
        return 1;
    case BIO_CTRL_DGRAM_GET_MTU_OVERHEAD:
        return 28; /* (IPv4 and UDP headers) */
    default:
        return 0; /* (no MTU to query, no timer to move, nothing pending) */
    }
}

static int fd_bio_create(BIO *b) {
    BIO_set_init(b, 1);
    return 1;
}

static BIO *fd_bio(int fd) {
    static BIO_METHOD *method;
    if (method == NULL) {
        method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "corem-bench datagram fd");
        BIO_meth_set_write(method, fd_bio_write);
        BIO_meth_set_read(method, fd_bio_read);
        BIO_meth_set_ctrl(method, fd_bio_ctrl);
        BIO_meth_set_create(method, fd_bio_create);
    }
    BIO *bio = BIO_new(method);
    BIO_set_data(bio, (void *)(intptr_t)fd);
    return bio;
}

/* `ssl` on `fd`: its BIO, and the MTU fd_bio does not query */
static void attach(SSL *ssl, int fd) {
    BIO *bio = fd_bio(fd);
    SSL_set_bio(ssl, bio, bio);
    SSL_set_options(ssl, SSL_OP_NO_QUERY_MTU);
    SSL_set_mtu(ssl, 1400);
}

/* A connected UDP socket and a finished handshake on it, or -1. */
static int connect_dtls(SSL_CTX *ctx, struct sockaddr_in *sa, SSL **out) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) return -1;
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    SSL *ssl = SSL_new(ctx);
    /* (OpenSSL's own datagram BIO here: a blocking handshake whose reads it times to the DTLS
     * timer.  fd_bio in its place, resending on a fixed SO_RCVTIMEO, twice left a phase-2 session
     * unfinished in a dtls_bench run -- after phase 1b, against corem and against libcoap -- and
     * its syscalls matter only where this client is as busy as the server: phase 1b) */
    BIO *bio = BIO_new_dgram(fd, BIO_NOCLOSE);
    BIO_ctrl(bio, BIO_CTRL_DGRAM_SET_CONNECTED, 0, sa);
    SSL_set_bio(ssl, bio, bio);
    if (SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(fd);
        return -1;
    }
    *out = ssl;
    return fd;
}

/* Phase 1b: `conc` clients handshaking at once, each a new session on a new socket when its last
 * one finished; handshakes completed per second (failures counted apart). */
typedef struct {
    int fd;
    SSL *ssl;
} hs_client_t;

static int hs_start(SSL_CTX *ctx, struct sockaddr_in *sa, hs_client_t *c, int ep, int index) {
    c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)sa, sizeof *sa) < 0) return -1;
    c->ssl = SSL_new(ctx);
    attach(c->ssl, c->fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    SSL_connect(c->ssl); /* (its ClientHello: the answer wakes it) */
    return 0;
}

static void hs_end(hs_client_t *c, int ep) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    SSL_shutdown(c->ssl);
    SSL_free(c->ssl);
    close(c->fd);
    ERR_clear_error();
}

static double concurrent_handshakes(SSL_CTX *ctx, struct sockaddr_in *sa, int conc, double seconds, long long *ok,
                                    long long *failed) {
    hs_client_t *cs = calloc(conc, sizeof(hs_client_t));
    int ep = epoll_create1(0);
    for (int i = 0; i < conc; i++) hs_start(ctx, sa, &cs[i], ep, i);
    int64_t t0 = now_ns(), end = t0 + (int64_t)(seconds * 1e9), last_timers = t0;
    struct epoll_event events[256];
    while (now_ns() < end) {
        int n = epoll_wait(ep, events, 256, 10);
        for (int e = 0; e < n; e++) {
            hs_client_t *c = &cs[events[e].data.u32];
            int r = SSL_connect(c->ssl);
            if (r == 1) {
                (*ok)++;
            } else {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) continue;
                (*failed)++;
            }
            hs_end(c, ep);
            hs_start(ctx, sa, c, ep, (int)(c - cs));
        }
        int64_t t = now_ns();
        if (t - last_timers > 10000000LL) { /* the flights' retransmission timers, every 10 ms */
            last_timers = t;
            for (int i = 0; i < conc; i++) DTLSv1_handle_timeout(cs[i].ssl);
        }
    }
    double elapsed = (now_ns() - t0) / 1e9;
    for (int i = 0; i < conc; i++) hs_end(&cs[i], ep);
    close(ep);
    free(cs);
    return elapsed;
}

static long long n_sent, n_timeouts, n_2xx, n_other, n_bad_records;
static int64_t *samples;
static size_t nsamples;

static void send_one(device_t *d) {
    uint16_t mid = d->next_mid++;
    int slot = mid & (SLOTS - 1);
    uint8_t msg[1500];
    memcpy(msg, tmpl, tmpl_len);
    msg[2] = mid >> 8;
    msg[3] = mid & 0xff;
    d->sent_at[slot] = now_ns();
    d->mid_of[slot] = mid;
    n_sent++;
    if (!raw_records) {
        SSL_write(d->ssl, msg, tmpl_len);
        return;
    }
    uint8_t rec[1600];
    int len = seal_record(d, msg, tmpl_len, rec);
    if (len < 0) {
        fprintf(stderr, "libcrypto failed to seal a record\n");
        exit(1);
    }
    send(d->fd, rec, (size_t)len, 0);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 12) {
        fprintf(stderr, "usage: %s HOST PORT DEVICES INFLIGHT HS_SECONDS SECONDS IDENTITY KEY METHOD PATH HEX [CF [HS_CONCURRENT]]\n",
                argv[0]);
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    int ndev = atoi(argv[3]), inflight = atoi(argv[4]);
    double hs_seconds = atof(argv[5]), seconds = atof(argv[6]);
    g_identity = argv[7];
    g_keylen = strlen(argv[8]) < sizeof g_key ? strlen(argv[8]) : sizeof g_key;
    memcpy(g_key, argv[8], g_keylen);
    build_template(atoi(argv[9]), argv[10], argv[11], argc > 12 ? atoi(argv[12]) : -1);
    SSL_CTX *ctx = make_ctx();
    const char *ssl_records = getenv("DTLS_LOADGEN_SSL_RECORDS");
    raw_records = !(ssl_records && strcmp(ssl_records, "1") == 0);

    /* phase 1: handshakes per second */
    long long hs_ok = 0, hs_fail = 0;
    int64_t t0 = now_ns(), hs_end = t0 + (int64_t)(hs_seconds * 1e9);
    while (now_ns() < hs_end) {
        SSL *ssl;
        int fd = connect_dtls(ctx, &sa, &ssl);
        if (fd < 0) {
            hs_fail++;
            continue;
        }
        hs_ok++;
        SSL_shutdown(ssl);
        SSL_free(ssl);
        close(fd);
    }
    double hs_elapsed = (now_ns() - t0) / 1e9;
    int conc = argc > 13 ? atoi(argv[13]) : 0;
    long long chs_ok = 0, chs_fail = 0;
    double chs_elapsed = conc > 0 ? concurrent_handshakes(ctx, &sa, conc, hs_seconds, &chs_ok, &chs_fail) : 1.0;

    /* phase 2: encrypted closed-loop requests */
    device_t *devs = calloc(ndev, sizeof(device_t));
    int ep = epoll_create1(0);
    for (int i = 0; i < ndev; i++) {
        /* (a server may still be clearing the half-open handshakes of phase 1b: a few tries) */
        for (int tries = 0; tries < 3; tries++)
            if ((devs[i].fd = connect_dtls(ctx, &sa, &devs[i].ssl)) >= 0) break;
        if (devs[i].fd < 0) {
            fprintf(stderr, "session %d: handshake failed\n", i);
            return 1;
        }
        fcntl(devs[i].fd, F_SETFL, fcntl(devs[i].fd, F_GETFL) | O_NONBLOCK);
        if (raw_records && derive_keys(&devs[i]) < 0) {
            fprintf(stderr, "session %d: its record keys could not be derived\n", i);
            return 1;
        }
        devs[i].next_mid = (uint16_t)(i * 7919);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, devs[i].fd, &ev);
    }
    samples = malloc(sizeof(int64_t) * MAX_SAMPLES);
    int64_t start = now_ns(), end = start + (int64_t)(seconds * 1e9), last_scan = start;
    for (int i = 0; i < ndev; i++)
        for (int k = 0; k < inflight; k++) send_one(&devs[i]);
    struct epoll_event events[256];
    uint8_t buf[2048];
    long long answered = 0;
    while (now_ns() < end) {
        int n = epoll_wait(ep, events, 256, 50);
        for (int e = 0; e < n; e++) {
            device_t *d = &devs[events[e].data.u32];
            for (;;) {
                int r;
                if (raw_records) {
                    ssize_t got = recv(d->fd, buf, sizeof buf, 0);
                    if (got < 0) break;
                    if ((r = open_record(d, buf, (size_t)got)) < 0) {
                        n_bad_records++;
                        continue;
                    }
                } else if ((r = SSL_read(d->ssl, buf, sizeof buf)) <= 0) {
                    ERR_clear_error();
                    break;
                }
                if (r < 4 || ((buf[0] >> 4) & 3) != 2 || buf[1] == 0) continue;
                uint16_t mid = (buf[2] << 8) | buf[3];
                int slot = mid & (SLOTS - 1);
                if (d->sent_at[slot] == 0 || d->mid_of[slot] != mid) continue;
                int64_t lat = now_ns() - d->sent_at[slot];
                d->sent_at[slot] = 0;
                if ((buf[1] >> 5) == 2) n_2xx++; else n_other++;
                if (nsamples < MAX_SAMPLES) samples[nsamples++] = lat;
                answered++;
                send_one(d);
            }
        }
        int64_t t = now_ns();
        if (t - last_scan > 100000000LL) {
            last_scan = t;
            for (int i = 0; i < ndev; i++)
                for (int s = 0; s < SLOTS; s++)
                    if (devs[i].sent_at[s] && devs[i].sent_at[s] < t - TIMEOUT_NS) {
                        devs[i].sent_at[s] = 0;
                        n_timeouts++;
                        send_one(&devs[i]);
                    }
        }
    }
    double elapsed = (now_ns() - start) / 1e9;
    qsort(samples, nsamples, sizeof(int64_t), cmp64);
#define PCT(p) (nsamples ? samples[(size_t)((nsamples - 1) * (p))] / 1e3 : 0.0)
    printf("{\"handshakes\": %lld, \"handshake_failures\": %lld, \"handshakes_per_s\": %.1f, "
           "\"concurrent_handshakes\": %lld, \"concurrent_failures\": %lld, \"concurrent_handshakes_per_s\": %.1f, "
           "\"sent\": %lld, \"answered\": %lld, \"ok_2xx\": %lld, \"other\": %lld, \"timeouts\": %lld, "
           "\"bad_records\": %lld, \"seconds\": %.3f, \"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f}\n",
           hs_ok, hs_fail, hs_ok / hs_elapsed, chs_ok, chs_fail, chs_ok / chs_elapsed, n_sent, answered, n_2xx, n_other, n_timeouts, n_bad_records, elapsed,
           answered / elapsed, PCT(0.5), PCT(0.99));
    return 0;
}
