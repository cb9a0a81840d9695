/*
 * The fast lane's table of DTLS sessions (corem's own engine, issue 27): the established sessions
 * whose records the lane opens and seals itself, found by the peer's address and by the Connection
 * ID this side chose.  Registered and dropped by corem/dtls/layer.py (`Lane.add_session`,
 * `drop_session`); each holds references to the session's Python objects (its owner, the
 * Connection; its read and write Protection and its replay Window: the very objects Python uses,
 * so the window and the write sequence number stay one state).  Header-only, for _lane.c (which
 * defines KEYLEN and includes udp_batch.h first).
 *
 * Entries live in an array with a free list; two open-addressing indexes (linear probing,
 * backward-shift deletion, grown when half full, shrunk when a sixteenth full) find them.  A
 * table of at most the engine's max_sessions.
 */
#ifndef COREM_DTLS_SESSIONS_H
#define COREM_DTLS_SESSIONS_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DS_MAX_CID 32   /* the CIDs this side chooses (the engine's cid_length: at most 32) */
#define DS_MAX_PEER_CID 255
#define WIRE_MAX 384    /* a sealed answer: 13 + 255 (the peer's CID) + 8 + 48 + 1 + 16 < 384 */

typedef struct {
    PyObject *owner;  /* what Python registered (the Connection): reported by take_records */
    PyObject *peer;   /* the peer as Python spells it */
    PyObject *read, *window, *write;
    PyObject *name;   /* (tenant, device) of the session's device, or None */
    addr_t addr;
    socklen_t alen;
    uint8_t akey[KEYLEN];
    uint8_t cid_in_len, cid_out_len, live;
    uint16_t next_mid;  /* the message id its next request likely has (the last + 1: ids go up by one) */
    uint16_t ahead;     /* its records drain_record_ahead saw and feed_record has not yet ... */
    uint32_t ahead_in;  /* ... in that drain (Lane.drains): a count an aborted drain left is reset */
    PyObject *mark_key; /* a saved session: its row's key in the session store (else None) */
    double reported;    /* when it was last reported to Python */
    int32_t due_at;     /* its place in the marks due (dsessions.due), -1: none due */
    int64_t floor;     /* records numbered at or below it go to Python (a restored session's) */
    Py_ssize_t target; /* the lane's target of its device (-1: none), as of targets_gen */
    uint64_t targets_gen;
    uint64_t epoch;    /* the batch that last reported it touched */
    int32_t next_free;
    /* (last: what every record touches above sits in two or three cache lines, not across these) */
    uint8_t cid_in[DS_MAX_CID];
    uint8_t cid_out[DS_MAX_PEER_CID];
} dsess_t;

typedef struct {
    uint32_t *cells; /* entry + 1; 0 empty */
    uint32_t *hashes;
    size_t mask, used; /* used: cells not empty */
} dsindex;

/* a mark not written yet: a saved session's window top and its row's key (a reference) */
typedef struct {
    int64_t top;
    PyObject *key;
} dsmark_t;

/* The marks (issue 26) are kept here until Python takes them (ds_take_marks): which saved
 * sessions took records since -- one entry each however many records, so a batch costs no Python
 * object per session, and a session's mark is written once per store write however many batches
 * that spans -- and the marks of such sessions removed meanwhile (their top when they left). */
typedef struct {
    dsess_t *e;
    int32_t cap, free_head, count;
    uint32_t version; /* bumped whenever an index changes: a lookup made before still holds if unchanged */
    dsindex by_addr, by_cid;
    size_t cid_len; /* the length of every CID this side chose (0: none registered yet) */
    int64_t (*top)(PyObject *window); /* the records API's window top (set with the first session) */
    int32_t *due;   /* the entries whose mark is due (each knows its place: dsess_t.due_at) */
    size_t ndue, due_cap;
    dsmark_t *left; /* the due marks of entries removed since (room for every entry of `due`) */
    size_t nleft, left_cap;
} dsessions;

typedef struct {
    addr_t addr;
    socklen_t alen;
    uint16_t len;
    uint8_t data[WIRE_MAX];
} wire_t;

/* (8 bytes at a time: an address key is 24 bytes, looked up twice a request) */
static uint32_t ds_hash(const uint8_t *k, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ n, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, k + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    if (i < n) {
        w = 0;
        memcpy(&w, k + i, n - i);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    return (uint32_t)(h ^ (h >> 32));
}

static const uint8_t *ds_key(const dsess_t *s, int by_cid, size_t *n) {
    if (by_cid) {
        *n = s->cid_in_len;
        return s->cid_in;
    }
    *n = KEYLEN;
    return s->akey;
}

/* (an address key compared as three words, not by a call to memcmp: a find each CoAPS record) */
static inline int ds_same(const uint8_t *a, const uint8_t *b, size_t n) {
    if (n != 24) return memcmp(a, b, n) == 0;
    uint64_t x[3], y[3];
    memcpy(x, a, 24);
    memcpy(y, b, 24);
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2])) == 0;
}

static long ds_find(dsessions *t, int by_cid, const uint8_t *key, size_t n) {
    dsindex *x = by_cid ? &t->by_cid : &t->by_addr;
    if (!x->cells || !t->count) return -1;
    uint32_t h = ds_hash(key, n);
    for (size_t i = h & x->mask;; i = (i + 1) & x->mask) {
        uint32_t c = x->cells[i];
        if (c == 0) return -1;
        if (x->hashes[i] == h) {
            size_t kn;
            const uint8_t *k = ds_key(&t->e[c - 1], by_cid, &kn);
            if (kn == n && ds_same(k, key, n)) return (long)(c - 1);
        }
    }
}

static int ds_index_init(dsindex *x, size_t size) {
    x->cells = PyMem_Calloc(size, sizeof(uint32_t));
    x->hashes = PyMem_Calloc(size, sizeof(uint32_t));
    if (!x->cells || !x->hashes) {
        PyMem_Free(x->cells);
        PyMem_Free(x->hashes);
        x->cells = x->hashes = NULL;
        return -1;
    }
    x->mask = size - 1;
    x->used = 0;
    return 0;
}

static void ds_index_put(dsindex *x, uint32_t h, uint32_t entry) {
    size_t i = h & x->mask;
    while (x->cells[i] != 0) i = (i + 1) & x->mask;
    x->cells[i] = entry + 1;
    x->hashes[i] = h;
    x->used++;
}

/* The index rebuilt at four cells a live entry (a power of two), at least 64 cells. */
static int ds_rebuild(dsessions *t, int by_cid) {
    dsindex *x = by_cid ? &t->by_cid : &t->by_addr, fresh;
    size_t size = 64;
    while (size < (size_t)(t->count + 1) * 4) size <<= 1;
    if (ds_index_init(&fresh, size) < 0) return -1;
    for (int32_t i = 0; i < t->cap; i++) {
        dsess_t *s = &t->e[i];
        if (!s->live || (by_cid && !s->cid_in_len)) continue;
        size_t n;
        const uint8_t *k = ds_key(s, by_cid, &n);
        ds_index_put(&fresh, ds_hash(k, n), (uint32_t)i);
    }
    PyMem_Free(x->cells);
    PyMem_Free(x->hashes);
    *x = fresh;
    return 0;
}

static int ds_index_add(dsessions *t, int by_cid, int32_t entry) {
    dsindex *x = by_cid ? &t->by_cid : &t->by_addr;
    t->version++;
    if ((!x->cells || (x->used + 1) * 2 > x->mask + 1) && ds_rebuild(t, by_cid) < 0) return -1;
    size_t n;
    const uint8_t *k = ds_key(&t->e[entry], by_cid, &n);
    /* (a rebuild may have put it there already: it is live) */
    if (ds_find(t, by_cid, k, n) == entry) return 0;
    ds_index_put(x, ds_hash(k, n), (uint32_t)entry);
    return 0;
}

static void ds_index_remove(dsessions *t, int by_cid, int32_t entry) {
    dsindex *x = by_cid ? &t->by_cid : &t->by_addr;
    t->version++;
    if (!x->cells) return;
    size_t n;
    const uint8_t *k = ds_key(&t->e[entry], by_cid, &n);
    uint32_t h = ds_hash(k, n);
    size_t hole = h & x->mask;
    for (;; hole = (hole + 1) & x->mask) {
        uint32_t c = x->cells[hole];
        if (c == 0) return;
        if (c == (uint32_t)entry + 1) break;
    }
    /* backward-shift deletion: each later cell of the run moves into the hole unless its home
     * lies between the hole and it (so every cell stays reachable from its home, no tombstone
     * left: after a reconnection storm, up to half the cells were tombstones to probe past) */
    for (size_t j = (hole + 1) & x->mask; x->cells[j]; j = (j + 1) & x->mask) {
        size_t home = x->hashes[j] & x->mask;
        if (((j - home) & x->mask) >= ((j - hole) & x->mask)) {
            x->cells[hole] = x->cells[j];
            x->hashes[hole] = x->hashes[j];
            hole = j;
        }
    }
    x->cells[hole] = 0;
    x->used--;
}

/* A free entry (zeroed, not yet live), or -1 (no memory). */
static int32_t ds_new(dsessions *t) {
    if (t->free_head < 0) {
        int32_t cap = t->cap ? t->cap * 2 : 64;
        dsess_t *e = PyMem_Realloc(t->e, (size_t)cap * sizeof(dsess_t));
        if (!e) return -1;
        for (int32_t i = t->cap; i < cap; i++) {
            memset(&e[i], 0, sizeof(dsess_t));
            e[i].next_free = i + 1 < cap ? i + 1 : -1;
        }
        t->e = e;
        t->free_head = t->cap;
        t->cap = cap;
    }
    int32_t i = t->free_head;
    t->free_head = t->e[i].next_free;
    memset(&t->e[i], 0, sizeof(dsess_t)); /* (a reused entry too: no counts of the session before) */
    t->e[i].due_at = -1;
    return i;
}

/* The session's mark is due (a saved session took a record): noted once until taken, with room
 * made now for its mark should it be removed before (ds_remove cannot fail).  0, or -1 (no
 * memory: nothing noted). */
static int ds_mark_due(dsessions *t, int32_t i) {
    if (t->e[i].due_at >= 0) return 0;
    if (t->ndue == t->due_cap) {
        size_t cap = t->due_cap ? t->due_cap * 2 : 64;
        int32_t *due = PyMem_Realloc(t->due, cap * sizeof *due);
        if (!due) return -1;
        t->due = due;
        t->due_cap = cap;
    }
    if (t->nleft + t->ndue + 1 > t->left_cap) {
        size_t cap = t->left_cap ? t->left_cap * 2 : 64;
        while (cap < t->nleft + t->ndue + 1) cap *= 2;
        dsmark_t *left = PyMem_Realloc(t->left, cap * sizeof *left);
        if (!left) return -1;
        t->left = left;
        t->left_cap = cap;
    }
    t->e[i].due_at = (int32_t)t->ndue;
    t->due[t->ndue++] = i;
    return 0;
}

/* A pack of marks (`packed`, for the session store's log: one row a write, store.py MARKS_PACK):
 * for each mark, its key's length (1 byte), the key, the top (8 bytes, big-endian, signed). */
#define MARK_KEY_MAX 255

/* `taken`'s n marks as one pack (their key references dropped, `taken` freed), or NULL: the
 * marks are lost then, as a failed write loses them (a key that is not bytes of at most
 * MARK_KEY_MAX: add_session takes bytes, and a peer's key is 6 or 18 of them). */
static PyObject *ds_pack_marks(dsmark_t *taken, size_t n) {
    size_t size = 0;
    for (size_t j = 0; j < n; j++) size += 9 + (size_t)PyBytes_GET_SIZE(taken[j].key);
    PyObject *pack = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    uint8_t *w = pack ? (uint8_t *)PyBytes_AS_STRING(pack) : NULL;
    for (size_t j = 0; j < n; j++) {
        Py_ssize_t klen = PyBytes_GET_SIZE(taken[j].key);
        if (w && klen > MARK_KEY_MAX) {
            PyErr_SetString(PyExc_ValueError, "take_marks: a mark's key is longer than 255 bytes");
            Py_CLEAR(pack);
            w = NULL;
        }
        if (w) {
            *w++ = (uint8_t)klen;
            memcpy(w, PyBytes_AS_STRING(taken[j].key), (size_t)klen);
            w += klen;
            uint64_t top = (uint64_t)taken[j].top;
            for (int b = 7; b >= 0; b--) *w++ = (uint8_t)(top >> (8 * b));
        }
        Py_DECREF(taken[j].key);
    }
    PyMem_Free(taken);
    return pack;
}

/* fold_marks(packs) -> [(top, key, top)]: the highest top of each key over the packs (in the order
 * keys first appear), as the session store's UPDATE takes them; ValueError for a pack that is not
 * one (an entry running past its end).  The twin of store.py `fold_packs`. */
static PyObject *ds_fold_marks(PyObject *unused, PyObject *packs) {
    PyObject *tops = PyDict_New(), *it = tops ? PyObject_GetIter(packs) : NULL, *pack;
    if (!it) {
        Py_XDECREF(tops);
        return NULL;
    }
    while ((pack = PyIter_Next(it))) {
        Py_buffer b;
        if (PyObject_GetBuffer(pack, &b, PyBUF_SIMPLE) < 0) goto fail_pack;
        const uint8_t *p = b.buf, *end = p + b.len;
        int bad = 0;
        while (p < end && !bad) {
            size_t klen = *p;
            if ((size_t)(end - p) < 9 + klen) {
                PyErr_Format(PyExc_ValueError, "a marks pack: the entry at byte %zd runs past its end (%zd bytes)",
                             (Py_ssize_t)(p - (const uint8_t *)b.buf), b.len);
                bad = 1;
                break;
            }
            uint64_t u = 0;
            for (size_t k = 0; k < 8; k++) u = u << 8 | p[1 + klen + k];
            PyObject *key = PyBytes_FromStringAndSize((const char *)p + 1, (Py_ssize_t)klen);
            PyObject *was = key ? PyDict_GetItemWithError(tops, key) : NULL;
            PyObject *top = NULL;
            if (key && !PyErr_Occurred() && (!was || PyLong_AsLongLong(was) < (long long)u))
                top = PyLong_FromLongLong((long long)u);
            bad = !key || PyErr_Occurred() || (top && PyDict_SetItem(tops, key, top) < 0);
            Py_XDECREF(top);
            Py_XDECREF(key);
            p += 9 + klen;
        }
        PyBuffer_Release(&b);
        if (bad) goto fail_pack;
        Py_DECREF(pack);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(tops);
        return NULL;
    }
    PyObject *out = PyList_New(0), *key, *top;
    Py_ssize_t pos = 0;
    while (out && PyDict_Next(tops, &pos, &key, &top)) {
        PyObject *row = PyTuple_Pack(3, top, key, top);
        if (!row || PyList_Append(out, row) < 0) Py_CLEAR(out);
        Py_XDECREF(row);
    }
    Py_DECREF(tops);
    return out;
fail_pack:
    Py_DECREF(pack);
    Py_DECREF(it);
    Py_DECREF(tops);
    return NULL;
}

/* The marks due, taken: [(window top, row key)] (or, `packed`, one bytes pack of them) for every
 * session that took records since the last take (its top now: at least that of every record it
 * took) and every such session removed since; or NULL (an exception: the marks are lost, as a
 * failed write loses them).  The table is emptied before any Python object is made (making one may
 * run another thread, which may take records and note marks again: noted afresh, for the next
 * take). */
static PyObject *ds_take_marks(dsessions *t, int packed) {
    size_t n = t->nleft + t->ndue;
    if (!n) return packed ? PyBytes_FromStringAndSize(NULL, 0) : PyList_New(0);
    dsmark_t *taken = PyMem_Malloc(n * sizeof *taken);
    if (!taken) return PyErr_NoMemory();
    memcpy(taken, t->left, t->nleft * sizeof *taken); /* (their references with them) */
    size_t k = t->nleft;
    t->nleft = 0;
    for (size_t j = 0; j < t->ndue; j++, k++) {
        dsess_t *s = &t->e[t->due[j]];
        taken[k].top = t->top(s->window);
        taken[k].key = Py_NewRef(s->mark_key);
        s->due_at = -1;
    }
    t->ndue = 0;
    if (packed) return ds_pack_marks(taken, n);
    PyObject *marks = PyList_New((Py_ssize_t)n);
    for (size_t j = 0; j < n; j++) {
        PyObject *mark = marks ? Py_BuildValue("(LO)", (long long)taken[j].top, taken[j].key) : NULL;
        if (mark) PyList_SET_ITEM(marks, (Py_ssize_t)j, mark);
        else Py_CLEAR(marks);
        Py_DECREF(taken[j].key);
    }
    PyMem_Free(taken);
    return marks;
}

static void ds_remove(dsessions *t, int32_t i) {
    dsess_t *s = &t->e[i];
    if (!s->live) return;
    ds_index_remove(t, 0, i);
    if (s->cid_in_len) ds_index_remove(t, 1, i);
    if (s->due_at >= 0) { /* its mark stays due (room made by ds_mark_due), its key with it */
        int32_t last = t->due[--t->ndue];
        t->due[s->due_at] = last;
        t->e[last].due_at = s->due_at;
        s->due_at = -1;
        t->left[t->nleft].top = t->top(s->window);
        t->left[t->nleft++].key = s->mark_key;
        s->mark_key = NULL;
    }
    /* the table in order first, the references after: dropping one may run Python code (a
     * Connection's last reference) that adds a session, and so moves `t->e` */
    PyObject *refs[7] = {s->owner, s->peer, s->read, s->window, s->write, s->name, s->mark_key};
    s->owner = s->peer = s->read = s->window = s->write = s->name = s->mark_key = NULL;
    s->live = 0;
    s->next_free = t->free_head;
    t->free_head = i;
    t->count--;
    /* an index sized for a storm's sessions, shrunk once they have gone: the few left would
     * each be a cache miss in it (a failed rebuild keeps the index as it is) */
    for (int by_cid = 0; by_cid < 2; by_cid++) {
        dsindex *x = by_cid ? &t->by_cid : &t->by_addr;
        if (x->cells && x->mask + 1 > 64 && (size_t)t->count * 16 < x->mask + 1) (void)ds_rebuild(t, by_cid);
    }
    for (int k = 0; k < 7; k++) Py_XDECREF(refs[k]);
}

static void ds_free(dsessions *t) {
    for (int32_t i = 0; i < t->cap; i++) ds_remove(t, i);
    for (size_t j = 0; j < t->nleft; j++) Py_DECREF(t->left[j].key);
    PyMem_Free(t->due);
    PyMem_Free(t->left);
    PyMem_Free(t->e);
    PyMem_Free(t->by_addr.cells);
    PyMem_Free(t->by_addr.hashes);
    PyMem_Free(t->by_cid.cells);
    PyMem_Free(t->by_cid.hashes);
    memset(t, 0, sizeof *t);
    t->free_head = -1;
}

#endif
