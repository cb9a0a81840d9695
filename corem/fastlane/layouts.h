/*
 * The layouts a profile gives its payloads, read by the fast lane: positional arrays (format
 * `array`: a CBOR or JSON array whose places the profile names) and fixed binary layouts (format
 * `binary`: numbers of given types and byte orders, exactly as long as the layout) -- the C twins of
 * corem/profiles/formats.py's `positional` and `binary`.  The lane only accepts: an array of arrays
 * (several points), a non-scalar even in a skipped place, a value Python would refuse -- all the
 * Python path's.  Header-only, for _lane.c, after cbor_json.h.
 */
#ifndef COREM_LAYOUTS_H
#define COREM_LAYOUTS_H

enum { PLACE_SKIP = 0, PLACE_READING = 1, PLACE_TS = 2 };

typedef struct {
    const uint8_t *name; /* NULL: bytes to skip */
    size_t nlen;
    char kind; /* 'i' signed, 'u' unsigned, 'f' float, '?' bool, 'x' skip */
    uint8_t big;
    uint16_t size; /* its bytes (to skip, for 'x') */
} part_t;

typedef struct {
    Py_ssize_t npos; /* array: its places */
    const uint8_t **pos;
    size_t *poslen;
    uint8_t *place; /* PLACE_* */
    Py_ssize_t nparts; /* binary: its fields */
    part_t *parts;
    size_t size; /* the bytes a binary payload has */
} layout_t;

static void layout_free(layout_t *L) {
    PyMem_Free(L->pos);
    PyMem_Free(L->poslen);
    PyMem_Free(L->place);
    PyMem_Free(L->parts);
    memset(L, 0, sizeof *L);
}

/* The array's places (a tuple of bytes or None: a place to skip; b"ts": the point's time) and the
 * binary layout (a tuple of (name bytes or None, struct format bytes or b"skip", bytes to skip)),
 * either may be empty; the strings point into them (the caller keeps them alive).  A name twice
 * (Python keeps the last value; the lane would have to guess) or more readings than MAX_ITEMS:
 * ValueError, and the profile is the Python path's.  0, or -1 with an exception set. */
static int layout_from(PyObject *positions, PyObject *parts, layout_t *L) {
    if (!PyTuple_Check(positions) || !PyTuple_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: positions and layout are tuples");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(positions), m = PyTuple_GET_SIZE(parts);
    L->pos = PyMem_Calloc(n ? n : 1, sizeof(uint8_t *));
    L->poslen = PyMem_Calloc(n ? n : 1, sizeof(size_t));
    L->place = PyMem_Calloc(n ? n : 1, 1);
    L->parts = PyMem_Calloc(m ? m : 1, sizeof(part_t));
    if (!L->pos || !L->poslen || !L->place || !L->parts) {
        PyErr_NoMemory();
        return -1;
    }
    L->npos = n;
    L->nparts = m;
    int readings = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(positions, i);
        if (o == Py_None) continue;
        if (!PyBytes_Check(o)) {
            PyErr_SetString(PyExc_TypeError, "compile_profile: a position is bytes or None");
            return -1;
        }
        L->pos[i] = (const uint8_t *)PyBytes_AS_STRING(o);
        L->poslen[i] = (size_t)PyBytes_GET_SIZE(o);
        L->place[i] = L->poslen[i] == 2 && memcmp(L->pos[i], "ts", 2) == 0 ? PLACE_TS : PLACE_READING;
        readings += L->place[i] == PLACE_READING;
        for (Py_ssize_t j = 0; j < i; j++)
            if (L->pos[j] && L->poslen[j] == L->poslen[i] && memcmp(L->pos[j], L->pos[i], L->poslen[i]) == 0) {
                PyErr_SetString(PyExc_ValueError, "compile_profile: a position named twice");
                return -1;
            }
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        part_t *p = &L->parts[i];
        PyObject *name;
        const char *fmt;
        Py_ssize_t flen;
        int skip;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(parts, i), "Oy#i", &name, &fmt, &flen, &skip)) return -1;
        if (flen < 1) {
            PyErr_SetString(PyExc_ValueError, "compile_profile: a binary field's format is empty");
            return -1;
        }
        if (flen == 4 && memcmp(fmt, "skip", 4) == 0) {
            if (skip < 0 || skip > 65535) {
                PyErr_SetString(PyExc_ValueError, "compile_profile: bytes to skip out of range");
                return -1;
            }
            p->kind = 'x';
            p->size = (uint16_t)skip;
            L->size += (size_t)skip;
            continue;
        }
        char c = fmt[flen - 1];
        p->big = flen == 2 && fmt[0] == '>';
        p->kind = c == 'f' || c == 'd' ? 'f' : c == '?' ? '?' : (c >= 'a' && c <= 'z') ? 'i' : 'u';
        p->size = c == 'b' || c == 'B' || c == '?' ? 1 : c == 'h' || c == 'H' ? 2 : c == 'i' || c == 'I' || c == 'f' ? 4
                : c == 'q' || c == 'Q' || c == 'd' ? 8 : 0;
        if (!p->size || flen > 2 || (flen == 2 && fmt[0] != '>' && fmt[0] != '<') || name == Py_None ||
            !PyBytes_Check(name)) {
            PyErr_SetString(PyExc_ValueError, "compile_profile: a binary field's format is one of corem's types");
            return -1;
        }
        p->name = (const uint8_t *)PyBytes_AS_STRING(name);
        p->nlen = (size_t)PyBytes_GET_SIZE(name);
        L->size += p->size;
        readings++;
        for (Py_ssize_t j = 0; j < i; j++)
            if (L->parts[j].name && L->parts[j].nlen == p->nlen && memcmp(L->parts[j].name, p->name, p->nlen) == 0) {
                PyErr_SetString(PyExc_ValueError, "compile_profile: a binary field named twice");
                return -1;
            }
    }
    if (readings > MAX_ITEMS) {
        PyErr_SetString(PyExc_ValueError, "compile_profile: more readings than the lane holds");
        return -1;
    }
    return 0;
}

/* A positional array (CBOR 60 or JSON 50) of scalars, as long as the profile's places: 0 and the
 * items (and *ts from a `ts` place), or -1. */
static int parse_positional(const layout_t *L, int cf, const uint8_t *p, const uint8_t *end, item_t *items,
                            int *nitems, long long *ts) {
    int count = 0;
    item_t scratch;
    *ts = -1;
    if (cf == 60) {
        uint64_t n;
        if (p >= end || (*p >> 5) != 4 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &n) < 0 || n != (uint64_t)L->npos)
            return -1;
    } else {
        p = json_ws(p, end);
        if (p >= end || *p != '[') return -1;
        p = json_ws(p + 1, end);
    }
    for (Py_ssize_t i = 0; i < L->npos; i++) {
        if (cf == 50 && i > 0) { /* the comma before each place but the first */
            p = json_ws(p, end);
            if (p >= end || *p != ',') return -1;
            p = json_ws(p + 1, end);
        }
        if (L->place[i] == PLACE_TS) {
            uint64_t v;
            if (cf == 60) {
                if (p >= end || (*p >> 5) != 0 || cbor_arg(&p, end, &v) < 0 || v > MAX_TS_MS) return -1;
                *ts = (long long)v;
            } else if (json_ts(&p, end, ts) < 0) {
                return -1;
            }
            continue;
        }
        item_t *it = L->place[i] == PLACE_READING ? &items[count] : &scratch;
        if ((cf == 60 ? cbor_scalar(&p, end, it) : json_scalar(&p, end, it)) < 0) return -1;
        if (L->place[i] == PLACE_READING) {
            it->key = L->pos[i];
            it->klen = L->poslen[i];
            it->unit = NULL;
            count++;
        }
    }
    if (cf == 50) {
        p = json_ws(p, end);
        if (p >= end || *p != ']' || json_ws(p + 1, end) != end) return -1;
    } else if (p != end) {
        return -1;
    }
    if (!count) return -1; /* (no readings: Python says so) */
    *nitems = count;
    return 0;
}

/* A fixed binary layout (42 or no Content-Format), exactly as long as the layout: 0 and the items,
 * or -1 (another length, a float that is not finite: Python's). */
static int parse_binary(const layout_t *L, const uint8_t *p, const uint8_t *end, item_t *items, int *nitems) {
    if ((size_t)(end - p) != L->size || !L->size) return -1;
    int count = 0;
    for (Py_ssize_t i = 0; i < L->nparts; i++) {
        const part_t *f = &L->parts[i];
        if (f->kind == 'x') {
            p += f->size;
            continue;
        }
        uint64_t raw = 0;
        for (int k = 0; k < f->size; k++) raw |= (uint64_t)p[f->big ? k : f->size - 1 - k] << (8 * (f->size - 1 - k));
        p += f->size;
        double v;
        if (f->kind == '?') {
            v = raw ? 1.0 : 0.0;
        } else if (f->kind == 'u') {
            v = (double)raw;
        } else if (f->kind == 'i') {
            int shift = 64 - 8 * f->size;
            v = (double)((int64_t)(raw << shift) >> shift);
        } else if (f->size == 4) {
            uint32_t b32 = (uint32_t)raw;
            float x;
            memcpy(&x, &b32, 4);
            v = x;
        } else {
            memcpy(&v, &raw, 8);
        }
        if (!isfinite(v)) return -1;
        item_t *it = &items[count++];
        it->key = f->name;
        it->klen = f->nlen;
        it->is_text = 0;
        it->num = v;
        it->unit = NULL;
    }
    (void)end;
    return count ? (*nitems = count, 0) : -1;
}

#endif
