/* shmcache native layer.
 *
 * Only what Python cannot do correctly (atomics with explicit ordering,
 * futexes, copies out of memory that another process is rewriting) or fast
 * enough (the writer's publish step, the reader's bulk copies).  The protocol
 * these functions implement is written down in docs/design.md; the comments
 * here point at its rules instead of restating them.
 *
 * Reader functions treat the segment as untrusted input: every value read from
 * it is loaded exactly once into a local (relaxed atomic load, so the compiler
 * cannot re-read it after the bounds check) and checked before it is used as
 * an offset or a length.  Geometry comes from struct sc_layout, which the
 * caller validated once at open and which the segment cannot change.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <limits.h>
#include <time.h>
#include <stddef.h>
#include <fcntl.h>
#include <semaphore.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#include "shmcache.h"

_Static_assert(sizeof(struct sc_header) == 4096, "header must be one page");
_Static_assert(sizeof(struct sc_slot) == 32, "slot size");
_Static_assert(sizeof(struct sc_record) == SC_RECORD_HEADER_BYTES, "record header size");
_Static_assert(sizeof(struct sc_index_entry) == 16, "index entry size");
_Static_assert(offsetof(struct sc_header, lock_token) % 16 == 0, "the lock word is one aligned 16-byte word");
_Static_assert(offsetof(struct sc_header, lock_start) == offsetof(struct sc_header, lock_token) + 8,
               "lock_start is the lock word's second half");
#if !defined(__x86_64__) && !defined(__aarch64__)
#error "the writers' lock needs a lock-free 16-byte compare-and-swap (x86-64 cmpxchg16b, AArch64 casp/ldxp)"
#endif

#define TOMBSTONE UINT64_MAX
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define LOAD_ACQ(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define STORE_REL(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
/* Readers give up on a record that keeps moving after this many attempts. */
#define READ_ATTEMPTS 1000

/* ---- atomics ------------------------------------------------------------ */

uint64_t sc_load_acquire(const uint64_t *addr) { return __atomic_load_n(addr, __ATOMIC_ACQUIRE); }
void sc_store_release(uint64_t *addr, uint64_t value) { __atomic_store_n(addr, value, __ATOMIC_RELEASE); }
static int sc_cas(uint64_t *addr, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(addr, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
uint64_t sc_fetch_add(uint64_t *addr, uint64_t delta) { return __atomic_fetch_add(addr, delta, __ATOMIC_ACQ_REL); }
void sc_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* ---- the readers' guard ---------------------------------------------------
 * A Reader may be closed by one thread while others are inside the mapping
 * (copying, or asleep in a watch).  Every reader function enters the guard
 * first and leaves it last; sc_detach sets `closing`, then waits for
 * `users` to drop to zero before the caller unmaps.  Sequentially
 * consistent on both sides (a Dekker pair): either the entering thread sees
 * `closing`, or sc_detach sees its count. */

static int enter(struct sc_layout *L)
{
    __atomic_fetch_add(&L->users, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&L->closing, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_sub(&L->users, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    if (__atomic_load_n(&((struct sc_header *)L->base)->closed, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_sub(&L->users, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    return 1;
}

static void leave(struct sc_layout *L) { __atomic_fetch_sub(&L->users, 1, __ATOMIC_SEQ_CST); }

/* ---- futex -------------------------------------------------------------- */

static int futex_wait(const uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    /* Shared futex (no FUTEX_PRIVATE_FLAG): the key is the page of the shm
     * object, so a wait on a read-only mapping meets the writer's wake. */
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    return rc == 0 ? 0 : errno;
}

static void futex_wake_all(const uint32_t *addr)
{
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static struct timespec deadline_after(int64_t timeout_ns)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ns / 1000000000;
    deadline.tv_nsec += timeout_ns % 1000000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    return deadline;
}

/* ns left until deadline (<= 0: passed) */
static int64_t left_until(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(deadline->tv_sec - now.tv_sec) * 1000000000 + (deadline->tv_nsec - now.tv_nsec);
}

/* Whether a watcher at position (having served up to last_rv) must look:
 * new events, a window moved past it, or a replace at or after it. */
static int watcher_must_look(struct sc_header *h, uint64_t position, uint64_t last_rv)
{
    if (__atomic_load_n(&h->end_index, __ATOMIC_ACQUIRE) > position)
        return 1;
    if (__atomic_load_n(&h->start_index, __ATOMIC_ACQUIRE) > position)
        return 1;
    uint64_t rep_rv = __atomic_load_n(&h->replace_rv, __ATOMIC_ACQUIRE);
    return rep_rv > last_rv && __atomic_load_n(&h->replace_index, __ATOMIC_ACQUIRE) >= position;
}

/* The wait of sc_wait_past (position != UINT64_MAX) or sc_wait_change (on a
 * seq).  The notify_seq read before the checks closes the race with a
 * publish between the check and the sleep: the writer bumps notify_seq
 * before waking, so FUTEX_WAIT then returns at once (EAGAIN).  sc_detach
 * cannot bump it (a reader's mapping is read-only): it wakes repeatedly
 * until every waiter has seen `closing`. */
static int wait_for(struct sc_layout *L, uint64_t position, uint64_t last_rv, int by_seq,
                    uint32_t seq0, int64_t timeout_ns)
{
    struct sc_header *h = (struct sc_header *)L->base;
    struct timespec deadline;
    if (timeout_ns >= 0)
        deadline = deadline_after(timeout_ns);
    for (;;) {
        uint32_t seq = __atomic_load_n(&h->notify_seq, __ATOMIC_ACQUIRE);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&L->closing, __ATOMIC_SEQ_CST) || __atomic_load_n(&h->closed, __ATOMIC_ACQUIRE))
            return SC_WAIT_CLOSED;
        if (by_seq ? seq != seq0 : watcher_must_look(h, position, last_rv))
            return SC_WAIT_PASSED;
        int64_t left = -1;
        if (timeout_ns >= 0) {
            left = left_until(&deadline);
            if (left <= 0)
                return SC_WAIT_TIMEOUT;
        }
        int rc = futex_wait(&h->notify_seq, seq, left);
        if (rc == EINTR)
            return SC_WAIT_INTERRUPTED;
        /* 0 (woken), EAGAIN (seq moved), ETIMEDOUT: look again */
    }
}

int sc_wait_past(struct sc_layout *L, uint64_t position, uint64_t last_rv, int64_t timeout_ns)
{
    if (!enter(L))
        return SC_WAIT_CLOSED;
    int rc = wait_for(L, position, last_rv, 0, 0, timeout_ns);
    leave(L);
    return rc;
}

int sc_wait_change(struct sc_layout *L, uint32_t seq, int64_t timeout_ns)
{
    if (!enter(L))
        return SC_WAIT_CLOSED;
    int rc = wait_for(L, 0, 0, 1, seq, timeout_ns);
    leave(L);
    return rc;
}

void sc_notify(struct sc_layout *L)
{
    struct sc_header *h = (struct sc_header *)L->base;
    __atomic_fetch_add(&h->notify_seq, 1, __ATOMIC_RELEASE);
    futex_wake_all(&h->notify_seq);
}

void sc_detach(struct sc_layout *L)
{
    struct sc_header *h = (struct sc_header *)L->base;
    __atomic_store_n(&L->closing, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&L->users, __ATOMIC_SEQ_CST) != 0) {
        /* a waiter that checked `closing` just before it was set may go to
         * sleep after any one wake: wake until it has left */
        futex_wake_all(&h->notify_seq);
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
}

/* ---- hashing: seeded FNV-1a with a 64-bit finalizer ---------------------- */

static uint64_t sc_hash(uint64_t seed, const uint8_t *key, uint32_t key_len)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (uint32_t i = 0; i < key_len; i++) {
        h ^= key[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* ---- geometry helpers ---------------------------------------------------- */

static inline struct sc_header *hdr(struct sc_layout *L) { return (struct sc_header *)L->base; }
static inline struct sc_slot *slot_at(struct sc_layout *L, uint64_t index)
{
    return (struct sc_slot *)(L->base + L->slots_offset) + (index % L->capacity);
}
static inline uint8_t *arena(struct sc_layout *L) { return L->base + L->arena_offset; }
static inline uint8_t *heap(struct sc_layout *L) { return L->base + L->heap_offset; }
static inline struct sc_index_entry *table(struct sc_layout *L, uint64_t which)
{
    return (struct sc_index_entry *)(L->base + L->index_offset[which & 1]);
}
static inline struct sc_index_entry *active_table(struct sc_layout *L)
{
    return table(L, LOAD_ACQ(hdr(L)->active_index));
}

/* Copy len bytes starting at logical pos of a circular buffer.  Callers
 * check len <= size; the clamp is the last line of defence for memory safety. */
static void copy_out(uint8_t *dst, const uint8_t *ring, uint64_t size, uint64_t pos, uint64_t len)
{
    if (len > size)
        len = size;
    uint64_t off = pos % size, first = size - off;
    if (len <= first) {
        memcpy(dst, ring + off, len);
    } else {
        memcpy(dst, ring + off, first);
        memcpy(dst + first, ring, len - first);
    }
}

static void copy_in(uint8_t *ring, uint64_t size, uint64_t pos, const uint8_t *src, uint64_t len)
{
    uint64_t off = pos % size, first = size - off;
    if (len <= first) {
        memcpy(ring + off, src, len);
    } else {
        memcpy(ring + off, src, first);
        memcpy(ring, src + first, len - first);
    }
}

/* Compare len bytes at logical pos of a circular buffer with b. */
static int equal_at(const uint8_t *ring, uint64_t size, uint64_t pos, const uint8_t *b, uint64_t len)
{
    if (len > size)
        return 0;
    uint64_t off = pos % size, first = size - off;
    if (len <= first)
        return memcmp(ring + off, b, len) == 0;
    return memcmp(ring + off, b, first) == 0 && memcmp(ring, b + first, len - first) == 0;
}

uint64_t sc_record_size(uint32_t key_len, uint32_t value_len)
{
    return ((uint64_t)SC_RECORD_HEADER_BYTES + key_len + value_len + 7) & ~(uint64_t)7;
}

static void read_record(struct sc_layout *L, uint64_t pos, struct sc_record *r)
{
    copy_out((uint8_t *)r, heap(L), L->heap_bytes, pos, sizeof *r);
}

/* ---- store: writer side ---------------------------------------------------
 * The caller holds the writers' lock, so nothing else changes the segment; the
 * atomic stores are for the readers (design.md, "The store"). */

static int record_is(struct sc_layout *L, uint64_t pos, const uint8_t *key, uint32_t key_len)
{
    struct sc_record r;
    read_record(L, pos, &r);
    return r.key_len == key_len && equal_at(heap(L), L->heap_bytes, pos + SC_RECORD_HEADER_BYTES, key, key_len);
}

/* Find key in the active table.  Returns its entry or -1; *free_at gets the
 * first empty or tombstone entry on the probe path (-1 if none). */
static int64_t probe(struct sc_layout *L, const uint8_t *key, uint32_t key_len, uint64_t hash, int64_t *free_at)
{
    struct sc_index_entry *t = active_table(L);
    uint64_t mask = L->index_slots - 1, i = hash & mask;
    *free_at = -1;
    for (uint64_t n = 0; n < L->index_slots; n++, i = (i + 1) & mask) {
        uint64_t p = t[i].ptr;
        if (p == 0) {
            if (*free_at < 0)
                *free_at = (int64_t)i;
            return -1;
        }
        if (p == TOMBSTONE) {
            if (*free_at < 0)
                *free_at = (int64_t)i;
            continue;
        }
        if (t[i].hash == hash && record_is(L, p - 1, key, key_len))
            return (int64_t)i;
    }
    return -1;
}

int64_t sc_store_lookup(struct sc_layout *L, const uint8_t *key, uint32_t key_len)
{
    int64_t free_at, i = probe(L, key, key_len, sc_hash(L->hash_seed, key, key_len), &free_at);
    if (i < 0)
        return -1;
    struct sc_record r;
    read_record(L, active_table(L)[i].ptr - 1, &r);
    return (int64_t)sc_record_size(r.key_len, r.value_len);
}

/* The entry of the active table that points at the record at pos, or -1. */
static int64_t entry_pointing_at(struct sc_layout *L, uint64_t pos, uint64_t hash)
{
    struct sc_index_entry *t = active_table(L);
    uint64_t mask = L->index_slots - 1, i = hash & mask;
    for (uint64_t n = 0; n < L->index_slots; n++, i = (i + 1) & mask) {
        uint64_t p = t[i].ptr;
        if (p == 0)
            return -1;
        if (p == pos + 1)
            return (int64_t)i;
    }
    return -1;
}

/* Tail must be published before the space behind it is written again. */
static void advance_heap_tail(struct sc_header *h, uint64_t tail)
{
    STORE(h->heap_tail, tail);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void heap_move(struct sc_layout *L, uint64_t from, uint64_t to, uint64_t len)
{
    uint8_t chunk[4096];
    while (len) {
        uint64_t n = len < sizeof chunk ? len : sizeof chunk;
        copy_out(chunk, heap(L), L->heap_bytes, from, n);
        copy_in(heap(L), L->heap_bytes, to, chunk, n);
        from += n;
        to += n;
        len -= n;
    }
}

/* One step of log cleaning: the record at the tail is dropped if no entry
 * of the active table points at it, otherwise moved to the head and its
 * entry repointed; then the tail moves past it.  A move needs free space for
 * the copy: refusing rather than overwriting the tail is the last line of
 * defence if the accounting is wrong. */
static int clean_one(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    uint64_t pos = h->heap_tail;
    struct sc_record r;
    read_record(L, pos, &r);
    uint64_t size = sc_record_size(r.key_len, r.value_len);
    if (r.key_len == 0 || r.key_len > SC_MAX_KEY_BYTES || size > L->max_record || pos + size > h->heap_head)
        return SC_CORRUPT;
    int64_t e = entry_pointing_at(L, pos, r.hash);
    if (e >= 0) {
        uint64_t to = h->heap_head;
        if (L->heap_bytes - (to - pos) < size)
            return SC_CORRUPT;
        heap_move(L, pos, to, size);
        STORE_REL(h->heap_head, to + size);
        STORE_REL(active_table(L)[e].ptr, to + 1);
    }
    advance_heap_tail(h, pos + size);
    return SC_OK;
}

/* Log cleaning: make the heap's free space at least need + max_record.  With
 * live_bytes <= store_bytes, need <= max_record = store_bytes / 2 and
 * heap_bytes = 2 * store_bytes this always succeeds within one pass over the
 * heap (design.md, "Heap space"); failing means the accounting is corrupt. */
static int make_room(struct sc_layout *L, uint64_t need)
{
    struct sc_header *h = hdr(L);
    uint64_t stop = h->heap_head;
    while (L->heap_bytes - (h->heap_head - h->heap_tail) < need + L->max_record) {
        if (h->heap_tail >= stop)
            return SC_CORRUPT;
        int rc = clean_one(L);
        if (rc != SC_OK)
            return rc;
    }
    return SC_OK;
}

static uint64_t heap_append(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                            const uint8_t *value, uint32_t value_len, uint64_t rv, uint64_t hash)
{
    struct sc_header *h = hdr(L);
    uint64_t pos = h->heap_head;
    struct sc_record r = {rv, key_len, value_len, hash};
    copy_in(heap(L), L->heap_bytes, pos, (const uint8_t *)&r, sizeof r);
    copy_in(heap(L), L->heap_bytes, pos + sizeof r, key, key_len);
    copy_in(heap(L), L->heap_bytes, pos + sizeof r + key_len, value, value_len);
    STORE_REL(h->heap_head, pos + sc_record_size(key_len, value_len));
    return pos;
}

/* Rebuild the inactive table from the active one without tombstones, then
 * switch.  Readers of the old table notice through index_gen. */
static void rebuild_index(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    uint64_t a = h->active_index & 1, b = a ^ 1, mask = L->index_slots - 1;
    struct sc_index_entry *src = table(L, a), *dst = table(L, b);
    /* the index_gen bump that made dst inactive (earlier, a release store)
     * must be visible before any of dst is cleared: a reader that sees a
     * cleared entry then sees the generation moved */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memset(dst, 0, L->index_slots * sizeof *dst);
    for (uint64_t i = 0; i < L->index_slots; i++) {
        uint64_t p = src[i].ptr;
        if (p == 0 || p == TOMBSTONE)
            continue;
        uint64_t j = src[i].hash & mask;
        while (dst[j].ptr != 0)
            j = (j + 1) & mask;
        dst[j].hash = src[i].hash;
        dst[j].ptr = p;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    STORE_REL(h->active_index, b);
    STORE_REL(h->index_gen, h->index_gen + 1);
    h->tombstones = 0;
}

/* ---- ring: writer side ---------------------------------------------------- */

static void ring_append(struct sc_layout *L, uint32_t type, const uint8_t *key, uint32_t key_len,
                        const uint8_t *value, uint32_t value_len, uint64_t rv)
{
    struct sc_header *h = hdr(L);
    uint64_t need = (uint64_t)key_len + value_len;
    uint64_t start = h->start_index, end = h->end_index, head = h->arena_head;
    uint64_t keep = start;
    if (end - keep >= L->capacity)
        keep = end - L->capacity + 1;
    while (keep < end && head + need - slot_at(L, keep)->data_pos > L->arena_bytes)
        keep++;
    if (keep != start) {
        /* eviction: startIndex moves before the space is reused */
        STORE(h->start_index, keep);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        h->events_evicted += keep - start;
    }
    copy_in(arena(L), L->arena_bytes, head, key, key_len);
    copy_in(arena(L), L->arena_bytes, head + key_len, value, value_len);
    struct sc_slot *s = slot_at(L, end);
    s->rv = rv;
    s->data_pos = head;
    s->key_len = key_len;
    s->value_len = value_len;
    s->type = type;
    h->arena_head = head + need;
    STORE_REL(h->end_index, end + 1);
    STORE_REL(h->rv, rv);
    h->events_written++;
}

/* The put half of sc_apply, for a key already probed: e is its entry or -1,
 * free_at the first free entry on its probe path.  Cleaning the heap first
 * moves records, never entries, so the probe stays valid. */
static int put_probed(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                      const uint8_t *value, uint32_t value_len, uint64_t rv, int flags,
                      uint64_t hash, int64_t e, int64_t free_at)
{
    struct sc_header *h = hdr(L);
    uint64_t size = sc_record_size(key_len, value_len);
    if (size > L->max_record || make_room(L, size) != SC_OK)
        return -SC_CORRUPT;
    if (e < 0 && free_at < 0)
        return -SC_CORRUPT; /* a table with no free entry: max_keys was not enforced */
    uint32_t type = e >= 0 ? SC_MODIFIED : SC_ADDED;
    if (flags & SC_APPLY_RING)
        ring_append(L, type, key, key_len, value, value_len, rv);
    uint64_t pos = heap_append(L, key, key_len, value, value_len, rv, hash);
    struct sc_index_entry *t = active_table(L);
    if (e >= 0) {
        struct sc_record old;
        read_record(L, t[e].ptr - 1, &old);
        STORE_REL(t[e].ptr, pos + 1);
        h->live_bytes += size - sc_record_size(old.key_len, old.value_len);
    } else {
        if (t[free_at].ptr == TOMBSTONE)
            h->tombstones--;
        t[free_at].hash = hash; /* before ptr: readers load ptr, then hash */
        STORE_REL(t[free_at].ptr, pos + 1);
        h->live_keys++;
        h->live_bytes += size;
    }
    if (flags & SC_APPLY_STORE_RV)
        STORE_REL(h->store_rv, rv);
    return (int)type;
}

/* Apply one put (type SC_ADDED or SC_MODIFIED: chosen here) or delete to the
 * store, publishing it to the ring first with SC_APPLY_RING and advancing
 * store_rv after with SC_APPLY_STORE_RV.  The caller validated
 * sizes and capacity.  Returns the event type, or -SC_NOTFOUND / -SC_CORRUPT /
 * -SC_NOMEM with nothing published. */
int sc_apply(struct sc_layout *L, uint32_t type, const uint8_t *key, uint32_t key_len,
             const uint8_t *value, uint32_t value_len, uint64_t rv, int flags)
{
    struct sc_header *h = hdr(L);
    uint64_t hash = sc_hash(L->hash_seed, key, key_len);
    int64_t free_at, e;

    if (type == SC_DELETED) {
        e = probe(L, key, key_len, hash, &free_at);
        if (e < 0)
            return -SC_NOTFOUND;
        struct sc_index_entry *t = active_table(L);
        uint64_t pos = t[e].ptr - 1;
        struct sc_record r;
        read_record(L, pos, &r);
        if (flags & SC_APPLY_RING) {
            /* the DELETED event carries the last value */
            uint8_t *last = malloc(r.value_len ? r.value_len : 1);
            if (!last)
                return -SC_NOMEM;
            copy_out(last, heap(L), L->heap_bytes, pos + SC_RECORD_HEADER_BYTES + key_len, r.value_len);
            ring_append(L, SC_DELETED, key, key_len, last, r.value_len, rv);
            free(last);
        }
        STORE_REL(t[e].ptr, TOMBSTONE);
        h->live_keys--;
        h->live_bytes -= sc_record_size(r.key_len, r.value_len);
        h->tombstones++;
        if (h->tombstones > L->index_slots / 4)
            rebuild_index(L);
    } else {
        e = probe(L, key, key_len, hash, &free_at);
        return put_probed(L, key, key_len, value, value_len, rv, flags, hash, e, free_at);
    }
    if (flags & SC_APPLY_STORE_RV)
        STORE_REL(h->store_rv, rv);
    return (int)type;
}

static int64_t next_rv(struct sc_header *h, uint64_t rv)
{
    uint64_t current = h->rv;
    if (rv == 0)
        return current < INT64_MAX ? (int64_t)current + 1 : -SC_BAD_RV;
    return rv > current && rv <= INT64_MAX ? (int64_t)rv : -SC_BAD_RV;
}

/* put() of one key under the lock: resource version (rv 0: current + 1),
 * capacity check, then sc_apply.  Returns the event's rv or a negative
 * SC_* code with nothing changed.  Sizes were validated by the caller. */
int64_t sc_put(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
               const uint8_t *value, uint32_t value_len, uint64_t rv, uint64_t max_keys,
               uint64_t store_bytes)
{
    struct sc_header *h = hdr(L);
    int64_t new_rv = next_rv(h, rv);
    if (new_rv < 0)
        return new_rv;
    uint64_t hash = sc_hash(L->hash_seed, key, key_len), old = 0;
    int64_t free_at, e = probe(L, key, key_len, hash, &free_at);
    if (e >= 0) {
        struct sc_record r;
        read_record(L, active_table(L)[e].ptr - 1, &r);
        old = sc_record_size(r.key_len, r.value_len);
    } else if (h->live_keys >= max_keys) {
        return -SC_FULL_KEYS;
    }
    if (h->live_bytes - old + sc_record_size(key_len, value_len) > store_bytes)
        return -SC_FULL_BYTES;
    int rc = put_probed(L, key, key_len, value, value_len, (uint64_t)new_rv,
                        SC_APPLY_RING | SC_APPLY_STORE_RV, hash, e, free_at);
    return rc < 0 ? rc : new_rv;
}

int64_t sc_delete(struct sc_layout *L, const uint8_t *key, uint32_t key_len, uint64_t rv)
{
    int64_t new_rv = next_rv(hdr(L), rv);
    if (new_rv < 0)
        return new_rv;
    int rc = sc_apply(L, SC_DELETED, key, key_len, NULL, 0, (uint64_t)new_rv,
                      SC_APPLY_RING | SC_APPLY_STORE_RV);
    return rc < 0 ? rc : new_rv;
}

/* The dry run of a put_many batch, in order, before anything is written: a
 * delete of a key absent by then (SC_NOTFOUND), a key beyond max_keys
 * (SC_FULL_KEYS) or records beyond store_bytes (SC_FULL_BYTES) at
 * *out_index, else SC_OK.  A key seen earlier in the batch counts as that
 * step left it, so the store is probed once per distinct key.  SC_CORRUPT if
 * the ops overrun the blob; SC_NOMEM if the scratch table cannot be had. */
int sc_batch_check(struct sc_layout *L, const uint8_t *blob, uint64_t blob_len,
                   const struct sc_batch_op *ops, uint32_t count, uint64_t max_keys,
                   uint64_t store_bytes, uint32_t *out_index)
{
    struct seen {
        uint64_t hash;
        const uint8_t *key; /* NULL: a free entry */
        uint32_t key_len;
        int64_t size;       /* the key's record size after the steps so far; -1 absent */
    } *seen;
    uint64_t slots = 16;
    while (slots < 2 * (uint64_t)count)
        slots <<= 1;
    seen = calloc(slots, sizeof *seen);
    if (seen == NULL)
        return SC_NOMEM;
    struct sc_header *h = hdr(L);
    int64_t live_keys = (int64_t)h->live_keys, live_bytes = (int64_t)h->live_bytes;
    uint64_t pos = 0;
    int rc = SC_OK;
    uint32_t i;
    for (i = 0; i < count; i++) {
        uint32_t kl = ops[i].key_len;
        uint64_t vl = ops[i].is_delete ? 0 : ops[i].value_len;
        if (kl == 0 || kl > SC_MAX_KEY_BYTES || kl + vl > blob_len - pos || pos > blob_len) {
            rc = SC_CORRUPT;
            break;
        }
        const uint8_t *key = blob + pos;
        uint64_t hash = sc_hash(L->hash_seed, key, kl), j = hash & (slots - 1);
        while (seen[j].key != NULL
               && !(seen[j].hash == hash && seen[j].key_len == kl && memcmp(seen[j].key, key, kl) == 0))
            j = (j + 1) & (slots - 1);
        if (seen[j].key == NULL) {
            int64_t free_at, e = probe(L, key, kl, hash, &free_at);
            seen[j].size = -1;
            if (e >= 0) {
                struct sc_record r;
                read_record(L, active_table(L)[e].ptr - 1, &r);
                seen[j].size = (int64_t)sc_record_size(r.key_len, r.value_len);
            }
            seen[j].hash = hash;
            seen[j].key = key;
            seen[j].key_len = kl;
        }
        int64_t old = seen[j].size;
        if (ops[i].is_delete) {
            if (old < 0) {
                rc = SC_NOTFOUND;
                break;
            }
            live_keys--;
            live_bytes -= old;
            seen[j].size = -1;
        } else {
            int64_t size = (int64_t)sc_record_size(kl, (uint32_t)vl);
            if (old < 0)
                live_keys++;
            else
                live_bytes -= old;
            live_bytes += size;
            if (live_keys > (int64_t)max_keys) {
                rc = SC_FULL_KEYS;
                break;
            }
            if (live_bytes > (int64_t)store_bytes) {
                rc = SC_FULL_BYTES;
                break;
            }
            seen[j].size = size;
        }
        pos += kl + vl;
    }
    free(seen);
    *out_index = i;
    return rc;
}

/* A validated batch (put_many): event i gets first_rv + i.  Returns the last
 * rv, or a negative SC_* code after applying the events before the failing
 * one (which only a corrupt segment or a wrong blob can cause). */
int64_t sc_put_many(struct sc_layout *L, const uint8_t *blob, uint64_t blob_len,
                    const struct sc_batch_op *ops, uint32_t count, uint64_t first_rv)
{
    uint64_t pos = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t vlen = ops[i].is_delete ? 0 : ops[i].value_len;
        if (pos + ops[i].key_len + vlen > blob_len)
            return -SC_CORRUPT;
        const uint8_t *key = blob + pos, *value = key + ops[i].key_len;
        int rc = sc_apply(L, ops[i].is_delete ? SC_DELETED : SC_ADDED, key, ops[i].key_len, value,
                          (uint32_t)vlen, first_rv + i, SC_APPLY_RING | SC_APPLY_STORE_RV);
        if (rc < 0)
            return rc;
        pos += ops[i].key_len + vlen;
    }
    return (int64_t)(first_rv + count - 1);
}

/* A bookmark (the lock is held): the cache's state is now that of rv, with
 * no event between the newest one and rv — an upstream that reports "nothing
 * of yours changed up to rv" (etcd's progress notification, Kubernetes'
 * bookmark).  h->rv first, then store_rv: a reader between the two sees
 * store_rv < rv with no events to replay up to rv and retries; a holder dying
 * between them is repaired by sc_replay, which brings store_rv up to rv once
 * every event is applied.  -SC_BAD_RV unless rv > h->rv. */
int64_t sc_bookmark(struct sc_layout *L, uint64_t rv)
{
    struct sc_header *h = hdr(L);
    if (rv <= h->rv || rv > (uint64_t)INT64_MAX)
        return -SC_BAD_RV;
    STORE_REL(h->rv, rv);
    STORE_REL(h->store_rv, rv);
    return (int64_t)rv;
}

/* ---- the writers' lock (_lock.py holds the protocol) ----------------------
 * The lock word is the holder's whole identity (pid, PID namespace, start
 * ticks, boot tag) in 16 bytes, claimed from zero and given back to zero by
 * single 16-byte CAS operations: no moment exists at which the lock is
 * taken but its holder not yet known, so nothing is ever written about the
 * holder outside that CAS (docs/design.md, "The writers' lock"). */

typedef unsigned __int128 u128;

static inline u128 word_of(uint64_t w0, uint64_t w1) { return ((u128)w1 << 64) | w0; }

/* __sync builtins on 16 bytes are full barriers and compile to cmpxchg16b
 * (x86-64, -mcx16) or an exclusive-pair loop / casp (AArch64): lock-free,
 * unlike libatomic's __atomic on 16 bytes, which may fall back to a
 * process-local lock and then excludes nothing across processes. */
static inline int cas128(uint64_t *addr, u128 expected, u128 desired)
{
    return __sync_bool_compare_and_swap((u128 *)addr, expected, desired);
}

static inline u128 load128(uint64_t *addr)
{
    /* a CAS that stores only what is already there: an atomic read (needs a
     * writable mapping; only writers look at the lock) */
    return __sync_val_compare_and_swap((u128 *)addr, (u128)0, (u128)0);
}

static int claim_pause_fd = -1;

void sc_test_set_claim_pause_fd(int fd) { claim_pause_fd = fd; }

size_t sc_sem_bytes(void) { return sizeof(sem_t); }

void *sc_sem_map(int fd)
{
    void *sem = mmap(NULL, sizeof(sem_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return sem == MAP_FAILED ? NULL : sem;
}

int sc_sem_init(void *sem) { return sem_init((sem_t *)sem, 1, 1) == 0 ? 0 : errno; }

void sc_sem_close(void *sem)
{
    if (sem)
        munmap(sem, sizeof(sem_t));
}

int sc_sem_post(void *sem) { return sem_post((sem_t *)sem) == 0 ? 0 : errno; }

int sc_lock_acquire(struct sc_layout *L, struct sc_lock_state *S, int64_t timeout_ns)
{
    struct sc_header *h = hdr(L);
    if (S->held)
        return SC_LOCK_ERROR; /* not reentrant: the caller serialises its threads */
    int rc;
    if (timeout_ns < 0) {
        rc = sem_wait((sem_t *)S->sem);
    } else {
        /* CLOCK_MONOTONIC: a step of the wall clock neither cuts the wait
         * short nor stretches it */
        struct timespec deadline = deadline_after(timeout_ns);
        rc = sem_clockwait((sem_t *)S->sem, CLOCK_MONOTONIC, &deadline);
    }
    if (rc != 0) {
        if (errno == EINTR)
            return SC_LOCK_INTERRUPTED;
        if (errno == ETIMEDOUT)
            return SC_LOCK_TIMEOUT;
        return SC_LOCK_ERROR;
    }
    if (claim_pause_fd >= 0) { /* once */
        char byte;
        int fd = claim_pause_fd;
        claim_pause_fd = -1;
        while (read(fd, &byte, 1) < 0 && errno == EINTR)
            ;
    }
    if (!cas128(&h->lock_token, 0, word_of(S->word[0], S->word[1])))
        return SC_LOCK_VOID;
    S->held = 1;
    __atomic_fetch_add(&h->lock_seq, 1, __ATOMIC_ACQ_REL);
    S->rv_at_claim = h->rv;
    if (h->op_state != SC_OP_IDLE) {
        S->repair_pending = 1;
        S->must_notify = 1;
        return SC_LOCK_REPAIR;
    }
    S->repair_pending = 0;
    S->must_notify = 0;
    h->op_state = SC_OP_MUTATING;
    return SC_LOCK_ACQUIRED;
}

void sc_lock_repaired(struct sc_layout *L, struct sc_lock_state *S)
{
    hdr(L)->op_state = SC_OP_MUTATING;
    S->repair_pending = 0;
}

int sc_lock_release(struct sc_layout *L, struct sc_lock_state *S)
{
    struct sc_header *h = hdr(L);
    if (!S->held)
        return 0;
    /* wake while still holding: a holder that dies after this has woken
     * its watchers; one that dies before it left op_state not idle, and
     * the next holder's repair wakes them */
    if (S->must_notify || h->rv != S->rv_at_claim)
        sc_notify(L);
    /* a replace or repair cut short stays marked for the next holder; only
     * a completed change is idle */
    if (h->op_state == SC_OP_MUTATING)
        h->op_state = S->repair_pending ? SC_OP_BROKEN : SC_OP_IDLE;
    __atomic_fetch_add(&h->lock_seq, 1, __ATOMIC_ACQ_REL);
    int ours = cas128(&h->lock_token, word_of(S->word[0], S->word[1]), 0);
    S->held = 0;
    if (!ours)
        return -1; /* taken back by a recoverer, who posted for us */
    sem_post((sem_t *)S->sem);
    return 1;
}

void sc_lock_word(struct sc_layout *L, uint64_t *out)
{
    struct sc_header *h = hdr(L);
    u128 w = load128(&h->lock_token);
    out[0] = (uint64_t)w;
    out[1] = (uint64_t)(w >> 64);
    out[2] = __atomic_load_n(&h->lock_seq, __ATOMIC_ACQUIRE);
}

int sc_lock_take_back(struct sc_layout *L, void *sem, uint64_t word0, uint64_t word1)
{
    struct sc_header *h = hdr(L);
    u128 w = word_of(word0, word1);
    if (w == 0 || !cas128(&h->lock_token, w, 0))
        return 0;
    __atomic_fetch_add(&h->lock_recoveries, 1, __ATOMIC_ACQ_REL);
    sem_post((sem_t *)sem);
    /* it may have died between publishing and waking */
    sc_notify(L);
    return 1;
}

int sc_lock_abandon(struct sc_layout *L, void *sem, uint64_t seq)
{
    struct sc_header *h = hdr(L);
    if (load128(&h->lock_token) != 0 || !sc_cas(&h->lock_seq, seq, seq + 1))
        return 0;
    __atomic_fetch_add(&h->lock_recoveries, 1, __ATOMIC_ACQ_REL);
    sem_post((sem_t *)sem);
    sc_notify(L);
    return 1;
}

/* ---- replace: a new store built beside the old one ------------------------
 * (design.md, "replace()").  The holder stages the new state into the
 * inactive table and fresh heap records while readers keep using the old
 * one, then switches.  A holder that dies while staging leaves the old store
 * intact (sc_stage_abandon); one that dies while committing left a complete
 * staged table, and the next holder commits it. */

/* Begin staging a replace at rv: one cleaning pass over the whole heap, so
 * that its free space is heap_bytes - live_bytes >= store_bytes, room for
 * any new state; then an empty inactive table.  Readers never probe the
 * inactive table past a generation check: it was inactive since the last
 * switch, which bumped index_gen. */
int sc_stage_begin(struct sc_layout *L, uint64_t rv)
{
    struct sc_header *h = hdr(L);
    uint64_t stop = h->heap_head;
    while (h->heap_tail < stop) {
        int rc = clean_one(L);
        if (rc != SC_OK)
            return rc;
    }
    uint64_t staged = (h->active_index & 1) ^ 1;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* as in rebuild_index */
    memset(table(L, staged), 0, L->index_slots * sizeof(struct sc_index_entry));
    h->op_arg = rv;
    h->op_table = staged;
    h->op_heap = h->heap_head;
    h->op_state = SC_OP_REPLACING;
    return SC_OK;
}

/* Add one record of the new state (keys unique, sizes checked by the caller
 * against store_bytes and max_keys). */
int sc_stage_put(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                 const uint8_t *value, uint32_t value_len, uint64_t rv)
{
    struct sc_header *h = hdr(L);
    uint64_t size = sc_record_size(key_len, value_len);
    if (h->op_state != SC_OP_REPLACING || key_len == 0 || key_len > SC_MAX_KEY_BYTES ||
        size > L->max_record || L->heap_bytes - (h->heap_head - h->heap_tail) < size ||
        rv == 0 || rv > h->op_arg)
        return SC_CORRUPT;
    struct sc_index_entry *t = table(L, h->op_table);
    uint64_t hash = sc_hash(L->hash_seed, key, key_len), mask = L->index_slots - 1, j = hash & mask;
    for (uint64_t n = 0; t[j].ptr != 0; j = (j + 1) & mask)
        if (++n == L->index_slots)
            return SC_CORRUPT;
    uint64_t pos = heap_append(L, key, key_len, value, value_len, rv, hash);
    /* a reader of a stale generation may still walk this table: it must
     * see a complete record behind any ptr it loads (it then fails its
     * generation check; it must not mistake the record for corruption) */
    STORE(t[j].hash, hash);
    STORE_REL(t[j].ptr, pos + 1);
    return SC_OK;
}

/* A staging holder died (or raised): forget the staged records.  Nothing of
 * them was ever reachable by a reader, so the heap head may move back. */
void sc_stage_abandon(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    if (h->op_heap >= h->heap_tail && h->op_heap <= h->heap_head)
        STORE_REL(h->heap_head, h->op_heap);
}

/* Commit step 1 (idempotent): the window is expired at the replace's rv.
 * The fence orders the start_index store before any later reuse of the
 * expired slots and arena bytes, as eviction does. */
void sc_expire_window(struct sc_layout *L, uint64_t rv)
{
    struct sc_header *h = hdr(L);
    uint64_t end = LOAD_ACQ(h->end_index);
    STORE_REL(h->replace_index, end);
    STORE_REL(h->replace_rv, rv);
    STORE_REL(h->start_index, end);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* Make the staged table the store (idempotent: a recovering holder may
 * repeat it).  The caller has already expired the ring's window and
 * published rv = op_arg, so a list() that sees the new table also sees an
 * rv its old store_rv cannot be replayed to, and retries. */
int sc_stage_switch(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    if ((h->active_index & 1) != (h->op_table & 1)) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        STORE_REL(h->active_index, h->op_table & 1);
    }
    return sc_recount(L); /* the new counters; bumps index_gen */
}

/* Recompute the store's counters from the active table (after a crash the
 * counters may lag one step behind the table). */
int sc_recount(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    struct sc_index_entry *t = active_table(L);
    uint64_t keys = 0, bytes = 0, tomb = 0;
    for (uint64_t i = 0; i < L->index_slots; i++) {
        uint64_t p = t[i].ptr;
        if (p == 0)
            continue;
        if (p == TOMBSTONE) {
            tomb++;
            continue;
        }
        uint64_t pos = p - 1;
        if (pos < h->heap_tail || pos >= h->heap_head)
            return SC_CORRUPT;
        struct sc_record r;
        read_record(L, pos, &r);
        uint64_t size = sc_record_size(r.key_len, r.value_len);
        if (r.key_len == 0 || r.key_len > SC_MAX_KEY_BYTES || size > L->max_record || pos + size > h->heap_head)
            return SC_CORRUPT;
        keys++;
        bytes += size;
    }
    h->live_keys = keys;
    h->live_bytes = bytes;
    h->tombstones = tomb;
    /* a crash between switching tables and bumping the generation must not
     * let a reader of the old table pass validation */
    STORE_REL(h->index_gen, h->index_gen + 1);
    return SC_OK;
}

static int ring_find(struct sc_layout *L, uint64_t start, uint64_t end, uint64_t since_rv,
                     uint64_t *out_index, uint64_t *out_start);

/* Apply to the store every published event it has not seen (rv > store_rv):
 * the ring is the store's write-ahead log.  Returns SC_OK or SC_CORRUPT. */
int sc_replay(struct sc_layout *L)
{
    struct sc_header *h = hdr(L);
    uint64_t start = h->start_index, end = h->end_index, from, unused;
    if (end < start || end - start > L->capacity)
        return SC_CORRUPT;
    if (ring_find(L, start, end, h->store_rv, &from, &unused) != SC_OK)
        return SC_CORRUPT;
    for (uint64_t i = from; i < end; i++) {
        struct sc_slot s = *slot_at(L, i);
        if (s.key_len == 0 || s.key_len > SC_MAX_KEY_BYTES || (uint64_t)s.key_len + s.value_len > L->arena_bytes)
            return SC_CORRUPT;
        uint8_t *buf = malloc((uint64_t)s.key_len + s.value_len);
        if (!buf)
            return SC_NOMEM;
        copy_out(buf, arena(L), L->arena_bytes, s.data_pos, (uint64_t)s.key_len + s.value_len);
        int rc = sc_apply(L, s.type, buf, s.key_len, buf + s.key_len, s.value_len, s.rv, SC_APPLY_STORE_RV);
        free(buf);
        if (rc == -SC_NOTFOUND) /* a delete already applied */
            STORE_REL(h->store_rv, s.rv);
        else if (rc < 0)
            return -rc;
    }
    if (end > start) {
        uint64_t last = slot_at(L, end - 1)->rv;
        if (h->rv < last)
            STORE_REL(h->rv, last);
    }
    /* every event is applied now; an rv beyond the newest one is a bookmark
     * whose holder died before it advanced store_rv */
    if (h->store_rv < h->rv)
        STORE_REL(h->store_rv, h->rv);
    return SC_OK;
}

/* ---- ring: reader side ---------------------------------------------------- */

/* A consistent window of the ring: out[0] start_index, out[1] end_index,
 * out[3] replace_index, out[4] replace_rv (0: none), out[2] the effective oldest rv (docs/design.md, "Resource versions": the
 * oldest held event's, replace_rv + 1 right after a replace with no eviction
 * since, rv + 1 for a ring emptied after events, 0 for a ring that never
 * held one).  Read until start, replace_rv and end are the same after a
 * fence as before; SC_CORRUPT if they never are (or never make sense). */
static int ring_window(struct sc_layout *L, uint64_t *out)
{
    struct sc_header *h = hdr(L);
    for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
        uint64_t start = LOAD_ACQ(h->start_index), rep_rv = LOAD_ACQ(h->replace_rv);
        uint64_t rep_index = LOAD_ACQ(h->replace_index), end = LOAD_ACQ(h->end_index);
        uint64_t oldest;
        if (!(start <= end && end - start <= L->capacity))
            continue;
        if (rep_rv && start == rep_index) {
            oldest = rep_rv + 1;
        } else if (start < end) {
            oldest = LOAD(slot_at(L, start)->rv);
        } else {
            /* empty although events were published: a writer evicted them
             * all to make room for one it died before publishing */
            uint64_t newest = LOAD_ACQ(h->rv);
            oldest = newest ? newest + 1 : 0;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD_ACQ(h->start_index) == start && LOAD_ACQ(h->replace_rv) == rep_rv
            && LOAD_ACQ(h->end_index) == end) {
            out[0] = start;
            out[1] = end;
            out[2] = oldest;
            out[3] = rep_index;
            out[4] = rep_rv;
            return SC_OK;
        }
    }
    return SC_CORRUPT;
}

/* First index in [start, end) whose event has rv > since_rv (end if none).
 * *out_start is start_index re-read after the search: the answer is exact
 * iff it still equals start (no slot the search read was being reused). */
static int ring_find(struct sc_layout *L, uint64_t start, uint64_t end, uint64_t since_rv,
                     uint64_t *out_index, uint64_t *out_start)
{
    *out_start = UINT64_MAX;
    if (end < start || end - start > L->capacity)
        return SC_RETRY;
    uint64_t lo = start, hi = end;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (LOAD(slot_at(L, mid)->rv) > since_rv)
            hi = mid;
        else
            lo = mid + 1;
    }
    *out_index = lo;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    *out_start = LOAD(hdr(L)->start_index);
    return SC_OK;
}

static int ring_copy(struct sc_layout *L, uint64_t from, uint64_t end, uint32_t max_events,
                     const uint8_t *prefix, uint32_t prefix_len,
                     struct sc_event_meta *meta, uint8_t *data, uint64_t data_cap, uint64_t *out)
{
    int rc = SC_OK;
    uint32_t n = 0;
    uint64_t used = 0, i = from, prev_rv = 0;
    uint8_t head[SC_MAX_KEY_BYTES];
    if (end < from || end - from > L->capacity || prefix_len > SC_MAX_KEY_BYTES) {
        rc = SC_RETRY; /* lapped: the validity check below decides */
        end = from;
    }
    for (; i < end && n < max_events; i++) {
        struct sc_slot *s = slot_at(L, i);
        uint64_t rv = LOAD(s->rv), pos = LOAD(s->data_pos);
        uint32_t kl = LOAD(s->key_len), vl = LOAD(s->value_len), type = LOAD(s->type);
        uint64_t len = (uint64_t)kl + vl;
        if (kl == 0 || kl > SC_MAX_KEY_BYTES || len > L->arena_bytes || type < SC_ADDED || type > SC_DELETED
            || rv <= prev_rv) {
            rc = SC_CORRUPT;
            break;
        }
        prev_rv = rv;
        if (prefix_len) {
            if (kl < prefix_len)
                continue;
            copy_out(head, arena(L), L->arena_bytes, pos, prefix_len);
            if (memcmp(head, prefix, prefix_len) != 0)
                continue;
        }
        if (used + len > data_cap) {
            if (n == 0) {
                rc = SC_NOSPACE;
                used = len;
            }
            break;
        }
        copy_out(data + used, arena(L), L->arena_bytes, pos, len);
        meta[n].rv = rv;
        meta[n].type = type;
        meta[n].key_len = kl;
        meta[n].value_len = vl;
        meta[n].reserved = 0;
        used += len;
        n++;
    }
    /* validity after the copy: the copied slots were not reused iff
     * start_index has not passed from */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    out[3] = LOAD(hdr(L)->start_index);
    out[0] = i;
    out[1] = n;
    out[2] = used;
    return rc;
}

/* ---- store: reader side --------------------------------------------------- */

/* One lock-free lookup attempt.  SC_OK / SC_NOTFOUND / SC_NOSPACE are final
 * only if the caller's validation (tail and generation) holds. */
static int get_once(struct sc_layout *L, const uint8_t *key, uint32_t key_len, uint64_t hash,
                    uint8_t *out, uint64_t out_cap, uint64_t *out_value_len, uint64_t *out_rv,
                    uint64_t *lowest_pos)
{
    struct sc_index_entry *t = active_table(L);
    uint64_t mask = L->index_slots - 1, i = hash & mask;
    for (uint64_t n = 0; n < L->index_slots; n++, i = (i + 1) & mask) {
        uint64_t p = LOAD_ACQ(t[i].ptr);
        if (p == 0)
            return SC_NOTFOUND;
        if (p == TOMBSTONE || LOAD(t[i].hash) != hash)
            continue;
        uint64_t pos = p - 1;
        if (pos < *lowest_pos)
            *lowest_pos = pos;
        struct sc_record r;
        read_record(L, pos, &r);
        uint32_t kl = LOAD(r.key_len), vl = LOAD(r.value_len);
        if (kl != key_len || !equal_at(heap(L), L->heap_bytes, pos + SC_RECORD_HEADER_BYTES, key, key_len))
            continue;
        if (sc_record_size(kl, vl) > L->max_record)
            return SC_CORRUPT;
        *out_value_len = vl;
        *out_rv = r.rv;
        if (vl > out_cap)
            return SC_NOSPACE;
        copy_out(out, heap(L), L->heap_bytes, pos + SC_RECORD_HEADER_BYTES + kl, vl);
        return SC_OK;
    }
    return SC_NOTFOUND; /* probed every entry */
}

static int store_get(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                     uint8_t *out, uint64_t out_cap, uint64_t *out_value_len, uint64_t *out_rv,
                     uint64_t *out_seen)
{
    struct sc_header *h = hdr(L);
    out_seen[0] = LOAD_ACQ(h->store_rv);
    out_seen[1] = 0;
    if (key_len == 0 || key_len > SC_MAX_KEY_BYTES || sc_record_size(key_len, 0) > L->max_record)
        return SC_NOTFOUND; /* no such key fits this store */
    uint64_t hash = sc_hash(L->hash_seed, key, key_len);
    for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
        uint64_t gen = LOAD_ACQ(h->index_gen), lowest = UINT64_MAX;
        int rc = get_once(L, key, key_len, hash, out, out_cap, out_value_len, out_rv, &lowest);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        /* every record looked at must still be intact, and the table the
         * probe walked must still be the active one */
        if (LOAD(h->heap_tail) > lowest || LOAD(h->index_gen) != gen)
            continue;
        uint64_t start = LOAD_ACQ(h->start_index), end = LOAD_ACQ(h->end_index);
        if (end > start && end - start <= L->capacity)
            out_seen[1] = LOAD(slot_at(L, end - 1)->rv);
        return rc;
    }
    return SC_RETRY;
}

static int scan_pause_fd = -1;

void sc_test_set_scan_pause_fd(int fd) { scan_pause_fd = fd; }

static int store_scan(struct sc_layout *L, uint64_t gen, uint64_t *cursor,
                      const uint8_t *prefix, uint32_t prefix_len,
                      uint8_t *out, uint64_t out_cap, uint64_t *out_used, uint32_t *out_count)
{
    struct sc_header *h = hdr(L);
    uint64_t used = 0;
    uint32_t count = 0;
    uint8_t head[SC_MAX_KEY_BYTES];
    if (LOAD_ACQ(h->index_gen) != gen || prefix_len > SC_MAX_KEY_BYTES)
        return SC_RETRY;
    struct sc_index_entry *t = active_table(L);
    uint64_t i = *cursor;
    for (; i < L->index_slots; i++) {
        int attempt;
        for (attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
            uint64_t p = LOAD_ACQ(t[i].ptr);
            if (p == 0 || p == TOMBSTONE)
                break;
            uint64_t pos = p - 1;
            struct sc_record r;
            read_record(L, pos, &r);
            uint32_t kl = LOAD(r.key_len), vl = LOAD(r.value_len);
            uint64_t rv = LOAD(r.rv);
            int sane = kl > 0 && kl <= SC_MAX_KEY_BYTES && sc_record_size(kl, vl) <= L->max_record;
            int wanted = sane;
            if (sane && prefix_len) {
                if (kl < prefix_len) {
                    wanted = 0;
                } else {
                    copy_out(head, heap(L), L->heap_bytes, pos + SC_RECORD_HEADER_BYTES, prefix_len);
                    wanted = memcmp(head, prefix, prefix_len) == 0;
                }
            }
            uint64_t len = SC_SCAN_ITEM_HEADER_BYTES + (uint64_t)kl + vl;
            if (wanted && used + len > out_cap) {
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (LOAD(h->index_gen) != gen)
                    return SC_RETRY; /* a stale table: its sizes mean nothing */
                if (LOAD(h->heap_tail) > pos)
                    continue; /* moved: look again */
                *cursor = i;
                *out_used = count ? used : len;
                *out_count = count;
                return count ? SC_OK : SC_NOSPACE;
            }
            if (wanted) {
                memcpy(out + used, &rv, 8);
                memcpy(out + used + 8, &kl, 4);
                memcpy(out + used + 12, &vl, 4);
                copy_out(out + used + SC_SCAN_ITEM_HEADER_BYTES, heap(L), L->heap_bytes,
                         pos + SC_RECORD_HEADER_BYTES, (uint64_t)kl + vl);
            }
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            /* a table of an older generation may since have been cleared
             * and restaged (a replace, even an abandoned one): what it
             * points at is no evidence of corruption, only of a retry */
            if (LOAD(h->index_gen) != gen)
                return SC_RETRY;
            if (LOAD(h->heap_tail) > pos)
                continue; /* the record was moved or reclaimed while copied */
            if (!sane)
                return SC_CORRUPT;
            if (wanted) {
                used += len;
                count++;
            }
            if (scan_pause_fd >= 0) { /* once */
                char byte;
                int fd = scan_pause_fd;
                scan_pause_fd = -1;
                while (read(fd, &byte, 1) < 0 && errno == EINTR)
                    ;
            }
            break;
        }
        if (attempt == READ_ATTEMPTS)
            return SC_RETRY;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD(h->index_gen) != gen)
        return SC_RETRY;
    *cursor = i;
    *out_used = used;
    *out_count = count;
    return SC_OK;
}

/* ---- reader entry points: the guard around each ------------------------- */

int sc_ring_window(struct sc_layout *L, uint64_t *out)
{
    if (!enter(L))
        return SC_CLOSED;
    int rc = ring_window(L, out);
    leave(L);
    return rc;
}

int sc_ring_find(struct sc_layout *L, uint64_t start, uint64_t end, uint64_t since_rv,
                 uint64_t *out_index, uint64_t *out_start)
{
    if (!enter(L))
        return SC_CLOSED;
    int rc = ring_find(L, start, end, since_rv, out_index, out_start);
    leave(L);
    return rc;
}

int sc_ring_copy(struct sc_layout *L, uint64_t from, uint64_t end, uint32_t max_events,
                 const uint8_t *prefix, uint32_t prefix_len,
                 struct sc_event_meta *meta, uint8_t *data, uint64_t data_cap, uint64_t *out)
{
    if (!enter(L))
        return SC_CLOSED;
    int rc = ring_copy(L, from, end, max_events, prefix, prefix_len, meta, data, data_cap, out);
    leave(L);
    return rc;
}

int sc_store_get(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                 uint8_t *out, uint64_t out_cap, uint64_t *out_value_len, uint64_t *out_rv,
                 uint64_t *out_seen)
{
    if (!enter(L))
        return SC_CLOSED;
    int rc = store_get(L, key, key_len, out, out_cap, out_value_len, out_rv, out_seen);
    leave(L);
    return rc;
}

int sc_store_scan(struct sc_layout *L, uint64_t gen, uint64_t *cursor,
                  const uint8_t *prefix, uint32_t prefix_len,
                  uint8_t *out, uint64_t out_cap, uint64_t *out_used, uint32_t *out_count)
{
    if (!enter(L))
        return SC_CLOSED;
    int rc = store_scan(L, gen, cursor, prefix, prefix_len, out, out_cap, out_used, out_count);
    leave(L);
    return rc;
}

int sc_header_load(struct sc_layout *L, uint32_t offset, uint64_t *out)
{
    if (offset % 8 != 0 || offset > sizeof(struct sc_header) - 8)
        return SC_CORRUPT;
    if (!enter(L))
        return SC_CLOSED;
    *out = __atomic_load_n((const uint64_t *)(L->base + offset), __ATOMIC_ACQUIRE);
    leave(L);
    return SC_OK;
}

int sc_header_copy(struct sc_layout *L, struct sc_header *out)
{
    if (!enter(L))
        return SC_CLOSED;
    memcpy(out, L->base, sizeof *out);
    leave(L);
    return SC_OK;
}

int sc_newest_rv(struct sc_layout *L, uint64_t *out)
{
    struct sc_header *h = hdr(L);
    if (!enter(L))
        return SC_CLOSED;
    uint64_t rv = LOAD_ACQ(h->rv), w[5];
    int rc = ring_window(L, w);
    if (rc == SC_OK && w[1] > w[0]) {
        uint64_t last = LOAD(slot_at(L, w[1] - 1)->rv);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD(h->start_index) < w[1] && last > rv) /* the slot was not reused while read */
            rv = last;
    }
    leave(L);
    *out = rv;
    return rc;
}

int sc_ring_usage(struct sc_layout *L, uint64_t *out)
{
    struct sc_header *h = hdr(L);
    if (!enter(L))
        return SC_CLOSED;
    uint64_t w[5];
    int rc = ring_window(L, w);
    out[0] = out[1] = 0;
    if (rc == SC_OK && w[1] > w[0]) {
        uint64_t first = LOAD(slot_at(L, w[0])->data_pos), head = LOAD(h->arena_head);
        out[0] = w[1] - w[0];
        out[1] = head > first ? head - first : 0;
        if (out[1] > L->arena_bytes)
            out[1] = L->arena_bytes;
    }
    leave(L);
    return rc;
}
