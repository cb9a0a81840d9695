/*
 * The fast lane's SenML reader (RFC 8428): a pack of records, JSON (110, 111, 50) or CBOR (112, 113,
 * 60), resolved as corem/profiles/formats.py's `senml` (the Python twin) resolves it -- base name,
 * time, unit, value and sum carried over the pack (§4.6), relative times (below 2^28 s, §4.5.3)
 * from the moment it came, names checked (§4.5.1), `v` / `vs` / `vb` values and sums `s` as
 * `{name}.sum`, units kept, a point for each time the records resolve to (in the order they first
 * come, as Python's dict keeps them; at most MAX_POINTS).  The lane takes a pack whose values it
 * is sure of; `vd` data, escapes, exponents, labels of other types, anything Python would refuse:
 * the Python path's, which answers and explains.
 * Header-only, for _lane.c, after cbor_json.h.
 */
#ifndef COREM_SENML_H
#define COREM_SENML_H

enum { L_BVER, L_BN, L_BT, L_BU, L_BV, L_BS, L_N, L_U, L_V, L_VS, L_VB, L_S, L_T, L_UT, L_VD, L_COUNT, L_IGNORED };

/* the labels' names and lengths, in the enum's order (the lengths from the literals themselves) */
#define SENML_LABEL(name) {name, sizeof name - 1}
static const struct {
    const char *name;
    size_t len;
} SENML_LABELS[L_COUNT] = {SENML_LABEL("bver"), SENML_LABEL("bn"), SENML_LABEL("bt"), SENML_LABEL("bu"),
                           SENML_LABEL("bv"),   SENML_LABEL("bs"), SENML_LABEL("n"),  SENML_LABEL("u"),
                           SENML_LABEL("v"),    SENML_LABEL("vs"), SENML_LABEL("vb"), SENML_LABEL("s"),
                           SENML_LABEL("t"),    SENML_LABEL("ut"), SENML_LABEL("vd")};
#undef SENML_LABEL
#define SENML_VERSION 10
#define SENML_RELATIVE_BELOW 268435456.0 /* 2^28 s */

/* One value of a record: its kind and what it holds */
enum { SV_NUM, SV_INT, SV_TEXT, SV_BOOL };
typedef struct {
    int kind; /* SV_INT: a number written as an integer (CBOR major 0/1, JSON without a fraction) */
    double num;
    const uint8_t *text;
    size_t tlen;
} svalue_t;

/* A record's label from a text key; L_IGNORED for one Python ignores (§4.4), -1 for one ending in
 * "_" (must be understood: Python refuses it). */
static int senml_label(const uint8_t *k, size_t n) {
    if (n && n <= 4) /* (every label is 1-4 bytes: a longer key is none, without a scan) */
        for (int l = 0; l < L_COUNT; l++)
            if (SENML_LABELS[l].len == n && memcmp(SENML_LABELS[l].name, k, n) == 0) return l;
    return n && k[n - 1] == '_' ? -1 : L_IGNORED;
}

/* A CBOR label (RFC 8428 Table 4) from an integer key; -1 for any other (Python refuses it). */
static int senml_cbor_label(int64_t k) {
    static const int neg[] = {-1, L_BVER, L_BN, L_BT, L_BU, L_BV, L_BS}; /* -1 .. -6 */
    static const int pos[] = {L_N, L_U, L_V, L_VS, L_VB, L_S, L_T, L_UT, L_VD}; /* 0 .. 8 */
    if (k < 0) return k >= -6 ? neg[-k] : -1;
    return k <= 8 ? pos[k] : -1;
}

static int cbor_svalue(const uint8_t **pp, const uint8_t *end, svalue_t *v) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    if (*p == 0xf4 || *p == 0xf5) {
        v->kind = SV_BOOL;
        v->num = *p == 0xf5;
        *pp = p + 1;
        return 0;
    }
    uint8_t major = *p >> 5;
    item_t it;
    if (cbor_scalar(pp, end, &it) < 0) return -1;
    v->kind = it.is_text ? SV_TEXT : major == 0 ? SV_INT : SV_NUM; /* (SV_INT: what bver may be, >= 0) */
    v->num = it.num;
    v->text = it.text;
    v->tlen = it.tlen;
    return 0;
}

static int json_svalue(const uint8_t **pp, const uint8_t *end, svalue_t *v) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    if (*p == 't' || *p == 'f') {
        item_t it;
        if (json_scalar(pp, end, &it) < 0) return -1;
        v->kind = SV_BOOL;
        v->num = it.num;
        return 0;
    }
    if (*p == '"') {
        v->kind = SV_TEXT;
        return json_plain_string(pp, end, &v->text, &v->tlen);
    }
    int integral;
    uint64_t whole;
    if (json_number(pp, end, &v->num, &integral, &whole) < 0) return -1;
    v->kind = integral && *p != '-' ? SV_INT : SV_NUM; /* ("-0" and negatives: only bver asks, and refuses them) */
    return 0;
}

/* A value of the type its label wants (formats.py `_TYPES`): 0, or -1 (Python refuses it, or
 * -- vd -- the lane leaves it). */
static int senml_typed(int label, const svalue_t *v) {
    switch (label) {
    case L_BN: case L_N: case L_BU: case L_U: case L_VS: return v->kind == SV_TEXT ? 0 : -1;
    case L_VB: return v->kind == SV_BOOL ? 0 : -1;
    case L_VD: return -1;
    case L_BVER: return v->kind == SV_INT && v->num <= SENML_VERSION ? 0 : -1;
    case L_IGNORED: return 0;
    default: return v->kind == SV_INT || v->kind == SV_NUM ? 0 : -1; /* (finite: the readers refuse others) */
    }
}

/* §4.5.1: [A-Za-z0-9][A-Za-z0-9-:./_]* */
static int senml_name_ok(const char *s, size_t n) {
    if (!n || !((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z') || (s[0] >= '0' && s[0] <= '9'))) return 0;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == ':' ||
              c == '.' || c == '/' || c == '_'))
            return 0;
    }
    return 1;
}

typedef struct {
    const uint8_t *bn, *bu; /* bu: NULL while the pack has none */
    size_t bnlen, bulen;
    double bt, bv, bs;
} senml_base_t;

/* One record's labels read (the map at *pp, CBOR or JSON), into has/val: 0, or -1. */
static int senml_record(int cbor, const uint8_t **pp, const uint8_t *end, uint8_t *has, svalue_t *val) {
    const uint8_t *p = *pp;
    memset(has, 0, L_COUNT);
    if (cbor) {
        uint64_t n;
        if (p >= end || (*p >> 5) != 5 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &n) < 0 || n > 32) return -1;
        /* the labels it ignores, by key -- one given twice makes the map one CBOR's decoder refuses:
         * text ones as any map's keys (new_key), integer ones (0..8, either sign) as bits */
        keys_t ignored;
        ignored.n = 0;
        uint32_t ignored_ints = 0;
        for (uint64_t i = 0; i < n; i++) {
            int label;
            if (p >= end) return -1;
            uint8_t major = *p >> 5;
            uint64_t k;
            const uint8_t *text = NULL;
            if (major == 0 || major == 1) {
                if ((*p & 0x1f) == 31 || cbor_arg(&p, end, &k) < 0 || k > 8) return -1;
                label = senml_cbor_label(major == 0 ? (int64_t)k : -1 - (int64_t)k);
            } else if (major == 3) {
                if ((*p & 0x1f) == 31 || cbor_arg(&p, end, &k) < 0 || k > (uint64_t)(end - p) || !utf8_ok(p, k))
                    return -1;
                label = senml_label(p, k);
                text = p;
                p += k;
            } else {
                return -1;
            }
            svalue_t v;
            if (label < 0 || cbor_svalue(&p, end, &v) < 0 || senml_typed(label, &v) < 0) return -1;
            if (label == L_IGNORED) {
                uint32_t bit = text ? 0 : 1u << (major * 9 + k);
                if (text ? new_key(&ignored, text, k) < 0 : (ignored_ints & bit) != 0) return -1;
                ignored_ints |= bit;
                continue;
            }
            if (has[label]) return -1; /* (a label twice: the decoder keeps one; not the lane's to guess) */
            has[label] = 1;
            val[label] = v;
        }
    } else {
        if (p >= end || *p != '{') return -1;
        p = json_ws(p + 1, end);
        if (p < end && *p == '}') {
            *pp = p + 1;
            return 0;
        }
        for (;;) {
            const uint8_t *key;
            size_t klen;
            if (json_member_key(&p, end, &key, &klen) < 0) return -1;
            int label = senml_label(key, klen);
            svalue_t v;
            if (label < 0 || json_svalue(&p, end, &v) < 0 || senml_typed(label, &v) < 0) return -1;
            if (label != L_IGNORED) {
                if (has[label]) return -1;
                has[label] = 1;
                val[label] = v;
            }
            int next = json_next_member(&p, end);
            if (next < 0) return -1;
            if (!next) break;
        }
        p++; /* (the closing brace) */
    }
    *pp = p;
    return 0;
}

/* A resolved name into names[count] (bn + n, suffix appended): 0 and its length, or -1 (too long,
 * not a SenML name, or one its point -- `point` -- has already). */
static int senml_name(const senml_base_t *b, const svalue_t *n, const char *suffix, char (*names)[LANE_NAME],
                      const item_t *items, int count, int point, size_t *len) {
    size_t nlen = n ? n->tlen : 0, slen = strlen(suffix), total = b->bnlen + nlen;
    if (total + slen >= LANE_NAME) return -1;
    char *o = names[count];
    memcpy(o, b->bn, b->bnlen);
    if (nlen) memcpy(o + b->bnlen, n->text, nlen);
    if (!senml_name_ok(o, total)) return -1;
    memcpy(o + total, suffix, slen);
    total += slen;
    for (int j = 0; j < count; j++)
        if (items[j].point == point && items[j].klen == total && memcmp(items[j].key, o, total) == 0) return -1;
    *len = total;
    return 0;
}

/* A SenML pack (cf: 110, 111 or 50 JSON; 112, 113 or 60 CBOR) resolved at `now_ms`: 0, the items
 * (each with its point's index) and each point's time (pts, *npts of them); -1 for anything the
 * lane leaves to Python. */
static int parse_senml(int cf, const uint8_t *p, const uint8_t *end, long long now_ms, item_t *items, int *nitems,
                       long long *pts, int *npts, char (*names)[LANE_NAME]) {
    int cbor = cf == 112 || cf == 113 || cf == 60;
    if (!cbor && cf != 110 && cf != 111 && cf != 50) return -1;
    uint64_t nrec = 0;
    if (cbor) {
        if (p >= end || (*p >> 5) != 4 || (*p & 0x1f) == 31 || cbor_arg(&p, end, &nrec) < 0 || !nrec ||
            nrec > MAX_ITEMS)
            return -1;
    } else {
        p = json_ws(p, end);
        if (p >= end || *p != '[') return -1;
        p = json_ws(p + 1, end);
    }
    senml_base_t b = {(const uint8_t *)"", NULL, 0, 0, 0.0, 0.0, 0.0};
    int count = 0, points = 0;
    for (uint64_t r = 0; cbor ? r < nrec : 1; r++) {
        if (!cbor && r) { /* the comma between records, or the end */
            p = json_ws(p, end);
            if (p < end && *p == ']') break;
            if (p >= end || *p != ',' || r >= MAX_ITEMS) return -1;
            p = json_ws(p + 1, end);
        }
        uint8_t has[L_COUNT];
        svalue_t val[L_COUNT];
        if (senml_record(cbor, &p, end, has, val) < 0) return -1;
        if (has[L_BN]) b.bn = val[L_BN].text, b.bnlen = val[L_BN].tlen;
        if (has[L_BT]) b.bt = val[L_BT].num;
        if (has[L_BU]) b.bu = val[L_BU].text, b.bulen = val[L_BU].tlen;
        if (has[L_BV]) b.bv = val[L_BV].num;
        if (has[L_BS]) b.bs = val[L_BS].num;
        double t = b.bt + (has[L_T] ? val[L_T].num : 0.0);
        double seconds = t < SENML_RELATIVE_BELOW ? (double)now_ms / 1000 + t : t, ms = seconds * 1000;
        if (!isfinite(ms)) return -1;
        double at = nearbyint(ms); /* (Python's round: half to even, the default rounding mode) */
        if (!(at >= 0 && at <= (double)MAX_TS_MS)) return -1;
        int point = 0; /* the point of its time: one already, or a new one */
        while (point < points && pts[point] != (long long)at) point++;
        if (point == points) {
            if (points == MAX_POINTS) return -1;
            pts[points++] = (long long)at;
        }
        int values = has[L_V] + has[L_VS] + has[L_VB];
        if (values > 1 || (!values && !has[L_S])) return -1;
        const uint8_t *unit = has[L_U] ? val[L_U].text : b.bu;
        size_t ulen = has[L_U] ? val[L_U].tlen : b.bulen;
        if (!ulen) unit = NULL; /* (an empty unit is none) */
        for (int part = 0; part < 2; part++) { /* the value, then the sum */
            if (part == 0 ? !values : !has[L_S]) continue;
            if (count == MAX_ITEMS) return -1;
            item_t *it = &items[count];
            size_t len;
            if (senml_name(&b, has[L_N] ? &val[L_N] : NULL, part ? ".sum" : "", names, items, count, point, &len) < 0)
                return -1;
            it->key = (const uint8_t *)names[count];
            it->klen = len;
            it->is_text = 0;
            if (part) {
                it->num = b.bs + val[L_S].num;
            } else if (has[L_VS]) {
                it->is_text = 1;
                it->text = val[L_VS].text;
                it->tlen = val[L_VS].tlen;
            } else {
                it->num = has[L_VB] ? val[L_VB].num : b.bv + val[L_V].num;
            }
            if (!it->is_text && !isfinite(it->num)) return -1;
            it->unit = (const char *)unit;
            it->ulen = ulen;
            it->point = (uint8_t)point;
            count++;
        }
    }
    if (cbor ? p != end : json_ws(p + 1, end) != end) return -1;
    if (!count) return -1;
    *nitems = count;
    *npts = points;
    return 0;
}

#endif
