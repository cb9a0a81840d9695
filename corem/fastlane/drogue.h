/*
 * Drogue Cloud's door, `POST|PUT /v1/{channel}` (corem/frontdoors/drogue.py), as the lane reads it:
 * the query's `application`, `device` and `data_schema`, and option 4209's credentials decoded and
 * split as corem/identity.py `_drogue` does.  Pure functions on the request's bytes; _lane.c finds
 * the device and writes the record.
 *
 * The lane only takes what it reads exactly as Python does: a query of at most DROGUE_QUERIES items
 * in ASCII without percent-escapes (then `unquote` changes nothing), no `as` (a gateway: Python
 * decides) nor `ct` (the answer waits for a command), no key of the door's twice (Python's dict
 * keeps the last: not worth guessing), and credentials in their canonical form -- `Basic ` (any
 * case) then base64, or base64 alone, padded to a multiple of 4 with no stray bits, decoding to
 * ASCII with a ':'.  Everything else, refusals included, is the Python path's.
 */
#ifndef COREM_FASTLANE_DROGUE_H
#define COREM_FASTLANE_DROGUE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define DROGUE_QUERIES 8        /* query items the lane reads; more: the Python path's */
#define DROGUE_AUTH_MAX 512     /* option 4209's longest value (corem/codec/options.py) */
#define DROGUE_CHANNELS 32      /* channels the lane knows the route of (learned from the Python path) */
#define DROGUE_CHANNEL_MAX 64   /* bytes of a channel it holds */

/* What the door's query says (NULL: not there). */
typedef struct {
    const uint8_t *app, *dev, *schema;
    size_t applen, devlen, schemalen;
} drogue_query_t;

/* Option 4209's credentials, decoded into the caller's buffer: `name@realm:password` (realm NULL
 * when the user has no '@': then the query's `application` names it). */
typedef struct {
    const uint8_t *name, *realm, *password;
    size_t namelen, realmlen, passlen;
} drogue_cred_t;

static inline int drogue_is(const uint8_t *p, size_t n, const char *word) {
    size_t w = strlen(word);
    return n == w && memcmp(p, word, w) == 0;
}

/* The query items (Uri-Query values): 0 and what the door reads, or -1: the Python path's. */
static int drogue_query(const uint8_t *const *items, const size_t *lens, int n, drogue_query_t *q) {
    memset(q, 0, sizeof *q);
    for (int i = 0; i < n; i++) {
        const uint8_t *p = items[i];
        size_t len = lens[i], eq = len;
        for (size_t k = 0; k < len; k++) {
            if (p[k] >= 0x80 || p[k] == '%') return -1; /* (unquote would change it; or not ASCII) */
            if (p[k] == '=' && eq == len) eq = k;
        }
        const uint8_t *value = eq < len ? p + eq + 1 : p + len;
        size_t vlen = eq < len ? len - eq - 1 : 0;
        const uint8_t **slot;
        size_t *slen;
        if (drogue_is(p, eq, "application")) {
            slot = &q->app;
            slen = &q->applen;
        } else if (drogue_is(p, eq, "device")) {
            slot = &q->dev;
            slen = &q->devlen;
        } else if (drogue_is(p, eq, "data_schema")) {
            slot = &q->schema;
            slen = &q->schemalen;
        } else if (drogue_is(p, eq, "as") || drogue_is(p, eq, "ct")) {
            return -1; /* a gateway, or a wait for a command */
        } else {
            continue; /* (the door reads no other key) */
        }
        if (*slot) return -1; /* twice */
        *slot = value;
        *slen = vlen;
    }
    return 0;
}

static inline int b64_digit(uint8_t c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Canonical base64 (padded, no stray bits) into `out` (room for 3/4 of n): its length, or -1. */
static long b64_decode(const uint8_t *p, size_t n, uint8_t *out) {
    if (!n || n % 4) return -1;
    size_t pad = p[n - 1] == '=' ? (p[n - 2] == '=' ? 2 : 1) : 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int last = i + 4 == n;
        int d[4];
        for (int k = 0; k < 4; k++) {
            if (last && k >= 4 - (int)pad) {
                d[k] = 0;
                continue;
            }
            if ((d[k] = b64_digit(p[i + k])) < 0) return -1;
        }
        uint32_t v = (uint32_t)d[0] << 18 | (uint32_t)d[1] << 12 | (uint32_t)d[2] << 6 | (uint32_t)d[3];
        out[o++] = v >> 16;
        if (last && pad == 2) {
            if (v & 0xffff) return -1; /* stray bits */
            break;
        }
        out[o++] = (v >> 8) & 0xff;
        if (last && pad == 1) {
            if (v & 0xff) return -1;
            break;
        }
        out[o++] = v & 0xff;
    }
    return (long)o;
}

/* Option 4209's value: 0 and the credentials (pointing into `buf`, DROGUE_AUTH_MAX bytes), or -1. */
static int drogue_credentials(const uint8_t *v, size_t n, uint8_t *buf, drogue_cred_t *c) {
    static const char basic[] = "basic ";
    if (n > DROGUE_AUTH_MAX) return -1;
    const uint8_t *enc = v;
    size_t elen = n;
    if (n > 6) {
        size_t k = 0;
        while (k < 6 && (v[k] | (k < 5 ? 0x20 : 0)) == (uint8_t)basic[k]) k++;
        if (k == 6) { /* `Basic ` and something: that something is the base64 */
            enc = v + 6;
            elen = n - 6;
        }
    }
    long m = b64_decode(enc, elen, buf);
    if (m < 0) return -1;
    const uint8_t *colon = NULL;
    for (long k = 0; k < m; k++) {
        if (buf[k] >= 0x80) return -1; /* (UTF-8 text the lane does not compare) */
        if (buf[k] == ':' && !colon) colon = buf + k;
    }
    if (!colon) return -1;
    c->password = colon + 1;
    c->passlen = (size_t)(buf + m - c->password);
    size_t ulen = (size_t)(colon - buf);
    const uint8_t *at = NULL;
    for (size_t k = ulen; k-- > 0;)
        if (buf[k] == '@') {
            at = buf + k;
            break;
        }
    c->name = buf;
    if (at) {
        c->namelen = (size_t)(at - buf);
        c->realm = at + 1;
        c->realmlen = (size_t)(colon - at - 1);
    } else {
        c->namelen = ulen;
        c->realm = NULL;
        c->realmlen = 0;
    }
    return 0;
}

#endif
