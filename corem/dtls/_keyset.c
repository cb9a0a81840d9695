/* A set of session keys held as 64-bit fingerprints (keyset.py says why): an open-addressing table
 * of uint64 (linear probing, deletion by backward shift, at most 3/4 full), 11-22 bytes a key where
 * a Python set of bytes costs ~80.  The fingerprint is the key's Python hash (SipHash under the
 * process's random seed: a peer cannot aim keys at one slot or at another's fingerprint); 0 marks an
 * empty slot, so a hash of 0 is taken as 1.
 *
 *   KeySet(iterable=()) ; add(key) ; discard(key) ; key in s ; len(s) ; update(it) ; difference_update(it)
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    uint64_t *slots;
    size_t mask; /* capacity - 1 (a power of two) */
    size_t used;
} KeySet;

#define MIN_CAPACITY 8

static int fingerprint(PyObject *key, uint64_t *out) {
    if (!PyBytes_Check(key)) {
        PyErr_Format(PyExc_TypeError, "a session key is bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)h ? (uint64_t)h : 1;
    return 0;
}

/* the slot holding fp, or the empty slot where it would go */
static size_t probe(const KeySet *s, uint64_t fp) {
    size_t i = (size_t)(fp ^ (fp >> 29)) & s->mask;
    while (s->slots[i] != 0 && s->slots[i] != fp) i = (i + 1) & s->mask;
    return i;
}

static int resize(KeySet *s, size_t capacity) {
    uint64_t *old = s->slots;
    size_t old_cap = old ? s->mask + 1 : 0;
    uint64_t *slots = PyMem_Calloc(capacity, sizeof *slots);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    s->slots = slots;
    s->mask = capacity - 1;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i]) s->slots[probe(s, old[i])] = old[i];
    PyMem_Free(old);
    return 0;
}

static int add_fp(KeySet *s, uint64_t fp) {
    if (4 * (s->used + 1) > 3 * (s->mask + 1) && resize(s, 2 * (s->mask + 1)) < 0) return -1;
    size_t i = probe(s, fp);
    if (s->slots[i] == 0) {
        s->slots[i] = fp;
        s->used++;
    }
    return 0;
}

static void discard_fp(KeySet *s, uint64_t fp) {
    size_t i = probe(s, fp);
    if (s->slots[i] == 0) return;
    /* backward shift: move later members of the run into the hole if their home allows it */
    size_t j = i;
    for (;;) {
        s->slots[i] = 0;
        for (;;) {
            j = (j + 1) & s->mask;
            if (s->slots[j] == 0) {
                s->used--;
                return;
            }
            size_t home = (size_t)(s->slots[j] ^ (s->slots[j] >> 29)) & s->mask;
            /* j's member may fill i unless its home lies cyclically in (i, j] */
            if (i <= j ? (home <= i || home > j) : (home <= i && home > j)) break;
        }
        s->slots[i] = s->slots[j];
        i = j;
    }
}

static int each(KeySet *s, PyObject *iterable, int adding) {
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL) return -1;
    PyObject *key;
    while ((key = PyIter_Next(it)) != NULL) {
        uint64_t fp;
        int bad = fingerprint(key, &fp) < 0;
        Py_DECREF(key);
        if (bad || (adding ? add_fp(s, fp) : (discard_fp(s, fp), 0)) < 0) {
            Py_DECREF(it);
            return -1;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *KeySet_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    KeySet *s = (KeySet *)type->tp_alloc(type, 0);
    if (s != NULL && resize(s, MIN_CAPACITY) < 0) Py_CLEAR(s); /* (a table from the start: __init__ may not run) */
    return (PyObject *)s;
}

static int KeySet_init(KeySet *s, PyObject *args, PyObject *kwds) {
    PyObject *iterable = NULL;
    static char *kwlist[] = {"iterable", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &iterable)) return -1;
    PyMem_Free(s->slots);
    s->slots = NULL;
    s->used = 0;
    if (resize(s, MIN_CAPACITY) < 0) return -1;
    return iterable ? each(s, iterable, 1) : 0;
}

static void KeySet_dealloc(KeySet *s) {
    PyMem_Free(s->slots);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *KeySet_add(KeySet *s, PyObject *key) {
    uint64_t fp;
    if (fingerprint(key, &fp) < 0 || add_fp(s, fp) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *KeySet_discard(KeySet *s, PyObject *key) {
    uint64_t fp;
    if (fingerprint(key, &fp) < 0) return NULL;
    discard_fp(s, fp);
    Py_RETURN_NONE;
}

static PyObject *KeySet_update(KeySet *s, PyObject *it) {
    if (each(s, it, 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *KeySet_difference_update(KeySet *s, PyObject *it) {
    if (each(s, it, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static int KeySet_contains(KeySet *s, PyObject *key) {
    uint64_t fp;
    if (fingerprint(key, &fp) < 0) return -1;
    return s->slots[probe(s, fp)] != 0;
}

static Py_ssize_t KeySet_len(KeySet *s) { return (Py_ssize_t)s->used; }

static PyObject *KeySet_sizeof(KeySet *s, PyObject *unused) {
    return PyLong_FromSize_t(sizeof *s + (s->mask + 1) * sizeof(uint64_t));
}

static PyMethodDef KeySet_methods[] = {
    {"add", (PyCFunction)KeySet_add, METH_O, "add(key): the key is in the set"},
    {"discard", (PyCFunction)KeySet_discard, METH_O, "discard(key): the key is not in the set"},
    {"update", (PyCFunction)KeySet_update, METH_O, "update(keys)"},
    {"difference_update", (PyCFunction)KeySet_difference_update, METH_O, "difference_update(keys)"},
    {"__sizeof__", (PyCFunction)KeySet_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods KeySet_as_sequence = {
    .sq_length = (lenfunc)KeySet_len,
    .sq_contains = (objobjproc)KeySet_contains,
};

static PyTypeObject KeySetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corem.dtls._keyset.KeySet",
    .tp_basicsize = sizeof(KeySet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KeySet(keys=()): session keys as 64-bit fingerprints (keyset.py)",
    .tp_new = KeySet_new,
    .tp_init = (initproc)KeySet_init,
    .tp_dealloc = (destructor)KeySet_dealloc,
    .tp_methods = KeySet_methods,
    .tp_as_sequence = &KeySet_as_sequence,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keyset", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__keyset(void) {
    if (PyType_Ready(&KeySetType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "KeySet", (PyObject *)&KeySetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
