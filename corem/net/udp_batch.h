/*
 * Batched UDP socket calls (recvmmsg / sendmmsg) and peer addresses as Python's socket module
 * spells them: shared by the edge's own loop (corem/net/_sockets.c) and the fast lane
 * (corem/fastlane/_lane.c), which reads and answers the socket itself.  Header-only (static
 * functions): each extension is one translation unit.
 */
#ifndef COREM_UDP_BATCH_H
#define COREM_UDP_BATCH_H

#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define VLEN 64 /* datagrams per recvmmsg/sendmmsg call */

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} addr_t;


/* The peer as Python's socket module gives it: (host, port) or (host, port, flowinfo, scope_id). */
static PyObject *addr_tuple(const addr_t *a, socklen_t alen) {
    char host[NI_MAXHOST];
    if (getnameinfo(&a->sa, alen, host, sizeof host, NULL, 0, NI_NUMERICHOST) != 0) host[0] = 0;
    if (a->sa.sa_family == AF_INET) return Py_BuildValue("(si)", host, ntohs(a->v4.sin_port));
    return Py_BuildValue("(siII)", host, ntohs(a->v6.sin6_port), ntohl(a->v6.sin6_flowinfo),
                         a->v6.sin6_scope_id);
}

static int addr_from_tuple(PyObject *peer, addr_t *a, socklen_t *alen) {
    const char *host;
    int port;
    unsigned int flow = 0, scope = 0;
    if (!PyArg_ParseTuple(peer, "si|II", &host, &port, &flow, &scope)) return -1;
    memset(a, 0, sizeof *a);
    if (inet_pton(AF_INET, host, &a->v4.sin_addr) == 1) {
        a->v4.sin_family = AF_INET;
        a->v4.sin_port = htons(port);
        *alen = sizeof a->v4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a->v6.sin6_addr) == 1) {
        a->v6.sin6_family = AF_INET6;
        a->v6.sin6_port = htons(port);
        a->v6.sin6_flowinfo = htonl(flow);
        a->v6.sin6_scope_id = scope;
        *alen = sizeof a->v6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "peer: %s is not a numeric IPv4 or IPv6 address", host);
    return -1;
}

/* ---------------------------------------------------------------- batched socket calls ----- */
typedef int (*datagram_fn)(void *ctx, const uint8_t *data, size_t n, const addr_t *a, socklen_t alen);

/* Up to `budget` datagrams from `fd` (recvmmsg, VLEN at a time, into `buf`: VLEN slots of
 * `bufsize` bytes; a longer datagram arrives cut to bufsize), each handed to `fn`; returns how
 * many, or -1 with an exception set.  `ahead` (or NULL) is shown each datagram AHEAD datagrams
 * before `fn` takes it, to bring what `fn` will look up toward the cache (it must not fail). */
#define AHEAD 4
static long read_datagrams_ahead(int fd, uint8_t *buf, size_t bufsize, long budget, datagram_fn fn,
                                 datagram_fn ahead, void *ctx) {
    struct mmsghdr msgs[VLEN];
    struct iovec iov[VLEN];
    addr_t addrs[VLEN];
    long total = 0;
    while (total < budget) {
        int want = budget - total < VLEN ? (int)(budget - total) : VLEN;
        for (int i = 0; i < want; i++) {
            iov[i].iov_base = buf + (size_t)i * bufsize;
            iov[i].iov_len = bufsize;
            memset(&msgs[i].msg_hdr, 0, sizeof(struct msghdr));
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(addr_t);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int got = recvmmsg(fd, msgs, want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) continue; /* ICMP */
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (ahead)
            for (int i = 0; i < got && i < AHEAD; i++)
                ahead(ctx, iov[i].iov_base, msgs[i].msg_len, &addrs[i], msgs[i].msg_hdr.msg_namelen);
        for (int i = 0; i < got; i++) {
            int k = i + AHEAD;
            if (ahead && k < got) ahead(ctx, iov[k].iov_base, msgs[k].msg_len, &addrs[k], msgs[k].msg_hdr.msg_namelen);
            if (fn(ctx, iov[i].iov_base, msgs[i].msg_len, &addrs[i], msgs[i].msg_hdr.msg_namelen) < 0) return -1;
        }
        total += got;
        if (got < want) break;
    }
    return total;
}

static inline long read_datagrams(int fd, uint8_t *buf, size_t bufsize, long budget, datagram_fn fn, void *ctx) {
    return read_datagrams_ahead(fd, buf, bufsize, budget, fn, NULL, ctx);
}

/* One sendmmsg of msgs[0..want): how many the kernel took (0 with *blocked set when it takes no
 * more now), or -1 when it refused msgs[0] for good (e.g. unreachable): skip that one. */
static int send_datagrams(int fd, struct mmsghdr *msgs, int want, int *blocked) {
    for (;;) {
        int sent = sendmmsg(fd, msgs, want, MSG_DONTWAIT);
        if (sent >= 0) return sent;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *blocked = 1;
            return 0;
        }
        return -1;
    }
}

/* A datagram into the Python list `ctx` as (bytes, peer), as recvfrom gives it. */
static int append_pair(void *ctx, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    PyObject *data = PyBytes_FromStringAndSize((const char *)d, n);
    PyObject *peer = data ? addr_tuple(a, alen) : NULL;
    PyObject *pair = peer ? PyTuple_Pack(2, data, peer) : NULL;
    Py_XDECREF(data);
    Py_XDECREF(peer);
    int r = pair ? PyList_Append((PyObject *)ctx, pair) : -1;
    Py_XDECREF(pair);
    return r;
}

static void set_msg(struct mmsghdr *m, struct iovec *iov, void *data, size_t len, addr_t *a, socklen_t alen) {
    iov->iov_base = data;
    iov->iov_len = len;
    memset(&m->msg_hdr, 0, sizeof(struct msghdr));
    m->msg_hdr.msg_name = a;
    m->msg_hdr.msg_namelen = alen;
    m->msg_hdr.msg_iov = iov;
    m->msg_hdr.msg_iovlen = 1;
}

#endif
