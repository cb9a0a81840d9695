/*
 * The fast lane's protobuf reader: one message of a profile's proto3 schema (its form from
 * corem/profiles/protobuf.py `lane_proto`) into items, as that file's `protobuf` decoder makes them
 * -- Google's runtime (upb) parses, `Plan.to_dict` makes ThingsBoard's JSON of it,
 * `thingsboard_entry` reads that: fields by their JSON names in the schema's order, a scalar
 * without presence present with its default, enums by name, `{ts, values}` a timed point, nested
 * messages flattened into `outer.inner` or kept as their JSON text, as the profile's `nested` says.
 * The schemas it holds have no repeated, map, bytes or several-member oneof fields (lane_proto
 * leaves those to Python).  It only accepts: what upb would read otherwise (a wire type not the
 * schema's, a group, a message sent twice, merged) and what it would have to guess at (text JSON
 * would escape, more than it holds) is the profile's Python decoder's, called from the lane's batch
 * (_lane.c `take_decoded`); what upb or the profile refuses (cut short, text not UTF-8, a nested
 * message rejected, a number that is not finite, a `ts` out of range, no readings) goes straight to
 * the Python path, which answers it (PB_PYTHON, PB_REFUSED).  Header-only, for _lane.c, after cbor_json.h and
 * rules.h (item_t, utf8_ok, find_item, json_buf_t, jb_put, jb_put_repr, json_plain_text, put_u64,
 * MAX_TS_MS, FLAT_DEPTH).
 */
#ifndef COREM_PROTO_H
#define COREM_PROTO_H

/* a field's kind (protobuf.py LANE_KINDS) */
enum {
    PB_DOUBLE = 1, PB_FLOAT, PB_INT32, PB_INT64, PB_UINT32, PB_UINT64, PB_SINT32, PB_SINT64, PB_FIXED32,
    PB_FIXED64, PB_SFIXED32, PB_SFIXED64, PB_BOOL, PB_STRING, PB_ENUM, PB_MESSAGE, PB_LAST = PB_MESSAGE
};
#define PB_MAX_FIELDS 64 /* a message's fields (protobuf.py MAX_LANE_FIELDS) */

typedef struct {
    int32_t number;
    const uint8_t *name;
    size_t nlen;
} pb_enum_t;

typedef struct {
    uint32_t number;
    uint8_t kind, presence, wire;
    const uint8_t *name; /* its JSON name */
    size_t nlen;
    int32_t sub; /* PB_MESSAGE: its type's index */
    pb_enum_t *values;
    Py_ssize_t nvalues;
} pb_field_t;

typedef struct {
    pb_field_t *fields;
    Py_ssize_t nfields;
} pb_message_t;

typedef struct {
    pb_message_t *msgs; /* [0]: the payload's */
    Py_ssize_t nmsgs;
    int ts, ts_zero, values; /* the top message's `ts` and `values` fields (-1: none); ts_zero: its 0 is "not sent" */
    size_t json_room; /* `nested: json`: the most its messages' JSON texts take but the payload's own bytes */
} pb_plan_t;

static void pb_free(pb_plan_t *P) {
    for (Py_ssize_t i = 0; i < P->nmsgs; i++) {
        for (Py_ssize_t j = 0; j < P->msgs[i].nfields; j++) PyMem_Free(P->msgs[i].fields[j].values);
        PyMem_Free(P->msgs[i].fields);
    }
    PyMem_Free(P->msgs);
    memset(P, 0, sizeof *P);
}

static int pb_bad(const char *why) {
    PyErr_Format(PyExc_ValueError, "compile_profile: proto: %s (protobuf.py lane_proto)", why);
    return -1;
}

/* (a schema whose texts could take more: the room stays at this; a longer text is the decoder's) */
#define PB_JSON_MOST 65536

/* The longest JSON text the top message could be written as, but for its text fields' bytes (at most
 * the payload's): each field's name, quotes, colon and comma, and its longest value -- a number 25
 * (repr's longest, a 64-bit integer's), a bool 5, an enum's longest name, a message its own, down
 * to FLAT_DEPTH.  So the room a payload's nested texts need is known before they are written. */
static size_t pb_json_most(const pb_plan_t *P) {
    Py_ssize_t n = P->nmsgs;
    size_t *most = PyMem_Calloc((size_t)(FLAT_DEPTH + 2) * (size_t)n, sizeof(size_t)); /* [depth][message] */
    if (!most) return PB_JSON_MOST;
    for (int d = FLAT_DEPTH; d >= 0; d--)
        for (Py_ssize_t m = 0; m < n; m++) {
            size_t sum = 2;
            for (Py_ssize_t i = 0; i < P->msgs[m].nfields; i++) {
                const pb_field_t *f = &P->msgs[m].fields[i];
                size_t value = f->kind == PB_MESSAGE ? most[(size_t)(d + 1) * (size_t)n + (size_t)f->sub]
                               : f->kind == PB_STRING ? 2
                               : f->kind == PB_BOOL   ? 5
                                                      : 25;
                for (Py_ssize_t k = 0; k < f->nvalues; k++)
                    if (f->values[k].nlen + 2 > value) value = f->values[k].nlen + 2;
                sum += f->nlen + 4 + value;
                if (sum > PB_JSON_MOST) sum = PB_JSON_MOST;
            }
            most[(size_t)d * (size_t)n + (size_t)m] = sum;
        }
    size_t top = most[0];
    PyMem_Free(most);
    return top;
}

/* The plan from lane_proto's tuple ((message, ...), ts, ts_zero, values), or None (no protobuf):
 * the names point into it (the caller keeps it alive).  0, or -1 with an exception set. */
static int pb_from(PyObject *proto, pb_plan_t *P) {
    memset(P, 0, sizeof *P);
    if (proto == Py_None) return 0;
    PyObject *msgs;
    if (!PyArg_ParseTuple(proto, "O!ipi", &PyTuple_Type, &msgs, &P->ts, &P->ts_zero, &P->values)) return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(msgs);
    if (n < 1) return pb_bad("no message");
    if (!(P->msgs = PyMem_Calloc((size_t)n, sizeof(pb_message_t)))) {
        PyErr_NoMemory();
        return -1;
    }
    P->nmsgs = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fields = PyTuple_GET_ITEM(msgs, i);
        if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) > PB_MAX_FIELDS)
            return pb_bad("a message is a tuple of <= 64 fields");
        pb_message_t *m = &P->msgs[i];
        if (!(m->fields = PyMem_Calloc((size_t)PyTuple_GET_SIZE(fields) + 1, sizeof(pb_field_t)))) {
            PyErr_NoMemory();
            return -1;
        }
        m->nfields = PyTuple_GET_SIZE(fields); /* (after: pb_free reads that many) */
        for (Py_ssize_t j = 0; j < m->nfields; j++) {
            pb_field_t *f = &m->fields[j];
            PyObject *name, *values;
            long number; /* ("l": checked for overflow) */
            int kind, presence, sub;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, j), "liO!piO!", &number, &kind, &PyBytes_Type, &name, &presence,
                                  &sub, &PyTuple_Type, &values))
                return -1;
            if (number < 1 || number > 536870911 || kind < PB_DOUBLE || kind > PB_LAST || PyBytes_GET_SIZE(name) < 1 ||
                PyBytes_GET_SIZE(name) >= LANE_NAME || (kind == PB_MESSAGE) != (sub >= 0 && sub < n))
                return pb_bad("a field is (number, kind, JSON name, presence, message index, enum values)");
            f->number = (uint32_t)number;
            f->kind = (uint8_t)kind;
            f->presence = (uint8_t)presence;
            f->wire = kind == PB_DOUBLE || kind == PB_FIXED64 || kind == PB_SFIXED64   ? 1
                      : kind == PB_FLOAT || kind == PB_FIXED32 || kind == PB_SFIXED32 ? 5
                      : kind == PB_STRING || kind == PB_MESSAGE                        ? 2
                                                                                       : 0;
            f->name = (const uint8_t *)PyBytes_AS_STRING(name);
            f->nlen = (size_t)PyBytes_GET_SIZE(name);
            f->sub = sub;
            f->nvalues = PyTuple_GET_SIZE(values);
            if (f->nvalues && !(f->values = PyMem_Calloc((size_t)f->nvalues, sizeof(pb_enum_t)))) {
                PyErr_NoMemory();
                return -1;
            }
            for (Py_ssize_t k = 0; k < f->nvalues; k++) {
                PyObject *vname;
                int vnum;
                if (!PyArg_ParseTuple(PyTuple_GET_ITEM(values, k), "iO!", &vnum, &PyBytes_Type, &vname)) return -1;
                f->values[k].number = vnum;
                f->values[k].name = (const uint8_t *)PyBytes_AS_STRING(vname);
                f->values[k].nlen = (size_t)PyBytes_GET_SIZE(vname);
            }
        }
    }
    Py_ssize_t top = P->msgs[0].nfields;
    if (P->ts >= top || P->values >= top || P->ts < -1 || P->values < -1 ||
        (P->ts >= 0 && (P->msgs[0].fields[P->ts].kind < PB_INT32 || P->msgs[0].fields[P->ts].kind > PB_SFIXED64)))
        return pb_bad("ts and values are the top message's field indexes, ts an integer's");
    P->json_room = pb_json_most(P);
    return 0;
}

/* What the reader makes of a message: read (0); not read here, the profile's Python decoder
 * reads it from the lane's batch (PB_PYTHON); refused by upb or by the profile's rules, which the
 * Python path answers without a second try (PB_REFUSED).  A case in the wrong one of the last two
 * costs time, never an answer. */
enum { PB_PYTHON = -1, PB_REFUSED = -2 };

/* where a field was last seen in one message's bytes */
typedef struct {
    const uint8_t *at; /* a length-delimited value's bytes */
    uint64_t v;        /* a varint's or fixed value's bits; a length's bytes */
    uint8_t seen;
} pb_slot_t;

/* A varint at *p of up to `most` bytes (a value: ten, the tenth 0 or 1, what fits 64 bits; a tag:
 * five, as upb reads one): 0; PB_REFUSED cut short or longer (upb refuses it), PB_PYTHON a tenth
 * byte past 64 bits (upb drops those bits). */
static int pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v, int most) {
    uint64_t x = 0;
    for (int i = 0; i < most && *p < end; i++) {
        uint8_t b = *(*p)++;
        if (i == 9 && b > 1) return PB_PYTHON;
        x |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return PB_REFUSED;
}

static uint64_t pb_le(const uint8_t *p, int n) {
    uint64_t x = 0;
    for (int i = n - 1; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

/* One message's bytes read into its fields' slots (the last value of each, as protobuf keeps it);
 * unknown fields skipped.  0, PB_PYTHON or PB_REFUSED (see the top). */
static int pb_scan(const pb_message_t *m, const uint8_t *p, const uint8_t *end, pb_slot_t *slots) {
    memset(slots, 0, sizeof(pb_slot_t) * (size_t)m->nfields);
    while (p < end) {
        uint64_t tag, v;
        int r;
        /* (a tag is never past 32 bits: upb refuses a sixth byte, a larger number and field 0) */
        if (pb_varint(&p, end, &tag, 5) < 0 || tag > UINT32_MAX || tag >> 3 == 0) return PB_REFUSED;
        unsigned wire = tag & 7;
        const uint8_t *at = NULL;
        if (wire == 0) {
            if ((r = pb_varint(&p, end, &v, 10)) < 0) return r;
        } else if (wire == 1 || wire == 5) {
            int n = wire == 1 ? 8 : 4;
            if (end - p < n) return PB_REFUSED;
            v = pb_le(p, n);
            p += n;
        } else if (wire == 2) {
            if ((r = pb_varint(&p, end, &v, 10)) < 0) return r;
            if (v > (uint64_t)(end - p)) return PB_REFUSED;
            at = p;
            p += v;
        } else
            return wire == 3 || wire == 4 ? PB_PYTHON : PB_REFUSED; /* (a group upb skips; no wire type at all) */
        uint32_t number = (uint32_t)(tag >> 3);
        for (Py_ssize_t i = 0; i < m->nfields; i++) {
            const pb_field_t *f = &m->fields[i];
            if (f->number != number) continue;
            if (f->wire != wire || (f->kind == PB_MESSAGE && slots[i].seen)) return PB_PYTHON; /* (upb: unknown; merged) */
            if (f->kind == PB_STRING && !utf8_ok(at, (size_t)v)) return PB_REFUSED; /* (upb checks every one) */
            slots[i].at = at;
            slots[i].v = v;
            slots[i].seen = 1;
            break;
        }
    }
    return 0;
}

/* An integer kind's value (an enum's too) as Python has it: its sign and magnitude (an int64's
 * and a uint64's both whole). */
static void pb_int(const pb_field_t *f, uint64_t v, int *neg, uint64_t *mag) {
    int64_t s;
    switch (f->kind) {
    case PB_UINT32: case PB_FIXED32: *neg = 0; *mag = (uint32_t)v; return;
    case PB_UINT64: case PB_FIXED64: *neg = 0; *mag = v; return;
    case PB_INT32: case PB_SFIXED32: case PB_ENUM: s = (int32_t)(uint32_t)v; break;
    case PB_SINT32: s = (int32_t)((uint32_t)v >> 1 ^ (uint32_t)-(int32_t)(v & 1)); break;
    case PB_SINT64: s = (int64_t)(v >> 1 ^ (uint64_t)-(int64_t)(v & 1)); break;
    default: s = (int64_t)v; /* INT64, SFIXED64 */
    }
    *neg = s < 0;
    *mag = s < 0 ? 0 - (uint64_t)s : (uint64_t)s;
}

/* A number kind's value as the float Python makes of it (put_scalar's float(v); a bool 1.0 or 0.0). */
static double pb_number(const pb_field_t *f, uint64_t v) {
    if (f->kind == PB_DOUBLE) {
        double x;
        memcpy(&x, &v, 8);
        return x;
    }
    if (f->kind == PB_FLOAT) {
        uint32_t b = (uint32_t)v;
        float g;
        memcpy(&g, &b, 4);
        return g;
    }
    if (f->kind == PB_BOOL) return v ? 1.0 : 0.0;
    int neg;
    uint64_t mag;
    pb_int(f, v, &neg, &mag);
    return neg ? -(double)mag : (double)mag; /* (rounding to nearest is symmetric) */
}

/* An enum value's name, or NULL (a number the schema does not name stays a number). */
static const pb_enum_t *pb_enum_name(const pb_field_t *f, uint64_t v) {
    int32_t n = (int32_t)(uint32_t)v;
    for (Py_ssize_t i = 0; i < f->nvalues; i++)
        if (f->values[i].number == n) return &f->values[i];
    return NULL;
}

static int pb_json(json_buf_t *jb, const pb_plan_t *P, const pb_message_t *m, const uint8_t *p, const uint8_t *end,
                   int depth);

/* Text as json.dumps writes it, quoted; PB_PYTHON if it would escape any of it, or the buffer is
 * full (the profile's decoder writes it). */
static int pb_json_text(json_buf_t *jb, const uint8_t *s, size_t n) {
    if (!json_plain_text(s, n) || jb_put(jb, "\"", 1) < 0 || jb_put(jb, s, n) < 0 || jb_put(jb, "\"", 1) < 0)
        return PB_PYTHON;
    return 0;
}

/* One field's value as json.dumps writes what Plan.to_dict makes of it: 0, PB_PYTHON or PB_REFUSED. */
static int pb_json_value(json_buf_t *jb, const pb_plan_t *P, const pb_field_t *f, const pb_slot_t *s, int depth) {
    if (f->kind == PB_MESSAGE) return pb_json(jb, P, &P->msgs[f->sub], s->at, s->at + s->v, depth + 1);
    if (f->kind == PB_STRING) return pb_json_text(jb, s->seen ? s->at : (const uint8_t *)"", s->seen ? (size_t)s->v : 0);
    if (f->kind == PB_BOOL) return (s->v ? jb_put(jb, "true", 4) : jb_put(jb, "false", 5)) < 0 ? PB_PYTHON : 0;
    if (f->kind == PB_DOUBLE || f->kind == PB_FLOAT) {
        double x = pb_number(f, s->v);
        if (!isfinite(x)) return PB_REFUSED; /* (formats._plain refuses it) */
        return jb_put_repr(jb, x) < 0 ? PB_PYTHON : 0;
    }
    const pb_enum_t *e = f->kind == PB_ENUM ? pb_enum_name(f, s->v) : NULL;
    if (e) return pb_json_text(jb, e->name, e->nlen);
    char digits[24], *o = digits;
    int neg;
    uint64_t mag;
    pb_int(f, s->v, &neg, &mag);
    if (neg) *o++ = '-';
    o = put_u64(o, mag);
    return jb_put(jb, digits, (size_t)(o - digits)) < 0 ? PB_PYTHON : 0;
}

/* A nested message's JSON text, as formats.put_value keeps it with `nested: json`:
 * json.dumps(Plan.to_dict(message), separators=(",", ":"), ensure_ascii=False). */
static int pb_json(json_buf_t *jb, const pb_plan_t *P, const pb_message_t *m, const uint8_t *p, const uint8_t *end,
                   int depth) {
    pb_slot_t slots[PB_MAX_FIELDS];
    if (depth >= FLAT_DEPTH) return PB_PYTHON;
    int r = pb_scan(m, p, end, slots);
    if (r < 0) return r;
    if (jb_put(jb, "{", 1) < 0) return PB_PYTHON;
    int first = 1;
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        const pb_field_t *f = &m->fields[i];
        if (!slots[i].seen && (f->presence || f->kind == PB_MESSAGE)) continue;
        if (!first && jb_put(jb, ",", 1) < 0) return PB_PYTHON;
        if ((r = pb_json_text(jb, f->name, f->nlen)) < 0) return r;
        if (jb_put(jb, ":", 1) < 0) return PB_PYTHON;
        if ((r = pb_json_value(jb, P, f, &slots[i], depth)) < 0) return r;
        first = 0;
    }
    return jb_put(jb, "}", 1) < 0 ? PB_PYTHON : 0;
}

typedef struct {
    const pb_plan_t *plan;
    item_t *items;
    int count;
    char (*names)[LANE_NAME];
    int nested;      /* the profile's: 1 flatten, 2 json (into `jb`), 0 reject (a nested message: refused) */
    json_buf_t *jb;
} pb_out_t;

static int pb_emit(pb_out_t *o, const pb_message_t *m, const pb_slot_t *slots, const char *prefix, size_t plen,
                   int skip, int depth);

/* One present field under its name (prefixed `prefix.` inside a flattened message): 0, PB_PYTHON
 * or PB_REFUSED. */
static int pb_put(pb_out_t *o, const pb_field_t *f, const pb_slot_t *s, const char *prefix, size_t plen, int depth) {
    const uint8_t *key = f->name;
    size_t klen = f->nlen;
    if (plen) { /* the name made in names[count] (a nested message's made where its children will be) */
        if (o->count == MAX_ITEMS || plen + 1 + klen >= LANE_NAME) return PB_PYTHON;
        char *nm = o->names[o->count];
        memcpy(nm, prefix, plen);
        nm[plen] = '.';
        memcpy(nm + plen + 1, f->name, klen);
        key = (const uint8_t *)nm;
        klen += plen + 1;
    }
    if (f->kind == PB_MESSAGE && !o->nested) return PB_REFUSED; /* (nested: reject) */
    if (o->count == MAX_ITEMS) return PB_PYTHON;
    item_t *it = &o->items[o->count];
    it->key = key;
    it->klen = klen;
    it->unit = NULL;
    it->point = 0;
    if (f->kind == PB_MESSAGE && o->nested == 2) { /* one text reading: its JSON text */
        size_t start = o->jb->used;
        int r = pb_json_value(o->jb, o->plan, f, s, depth);
        if (r < 0) return r;
        it->is_text = 1;
        it->text = (const uint8_t *)o->jb->buf + start;
        it->tlen = o->jb->used - start;
    } else if (f->kind == PB_MESSAGE) { /* flattened */
        if (depth >= FLAT_DEPTH) return PB_PYTHON;
        char inner[LANE_NAME]; /* (its own copy: the children write their names where it was) */
        memcpy(inner, key, klen);
        pb_slot_t sub[PB_MAX_FIELDS];
        const pb_message_t *m = &o->plan->msgs[f->sub];
        int r = pb_scan(m, s->at, s->at + s->v, sub);
        return r < 0 ? r : pb_emit(o, m, sub, inner, klen, -1, depth + 1);
    } else if (f->kind == PB_STRING) { /* (checked UTF-8 as it was read; "" when not sent) */
        it->is_text = 1;
        it->text = s->seen ? s->at : (const uint8_t *)"";
        it->tlen = s->seen ? (size_t)s->v : 0;
    } else {
        const pb_enum_t *e = f->kind == PB_ENUM ? pb_enum_name(f, s->v) : NULL; /* (an enum by name) */
        it->is_text = e != NULL;
        if (e) {
            it->text = e->name;
            it->tlen = e->nlen;
        } else {
            it->num = pb_number(f, s->v); /* (s->v is 0 when not sent: every kind's default) */
            if (!isfinite(it->num)) return PB_REFUSED; /* (put_scalar refuses it) */
        }
    }
    o->count++;
    return 0;
}

/* A message's fields in the schema's order: those with presence only when sent, the others with
 * their default; field `skip` left out (a `ts` of 0 that means "not sent"). */
static int pb_emit(pb_out_t *o, const pb_message_t *m, const pb_slot_t *slots, const char *prefix, size_t plen,
                   int skip, int depth) {
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        const pb_field_t *f = &m->fields[i];
        if (i == skip || (!slots[i].seen && (f->presence || f->kind == PB_MESSAGE))) continue;
        int r = pb_put(o, f, &slots[i], prefix, plen, depth);
        if (r < 0) return r;
    }
    return 0;
}

/* The payload (42 or no Content-Format) as one message of the plan: 0 and its items and time (*ts,
 * -1: none), PB_PYTHON or PB_REFUSED. */
static int parse_protobuf(const pb_plan_t *P, int nested, json_buf_t *jb, int cf, const uint8_t *p, const uint8_t *end,
                          item_t *items, int *nitems, long long *ts, char (*names)[LANE_NAME]) {
    if ((cf != 42 && cf >= 0) || p == end) return PB_REFUSED; /* (binary_payload's 4.15, its empty payload) */
    if (!P->nmsgs) return PB_PYTHON;
    const pb_message_t *top = &P->msgs[0];
    pb_slot_t slots[PB_MAX_FIELDS];
    int r = pb_scan(top, p, end, slots);
    if (r < 0) return r;
    pb_out_t o = {P, items, 0, names, nested, jb};
    *ts = -1;
    int skip = -1; /* a ts of 0 without presence: not sent (protobuf.py `ts_unset_is_zero`) */
    uint64_t t = 0;
    int ts_sent = 0, ts_ok = 0; /* (ts_ok: not negative) */
    if (P->ts >= 0) {
        const pb_field_t *tf = &top->fields[P->ts];
        int neg;
        pb_int(tf, slots[P->ts].v, &neg, &t);
        ts_ok = !neg;
        ts_sent = slots[P->ts].seen || !tf->presence;
        if (P->ts_zero && ts_ok && t == 0) skip = P->ts, ts_sent = 0;
    }
    /* {ts, values}: `values` sent and no key but those two (thingsboard_entry) */
    int timed = P->values >= 0;
    for (Py_ssize_t i = 0; i < top->nfields && timed; i++) {
        const pb_field_t *f = &top->fields[i];
        int present = i != skip && (slots[i].seen || !(f->presence || f->kind == PB_MESSAGE));
        if (i == P->values ? !present : present && i != P->ts) timed = 0;
    }
    if (timed) {
        const pb_field_t *vf = &top->fields[P->values];
        if (vf->kind != PB_MESSAGE) return PB_REFUSED; /* (values is not a map) */
        if (ts_sent) {
            if (!ts_ok || t > MAX_TS_MS) return PB_REFUSED; /* (not a time) */
            *ts = (long long)t;
        }
        pb_slot_t sub[PB_MAX_FIELDS];
        const pb_message_t *m = &P->msgs[vf->sub];
        r = pb_scan(m, slots[P->values].at, slots[P->values].at + slots[P->values].v, sub);
        if (r == 0) r = pb_emit(&o, m, sub, NULL, 0, -1, 1);
    } else
        r = pb_emit(&o, top, slots, NULL, 0, skip, 0);
    if (r < 0) return r;
    if (!o.count) return PB_REFUSED; /* (no readings) */
    for (int i = 1; i < o.count; i++) /* (a JSON name twice: Python keeps one) */
        if (find_item(items, i, items[i].key, items[i].klen) >= 0) return PB_PYTHON;
    *nitems = o.count;
    return 0;
}

#endif
