/* CoAP request template shared by the load generators: one CON request, Uri-Path segments,
 * Content-Format and payload; the message id is patched into bytes 2-3 per request. */
#ifndef COREM_COAP_TEMPLATE_H
#define COREM_COAP_TEMPLATE_H
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint8_t tmpl[1500];
static size_t tmpl_len;

static size_t put_option(uint8_t *out, int delta, const uint8_t *val, size_t len) {
    size_t i = 0;
    uint8_t d = delta < 13 ? delta : 13, l = len < 13 ? len : (len < 269 ? 13 : 14);
    out[i++] = (d << 4) | l;
    if (d == 13) out[i++] = delta - 13;
    if (l == 13) out[i++] = len - 13;
    if (l == 14) { out[i++] = (len - 269) >> 8; out[i++] = (len - 269) & 0xff; }
    memcpy(out + i, val, len);
    return i + len;
}

static void build_template(int method, const char *path, const char *hex, int cf) {
    size_t i = 0;
    tmpl[i++] = 0x40; /* ver 1, CON, TKL 0 */
    tmpl[i++] = method;
    tmpl[i++] = 0;
    tmpl[i++] = 0;
    int last = 0;
    char buf[1024];
    strncpy(buf, path, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    for (char *seg = strtok(buf, "/"); seg; seg = strtok(NULL, "/")) {
        i += put_option(tmpl + i, 11 - last, (uint8_t *)seg, strlen(seg));
        last = 11;
    }
    if (cf >= 0) {
        uint8_t v = cf;
        i += put_option(tmpl + i, 12 - last, &v, cf ? 1 : 0);
    }
    size_t hl = strlen(hex);
    if (hl) {
        tmpl[i++] = 0xff;
        for (size_t k = 0; k + 1 < hl; k += 2) {
            unsigned b;
            sscanf(hex + k, "%2x", &b);
            tmpl[i++] = b;
        }
    }
    tmpl_len = i;
}

#endif
