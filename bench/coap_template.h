/* CoAP request template shared by the load generators: one CON request, Uri-Path segments,
 * Content-Format, Uri-Query items, one more option and payload; the message id is patched into bytes 2-3 per request. */
#ifndef COREM_COAP_TEMPLATE_H
#define COREM_COAP_TEMPLATE_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t tmpl[1500];
static size_t tmpl_len;

static size_t put_option(uint8_t *out, int delta, const uint8_t *val, size_t len) {
    size_t i = 0;
    uint8_t d = delta < 13 ? delta : (delta < 269 ? 13 : 14), l = len < 13 ? len : (len < 269 ? 13 : 14);
    out[i++] = (d << 4) | l;
    if (d == 13) out[i++] = delta - 13;
    if (d == 14) { out[i++] = (delta - 269) >> 8; out[i++] = (delta - 269) & 0xff; }
    if (l == 13) out[i++] = len - 13;
    if (l == 14) { out[i++] = (len - 269) >> 8; out[i++] = (len - 269) & 0xff; }
    memcpy(out + i, val, len);
    return i + len;
}

/* `each` separated by `sep` in `text` (modified), as options numbered `number` after `*last` */
static size_t put_each(uint8_t *out, char *text, const char *sep, int number, int *last) {
    size_t i = 0;
    for (char *v = strtok(text, sep); v; v = strtok(NULL, sep)) {
        i += put_option(out + i, number - *last, (uint8_t *)v, strlen(v));
        *last = number;
    }
    return i;
}

/* PATH is `seg/seg[?key=value&...][#NUMBER=value]`: Uri-Path segments, Uri-Query items, and one
 * more option above 15 (e.g. `#4209=Basic ...`, Drogue's credentials). */
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
    char *extra = strchr(buf, '#'), *query;
    if (extra) *extra++ = 0;
    query = strchr(buf, '?');
    if (query) *query++ = 0;
    i += put_each(tmpl + i, buf, "/", 11, &last);
    if (cf >= 0) {
        uint8_t v = cf;
        i += put_option(tmpl + i, 12 - last, &v, cf ? 1 : 0);
        last = 12;
    }
    if (query) i += put_each(tmpl + i, query, "&", 15, &last);
    if (extra && strchr(extra, '=')) {
        char *value = strchr(extra, '=');
        *value++ = 0;
        int number = atoi(extra);
        i += put_option(tmpl + i, number - last, (uint8_t *)value, strlen(value));
        last = number;
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
