/* A compact hash index for the registry's in-memory directory (corem/registry/compact.py).
 *
 * It maps 64-bit hashes of keys (Python's hash() of a token, a PSK identity, a (tenant, device)
 * pair...) to 32-bit row numbers: open addressing with linear probing, 12 bytes a slot, at most
 * three quarters full, so 16-32 bytes a key -- where a dict of Python ints costs ~100.  It holds
 * hashes, not keys: the caller checks the row it gets against the key it asked for, and keeps the
 * rare key whose hash another key already has elsewhere.  Deletion shifts the following entries
 * back (no tombstones), so a table that sees many updates stays as fast as a fresh one.
 *
 * `compact.PyIndex` is its Python twin (a dict), used when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define EMPTY UINT32_MAX

typedef struct {
    PyObject_HEAD
    int64_t *keys;
    uint32_t *rows; /* EMPTY: a free slot */
    size_t cap;     /* a power of two, or 0 */
    size_t len;
    int bits;
} Index;

static inline size_t slot_of(int64_t h, int bits) {
    return (size_t)(((uint64_t)h * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
}

/* The slot holding `h`, or -1 (then *free is the slot where it would go). */
static Py_ssize_t find(const Index *x, int64_t h, size_t *free) {
    if (!x->cap) return -1;
    size_t mask = x->cap - 1, i = slot_of(h, x->bits);
    while (x->rows[i] != EMPTY) {
        if (x->keys[i] == h) return (Py_ssize_t)i;
        i = (i + 1) & mask;
    }
    if (free) *free = i;
    return -1;
}

static int resize(Index *x, size_t cap) {
    int bits = 0;
    while (((size_t)1 << bits) < cap) bits++;
    int64_t *keys = PyMem_Malloc(cap * sizeof(int64_t));
    uint32_t *rows = PyMem_Malloc(cap * sizeof(uint32_t));
    if (!keys || !rows) {
        PyMem_Free(keys);
        PyMem_Free(rows);
        PyErr_NoMemory();
        return -1;
    }
    memset(rows, 0xff, cap * sizeof(uint32_t));
    size_t mask = cap - 1;
    for (size_t j = 0; j < x->cap; j++) {
        if (x->rows[j] == EMPTY) continue;
        size_t i = slot_of(x->keys[j], bits);
        while (rows[i] != EMPTY) i = (i + 1) & mask;
        keys[i] = x->keys[j];
        rows[i] = x->rows[j];
    }
    PyMem_Free(x->keys);
    PyMem_Free(x->rows);
    x->keys = keys;
    x->rows = rows;
    x->cap = cap;
    x->bits = bits;
    return 0;
}

static int hash_arg(PyObject *o, int64_t *h) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *h = (int64_t)v;
    return 0;
}

static PyObject *Index_get(Index *x, PyObject *arg) {
    int64_t h;
    if (hash_arg(arg, &h) < 0) return NULL;
    Py_ssize_t i = find(x, h, NULL);
    return PyLong_FromLong(i < 0 ? -1 : (long)x->rows[i]);
}

/* put(h, row) -> the row it replaces, or -1 */
static PyObject *Index_put(Index *x, PyObject *const *args, Py_ssize_t nargs) {
    int64_t h;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "put(h, row)");
        return NULL;
    }
    if (hash_arg(args[0], &h) < 0) return NULL;
    unsigned long long row = PyLong_AsUnsignedLongLong(args[1]);
    if (row == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (row >= EMPTY) {
        PyErr_SetString(PyExc_OverflowError, "row out of range");
        return NULL;
    }
    size_t free = 0;
    Py_ssize_t i = find(x, h, &free);
    if (i >= 0) {
        long old = (long)x->rows[i];
        x->rows[i] = (uint32_t)row;
        return PyLong_FromLong(old);
    }
    if ((x->len + 1) * 4 > x->cap * 3) {
        if (resize(x, x->cap ? x->cap * 2 : 8) < 0) return NULL;
        find(x, h, &free);
    }
    x->keys[free] = h;
    x->rows[free] = (uint32_t)row;
    x->len++;
    return PyLong_FromLong(-1);
}

/* pop(h) -> the row it held, or -1 */
static PyObject *Index_pop(Index *x, PyObject *arg) {
    int64_t h;
    if (hash_arg(arg, &h) < 0) return NULL;
    Py_ssize_t found = find(x, h, NULL);
    if (found < 0) return PyLong_FromLong(-1);
    size_t i = (size_t)found, j = i, mask = x->cap - 1;
    long old = (long)x->rows[i];
    for (;;) { /* shift back what follows until a free slot, so that no probe chain breaks */
        j = (j + 1) & mask;
        if (x->rows[j] == EMPTY) break;
        size_t k = slot_of(x->keys[j], x->bits);
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue; /* (its chain does not pass i) */
        x->keys[i] = x->keys[j];
        x->rows[i] = x->rows[j];
        i = j;
    }
    x->rows[i] = EMPTY;
    x->len--;
    return PyLong_FromLong(old);
}

static PyObject *Index_clear(Index *x, PyObject *unused) {
    PyMem_Free(x->keys);
    PyMem_Free(x->rows);
    x->keys = NULL;
    x->rows = NULL;
    x->cap = x->len = 0;
    x->bits = 0;
    Py_RETURN_NONE;
}

static PyObject *Index_nbytes(Index *x, void *unused) {
    return PyLong_FromSize_t(x->cap * (sizeof(int64_t) + sizeof(uint32_t)));
}

static Py_ssize_t Index_len(Index *x) { return (Py_ssize_t)x->len; }

static PyObject *Index_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Index() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static void Index_dealloc(Index *x) {
    PyMem_Free(x->keys);
    PyMem_Free(x->rows);
    Py_TYPE(x)->tp_free((PyObject *)x);
}

static PyMethodDef Index_methods[] = {
    {"get", (PyCFunction)Index_get, METH_O, "get(h) -> the row of hash h, or -1"},
    {"put", (PyCFunction)(void (*)(void))Index_put, METH_FASTCALL, "put(h, row) -> the row it replaces, or -1"},
    {"pop", (PyCFunction)Index_pop, METH_O, "pop(h) -> the row it held, or -1"},
    {"clear", (PyCFunction)Index_clear, METH_NOARGS, "forget every entry and free the table"},
    {NULL},
};

static PyGetSetDef Index_getset[] = {
    {"nbytes", (getter)Index_nbytes, NULL, "bytes of its table", NULL},
    {NULL},
};

static PySequenceMethods Index_as_sequence = {.sq_length = (lenfunc)Index_len};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "corem.registry._index.Index",
    .tp_basicsize = sizeof(Index),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "64-bit hashes -> 32-bit rows, 12 bytes a slot (see the module's source)",
    .tp_new = Index_new,
    .tp_dealloc = (destructor)Index_dealloc,
    .tp_methods = Index_methods,
    .tp_getset = Index_getset,
    .tp_as_sequence = &Index_as_sequence,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_index", "The registry's compact hash index.", -1, NULL};

PyMODINIT_FUNC PyInit__index(void) {
    if (PyType_Ready(&IndexType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&IndexType);
    if (PyModule_AddObject(m, "Index", (PyObject *)&IndexType) < 0) {
        Py_DECREF(&IndexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
