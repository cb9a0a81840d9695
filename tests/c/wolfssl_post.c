/* One CoAP POST /telemetry over DTLS 1.2 with wolfSSL (Debian's libwolfssl-dev), for
 * tests/test_interop_dtls_stacks.py -- wolfSSL is the DTLS stack of many constrained devices:
 *
 *   wolfssl_post PORT SUITE PAYLOAD_HEX CERT_PEM KEY_PEM CA_PEM
 *
 * SUITE is wolfSSL's name (ECDHE-ECDSA-AES128-CCM-8, ECDHE-ECDSA-AES128-GCM-SHA256).  It sends
 * CERT_PEM as its client certificate and verifies the server's against CA_PEM.  (Certificates only:
 * Debian builds wolfSSL without the plain PSK suites -- PSK only with DHE or ECDHE, which corem does
 * not implement.)  Prints one JSON
 * line: {"code": "2.04", "suite": <the suite wolfSSL negotiated>} or {"error": ...}; exits 0 only
 * on an answer.  (wolfSSL offers extended_master_secret by default and has no call that says whether
 * it was used: corem's engine refuses a handshake without it, so an answer says it was.)  The CoAP request is written by hand (RFC 7252 §3): a
 * confirmable POST, Content-Format 60 (application/cbor), sent again every 2 s until answered. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what, WOLFSSL *ssl, int ret) {
    char reason[WOLFSSL_MAX_ERROR_SZ] = "";
    if (ssl != NULL) wolfSSL_ERR_error_string_n((unsigned long)wolfSSL_get_error(ssl, ret), reason, sizeof reason);
    printf("{\"error\": \"%s: %s\"}\n", what, reason);
    return 2;
}

static size_t unhex(const char *hex, unsigned char *out, size_t max) {
    size_t n = 0;
    for (; hex[0] && hex[1] && n < max; hex += 2) {
        unsigned int b;
        if (sscanf(hex, "%2x", &b) != 1) break;
        out[n++] = (unsigned char)b;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s PORT SUITE PAYLOAD_HEX CERT_PEM KEY_PEM CA_PEM\n", argv[0]);
        return 64;
    }
    alarm(120); /* (an upper bound only: a server that never answers fails the test) */
    wolfSSL_Init();
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
    if (ctx == NULL || wolfSSL_CTX_set_cipher_list(ctx, argv[2]) != WOLFSSL_SUCCESS) return fail("cipher list", NULL, 0);
    if (wolfSSL_CTX_use_certificate_file(ctx, argv[4], WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_use_PrivateKey_file(ctx, argv[5], WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_load_verify_locations(ctx, argv[6], NULL) != WOLFSSL_SUCCESS)
        return fail("certificate files", NULL, 0);
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, NULL); /* (the server's certificate, against CA_PEM) */

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) return fail("socket", NULL, 0);
    WOLFSSL *ssl = wolfSSL_new(ctx);
    if (ssl == NULL || wolfSSL_dtls_set_peer(ssl, &sa, sizeof sa) != WOLFSSL_SUCCESS ||
        wolfSSL_set_fd(ssl, fd) != WOLFSSL_SUCCESS)
        return fail("session", NULL, 0);
    int ret = wolfSSL_connect(ssl);
    if (ret != WOLFSSL_SUCCESS) return fail("handshake", ssl, ret);
    /* (non-blocking from here: a datagram wolfSSL drops -- a duplicate, a stale record -- leaves
     * the read with nothing, and the loop polls again instead of blocking until the alarm) */
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) return fail("non-blocking", NULL, 0);
    wolfSSL_dtls_set_using_nonblock(ssl, 1);

    unsigned char payload[1024], request[1100], answer[1500];
    size_t n = unhex(argv[3], payload, sizeof payload);
    uint16_t mid = (uint16_t)time(NULL);
    const unsigned char token[2] = {0x5a, 0x17};
    size_t len = 0;
    request[len++] = 0x40 | sizeof token; /* CON, TKL 2 */
    request[len++] = 0x02;                /* POST */
    request[len++] = (unsigned char)(mid >> 8);
    request[len++] = (unsigned char)mid;
    memcpy(request + len, token, sizeof token);
    len += sizeof token;
    request[len++] = 0xb9; /* Uri-Path (11), 9 bytes */
    memcpy(request + len, "telemetry", 9);
    len += 9;
    request[len++] = 0x11; /* Content-Format (12), 1 byte */
    request[len++] = 60;
    request[len++] = 0xff;
    memcpy(request + len, payload, n);
    len += n;

    /* The answer: piggybacked on the ACK, or -- a commit slower than the server's piggyback
     * timeout, on a loaded machine -- an empty ACK, then a separate response (matched by the token,
     * and acknowledged); a piggybacked answer must carry the request's token too.  A RST to the
     * request is an answer (the server refused it): said, and the client gives up at once.  The
     * request goes again every 2 s until it is acknowledged. */
    int acked = 0;
    for (int tries = 0; tries < 50; tries++) {
        if (!acked && (ret = wolfSSL_write(ssl, request, (int)len)) != (int)len) return fail("write", ssl, ret);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        while (wolfSSL_pending(ssl) > 0 || poll(&p, 1, 2000) > 0) {
            int got = wolfSSL_read(ssl, answer, sizeof answer);
            if (got <= 0) {
                int err = wolfSSL_get_error(ssl, got);
                if (err == WOLFSSL_ERROR_WANT_READ) continue; /* (nothing for us in that datagram: poll again) */
                return fail("read", ssl, got);
            }
            if (got < 4) continue;
            int type = (answer[0] >> 4) & 3, code = answer[1];
            int same_mid = (uint16_t)(answer[2] << 8 | answer[3]) == mid;
            if (type == 3 && same_mid) return fail("reset by the server", NULL, 0);
            if (type == 2 && same_mid && code == 0) { /* the empty ACK: the answer comes separately */
                acked = 1;
                continue;
            }
            int tokened = (answer[0] & 15) == sizeof token && got >= 6 && !memcmp(answer + 4, token, sizeof token);
            int ours = tokened && (type == 2 ? same_mid : 1);
            if (!ours || code == 0) continue;
            if (type == 0) { /* a separate CON: its ACK */
                unsigned char ack[4] = {0x60, 0, answer[2], answer[3]};
                wolfSSL_write(ssl, ack, sizeof ack);
            }
            printf("{\"code\": \"%d.%02d\", \"suite\": \"%s\"}\n", code >> 5, code & 0x1f,
                   wolfSSL_get_cipher_name(ssl));
            wolfSSL_shutdown(ssl);
            return 0;
        }
    }
    return fail("no answer", NULL, 0);
}
