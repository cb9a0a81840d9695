/*
 * The fast lane's FIFO hash map (deduplication, rate-limit buckets, DTLS session starts): fixed
 * size entries whose first KEYLEN bytes are the key, in insertion order, found by key in O(1).
 * Header-only, for _lane.c, which defines KEYLEN before including it.
 */
#ifndef COREM_FIFOMAP_H
#define COREM_FIFOMAP_H

#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#ifndef KEYLEN
#error "define KEYLEN before including fifomap.h"
#endif

/* Entries live in a ring in insertion order (so the oldest is evicted or expired first); an
 * open-addressing index (linear probing, backward-shift deletion) finds them by key.  An index cell
 * holds the key's hash (low 32 bits) next to the ring slot, so probing and deleting compare and
 * move cells without touching the ring (each ring access is a likely cache miss at 100k entries). */
typedef struct {
    char *ring;
    size_t esize, cap, head, count;
    uint64_t *index; /* hash << 32 | (ring slot + 1); 0 = empty */
    size_t mask;
    uint8_t *dead;   /* per ring slot: taken out of the index (fm_kill), its ring place kept */
    size_t ndead;    /* ... how many (count - ndead entries are found) */
    int huge;        /* its arrays in transparent huge pages (fm_alloc) */
} fifomap;

/* Each word is folded in with a multiply and its high half brought down, so that the bytes that
 * vary most (port and message id, the high half of the last word) reach the low bits the index
 * uses; murmur3's finalizer at the end. */
static uint64_t hash_key(const uint8_t *k) {
    uint64_t w, h = 0x9E3779B97F4A7C15ULL;
    for (int i = 0; i < KEYLEN; i += 8) {
        memcpy(&w, k + i, 8);
        h = (h ^ w) * 0xC2B2AE3D27D4EB4FULL;
        h ^= h >> 32;
    }
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    return h ^ (h >> 33);
}

/* the most entries a map holds (its index keeps slots in 32 bits, its size doubles from 16) */
#define FM_MAX (1 << 26)

/* Zeroed memory for a map's arrays.  A map that asks (`huge`: one that fills, the dedup map -- a
 * sparse one would hold 2 MiB for each page it touches once the kernel merges them) gets, from
 * 2 MiB on, a mapping of its own (zero pages, resident only as they are touched) aligned for
 * transparent huge pages, asked for where the kernel gives them on request (madvise mode, as
 * Debian's): every lookup lands at a random place of the index and the ring, and with 4 KiB pages
 * most landed outside the TLB too (a page walk each, two levels of them in a VM) -- a third of the
 * lane's time in its dedup map went to them.  Freed by fm_release with the same size and `huge`. */
#define FM_HUGE ((size_t)2 << 20)
static void *fm_alloc(size_t size, int huge) {
    if (!huge || size < FM_HUGE) return calloc(1, size ? size : 1);
    size_t rounded = (size + FM_HUGE - 1) & ~(FM_HUGE - 1);
    uint8_t *p = mmap(NULL, rounded + FM_HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    size_t lead = (FM_HUGE - ((uintptr_t)p & (FM_HUGE - 1))) & (FM_HUGE - 1);
    if (lead) munmap(p, lead);
    munmap(p + lead + rounded, FM_HUGE - lead);
#ifdef MADV_HUGEPAGE
    madvise(p + lead, rounded, MADV_HUGEPAGE); /* (a hint: refused, the map works the same) */
#endif
    return p + lead;
}

static void fm_release(void *p, size_t size, int huge) {
    if (!p) return;
    if (!huge || size < FM_HUGE)
        free(p);
    else
        munmap(p, (size + FM_HUGE - 1) & ~(FM_HUGE - 1));
}

static void fm_free(fifomap *m) {
    fm_release(m->ring, m->cap * m->esize, m->huge);
    fm_release(m->index, (m->mask + 1) * sizeof(uint64_t), m->huge);
    fm_release(m->dead, m->cap, m->huge);
    m->ring = NULL;
    m->index = NULL;
    m->dead = NULL;
}

/* A map of room for `cap` entries (1 to FM_MAX): 0, or -1 (no memory, or a `cap` out of range: a map
 * of no room would have fm_push evict from an empty ring, looking for its oldest forever). */
static int fm_init(fifomap *m, size_t cap, size_t esize, int huge) {
    if (cap < 1 || cap > FM_MAX) return -1;
    size_t n = 16;
    while (n < cap * 2) n <<= 1;
    m->ring = fm_alloc(cap * esize, huge);
    m->index = fm_alloc(n * sizeof(uint64_t), huge);
    m->dead = fm_alloc(cap, huge);
    m->huge = huge;
    m->esize = esize;
    m->cap = cap;
    m->mask = n - 1;
    if (!m->ring || !m->index || !m->dead) {
        fm_free(m);
        return -1;
    }
    m->head = m->count = m->ndead = 0;
    return 0;
}


static inline void *fm_entry(fifomap *m, size_t slot) { return m->ring + slot * m->esize; }

#define CELL_SLOT(v) ((size_t)((uint32_t)(v)) - 1)
#define CELL_HASH(v) ((uint32_t)((v) >> 32))

static long fm_find(fifomap *m, const uint8_t *key) {
    uint32_t h = (uint32_t)hash_key(key);
    size_t i = h & m->mask;
    for (;;) {
        uint64_t v = m->index[i];
        if (!v) return -1;
        if (CELL_HASH(v) == h && memcmp(fm_entry(m, CELL_SLOT(v)), key, KEYLEN) == 0) return (long)CELL_SLOT(v);
        i = (i + 1) & m->mask;
    }
}

/* A prefetch that stays: GCC 12 drops a __builtin_prefetch whose address is hashed from a local
 * array (the key), as if it were dead code, and emits nothing. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FM_PREFETCH(p) __asm__ volatile("prefetcht0 %0" ::"m"(*(const char *)(p)))
#elif defined(__GNUC__) && defined(__aarch64__)
#define FM_PREFETCH(p) __asm__ volatile("prfm pldl1keep, %0" ::"Q"(*(const char *)(p)))
#else
#define FM_PREFETCH(p) __builtin_prefetch(p)
#endif

/* Prefetches, for a batch that looks ahead (each index cell and ring entry is likely a cache miss
 * at 100k entries: ~8% of a plain reading's time): the index cell a find of `key` starts at ... */
static inline void fm_prefetch(const fifomap *m, const uint8_t *key) {
    if (m->index) FM_PREFETCH(&m->index[(uint32_t)hash_key(key) & m->mask]);
}

/* ... and, in a full map, what the push `k` pushes from now evicts: the index cell of the entry
 * k-th oldest (its key read now: brought in by the prefetch of the ring 3k pushes ago) and the
 * ring entry 4k-th oldest. */
static inline void fm_prefetch_evicted(const fifomap *m, size_t k) {
    if (!m->index || m->count < m->cap || 4 * k >= m->cap) return;
    size_t near = m->head + k, far = m->head + 4 * k;
    if (near >= m->cap) near -= m->cap;
    if (far >= m->cap) far -= m->cap;
    FM_PREFETCH(fm_entry((fifomap *)m, far));
    if (!m->dead[near]) FM_PREFETCH(&m->index[(uint32_t)hash_key(fm_entry((fifomap *)m, near)) & m->mask]);
}

static void fm_unindex(fifomap *m, size_t slot) {
    size_t i = (uint32_t)hash_key(fm_entry(m, slot)) & m->mask;
    while (CELL_SLOT(m->index[i]) != slot) i = (i + 1) & m->mask;
    m->index[i] = 0;
    size_t j = i;
    for (;;) {
        j = (j + 1) & m->mask;
        uint64_t v = m->index[j];
        if (!v) return;
        size_t k = CELL_HASH(v) & m->mask;
        /* move v back to the hole unless its home k lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            m->index[i] = v;
            m->index[j] = 0;
            i = j;
        }
    }
}

static void fm_pop_oldest(fifomap *m) {
    if (m->dead[m->head]) { /* (out of the index already) */
        m->dead[m->head] = 0;
        m->ndead--;
    } else
        fm_unindex(m, m->head);
    m->head = (m->head + 1) % m->cap;
    m->count--;
}

/* Would a push now evict a live entry (a full map whose oldest is not a tombstone)? */
static inline int fm_evicts_live(const fifomap *m) { return m->count == m->cap && !m->dead[m->head]; }

/* The entry in `slot` is no longer found (fm_find), but keeps its place in the ring until it is the
 * oldest (then fm_pop_oldest drops it): a key that must be entered again, as new, goes to the end
 * (fm_push) -- written again in place it would be the newest entry at an old place, and the oldest
 * first order that expiry and eviction read the ring in would be broken. */
static void fm_kill(fifomap *m, size_t slot) {
    if (m->dead[slot]) return;
    fm_unindex(m, slot);
    m->dead[slot] = 1;
    m->ndead++;
}

/* A new entry for `key` (which must not be present); evicts the oldest when full (returns 1 in
 * *evicted then).  The entry is zeroed but for its key. */
static size_t fm_push(fifomap *m, const uint8_t *key, int *evicted) {
    *evicted = 0;
    if (m->count == m->cap) {
        fm_pop_oldest(m);
        *evicted = 1;
    }
    size_t slot = (m->head + m->count) % m->cap;
    char *e = fm_entry(m, slot);
    memset(e, 0, m->esize);
    memcpy(e, key, KEYLEN);
    uint32_t h = (uint32_t)hash_key(key);
    size_t i = h & m->mask;
    while (m->index[i]) i = (i + 1) & m->mask;
    m->index[i] = (uint64_t)h << 32 | (slot + 1);
    m->count++;
    return slot;
}

/* The map made again with room for `cap` entries, the newest kept in their order (the oldest go
 * when it shrinks): 0, or -1 (no memory; the map is as it was). */
static int fm_resize(fifomap *m, size_t cap) {
    fifomap n;
    if (fm_init(&n, cap, m->esize, m->huge) < 0) return -1;
    size_t live = m->count - m->ndead, skip = live > cap ? live - cap : 0;
    for (size_t k = 0; k < m->count; k++) {
        if (m->dead[(m->head + k) % m->cap]) continue;
        if (skip) {
            skip--;
            continue;
        }
        const char *e = fm_entry(m, (m->head + k) % m->cap);
        int evicted;
        memcpy(fm_entry(&n, fm_push(&n, (const uint8_t *)e, &evicted)), e, m->esize);
    }
    fm_free(m);
    *m = n;
    return 0;
}

#endif
