/*
 * corem.net._sockets: the edge's own loop reads and writes its socket 64 datagrams per system
 * call (recvmmsg / sendmmsg) instead of one recvfrom / sendto each, with the same results those
 * calls give Python (corem/net/batch.py falls back to them where this is not built).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <time.h>

#include "udp_batch.h"

/* recv_many(fd, bufsize, budget) -> [(bytes, peer)]: up to `budget` datagrams, each cut to
 * `bufsize` bytes (the caller sees a datagram of bufsize bytes as too long). */
static PyObject *recv_many(PyObject *mod, PyObject *args) {
    int fd, budget;
    Py_ssize_t bufsize;
    if (!PyArg_ParseTuple(args, "ini", &fd, &bufsize, &budget)) return NULL;
    if (bufsize < 1 || bufsize > 65536 || budget < 0) {
        PyErr_SetString(PyExc_ValueError, "recv_many: bufsize 1-65536, budget >= 0");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    uint8_t *buf = PyMem_Malloc((size_t)VLEN * bufsize);
    if (!list || !buf) {
        Py_XDECREF(list);
        PyMem_Free(buf);
        return PyErr_NoMemory();
    }
    long r = read_datagrams(fd, buf, (size_t)bufsize, budget, append_pair, list);
    PyMem_Free(buf);
    if (r < 0) {
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

/* send_many(fd, [(bytes, peer)]) -> (taken, bytes_sent, errors, blocked): sends in order until
 * the kernel will not take more (blocked = 1; the rest is for the next try); a datagram refused
 * for another reason is skipped and counted. */
static PyObject *send_many(PyObject *mod, PyObject *args) {
    int fd;
    PyObject *given;
    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyList_Type, &given)) return NULL;
    /* a tuple of the list's items, each held: a port's __index__ (addr_from_tuple) runs Python,
     * which could shrink the list and free a datagram whose bytes an iovec already points into
     * (an ASan run sent freed heap memory so) */
    PyObject *list = PyList_AsTuple(given);
    if (list == NULL) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(list), done = 0;
    unsigned long long nbytes = 0, errors = 0;
    int blocked = 0;
    struct mmsghdr msgs[VLEN];
    struct iovec iov[VLEN];
    addr_t addrs[VLEN];
    while (done < n && !blocked) {
        int want = n - done < VLEN ? (int)(n - done) : VLEN;
        for (int i = 0; i < want; i++) {
            PyObject *pair = PyTuple_GET_ITEM(list, done + i);
            PyObject *data;
            socklen_t alen;
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(data = PyTuple_GET_ITEM(pair, 0))) {
                PyErr_SetString(PyExc_TypeError, "send_many: items must be (bytes, peer)");
                goto out;
            }
            if (addr_from_tuple(PyTuple_GET_ITEM(pair, 1), &addrs[i], &alen) < 0) goto out;
            set_msg(&msgs[i], &iov[i], PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &addrs[i], alen);
        }
        int sent = send_datagrams(fd, msgs, want, &blocked);
        if (sent < 0) {
            errors++;
            sent = 1;
        } else {
            for (int i = 0; i < sent; i++) nbytes += iov[i].iov_len;
        }
        done += sent;
    }
    result = Py_BuildValue("(nKKi)", done, nbytes, errors, blocked);
out:
    Py_DECREF(list);
    return result;
}

/* readable_within(fd, ns) -> bool: whether a datagram (or an error) is waiting on `fd` within `ns`
 * nanoseconds, asked on the CPU -- poll() with no timeout, again and again -- with the GIL released
 * (corem/net/busypoll.py says when it is worth it: a peer whose answer comes sooner than the
 * scheduler wakes a sleeping thread). */
static PyObject *readable_within(PyObject *mod, PyObject *args) {
    int fd;
    long long ns;
    if (!PyArg_ParseTuple(args, "iL", &fd, &ns)) return NULL;
    if (fd < 0 || ns < 0 || ns > 10000000) {
        PyErr_SetString(PyExc_ValueError, "readable_within: fd >= 0, 0-10,000,000 ns");
        return NULL;
    }
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = 0, err = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long end = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec + ns;
    for (;;) {
        r = poll(&p, 1, 0);
        if (r > 0) break;  /* readable, or an error waiting (the read reports it), or a closed fd (below) */
        if (r < 0 && errno != EINTR) {
            err = errno;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec >= end) break;
    }
    Py_END_ALLOW_THREADS
    if (r > 0 && (p.revents & POLLNVAL)) err = EBADF; /* (a closed fd: not "readable") */
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(r > 0);
}

static PyMethodDef module_methods[] = {
    {"readable_within", readable_within, METH_VARARGS, "readable_within(fd, ns) -> bool"},
    {"recv_many", recv_many, METH_VARARGS, "recv_many(fd, bufsize, budget) -> [(bytes, peer)]"},
    {"send_many", send_many, METH_VARARGS, "send_many(fd, [(bytes, peer)]) -> (taken, bytes, errors, blocked)"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "corem.net._sockets", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__sockets(void) { return PyModule_Create(&module); }
