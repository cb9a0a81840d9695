/*
 * A profile's field rules, applied by the fast lane to the one point it decoded: the C twin of
 * corem/profiles/rules.py `apply` (type, scale, offset, min/max, allowed, required, unit, rename,
 * in that order, each rule in the profile's order).  The lane only accepts: a reading that breaks a
 * rule, or a shape whose outcome the lane would have to guess (a rename onto a name the reading
 * already has, a result that is not finite), goes to the Python path, which answers 4.00 naming
 * the field -- the same reading, the same answer.  Header-only, for _lane.c (after cbor_json.h).
 *
 * The rules come from Python once per profile (in _lane.c's `compile_profile`, a capsule the
 * lane's targets share): the strings point into the bytes of the tuple the capsule keeps alive.
 */
#ifndef COREM_RULES_H
#define COREM_RULES_H

typedef struct {
    const uint8_t *name, *rename, *unit; /* rename, unit: NULL if the rule has none */
    size_t nlen, rlen, ulen;
    int type; /* 0: any, 1: "number", 2: "string" */
    int required, has_scale, has_offset, has_min, has_max;
    double scale, offset, min, max;
    Py_ssize_t nallowed; /* -1: no `allowed` */
    const uint8_t **allowed;
    size_t *alen;
} rule_t;

typedef struct {
    Py_ssize_t n;
    rule_t *r;
} rules_t;

static void rules_free(rules_t *R) {
    for (Py_ssize_t i = 0; i < R->n; i++) {
        PyMem_Free(R->r[i].allowed);
        PyMem_Free(R->r[i].alen);
    }
    PyMem_Free(R->r);
    R->r = NULL;
    R->n = 0;
}

static int opt_double(PyObject *o, int *has, double *v) {
    *has = o != Py_None;
    if (!*has) return 0;
    *v = PyFloat_AsDouble(o);
    return *v == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int opt_bytes(PyObject *o, const uint8_t **s, size_t *n) {
    if (o == Py_None) {
        *s = NULL;
        *n = 0;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: names, renames and units are bytes");
        return -1;
    }
    *s = (const uint8_t *)PyBytes_AS_STRING(o);
    *n = (size_t)PyBytes_GET_SIZE(o);
    return 0;
}

/* A profile's rules from Python: a tuple of (name, rename, unit, type, scale, offset, min, max,
 * required, allowed) -- name bytes; rename, unit bytes or None; type 0/1/2; scale ... max float or
 * None; required bool; allowed a tuple of bytes or None (profiles/compile.py `lane_rules`).  The
 * strings point into the tuple, which the caller keeps alive.  0, or -1 with an exception set. */
static int rules_from(PyObject *arg, rules_t *R) {
    if (!PyTuple_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: the rules are a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(arg);
    R->r = PyMem_Calloc(n ? n : 1, sizeof(rule_t));
    if (!R->r) {
        PyErr_NoMemory();
        return -1;
    }
    R->n = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        rule_t *r = &R->r[i];
        r->nallowed = -1;
        PyObject *name, *rename, *unit, *scale, *offset, *min, *max, *allowed;
        int required;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(arg, i), "O!OOiOOOOpO", &PyBytes_Type, &name, &rename, &unit,
                              &r->type, &scale, &offset, &min, &max, &required, &allowed))
            return -1;
        r->required = required;
        if (opt_bytes(name, &r->name, &r->nlen) < 0 || opt_bytes(rename, &r->rename, &r->rlen) < 0 ||
            opt_bytes(unit, &r->unit, &r->ulen) < 0 || opt_double(scale, &r->has_scale, &r->scale) < 0 ||
            opt_double(offset, &r->has_offset, &r->offset) < 0 || opt_double(min, &r->has_min, &r->min) < 0 ||
            opt_double(max, &r->has_max, &r->max) < 0)
            return -1;
        if (r->type < 0 || r->type > 2) {
            PyErr_SetString(PyExc_ValueError, "compile_profile: a rule's type is 0 (any), 1 (number) or 2 (string)");
            return -1;
        }
        if (allowed != Py_None) {
            if (!PyTuple_Check(allowed)) {
                PyErr_SetString(PyExc_TypeError, "compile_profile: allowed is a tuple of bytes");
                return -1;
            }
            Py_ssize_t k = PyTuple_GET_SIZE(allowed);
            r->allowed = PyMem_Calloc(k ? k : 1, sizeof(uint8_t *));
            r->alen = PyMem_Calloc(k ? k : 1, sizeof(size_t));
            if (!r->allowed || !r->alen) {
                PyErr_NoMemory();
                return -1;
            }
            r->nallowed = k;
            for (Py_ssize_t j = 0; j < k; j++) {
                PyObject *a = PyTuple_GET_ITEM(allowed, j);
                if (a == Py_None || opt_bytes(a, &r->allowed[j], &r->alen[j]) < 0) {
                    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "compile_profile: allowed is bytes");
                    return -1;
                }
            }
        }
    }
    return 0;
}

static int find_item(const item_t *items, int n, const uint8_t *name, size_t len) {
    for (int i = 0; i < n; i++)
        if (items[i].klen == len && memcmp(items[i].key, name, len) == 0) return i;
    return -1;
}

/* The rules on the point's items: 0, with the items' values, units and names changed, `order`
 * the items' order in the point (renamed ones move last, in the rules' order, as a Python dict's
 * pop and update do) and `uorder`/`*nu` the units' order; -1: the Python path's. */
static int apply_rules(const rules_t *R, item_t *items, int n, uint8_t *order, uint8_t *uorder, int *nu) {
    uint8_t renamed[MAX_ITEMS], is_renamed[MAX_ITEMS] = {0};
    const rule_t *by[MAX_ITEMS]; /* the rule that renames renamed[a] */
    int nren = 0, m = 0;
    for (int i = 0; i < n; i++)
        if (items[i].unit) uorder[m++] = (uint8_t)i;
    for (Py_ssize_t k = 0; k < R->n; k++) {
        const rule_t *r = &R->r[k];
        int i = find_item(items, n, r->name, r->nlen);
        if (i < 0) {
            if (r->required) return -1;
            continue;
        }
        item_t *it = &items[i];
        if (!it->is_text) {
            if (r->type == 2 || r->nallowed >= 0) return -1;
            double v = it->num;
            if (r->has_scale) v *= r->scale;
            if (r->has_offset) v += r->offset;
            if (!isfinite(v) || (r->has_min && v < r->min) || (r->has_max && v > r->max)) return -1;
            it->num = v;
        } else {
            if (r->type == 1 || r->has_scale || r->has_offset || r->has_min || r->has_max) return -1;
            if (r->nallowed >= 0) {
                Py_ssize_t j = 0;
                while (j < r->nallowed && !(r->alen[j] == it->tlen && memcmp(r->allowed[j], it->text, it->tlen) == 0))
                    j++;
                if (j == r->nallowed) return -1;
            }
        }
        if (r->unit) {
            if (!it->unit) uorder[m++] = (uint8_t)i;
            it->unit = (const char *)r->unit;
            it->ulen = r->ulen;
        }
        if (r->rename && !(r->rlen == r->nlen && memcmp(r->rename, r->name, r->nlen) == 0)) {
            by[nren] = r;
            renamed[nren++] = (uint8_t)i;
            is_renamed[i] = 1;
        }
    }
    int o = 0;
    for (int i = 0; i < n; i++)
        if (!is_renamed[i]) order[o++] = (uint8_t)i;
    if (nren) {
        /* a rename onto a name the reading holds (Python refuses it, or overwrites a value), or two
         * onto one name: the Python path's */
        for (int a = 0; a < nren; a++) {
            if (find_item(items, n, by[a]->rename, by[a]->rlen) >= 0) return -1;
            for (int b = 0; b < a; b++)
                if (by[b]->rlen == by[a]->rlen && memcmp(by[b]->rename, by[a]->rename, by[a]->rlen) == 0) return -1;
        }
        for (int a = 0; a < nren; a++) {
            items[renamed[a]].key = by[a]->rename;
            items[renamed[a]].klen = by[a]->rlen;
            order[o++] = renamed[a];
        }
        int u = 0; /* the units of renamed fields move last too */
        for (int j = 0; j < m; j++)
            if (!is_renamed[uorder[j]]) uorder[u++] = uorder[j];
        for (int a = 0; a < nren; a++)
            if (items[renamed[a]].unit) uorder[u++] = renamed[a];
    }
    *nu = m;
    return 0;
}

#endif
