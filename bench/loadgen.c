/*
 * loadgen: a closed-loop CoAP load generator for corem's benchmarks.
 *
 * D simulated devices, each its own UDP socket (own source port), each keeping W confirmable
 * requests in flight: when a response for one arrives, the next is sent.  Requests that get no
 * answer within the timeout are sent again as new requests and counted.  Written in C so that
 * the client is never the bottleneck when the servers are compared on a 2-core machine.
 *
 *   loadgen HOST PORT DEVICES INFLIGHT SECONDS METHOD PATH PAYLOAD_HEX [CONTENT_FORMAT [TYPE]]
 *
 * PATH is a '/'-separated Uri-Path; METHOD is 1 (GET), 2 (POST), 3 (PUT); TYPE is con (the
 * default: answered by a piggybacked ACK, matched by message id) or non (answered by a NON
 * response with its own message id, matched by the request's 2-byte token, which carries the
 * request's message id).
 * Prints one JSON object: sent, responses by class, timeouts, requests/s, latency percentiles.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "coap_template.h"

#define SLOTS 1024          /* per-device ring of outstanding message ids (power of two) */
#define MAX_SAMPLES 4000000 /* latency samples kept for percentiles */
#define TIMEOUT_NS 2000000000LL

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

typedef struct {
    int fd;
    uint16_t next_mid;
    int64_t sent_at[SLOTS]; /* 0 = free */
    uint16_t mid_of[SLOTS];
    int outstanding;
} device_t;

static int64_t *samples;
static int non; /* NON requests (TYPE non) */
static size_t nsamples;
static long long n_sent, n_timeouts, n_2xx, n_4xx, n_5xx, n_other, n_send_errors;

static void send_one(device_t *d) {
    uint16_t mid = d->next_mid++;
    int slot = mid & (SLOTS - 1);
    uint8_t msg[1500];
    memcpy(msg, tmpl, tmpl_len);
    msg[2] = mid >> 8;
    msg[3] = mid & 0xff;
    if (non) { /* the token (2 bytes, right after the header) is the message id too */
        msg[4] = mid >> 8;
        msg[5] = mid & 0xff;
    }
    d->sent_at[slot] = now_ns();
    d->mid_of[slot] = mid;
    d->outstanding++;
    n_sent++;
    if (send(d->fd, msg, tmpl_len, 0) < 0) n_send_errors++; /* e.g. ECONNREFUSED: server not up */
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: %s HOST PORT DEVICES INFLIGHT SECONDS METHOD PATH PAYLOAD_HEX [CF [con|non]]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), ndev = atoi(argv[3]), inflight = atoi(argv[4]);
    double seconds = atof(argv[5]);
    int method = atoi(argv[6]);
    int cf = argc > 9 ? atoi(argv[9]) : -1;
    if (inflight < 1 || inflight > SLOTS / 2 || ndev < 1) {
        fprintf(stderr, "bad DEVICES or INFLIGHT\n");
        return 2;
    }
    non = argc > 10 && strcmp(argv[10], "non") == 0;
    build_template(method, argv[7], argv[8], cf);
    if (non) { /* NON (type 1), a 2-byte token: the header's byte 0 and room for the token */
        memmove(tmpl + 6, tmpl + 4, tmpl_len - 4);
        tmpl[0] = 0x52;
        tmpl_len += 2;
    }
    samples = malloc(sizeof(int64_t) * MAX_SAMPLES);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    int ep = epoll_create1(0);
    device_t *devs = calloc(ndev, sizeof(device_t));
    for (int i = 0; i < ndev; i++) {
        devs[i].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (connect(devs[i].fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 1; }
        devs[i].next_mid = (uint16_t)(i * 7919);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, devs[i].fd, &ev);
    }
    double start = now_s(), end = start + seconds, last_scan = start;
    for (int i = 0; i < ndev; i++)
        for (int k = 0; k < inflight; k++) send_one(&devs[i]);
    struct epoll_event events[256];
    uint8_t buf[2048];
    long long answered = 0;
    while (now_s() < end) {
        int n = epoll_wait(ep, events, 256, 50);
        for (int e = 0; e < n; e++) {
            device_t *d = &devs[events[e].data.u32];
            for (;;) {
                ssize_t r = recv(d->fd, buf, sizeof buf, 0);
                if (r < 0) break;
                if (r < 4) continue;
                uint16_t mid = (buf[2] << 8) | buf[3];
                int type = (buf[0] >> 4) & 3;
                if (non) { /* a NON (or CON) response: the request's message id is in its token */
                    if ((buf[0] & 15) != 2 || r < 6 || (type != 1 && type != 0)) continue;
                    if (type == 0) { /* a CON response: its empty ACK */
                        uint8_t ack[4] = {0x60, 0, buf[2], buf[3]};
                        if (send(d->fd, ack, sizeof ack, 0) < 0) n_send_errors++;
                    }
                    mid = (buf[4] << 8) | buf[5];
                    type = 2;
                }
                int slot = mid & (SLOTS - 1);
                if (type != 2 || d->sent_at[slot] == 0 || d->mid_of[slot] != mid) continue;
                if (buf[1] == 0) continue; /* empty ACK: the separate response will follow; not measured */
                int64_t lat = now_ns() - d->sent_at[slot];
                d->sent_at[slot] = 0;
                d->outstanding--;
                int cls = buf[1] >> 5;
                if (cls == 2) n_2xx++; else if (cls == 4) n_4xx++; else if (cls == 5) n_5xx++; else n_other++;
                if (nsamples < MAX_SAMPLES) samples[nsamples++] = lat;
                answered++;
                send_one(d);
            }
        }
        double t = now_s();
        if (t - last_scan > 0.1) { /* unanswered for too long: count it, send a fresh request */
            last_scan = t;
            int64_t limit = now_ns() - TIMEOUT_NS;
            for (int i = 0; i < ndev; i++)
                for (int s = 0; s < SLOTS; s++)
                    if (devs[i].sent_at[s] && devs[i].sent_at[s] < limit) {
                        devs[i].sent_at[s] = 0;
                        devs[i].outstanding--;
                        n_timeouts++;
                        send_one(&devs[i]);
                    }
        }
    }
    double elapsed = now_s() - start;
    qsort(samples, nsamples, sizeof(int64_t), cmp64);
#define PCT(p) (nsamples ? samples[(size_t)((nsamples - 1) * (p))] / 1e3 : 0.0)
    printf("{\"sent\": %lld, \"answered\": %lld, \"ok_2xx\": %lld, \"client_4xx\": %lld, \"server_5xx\": %lld, "
           "\"other\": %lld, \"timeouts\": %lld, \"send_errors\": %lld, \"seconds\": %.3f, \"rps\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f}\n",
           n_sent, answered, n_2xx, n_4xx, n_5xx, n_other, n_timeouts, n_send_errors, elapsed, answered / elapsed,
           PCT(0.5), PCT(0.99), PCT(0.999));
    return 0;
}
