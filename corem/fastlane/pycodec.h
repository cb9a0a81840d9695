/*
 * The fast lane calling a profile's Python decoder from its batch: a JavaScript (TS013) codec, a
 * Python hook, a protobuf schema or message proto.h does not read -- what C does not decode itself.  The lane reads,
 * deduplicates and routes the request in C as for any reading, calls the decoder with the payload
 * (`decode(content_format, payload, now_ms)` -> [Readings], the profile's rules applied by it),
 * and writes the point and the record itself: no Request, router or endpoint in between.  It
 * takes one point whose values it can write exactly as msgspec does (float numbers, str texts and
 * units, an int ts in range); anything else -- an exception (a refusal), several points, an int
 * where a float goes -- is the Python path's, which answers it with what this call gave (the
 * profile's `handed`, _lane.c take_decoded: never a second decode, which would pay a codec's time
 * and limits twice).  Header-only, for _lane.c, after cbor_json.h.
 */
#ifndef COREM_PYCODEC_H
#define COREM_PYCODEC_H

/* The str `o` as UTF-8 into s and n (valid while `o` lives): 0, or -1 (not a str, or not UTF-8). */
static int utf8_of(PyObject *o, const uint8_t **s, size_t *n) {
    if (!PyUnicode_CheckExact(o)) return -1;
    Py_ssize_t len;
    const char *p = PyUnicode_AsUTF8AndSize(o, &len);
    if (!p) {
        PyErr_Clear();
        return -1;
    }
    *s = (const uint8_t *)p;
    *n = (size_t)len;
    return 0;
}

/* One point from `decode` at `now_ms`: 0, the items (pointing into the decoder's result, `keep`,
 * which the caller releases once the point is written), the time and the units' order (uorder, nu
 * of them); -1 otherwise (no exception left set; `keep` the decoder's result, or the exception it
 * raised, for the Python path; NULL if there is neither); -2 with an exception that is not the
 * decoder's refusal set (KeyboardInterrupt, SystemExit, ...: it propagates). */
static int parse_python(PyObject *decode, int cf, const uint8_t *p, const uint8_t *end, long long now_ms,
                        item_t *items, int *nitems, long long *ts, uint8_t *uorder, int *nu, PyObject **keep) {
    *keep = NULL;
    PyObject *payload = PyBytes_FromStringAndSize((const char *)p, end - p);
    PyObject *args[3] = {cf < 0 ? Py_None : PyLong_FromLong(cf), payload, PyLong_FromLongLong(now_ms)};
    Py_INCREF(decode); /* (its own: Python code may drop the target that holds it meanwhile) */
    PyObject *points = payload && args[0] && args[2] ? PyObject_Vectorcall(decode, args, 3, NULL) : NULL;
    Py_DECREF(decode);
    if (cf >= 0) Py_XDECREF(args[0]);
    Py_XDECREF(payload);
    Py_XDECREF(args[2]);
    if (!points) { /* a refusal (PayloadError), or a bug: the Python path answers it */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return -2; /* (KeyboardInterrupt, SystemExit: theirs) */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value) PyException_SetTraceback(value, Py_None); /* (what it held stays out of the memo) */
        Py_XDECREF(type);
        Py_XDECREF(tb);
        *keep = value; /* (the exception, for the Python path: raised there, not raised again by a decode) */
        return -1;
    }
    *keep = points;
    if (!PyList_CheckExact(points) || PyList_GET_SIZE(points) != 1) return -1;
    PyObject *r = PyList_GET_ITEM(points, 0);
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 4) return -1; /* Readings(numeric, strings, ts, units) */
    PyObject *numeric = PyTuple_GET_ITEM(r, 0), *strings = PyTuple_GET_ITEM(r, 1), *t = PyTuple_GET_ITEM(r, 2),
             *units = PyTuple_GET_ITEM(r, 3);
    if (!PyDict_CheckExact(numeric) || !PyDict_CheckExact(strings) ||
        PyDict_GET_SIZE(numeric) + PyDict_GET_SIZE(strings) > MAX_ITEMS ||
        PyDict_GET_SIZE(numeric) + PyDict_GET_SIZE(strings) == 0)
        return -1;
    *ts = -1;
    if (t != Py_None) {
        if (!PyLong_CheckExact(t)) return -1;
        long long v = PyLong_AsLongLong(t);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        if (v < 0 || (unsigned long long)v > MAX_TS_MS) return -1;
        *ts = v;
    }
    int count = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(numeric, &pos, &k, &v)) {
        item_t *it = &items[count++];
        if (utf8_of(k, &it->key, &it->klen) < 0 || !PyFloat_CheckExact(v)) return -1;
        it->is_text = 0;
        it->num = PyFloat_AS_DOUBLE(v);
        it->unit = NULL;
        if (!isfinite(it->num)) return -1;
    }
    pos = 0;
    while (PyDict_Next(strings, &pos, &k, &v)) {
        item_t *it = &items[count++];
        if (utf8_of(k, &it->key, &it->klen) < 0 || utf8_of(v, &it->text, &it->tlen) < 0) return -1;
        it->is_text = 1;
        it->unit = NULL;
    }
    *nu = 0;
    if (units != Py_None) {
        if (!PyDict_CheckExact(units)) return -1;
        pos = 0;
        while (PyDict_Next(units, &pos, &k, &v)) {
            const uint8_t *name, *unit;
            size_t nlen, ulen;
            if (utf8_of(k, &name, &nlen) < 0 || utf8_of(v, &unit, &ulen) < 0) return -1;
            int i = find_item(items, count, name, nlen);
            if (i < 0) return -1; /* (a unit of no reading: Python writes it; the lane would not) */
            items[i].unit = (const char *)unit;
            items[i].ulen = ulen;
            uorder[(*nu)++] = (uint8_t)i;
        }
    }
    for (int i = 1; i < count; i++) /* (a number and a text of one name: two keys in Python, one here) */
        if (find_item(items, i, items[i].key, items[i].klen) >= 0) return -1;
    *nitems = count;
    return 0;
}

#endif
