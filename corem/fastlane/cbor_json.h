/*
 * The fast lane's CBOR and JSON readers and JSON writer: a flat CBOR map (RFC 8949) or JSON object
 * (RFC 8259) of readings (the subset the lane takes; anything else is "not mine" and goes to the
 * Python path, which explains) into items, and the bits of a TelemetryPoint's JSON.  Header-only, for _lane.c, which defines
 * MAX_ITEMS before including it.
 */
#ifndef COREM_CBOR_JSON_H
#define COREM_CBOR_JSON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef MAX_ITEMS
#error "define MAX_ITEMS before including cbor_json.h"
#endif

typedef struct {
    const uint8_t *key;
    size_t klen;
    int is_text;
    double num;
    const uint8_t *text;
    size_t tlen;
    const char *unit; /* its unit (Cayenne LPP's, SenML's, a rule's), or NULL */
    size_t ulen;
    uint8_t point; /* of a payload of several points (a ThingsBoard array, SenML of several times): which */
} item_t;

/* the points one request may become in the lane (more: the Python path's) */
#define MAX_POINTS 16

/* the bytes of a name the lane makes (LPP's `{type}_{channel}.{axis}`, SenML's bn + n) */
#define LANE_NAME 64

/* The argument of a CBOR head at p (definite only); -1 if it is not one the lane takes. */
static int cbor_arg(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint8_t ai = **p & 0x1f;
    (*p)++;
    if (ai < 24) {
        *v = ai;
        return 0;
    }
    int n = ai == 24 ? 1 : ai == 25 ? 2 : ai == 26 ? 4 : ai == 27 ? 8 : 0;
    if (!n || end - *p < n) return -1;
    uint64_t x = 0;
    for (int i = 0; i < n; i++) x = x << 8 | (*p)[i];
    *p += n;
    *v = x;
    return 0;
}

/* Strict UTF-8 (what Python's decoder accepts): no overlongs, no surrogates, <= U+10FFFF. */
static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1f;
        else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0f;
        else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
        else return 0;
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += len;
    }
    return 1;
}

static double half_to_double(uint16_t h) {
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 0) v = ldexp(mant, -24);
    else if (exp == 31) v = mant ? NAN : INFINITY;
    else v = ldexp(mant + 1024, exp - 25);
    return (h & 0x8000) ? -v : v;
}

#define TWO53 9007199254740992.0
#define MAX_TS_MS 253402300799999ULL

/* One CBOR value the lane takes as a reading at *pp: an integer below 2^53, UTF-8 text, true or
 * false, a finite half, single or double float (what put_scalar keeps as it is); 0 and *pp past
 * it, or -1 (anything else: null, bytes, tags, maps, arrays are the Python path's). */
static int cbor_scalar(const uint8_t **pp, const uint8_t *end, item_t *it) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    uint8_t major = *p >> 5, ai = *p & 0x1f;
    uint64_t v;
    it->is_text = 0;
    if (major == 0 || major == 1) {
        if (ai == 31 || cbor_arg(&p, end, &v) < 0 || v >= (uint64_t)TWO53) return -1;
        it->num = major == 0 ? (double)v : -1.0 - (double)v;
    } else if (major == 3) {
        if (ai == 31 || cbor_arg(&p, end, &v) < 0 || v > (uint64_t)(end - p)) return -1;
        if (!utf8_ok(p, v)) return -1;
        it->is_text = 1;
        it->text = p;
        it->tlen = v;
        p += v;
    } else if (major == 7) {
        p++;
        if (ai == 20 || ai == 21) {
            it->num = ai == 21 ? 1.0 : 0.0;
        } else if (ai == 25 && end - p >= 2) {
            it->num = half_to_double((uint16_t)(p[0] << 8 | p[1]));
            p += 2;
        } else if (ai == 26 && end - p >= 4) {
            uint32_t bits = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
            float f;
            memcpy(&f, &bits, 4);
            it->num = f;
            p += 4;
        } else if (ai == 27 && end - p >= 8) {
            uint64_t bits = 0;
            for (int k = 0; k < 8; k++) bits = bits << 8 | p[k];
            memcpy(&it->num, &bits, 8);
            p += 8;
        } else {
            return -1;
        }
        if (!isfinite(it->num)) return -1;
    } else {
        return -1;
    }
    *pp = p;
    return 0;
}

/* ThingsBoard's `nested: flatten` (formats.put_value): a map or array among the values is read
 * into its leaves, named `outer.inner` (an array's by index: `outer.0`), in the order they come;
 * the names the lane makes go to names[i] for the item at base + i.  With `json`, `nested: json`: a
 * nested value is one text reading, the value as json.dumps writes it (json_text, cbor_text).  NULL
 * where a nested value is not the lane's (the default profile, `reject`). */
typedef struct {
    char *buf;  /* (the caller's: at least twice the payload's size, and 64) */
    size_t cap, used;
} json_buf_t;

typedef struct {
    char (*names)[LANE_NAME];
    const item_t *base;
    json_buf_t *json; /* `nested: json`: a nested value kept as its JSON text, written here; NULL: flattened */
} flat_t;

#define FLAT_DEPTH 8 /* nesting the lane flattens; deeper: the Python path's (MAX_NESTING 64 there, JSON and CBOR alike) */

static char *put_u64(char *o, unsigned long long v);
static int cbor_text(json_buf_t *jb, const uint8_t **pp, const uint8_t *end, int depth);
static int json_text(json_buf_t *jb, const uint8_t **pp, const uint8_t *end, int depth);

/* `nested: json`: the nested value at *pp (a JSON or a CBOR payload's) as one text reading under
 * `key`, its JSON text written into fl->json as json.dumps writes it; 0, or -1 */
static int kept_as_json(const flat_t *fl, int json, const uint8_t **pp, const uint8_t *end, const uint8_t *key,
                        size_t klen, item_t *it) {
    size_t start = fl->json->used;
    if ((json ? json_text(fl->json, pp, end, 1) : cbor_text(fl->json, pp, end, 1)) < 0) return -1;
    it->key = key;
    it->klen = klen;
    it->is_text = 1;
    it->unit = NULL;
    it->text = (const uint8_t *)fl->json->buf + start;
    it->tlen = fl->json->used - start;
    return 0;
}
static int nested_value(const flat_t *fl, int json, const uint8_t **pp, const uint8_t *end, const char *prefix,
                        size_t plen, item_t *items, int *count, int cap, int depth);

/* The keys one map has given so far, to find one it gives twice -- by its own keys, not by the
 * items made of them: a flattened value's items are named `key.inner`, never `key`. */
typedef struct {
    const uint8_t *key[MAX_ITEMS];
    size_t len[MAX_ITEMS];
    int n;
} keys_t;

/* `key` noted as the map's next: 0, or -1 if the map gave it already (the Python path's: CBOR's
 * decoder refuses the map, JSON's keeps the last value) or has given more than the lane reads. */
static int new_key(keys_t *ks, const uint8_t *key, size_t klen) {
    for (int j = 0; j < ks->n; j++)
        if (ks->len[j] == klen && memcmp(ks->key[j], key, klen) == 0) return -1;
    if (ks->n == MAX_ITEMS) return -1;
    ks->key[ks->n] = key;
    ks->len[ks->n++] = klen;
    return 0;
}

static int flat_member(const flat_t *fl, int json, const uint8_t **pp, const uint8_t *end, const char *nm, size_t nl,
                       item_t *items, int *count, int cap, int depth);

/* A flat CBOR map at p of readings the lane is sure of: 0, the items, and *after past it; -1
 * otherwise.  ts_special: a "ts" key is the point's time (the default profile's flat map), not a
 * reading (ThingsBoard's).  fl: a nested value flattened (see flat_t), or NULL. */
static int cbor_object(const uint8_t *p, const uint8_t *end, item_t *items, int cap, int *nitems, long long *ts,
                       int ts_special, const flat_t *fl, const uint8_t **after) {
    if (p >= end || (*p >> 5) != 5) return -1;
    uint64_t n;
    if ((*p & 0x1f) == 31 || cbor_arg(&p, end, &n) < 0 || n == 0 || n > (uint64_t)cap) return -1;
    int count = 0;
    keys_t ks;
    ks.n = 0;
    *ts = -1;
    for (uint64_t i = 0; i < n; i++) {
        if (p >= end || (*p >> 5) != 3 || (*p & 0x1f) == 31) return -1;
        uint64_t klen;
        if (cbor_arg(&p, end, &klen) < 0 || klen == 0 || klen > (uint64_t)(end - p)) return -1;
        const uint8_t *key = p;
        p += klen;
        if (!utf8_ok(key, klen) || new_key(&ks, key, klen) < 0) return -1;
        int is_ts = ts_special && klen == 2 && key[0] == 't' && key[1] == 's';
        if (is_ts && *ts >= 0) return -1;
        if (p >= end || count == cap) return -1;
        uint8_t major = *p >> 5;
        if (fl && !is_ts && (major == 4 || major == 5)) {
            if (fl->json) { /* the nested value as one text reading: cbor2's value as json.dumps writes it */
                if (kept_as_json(fl, 0, &p, end, key, klen, &items[count]) < 0) return -1;
                count++;
                continue;
            }
            if (flat_member(fl, 0, &p, end, (const char *)key, klen, items, &count, cap, 0) < 0) return -1;
            continue;
        }
        item_t *it = &items[count];
        it->key = key;
        it->klen = klen;
        it->is_text = 0;
        it->unit = NULL;
        uint64_t v;
        if (is_ts) {
            if (major != 0 || cbor_arg(&p, end, &v) < 0 || v > MAX_TS_MS) return -1;
            *ts = (long long)v;
            continue; /* not a reading; remembered apart (count unchanged, but ts set) */
        }
        if (cbor_scalar(&p, end, it) < 0) return -1;
        count++;
    }
    if (count == 0) return -1;
    *nitems = count;
    *after = p;
    return 0;
}

/* JSON whitespace (RFC 8259 §2) */
static inline const uint8_t *json_ws(const uint8_t *p, const uint8_t *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* A JSON string at p (at its opening quote) without escapes: its bytes (checked UTF-8) and p past
 * the closing quote; -1 for anything else (an escape or a control character: the Python path). */
static int json_plain_string(const uint8_t **p, const uint8_t *end, const uint8_t **s, size_t *n) {
    const uint8_t *q = *p + 1;
    const uint8_t *start = q;
    while (q < end && *q != '"') {
        if (*q == '\\' || *q < 0x20) return -1;
        q++;
    }
    if (q >= end || !utf8_ok(start, (size_t)(q - start))) return -1;
    *s = start;
    *n = (size_t)(q - start);
    *p = q + 1;
    return 0;
}

/* After an object's member: 1 and p at the next member's key (a comma), 0 and p at the closing
 * brace, or -1. */
static int json_next_member(const uint8_t **p, const uint8_t *end) {
    const uint8_t *q = json_ws(*p, end);
    if (q < end && *q == ',') {
        *p = json_ws(q + 1, end);
        return 1;
    }
    *p = q;
    return q < end && *q == '}' ? 0 : -1;
}

/* A JSON object's member key at p (a string without escapes) and its colon: 0, the key, and p at
 * its value; -1 for anything else. */
static int json_member_key(const uint8_t **pp, const uint8_t *end, const uint8_t **key, size_t *klen) {
    const uint8_t *p = *pp;
    if (p >= end || *p != '"' || json_plain_string(&p, end, key, klen) < 0) return -1;
    p = json_ws(p, end);
    if (p >= end || *p != ':') return -1;
    *pp = json_ws(p + 1, end);
    return 0;
}

/* A JSON number at p of the shape -?(0|[1-9][0-9]*)(.[0-9]+)? with at most 15 digits in all (no
 * exponent): then its value is one correctly rounded IEEE operation on an exact integer and a
 * power of ten <= 10^15, the same for every decoder, msgspec's too; -1 for any other number.
 * *integral: no fraction (the only shape a `ts` may have). */
static int json_number(const uint8_t **p, const uint8_t *end, double *v, int *integral, uint64_t *whole) {
    const uint8_t *q = *p;
    int neg = 0, digits = 0, frac = 0;
    uint64_t m = 0;
    if (q < end && *q == '-') neg = 1, q++;
    if (q >= end || *q < '0' || *q > '9') return -1;
    if (*q == '0' && q + 1 < end && q[1] >= '0' && q[1] <= '9') return -1; /* (a leading zero: not JSON) */
    while (q < end && *q >= '0' && *q <= '9') {
        m = m * 10 + (uint64_t)(*q++ - '0');
        if (++digits > 15) return -1;
    }
    if (q < end && *q == '.') {
        q++;
        if (q >= end || *q < '0' || *q > '9') return -1;
        while (q < end && *q >= '0' && *q <= '9') {
            m = m * 10 + (uint64_t)(*q++ - '0');
            frac++;
            if (++digits > 15) return -1;
        }
    }
    if (q < end && (*q == 'e' || *q == 'E')) return -1;
    static const double pow10[16] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15};
    double x = (double)m / pow10[frac]; /* (m < 10^15 < 2^53: exact; one division, correctly rounded) */
    *v = neg && !(frac == 0 && m == 0) ? -x : x; /* ("-0" is the integer 0, "-0.0" the float -0.0) */
    *integral = frac == 0;
    *whole = m;
    *p = q;
    return 0;
}

/* One JSON value the lane takes as a reading at *pp: text without escapes, true, false, or a
 * number of json_number's shape; 0 and *pp past it, or -1 (null, arrays, objects: Python's). */
static int json_scalar(const uint8_t **pp, const uint8_t *end, item_t *it) {
    const uint8_t *p = *pp;
    it->is_text = 0;
    if (p >= end) return -1;
    if (*p == '"') {
        if (json_plain_string(&p, end, &it->text, &it->tlen) < 0) return -1;
        it->is_text = 1;
    } else if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
        it->num = 1.0;
        p += 4;
    } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
        it->num = 0.0;
        p += 5;
    } else {
        int integral;
        uint64_t whole;
        if (json_number(&p, end, &it->num, &integral, &whole) < 0) return -1;
    }
    *pp = p;
    return 0;
}

/* Another key of an array or map in JSON: 1 and p at it (past the comma), 0 and p past the close
 * (`close`: ']' or '}'), or -1. */
static int json_next(const uint8_t **p, const uint8_t *end, uint8_t close) {
    const uint8_t *q = json_ws(*p, end);
    if (q < end && *q == ',') {
        *p = json_ws(q + 1, end);
        return 1;
    }
    if (q < end && *q == close) {
        *p = q + 1;
        return 0;
    }
    return -1;
}

/* The name `prefix.key` into the next item's slot of fl->names (0, its length), or -1. */
static int flat_name(const flat_t *fl, const item_t *it, const char *prefix, size_t plen, const uint8_t *key,
                     size_t klen, size_t *len) {
    if (!klen || plen + 1 + klen >= LANE_NAME || !utf8_ok(key, klen)) return -1;
    char *o = fl->names[it - fl->base];
    memcpy(o, prefix, plen);
    o[plen] = '.';
    memcpy(o + plen + 1, key, klen);
    *len = plen + 1 + klen;
    return 0;
}

/* One leaf or nested value under `name` (its bytes in `nm`, nl long). */
static int flat_member(const flat_t *fl, int json, const uint8_t **pp, const uint8_t *end, const char *nm, size_t nl,
                       item_t *items, int *count, int cap, int depth) {
    const uint8_t *p = *pp;
    if (p < end && (json ? (*p == '{' || *p == '[') : ((*p >> 5) == 4 || (*p >> 5) == 5))) {
        char prefix[LANE_NAME]; /* (its own copy: the children write their names where it was) */
        if (nl >= LANE_NAME) return -1;
        memcpy(prefix, nm, nl);
        return nested_value(fl, json, pp, end, prefix, nl, items, count, cap, depth + 1);
    }
    if (*count == cap) return -1;
    item_t *it = &items[*count];
    if ((json ? json_scalar(pp, end, it) : cbor_scalar(pp, end, it)) < 0) return -1;
    it->key = (const uint8_t *)nm;
    it->klen = nl;
    it->unit = NULL;
    (*count)++;
    return 0;
}

/* A map or array at *pp (JSON or CBOR) flattened under `prefix`: its leaves appended to items. */
static int nested_value(const flat_t *fl, int json, const uint8_t **pp, const uint8_t *end, const char *prefix,
                        size_t plen, item_t *items, int *count, int cap, int depth) {
    if (depth > FLAT_DEPTH) return -1;
    const uint8_t *p = *pp;
    int is_map = json ? *p == '{' : (*p >> 5) == 5;
    uint64_t n = 0;
    if (json) {
        p = json_ws(p + 1, end);
        if (p < end && *p == (is_map ? '}' : ']')) { /* (empty: no leaves, as in Python) */
            *pp = p + 1;
            return 0;
        }
    } else if ((*p & 0x1f) == 31 || cbor_arg(&p, end, &n) < 0 || n > (uint64_t)MAX_ITEMS) {
        return -1;
    }
    keys_t ks;
    ks.n = 0;
    for (uint64_t i = 0; json || i < n; i++) {
        const uint8_t *key;
        size_t klen, len;
        char index[24];
        if (is_map && json) {
            if (json_member_key(&p, end, &key, &klen) < 0) return -1;
        } else if (is_map) {
            uint64_t kl;
            if (p >= end || (*p >> 5) != 3 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &kl) < 0 ||
                kl > (uint64_t)(end - p))
                return -1;
            key = p;
            klen = (size_t)kl;
            p += klen;
        } else {
            key = (const uint8_t *)index;
            klen = (size_t)(put_u64(index, i) - index);
        }
        if (is_map && new_key(&ks, key, klen) < 0) return -1;
        if (*count == cap || flat_name(fl, &items[*count], prefix, plen, key, klen, &len) < 0) return -1;
        if (flat_member(fl, json, &p, end, fl->names[&items[*count] - fl->base], len, items, count, cap, depth) < 0)
            return -1;
        if (json) {
            int next = json_next(&p, end, is_map ? '}' : ']');
            if (next < 0) return -1;
            if (!next) break;
        }
    }
    *pp = p;
    return 0;
}

/* Bytes into the buffer of nested values' JSON text: 0, or -1 (no room: the Python path's). */
static int jb_put(json_buf_t *jb, const void *s, size_t n) {
    if (jb->cap - jb->used < n) return -1;
    memcpy(jb->buf + jb->used, s, n);
    jb->used += n;
    return 0;
}

/* Text json.dumps writes as it is (ensure_ascii=False): UTF-8 without a quote, a backslash or a
 * control character (those it escapes: the Python path's) */
static int json_plain_text(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] == '"' || s[i] == '\\' || s[i] < 0x20) return 0;
    return utf8_ok(s, n);
}

static char *put_fixed(char *o, double v);

/* A double as repr writes it (json.dumps writes float.__repr__): 0, or -1 */
static int jb_put_repr(json_buf_t *jb, double v) {
    char fast[40], *end = put_fixed(fast, v); /* (where repr's digits and msgspec's are the same) */
    if (end) return jb_put(jb, fast, (size_t)(end - fast));
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!s) {
        PyErr_Clear();
        return -1;
    }
    int r = jb_put(jb, s, strlen(s));
    PyMem_Free(s);
    return r;
}

/* A JSON value at *pp written again as Python's json.dumps(value, separators=(",", ":"),
 * ensure_ascii=False) writes it (formats.put_value, `nested: json`): strings as they came (the lane
 * takes none with an escape or a control character, which dumps would write otherwise), integers
 * as they came ("-0" as 0), fractions as repr writes the double, true, false, null; a key twice in
 * an object, or deeper than FLAT_DEPTH: -1. */
static int json_text(json_buf_t *jb, const uint8_t **pp, const uint8_t *end, int depth) {
    const uint8_t *p = *pp;
    if (p >= end || depth > FLAT_DEPTH) return -1;
    if (*p == '{' || *p == '[') {
        int is_map = *p == '{';
        uint8_t close = is_map ? '}' : ']';
        const uint8_t *keys[MAX_ITEMS];
        size_t klens[MAX_ITEMS];
        int nkeys = 0;
        if (jb_put(jb, p, 1) < 0) return -1;
        p = json_ws(p + 1, end);
        if (p < end && *p == close) {
            *pp = p + 1;
            return jb_put(jb, &close, 1);
        }
        for (;;) {
            if (is_map) {
                const uint8_t *key;
                size_t klen;
                if (json_member_key(&p, end, &key, &klen) < 0 || nkeys == MAX_ITEMS) return -1;
                for (int k = 0; k < nkeys; k++)
                    if (klens[k] == klen && memcmp(keys[k], key, klen) == 0) return -1;
                keys[nkeys] = key;
                klens[nkeys++] = klen;
                if (jb_put(jb, "\"", 1) < 0 || jb_put(jb, key, klen) < 0 || jb_put(jb, "\":", 2) < 0) return -1;
            }
            if (json_text(jb, &p, end, depth + 1) < 0) return -1;
            int next = json_next(&p, end, close);
            if (next < 0) return -1;
            if (jb_put(jb, next ? "," : (const char *)&close, 1) < 0) return -1;
            if (!next) break;
        }
        *pp = p;
        return 0;
    }
    if (*p == '"') {
        const uint8_t *s;
        size_t n;
        if (json_plain_string(&p, end, &s, &n) < 0) return -1;
        if (jb_put(jb, "\"", 1) < 0 || jb_put(jb, s, n) < 0 || jb_put(jb, "\"", 1) < 0) return -1;
    } else if (end - p >= 4 && (memcmp(p, "true", 4) == 0 || memcmp(p, "null", 4) == 0)) {
        if (jb_put(jb, p, 4) < 0) return -1;
        p += 4;
    } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
        if (jb_put(jb, p, 5) < 0) return -1;
        p += 5;
    } else {
        const uint8_t *start = p;
        double v;
        int integral;
        uint64_t whole;
        if (json_number(&p, end, &v, &integral, &whole) < 0) return -1;
        if (integral) { /* a Python int: its digits ("-0" is 0) */
            if (whole == 0 ? jb_put(jb, "0", 1) < 0 : jb_put(jb, start, (size_t)(p - start)) < 0) return -1;
        } else if (jb_put_repr(jb, v) < 0) { /* a Python float: repr's digits */
            return -1;
        }
    }
    *pp = p;
    return 0;
}

/* A CBOR value at *pp written as json.dumps(value, separators=(",", ":"), ensure_ascii=False) writes
 * what cbor2 decodes it to (formats.put_value with `nested: json`, its `_plain`): maps with text keys
 * (none twice), arrays, text json.dumps writes as it is, integers (Python's: every size CBOR holds
 * but -2^64), finite half, single and double floats as repr writes the double, true, false, null.
 * Anything else -- bytes, tags, undefined, a non-finite float, an indefinite length, more than
 * MAX_ITEMS members, deeper than FLAT_DEPTH, no room left -- -1: the Python path decides. */
static int cbor_text(json_buf_t *jb, const uint8_t **pp, const uint8_t *end, int depth) {
    const uint8_t *p = *pp;
    if (p >= end || depth > FLAT_DEPTH) return -1;
    uint8_t major = *p >> 5, ai = *p & 0x1f;
    uint64_t n;
    if (ai == 31) return -1;
    if (major == 4 || major == 5) {
        if (cbor_arg(&p, end, &n) < 0 || n > (uint64_t)MAX_ITEMS) return -1;
        const uint8_t *keys[MAX_ITEMS];
        size_t klens[MAX_ITEMS];
        if (jb_put(jb, major == 5 ? "{" : "[", 1) < 0) return -1;
        for (uint64_t i = 0; i < n; i++) {
            if (i && jb_put(jb, ",", 1) < 0) return -1;
            if (major == 5) {
                uint64_t kl;
                if (p >= end || (*p >> 5) != 3 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &kl) < 0 ||
                    kl > (uint64_t)(end - p) || !json_plain_text(p, (size_t)kl))
                    return -1;
                for (uint64_t k = 0; k < i; k++)
                    if (klens[k] == kl && memcmp(keys[k], p, (size_t)kl) == 0) return -1;
                keys[i] = p;
                klens[i] = (size_t)kl;
                if (jb_put(jb, "\"", 1) < 0 || jb_put(jb, p, (size_t)kl) < 0 || jb_put(jb, "\":", 2) < 0) return -1;
                p += kl;
            }
            if (cbor_text(jb, &p, end, depth + 1) < 0) return -1;
        }
        if (jb_put(jb, major == 5 ? "}" : "]", 1) < 0) return -1;
    } else if (major == 3) {
        if (cbor_arg(&p, end, &n) < 0 || n > (uint64_t)(end - p) || !json_plain_text(p, (size_t)n)) return -1;
        if (jb_put(jb, "\"", 1) < 0 || jb_put(jb, p, (size_t)n) < 0 || jb_put(jb, "\"", 1) < 0) return -1;
        p += n;
    } else if (major == 0 || major == 1) {
        char digits[24], *o = digits;
        if (cbor_arg(&p, end, &n) < 0 || (major == 1 && n == UINT64_MAX)) return -1;
        if (major == 1) *o++ = '-';
        o = put_u64(o, major == 1 ? n + 1 : n);
        if (jb_put(jb, digits, (size_t)(o - digits)) < 0) return -1;
    } else if (major == 7) {
        double v;
        p++;
        if (ai == 20 || ai == 21 || ai == 22) {
            const char *word = ai == 20 ? "false" : ai == 21 ? "true" : "null";
            if (jb_put(jb, word, strlen(word)) < 0) return -1;
            *pp = p;
            return 0;
        } else if (ai == 25 && end - p >= 2) {
            v = half_to_double((uint16_t)(p[0] << 8 | p[1]));
            p += 2;
        } else if (ai == 26 && end - p >= 4) {
            uint32_t bits = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
            float f;
            memcpy(&f, &bits, 4);
            v = f;
            p += 4;
        } else if (ai == 27 && end - p >= 8) {
            uint64_t bits = 0;
            for (int k = 0; k < 8; k++) bits = bits << 8 | p[k];
            memcpy(&v, &bits, 8);
            p += 8;
        } else {
            return -1;
        }
        if (!isfinite(v) || jb_put_repr(jb, v) < 0) return -1;
    } else {
        return -1; /* (bytes, tags: not JSON) */
    }
    *pp = p;
    return 0;
}

/* Parse a JSON payload as the flat object the Python path accepts (decode_json, flat_readings):
 * 0 and the items if the lane is sure of it, -1 otherwise (the Python path decides, and explains).
 * Sure means: an object of at most MAX_ITEMS members, keys and text without escapes, numbers of
 * `json_number`'s shape, true and false, an integral `ts` in range, no key twice (msgspec would
 * keep the last), at least one reading; null, arrays, nested objects and the rest are Python's. */
static int json_object(const uint8_t *p, const uint8_t *end, item_t *items, int cap, int *nitems, long long *ts,
                       int ts_special, const flat_t *fl, const uint8_t **after) {
    if (p >= end || *p != '{') return -1;
    p = json_ws(p + 1, end);
    int count = 0;
    keys_t ks;
    ks.n = 0;
    *ts = -1;
    if (p < end && *p == '}') return -1; /* (no readings) */
    for (;;) {
        const uint8_t *key;
        size_t klen;
        if (json_member_key(&p, end, &key, &klen) < 0 || klen == 0 || new_key(&ks, key, klen) < 0) return -1;
        int is_ts = ts_special && klen == 2 && key[0] == 't' && key[1] == 's';
        if (is_ts && *ts >= 0) return -1;
        if (p >= end) return -1;
        if (count == cap) return -1;
        if (fl && !is_ts && (*p == '{' || *p == '[')) {
            if (fl->json) { /* the nested value as one text reading, its JSON as Python writes it */
                if (kept_as_json(fl, 1, &p, end, key, klen, &items[count]) < 0) return -1;
                count++;
                int next = json_next_member(&p, end);
                if (next < 0) return -1;
                if (!next) break;
                continue;
            }
            if (flat_member(fl, 1, &p, end, (const char *)key, klen, items, &count, cap, 0) < 0) return -1;
            int next = json_next_member(&p, end);
            if (next < 0) return -1;
            if (!next) break;
            continue;
        }
        item_t *it = &items[count];
        it->key = key;
        it->klen = klen;
        it->is_text = 0;
        it->unit = NULL;
        if (is_ts) {
            double v;
            int integral;
            uint64_t whole;
            if (*p == '-' || json_number(&p, end, &v, &integral, &whole) < 0 || !integral || whole > MAX_TS_MS)
                return -1;
            *ts = (long long)whole;
        } else {
            if (json_scalar(&p, end, it) < 0) return -1;
            count++;
        }
        int next = json_next_member(&p, end);
        if (next < 0) return -1;
        if (!next) break;
    }
    if (count == 0) return -1;
    *nitems = count;
    *after = p + 1;
    return 0;
}

/* A JSON integer ts at p (the ThingsBoard {ts, values} form's): 0 and *ts, or -1. */
static int json_ts(const uint8_t **p, const uint8_t *end, long long *ts) {
    double v;
    int integral;
    uint64_t whole;
    if (*p >= end || **p == '-' || json_number(p, end, &v, &integral, &whole) < 0 || !integral || whole > MAX_TS_MS)
        return -1;
    *ts = (long long)whole;
    return 0;
}

/* The payload modes of a lane target: the default profile's flat map, where "ts" is the time;
 * ThingsBoard's (a `thingsboard` profile without rules): a flat map of values, "ts" among them,
 * or {"ts": ms, "values": {flat map}} (formats.thingsboard_entry). */
enum { MODE_FLAT = 0, MODE_THINGSBOARD = 1, MODE_LPP = 2 /* (lpp.h) */, MODE_ARRAY = 3, MODE_BINARY = 4 /* (layouts.h) */,
       MODE_SENML = 5 /* (senml.h) */, MODE_PYTHON = 6 /* (pycodec.h) */, MODE_PROTOBUF = 7 /* (proto.h) */,
       MODE_LAST = MODE_PROTOBUF };

/* Flattened names unique among an entry's items: 0, or -1 (`{"a.b": 1, "a": {"b": 2}}` -- Python
 * keeps one of them: not the lane's to guess). */
static int unique(const item_t *items, int n, const flat_t *fl) {
    if (!fl) return 0;
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++)
            if (items[i].klen == items[j].klen && memcmp(items[i].key, items[j].key, items[i].klen) == 0) return -1;
    return 0;
}

/* ThingsBoard's {"ts": ms, "values": {map}} at p (formats.thingsboard_entry: the form of a map
 * whose keys are "values" and maybe "ts"): 0, the items, *ts and *after; 1 if the map is not of
 * that form (a key besides ts and values, or no values: a flat map, every key a value); -1 if the
 * lane is not sure (the Python path's). */
static int ts_values(int cf, const flat_t *fl, const uint8_t *p, const uint8_t *end, item_t *items, int cap,
                     int *nitems, long long *ts, const uint8_t **after) {
    int seen_values = 0, bad_ts = 0; /* (a ts that is no time: the form's refusal, or a flat map's value) */
    item_t scratch;
    if (cf == 60) { /* (keys compared as the text they decode to, in whatever encoding of a head) */
        uint64_t members, v, kl;
        if (p >= end || (*p >> 5) != 5 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &members) < 0 || !members) return -1;
        if (members > 2) return 1; /* (more keys than ts and values: a flat map; one twice: its reader refuses it) */
        for (uint64_t m = 0; m < members; m++) {
            if (p >= end || (*p >> 5) != 3 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &kl) < 0 ||
                kl > (uint64_t)(end - p))
                return -1;
            const uint8_t *key = p;
            p += kl;
            int is_ts = kl == 2 && memcmp(key, "ts", 2) == 0, is_values = kl == 6 && memcmp(key, "values", 6) == 0;
            if (is_ts) {
                if (*ts >= 0 || bad_ts || p >= end) return -1;
                const uint8_t *q = p;
                if ((*p >> 5) == 0 && cbor_arg(&q, end, &v) == 0 && v <= MAX_TS_MS) {
                    *ts = (long long)v;
                    p = q;
                } else if (cbor_scalar(&p, end, &scratch) == 0) {
                    bad_ts = 1;
                } else {
                    return -1;
                }
            } else if (is_values && !seen_values) {
                if (cbor_object(p, end, items, cap, nitems, &(long long){-1}, 0, fl, &p) < 0) return -1;
                seen_values = 1;
            } else {
                return is_values ? -1 : 1; /* (another key: a flat map) */
            }
        }
        *after = p;
        return !seen_values ? 1 : bad_ts ? -1 : unique(items, *nitems, fl);
    }
    if (p >= end || *p != '{') return -1;
    p = json_ws(p + 1, end);
    for (;;) {
        const uint8_t *key;
        size_t klen;
        if (json_member_key(&p, end, &key, &klen) < 0) return -1;
        if (klen == 2 && memcmp(key, "ts", 2) == 0 && *ts < 0 && !bad_ts) {
            const uint8_t *q = p;
            if (json_ts(&q, end, ts) == 0) {
                p = q;
            } else {
                *ts = -1;
                if (json_scalar(&p, end, &scratch) < 0) return -1;
                bad_ts = 1;
            }
        } else if (klen == 6 && memcmp(key, "values", 6) == 0 && !seen_values) {
            long long inner = -1;
            if (json_object(p, end, items, cap, nitems, &inner, 0, fl, &p) < 0) return -1;
            seen_values = 1;
        } else {
            return (klen == 2 && memcmp(key, "ts", 2) == 0) || (klen == 6 && memcmp(key, "values", 6) == 0) ? -1 : 1;
        }
        int next = json_next_member(&p, end);
        if (next < 0) return -1;
        if (!next) break;
    }
    *after = p + 1;
    return !seen_values ? 1 : bad_ts ? -1 : unique(items, *nitems, fl);
}

/* One entry at p (Content-Format 60: CBOR, 50: JSON, whitespace skipped) into at most `cap` items:
 * the default profile's flat map where "ts" is the time (`flat`), or a ThingsBoard entry -- a flat
 * map of values, "ts" among them, or {"ts": ms, "values": {map}} (`ts_values`); with `fl`, nested
 * values flattened.  0, the items, *ts (-1: none) and *after past it; -1 if the lane is not sure. */
static int doc_entry(int cf, int flat, const flat_t *fl, const uint8_t *p, const uint8_t *end, item_t *items, int cap,
                     int *nitems, long long *ts, const uint8_t **after) {
    *ts = -1;
    if (cf == 50) p = json_ws(p, end);
    if (!flat) {
        int form = ts_values(cf, fl, p, end, items, cap, nitems, ts, after);
        if (form <= 0) return form;
        *ts = -1;
    }
    if ((cf == 60 ? cbor_object(p, end, items, cap, nitems, ts, flat, fl, after)
                  : json_object(p, end, items, cap, nitems, ts, flat, fl, after)) < 0)
        return -1;
    if (flat) return 0;
    for (int i = 0; i < *nitems; i++) /* ("values" beside other keys: Python's to judge) */
        if (items[i].klen == 6 && memcmp(items[i].key, "values", 6) == 0) return -1;
    return unique(items, *nitems, fl);
}

/* The end of a document: nothing after it (JSON: but whitespace). */
static inline int doc_ends(int cf, const uint8_t *p, const uint8_t *end) {
    return cf == 60 ? p == end : json_ws(p, end) == end;
}

/* Parse a document (Content-Format 60: CBOR, 50: JSON) in a target's mode (flat or ThingsBoard):
 * 0, the items and each point's time (pts, *npts of them: ThingsBoard's array is a point an
 * entry, each item its point's index) if the lane is sure of it; -1 otherwise (the Python path
 * decides, and explains: it is the twin, and what the lane takes it would take alike). */
static int parse_document(int cf, int mode, const flat_t *fl, const uint8_t *p, const uint8_t *end, item_t *items,
                          int *nitems, long long *pts, int *npts) {
    const uint8_t *after;
    *npts = 1;
    if (doc_entry(cf, mode == MODE_FLAT, fl, p, end, items, MAX_ITEMS, nitems, &pts[0], &after) == 0)
        return doc_ends(cf, after, end) ? 0 : -1;
    if (mode != MODE_THINGSBOARD) return -1;
    uint64_t n = 0; /* an array of entries: a point each (CBOR: its length; JSON: up to its bracket) */
    if (cf == 60) {
        if (p >= end || (*p >> 5) != 4 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &n) < 0 || !n || n > MAX_POINTS)
            return -1;
    } else {
        p = json_ws(p, end);
        if (p >= end || *p != '[') return -1;
        p++;
    }
    int count = 0, k = 0;
    for (;; k++) {
        if (cf == 60 ? (uint64_t)k == n : 0) break;
        if (cf == 50 && k) { /* a comma between entries, or the closing bracket */
            p = json_ws(p, end);
            if (p < end && *p == ']') {
                p++;
                break;
            }
            if (p >= end || *p != ',') return -1;
            p++;
        }
        if (k == MAX_POINTS || count == MAX_ITEMS) return -1;
        int got;
        if (doc_entry(cf, 0, fl, p, end, items + count, MAX_ITEMS - count, &got, &pts[k], &p) < 0) return -1;
        for (int i = count; i < count + got; i++) items[i].point = (uint8_t)k;
        count += got;
    }
    if (!doc_ends(cf, p, end)) return -1;
    *nitems = count;
    *npts = k;
    return 0;
}

static char *put_u64(char *o, unsigned long long v) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n) *o++ = tmp[--n];
    return o;
}

/* A reading with a few decimals (22.5, 1013.25, 0.004): its shortest digits found without
 * dtoa, or NULL (not such a number).  The fewest decimals k (1..6) for which an integer m makes
 * m / 10^k read back as v -- the division checks it exactly: m < 2^52 and 10^k are exact doubles,
 * so it rounds as strtod rounds "m e-k" -- are repr's digits: a non-integer below 2^52 needs its
 * integer digits and at least one decimal, and with |v| 10^k < 2^52 the decimals' step is at least
 * v's ulp, so at most one m reads back (two -- a tie -- go to dtoa).  |v| >= 1e-4: repr's and
 * msgspec's fixed notation.  (put_double's fallback costs ~1 us a number of the lane's ~5 a reading.) */
static char *put_short_decimal(char *o, double v) {
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
    (void)o; /* (the exactness above needs double arithmetic in doubles, not x87's wider registers) */
    (void)v;
    return NULL;
#endif
    static const double P10[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6};
    double a = fabs(v);
    if (!(a >= 1e-4) || a * 1e6 >= 4503599627370496.0) return NULL; /* (2^52; NaN fails the first) */
    for (int k = 1; k <= 6; k++) {
        double p = P10[k], m = nearbyint(a * p);
        int found = 0;
        double hit = 0;
        for (double c = m - 1; c <= m + 1; c++)
            if (c > 0 && c / p == a) {
                found++;
                hit = c;
            }
        if (found > 1) return NULL;
        if (!found) continue;
        unsigned long long q = (unsigned long long)hit, den = (unsigned long long)p;
        if (v < 0) *o++ = '-';
        o = put_u64(o, q / den);
        *o++ = '.';
        unsigned long long f = q % den;
        char *end = o + k;
        for (char *w = end - 1; w >= o; w--) {
            *w = (char)('0' + f % 10);
            f /= 10;
        }
        return end;
    }
    return NULL;
}

/* A whole number below 1e15 (not -0.0) or one of a few decimals, as repr and msgspec both write
 * it (fixed notation, "65.0"), without dtoa; NULL for any other double. */
static char *put_fixed(char *o, double v) {
    if (v == floor(v) && fabs(v) < 1e15 && !(v == 0 && signbit(v))) {
        if (v < 0) {
            *o++ = '-';
            v = -v;
        }
        o = put_u64(o, (unsigned long long)v);
        *o++ = '.';
        *o++ = '0';
        return o;
    }
    return put_short_decimal(o, v);
}

static char *put_double(char *o, double v) {
    char *fixed_end = put_fixed(o, v);
    if (fixed_end) return fixed_end;
    /* the shortest digits that read back as v (repr's), written as msgspec writes them: an
     * exponent without "+" or leading zeros (1e16, 1e-7), and 1e-05's decade as a decimal
     * (0.000025) -- held to msgspec over random doubles by tests/test_fastlane.py */
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!s) return NULL;
    char *e = strchr(s, 'e');
    if (!e) {
        size_t n = strlen(s);
        memcpy(o, s, n);
        PyMem_Free(s);
        return o + n;
    }
    int exp = atoi(e + 1);
    if (exp == -5) {
        const char *m = s;
        if (*m == '-') *o++ = *m++;
        memcpy(o, "0.0000", 6);
        o += 6;
        for (; m < e; m++)
            if (*m != '.') *o++ = *m;
    } else {
        memcpy(o, s, (size_t)(e - s));
        o += e - s;
        *o++ = 'e';
        if (exp < 0) *o++ = '-';
        o = put_u64(o, (unsigned long long)(exp < 0 ? -exp : exp));
    }
    PyMem_Free(s);
    return o;
}

/* A JSON string as msgspec writes it: `"` and `\` escaped, control characters as \b \t \n \f \r
 * or \u00XX, everything else (UTF-8 already checked) as is. */
static char *put_string(char *o, const uint8_t *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    return o;
}

/* The TelemetryPoint's JSON (corem/ingest/point.py, field order as msgspec writes it). */
#endif
