/*
 * The fast lane's Cayenne LPP reader: [channel, type, value...]* into items named `{type}_{channel}`
 * (and `.x`, `.latitude`, ... for multi-axis types) with their units, as corem/profiles/formats.py's
 * `cayenne_lpp` (the Python twin, whose table LPP_TYPES this one must equal: tests compare them) does.
 * Header-only, for _lane.c, after cbor_json.h (item_t, put_u64).
 */
#ifndef COREM_LPP_H
#define COREM_LPP_H

typedef struct {
    uint8_t code;
    const char *name;
    uint8_t size, is_signed;
    double divisor;
    const char *unit;
    uint8_t naxes;
    const char *axes[3];
} lpp_type_t;

static const lpp_type_t LPP[] = {
    {0, "digital_in", 1, 0, 1, NULL, 0, {0}},        {1, "digital_out", 1, 0, 1, NULL, 0, {0}},
    {2, "analog_in", 2, 1, 100, NULL, 0, {0}},        {3, "analog_out", 2, 1, 100, NULL, 0, {0}},
    {100, "generic", 4, 0, 1, NULL, 0, {0}},          {101, "illuminance", 2, 0, 1, "lx", 0, {0}},
    {102, "presence", 1, 0, 1, NULL, 0, {0}},         {103, "temperature", 2, 1, 10, "Cel", 0, {0}},
    {104, "humidity", 1, 0, 2, "%RH", 0, {0}},        {113, "accelerometer", 6, 1, 1000, "g", 3, {"x", "y", "z"}},
    {115, "barometer", 2, 0, 10, "hPa", 0, {0}},      {116, "voltage", 2, 0, 100, "V", 0, {0}},
    {117, "current", 2, 0, 1000, "A", 0, {0}},        {118, "frequency", 4, 0, 1, "Hz", 0, {0}},
    {120, "percentage", 1, 0, 1, "%", 0, {0}},        {121, "altitude", 2, 1, 1, "m", 0, {0}},
    {125, "concentration", 2, 0, 1, "ppm", 0, {0}},   {128, "power", 2, 0, 1, "W", 0, {0}},
    {130, "distance", 4, 0, 1000, "m", 0, {0}},       {131, "energy", 4, 0, 1000, "kWh", 0, {0}},
    {132, "direction", 2, 0, 1, "deg", 0, {0}},       {133, "unixtime", 4, 0, 1, "s", 0, {0}},
    {134, "gyrometer", 6, 1, 100, "deg/s", 3, {"x", "y", "z"}},
    {135, "colour", 3, 0, 1, NULL, 3, {"r", "g", "b"}},
    {136, "gps", 9, 1, 1, NULL, 3, {"latitude", "longitude", "altitude"}},
    {142, "switch", 1, 0, 1, NULL, 0, {0}},
};
/* GPS: three 3-byte signed values, each with its own divisor and unit */
static const double GPS_DIV[3] = {10000, 10000, 100};
static const char *const GPS_UNIT[3] = {"lat", "lon", "m"};

static const lpp_type_t *lpp_type(uint8_t code) {
    for (size_t i = 0; i < sizeof LPP / sizeof LPP[0]; i++)
        if (LPP[i].code == code) return &LPP[i];
    return NULL;
}

static double lpp_int(const uint8_t *b, int n, int is_signed) {
    int64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | b[i];
    if (is_signed && n < 8 && (b[0] & 0x80)) v -= (int64_t)1 << (8 * n);
    return (double)v; /* (at most 4 bytes: exact) */
}

/* The LPP payload as items, names written into `names` (room for MAX_ITEMS names): 0, or -1 for
 * anything Python's twin refuses (an unknown type, a short value, a channel and type twice) or
 * more readings than MAX_ITEMS. */
static int parse_lpp(const uint8_t *p, const uint8_t *end, item_t *items, int *nitems, char (*names)[LANE_NAME]) {
    int count = 0;
    uint16_t seen[MAX_ITEMS]; /* channel << 8 | type */
    int nseen = 0;
    if (p >= end) return -1;
    while (p < end) {
        if (end - p < 2) return -1;
        uint8_t channel = p[0], code = p[1];
        const lpp_type_t *t = lpp_type(code);
        if (!t || end - p - 2 < t->size) return -1;
        for (int i = 0; i < nseen; i++)
            if (seen[i] == (uint16_t)(channel << 8 | code)) return -1;
        if (nseen == MAX_ITEMS) return -1;
        seen[nseen++] = (uint16_t)(channel << 8 | code);
        const uint8_t *body = p + 2;
        int fields = t->naxes ? t->naxes : 1;
        if (count + fields > MAX_ITEMS) return -1;
        for (int a = 0; a < fields; a++) {
            item_t *it = &items[count];
            char *name = names[count], *o = name; /* "{type}_{channel}[.{axis}]": < 40 bytes by the table */
            size_t n = strlen(t->name);
            memcpy(o, t->name, n);
            o += n;
            *o++ = '_';
            o = put_u64(o, channel);
            if (t->naxes) {
                *o++ = '.';
                n = strlen(t->axes[a]);
                memcpy(o, t->axes[a], n);
                o += n;
            }
            it->key = (const uint8_t *)name;
            it->klen = (size_t)(o - name);
            it->is_text = 0;
            if (code == 136) {
                it->num = lpp_int(body + 3 * a, 3, 1) / GPS_DIV[a];
                it->unit = GPS_UNIT[a];
                it->ulen = strlen(it->unit);
            } else {
                int step = t->size / fields;
                it->num = lpp_int(body + step * a, step, t->is_signed) / t->divisor;
                it->unit = t->unit;
                it->ulen = t->unit ? strlen(t->unit) : 0;
            }
            count++;
        }
        p += 2 + t->size;
    }
    *nitems = count;
    return 0;
}

#endif
