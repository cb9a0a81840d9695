/*
 * corem.fastlane._lane: the common telemetry request in C, from the datagram to the sink record.
 *
 * The Python path (UdpEdge -> Endpoint -> Router -> TelemetryIngest) costs ~20 µs per reading;
 * most of a one-core budget of ~9 µs at 0.6x libcoap's rate.  This lane reads datagrams with
 * recvmmsg, and for the one request shape that is nearly all of a fleet's traffic -- a CON or NON
 * `POST /api/v1/{token}/telemetry`, a flat CBOR map (60) or JSON object (50), a known token -- it does
 * the message layer's and the ingest's work itself: rate limit, deduplication, the TelemetryPoint's
 * JSON and the sink Record.  The 2.04 goes out (sendmmsg) only when the sink says the record is
 * durable (`committed`), as on the Python path (to a NON, a NON 2.04 of a message id the endpoint
 * gives: `next_mid`).  Behind corem's own DTLS engine it reads the socket
 * too and opens and seals the records of established sessions itself (`drain_records`,
 * `send_records`: see "CoAPS records" below), where `POST /telemetry` names its device by the
 * session; behind python-mbedtls the edge hands it the decrypted messages instead (`receive_plain`)
 * and encrypts what it answers.
 *
 * It only ever ACCEPTS.  Every datagram it is not sure about -- other paths, methods, options,
 * malformed messages, CBOR that is invalid or merely unusual (tags, indefinite
 * lengths, big integers, null, duplicate keys) -- is handed back untouched to the Python path,
 * which stays the one place that rejects and explains.  So a reading the lane accepts is exactly
 * a reading the Python path would have accepted (tests compare the two on generated input).
 *
 * State, all bounded: a FIFO hash map of exchanges for deduplication (EXCHANGE_LIFETIME,
 * dedup_max entries, the same rules as corem/coap/endpoint.py: a duplicate CON gets the cached
 * answer if it is not smaller than the original; message IDs are scoped to a peer's DTLS
 * session), a FIFO hash map of token buckets for the per-source rate limit (corem/net/limits.py's
 * rules), one of when each peer's DTLS session began, the exchanges waiting for the sink, and the
 * outbox.  Per accepted reading it makes only the record, its JSON value, its headers (the
 * device's, copied, and the exchange's `coap-exchange` text: corem/bus/recovery.py reads it back
 * after a crash), the token's bytes for the lookup and the small int the sink hands back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "../codec/coap_options.h"
#include "../net/udp_batch.h"

#define KEYLEN 24   /* addr (16, IPv4 mapped) | scope id (4) | port (2) | message id (2) */
#define REPLY_MAX 64 /* a sealed OSCORE 5.03: 4 + 8 + 2 + 33 + 8 */
#define MAX_ITEMS 64 /* readings per map the lane decodes; more go to the Python path */

/* corem_request_duration_seconds for the readings the lane answers: from the receipt of the batch
 * they came in to the answer queued, on CLOCK_MONOTONIC; corem/latency.py's BOUNDS (a test holds
 * them equal) and a last bucket for +Inf, per door: 0 /api/v1/..., 1 /telemetry (LANE_DOORS), 2 Drogue's
 * /v1/{channel}. */
static const double LAT_BOUNDS[] = {0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015,
                                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
#define LAT_N (sizeof LAT_BOUNDS / sizeof LAT_BOUNDS[0] + 1)
#define LAT_DOORS 3

#include "cbor_json.h"
#include "lpp.h"
#include "rules.h"
#include "layouts.h"
#include "senml.h"
#include "pycodec.h"
#include "proto.h"
#include "drogue.h"
#include "fifomap.h"
/* the records of corem's DTLS engine, opened and sealed through _records' capsule (no libcrypto here) */
#define DTLS_RECORDS_API_ONLY
#include "../dtls/engine/dtls_records.h"
#include "../dtls/engine/client_hello.h"
#include "dtls_sessions.h"
#include "oscore.h"

/* ---------------------------------------------------------------- profiles ----------------- */
/* A profile's C form, shared by its devices' targets: its field rules and its layout */
#define PROFILE_CAPSULE "corem.fastlane.profile"

typedef struct {
    rules_t rules;
    layout_t layout;
    PyObject *source; /* the tuples the strings live in */
    PyObject *decode; /* MODE_PYTHON, MODE_PROTOBUF: the profile's Python decoder (pycodec.h), or NULL */
    PyObject *handed; /* called with what `decode` gave a reading the lane hands to the Python path, or NULL */
    int nested;       /* ThingsBoard's `nested`: 0 reject (Python's), 1 flatten (their leaves), 2 json (their text) */
    pb_plan_t proto;  /* MODE_PROTOBUF: the schema's messages (proto.h) */
} lane_profile_t;

static void profile_free(PyObject *capsule) {
    lane_profile_t *P = PyCapsule_GetPointer(capsule, PROFILE_CAPSULE);
    if (!P) return;
    rules_free(&P->rules);
    layout_free(&P->layout);
    pb_free(&P->proto);
    Py_XDECREF(P->source);
    Py_XDECREF(P->decode);
    Py_XDECREF(P->handed);
    PyMem_Free(P);
}

/* compile_profile(rules, positions, layout, decode=None, nested=0, proto=None, handed=None): see rules.h
 * `rules_from`, layouts.h `layout_from`; `decode`, the Python decoder a MODE_PYTHON target's
 * readings go through, and a MODE_PROTOBUF target's that proto.h does not read (pycodec.h; it must
 * not refer to the capsule: a capsule is not followed by the GC); `nested`, a ThingsBoard or protobuf profile's: 1 flatten, 2 json (cbor_json.h flat_t),
 * 0 reject; `proto`, a MODE_PROTOBUF profile's schema (proto.h `pb_from`); `handed(payload, cf, now_ms,
 * outcome)`, told what `decode` gave (its list, or the exception it raised) for a reading the lane
 * then hands to the Python path, which takes that instead of decoding again (pycodec.h; as `decode`,
 * it must not refer to the capsule). */
static PyObject *compile_profile(PyObject *module, PyObject *args) {
    PyObject *rules, *positions, *layout, *decode = Py_None, *proto = Py_None, *handed = Py_None;
    int nested = 0;
    if (!PyArg_ParseTuple(args, "O!O!O!|OiOO", &PyTuple_Type, &rules, &PyTuple_Type, &positions, &PyTuple_Type, &layout,
                          &decode, &nested, &proto, &handed))
        return NULL;
    if (handed != Py_None && !PyCallable_Check(handed)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: handed is callable or None");
        return NULL;
    }
    if (proto != Py_None && !PyTuple_Check(proto)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: proto is protobuf.py lane_proto's tuple or None");
        return NULL;
    }
    if (nested < 0 || nested > 2) {
        PyErr_SetString(PyExc_ValueError, "compile_profile: nested is 0 (reject), 1 (flatten) or 2 (json)");
        return NULL;
    }
    if (decode != Py_None && !PyCallable_Check(decode)) {
        PyErr_SetString(PyExc_TypeError, "compile_profile: decode is callable or None");
        return NULL;
    }
    lane_profile_t *P = PyMem_Calloc(1, sizeof(lane_profile_t));
    if (!P) return PyErr_NoMemory();
    P->source = Py_BuildValue("(OOOO)", rules, positions, layout, proto);
    PyObject *capsule = P->source ? PyCapsule_New(P, PROFILE_CAPSULE, profile_free) : NULL;
    if (!capsule) {
        Py_XDECREF(P->source);
        PyMem_Free(P);
        return NULL;
    }
    if (decode != Py_None) {
        Py_INCREF(decode);
        P->decode = decode;
    }
    if (handed != Py_None) {
        Py_INCREF(handed);
        P->handed = handed;
    }
    P->nested = nested;
    if (rules_from(rules, &P->rules) < 0 || layout_from(positions, layout, &P->layout) < 0 ||
        pb_from(proto, &P->proto) < 0) {
        Py_DECREF(capsule);
        return NULL;
    }
    return capsule;
}

/* ---------------------------------------------------------------- state -------------------- */
typedef struct {
    uint8_t key[KEYLEN];
    double at;
    uint32_t size;      /* bytes the request took: a smaller "duplicate" gets nothing */
    uint8_t python;     /* the Python path's exchange: its duplicates go there too */
    uint8_t recovered;  /* read back from the bus at start (`remember`): a CON duplicate gets 2.04 --
                         * RECOVERED_ANY: whatever its token (the bus record did not name it);
                         * RECOVERED_TOKEN: only with its token, `tkl` bytes kept in `reply` */
    uint8_t tkl;
    uint8_t reply_len;  /* 0: no answer yet (a duplicate gets nothing) */
    uint8_t reply[REPLY_MAX];
} exchange_t;
enum { RECOVERED_ANY = 1, RECOVERED_TOKEN = 2 };

typedef struct {
    uint8_t key[KEYLEN];
    double tokens, last;
} bucket_t;

typedef struct {
    uint8_t key[KEYLEN]; /* the peer: address and port */
    double began;
} session_t;

typedef struct {
    uint8_t key[KEYLEN]; /* where a DTLS session with a Connection ID moved to: address and port */
    addr_t old;          /* where it was before */
    double at;
} moved_t;

enum { P_FREE, P_PENDING, P_SEPARATE };

typedef struct {
    addr_t addr;
    socklen_t alen;
    uint8_t key[KEYLEN];
    size_t slot; /* of its exchange in the dedup ring (gone if the key there is another) */
    double at;
    uint32_t size, gen;
    uint16_t mid;
    uint8_t tkl, state, non; /* non: a NON request, answered by a NON response of a new message id */
    uint8_t failed;          /* a point's commit failed: the answer is 5.03 */
    uint16_t points, left;   /* its records, and those whose commit is not known yet */
    uint8_t token[8];
    double rx;    /* its batch's receipt, CLOCK_MONOTONIC (the latency histogram) */
    uint8_t door; /* of the histogram: 0 /api/v1/..., 1 /telemetry, 2 Drogue's /v1/{channel} */
    PyObject *device; /* for accounting once committed */
    PyObject *peer;   /* the peer as Python gave it (CoAPS), or NULL (plain: the lane read it) */
    uint32_t ds_entry, ds_version; /* its DTLS session's entry + 1 as of that table version (0: none) */
    OscContext *osc;  /* an OSCORE request's context (its answer is sealed), or NULL */
    uint8_t nonce[OSC_NONCE], aad[OSC_AAD_MAX], aadlen; /* (the request's: its first answer uses them) */
    int32_t next_free;
} pending_t;

typedef struct {
    addr_t addr;
    socklen_t alen;
    PyObject *peer; /* as for pending_t: saves making the tuple again for the DTLS edge */
    uint32_t ds_entry, ds_version; /* as for pending_t: its session without a lookup (0: looked up) */
    uint8_t len;
    uint8_t data[REPLY_MAX];
} out_t;

typedef struct {
    PyObject *topic, *key, *headers, *head, *tail, *device;
    PyObject *profile; /* its profile's C form (compile_profile's capsule: rules, layout), or NULL */
    PyObject *tenant;  /* its tenant's name as bytes, or NULL (Drogue's credentials name it) */
    PyObject *hpacked; /* `headers` in msgpack (its entries, no map header: packed records), or NULL */
    Py_ssize_t hcount; /* ... and how many entries */
    uint64_t epoch; /* the drain that last told Python this device talked */
    int mode;       /* its payloads' shape: MODE_FLAT (the default profile), MODE_THINGSBOARD */
} target_t;

typedef struct {
    PyObject_HEAD
    /* settings */
    Py_ssize_t max_datagram;
    /* a point of more readings is the Python path's, which refuses it 4.00 naming the bound
     * (TelemetryIngest.max_readings, the setting max_readings_per_point): the lane answers as it does */
    int max_readings;
    double piggyback, lifetime, rate, burst;
    int limit_error_size; /* plain UDP: an error answer is never larger than its request */
    PyTypeObject *record_type;
    PyTypeObject *packed_type; /* records in the embedded bus's stored form (PackedRecord), or NULL */
    /* tables */
    fifomap dedup, buckets;
    fifomap sessions; /* peer -> when its DTLS session began (made on the first new_session) */
    fifomap moved;    /* peer -> the address its CID session moved from (made on the first `moved`) */
    int limit;
    PyObject *tokens; /* dict: token bytes -> index into targets */
    PyObject *known;  /* known(token bytes) -> bool, for a token not in `tokens` (or NULL/None) */
    uint8_t (*exempt)[17]; /* networks never rate-limited: 16 address bytes (IPv4 mapped) + prefix length */
    Py_ssize_t nexempt;
    target_t *targets;
    Py_ssize_t ntargets;
    pending_t *pending;
    int32_t npending_cap, free_head, live;
    uint64_t *fifo; /* (handle << 32 | gen) of CON exchanges in arrival order (piggyback timer) */
    size_t fifo_cap, fifo_head, fifo_count;
    out_t *out;
    size_t out_len, out_cap;
    /* what a drain produced, taken by Python */
    PyObject *slow, *records, *ctxs, *touched, *on_late;
    /* points committed per device since take_committed, by the device object's address (a
     * device held: a reference each); a dict keyed by the device hashed its msgspec Struct,
     * every field, twice a reading */
    struct {
        PyObject *device;
        long long points;
    } *committed;
    size_t committed_cap, committed_len;
    PyObject *next_mid; /* next_mid() -> the message id of a response of ours (the endpoint's) */
    /* CoAPS on corem's engine (drain_records): the established sessions the lane opens and seals
     * records for, what it decrypted but did not take ((message, peer): for the endpoint), the
     * sessions it took records of in this batch (their owners), and the records sealed, waiting
     * for the socket */
    dsessions ds;
    PyObject *positions; /* (tenant, device) -> target index, for the sessions' devices */
    uint64_t targets_gen;
    PyObject *plain, *dtouched;
    uint64_t depoch;
    uint32_t drains; /* drain_records calls (the look-ahead's counts are of one: dsess_t.ahead_in) */
    double newest_began; /* the latest `began` new_session gave (from_old_session's shortcut) */
    uint32_t taking_entry, taking_version; /* the entry + 1 of the session whose record classify takes
                                            * now (0: none), as of that version of the table */
    unsigned long long rec_datagrams, rec_bytes; /* records opened since the last take_records */
    unsigned long long rec_hellos, rec_hello_bytes; /* ... and HelloVerifyRequests sent, their bytes */
    uint8_t *plainbuf;
    wire_t *wire;
    size_t wire_len, wire_cap;
    /* corem's DTLS engine's cookie secret (cookie_secret): a new peer's cookie-less hello answered
     * here (lane_hello_verify); none (0 bytes): Python's */
    uint8_t cookie_secret[64];
    size_t cookie_secret_len;
    unsigned long long hello_verify, hello_verify_bytes;
    char scope[8]; /* the transport in each record's exchange header: "udp", or "dtls" */
    /* OSCORE (oscore.h): the contexts corem/oscore gave the lane, by key (osc_key), and the
     * buffer an opened request's inner message is read from */
    PyObject *oscs;
    uint8_t *innerbuf;
    /* the token path (corem/token_path.py): its prefix's segments (api, v1) and the resource
     * (telemetry), given at init: `{prefix}/{token}/{resource}`, or `{prefix}/{resource}` and
     * `{resource}` in a session */
    uint8_t path[3][16];
    size_t pathlen[3];
    int nprefix;
    /* Drogue's door, /v1/{channel}: the channels whose route the Python path showed it serves
     * (`drogue`), with the text each record's `channel` header holds */
    struct {
        uint8_t len;
        uint8_t name[DROGUE_CHANNEL_MAX];
        PyObject *text;
    } channels[DROGUE_CHANNELS];
    int nchannels;
    PyObject *ctime;   /* the `creation-time` header's text for ctime_ms (a drain's records share it) */
    long long ctime_ms;
    uint64_t epoch;
    /* buffers */
    uint8_t *rxbuf;
    char *json;
    size_t json_cap;
    char *nested; /* nested values' JSON text (`nested: json`), for the request being read */
    size_t nested_cap;
    /* counters */
    unsigned long long datagrams_in, bytes_in, requests, duplicates, oversized, dropped, evicted,
        dedup_evictions, datagrams_out, bytes_out, send_blocked, send_errors, refusals, accepted, exempted,
        recovered, recovered_answers, records_opened, records_sealed, records_to_python, oscore_requests,
        oscore_sealed, python_decoded; /* (python_decoded: readings a profile's Python decoder read, from the batch) */
    unsigned long long responses[256];
    /* the latency histogram: counts per door and bucket, their sums; the receipt of the batch
     * being read (rx_at, CLOCK_MONOTONIC) and the `now` it came with (rx_for) */
    unsigned long long lat[LAT_DOORS][LAT_N];
    double lat_sum[LAT_DOORS], rx_for, rx_at;
} Lane;

/* A Lane before __init__ ran (Lane.__new__(Lane)) has no tables or buffers: its methods refuse it
 * (0, with an exception set) rather than read them.  record_type is set last in Lane_init. */
static inline int lane_ready(Lane *self) {
    if (self->record_type) return 1;
    PyErr_SetString(PyExc_RuntimeError, "Lane: not initialised");
    return 0;
}

/* ---------------------------------------------------------------- addresses ---------------- */
static void addr_key(const addr_t *a, uint16_t mid, int with_port, uint8_t *key) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && KEYLEN == 24
    /* The same bytes as below, written as three words: every lookup reads its key a word at a
     * time (the hashes, the compares), and a word read back from byte stores is a store-forwarding
     * stall -- 75% of the session lookup's hash time went to its first load. */
    uint64_t w0, w1, w2;
    uint32_t tail = 0; /* (IPv6: the scope) */
    uint16_t port = 0;
    if (a->sa.sa_family == AF_INET) {
        uint32_t ip;
        memcpy(&ip, &a->v4.sin_addr, 4);
        w0 = 0;
        w1 = 0xffff0000ULL | (uint64_t)ip << 32;
        if (with_port) memcpy(&port, &a->v4.sin_port, 2);
    } else {
        memcpy(&w0, (const uint8_t *)&a->v6.sin6_addr, 8);
        memcpy(&w1, (const uint8_t *)&a->v6.sin6_addr + 8, 8);
        memcpy(&tail, &a->v6.sin6_scope_id, 4);
        if (with_port) memcpy(&port, &a->v6.sin6_port, 2);
    }
    w2 = tail | (uint64_t)port << 32 | (with_port ? (uint64_t)(mid >> 8) << 48 | (uint64_t)(mid & 0xff) << 56 : 0);
    /* (one store a word, from registers: no array between, which the compiler copies as a wider load) */
    memcpy(key, &w0, 8);
    memcpy(key + 8, &w1, 8);
    memcpy(key + 16, &w2, 8);
#else
    memset(key, 0, KEYLEN);
    if (a->sa.sa_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &a->v4.sin_addr, 4);
        if (with_port) memcpy(key + 20, &a->v4.sin_port, 2);
    } else {
        memcpy(key, &a->v6.sin6_addr, 16);
        memcpy(key + 16, &a->v6.sin6_scope_id, 4);
        if (with_port) memcpy(key + 20, &a->v6.sin6_port, 2);
    }
    if (with_port) {
        key[22] = mid >> 8;
        key[23] = mid & 0xff;
    }
#endif
}

/* ---------------------------------------------------------------- output ------------------- */
/* An answer queued; `ds_entry`/`ds_version`: the DTLS session it is sealed with, as out_t keeps
 * it (0: plain, or looked up by address when it is sent). */
static int queue_out(Lane *self, const addr_t *a, socklen_t alen, PyObject *peer, const uint8_t *data,
                     size_t len, int code, uint32_t ds_entry, uint32_t ds_version) {
    if (self->out_len == self->out_cap) {
        size_t cap = self->out_cap ? self->out_cap * 2 : 256;
        out_t *o = PyMem_Realloc(self->out, cap * sizeof(out_t));
        if (!o) {
            PyErr_NoMemory();
            return -1;
        }
        self->out = o;
        self->out_cap = cap;
    }
    out_t *o = &self->out[self->out_len++];
    o->addr = *a;
    o->alen = alen;
    Py_XINCREF(peer);
    o->peer = peer;
    o->ds_entry = ds_entry;
    o->ds_version = ds_version;
    o->len = (uint8_t)len;
    memcpy(o->data, data, len);
    self->responses[code & 0xff]++;
    return 0;
}

/* `order`: the items' order in the point, `uorder` (nu of them) the units' (rules.h), or NULL: as
 * they came, and the units of those that have one. */
static inline lane_profile_t *profile_of(const target_t *t) {
    return (lane_profile_t *)PyCapsule_GetPointer(t->profile, PROFILE_CAPSULE);
}

/* The point's JSON, written in self->json: its end, or NULL with an exception set. */
static char *point_json(Lane *self, target_t *t, item_t *items, int n, long long ts, long long now_ms,
                        const uint8_t *order, const uint8_t *uorder, int nu) {
    /* The bytes it may take, counted from what it writes (not from the payload: a flattened name
     * repeats its outer key, a SenML base unit is written for each reading, a Python decoder's
     * output has no bound in the payload): a string at most 6 bytes a byte (\u00XX) and its
     * quotes, a number at most 32, the punctuation between. */
    size_t need = PyBytes_GET_SIZE(t->head) + PyBytes_GET_SIZE(t->tail) + 160;
    for (int i = 0; i < n; i++) {
        const item_t *it = &items[i];
        need += 2 * (2 + 6 * it->klen) + 8 + (it->is_text ? 2 + 6 * it->tlen : 32);
        if (it->unit) need += 2 + 6 * it->ulen;
    }
    if (need > self->json_cap) {
        char *j = PyMem_Realloc(self->json, need);
        if (!j) {
            PyErr_NoMemory();
            return NULL;
        }
        self->json = j;
        self->json_cap = need;
    }
    char *o = self->json;
    memcpy(o, PyBytes_AS_STRING(t->head), PyBytes_GET_SIZE(t->head));
    o += PyBytes_GET_SIZE(t->head);
    o = put_u64(o, (unsigned long long)(ts >= 0 ? ts : now_ms));
    static const char nv[] = ",\"numeric_values\":{", sv[] = "},\"string_values\":{",
                      pr[] = "},\"protocol\":\"coap\",\"received_at\":";
    memcpy(o, nv, sizeof nv - 1);
    o += sizeof nv - 1;
    int first = 1;
    for (int k = 0; k < n; k++) {
        int i = order ? order[k] : k;
        if (items[i].is_text) continue;
        if (!first) *o++ = ',';
        first = 0;
        o = put_string(o, items[i].key, items[i].klen);
        *o++ = ':';
        o = put_double(o, items[i].num);
        if (!o) return NULL;
    }
    memcpy(o, sv, sizeof sv - 1);
    o += sizeof sv - 1;
    first = 1;
    for (int k = 0; k < n; k++) {
        int i = order ? order[k] : k;
        if (!items[i].is_text) continue;
        if (!first) *o++ = ',';
        first = 0;
        o = put_string(o, items[i].key, items[i].klen);
        *o++ = ':';
        o = put_string(o, items[i].text, items[i].tlen);
    }
    memcpy(o, pr, sizeof pr - 1);
    o += sizeof pr - 1;
    o = put_u64(o, (unsigned long long)now_ms);
    memcpy(o, PyBytes_AS_STRING(t->tail), PyBytes_GET_SIZE(t->tail));
    o += PyBytes_GET_SIZE(t->tail);
    first = 1;
    for (int k = 0; k < (uorder ? nu : n); k++) { /* "units" after the tail's "profile" (the Struct's order) */
        int i = uorder ? uorder[k] : k;
        if (!items[i].unit) continue;
        if (first) {
            static const char un[] = ",\"units\":{";
            o--; /* (the tail's closing brace) */
            memcpy(o, un, sizeof un - 1);
            o += sizeof un - 1;
        } else {
            *o++ = ',';
        }
        first = 0;
        o = put_string(o, items[i].key, items[i].klen);
        *o++ = ':';
        o = put_string(o, (const uint8_t *)items[i].unit, items[i].ulen);
    }
    if (!first) {
        *o++ = '}';
        *o++ = '}';
    }
    return o;
}

/* ---------------------------------------------------------------- one datagram ------------- */
/* The exchange of a waiting request, unless it was forgotten meanwhile (bound or lifetime). */
static exchange_t *exchange_of(Lane *self, pending_t *q) {
    exchange_t *x = fm_entry(&self->dedup, q->slot);
    return x->at == q->at && memcmp(x->key, q->key, KEYLEN) == 0 ? x : NULL;
}

static int pending_new(Lane *self) {
    if (self->free_head < 0) {
        int32_t cap = self->npending_cap ? self->npending_cap * 2 : 1024;
        pending_t *p = PyMem_Realloc(self->pending, (size_t)cap * sizeof(pending_t));
        if (!p) return -1;
        for (int32_t i = self->npending_cap; i < cap; i++) {
            p[i].state = P_FREE;
            p[i].gen = 0;
            p[i].device = NULL;
            p[i].peer = NULL;
            p[i].osc = NULL;
            p[i].slot = 0;
            p[i].at = -1.0; /* (no exchange is its: exchange_of finds none until take_reading set it) */
            p[i].next_free = i + 1 < cap ? i + 1 : -1;
        }
        self->pending = p;
        self->free_head = self->npending_cap;
        self->npending_cap = cap;
    }
    int32_t h = self->free_head;
    self->free_head = self->pending[h].next_free;
    self->pending[h].gen++;
    self->live++;
    return h;
}

static void pending_free(Lane *self, int32_t h) {
    pending_t *p = &self->pending[h];
    Py_CLEAR(p->device);
    Py_CLEAR(p->peer);
    Py_CLEAR(p->osc);
    p->state = P_FREE;
    p->next_free = self->free_head;
    self->free_head = h;
    self->live--;
}

static int fifo_push(Lane *self, uint64_t v) {
    if (self->fifo_count == self->fifo_cap) {
        size_t cap = self->fifo_cap ? self->fifo_cap * 2 : 1024;
        uint64_t *f = PyMem_Malloc(cap * sizeof(uint64_t));
        if (!f) return -1;
        for (size_t i = 0; i < self->fifo_count; i++) f[i] = self->fifo[(self->fifo_head + i) % self->fifo_cap];
        PyMem_Free(self->fifo);
        self->fifo = f;
        self->fifo_cap = cap;
        self->fifo_head = 0;
    }
    self->fifo[(self->fifo_head + self->fifo_count++) % self->fifo_cap] = v;
    return 0;
}

static int rate_allow(Lane *self, const addr_t *a, double now) {
    uint8_t key[KEYLEN];
    addr_key(a, 0, 0, key);
    long slot = fm_find(&self->buckets, key);
    bucket_t *b;
    double tokens;
    if (slot < 0) {
        int evicted;
        b = fm_entry(&self->buckets, fm_push(&self->buckets, key, &evicted));
        self->evicted += evicted;
        tokens = self->burst;
    } else {
        b = fm_entry(&self->buckets, slot);
        tokens = b->tokens + (now - b->last) * self->rate;
        if (tokens > self->burst) tokens = self->burst;
    }
    b->last = now;
    if (tokens < 1.0) {
        b->tokens = tokens;
        return 0;
    }
    b->tokens = tokens - 1.0;
    return 1;
}

/* Remembers `key` at the end of the map (`reuse` >= 0: the slot of the key's exchange it replaces --
 * from the peer's previous DTLS session, or recovered under another token -- taken out first, so
 * the key is never there twice and the new exchange is the newest, as the endpoint moves it: in
 * that old place it would expire and be evicted before older ones, and keep them from expiring);
 * returns its ring slot. */
static size_t remember(Lane *self, const uint8_t *key, double now, uint32_t size, int python, long reuse) {
    int evicted;
    fifomap *m = &self->dedup;
    exchange_t *x;
    if (reuse >= 0) {
        fm_kill(m, (size_t)reuse);
        ((exchange_t *)fm_entry(m, (size_t)reuse))->at = -1; /* (expired: no waiting request finds it) */
    }
    /* (the endpoint counts the Python path's own evictions) */
    int oldest_is_lanes = fm_evicts_live(m) && !((exchange_t *)fm_entry(m, m->head))->python;
    x = fm_entry(m, fm_push(m, key, &evicted));
    self->dedup_evictions += evicted && oldest_is_lanes;
    x->at = now;
    x->size = size;
    x->python = (uint8_t)python;
    x->recovered = 0;
    return (size_t)((char *)x - m->ring) / m->esize;
}

/* A request for the Python path: remembered as its, so that its duplicates follow it there. */
static int python_path(Lane *self, const uint8_t *key, double now, long reuse) {
    remember(self, key, now, 0, 1, reuse);
    return 1;
}

/* Did a message received at `at` come in the peer's previous DTLS session?  Then it is no
 * duplicate of what the peer sends now (message IDs are scoped to the session, RFC 7252 §9.1),
 * and nothing is sent for it any more: that session, and its meaning of the id, are gone. */
static int from_old_session(Lane *self, const addr_t *a, double at) {
    /* (no session began since: no lookup, a likely cache and TLB miss in a map of dedup's size --
     * every CoAPS reading's commit asked, ~0.07 us of it) */
    if (!self->sessions.count || at >= self->newest_began) return 0;
    uint8_t key[KEYLEN];
    addr_key(a, 0, 1, key);
    long slot = fm_find(&self->sessions, key);
    return slot >= 0 && at < ((session_t *)fm_entry(&self->sessions, slot))->began;
}

/* The dedup slot of (peer, mid) sent from an address the peer's DTLS session moved from by its
 * Connection ID (RFC 9146 §6, `Lane.moved`; a few moves back at most), or -1: a retransmission
 * from the new address of a request first sent from the old one is the same exchange. */
static long moved_from(Lane *self, const addr_t *a, uint16_t mid) {
    uint8_t key[KEYLEN], old[KEYLEN];
    addr_key(a, 0, 1, key);
    for (int hop = 0; hop < 4; hop++) {
        long m = fm_find(&self->moved, key);
        if (m < 0) return -1;
        moved_t *e = fm_entry(&self->moved, m);
        addr_key(&e->old, mid, 1, old);
        long slot = fm_find(&self->dedup, old);
        if (slot >= 0)  /* (unless another device's, at that address before this session began) */
            return from_old_session(self, &e->old, ((exchange_t *)fm_entry(&self->dedup, slot))->at) ? -1 : slot;
        addr_key(&e->old, 0, 1, key);
    }
    return -1;
}

/* `session`: the target of the DTLS session the datagram came in (its index), NO_DEVICE for a
 * session that names no device, PLAIN for plain CoAP. */
#define PLAIN -2
#define NO_DEVICE -1

/* The next option at *pp (coap_options.h, the decoder's own walk): 0 for an option, 1 at the
 * payload marker or the end, -1 for anything the codec would refuse (number included). */
static inline int next_option(const uint8_t **pp, const uint8_t *end, uint64_t *number, const uint8_t **value,
                              size_t *vlen) {
    coap_option_status st = coap_next_option(pp, end, number, value, vlen);
    if (st == COAP_END) return 1;
    return st == COAP_OPTION && *number <= 65535 ? 0 : -1;
}

/* Over its source's rate, a request that names its device by a known token in its path
 * (ThingsBoard-style /api/v1/{token}/...) still goes through: hundreds of devices behind one
 * carrier NAT share an address, and junk and floods have no token.  Only over-rate datagrams pay
 * for this look. */
static int in_exempt_network(Lane *self, const addr_t *a) {
    uint8_t key[KEYLEN];
    addr_key(a, 0, 0, key);
    for (Py_ssize_t i = 0; i < self->nexempt; i++) {
        const uint8_t *net = self->exempt[i];
        unsigned bits = net[16], full = bits / 8, rest = bits % 8;
        if (memcmp(key, net, full)) continue;
        if (rest && ((key[full] ^ net[full]) & (0xff << (8 - rest)))) continue;
        return 1;
    }
    return 0;
}

static int credentialed(Lane *self, const uint8_t *d, size_t n) {
    if (!self->tokens || n < 4 || (d[0] >> 6) != 1) return 0;
    size_t tkl = d[0] & 15;
    if (tkl > 8 || n < 4 + tkl) return 0;
    const uint8_t *p = d + 4 + tkl, *end = d + n, *v, *seg[3];
    size_t len, seglen[3];
    uint64_t number = 0;
    int nseg = 0, r, want = self->nprefix + 1;
    while (nseg < want && (r = next_option(&p, end, &number, &v, &len)) == 0 && number <= 11) {
        if (number == 11) {
            seg[nseg] = v;
            seglen[nseg++] = len;
        }
    }
    if (nseg < want || !seglen[self->nprefix]) return 0;
    for (int i = 0; i < self->nprefix; i++)
        if (seglen[i] != self->pathlen[i] || memcmp(seg[i], self->path[i], seglen[i])) return 0;
    PyObject *tok = PyBytes_FromStringAndSize((const char *)seg[self->nprefix], seglen[self->nprefix]);
    if (!tok) {
        PyErr_Clear();
        return 0;
    }
    int found = PyDict_Contains(self->tokens, tok);
    if (found == 0 && self->known && self->known != Py_None) { /* a device that is not one of the lane's */
        PyObject *f = Py_NewRef(self->known); /* (its own: the call may delete the attribute) */
        PyObject *r = PyObject_CallOneArg(f, tok);
        Py_DECREF(f);
        found = r ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
    }
    Py_DECREF(tok);
    if (found < 0) PyErr_Clear();
    return found > 0;
}

/* What the lane reads of a request before it decides: the header, the Uri-Path segments (up to
 * four), the Content-Format, the Uri-Query items and option 4209 (Drogue's door reads them; `extra`:
 * either is there), whether any other option is there, and the payload.  `route` adds the door
 * and, for Drogue's, the record's `channel` and `data_schema`. */
typedef struct {
    int type, tkl, code;
    uint16_t mid;
    const uint8_t *seg[4];
    size_t seglen[4];
    int nseg, cf, other, extra;
    const uint8_t *query[DROGUE_QUERIES];
    size_t querylen[DROGUE_QUERIES];
    int nquery;
    const uint8_t *auth; /* option 4209's value, or NULL */
    size_t authlen;
    const uint8_t *payload, *end; /* payload NULL: none */
    const uint8_t *osc;    /* the OSCORE option's value (RFC 8613), or NULL */
    size_t osclen;
    int door;              /* the histogram's: 0 /api/v1/..., 1 /telemetry, 2 /v1/{channel} */
    PyObject *channel;     /* Drogue: the `channel` header's text (borrowed from the lane's table) */
    const uint8_t *schema; /* Drogue: the query's data_schema (ASCII), or NULL */
    size_t schemalen;
} shape_t;

/* segment i of the shape is the token path's segment k (the prefix's, or the resource: nprefix) */
#define SEG_IS(self, s, i, k) \
    ((s)->seglen[i] == (self)->pathlen[k] && memcmp((s)->seg[i], (self)->path[k], (self)->pathlen[k]) == 0)

/* the shape's first segments are the token path's prefix */
static int prefixed(const Lane *self, const shape_t *s) {
    for (int k = 0; k < self->nprefix; k++)
        if (!SEG_IS(self, s, k, k)) return 0;
    return 1;
}

/* 1. The options (the one walk of coap_options.h): 0, or 1 if the datagram is not a request the
 * codec would take -- the Python path refuses it, before the lane remembers or answers anything. */
static int read_shape(const uint8_t *d, size_t n, shape_t *s) {
    if (n < 4 || (d[0] >> 6) != 1) return 1;
    s->type = (d[0] >> 4) & 3;
    s->tkl = d[0] & 15;
    s->code = d[1];
    s->mid = (uint16_t)(d[2] << 8 | d[3]);
    /* A request comes as CON or NON (RFC 7252 §4.3, Table 1): a request code in an ACK or a RST is
     * no request -- the endpoint drops it, as it does. */
    if (s->tkl > 8 || s->code < 1 || s->code > 31 || s->type >= 2 || n < (size_t)(4 + s->tkl)) return 1;
    const uint8_t *p = d + 4 + s->tkl, *end = d + n, *v;
    size_t len;
    uint64_t number = 0;
    int r;
    s->nseg = s->other = s->extra = s->nquery = 0;
    s->cf = -1;
    s->auth = NULL;
    s->osc = NULL;
    s->osclen = 0;
    /* (an option of a length outside its own -- RFC 7252 Table 4, codec/options.py SPECS -- or
     * given twice where it is not repeatable is `other`: the endpoint refuses it, 4.02) */
    while ((r = next_option(&p, end, &number, &v, &len)) == 0) {
        if (number == 11 && s->nseg < 4 && len <= 255) {
            s->seg[s->nseg] = v;
            s->seglen[s->nseg++] = len;
        } else if (number == 12 && s->cf < 0 && len <= 2) {
            s->cf = 0;
            for (size_t k = 0; k < len; k++) s->cf = s->cf << 8 | v[k];
        } else if (number == 15 && s->nquery < DROGUE_QUERIES && len <= 255) {
            s->query[s->nquery] = v;
            s->querylen[s->nquery++] = len;
            s->extra = 1;
        } else if (number == OSC_OPTION && !s->osc && len <= 255) { /* (its request: classify's oscore branch) */
            s->osc = v ? v : (const uint8_t *)"";
            s->osclen = len;
        } else if (number == 4209 && !s->auth && len >= 1 && len <= 512) {
            s->auth = v;
            s->authlen = len;
            s->extra = 1;
        } else {
            s->other = 1;
        }
    }
    if (r < 0) return 1;
    s->end = end;
    s->payload = NULL;
    if (p < end) { /* payload marker */
        s->payload = p + 1;
        if (s->payload == end) return 1; /* a marker and no payload */
    }
    return 0;
}

/* 2. The exchange: the lane remembers every request's (peer, message id), with who took it.  A
 * duplicate of an exchange the lane owns is the lane's to answer, whatever its shape; one of the
 * Python path's goes there (which also keeps a reused message id from being taken twice).
 * SEEN_NOT when the exchange is new (*reuse: a slot of the peer's previous DTLS session to
 * reuse, or -1); else the result for classify. */
#define SEEN_NOT 2
static int seen_before(Lane *self, const uint8_t *d, const shape_t *s, size_t n, const addr_t *a,
                       socklen_t alen, PyObject *peer, const uint8_t *key, long *reuse) {
    long slot = fm_find(&self->dedup, key);
    *reuse = -1;
    if (slot >= 0 && from_old_session(self, a, ((exchange_t *)fm_entry(&self->dedup, slot))->at)) {
        *reuse = slot;
        slot = -1;
    }
    if (slot < 0 && self->moved.count) slot = moved_from(self, a, s->mid);
    if (slot < 0) return SEEN_NOT;
    exchange_t *x = fm_entry(&self->dedup, slot);
    if (x->python) return 1;
    if (x->recovered == RECOVERED_TOKEN && (x->tkl != s->tkl || memcmp(x->reply, d + 4, s->tkl) != 0)) {
        /* committed before a restart under another token: not its retransmission, which is the
         * same message again, token unchanged (RFC 7252 §4.2, §5.3.1), but a new request reusing
         * the peer and message id -- a device that rebooted and starts its ids where it did
         * before.  A 2.04 from the recovered exchange would carry this request's token and its
         * device would take its reading as stored: it is served as new (in this slot when the
         * slot is its key's: the key must not appear twice) */
        if (memcmp(x->key, key, KEYLEN) == 0) *reuse = slot;
        return SEEN_NOT;
    }
    self->datagrams_in++;
    self->bytes_in += n;
    self->duplicates++;
    if (x->recovered) {
        /* committed before a restart (`remember`), its 2.04 lost with the old process: the
         * retransmission carries the same token (or the record did not name it), so the ACK
         * is made from it (4 + token bytes: never larger than the request) */
        if (s->type != 0) return 0;
        uint8_t ack[12] = {0x60 | s->tkl, 0x44, s->mid >> 8, s->mid & 0xff};
        memcpy(ack + 4, d + 4, s->tkl);
        self->recovered_answers++;
        return queue_out(self, a, alen, peer, ack, 4 + s->tkl, 0x44, self->taking_entry, self->taking_version);
    }
    if (x->reply_len && s->type == 0 && n >= x->size)
        return queue_out(self, a, alen, peer, x->reply, x->reply_len, x->reply[1], self->taking_entry,
                         self->taking_version);
    return 0;
}

static inline int bytes_are(PyObject *b, const uint8_t *p, size_t n) {
    return b && (size_t)PyBytes_GET_SIZE(b) == n && memcmp(PyBytes_AS_STRING(b), p, n) == 0;
}

/* The target of the device whose token is `tok` (the lane's token table), NULL if none or not the
 * lane's; NULL with an exception on error. */
static target_t *token_target(Lane *self, const uint8_t *tok, size_t len) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)tok, (Py_ssize_t)len);
    if (!key) return NULL;
    PyObject *idx = PyDict_GetItemWithError(self->tokens, key);
    Py_DECREF(key);
    if (!idx) return NULL;
    Py_ssize_t ti = PyLong_AsSsize_t(idx);
    if (ti < 0 || ti >= self->ntargets || !self->targets[ti].topic) return NULL; /* (-1: maybe an error, set) */
    return &self->targets[ti];
}

/* Drogue's door: /v1/{channel} (the route the Python path's router gives it). */
static inline int is_drogue_path(const shape_t *s) {
    return s->nseg == 2 && s->seglen[0] == 2 && memcmp(s->seg[0], "v1", 2) == 0;
}

/* Drogue's `POST|PUT /v1/{channel}` of a channel the lane knows the route of: the device of the
 * credentials in option 4209 (the password is its token: the lane's token table; the name and
 * application must be that device's), else of the DTLS session; the query's application and device,
 * if there, must be that device's (drogue.h: what else goes to the Python path).  NULL: Python's. */
static target_t *drogue_route(Lane *self, shape_t *s, Py_ssize_t session) {
    int c = 0;
    while (c < self->nchannels && !(self->channels[c].len == s->seglen[1] &&
                                    memcmp(self->channels[c].name, s->seg[1], s->seglen[1]) == 0))
        c++;
    drogue_query_t q;
    if (c == self->nchannels || drogue_query(s->query, s->querylen, s->nquery, &q) < 0) return NULL;
    target_t *t;
    if (s->auth) {
        uint8_t buf[DROGUE_AUTH_MAX];
        drogue_cred_t cred;
        if (drogue_credentials(s->auth, s->authlen, buf, &cred) < 0) return NULL;
        if (!cred.realm) { /* `device:password` with ?application= */
            if (!q.app) return NULL;
            cred.realm = q.app;
            cred.realmlen = q.applen;
        }
        t = token_target(self, cred.password, cred.passlen);
        if (!t || !bytes_are(t->key, cred.name, cred.namelen) || !bytes_are(t->tenant, cred.realm, cred.realmlen))
            return NULL;
    } else {
        if (session < 0 || session >= self->ntargets) return NULL;
        t = &self->targets[session];
        if (!t->topic) return NULL;
    }
    if ((q.app && !bytes_are(t->tenant, q.app, q.applen)) || (q.dev && !bytes_are(t->key, q.dev, q.devlen)))
        return NULL; /* (Python's 4.01 names the one that differs) */
    s->door = 2;
    s->channel = self->channels[c].text;
    s->schema = q.schema;
    s->schemalen = q.schemalen;
    return t;
}

/* 3. The route: the target of a CON or NON POST of CBOR or JSON to /api/v1/{token}/telemetry (the token's
 * device) or, over CoAPS, /telemetry or /api/v1/telemetry (the session's), or a POST or PUT to
 * Drogue's /v1/{channel} (drogue_route); NULL for anything else, or a device with its own decoder
 * (the Python path); NULL with an exception on error. */
static target_t *route(Lane *self, shape_t *s, Py_ssize_t session) {
    if (s->type > 1 || s->other || s->osc || !s->payload) return NULL; /* (its Content-Format: parse_payload) */
    if (s->type == 1 && (!self->next_mid || self->next_mid == Py_None)) return NULL; /* (a NON's answer needs one) */
    s->channel = NULL;
    s->schema = NULL;
    if (is_drogue_path(s)) return self->nchannels && (s->code == 2 || s->code == 3) ? drogue_route(self, s, session) : NULL;
    if (s->code != 2 || s->extra) return NULL;
    s->door = s->nseg == 1; /* /telemetry: corem's own; the others are ThingsBoard's /api/v1/... */
    int np = self->nprefix;
    if (s->nseg == np + 2 && prefixed(self, s) && SEG_IS(self, s, np + 1, np) && s->seglen[np])
        return token_target(self, s->seg[np], s->seglen[np]);
    if (session >= 0 && ((s->nseg == 1 && SEG_IS(self, s, 0, np)) ||
                         (s->nseg == np + 1 && prefixed(self, s) && SEG_IS(self, s, np, np))))
        return session < self->ntargets && self->targets[session].topic ? &self->targets[session] : NULL;
    return NULL;
}

/* The record's headers: the device's (shared by its records: with `content-type` and `device_id`),
 * `creation-time` (the reading's received_at in ms, as Python's path writes it: corem/bus/headers.py)
 * and `coap-exchange`, the exchange this reading came in -- "{transport} {host} {port} {message id}
 * {token}", the token in lowercase hex or "-" when empty, as corem/bus/recovery.py reads and writes
 * it -- so that a restart can read back which exchanges were committed, and tell their
 * retransmissions (the same token) from a rebooted device's new requests.  One small dict copy and
 * one ASCII string per reading (the creation time's text is made once per millisecond); the text is
 * written here, no printf. */
static PyObject *EXCHANGE, *CREATION, *CHANNEL, *DATA_SCHEMA; /* the headers' names, interned */

static PyObject *creation_time(Lane *self, long long now_ms) {
    if (!self->ctime || self->ctime_ms != now_ms) {
        char buf[24];
        char *end = put_u64(buf, (unsigned long long)(now_ms > 0 ? now_ms : 0));
        PyObject *text = PyUnicode_DecodeASCII(buf, end - buf, NULL);
        if (!text) return NULL;
        Py_XSETREF(self->ctime, text);
        self->ctime_ms = now_ms;
    }
    return self->ctime;
}

/* `coap-exchange`'s text, written at `buf` (EXCHANGE_TEXT bytes): its length.  `tok`: the request's
 * token, `tkl` (0-8) bytes.  At most 7 + 7 (the transport) + 1 + 45 + 11 (the host, its scope) + 6 +
 * 6 (port, message id) + 17 (the token) = 100 bytes. */
#define EXCHANGE_TEXT (16 + INET6_ADDRSTRLEN + 32 + 24)
static size_t exchange_text(const Lane *self, const addr_t *a, uint16_t mid, const uint8_t *tok, int tkl,
                            int oscore, char *buf) {
    char *o = buf;
    size_t sl = strlen(self->scope);
    memcpy(o, self->scope, sl);
    o += sl;
    if (oscore) { /* (its answer must be sealed: not recovered after a restart, telemetry.py `_headers`) */
        memcpy(o, "+oscore", 7);
        o += 7;
    }
    *o++ = ' ';
    unsigned port, scope = 0;
    if (a->sa.sa_family == AF_INET) { /* (glibc's inet_ntop formats IPv4 with sprintf: 3x slower) */
        const uint8_t *q = (const uint8_t *)&a->v4.sin_addr;
        for (int i = 0; i < 4; i++) {
            if (i) *o++ = '.';
            o = put_u64(o, q[i]);
        }
        port = ntohs(a->v4.sin_port);
    } else {
        inet_ntop(AF_INET6, &a->v6.sin6_addr, o, INET6_ADDRSTRLEN);
        o += strlen(o);
        port = ntohs(a->v6.sin6_port);
        scope = a->v6.sin6_scope_id;
    }
    if (scope) {
        *o++ = '%';
        o = put_u64(o, scope);
    }
    *o++ = ' ';
    o = put_u64(o, port);
    *o++ = ' ';
    o = put_u64(o, mid);
    *o++ = ' ';
    if (!tkl) *o++ = '-'; /* (no token: a field that is there all the same, recovery.py NO_TOKEN) */
    for (int i = 0; i < tkl; i++) {
        *o++ = "0123456789abcdef"[tok[i] >> 4];
        *o++ = "0123456789abcdef"[tok[i] & 15];
    }
    return (size_t)(o - buf);
}

static PyObject *exchange_headers(Lane *self, PyObject *base, const shape_t *s, const addr_t *a,
                                  const uint8_t *tok, long long now_ms, int oscore) {
    char buf[EXCHANGE_TEXT];
    size_t len = exchange_text(self, a, s->mid, tok, s->tkl, oscore, buf);
    PyObject *created = creation_time(self, now_ms);
    if (!created) return NULL;
    PyObject *value = PyUnicode_DecodeASCII(buf, (Py_ssize_t)len, NULL);
    if (!value) return NULL;
    PyObject *headers = PyDict_Copy(base);
    if (headers && s->channel) { /* Drogue's, after the device's (as drogue.py adds them) */
        PyObject *schema = s->schema ? PyUnicode_DecodeASCII((const char *)s->schema, (Py_ssize_t)s->schemalen, NULL)
                                     : NULL;
        if (PyDict_SetItem(headers, CHANNEL, s->channel) < 0 || (s->schema && !schema) ||
            (schema && PyDict_SetItem(headers, DATA_SCHEMA, schema) < 0))
            Py_CLEAR(headers);
        Py_XDECREF(schema);
    }
    if (!headers || PyDict_SetItem(headers, CREATION, created) < 0 || PyDict_SetItem(headers, EXCHANGE, value) < 0) {
        Py_XDECREF(headers);
        Py_DECREF(value);
        return NULL;
    }
    Py_DECREF(value);
    return headers;
}

/* ---- packed records: the embedded bus's stored form, msgpack [key, value, headers], written here
 * byte for byte as msgspec writes the Record (corem/bus/sqlite.py `prepare`): no headers dict, no
 * exchange string, no tuple to encode per reading -- ~0.3 us a reading of the plain lane's ~5.5. */
static inline uint8_t *mp_be(uint8_t *o, uint8_t tag, size_t n, int bytes) {
    *o++ = tag;
    for (int i = bytes - 1; i >= 0; i--) *o++ = (uint8_t)(n >> (8 * i));
    return o;
}

/* the bytes of a bin's header */
static inline size_t mp_bin_head(size_t n) { return n < 0x100 ? 2 : n < 0x10000 ? 3 : 5; }

/* bin 8/16/32 */
static inline uint8_t *mp_bin(uint8_t *o, const void *p, size_t n) {
    o = n < 0x100 ? mp_be(o, 0xc4, n, 1) : n < 0x10000 ? mp_be(o, 0xc5, n, 2) : mp_be(o, 0xc6, n, 4);
    memcpy(o, p, n);
    return o + n;
}

/* fixstr, str 8/16/32 */
static inline uint8_t *mp_str(uint8_t *o, const void *p, size_t n) {
    if (n < 32) *o++ = (uint8_t)(0xa0 | n);
    else o = n < 0x100 ? mp_be(o, 0xd9, n, 1) : n < 0x10000 ? mp_be(o, 0xda, n, 2) : mp_be(o, 0xdb, n, 4);
    memcpy(o, p, n);
    return o + n;
}

/* the bytes of a map's header (mp_map's) */
static inline size_t mp_map_head(size_t n) { return n < 16 ? 1 : n < 0x10000 ? 3 : 5; }

/* fixmap, map 16/32 */
static inline uint8_t *mp_map(uint8_t *o, size_t n) {
    if (n < 16) {
        *o++ = (uint8_t)(0x80 | n);
        return o;
    }
    return n < 0x10000 ? mp_be(o, 0xde, n, 2) : mp_be(o, 0xdf, n, 4);
}

/* A device's headers dict as msgpack map entries (no map header), for its packed records: bytes,
 * or None when one is no str -> str (the target's records are dicts then), or NULL with an
 * exception set.  Read once, when the target is set (the dicts are the devices' shared ones,
 * never changed: headers.py `device_headers`). */
static PyObject *pack_headers(PyObject *dict, Py_ssize_t *count) {
    Py_ssize_t pos = 0, need = 0;
    PyObject *k, *v;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        Py_ssize_t kl, vl;
        if (!PyUnicode_CheckExact(k) || !PyUnicode_CheckExact(v)) Py_RETURN_NONE;
        if (!PyUnicode_AsUTF8AndSize(k, &kl) || !PyUnicode_AsUTF8AndSize(v, &vl)) return NULL;
        need += kl + vl + 10;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, need);
    if (!out) return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    pos = 0;
    *count = 0;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        Py_ssize_t kl, vl;
        const char *ks = PyUnicode_AsUTF8AndSize(k, &kl), *vs = PyUnicode_AsUTF8AndSize(v, &vl);
        o = mp_str(o, ks, (size_t)kl);
        o = mp_str(o, vs, (size_t)vl);
        (*count)++;
    }
    _PyBytes_Resize(&out, (Py_ssize_t)(o - (uint8_t *)PyBytes_AS_STRING(out)));
    return out;
}

/* What a request's packed records share after the device's headers: Drogue's `channel` and
 * `data_schema`, `creation-time`, `coap-exchange` (exchange_headers' entries, in its order) as
 * msgpack map entries at `buf` (PACKED_EXTRA bytes): their length, their count in *count; or 0
 * when they would not fit (that request's records are dicts: a channel or schema that long). */
#define PACKED_EXTRA 512
static size_t exchange_packed(Lane *self, const shape_t *s, const addr_t *a, const uint8_t *tok,
                              long long now_ms, int oscore, uint8_t *buf, Py_ssize_t *count) {
    uint8_t *o = buf;
    *count = 2;
    if (s->channel) {
        Py_ssize_t cl;
        const char *c = PyUnicode_AsUTF8AndSize(s->channel, &cl);
        if (!c) {
            PyErr_Clear();
            return 0;
        }
        if ((size_t)cl + s->schemalen + 40 > PACKED_EXTRA - (EXCHANGE_TEXT + 64)) return 0;
        o = mp_str(o, "channel", 7);
        o = mp_str(o, c, (size_t)cl);
        ++*count;
        if (s->schema) {
            o = mp_str(o, "data_schema", 11);
            o = mp_str(o, s->schema, s->schemalen);
            ++*count;
        }
    }
    char text[EXCHANGE_TEXT];
    char *end = put_u64(text, (unsigned long long)(now_ms > 0 ? now_ms : 0));
    o = mp_str(o, "creation-time", 13);
    o = mp_str(o, text, (size_t)(end - text));
    size_t len = exchange_text(self, a, s->mid, tok, s->tkl, oscore, text);
    o = mp_str(o, "coap-exchange", 13);
    o = mp_str(o, text, len);
    return (size_t)(o - buf);
}

/* One point's record: the point's JSON and the exchange's headers (shared by a request's points),
 * or NULL with an exception set. */
static PyObject *point_record(Lane *self, target_t *t, PyObject *headers, item_t *items, int n, long long ts,
                              long long now_ms, const uint8_t *order, const uint8_t *uorder, int nu) {
    char *end = point_json(self, t, items, n, ts, now_ms, order, uorder, nu);
    PyObject *value = end ? PyBytes_FromStringAndSize(self->json, end - self->json) : NULL;
    PyObject *record = value ? self->record_type->tp_alloc(self->record_type, 4) : NULL;
    if (!record) {
        Py_XDECREF(value);
        return NULL;
    }
    Py_INCREF(t->topic);
    Py_INCREF(t->key);
    Py_INCREF(headers);
    PyTuple_SET_ITEM(record, 0, t->topic);
    PyTuple_SET_ITEM(record, 1, t->key);
    PyTuple_SET_ITEM(record, 2, value);
    PyTuple_SET_ITEM(record, 3, headers);
    return record;
}

/* One point's packed record (PackedRecord: the topic, msgpack [key, value, headers]), the
 * exchange's entries `extra` (exchange_packed: `xcount` of them) after the device's; or NULL with
 * an exception set. */
static PyObject *point_packed(Lane *self, target_t *t, const uint8_t *extra, size_t xlen, Py_ssize_t xcount,
                              item_t *items, int n, long long ts, long long now_ms, const uint8_t *order,
                              const uint8_t *uorder, int nu) {
    char *end = point_json(self, t, items, n, ts, now_ms, order, uorder, nu);
    if (!end) return NULL;
    size_t jlen = (size_t)(end - self->json), klen = (size_t)PyBytes_GET_SIZE(t->key),
           hlen = (size_t)PyBytes_GET_SIZE(t->hpacked);
    size_t count = (size_t)(t->hcount + xcount), size = 1 + mp_bin_head(klen) + klen + mp_bin_head(jlen) + jlen +
                   mp_map_head(count) + hlen + xlen;
    PyObject *packed = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    PyObject *record = packed ? self->packed_type->tp_alloc(self->packed_type, 2) : NULL;
    if (!record) {
        Py_XDECREF(packed);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(packed);
    *o++ = 0x93; /* [key, value, headers] */
    o = mp_bin(o, PyBytes_AS_STRING(t->key), klen);
    o = mp_bin(o, self->json, jlen);
    o = mp_map(o, count);
    memcpy(o, PyBytes_AS_STRING(t->hpacked), hlen);
    memcpy(o + hlen, extra, xlen);
    Py_INCREF(t->topic);
    PyTuple_SET_ITEM(record, 0, t->topic);
    PyTuple_SET_ITEM(record, 1, packed);
    return record;
}

/* 4. The reading, accepted: a record a point for the sink (the profile's rules applied to each,
 * `rules`, or the units' order a Python decoder gave, `uorder`), and the exchange waiting for
 * their commits.  0; 1 if a point breaks a rule (the Python path's, nothing taken); or -1 with
 * an exception set. */
/* What an OSCORE request the lane opened leaves for its answer (oscore.h): its context (a
 * reference, held while the request is read), the nonce and AAD its first answer is sealed with,
 * its sequence number (accepted in the window once the lane took the request). */
typedef struct {
    OscContext *ctx;
    uint8_t nonce[OSC_NONCE], aad[OSC_AAD_MAX];
    size_t aadlen;
    int64_t seq;
} osc_req_t;

static int take_reading(Lane *self, target_t *t, const shape_t *s, const uint8_t *d, size_t n, const addr_t *a,
                        socklen_t alen, PyObject *peer, const uint8_t *key, long reuse, item_t *items, int nitems,
                        const long long *pts, int npts, double now, long long now_ms, const rules_t *rules,
                        const uint8_t *uorder, int nu, const osc_req_t *osc) {
    PyObject *record[MAX_POINTS];
    int made = 0;
    PyObject *headers = NULL;
    uint8_t extra[PACKED_EXTRA];
    size_t xlen = 0;
    Py_ssize_t xcount = 0;
    if (self->packed_type && t->hpacked) /* (else, or when they do not fit: a dict of headers) */
        xlen = exchange_packed(self, s, a, d + 4, now_ms, osc != NULL, extra, &xcount);
    if (!xlen && !(headers = exchange_headers(self, t->headers, s, a, d + 4, now_ms, osc != NULL))) return -1;
    for (int p = 0; p < npts; p++) {
        item_t own[MAX_ITEMS], *pi = items;
        int m = nitems;
        if (npts > 1) { /* (this point's items, in their order) */
            m = 0;
            for (int i = 0; i < nitems; i++)
                if (items[i].point == p) own[m++] = items[i];
            pi = own;
        }
        if (m > self->max_readings) { /* over max_readings_per_point: Python's 4.00 names it */
            while (made) Py_DECREF(record[--made]);
            Py_XDECREF(headers);
            return 1;
        }
        uint8_t order[MAX_ITEMS], rorder[MAX_ITEMS];
        const uint8_t *o = NULL, *u = uorder;
        int nuu = nu;
        if (rules) {
            if (apply_rules(rules, pi, m, order, rorder, &nuu) < 0) { /* a broken rule: Python's 4.00 names it */
                while (made) Py_DECREF(record[--made]);
                Py_XDECREF(headers);
                return 1;
            }
            o = order;
            u = rorder;
        }
        record[made] = headers ? point_record(self, t, headers, pi, m, pts[p], now_ms, o, u, nuu)
                               : point_packed(self, t, extra, xlen, xcount, pi, m, pts[p], now_ms, o, u, nuu);
        if (!record[made]) {
            while (made) Py_DECREF(record[--made]);
            Py_XDECREF(headers);
            return -1;
        }
        made++;
    }
    Py_XDECREF(headers);
    int h = pending_new(self);
    if (h < 0) {
        while (made) Py_DECREF(record[--made]);
        PyErr_NoMemory();
        return -1;
    }
    pending_t *q = &self->pending[h];
    q->addr = *a;
    q->alen = alen;
    memcpy(q->key, key, KEYLEN);
    q->at = now;
    if (now != self->rx_for || !self->rx_at) { /* a new batch (each comes with its own `now`): its receipt */
        struct timespec ts_rx;
        clock_gettime(CLOCK_MONOTONIC, &ts_rx);
        self->rx_for = now;
        self->rx_at = ts_rx.tv_sec + ts_rx.tv_nsec * 1e-9;
    }
    q->rx = self->rx_at;
    q->door = (uint8_t)s->door;
    q->size = (uint32_t)n;
    q->mid = s->mid;
    q->tkl = (uint8_t)s->tkl;
    q->non = s->type == 1;
    memcpy(q->token, d + 4, s->tkl);
    q->state = P_PENDING;
    q->left = q->points = (uint16_t)made; /* (answered once every point's commit is known) */
    q->failed = 0;
    Py_INCREF(t->device);
    q->device = t->device;
    Py_XINCREF(peer);
    q->peer = peer;
    q->ds_entry = self->taking_entry;
    q->ds_version = self->taking_version; /* (Python code classify ran since may have dropped it) */
    if (osc) {
        Py_INCREF(osc->ctx);
        q->osc = osc->ctx;
        memcpy(q->nonce, osc->nonce, OSC_NONCE);
        memcpy(q->aad, osc->aad, osc->aadlen);
        q->aadlen = (uint8_t)osc->aadlen;
    }
    PyObject *ctx = PyLong_FromLongLong((long long)h << 32 | q->gen);
    int bad = !ctx;
    Py_ssize_t before = PyList_GET_SIZE(self->records);
    for (int p = 0; p < made && !bad; p++)
        bad = PyList_Append(self->records, record[p]) < 0 || PyList_Append(self->ctxs, ctx) < 0;
    if (bad || fifo_push(self, (uint64_t)h << 32 | q->gen) < 0) {
        /* (none of them stays: a record without its exchange would be answered by nobody) */
        PyList_SetSlice(self->records, before, PyList_GET_SIZE(self->records), NULL);
        PyList_SetSlice(self->ctxs, before, PyList_GET_SIZE(self->ctxs), NULL);
        Py_XDECREF(ctx);
        while (made) Py_DECREF(record[--made]);
        pending_free(self, h);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    Py_DECREF(ctx);
    while (made) Py_DECREF(record[--made]);
    /* taken from here on (its records queued, its exchange waiting): nothing may fail after this,
     * or the request would be answered while its exchange is not remembered nor, for OSCORE, its
     * number accepted -- the same request taken again, its answer sealed again under its nonce */
    q->slot = remember(self, key, now, (uint32_t)n, 0, reuse);
    if (osc) { /* the window moves (the Python path's Context shares it) */
        osc_accept(osc->ctx->window, osc->seq);
        self->oscore_requests++;
    }
    self->datagrams_in++;
    self->bytes_in += n;
    self->requests++;
    if (t->epoch != self->epoch) {
        if (PyList_Append(self->touched, t->device) == 0) t->epoch = self->epoch;
        else PyErr_Clear(); /* (no memory: the device is heard at its next reading) */
    }
    return 0;
}

/* The payload in its target's mode: CBOR (60) or JSON (50) documents for the flat and ThingsBoard
 * modes (cbor_json.h), Cayenne LPP (42 or none, lpp.h), the profile's positional array (60, 50) or
 * binary layout (42 or none, layouts.h), a SenML pack of one time (110-113, 50, 60: senml.h), a
 * protobuf message (42 or none, proto.h); 0 and the items, or -1: the Python path's (a protobuf
 * message: PB_PYTHON, the profile's decoder's, or PB_REFUSED). */
static int parse_payload(int cf, const target_t *t, const uint8_t *p, const uint8_t *end, long long now_ms,
                         item_t *items, int *nitems, long long *pts, int *npts, char (*names)[LANE_NAME],
                         json_buf_t *jb) {
    int mode = t->mode;
    *npts = 1;
    pts[0] = -1;
    if (mode == MODE_SENML) return parse_senml(cf, p, end, now_ms, items, nitems, pts, npts, names);
    if (mode == MODE_LPP) return cf == 42 || cf < 0 ? parse_lpp(p, end, items, nitems, names) : -1;
    if (mode == MODE_BINARY) return cf == 42 || cf < 0 ? parse_binary(&profile_of(t)->layout, p, end, items, nitems) : -1;
    if (mode == MODE_PROTOBUF)
        return parse_protobuf(&profile_of(t)->proto, profile_of(t)->nested, jb, cf, p, end, items, nitems, pts, names);
    if (cf != 60 && cf != 50) return -1;
    if (mode == MODE_ARRAY) return parse_positional(&profile_of(t)->layout, cf, p, end, items, nitems, pts);
    int nested = mode == MODE_THINGSBOARD && t->profile ? profile_of(t)->nested : 0;
    flat_t fl = {names, items, nested == 2 ? jb : NULL};
    return parse_document(cf, mode, nested ? &fl : NULL, p, end, items, nitems, pts, npts);
}

/* The profile's Python decoder called from the batch (pycodec.h) and its point taken: a Python
 * profile's way (its rules are in the decoder), and a protobuf profile's for a message proto.h does
 * not read (text JSON would escape, a wire type not the schema's, ...).  0 taken, 1
 * the Python path's, -1 error. */
static int take_decoded(Lane *self, target_t *t, const shape_t *s, const uint8_t *d, size_t n, const addr_t *a,
                        socklen_t alen, PyObject *peer, const uint8_t *key, long reuse, double now, long long now_ms,
                        const osc_req_t *osc) {
    item_t items[MAX_ITEMS];
    int nitems, r;
    long long ts;
    PyObject *keep;
    uint8_t uorder[MAX_ITEMS];
    int nu = 0;
    uint64_t gen = self->targets_gen;
    Py_ssize_t ti = t - self->targets;
    /* (the profile's C form, held: Python code -- the decoder, `handed` -- may replace the target's) */
    PyObject *held = t->profile;
    Py_INCREF(held);
    lane_profile_t *P = profile_of(t);
    int got = parse_python(P->decode, s->cf, s->payload, s->end, now_ms, items, &nitems, &ts, uorder, &nu, &keep);
    if (got == -2) { /* (not the decoder's refusal: KeyboardInterrupt and the like go up) */
        Py_XDECREF(keep);
        Py_DECREF(held);
        return -1;
    }
    if (got < 0 || self->targets_gen != gen) /* (Python ran: the table may have changed) */
        r = 1;
    else
        r = take_reading(self, &self->targets[ti], s, d, n, a, alen, peer, key, reuse, items, nitems, &ts, 1, now, now_ms,
                         NULL, uorder, nu, osc);
    if (r == 0) self->python_decoded++;
    if (r == 1 && keep && P->handed) {
        /* the Python path answers this reading: it takes the decoder's outcome from here rather
         * than run the decoder a second time (a codec's state would see the payload twice, and a
         * reading at its limits would cost them twice) */
        PyObject *cf = s->cf < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(s->cf);
        PyObject *res = cf ? PyObject_CallFunction(P->handed, "y#OLO", (const char *)s->payload,
                                                   (Py_ssize_t)(s->end - s->payload), cf, now_ms, keep)
                           : NULL;
        if (!res) r = -1;
        Py_XDECREF(cf);
        Py_XDECREF(res);
    }
    Py_DECREF(held);
    Py_XDECREF(keep); /* (last: the items point into it) */
    return r;
}

/* The routed request's payload read and taken (its shape `sp`: the datagram's own, or the inner
 * message an OSCORE request sealed, `osc`): 0 taken, 1 the Python path's, -1 error. */
static int take_request(Lane *self, target_t *t, const shape_t *s, const uint8_t *d, size_t n, const addr_t *a,
                        socklen_t alen, PyObject *peer, const uint8_t *key, long reuse, double now, long long now_ms,
                        const osc_req_t *osc) {
    item_t items[MAX_ITEMS];
    char names[MAX_ITEMS][LANE_NAME]; /* (the names a format makes: LPP's, SenML's) */
    int nitems;
    long long pts[MAX_POINTS];
    int npts = 1;
    if (t->mode == MODE_PYTHON) return take_decoded(self, t, s, d, n, a, alen, peer, key, reuse, now, now_ms, osc);
    /* (the JSON text of nested values, `nested: json`: no longer than twice the payload, and for a
     * protobuf message what its schema's defaults and numbers could add: proto.h pb_json_most) */
    size_t room = 2 * (size_t)(s->end - s->payload) + 64 + (t->mode == MODE_PROTOBUF ? profile_of(t)->proto.json_room : 0);
    if (room > self->nested_cap) {
        char *b = PyMem_Realloc(self->nested, room);
        if (!b) {
            PyErr_NoMemory();
            return -1;
        }
        self->nested = b;
        self->nested_cap = room;
    }
    json_buf_t jb = {self->nested, self->nested_cap, 0};
    int got = parse_payload(s->cf, t, s->payload, s->end, now_ms, items, &nitems, pts, &npts, names, &jb);
    if (got < 0) /* (a protobuf message proto.h does not read: the profile's decoder, from the batch) */
        return t->mode == MODE_PROTOBUF && got == PB_PYTHON
                   ? take_decoded(self, t, s, d, n, a, alen, peer, key, reuse, now, now_ms, osc)
                   : 1;
    const rules_t *rules = t->profile && profile_of(t)->rules.n ? &profile_of(t)->rules : NULL;
    /* accepted unless a rule is broken: from then on the lane owns the exchange */
    return take_reading(self, t, s, d, n, a, alen, peer, key, reuse, items, nitems, pts, npts, now, now_ms, rules,
                        NULL, 0, osc);
}

/* An OSCORE request (RFC 8613 §8.2) the lane may take: an outer CON or NON POST with nothing but
 * the OSCORE option and the ciphertext, whose option has a partial IV and a kid of a context
 * corem/oscore gave the lane (`oscore_add`), whose number is fresh in the context's window, and
 * which authenticates; its inner message (the outer header and token, the plaintext's code,
 * options and payload: protect.py `inner_message`) read into `inner`.  0 with `o` set (o->ctx a
 * reference), 1 the Python path's (nothing changed: the window is only moved once the lane took
 * the request), -1 error. */
static int oscore_open(Lane *self, const uint8_t *d, const shape_t *s, shape_t *inner, osc_req_t *o) {
    if (!self->oscs || !PyDict_GET_SIZE(self->oscs)) return 1;
    if (s->code != 2 || s->type > 1 || s->other || s->nseg || s->cf >= 0 || s->extra || !s->payload) return 1;
    size_t ctlen = (size_t)(s->end - s->payload);
    if (ctlen <= OSC_TAG) return 1; /* (an empty plaintext: Python's 4.02) */
    osc_option_t opt;
    if (osc_option(s->osc, s->osclen, &opt) < 0) return 1;
    PyObject *k = osc_key(&opt);
    if (!k) return -1;
    OscContext *ctx = (OscContext *)PyDict_GetItemWithError(self->oscs, k);
    Py_DECREF(k);
    if (!ctx) return PyErr_Occurred() ? -1 : 1;
    int64_t seq = 0;
    for (size_t i = 0; i < opt.pivlen; i++) seq = seq << 8 | opt.piv[i];
    if (!ctx->window || !osc_fresh(ctx->window, seq)) return 1; /* (Python's 4.01: a replay) */
    if (!self->innerbuf && !(self->innerbuf = PyMem_Malloc((size_t)self->max_datagram + 16))) {
        PyErr_NoMemory();
        return -1;
    }
    osc_nonce(ctx->iv, opt.kid, opt.kidlen, opt.piv, opt.pivlen, o->nonce);
    o->aadlen = osc_aad(opt.kid, opt.kidlen, opt.piv, opt.pivlen, o->aad);
    size_t pl = ctlen - OSC_TAG;
    if (3 + (size_t)s->tkl + pl > (size_t)self->max_datagram + 16) return 1; /* (innerbuf's room: Python's) */
    uint8_t tag[OSC_TAG], *at = self->innerbuf + 3 + s->tkl; /* (the plaintext's code where the inner header ends) */
    memcpy(tag, s->payload + pl, OSC_TAG);
    if (aead_ccm(ctx->open, 0, NULL, o->nonce, o->aad, o->aadlen, s->payload, at, pl, tag, OSC_TAG) != 1)
        return 1; /* (Python's 4.00, or libcrypto's failure: Python tries its own) */
    uint8_t *h = self->innerbuf;
    uint8_t code = at[0];
    h[0] = (uint8_t)(0x40 | s->type << 4 | s->tkl);
    h[1] = code;
    h[2] = d[2];
    h[3] = d[3];
    memcpy(h + 4, d + 4, s->tkl);
    if (read_shape(h, 3 + s->tkl + pl, inner) || inner->osc) return 1;
    Py_INCREF(ctx);
    o->ctx = ctx;
    o->seq = seq;
    return 0;
}

/* The target of the device `name` names ((tenant, device), or None), kept in *target until the
 * lane's table changes (*gen: the table it was read from); -1 for none: the Python path's. */
static Py_ssize_t cached_target(Lane *self, PyObject *name, Py_ssize_t *target, uint64_t *gen) {
    if (*gen != self->targets_gen) {
        *gen = self->targets_gen;
        *target = -1;
        if (name != Py_None && self->positions) {
            PyObject *i = PyDict_GetItemWithError(self->positions, name);
            if (i) *target = PyLong_AsSsize_t(i);
            if (PyErr_Occurred()) {
                PyErr_Clear(); /* (not the lane's: Python's path serves it) */
                *target = -1;
            }
        }
    }
    return *target;
}

/* The target of the device an OSCORE context names, or -1. */
static Py_ssize_t osc_target(Lane *self, OscContext *c) { return cached_target(self, c->name, &c->target, &c->targets_gen); }

static int classify_message(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen, PyObject *peer,
                            double now, long long now_ms, Py_ssize_t session);

/* One datagram: 0 handled (or dropped), 1 for the Python path, -1 error (exception set).  `entry`:
 * the DTLS session table's entry + 1 of the session the lane opened it in (0: none -- plain, or
 * decrypted by Python), which seals the answers of the readings taken from it (send_records) while
 * the table's version is the one of now; an outer call's is restored after. */
static int classify(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen, PyObject *peer,
                    double now, long long now_ms, Py_ssize_t session, uint32_t entry) {
    uint32_t outer = self->taking_entry, outer_version = self->taking_version;
    self->taking_entry = entry;
    self->taking_version = self->ds.version;
    int r = classify_message(self, d, n, a, alen, peer, now, now_ms, session);
    self->taking_entry = outer;
    self->taking_version = outer_version;
    return r;
}

static int classify_message(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen, PyObject *peer,
                            double now, long long now_ms, Py_ssize_t session) {
    shape_t s;
    if (read_shape(d, n, &s)) return 1; /* malformed: the codec explains */
    uint8_t key[KEYLEN];
    long reuse;
    addr_key(a, s.mid, 1, key);
    int seen = seen_before(self, d, &s, n, a, alen, peer, key, &reuse);
    if (seen != SEEN_NOT) return seen;
    int r;
    if (s.osc) {
        /* OSCORE: the inner message routed as a request of the context's device (its session:
         * /telemetry, /api/v1/telemetry), or of the token in its path; Drogue's door stays Python's */
        shape_t inner;
        osc_req_t o;
        r = oscore_open(self, d, &s, &inner, &o);
        if (r) return r < 0 ? -1 : python_path(self, key, now, reuse);
        Py_ssize_t ot = osc_target(self, o.ctx);
        target_t *t = is_drogue_path(&inner) ? NULL : route(self, &inner, ot < 0 ? NO_DEVICE : ot);
        r = t ? take_request(self, t, &inner, d, n, a, alen, peer, key, reuse, now, now_ms, &o)
              : PyErr_Occurred() ? -1 : 1; /* (taken: take_reading moved the window) */
        Py_DECREF(o.ctx);
    } else {
        target_t *t = route(self, &s, session);
        if (!t) return PyErr_Occurred() ? -1 : python_path(self, key, now, reuse);
        r = take_request(self, t, &s, d, n, a, alen, peer, key, reuse, now, now_ms, NULL);
    }
    return r == 1 ? python_path(self, key, now, reuse) : r;
}

static int ensure_lists(Lane *self) {
    PyObject **lists[] = {&self->slow, &self->records, &self->ctxs, &self->touched};
    for (int i = 0; i < 4; i++)
        if (!*lists[i] && !(*lists[i] = PyList_New(0))) return -1;
    return 0;
}

static int feed(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen, double now, long long now_ms) {
    if ((Py_ssize_t)n > self->max_datagram) {
        self->oversized++;
        return 0;
    }
    if (self->limit && !rate_allow(self, a, now)) {
        if (!credentialed(self, d, n) && !(self->nexempt && in_exempt_network(self, a))) {
            self->dropped++;
            return 0;
        }
        self->exempted++;
    }
    int r = classify(self, d, n, a, alen, NULL, now, now_ms, PLAIN, 0);
    if (r == 1) return append_pair(self->slow, d, n, a, alen); /* the Python path's */
    return r;
}

/* ---------------------------------------------------------------- methods ------------------ */
/* drain_records: the session drain_record_ahead found for each datagram (-1: none), for
 * drain_record to take instead of looking it up again -- while no session was added or removed
 * meanwhile (`version`: what classify calls may do).  AHEAD + 1 wait at most. */
#define FOUND_RING 8
_Static_assert(AHEAD + 1 <= FOUND_RING, "read_datagrams_ahead keeps AHEAD + 1 datagrams' lookups waiting");
typedef struct {
    unsigned long seq; /* the datagram's place in the drain */
    int32_t entry;
    uint32_t version;
} found_t;

typedef struct {
    Lane *lane;
    double now;
    long long now_ms;
    found_t found[FOUND_RING];
    unsigned head, len;
    unsigned long ahead_seq, fed_seq; /* datagrams seen by drain_record_ahead, by drain_record */
} drain_ctx;

static int drain_one(void *ctx, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    drain_ctx *c = ctx;
    return feed(c->lane, d, n, a, alen, c->now, c->now_ms);
}

/* (read_datagrams_ahead) what taking a datagram will look up in the dedup map, fetched ahead: the
 * exchange's index cell, and what its push will evict (every request is a push) */
static int drain_ahead(void *ctx, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    Lane *self = ((drain_ctx *)ctx)->lane;
    (void)alen;
    if (n >= 4) {
        uint8_t key[KEYLEN];
        addr_key(a, (uint16_t)(d[2] << 8 | d[3]), 1, key);
        fm_prefetch(&self->dedup, key);
    }
    fm_prefetch_evicted(&self->dedup, AHEAD);
    return 0;
}

static PyObject *Lane_drain(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    int fd, budget;
    drain_ctx c = {self, 0, 0};
    if (!PyArg_ParseTuple(args, "idLi", &fd, &c.now, &c.now_ms, &budget)) return NULL;
    if (ensure_lists(self) < 0) return NULL;
    long total = read_datagrams_ahead(fd, self->rxbuf, (size_t)self->max_datagram + 1, budget, drain_one,
                                      drain_ahead, &c);
    return total < 0 ? NULL : PyLong_FromLong(total);
}

static PyObject *Lane_receive(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    Py_buffer data;
    PyObject *peer;
    double now;
    long long now_ms;
    if (!PyArg_ParseTuple(args, "y*OdL", &data, &peer, &now, &now_ms)) return NULL;
    addr_t a;
    socklen_t alen;
    int r = ensure_lists(self);
    if (r == 0) r = addr_from_tuple(peer, &a, &alen);
    if (r == 0) r = feed(self, data.buf, data.len, &a, alen, now, now_ms);
    PyBuffer_Release(&data);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

/* One CoAP message that DTLS decrypted (the edge checked size and rate on the record already). */
static PyObject *Lane_receive_plain(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "receive_plain(data, peer, session_target, now, now_ms)");
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) return NULL;
    addr_t a;
    socklen_t alen;
    Py_ssize_t session = PyLong_AsSsize_t(args[2]);
    double now = PyFloat_AsDouble(args[3]);
    long long now_ms = PyLong_AsLongLong(args[4]);
    int r = PyErr_Occurred() ? -1 : ensure_lists(self);
    if (r == 0) r = addr_from_tuple(args[1], &a, &alen);
    if (r == 0) { /* (larger than a datagram: the Python path's, as whatever the lane does not know) */
        r = data.len > self->max_datagram ? 1
            : classify(self, data.buf, data.len, &a, alen, args[1], now, now_ms, session < 0 ? NO_DEVICE : session, 0);
        if (r == 1) {
            PyObject *pair = PyTuple_Pack(2, args[0], args[1]);
            r = pair ? PyList_Append(self->slow, pair) : -1;
            Py_XDECREF(pair);
        }
    }
    PyBuffer_Release(&data);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- CoAPS records ------------ */
/* CoAPS on corem's own DTLS engine (issue 27): the lane reads the socket (drain_records), opens
 * the one-record datagrams of the sessions Python registered (add_session) with their own read
 * Protection and Window, offers the plaintext to classify as receive_plain would, and seals its
 * answers with their write Protection (send_records).  Everything else -- handshakes, alerts,
 * several records in a datagram, unknown sessions, a CID record from a new address (the engine
 * moves the session: RFC 9146 §6), a replay, a record that does not authenticate -- goes to
 * Python as the datagram itself, untouched: the window is marked only once the lane took the
 * record, so Python can still open it (and counts what it drops, as before). */
static dtls_lane_api *DTLS; /* _records' table, imported at the first add_session */
#define REPORT_EVERY 1.0     /* seconds between two reports of a session to Python */
#define DTLS_TLS12_CID_TYPE 25

static int dtls_api(void) {
    if (DTLS) return 0;
    dtls_lane_api *api = PyCapsule_Import(DTLS_LANE_API_NAME, 0);
    if (!api) return -1;
    if (api->version != DTLS_LANE_API_VERSION) {
        PyErr_SetString(PyExc_ImportError, "corem.dtls.engine._records: another version of its lane API");
        return -1;
    }
    DTLS = api;
    return 0;
}

static dsess_t *session_by_addr(Lane *self, const addr_t *a) {
    if (!self->ds.count) return NULL;
    uint8_t key[KEYLEN];
    addr_key(a, 0, 1, key);
    long i = ds_find(&self->ds, 0, key, KEYLEN);
    return i < 0 ? NULL : &self->ds.e[i];
}

/* A tls12_cid record's session, by the CID this side chose (at d[11]), or NULL. */
static dsess_t *session_by_cid(Lane *self, const uint8_t *d, size_t n) {
    size_t cl = self->ds.cid_len;
    if (!self->ds.count || !cl || n < 13 + cl || d[0] != DTLS_TLS12_CID_TYPE) return NULL;
    long i = ds_find(&self->ds, 1, d + 11, cl);
    return i < 0 ? NULL : &self->ds.e[i];
}

/* The session a datagram of the CoAPS socket names: by its CID, else by its address (or NULL). */
static dsess_t *record_session(Lane *self, const uint8_t *d, size_t n, const addr_t *a) {
    return n < 13 ? NULL : d[0] == DTLS_TLS12_CID_TYPE ? session_by_cid(self, d, n) : session_by_addr(self, a);
}

static Py_ssize_t session_target(Lane *self, dsess_t *s) { return cached_target(self, s->name, &s->target, &s->targets_gen); }

static int to_python(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    self->records_to_python++;
    return append_pair(self->slow, d, n, a, alen);
}

static int wire_push(Lane *self);
static void send_wire(Lane *self, int fd);
#define HELLO_QUEUE_MAX 1024 /* datagrams waiting for the kernel past which hellos are left to Python */

/* A new peer's ClientHello without a cookie -- one epoch-0 handshake record making up the datagram,
 * as the engine's shortcut takes it (records.py lone_epoch0_record_untrusted) -- answered here with
 * the HelloVerifyRequest the engine would send (client_hello.h `hello_verify_answer`: the same
 * secret, the peer named as the engine names it, repr(peer)), queued with the sealed records and
 * sent at the end of the drain: a flood of hellos from spoofed addresses costs no Python, and a
 * device's first round trip is shorter.  1 answered (counted as the engine counts it), 0 Python's
 * (anything else, and what this cannot do: no memory, libcrypto failing -- Python says why). */
static int lane_hello_verify(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    uint64_t seq;
    if (!dtls_lone_epoch0(d, n, 22, &seq) || d[DTLS_HEADER] != 1 ||
        self->wire_len >= HELLO_QUEUE_MAX) /* (the kernel takes nothing now: no more queued here) */
        return 0;
    PyObject *peer = addr_tuple(a, alen), *repr = peer ? PyObject_Repr(peer) : NULL;
    Py_XDECREF(peer);
    Py_ssize_t rlen = 0;
    const char *r = repr ? PyUnicode_AsUTF8AndSize(repr, &rlen) : NULL;
    int got = 0;
    if (r && wire_push(self) == 0) {
        wire_t *w = &self->wire[self->wire_len];
        got = hello_verify_answer(d + DTLS_HEADER, n - DTLS_HEADER, seq, (const uint8_t *)r, (size_t)rlen,
                                  self->cookie_secret, self->cookie_secret_len, w->data) > 0;
        if (got) {
            w->addr = *a;
            w->alen = alen;
            w->len = HELLO_VERIFY_RECORD;
            self->wire_len++;
            self->hello_verify++;
            self->hello_verify_bytes += HELLO_VERIFY_RECORD;
            self->rec_hellos++;
            self->rec_hello_bytes += HELLO_VERIFY_RECORD;
            self->rec_datagrams++;
            self->rec_bytes += n;
        }
    }
    Py_XDECREF(repr);
    PyErr_Clear();
    return got;
}

/* One datagram of the CoAPS socket; `hellos`: a new peer's ClientHello is answered here (only
 * where the answers are sent at the end: drain_records on a socket). */
static int feed_record(Lane *self, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen, double now,
                       long long now_ms, int hellos, const found_t *found) {
    if ((Py_ssize_t)n > self->max_datagram) {
        self->oversized++;
        return 0;
    }
    dsess_t *s = !found || found->version != self->ds.version ? record_session(self, d, n, a)
                 : found->entry < 0 ? NULL : &self->ds.e[found->entry];
    int fetched = s && s->ahead && s->ahead_in == self->drains; /* (its dedup cell: drain_record_ahead) */
    if (fetched) s->ahead--;
    if (self->limit && !rate_allow(self, a, now)) {
        /* over its source's rate: a datagram of a known session still passes (as
         * EngineServer.credentialed: the peer has a session, or the record's CID names one) */
        if (!s && !(n >= 13 && d[0] == DTLS_TLS12_CID_TYPE && session_by_addr(self, a)) &&
            !(self->nexempt && in_exempt_network(self, a))) {
            self->dropped++;
            return 0;
        }
        self->exempted++;
    }
    if (!s) return hellos && self->cookie_secret_len && lane_hello_verify(self, d, n, a, alen) ? 0
                                                                                        : to_python(self, d, n, a, alen);
    if (s->alen != alen || memcmp(&s->addr, a, alen) != 0) {
        /* a CID record from another address: the engine moves the session if it is the newest.
         * (compared as keys: the port and address, not the sockaddr's padding) */
        uint8_t key[KEYLEN];
        addr_key(a, 0, 1, key);
        if (memcmp(key, s->akey, KEYLEN) != 0) return to_python(self, d, n, a, alen);
    }
    if ((int64_t)dtls_be48(d + 5) <= s->floor) return to_python(self, d, n, a, alen);
    if (!fetched) { /* (a record given by the caller: fetched while it is opened, which is late) */
        uint8_t key[KEYLEN];
        addr_key(a, s->next_mid, 1, key);
        fm_prefetch(&self->dedup, key);
    }
    size_t plain_len = 0;
    uint8_t ctype = 0;
    uint64_t seq = 0;
    int r = DTLS->open_one(s->read, s->window, d, n, s->cid_in, s->cid_in_len, self->plainbuf, &plain_len, &ctype,
                           &seq);
    if (r != 0 || ctype != 23) return to_python(self, d, n, a, alen); /* (an alert: Python's, window untouched) */
    DTLS->mark(s->window, seq);
    if (plain_len >= 4) s->next_mid = (uint16_t)((self->plainbuf[2] << 8 | self->plainbuf[3]) + 1);
    self->records_opened++;
    self->rec_datagrams++;
    self->rec_bytes += n;
    /* reported to Python: a saved session's record numbers are due in the store before its
     * readings go to the sink (issue 26: noted here, taken by take_marks -- once per store write,
     * not per batch), the session itself at most once per REPORT_EVERY (take_records: its
     * last_seen, the checkpoint due; no Python per batch for each of thousands of sessions) */
    if (s->mark_key != Py_None && ds_mark_due(&self->ds, (int32_t)(s - self->ds.e)) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (s->epoch != self->depoch && now - s->reported >= REPORT_EVERY) {
        s->epoch = self->depoch;
        s->reported = now;
        if (PyList_Append(self->dtouched, s->owner) < 0) return -1;
    }
    Py_ssize_t target = session_target(self, s);
    PyObject *peer = s->peer;
    Py_INCREF(peer); /* (the session may be dropped by what classify calls into) */
    int c = classify(self, self->plainbuf, plain_len, a, alen, peer, now, now_ms, target < 0 ? NO_DEVICE : target,
                     (uint32_t)(s - self->ds.e) + 1);
    if (c == 1) { /* decrypted, not the lane's: the endpoint's, as a message */
        PyObject *m = PyBytes_FromStringAndSize((const char *)self->plainbuf, (Py_ssize_t)plain_len);
        PyObject *pair = m ? PyTuple_Pack(2, m, peer) : NULL;
        c = pair ? PyList_Append(self->plain, pair) : -1;
        Py_XDECREF(m);
        Py_XDECREF(pair);
    }
    Py_DECREF(peer);
    return c < 0 ? -1 : 0;
}

static int drain_record(void *ctx, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    drain_ctx *c = ctx;
    const found_t *f = NULL;
    unsigned long seq = c->fed_seq++;
    if (c->len) {
        f = &c->found[c->head];
        c->head = (c->head + 1) % FOUND_RING;
        c->len--;
        if (f->seq != seq) f = NULL; /* (not this datagram's: the two calls parted -- looked up again) */
    }
    return feed_record(c->lane, d, n, a, alen, c->now, c->now_ms, 1, f);
}

/* (read_datagrams_ahead) The record's session, found once for both calls (`found`), and what
 * taking the record will look up in the dedup map, fetched ahead as drain_ahead does: its
 * exchange's index cell, and what its push will evict.  The record is sealed, but its message id
 * is most likely its session's next, counting the records of that session already seen ahead
 * (`ahead`: ids go up by one); a wrong guess is a wasted prefetch.  (Fetched only while the
 * record is opened, the cell may still be on its way when the lookup comes.) */
static int drain_record_ahead(void *ctx, const uint8_t *d, size_t n, const addr_t *a, socklen_t alen) {
    drain_ctx *c = ctx;
    Lane *self = c->lane;
    (void)alen;
    dsess_t *s = (Py_ssize_t)n > self->max_datagram ? NULL : record_session(self, d, n, a);
    if (c->len < FOUND_RING) {
        found_t *f = &c->found[(c->head + c->len++) % FOUND_RING];
        f->seq = c->ahead_seq;
        f->entry = s ? (int32_t)(s - self->ds.e) : -1;
        f->version = self->ds.version;
    }
    c->ahead_seq++;
    if (s) {
        if (s->ahead_in != self->drains) {
            s->ahead_in = self->drains;
            s->ahead = 0;
        }
        uint8_t key[KEYLEN];
        addr_key(a, (uint16_t)(s->next_mid + s->ahead), 1, key);
        s->ahead++;
        fm_prefetch(&self->dedup, key);
    }
    fm_prefetch_evicted(&self->dedup, AHEAD);
    return 0;
}

static int ensure_record_lists(Lane *self) {
    if (ensure_lists(self) < 0) return -1;
    if (!self->plain && !(self->plain = PyList_New(0))) return -1;
    if (!self->dtouched && !(self->dtouched = PyList_New(0))) return -1;
    if (!self->plainbuf && !(self->plainbuf = PyMem_Malloc((size_t)self->max_datagram + 1))) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* drain_records(fd, now, now_ms, budget) -> datagrams read */
static PyObject *Lane_drain_records(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    int fd, budget;
    drain_ctx c = {self, 0, 0};
    if (!PyArg_ParseTuple(args, "idLi", &fd, &c.now, &c.now_ms, &budget)) return NULL;
    if (ensure_record_lists(self) < 0 || dtls_api() < 0) return NULL;
    size_t queued = self->wire_len; /* (what waits already: hellos answered now are what it grows by) */
    self->drains++;
    long total = read_datagrams_ahead(fd, self->rxbuf, (size_t)self->max_datagram + 1, budget, drain_record,
                                      drain_record_ahead, &c);
    if (self->wire_len > queued) send_wire(self, fd); /* (at once: the device's next flight is on its way) */
    return total < 0 ? NULL : PyLong_FromLong(total);
}

/* receive_record(datagram, peer, now, now_ms): one datagram given by the caller (sans-IO) */
static PyObject *Lane_receive_record(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    Py_buffer data;
    PyObject *peer;
    double now;
    long long now_ms;
    if (!PyArg_ParseTuple(args, "y*OdL", &data, &peer, &now, &now_ms)) return NULL;
    addr_t a;
    socklen_t alen;
    int r = ensure_record_lists(self);
    if (r == 0 && !DTLS) r = dtls_api();
    if (r == 0) r = addr_from_tuple(peer, &a, &alen);
    if (r == 0) r = feed_record(self, data.buf, data.len, &a, alen, now, now_ms, 0, NULL); /* (no socket to answer on) */
    PyBuffer_Release(&data);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

/* take_records() -> (decrypted messages not taken [(bytes, peer)], owners of the sessions whose
 * records were taken since the last call (each at most once a second), how many saved sessions'
 * marks are due (take_marks), the datagrams taken, their bytes, the HelloVerifyRequests sent, their
 * bytes) */
static PyObject *Lane_take_records(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    if (ensure_record_lists(self) < 0) return NULL;
    PyObject *r = Py_BuildValue("(OOnKKKK)", self->plain, self->dtouched, (Py_ssize_t)(self->ds.ndue + self->ds.nleft),
                                self->rec_datagrams, self->rec_bytes, self->rec_hellos, self->rec_hello_bytes);
    if (!r) return NULL;
    Py_CLEAR(self->plain);
    Py_CLEAR(self->dtouched);
    self->rec_datagrams = self->rec_bytes = self->rec_hellos = self->rec_hello_bytes = 0;
    self->depoch++;
    return r;
}

/* take_marks() -> [(window top, row key)]: the saved sessions' record numbers due in the store
 * (every one that took records since the last call, and those of such sessions dropped since),
 * taken.  Called on the event loop (written at once) or from the bus's worker thread just before
 * a commit (under the GIL, as every call into the lane). */
static PyObject *Lane_take_marks(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    return ds_take_marks(&self->ds, 0);
}

/* take_marks_packed() -> bytes: take_marks as one pack (dtls_sessions.h ds_pack_marks), the row the
 * embedded bus carries in each batch's own transaction (bus/sqlite.py `carry`, dtls/store.py). */
static PyObject *Lane_take_marks_packed(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    return ds_take_marks(&self->ds, 1);
}

/* add_session(owner, peer, cid_in, cid_out, read, window, write, name, floor, mark_key): an
 * established session whose records the lane may open and seal (replacing any at its address or
 * CID); `mark_key` (bytes, or None): a saved session's key in the session store, whose record
 * numbers take_records reports in every batch the lane took records of it. */
static PyObject *Lane_add_session(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "add_session(owner, peer, cid_in, cid_out, read, window, write, name, floor, mark_key)");
        return NULL;
    }
    if (args[9] != Py_None && !PyBytes_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "add_session: mark_key is bytes or None");
        return NULL;
    }
    if (dtls_api() < 0) return NULL;
    self->ds.top = DTLS->window_top;
    PyObject *owner = args[0], *peer = args[1], *read = args[4], *window = args[5], *write = args[6];
    if (Py_TYPE(read) != DTLS->protection || Py_TYPE(write) != DTLS->protection || Py_TYPE(window) != DTLS->window) {
        PyErr_SetString(PyExc_TypeError, "add_session: read and write are _records.Protection, window a _records.Window");
        return NULL;
    }
    if (!PyBytes_Check(args[2]) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "add_session: the CIDs are bytes");
        return NULL;
    }
    Py_ssize_t cin = PyBytes_GET_SIZE(args[2]), cout = PyBytes_GET_SIZE(args[3]);
    if (cin > DS_MAX_CID || cout > DS_MAX_PEER_CID || (cin && self->ds.cid_len && (size_t)cin != self->ds.cid_len)) {
        PyErr_SetString(PyExc_ValueError, "add_session: a CID of another length");
        return NULL;
    }
    long long floor = PyLong_AsLongLong(args[8]);
    if (floor == -1 && PyErr_Occurred()) return NULL;
    addr_t a;
    socklen_t alen;
    if (addr_from_tuple(peer, &a, &alen) < 0) return NULL;
    uint8_t key[KEYLEN];
    addr_key(&a, 0, 1, key);
    long old = ds_find(&self->ds, 0, key, KEYLEN);
    if (old >= 0) ds_remove(&self->ds, (int32_t)old);
    if (cin && (old = ds_find(&self->ds, 1, (const uint8_t *)PyBytes_AS_STRING(args[2]), (size_t)cin)) >= 0)
        ds_remove(&self->ds, (int32_t)old);
    int32_t i = ds_new(&self->ds);
    if (i < 0) return PyErr_NoMemory();
    dsess_t *s = &self->ds.e[i];
    s->owner = Py_NewRef(owner);
    s->peer = Py_NewRef(peer);
    s->read = Py_NewRef(read);
    s->window = Py_NewRef(window);
    s->write = Py_NewRef(write);
    s->name = Py_NewRef(args[7]);
    s->addr = a;
    s->alen = alen;
    memcpy(s->akey, key, KEYLEN);
    s->cid_in_len = (uint8_t)cin;
    memcpy(s->cid_in, PyBytes_AS_STRING(args[2]), (size_t)cin);
    s->cid_out_len = (uint8_t)cout;
    memcpy(s->cid_out, PyBytes_AS_STRING(args[3]), (size_t)cout);
    s->floor = floor;
    s->mark_key = Py_NewRef(args[9]);
    s->due_at = -1;
    s->reported = -INFINITY;
    s->target = -1;
    s->targets_gen = self->targets_gen - 1; /* (resolved at its first record) */
    s->epoch = self->depoch - 1;
    s->live = 1;
    self->ds.count++;
    if (cin) self->ds.cid_len = (size_t)cin;
    if (ds_index_add(&self->ds, 0, i) < 0 || (cin && ds_index_add(&self->ds, 1, i) < 0)) {
        ds_remove(&self->ds, i);
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

/* drop_session(owner, peer, cid_in): the session is no longer the lane's (only if `owner` is the one
 * registered there) */
static PyObject *Lane_drop_session(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs != 3 || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "drop_session(owner, peer, cid_in: bytes)");
        return NULL;
    }
    if (!self->ds.count) Py_RETURN_FALSE;
    int dropped = 0;
    addr_t a;
    socklen_t alen;
    if (addr_from_tuple(args[1], &a, &alen) < 0) return NULL;
    dsess_t *s = session_by_addr(self, &a);
    if (s && s->owner == args[0]) {
        ds_remove(&self->ds, (int32_t)(s - self->ds.e));
        dropped = 1;
    }
    Py_ssize_t cin = PyBytes_GET_SIZE(args[2]);
    if (cin && self->ds.count) {
        long i = ds_find(&self->ds, 1, (const uint8_t *)PyBytes_AS_STRING(args[2]), (size_t)cin);
        if (i >= 0 && self->ds.e[i].owner == args[0]) {
            ds_remove(&self->ds, (int32_t)i);
            dropped = 1;
        }
    }
    return PyBool_FromLong(dropped);
}

static int wire_push(Lane *self) {
    if (self->wire_len == self->wire_cap) {
        size_t cap = self->wire_cap ? self->wire_cap * 2 : 64;
        wire_t *w = PyMem_Realloc(self->wire, cap * sizeof(wire_t));
        if (!w) {
            PyErr_NoMemory();
            return -1;
        }
        self->wire = w;
        self->wire_cap = cap;
    }
    return 0;
}

/* One queue of datagrams out through sendmmsg, VLEN at a time, until the kernel would block: the
 * answers (`out_t`) and the sealed records (`wire_t`) alike, each read through `at`.  Returns how
 * many left the queue (sent, or skipped after a send error), from its start; counted here. */
typedef void (*datagram_at)(void *queue, size_t i, struct mmsghdr *msg, struct iovec *iov);

static void out_at(void *queue, size_t i, struct mmsghdr *msg, struct iovec *iov) {
    out_t *o = (out_t *)queue + i;
    set_msg(msg, iov, o->data, o->len, &o->addr, o->alen);
}

static void wire_at(void *queue, size_t i, struct mmsghdr *msg, struct iovec *iov) {
    wire_t *w = (wire_t *)queue + i;
    set_msg(msg, iov, w->data, w->len, &w->addr, w->alen);
}

static size_t send_queue(Lane *self, int fd, void *queue, size_t n, datagram_at at) {
    size_t done = 0;
    int blocked = 0;
    struct mmsghdr msgs[VLEN];
    struct iovec iov[VLEN];
    while (done < n && !blocked) {
        int want = n - done < VLEN ? (int)(n - done) : VLEN;
        for (int i = 0; i < want; i++) at(queue, done + i, &msgs[i], &iov[i]);
        int sent = send_datagrams(fd, msgs, want, &blocked);
        if (sent < 0) {
            self->send_errors++;
            sent = 1; /* skipped, not sent */
        } else {
            self->datagrams_out += sent;
            for (int i = 0; i < sent; i++) self->bytes_out += iov[i].iov_len;
        }
        done += sent;
    }
    self->send_blocked += blocked;
    return done;
}

/* The sealed records (and HelloVerifyRequests) queued, to the kernel as far as it takes them now;
 * the rest stays queued, in order. */
static void send_wire(Lane *self, int fd) {
    size_t done = send_queue(self, fd, self->wire, self->wire_len, wire_at);
    if (done) {
        memmove(self->wire, self->wire + done, (self->wire_len - done) * sizeof(wire_t));
        self->wire_len -= done;
    }
}

/* send_records(fd) -> answers left for Python: the outbox's answers to registered sessions sealed
 * with their write Protection (its next sequence number, below its limit) and sent (sendmmsg);
 * the rest -- no session, or the reservation used up -- stays in the outbox for take_outbox
 * (Python's wrap saves the session again, or drops it, as for any answer). */
static PyObject *Lane_send_records(Lane *self, PyObject *arg) {
    if (!lane_ready(self)) return NULL;
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    size_t keep = 0;
    for (size_t i = 0; i < self->out_len; i++) {
        out_t *o = &self->out[i];
        /* (the session that took the request, while no session was added or removed since:
         * the one at its address -- the lane takes only the records of a session's address) */
        dsess_t *s = !DTLS ? NULL
                     : o->ds_entry && o->ds_version == self->ds.version ? &self->ds.e[o->ds_entry - 1]
                                                                          : session_by_addr(self, &o->addr);
        if (s) {
            if (wire_push(self) < 0) return NULL;
            wire_t *w = &self->wire[self->wire_len];
            Py_ssize_t n = DTLS->seal_next(s->write, 23, o->data, o->len, s->cid_out, s->cid_out_len, w->data,
                                           sizeof w->data);
            if (n > 0) {
                w->addr = o->addr;
                w->alen = o->alen;
                w->len = (uint16_t)n;
                self->wire_len++;
                self->records_sealed++;
                Py_CLEAR(o->peer);
                continue;
            }
        }
        if (keep != i) self->out[keep] = *o;
        keep++;
    }
    self->out_len = keep;
    send_wire(self, fd);
    return PyLong_FromSize_t(self->out_len);
}

/* cookie_secret(secret): corem's DTLS engine's current cookie secret (at most 64 bytes; b"": the
 * hellos go to Python), set again when it rotates: the lane answers new peers' cookie-less hellos
 * with it (lane_hello_verify) */
static PyObject *Lane_cookie_secret(Lane *self, PyObject *arg) {
    if (!lane_ready(self)) return NULL;
    char *b;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &b, &n) < 0) return NULL;
    if (n > (Py_ssize_t)sizeof self->cookie_secret) {
        PyErr_SetString(PyExc_ValueError, "cookie_secret: at most 64 bytes");
        return NULL;
    }
    if (n && !hmac256_fetch()) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL has no SHA2-256");
        return NULL;
    }
    memcpy(self->cookie_secret, b, (size_t)n);
    self->cookie_secret_len = (size_t)n;
    Py_RETURN_NONE;
}

/* limit(rate, burst, max_sources): the per-source rate limit (the edge's settings, when the lane
 * reads a CoAPS socket itself) */
static PyObject *Lane_limit(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    double rate, burst;
    Py_ssize_t max_sources;
    if (!PyArg_ParseTuple(args, "ddn", &rate, &burst, &max_sources)) return NULL;
    if (rate <= 0 || burst < 1 || max_sources < 1 || max_sources > FM_MAX) {
        PyErr_SetString(PyExc_ValueError, "limit: rate > 0, burst >= 1, 1 <= max_sources <= 2**26");
        return NULL;
    }
    if (!self->buckets.ring ? fm_init(&self->buckets, (size_t)max_sources, sizeof(bucket_t), 0) < 0
                            : (size_t)max_sources != self->buckets.cap &&
                                  fm_resize(&self->buckets, (size_t)max_sources) < 0) /* (a SIGHUP's new bound) */
        return PyErr_NoMemory();
    self->rate = rate;
    self->burst = burst;
    self->limit = 1;
    Py_RETURN_NONE;
}

/* new_session(peer, now): the peer began a new DTLS session (see from_old_session). */
static PyObject *Lane_new_session(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    PyObject *peer;
    double now;
    if (!PyArg_ParseTuple(args, "Od", &peer, &now)) return NULL;
    addr_t a;
    socklen_t alen;
    if (addr_from_tuple(peer, &a, &alen) < 0) return NULL;
    if (!self->sessions.ring && fm_init(&self->sessions, self->dedup.cap, sizeof(session_t), 0) < 0) return PyErr_NoMemory();
    uint8_t key[KEYLEN];
    addr_key(&a, 0, 1, key);
    long slot = fm_find(&self->sessions, key);
    int evicted;
    session_t *e = fm_entry(&self->sessions, slot >= 0 ? (size_t)slot : fm_push(&self->sessions, key, &evicted));
    e->began = now;
    if (now > self->newest_began) self->newest_began = now;
    Py_RETURN_NONE;
}

/* moved(old, new, now): a DTLS session with a Connection ID now answers at `new` (RFC 9146 §6):
 * for EXCHANGE_LIFETIME, a request from `new` whose message id the lane saw from `old` is its
 * duplicate (moved_from).  Call new_session(new) too: `new`'s earlier exchanges are not its. */
static PyObject *Lane_moved(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    PyObject *old, *new;
    double now;
    if (!PyArg_ParseTuple(args, "OOd", &old, &new, &now)) return NULL;
    addr_t a, b;
    socklen_t alen, blen;
    if (addr_from_tuple(old, &a, &alen) < 0 || addr_from_tuple(new, &b, &blen) < 0) return NULL;
    if (!self->moved.ring && fm_init(&self->moved, self->dedup.cap, sizeof(moved_t), 0) < 0) return PyErr_NoMemory();
    uint8_t key[KEYLEN];
    addr_key(&b, 0, 1, key);
    long slot = fm_find(&self->moved, key);
    int evicted;
    moved_t *e = fm_entry(&self->moved, slot >= 0 ? (size_t)slot : fm_push(&self->moved, key, &evicted));
    e->old = a;
    e->at = now;
    Py_RETURN_NONE;
}

/* remember(peer, mid, at, token=None): an exchange whose reading was committed before a restart
 * (read back from the bus by corem/bus/recovery.py; given oldest first, `at` on the lane's clock):
 * a CON retransmission of it -- a request with `token`; any token when None, what a record that
 * did not name it gives -- is answered 2.04 without a second reading, and a request with another
 * token is a new one (seen_before).  False if it is known already. */
static PyObject *Lane_remember(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    PyObject *peer, *token = Py_None;
    int mid;
    double at;
    if (!PyArg_ParseTuple(args, "Oid|O", &peer, &mid, &at, &token)) return NULL;
    if (mid < 0 || mid > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "remember: a message id is 0-65535");
        return NULL;
    }
    if (token != Py_None && !PyBytes_Check(token)) {
        PyErr_SetString(PyExc_TypeError, "remember: a token is bytes or None");
        return NULL;
    }
    if (token != Py_None && PyBytes_GET_SIZE(token) > 8) {
        PyErr_SetString(PyExc_ValueError, "remember: a token is at most 8 bytes");
        return NULL;
    }
    addr_t a;
    socklen_t alen;
    if (addr_from_tuple(peer, &a, &alen) < 0) return NULL;
    uint8_t key[KEYLEN];
    addr_key(&a, (uint16_t)mid, 1, key);
    if (fm_find(&self->dedup, key) >= 0) Py_RETURN_FALSE;
    exchange_t *x = fm_entry(&self->dedup, remember(self, key, at, 0, 0, -1));
    x->recovered = RECOVERED_ANY;
    if (token != Py_None) {
        x->recovered = RECOVERED_TOKEN;
        x->tkl = (uint8_t)PyBytes_GET_SIZE(token);
        memcpy(x->reply, PyBytes_AS_STRING(token), x->tkl); /* (a recovered exchange has no reply) */
    }
    self->recovered++;
    Py_RETURN_TRUE;
}

static PyObject *Lane_take(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    if (ensure_lists(self) < 0) return NULL;
    PyObject *r = PyTuple_Pack(4, self->slow, self->records, self->ctxs, self->touched);
    if (!r) return NULL;
    Py_CLEAR(self->slow);
    Py_CLEAR(self->records);
    Py_CLEAR(self->ctxs);
    Py_CLEAR(self->touched);
    self->epoch++; /* a new batch: each device is reported once per batch */
    return r;
}

/* The answer to a reading is queued: its time since its batch's receipt in the latency histogram. */
static void lat_observe(Lane *self, const pending_t *q) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double d = t.tv_sec + t.tv_nsec * 1e-9 - q->rx;
    if (d < 0) d = 0;
    size_t b = 0;
    while (b < LAT_N - 1 && d > LAT_BOUNDS[b]) b++;
    self->lat[q->door][b]++;
    self->lat_sum[q->door] += d;
}

static pending_t *pending_of(Lane *self, PyObject *ctx) {
    long long v = PyLong_AsLongLong(ctx);
    if (v == -1 && PyErr_Occurred()) return NULL;
    int32_t h = (int32_t)(v >> 32);
    uint32_t gen = (uint32_t)v;
    if (h < 0 || h >= self->npending_cap || self->pending[h].state == P_FREE || self->pending[h].gen != gen) {
        PyErr_SetString(PyExc_KeyError, "no such exchange waiting in the lane");
        return NULL;
    }
    return &self->pending[h];
}

/* The exchange pending_of found (its handle and generation) again after Python ran meanwhile: that
 * code may have grown the table (moving it) or given this exchange's verdict itself.  Its entry, or
 * NULL when it is no longer waiting (no exception set). */
static pending_t *pending_again(Lane *self, int32_t h, uint32_t gen) {
    pending_t *q = h < self->npending_cap ? &self->pending[h] : NULL;
    return q && q->state != P_FREE && q->gen == gen ? q : NULL;
}

#define ANSWERED_MEANWHILE "no such exchange waiting in the lane (answered while next_mid ran)"

/* An OSCORE request's answer sealed (protect.py `protect` with the request's nonce: its first
 * answer), the ciphertext and tag into `out`: 2.04 bare, or BUSY -- 5.03, Max-Age 5 and the reason,
 * whole (outside it is a 2.04: no error to cut to the request's size).  Its length, or -1. */
#define BUSY_WHY "bus unavailable; retry later"
#define OSC_SEALED_MAX (5 + sizeof BUSY_WHY - 1 + OSC_TAG)
static long osc_seal_answer(Lane *self, const pending_t *q, int ok, uint8_t *out) {
    uint8_t plain[5 + sizeof BUSY_WHY];
    size_t pl = 0;
    if (ok) {
        plain[pl++] = 0x44;
    } else {
        static const uint8_t head[] = {0xA3, 0xD1, 0x01, 5, 0xff}; /* 5.03, Max-Age 5, the payload marker */
        memcpy(plain, head, sizeof head);
        memcpy(plain + sizeof head, BUSY_WHY, sizeof BUSY_WHY - 1);
        pl = sizeof head + sizeof BUSY_WHY - 1;
    }
    if (aead_ccm(q->osc->seal, 1, NULL, q->nonce, q->aad, q->aadlen, plain, out, pl, out + pl, OSC_TAG) != 1) return -1;
    self->oscore_sealed++;
    return (long)(pl + OSC_TAG);
}

/* `points` more of `device`'s readings committed (Lane_take_committed hands the counts over):
 * 0, or -1 with an exception set.  An open-addressing table by address, at most half full. */
static inline size_t committed_slot(PyObject *device, size_t mask) {
    return ((uintptr_t)device >> 4) * 0x9E3779B97F4A7C15ULL >> 32 & mask;
}

static int count_committed(Lane *self, PyObject *device, long long points) {
    if (2 * (self->committed_len + 1) > self->committed_cap) {
        size_t cap = self->committed_cap ? 2 * self->committed_cap : 64, old = self->committed_cap;
        __typeof__(self->committed) t = PyMem_Calloc(cap, sizeof *t), o = self->committed;
        if (!t) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < old; i++) {
            if (!o[i].device) continue;
            size_t j = committed_slot(o[i].device, cap - 1);
            while (t[j].device) j = (j + 1) & (cap - 1);
            t[j] = o[i];
        }
        PyMem_Free(o);
        self->committed = t;
        self->committed_cap = cap;
    }
    size_t mask = self->committed_cap - 1, j = committed_slot(device, mask);
    while (self->committed[j].device && self->committed[j].device != device) j = (j + 1) & mask;
    if (!self->committed[j].device) {
        Py_INCREF(device);
        self->committed[j].device = device;
        self->committed[j].points = 0;
        self->committed_len++;
    }
    self->committed[j].points += points;
    return 0;
}

/* The sink's verdict on one record: 2.04 once durable, 5.03 with Max-Age 5 if not; in the ACK, or
 * -- past the piggyback timeout -- as a separate response: `on_late(peer, token, code, request
 * size)` hands it to Python's endpoint, which sends and retransmits it. */
static PyObject *Lane_committed(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "committed(ctx, error)");
        return NULL;
    }
    pending_t *q = pending_of(self, args[0]);
    if (!q) return NULL;
    int32_t h = (int32_t)(q - self->pending); /* (q is found again by these after a call to Python) */
    uint32_t gen = q->gen;
    if (args[1] != Py_None) q->failed = 1;
    if (q->left > 1) { /* (a request of several points: answered at its last one's) */
        q->left--;
        Py_RETURN_NONE;
    }
    int ok = !q->failed;
    int code = ok ? 0x44 : 0xA3;
    if (ok) {
        self->accepted += q->points;
        if (count_committed(self, q->device, q->points) < 0) return NULL;
    } else {
        self->refusals++;
    }
    if (from_old_session(self, &q->addr, q->at)) {
        /* committed, but its session is gone: no answer (see from_old_session) */
    } else if (q->state == P_PENDING) {
        uint8_t reply[REPLY_MAX];
        size_t len = 4 + q->tkl;
        uint16_t mid = q->mid; /* (a CON's: the piggybacked ACK) */
        if (q->non) { /* a NON response, of a message id of ours: the endpoint's, which gives every other */
            if (!self->next_mid) { /* (deleted since the request came: the lane took it with one) */
                pending_free(self, h);
                PyErr_SetString(PyExc_TypeError, "committed: a NON's answer needs next_mid, which is not set");
                return NULL;
            }
            PyObject *f = Py_NewRef(self->next_mid); /* (its own: the call may delete the attribute) */
            PyObject *m = PyObject_CallNoArgs(f);
            Py_DECREF(f);
            long v = m ? PyLong_AsLong(m) : -1;
            Py_XDECREF(m);
            if (v == -1 && PyErr_Occurred()) {
                if (pending_again(self, h, gen)) pending_free(self, h);
                return NULL;
            }
            if (!(q = pending_again(self, h, gen))) {
                PyErr_SetString(PyExc_KeyError, ANSWERED_MEANWHILE);
                return NULL;
            }
            mid = (uint16_t)v;
        }
        reply[0] = (q->non ? 0x50 : 0x60) | q->tkl;
        reply[1] = (uint8_t)code;
        reply[2] = mid >> 8;
        reply[3] = mid & 0xff;
        memcpy(reply + 4, q->token, q->tkl);
        if (q->osc) { /* sealed, as the Sealer seals a first answer: 2.04 outside, the OSCORE option empty */
            reply[1] = code = 0x44;
            reply[len++] = OSC_OPTION << 4;
            reply[len++] = 0xff;
            long m = osc_seal_answer(self, q, ok, reply + len);
            if (m < 0) {
                pending_free(self, h);
                PyErr_SetString(PyExc_RuntimeError, "oscore: libcrypto failed to seal an answer");
                return NULL;
            }
            len += (size_t)m;
        } else if (!ok) { /* Max-Age: 5, and as much of the reason as fits in the request's size */
            static const char why[] = BUSY_WHY;
            reply[len++] = 0xD1;
            reply[len++] = 0x01;
            reply[len++] = 5; /* (the reply buffer holds the whole reason: 4 + 8 + 3 + 1 + 28 bytes) */
            long room = self->limit_error_size ? (long)q->size - (long)(len + 1) : (long)sizeof why - 1;
            if (room > (long)sizeof why - 1) room = sizeof why - 1;
            if (room > 0) {
                reply[len++] = 0xff;
                memcpy(reply + len, why, room);
                len += room;
            }
        }
        exchange_t *x = q->non ? NULL : exchange_of(self, q); /* (a duplicate NON gets nothing, as from the endpoint) */
        if (x) {
            memcpy(x->reply, reply, len);
            x->reply_len = (uint8_t)len;
        }
        if (queue_out(self, &q->addr, q->alen, q->peer, reply, len, code, q->ds_entry, q->ds_version) < 0) return NULL;
        lat_observe(self, q);
    } else if (self->on_late && self->on_late != Py_None) {
        /* past the piggyback timeout: Python's endpoint sends it as a CON and retransmits it */
        PyObject *peer = q->peer ? Py_NewRef(q->peer) : addr_tuple(&q->addr, q->alen);
        PyObject *r = NULL, *f = Py_NewRef(self->on_late); /* (its own: the call may delete the attribute) */
        if (peer && q->osc) { /* (the sealed answer, for the endpoint to send with the OSCORE option) */
            uint8_t sealed[OSC_SEALED_MAX];
            long m = osc_seal_answer(self, q, ok, sealed);
            if (m < 0) {
                Py_DECREF(peer);
                PyErr_SetString(PyExc_RuntimeError, "oscore: libcrypto failed to seal an answer");
            } else {
                r = PyObject_CallFunction(f, "Ny#iIy#", peer, (const char *)q->token, (Py_ssize_t)q->tkl,
                                          code, q->size, (const char *)sealed, (Py_ssize_t)m);
            }
        } else if (peer) {
            r = PyObject_CallFunction(f, "Ny#iI", peer, (const char *)q->token, (Py_ssize_t)q->tkl, code,
                                      q->size);
        }
        Py_DECREF(f);
        if (!r) {
            if (pending_again(self, h, gen)) pending_free(self, h);
            return NULL;
        }
        Py_DECREF(r);
        /* (answered by a verdict given while on_late ran: this answer went to the endpoint too, and
         * the entry is gone -- nothing left to do, no error for an answer that went out) */
        if (!(q = pending_again(self, h, gen))) Py_RETURN_NONE;
        lat_observe(self, q);
    }
    pending_free(self, h);
    Py_RETURN_NONE;
}

/* Timers: CON exchanges still waiting for the sink after the piggyback timeout get an empty ACK
 * (and later a separate response); exchanges older than EXCHANGE_LIFETIME are forgotten. */
static PyObject *Lane_tick(Lane *self, PyObject *arg) {
    if (!lane_ready(self)) return NULL;
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    while (self->fifo_count) {
        uint64_t v = self->fifo[self->fifo_head];
        pending_t *q = &self->pending[v >> 32];
        int live = q->state == P_PENDING && q->gen == (uint32_t)v;
        if (live && q->at > now - self->piggyback) break;
        self->fifo_head = (self->fifo_head + 1) % self->fifo_cap;
        self->fifo_count--;
        if (!live || q->non) continue; /* (a NON is answered when it is durable, whenever that is) */
        exchange_t *x = exchange_of(self, q);
        if (!x || from_old_session(self, &q->addr, q->at))
            continue; /* forgotten (bound): no empty ACK, as for the endpoint, the answer is piggybacked
                       * when it comes; or from the peer's previous DTLS session: nothing any more */
        q->state = P_SEPARATE;
        uint8_t ack[4] = {0x60, 0, q->mid >> 8, q->mid & 0xff};
        memcpy(x->reply, ack, 4);
        x->reply_len = 4;
        if (queue_out(self, &q->addr, q->alen, q->peer, ack, 4, 0, q->ds_entry, q->ds_version) < 0) return NULL;
    }
    while (self->dedup.count && ((exchange_t *)fm_entry(&self->dedup, self->dedup.head))->at <= now - self->lifetime)
        fm_pop_oldest(&self->dedup);
    while (self->sessions.count &&
           ((session_t *)fm_entry(&self->sessions, self->sessions.head))->began <= now - self->lifetime)
        fm_pop_oldest(&self->sessions);
    while (self->moved.count && ((moved_t *)fm_entry(&self->moved, self->moved.head))->at <= now - self->lifetime)
        fm_pop_oldest(&self->moved);
    Py_RETURN_NONE;
}

static PyObject *Lane_flush(Lane *self, PyObject *arg) {
    if (!lane_ready(self)) return NULL;
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    size_t done = send_queue(self, fd, self->out, self->out_len, out_at);
    for (size_t i = 0; i < done; i++) Py_CLEAR(self->out[i].peer);
    if (done) {
        memmove(self->out, self->out + done, (self->out_len - done) * sizeof(out_t));
        self->out_len -= done;
    }
    return PyLong_FromSize_t(self->out_len);
}

/* The outbox as (bytes, peer) pairs, emptied: the sans-IO way out (tests, fuzzing, and the DTLS
 * edge, which encrypts them; it counts what it sends, so this does not). */
static PyObject *Lane_take_outbox(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (size_t i = 0; i < self->out_len; i++) {
        out_t *o = &self->out[i];
        PyObject *peer = o->peer ? o->peer : addr_tuple(&o->addr, o->alen);
        o->peer = NULL; /* (its reference goes into the pair) */
        PyObject *pair = peer ? Py_BuildValue("(y#N)", (const char *)o->data, (Py_ssize_t)o->len, peer) : NULL;
        if (!pair || PyList_Append(list, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(pair);
    }
    self->out_len = 0;
    return list;
}

static PyObject *Lane_take_committed(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (!self->committed_len) return d;
    for (size_t i = 0; i < self->committed_cap; i++) {
        PyObject *dev = self->committed[i].device;
        if (!dev) continue;
        /* (two objects of one device, equal -- one replaced in the registry meanwhile: one count) */
        PyObject *had = PyDict_GetItemWithError(d, dev);
        long long before = had ? PyLong_AsLongLong(had) : 0;
        PyObject *n = PyErr_Occurred() ? NULL : PyLong_FromLongLong(before + self->committed[i].points);
        if (!n || PyDict_SetItem(d, dev, n) < 0) { /* (the counts kept for the next call) */
            Py_XDECREF(n);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(n);
    }
    for (size_t i = 0; i < self->committed_cap; i++) Py_CLEAR(self->committed[i].device);
    self->committed_len = 0;
    return d;
}

/* A table of targets no longer the lane's released (a release may run code: the table is out of
 * the lane first, so that code finds the lane whole). */
static void release_targets(target_t *ts, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        target_t *t = &ts[i];
        Py_CLEAR(t->topic);
        Py_CLEAR(t->key);
        Py_CLEAR(t->headers);
        Py_CLEAR(t->head);
        Py_CLEAR(t->tail);
        Py_CLEAR(t->device);
        Py_CLEAR(t->profile);
        Py_CLEAR(t->tenant);
        Py_CLEAR(t->hpacked);
    }
    PyMem_Free(ts);
}

static void clear_targets(Lane *self) {
    target_t *ts = self->targets;
    Py_ssize_t n = self->ntargets;
    self->targets = NULL;
    self->ntargets = 0;
    release_targets(ts, n);
    Py_CLEAR(self->tokens);
}

/* A target's headers packed (pack_headers: t->hpacked, a new reference, or NULL when not
 * packable): 0, or -1 with an exception set. */
static int target_pack(target_t *t) {
    PyObject *h = pack_headers(t->headers, &t->hcount);
    if (!h) return -1;
    if (h == Py_None) {
        Py_DECREF(h);
        h = NULL;
    }
    t->hpacked = h;
    return 0;
}

/* A target's mode and profile: None is no profile (NULL), else compile_profile's capsule, which
 * the array and binary modes need.  1, or 0 with an exception set. */
static int target_ok(target_t *t) {
    if (t->profile == Py_None) t->profile = NULL;
    if (t->tenant == Py_None) t->tenant = NULL;
    if (t->tenant && !PyBytes_Check(t->tenant)) {
        PyErr_SetString(PyExc_TypeError, "a target's tenant is bytes (its name, UTF-8) or None");
        return 0;
    }
    if (t->mode < MODE_FLAT || t->mode > MODE_LAST) {
        PyErr_SetString(PyExc_ValueError, "a target's mode is one of MODE_* (profiles/compile.py LANE_*)");
        return 0;
    }
    if (t->profile && !PyCapsule_IsValid(t->profile, PROFILE_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "a target's profile is compile_profile()'s");
        return 0;
    }
    if (!t->profile && (t->mode == MODE_ARRAY || t->mode == MODE_BINARY || t->mode == MODE_PYTHON)) {
        PyErr_SetString(PyExc_ValueError, "a target of an array, binary or Python profile needs its compile_profile()");
        return 0;
    }
    if (t->mode == MODE_PROTOBUF && (!t->profile || !profile_of(t)->proto.nmsgs || !profile_of(t)->decode)) {
        PyErr_SetString(PyExc_ValueError, "a target of a protobuf profile needs its schema and decoder in compile_profile()");
        return 0;
    }
    if (t->mode == MODE_PYTHON && !profile_of(t)->decode) {
        PyErr_SetString(PyExc_ValueError, "a target of a Python profile needs its decoder in compile_profile()");
        return 0;
    }
    return 1;
}

/* One target from its entry (topic, key, headers, head, tail, device[, mode[, rules[, tenant]]]):
 * borrowed references (target_hold takes them) but its packed headers (a new one, or NULL).  0, or
 * -1 with an exception set. */
static int target_parse(PyObject *item, target_t *t) {
    if (!PyArg_ParseTuple(item, "UO!O!SSO|iOO", &t->topic, &PyBytes_Type, &t->key, &PyDict_Type, &t->headers,
                          &t->head, &t->tail, &t->device, &t->mode, &t->profile, &t->tenant) ||
        !target_ok(t))
        return -1;
    return target_pack(t);
}

/* The references a parsed target keeps (its packed headers it has already). */
static void target_hold(target_t *t) {
    Py_INCREF(t->topic);
    Py_INCREF(t->key);
    Py_INCREF(t->headers);
    Py_INCREF(t->head);
    Py_INCREF(t->tail);
    Py_INCREF(t->device);
    Py_XINCREF(t->profile);
    Py_XINCREF(t->tenant);
}

/* set_targets(tokens: dict[bytes, int], targets: list[(topic, key, headers, head, tail, device[, mode[, rules[, tenant]]])
 *             | None],
 *             positions: dict[(tenant, device), int] = None: the DTLS sessions' devices' targets) */
static PyObject *Lane_set_targets(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    PyObject *tokens, *given, *positions = NULL;
    if (!PyArg_ParseTuple(args, "O!O!|O!", &PyDict_Type, &tokens, &PyList_Type, &given, &PyDict_Type, &positions))
        return NULL;
    /* a tuple of the list's entries, each held until the targets hold what they borrow of them: an
     * entry's mode converts through Python (__index__), which could shrink the list and free the
     * entries parsed before it */
    PyObject *list = PyList_AsTuple(given);
    if (!list) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(list);
    target_t *ts = PyMem_Calloc(n ? n : 1, sizeof(target_t));
    if (!ts) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(list, i);
        if (item == Py_None) continue; /* not the lane's to serve */
        if (target_parse(item, &ts[i]) < 0) {
            for (Py_ssize_t k = 0; k < i; k++) Py_XDECREF(ts[k].hpacked);
            PyMem_Free(ts);
            Py_DECREF(list);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (ts[i].topic) target_hold(&ts[i]);
    target_t *old = self->targets;
    Py_ssize_t nold = self->ntargets;
    PyObject *old_tokens = self->tokens, *old_positions = self->positions;
    self->targets = ts;
    self->ntargets = n;
    Py_XINCREF(positions);
    self->positions = positions;
    self->targets_gen++;
    Py_INCREF(tokens);
    self->tokens = tokens;
    release_targets(old, nold); /* (last: a release may run code) */
    Py_XDECREF(old_tokens);
    Py_XDECREF(old_positions);
    Py_DECREF(list);
    Py_RETURN_NONE;
}

/* set_target(index, entry | None): one target of the table added, replaced or removed (the table
 * grows to take `index`); the tokens and positions dicts given to set_targets stay the caller's,
 * read at each lookup, so it changes them itself.  (corem/fastlane: the lane's working set.) */
static PyObject *Lane_set_target(Lane *self, PyObject *args) {
    if (!lane_ready(self)) return NULL;
    Py_ssize_t i;
    PyObject *item;
    if (!PyArg_ParseTuple(args, "nO", &i, &item)) return NULL;
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "set_target: index must not be negative");
        return NULL;
    }
    target_t t = {0};
    if (item != Py_None && target_parse(item, &t) < 0) return NULL;
    if (i >= self->ntargets) {
        if (item == Py_None) Py_RETURN_NONE;
        Py_ssize_t n = 2 * self->ntargets > i + 1 ? 2 * self->ntargets : (i + 16);
        target_t *ts = PyMem_Realloc(self->targets, n * sizeof(target_t));
        if (!ts) {
            Py_XDECREF(t.hpacked);
            return PyErr_NoMemory();
        }
        memset(ts + self->ntargets, 0, (n - self->ntargets) * sizeof(target_t));
        self->targets = ts;
        self->ntargets = n;
    }
    target_t *slot = &self->targets[i];
    PyObject *old[9] = {slot->topic, slot->key,    slot->headers, slot->head,   slot->tail,
                        slot->device, slot->profile, slot->tenant, slot->hpacked};
    if (item != Py_None) target_hold(&t);
    *slot = t; /* (epoch 0: reported at its first reading) */
    self->targets_gen++;
    for (int k = 0; k < 9; k++) Py_XDECREF(old[k]); /* (last: a release may run code) */
    Py_RETURN_NONE;
}

/* drogue(channel: str) -> bool: the Python path's Drogue door served /v1/{channel} on this lane's
 * endpoint, so the router routes it there: the lane takes that channel's common requests from now
 * on (at most DROGUE_CHANNELS of them, each of at most DROGUE_CHANNEL_MAX bytes; False: not taken). */
static PyObject *Lane_drogue(Lane *self, PyObject *channel) {
    if (!lane_ready(self)) return NULL;
    Py_ssize_t n;
    if (!PyUnicode_Check(channel)) {
        PyErr_SetString(PyExc_TypeError, "drogue(channel): a str");
        return NULL;
    }
    const char *utf8 = PyUnicode_AsUTF8AndSize(channel, &n);
    if (!utf8) return NULL;
    for (int c = 0; c < self->nchannels; c++)
        if (self->channels[c].len == n && memcmp(self->channels[c].name, utf8, n) == 0) Py_RETURN_TRUE;
    if (self->nchannels == DROGUE_CHANNELS || n > DROGUE_CHANNEL_MAX) Py_RETURN_FALSE;
    int c = self->nchannels++;
    self->channels[c].len = (uint8_t)n;
    memcpy(self->channels[c].name, utf8, n);
    Py_INCREF(channel);
    self->channels[c].text = channel;
    Py_RETURN_TRUE;
}

/* oscore_add(key, context): the lane takes the common requests of this OSCORE context from now on
 * (corem/oscore gives it once the Python path has the context ready and unshared; `key`: osc_key's
 * form of its kid context and kid), replacing any context there. */
static PyObject *Lane_oscore_add(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyObject_TypeCheck(args[1], &OscContextType)) {
        PyErr_SetString(PyExc_TypeError, "oscore_add(key: bytes, context: OscoreContext)");
        return NULL;
    }
    if (!self->oscs && !(self->oscs = PyDict_New())) return NULL;
    if (PyDict_SetItem(self->oscs, args[0], args[1]) < 0) return NULL;
    ((OscContext *)args[1])->targets_gen = self->targets_gen - 1; /* (resolved at its first request) */
    Py_RETURN_NONE;
}

/* oscore_drop(key, context=None) -> bool: the context at `key` is no longer the lane's (only if it is
 * `context`, when given); oscore_drop(None) drops them all. */
static PyObject *Lane_oscore_drop(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!lane_ready(self)) return NULL;
    if (nargs < 1 || nargs > 2 || (args[0] != Py_None && !PyBytes_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "oscore_drop(key: bytes | None, context=None)");
        return NULL;
    }
    if (!self->oscs) Py_RETURN_FALSE;
    if (args[0] == Py_None) {
        int any = PyDict_GET_SIZE(self->oscs) > 0;
        PyDict_Clear(self->oscs);
        return PyBool_FromLong(any);
    }
    PyObject *held = PyDict_GetItemWithError(self->oscs, args[0]);
    if (!held) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_FALSE;
    }
    if (nargs == 2 && args[1] != Py_None && held != args[1]) Py_RETURN_FALSE;
    if (PyDict_DelItem(self->oscs, args[0]) < 0) return NULL;
    Py_RETURN_TRUE;
}

/* counters()'s "latency": per door, ((counts per bucket, +Inf last), sum of seconds); and
 * "latency_bounds", the buckets' upper bounds. */
static int lat_counters(Lane *self, PyObject *into) {
    PyObject *doors = PyTuple_New(LAT_DOORS), *bounds = PyTuple_New(LAT_N - 1);
    int ok = doors && bounds;
    for (size_t b = 0; ok && b < LAT_N - 1; b++) {
        PyObject *v = PyFloat_FromDouble(LAT_BOUNDS[b]);
        if (v) PyTuple_SET_ITEM(bounds, b, v); else ok = 0;
    }
    for (int d = 0; ok && d < LAT_DOORS; d++) {
        PyObject *counts = PyTuple_New(LAT_N);
        for (size_t b = 0; counts && b < LAT_N; b++) {
            PyObject *v = PyLong_FromUnsignedLongLong(self->lat[d][b]);
            if (!v) Py_CLEAR(counts); else PyTuple_SET_ITEM(counts, b, v);
        }
        PyObject *pair = counts ? Py_BuildValue("(Nd)", counts, self->lat_sum[d]) : NULL;
        if (pair) PyTuple_SET_ITEM(doors, d, pair); else ok = 0;
    }
    ok = ok && PyDict_SetItemString(into, "latency", doors) == 0 && PyDict_SetItemString(into, "latency_bounds", bounds) == 0;
    Py_XDECREF(doors);
    Py_XDECREF(bounds);
    return ok ? 0 : -1;
}

static PyObject *Lane_counters(Lane *self, PyObject *unused) {
    if (!lane_ready(self)) return NULL;
    PyObject *responses = PyDict_New();
    if (!responses) return NULL;
    for (int c = 0; c < 256; c++) {
        if (!self->responses[c]) continue;
        PyObject *k = PyLong_FromLong(c), *v = PyLong_FromUnsignedLongLong(self->responses[c]);
        if (!k || !v || PyDict_SetItem(responses, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(responses);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    PyObject *c = Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsnsnsnsNsKsKsKsnsKsKsnsKsKsK}", "recovered", self->recovered, "recovered_answers",
        self->recovered_answers, "datagrams_in", self->datagrams_in, "bytes_in", self->bytes_in,
        "requests", self->requests, "duplicates", self->duplicates, "oversized", self->oversized, "dropped",
        self->dropped, "evicted", self->evicted, "dedup_evictions", self->dedup_evictions, "datagrams_out",
        self->datagrams_out, "bytes_out", self->bytes_out, "send_blocked", self->send_blocked, "send_errors",
        self->send_errors, "refusals", self->refusals, "accepted", self->accepted, "exempted", self->exempted,
        "dedup_entries", (Py_ssize_t)(self->dedup.count - self->dedup.ndead), "sources",
        (Py_ssize_t)self->buckets.count, "waiting", (Py_ssize_t)self->live, "responses", responses, "records_opened",
        self->records_opened, "records_sealed", self->records_sealed, "records_to_python", self->records_to_python,
        "dtls_sessions", (Py_ssize_t)self->ds.count, "oscore_requests", self->oscore_requests, "oscore_sealed",
        self->oscore_sealed, "oscore_contexts", self->oscs ? PyDict_GET_SIZE(self->oscs) : (Py_ssize_t)0, "hello_verify",
        self->hello_verify, "hello_verify_bytes", self->hello_verify_bytes, "python_decoded", self->python_decoded);
    if (c && lat_counters(self, c) < 0) Py_CLEAR(c);
    return c;
}

/* ---------------------------------------------------------------- type --------------------- */
/* exempt: the networks never rate-limited, [(16 address bytes (IPv4 mapped), prefix length)], as a
 * table in `*out` (`*n` of them; NULL for none) -- the lane untouched: parsing runs Python, which may
 * use the lane; install_exempt puts it in place after (exception set, -1, on an error). */
static int parse_exempt(PyObject *exempt, uint8_t (**out)[17], Py_ssize_t *n) {
    /* a tuple of the networks, each held: a prefix length converts through Python (__index__), which
     * could shrink a list given (PySequence_Fast hands a list itself back) and free the network
     * whose address bytes are being read */
    PyObject *seq = PySequence_Tuple(exempt);
    if (!seq) {
        if (PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_SetString(PyExc_TypeError, "exempt: a sequence of (16 bytes, prefix length)");
        return -1;
    }
    Py_ssize_t m = PyTuple_GET_SIZE(seq);
    uint8_t (*table)[17] = m ? PyMem_Calloc((size_t)m, 17) : NULL;
    if (m && !table) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        const char *addr;
        Py_ssize_t alen;
        int bits;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(seq, i), "y#i", &addr, &alen, &bits) || alen != 16 ||
            bits < 0 || bits > 128) {
            Py_DECREF(seq);
            PyMem_Free(table);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "exempt: each network is (16 address bytes, prefix 0-128)");
            return -1;
        }
        memcpy(table[i], addr, 16);
        table[i][16] = (uint8_t)bits;
    }
    Py_DECREF(seq);
    *out = table;
    *n = m;
    return 0;
}

static void install_exempt(Lane *self, uint8_t (*table)[17], Py_ssize_t n) {
    PyMem_Free(self->exempt);
    self->exempt = table;
    self->nexempt = n;
}

static PyObject *Lane_exempt(Lane *self, PyObject *exempt) {
    if (!lane_ready(self)) return NULL;
    uint8_t (*table)[17];
    Py_ssize_t n;
    if (parse_exempt(exempt, &table, &n) < 0) return NULL;
    if (!lane_ready(self)) { /* (made anew, or not, by the Python parsing ran) */
        PyMem_Free(table);
        return NULL;
    }
    install_exempt(self, table, n);
    Py_RETURN_NONE;
}

/* path: the token path's prefix segments and its resource, as bytes (token_path.PREFIX +
 * (TELEMETRY,)); None: (b"api", b"v1", b"telemetry").  At most two prefix segments (the shape
 * holds four), each of at most 15 bytes. */
static int set_path(Lane *self, PyObject *path) {
    static const char *const DEFAULT[3] = {"api", "v1", "telemetry"};
    Py_ssize_t n = path ? PyTuple_GET_SIZE(path) : 3;
    if (n < 1 || n > 3) {
        PyErr_SetString(PyExc_ValueError, "path: up to two prefix segments and the resource");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *seg = DEFAULT[i];
        Py_ssize_t len = (Py_ssize_t)strlen(seg);
        if (path) {
            PyObject *o = PyTuple_GET_ITEM(path, i);
            if (!PyBytes_Check(o)) {
                PyErr_SetString(PyExc_TypeError, "path: segments are bytes");
                return -1;
            }
            seg = PyBytes_AS_STRING(o);
            len = PyBytes_GET_SIZE(o);
        }
        if (len < 1 || len > 15) {
            PyErr_SetString(PyExc_ValueError, "path: a segment of 1 to 15 bytes");
            return -1;
        }
        memcpy(self->path[i], seg, (size_t)len);
        self->pathlen[i] = (size_t)len;
    }
    self->nprefix = (int)n - 1;
    return 0;
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"record_type", "max_datagram", "piggyback_timeout", "exchange_lifetime",
                            "dedup_max_entries", "rate", "burst", "max_sources", "limit_error_size",
                            "exempt", "scope", "path", "packed_type", NULL};
    PyObject *record_type, *exempt = NULL, *path = NULL, *packed_type = NULL;
    const char *scope = "udp";
    Py_ssize_t dedup_max = 100000, max_sources = 100000, max_datagram = 1500;
    double piggyback = 0.5, lifetime = 247.0, rate = 0, burst = 0;
    int limit_error_size = 1;
    if (self->record_type) { /* the buffers are sized by the first settings: no second ones */
        PyErr_SetString(PyExc_TypeError, "Lane is already initialised");
        return -1;
    }
    /* (into locals: a number's __index__ or __float__ runs Python, which could initialise this lane
     * meanwhile -- its buffers sized by settings these must not replace) */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|$nddnddnpOsO!O", names, &PyType_Type, &record_type,
                                     &max_datagram, &piggyback, &lifetime, &dedup_max, &rate, &burst, &max_sources,
                                     &limit_error_size, &exempt, &scope, &PyTuple_Type, &path, &packed_type))
        return -1;
    if (packed_type == Py_None) packed_type = NULL;
    if (packed_type && (!PyType_Check(packed_type) || !PyType_IsSubtype((PyTypeObject *)packed_type, &PyTuple_Type))) {
        PyErr_SetString(PyExc_TypeError, "packed_type: must be a tuple subclass (corem.bus.base.PackedRecord) or None");
        return -1;
    }
    if (strlen(scope) >= sizeof self->scope || strchr(scope, ' ')) {
        PyErr_SetString(PyExc_ValueError, "scope: a transport name of at most 7 characters, no space");
        return -1;
    }
    if (!PyType_IsSubtype((PyTypeObject *)record_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "record_type: must be a tuple subclass (corem.bus.base.Record)");
        return -1;
    }
    if (max_datagram < 4 || max_datagram > 65535 || dedup_max < 1 || max_sources < 1 || dedup_max > FM_MAX ||
        max_sources > FM_MAX || piggyback <= 0 || lifetime <= 0 || rate < 0) {
        PyErr_SetString(PyExc_ValueError, "max_datagram, dedup_max_entries, max_sources, piggyback_timeout and "
                                          "exchange_lifetime must be positive, rate not negative");
        return -1;
    }
    uint8_t (*exempt_table)[17] = NULL;
    Py_ssize_t nexempt = 0;
    if (exempt && exempt != Py_None && parse_exempt(exempt, &exempt_table, &nexempt) < 0) return -1;
    if (self->record_type) { /* (initialised by Python that ran above: its settings stay) */
        PyMem_Free(exempt_table);
        PyErr_SetString(PyExc_TypeError, "Lane is already initialised");
        return -1;
    }
    /* from here on no Python runs */
    if (exempt_table) install_exempt(self, exempt_table, nexempt);
    if (set_path(self, path) < 0) return -1;
    strcpy(self->scope, scope);
    self->max_datagram = max_datagram;
    self->max_readings = 1000; /* (telemetry.MAX_READINGS: FastLane sets the setting's value) */
    self->piggyback = piggyback;
    self->lifetime = lifetime;
    self->rate = rate;
    self->burst = burst > 0 ? burst : 2 * rate;
    self->limit_error_size = limit_error_size;
    self->limit = rate > 0;
    self->free_head = -1;
    self->ds.free_head = -1;
    self->targets_gen = 1;
    self->depoch = 1;
    self->epoch = 1; /* (targets start at 0: not yet reported in any batch) */
    self->json_cap = 4096;
    self->json = PyMem_Malloc(self->json_cap);
    self->rxbuf = PyMem_Malloc((size_t)VLEN * (self->max_datagram + 1));
    self->tokens = PyDict_New();
    if (!self->json || !self->rxbuf || !self->tokens || fm_init(&self->dedup, dedup_max, sizeof(exchange_t), 1) < 0 ||
        (self->limit && fm_init(&self->buckets, max_sources, sizeof(bucket_t), 0) < 0)) {
        /* (left as new: not initialised, and another __init__ may try again) */
        PyMem_Free(self->json);
        PyMem_Free(self->rxbuf);
        self->json = NULL;
        self->rxbuf = NULL;
        Py_CLEAR(self->tokens);
        fm_free(&self->dedup);
        fm_free(&self->buckets);
        PyErr_NoMemory();
        return -1;
    }
    Py_XINCREF(packed_type);
    self->packed_type = (PyTypeObject *)packed_type;
    Py_INCREF(record_type);
    self->record_type = (PyTypeObject *)record_type; /* (last: what lane_ready reads) */
    return 0;
}

static int Lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->tokens);
    Py_VISIT(self->known);
    Py_VISIT(self->slow);
    Py_VISIT(self->records);
    Py_VISIT(self->ctxs);
    Py_VISIT(self->touched);
    for (size_t i = 0; i < self->committed_cap; i++) Py_VISIT(self->committed[i].device);
    Py_VISIT(self->on_late);
    Py_VISIT(self->next_mid);
    for (Py_ssize_t i = 0; i < self->ntargets; i++) {
        Py_VISIT(self->targets[i].headers);
        Py_VISIT(self->targets[i].device);
    }
    for (int32_t i = 0; i < self->npending_cap; i++) {
        Py_VISIT(self->pending[i].device);
        Py_VISIT(self->pending[i].peer);
        Py_VISIT(self->pending[i].osc);
    }
    Py_VISIT(self->oscs);
    for (size_t i = 0; i < self->out_len; i++) Py_VISIT(self->out[i].peer);
    Py_VISIT(self->positions);
    Py_VISIT(self->plain);
    Py_VISIT(self->dtouched);
    for (int32_t i = 0; i < self->ds.cap; i++) {
        dsess_t *d = &self->ds.e[i];
        if (!d->live) continue;
        Py_VISIT(d->owner);
        Py_VISIT(d->peer);
        Py_VISIT(d->read);
        Py_VISIT(d->window);
        Py_VISIT(d->write);
        Py_VISIT(d->name);
        Py_VISIT(d->mark_key);
    }
    return 0;
}

static int Lane_clear(Lane *self) {
    Py_CLEAR(self->ctime);
    for (int c = 0; c < self->nchannels; c++) Py_CLEAR(self->channels[c].text);
    self->nchannels = 0;
    Py_CLEAR(self->slow);
    Py_CLEAR(self->records);
    Py_CLEAR(self->ctxs);
    Py_CLEAR(self->touched);
    for (size_t i = 0; i < self->committed_cap; i++) Py_CLEAR(self->committed[i].device);
    PyMem_Free(self->committed);
    self->committed = NULL;
    self->committed_cap = self->committed_len = 0;
    Py_CLEAR(self->on_late);
    Py_CLEAR(self->next_mid);
    Py_CLEAR(self->known);
    clear_targets(self);
    for (int32_t i = 0; i < self->npending_cap; i++) {
        Py_CLEAR(self->pending[i].device);
        Py_CLEAR(self->pending[i].peer);
        Py_CLEAR(self->pending[i].osc);
    }
    Py_CLEAR(self->oscs);
    for (size_t i = 0; i < self->out_len; i++) Py_CLEAR(self->out[i].peer);
    Py_CLEAR(self->positions);
    Py_CLEAR(self->plain);
    Py_CLEAR(self->dtouched);
    for (int32_t i = 0; i < self->ds.cap; i++) ds_remove(&self->ds, i);
    return 0;
}

static void Lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_CLEAR(self->record_type);
    Py_CLEAR(self->packed_type);
    fm_free(&self->dedup);
    fm_free(&self->buckets);
    PyMem_Free(self->exempt);
    fm_free(&self->sessions);
    fm_free(&self->moved);
    PyMem_Free(self->pending);
    PyMem_Free(self->fifo);
    PyMem_Free(self->out);
    PyMem_Free(self->rxbuf);
    PyMem_Free(self->json);
    PyMem_Free(self->nested);
    ds_free(&self->ds);
    PyMem_Free(self->wire);
    PyMem_Free(self->plainbuf);
    PyMem_Free(self->innerbuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Lane_methods[] = {
    {"drain", (PyCFunction)Lane_drain, METH_VARARGS, "drain(fd, now, now_ms, budget) -> datagrams read"},
    {"receive", (PyCFunction)Lane_receive, METH_VARARGS, "receive(data, peer, now, now_ms): one datagram, sans-IO"},
    {"receive_plain", (PyCFunction)(void (*)(void))Lane_receive_plain, METH_FASTCALL,
     "receive_plain(data, peer, session_target, now, now_ms): one message DTLS decrypted"},
    {"new_session", (PyCFunction)Lane_new_session, METH_VARARGS, "new_session(peer, now): a new DTLS session"},
    {"moved", (PyCFunction)Lane_moved, METH_VARARGS, "moved(old, new, now): a CID session moved (RFC 9146)"},
    {"remember", (PyCFunction)Lane_remember, METH_VARARGS,
     "remember(peer, mid, at, token=None) -> bool: an exchange committed before a restart (2.04 to its "
     "retransmission: a request with its token, any when None)"},
    {"take", (PyCFunction)Lane_take, METH_NOARGS, "take() -> (for_python, records, ctxs, devices_heard)"},
    {"committed", (PyCFunction)(void (*)(void))Lane_committed, METH_FASTCALL, "committed(ctx, error)"},
    {"tick", (PyCFunction)Lane_tick, METH_O, "tick(now)"},
    {"flush", (PyCFunction)Lane_flush, METH_O, "flush(fd) -> datagrams still waiting"},
    {"take_outbox", (PyCFunction)Lane_take_outbox, METH_NOARGS, "take_outbox() -> [(bytes, peer)]"},
    {"take_committed", (PyCFunction)Lane_take_committed, METH_NOARGS, "take_committed() -> {device: points committed since the last call}"},
    {"set_targets", (PyCFunction)Lane_set_targets, METH_VARARGS, "set_targets(tokens, targets)"},
    {"set_target", (PyCFunction)Lane_set_target, METH_VARARGS, "set_target(index, entry | None)"},
    {"counters", (PyCFunction)Lane_counters, METH_NOARGS, "counters() -> dict"},
    {"drain_records", (PyCFunction)Lane_drain_records, METH_VARARGS,
     "drain_records(fd, now, now_ms, budget) -> datagrams read: CoAPS on corem's engine"},
    {"receive_record", (PyCFunction)Lane_receive_record, METH_VARARGS,
     "receive_record(datagram, peer, now, now_ms): one CoAPS datagram, sans-IO"},
    {"take_records", (PyCFunction)Lane_take_records, METH_NOARGS,
     "take_records() -> (decrypted messages not taken, owners of sessions touched, marks due, datagrams, bytes)"},
    {"take_marks", (PyCFunction)Lane_take_marks, METH_NOARGS,
     "take_marks() -> [(window top, row key)]: the saved sessions' record numbers due in the store, taken"},
    {"take_marks_packed", (PyCFunction)Lane_take_marks_packed, METH_NOARGS,
     "take_marks_packed() -> bytes: take_marks as one pack for the session store's log"},
    {"add_session", (PyCFunction)(void (*)(void))Lane_add_session, METH_FASTCALL,
     "add_session(owner, peer, cid_in, cid_out, read, window, write, name, floor, mark_key)"},
    {"drop_session", (PyCFunction)(void (*)(void))Lane_drop_session, METH_FASTCALL,
     "drop_session(owner, peer, cid_in) -> bool"},
    {"cookie_secret", (PyCFunction)Lane_cookie_secret, METH_O,
     "cookie_secret(secret): the DTLS engine's cookie secret; new peers' cookie-less hellos answered here"},
    {"send_records", (PyCFunction)Lane_send_records, METH_O,
     "send_records(fd) -> answers left for Python (take_outbox): the rest sealed and sent"},
    {"limit", (PyCFunction)Lane_limit, METH_VARARGS, "limit(rate, burst, max_sources)"},
    {"drogue", (PyCFunction)Lane_drogue, METH_O,
     "drogue(channel) -> bool: the Python path's Drogue door serves /v1/{channel} here; the lane takes it too"},
    {"exempt", (PyCFunction)Lane_exempt, METH_O, "exempt(networks): the rate limit's exempt networks, replaced whole"},
    {"oscore_add", (PyCFunction)(void (*)(void))Lane_oscore_add, METH_FASTCALL,
     "oscore_add(key, context): the lane takes this OSCORE context's common requests"},
    {"oscore_drop", (PyCFunction)(void (*)(void))Lane_oscore_drop, METH_FASTCALL,
     "oscore_drop(key | None, context=None) -> bool: the context (or every one) is Python's again"},
    {NULL},
};

static PyMemberDef Lane_members[] = {
    {"on_late", T_OBJECT, offsetof(Lane, on_late), 0, "on_late(peer, token, code, request_size): a separate answer"},
    {"next_mid", T_OBJECT, offsetof(Lane, next_mid), 0,
     "next_mid() -> int: the message id of a NON answer (the endpoint's: one sequence for every message of ours)"},
    {"max_readings", T_INT, offsetof(Lane, max_readings), 0,
     "readings one point may have (max_readings_per_point): a point of more is the Python path's"},
    {"known", T_OBJECT, offsetof(Lane, known), 0,
     "known(token) -> bool: a token not among the lane's names a registered device (its rate-limit exemption)"},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "corem.fastlane._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Plain-CoAP telemetry from socket to sink record (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
};

/* json_number(x): a number as the lane writes it in a point's JSON (put_double), for the tests'
 * comparison with msgspec over many doubles. */
static PyObject *lane_json_number(PyObject *module, PyObject *arg) {
    double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred()) return NULL;
    char buf[64];
    char *end = put_double(buf, v);
    return end ? PyBytes_FromStringAndSize(buf, end - buf) : NULL;
}

static PyMethodDef module_methods[] = {
    {"json_number", lane_json_number, METH_O, "json_number(x) -> bytes: x as a point's JSON has it (put_double)"},
    {"fold_marks", ds_fold_marks, METH_O, "fold_marks(packs) -> [(top, key, top)]: each key's highest top over the packs"},
    {"compile_profile", compile_profile, METH_VARARGS,
     "compile_profile(rules, positions, layout) -> a profile's C form for set_target (rules.h, layouts.h)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "corem.fastlane._lane", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__lane(void) {
    if (!EXCHANGE && !(EXCHANGE = PyUnicode_InternFromString("coap-exchange"))) return NULL;
    if (!CREATION && !(CREATION = PyUnicode_InternFromString("creation-time"))) return NULL;
    if (!CHANNEL && !(CHANNEL = PyUnicode_InternFromString("channel"))) return NULL;
    if (!DATA_SCHEMA && !(DATA_SCHEMA = PyUnicode_InternFromString("data_schema"))) return NULL;
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&OscWindowType) < 0 || PyType_Ready(&OscContextType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "OscoreWindow", (PyObject *)&OscWindowType) < 0 ||
        PyModule_AddObjectRef(m, "OscoreContext", (PyObject *)&OscContextType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
