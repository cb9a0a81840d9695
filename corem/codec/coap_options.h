/*
 * The CoAP option walk (RFC 7252 §3.1), once, for every C reader of CoAP bytes: the decoder
 * (corem/codec/_speedups.c) and the fast lane (corem/fastlane/_lane.c).  Header-only (static
 * inline): each extension is one translation unit.
 *
 * `coap_next_option` reads the option at *pp and says what it found; the decoder turns a refusal
 * into its error text, the lane into "not mine, the Python path explains".  It never reads at or
 * past `end`.  The option number is summed in 64 bits (a datagram of deltas cannot overflow it);
 * whether a number above 65535 is refused, and when, is the caller's rule.
 */
#ifndef COREM_COAP_OPTIONS_H
#define COREM_COAP_OPTIONS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    COAP_OPTION = 0,          /* an option: *number, *value, *vlen are set, *pp is past it */
    COAP_END = 1,             /* the end of the datagram, or *pp is at the payload marker (0xff) */
    COAP_TRUNCATED_HEADER = -1, /* an extended delta or length runs past the end */
    COAP_DELTA_15 = -2,       /* delta nibble 15 in a byte that is not the payload marker */
    COAP_LENGTH_15 = -3,      /* length nibble 15 */
    COAP_TRUNCATED_VALUE = -4, /* the value runs past the end (*number, *vlen say which and how long) */
} coap_option_status;

/* A nibble's extended form (13: one more byte + 13; 14: two more bytes + 269), -1 if truncated. */
static inline int coap_extended(const uint8_t **pp, const uint8_t *end, uint64_t *v) {
    const uint8_t *p = *pp;
    if (*v == 13) {
        if (p >= end) return -1;
        *v = 13 + *p++;
    } else if (*v == 14) {
        if (end - p < 2) return -1;
        *v = 269 + ((uint64_t)p[0] << 8 | p[1]);
        p += 2;
    }
    *pp = p;
    return 0;
}

static inline coap_option_status coap_next_option(const uint8_t **pp, const uint8_t *end, uint64_t *number,
                                                  const uint8_t **value, size_t *vlen) {
    const uint8_t *p = *pp;
    if (p >= end || *p == 0xff) return COAP_END;
    uint64_t delta = *p >> 4, len = *p & 15;
    p++;
    if (delta == 15) return COAP_DELTA_15;
    if (coap_extended(&p, end, &delta) < 0) return COAP_TRUNCATED_HEADER;
    if (len == 15) return COAP_LENGTH_15;
    if (coap_extended(&p, end, &len) < 0) return COAP_TRUNCATED_HEADER;
    *number += delta;
    *vlen = (size_t)len;
    if ((uint64_t)(end - p) < len) {
        *pp = p;
        return COAP_TRUNCATED_VALUE;
    }
    *value = p;
    *pp = p + len;
    return COAP_OPTION;
}

#endif
