/* shmcache native layer: declarations.
 *
 * This file is read twice: by cffi as the cdef of the extension module (so it
 * holds plain declarations only: no preprocessor lines, no inline code), and by
 * the C compiler through shmcache.c.  docs/design.md explains every field.
 *
 * All multi-byte fields are little-endian host order (the segment is
 * node-local).  Positions called "index" or "pos" are logical: 64-bit,
 * monotonically increasing, never wrapping; the physical place is the logical
 * value modulo the table or arena size.
 */

/* event types, as stored in ring slots */
#define SC_ADDED 1
#define SC_MODIFIED 2
#define SC_DELETED 3

/* return codes of the functions below (sc_apply returns an event type, or minus one of these) */
#define SC_OK 0
#define SC_NOTFOUND 1   /* no such key */
#define SC_RETRY 2      /* a writer moved the data while it was read; read again */
#define SC_NOSPACE 3    /* the output buffer is too small; the needed size is reported */
#define SC_CORRUPT 4    /* the segment holds values no correct writer produces */
#define SC_NOMEM 5      /* the writer could not allocate scratch memory */
#define SC_CLOSED 9     /* the mapping is being detached (Reader.close), or the owner closed the cache */

#define SC_MAX_KEY_BYTES 1024

/* results of sc_wait_past and sc_wait_change */
#define SC_WAIT_PASSED 0    /* something to look at: events, a moved window, a replace */
#define SC_WAIT_CLOSED 1
#define SC_WAIT_TIMEOUT 2
#define SC_WAIT_INTERRUPTED 3
#define SC_RECORD_HEADER_BYTES 24
#define SC_SCAN_ITEM_HEADER_BYTES 16

/* what the lock holder is doing (header.op_state) */
#define SC_OP_IDLE 0
#define SC_OP_MUTATING 1
#define SC_OP_REPLACING 2   /* staging a replace: the next holder abandons it */
#define SC_OP_BROKEN 3      /* a repair failed: the next holder tries again */
#define SC_OP_COMMITTING 4  /* a replace fully staged: the next holder commits it */

/* negative results of sc_put / sc_delete besides -SC_NOTFOUND and -SC_CORRUPT */
#define SC_FULL_KEYS 6      /* the store already holds max_keys keys */
#define SC_FULL_BYTES 7     /* the store's records would exceed store_bytes */
#define SC_BAD_RV 8         /* an explicit rv not greater than the current one */

/* flags of sc_apply */
#define SC_APPLY_RING 1       /* publish the event to the ring first */
#define SC_APPLY_STORE_RV 2   /* then advance store_rv to the event's rv */

/* ---- the segment header: the first 4096 bytes of the segment ------------ */

struct sc_header {
    /* identity and geometry: written once by the creator, before magic */
    uint64_t magic;             /* SC_MAGIC, store-released last at creation */
    uint32_t layout_version;
    uint32_t header_bytes;      /* sizeof(struct sc_header) */
    uint64_t total_bytes;       /* size of the whole segment */
    uint64_t epoch;             /* random, new for every created segment */
    uint64_t capacity;          /* ring slots */
    uint64_t arena_bytes;       /* ring payload arena */
    uint64_t max_keys;
    uint64_t store_bytes;       /* budget of live store record bytes */
    uint64_t index_slots;       /* per index table; a power of two */
    uint64_t heap_bytes;        /* store heap: 2 * store_bytes */
    uint64_t slots_offset;
    uint64_t arena_offset;
    uint64_t index_offset[2];
    uint64_t heap_offset;
    uint64_t hash_seed;
    /* creator: who may unlink; judged dead by pid + start time (_owner.py) */
    uint64_t creator_pid;
    uint64_t creator_start_ticks; /* start time, clock ticks since boot (clock-independent) */
    uint64_t creator_pidns;     /* inode of /proc/self/ns/pid */
    uint64_t creator_boot;      /* boot id tag (BOOT_BITS) */
    uint32_t closed;            /* 1: the owner closed this segment */
    uint32_t reserved0;
    uint64_t created_ms;
    uint64_t heartbeat_ms;      /* refreshed by a daemon; 0 when none */
    uint64_t pad0[9];

    /* ring publication (one cache line per group to keep readers' lines clean) */
    uint64_t end_index;         /* slots [start_index, end_index) are published */
    uint64_t rv;                /* newest published resource version */
    uint64_t start_index;       /* advanced before any slot/arena space is reused */
    uint64_t replace_index;     /* end_index at the last replace() */
    uint64_t replace_rv;        /* rv of the last replace(); 0 when none */
    uint64_t arena_head;        /* writer-only: logical arena position of the next payload */
    uint64_t events_written;
    uint64_t events_evicted;

    /* store */
    uint64_t store_rv;          /* every event with rv <= store_rv is applied to the store */
    uint64_t heap_head;         /* logical heap position of the next record */
    uint64_t heap_tail;         /* records before it may be overwritten */
    uint64_t active_index;      /* 0 or 1: which index table readers probe */
    uint64_t index_gen;         /* incremented after every switch of active_index */
    uint64_t live_keys;
    uint64_t live_bytes;        /* sum of the sizes of live records */
    uint64_t tombstones;        /* in the active table */

    /* writers' lock (_lock.py): the holder's identity in one 16-byte word,
     * claimed and given back by a single 16-byte CAS; all zero when free */
    uint64_t lock_token;        /* holder's pid | its PID namespace's inode << 32 */
    uint64_t lock_start;        /* holder's start ticks (40 bits) | boot tag << 40 */
    uint64_t lock_seq;          /* incremented at each acquisition and release */
    uint64_t op_state;          /* SC_OP_*: what the holder is doing, for recovery */
    uint64_t op_arg;            /* replace: the target rv */
    uint64_t lock_recoveries;   /* how often a dead holder's lock was recovered */
    uint64_t op_table;          /* replace: the table being staged (0 or 1) */
    uint64_t op_heap;           /* replace: heap_head before the first staged record */

    uint64_t pad1[8];

    /* futex word readers wait on; incremented after each publication */
    uint32_t notify_seq;
    uint32_t reserved1;
    uint64_t pad2[7];

    char socket_path[256];      /* the owning daemon's producer socket, NUL-terminated */
    uint64_t tail_pad[408];     /* to 4096 bytes */
};

/* ring slot: 32 bytes */
struct sc_slot {
    uint64_t rv;
    uint64_t data_pos;          /* logical arena position of key then value */
    uint32_t key_len;
    uint32_t value_len;
    uint32_t type;              /* 1 ADDED, 2 MODIFIED, 3 DELETED */
    uint32_t reserved;
};

/* store index entry: 16 bytes; ptr 0 empty, SC_TOMBSTONE deleted, else heap pos + 1 */
struct sc_index_entry {
    uint64_t ptr;
    uint64_t hash;
};

/* store record header in the heap: 24 bytes, then key, value, padding to 8 */
struct sc_record {
    uint64_t rv;
    uint32_t key_len;
    uint32_t value_len;
    uint64_t hash;
};

/* event metadata produced by sc_ring_copy: 24 bytes */
struct sc_event_meta {
    uint64_t rv;
    uint32_t type;
    uint32_t key_len;
    uint32_t value_len;
    uint32_t reserved;
};

/* One Writer's side of the writers' lock, in its own (process-local)
 * memory.  Only sc_lock_acquire and sc_lock_release change it, each in one C
 * call, so no Python exception can land between taking the lock and knowing
 * that it is held. */
struct sc_lock_state {
    uint64_t word[2];           /* this writer's lock word: its identity */
    uint64_t rv_at_claim;       /* the header's rv when the lock was taken */
    uint32_t held;              /* 1 while this writer holds the lock */
    uint32_t repair_pending;    /* claimed with op_state not idle, not repaired yet */
    uint32_t must_notify;       /* wake the watchers at release (a repair happened) */
    uint32_t reserved;
    void *sem;                  /* the writers' semaphore (sc_sem_map) */
};

/* one change of a batch for sc_put_many: key_len key bytes, then (unless
 * is_delete) value_len value bytes, follow each other in the batch blob */
struct sc_batch_op {
    uint32_t key_len;
    uint32_t value_len;
    uint32_t is_delete;
    uint32_t reserved;
};

/* what a process knows about one mapping; built and validated by layout.py */
struct sc_layout {
    uint8_t *base;
    uint64_t total_bytes;
    uint64_t capacity;
    uint64_t arena_bytes;
    uint64_t index_slots;
    uint64_t heap_bytes;
    uint64_t max_record;        /* largest store record accepted */
    uint64_t hash_seed;
    uint64_t slots_offset;
    uint64_t arena_offset;
    uint64_t index_offset[2];
    uint64_t heap_offset;
    /* process-local: the reader functions count the threads inside the
     * mapping, and refuse (SC_CLOSED) once closing is set; sc_detach waits
     * for the count to drop to zero before the mapping may go */
    uint32_t closing;
    uint32_t users;
};

/* ---- atomics on addresses inside the mapping ---------------------------- */
uint64_t sc_load_acquire(const uint64_t *addr);
void sc_store_release(uint64_t *addr, uint64_t value);
/* Only the tests call these two: they play a writer's part in a schedule
 * (publish by hand, count holders across processes) with the same atomics. */
uint64_t sc_fetch_add(uint64_t *addr, uint64_t delta);
void sc_fence_release(void);

/* ---- futex (shared, never FUTEX_PRIVATE) -------------------------------- */
/* Block until something a watcher at `position`, having served events up to
 * last_rv, must look at: end_index > position (new events), start_index >
 * position (the window moved past it), or a replace at or after it with
 * replace_rv > last_rv.  SC_WAIT_PASSED, SC_WAIT_CLOSED, SC_WAIT_TIMEOUT
 * after timeout_ns (< 0: none), SC_WAIT_INTERRUPTED on a signal. */
int sc_wait_past(struct sc_layout *L, uint64_t position, uint64_t last_rv, int64_t timeout_ns);
/* Block until notify_seq differs from seq (any publication): SC_WAIT_* */
int sc_wait_change(struct sc_layout *L, uint32_t seq, int64_t timeout_ns);
void sc_notify(struct sc_layout *L);

/* ---- writer side (the caller holds the writers' lock) -------------------- */
int64_t sc_store_lookup(struct sc_layout *L, const uint8_t *key, uint32_t key_len);
uint64_t sc_record_size(uint32_t key_len, uint32_t value_len);
int sc_apply(struct sc_layout *L, uint32_t type, const uint8_t *key, uint32_t key_len,
             const uint8_t *value, uint32_t value_len, uint64_t rv, int flags);
int64_t sc_put(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
               const uint8_t *value, uint32_t value_len, uint64_t rv, uint64_t max_keys,
               uint64_t store_bytes);
int64_t sc_delete(struct sc_layout *L, const uint8_t *key, uint32_t key_len, uint64_t rv);
int64_t sc_put_many(struct sc_layout *L, const uint8_t *blob, uint64_t blob_len,
                    const struct sc_batch_op *ops, uint32_t count, uint64_t first_rv);
int64_t sc_bookmark(struct sc_layout *L, uint64_t rv);
int sc_batch_check(struct sc_layout *L, const uint8_t *blob, uint64_t blob_len,
                   const struct sc_batch_op *ops, uint32_t count, uint64_t max_keys,
                   uint64_t store_bytes, uint32_t *out_index);

/* ---- the writers' lock: semaphore + 16-byte lock word (_lock.py) ---------- */
/* results of sc_lock_acquire */
#define SC_LOCK_ACQUIRED 0      /* held; op_state was idle and is now SC_OP_MUTATING */
#define SC_LOCK_REPAIR 1        /* held; op_state was not idle: repair first */
#define SC_LOCK_TIMEOUT 2       /* the semaphore did not come within the timeout */
#define SC_LOCK_INTERRUPTED 3   /* a signal: the caller runs its handler, then waits again */
#define SC_LOCK_VOID 4          /* passed the semaphore, but the word is held: a surplus count absorbed */
#define SC_LOCK_ERROR 5         /* sem_wait failed otherwise (errno) */

/* The writers' semaphore lives in a file of /dev/shm in the layout glibc's
 * sem_open uses (the file's whole content is one process-shared sem_t), but
 * shmcache opens that file itself (O_NOFOLLOW, owner checked on the
 * descriptor: _entries.py), so the semaphore it waits on is the file it
 * checked.  sc_sem_bytes: the file's size.  sc_sem_map: map it from fd
 * (NULL and errno on failure); sc_sem_init: make a new file's semaphore
 * (process-shared, count 1; 0 or errno); sc_sem_close: unmap. */
size_t sc_sem_bytes(void);
void *sc_sem_map(int fd);
int sc_sem_init(void *sem);
void sc_sem_close(void *sem);
/* Only the tests call this: the surplus count a racing recovery can leave. */
int sc_sem_post(void *sem);
/* Wait for the semaphore, then claim the lock word with one 16-byte CAS from
 * zero to S->word; on success set S->held in the same call. */
int sc_lock_acquire(struct sc_layout *L, struct sc_lock_state *S, int64_t timeout_ns);
/* Mark the holder's repair done: op_state MUTATING, nothing pending. */
void sc_lock_repaired(struct sc_layout *L, struct sc_lock_state *S);
/* Release if held: wake the watchers if rv moved or a repair happened, mark
 * op_state idle (BROKEN if a repair was pending), give the word back, post.
 * 1 released; 0 not held; -1 the word was not ours any more (a recoverer
 * took it back and posted for us: not posted again). */
int sc_lock_release(struct sc_layout *L, struct sc_lock_state *S);
/* out[0..1] the lock word (one atomic 16-byte read), out[2] lock_seq */
void sc_lock_word(struct sc_layout *L, uint64_t *out);
/* A dead holder's word back to zero (one 16-byte CAS): 1 if this caller
 * won, and then it posted the semaphore, counted the recovery and woke the
 * watchers; 0 if the word had changed. */
int sc_lock_take_back(struct sc_layout *L, void *sem, uint64_t word0, uint64_t word1);
/* No word, semaphore held for a whole timeout twice with lock_seq unchanged:
 * the single caller that wins the CAS of lock_seq posts (1), else 0. */
int sc_lock_abandon(struct sc_layout *L, void *sem, uint64_t seq);
/* test hook: with fd >= 0, the next sc_lock_acquire reads one byte from fd
 * between passing the semaphore and its CAS (a claimer suspended there) */
void sc_test_set_claim_pause_fd(int fd);

int sc_stage_begin(struct sc_layout *L, uint64_t rv);
int sc_stage_put(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                 const uint8_t *value, uint32_t value_len, uint64_t rv);
void sc_stage_abandon(struct sc_layout *L);
/* replace, commit step 1: expire the ring's window at rv (then a release fence) */
void sc_expire_window(struct sc_layout *L, uint64_t rv);
int sc_stage_switch(struct sc_layout *L);
int sc_recount(struct sc_layout *L);
int sc_replay(struct sc_layout *L);

/* ---- reader side (lock-free; every value read from the segment is checked;
 * each returns SC_CLOSED, touching nothing, once sc_detach began or the
 * owner closed the cache) --------------------------------------------------- */
/* out[0..4]: start_index, end_index, oldest rv, replace_index, replace_rv */
int sc_ring_window(struct sc_layout *L, uint64_t *out);
int sc_ring_find(struct sc_layout *L, uint64_t start, uint64_t end, uint64_t since_rv,
                 uint64_t *out_index, uint64_t *out_start);
/* out[0]: the index after the last slot examined; out[1]: events copied;
 * out[2]: payload bytes used (for SC_NOSPACE: what the first event needs);
 * out[3]: start_index re-read after the copy (valid iff <= from) */
int sc_ring_copy(struct sc_layout *L, uint64_t from, uint64_t end, uint32_t max_events,
                 const uint8_t *prefix, uint32_t prefix_len,
                 struct sc_event_meta *meta, uint8_t *data, uint64_t data_cap, uint64_t *out);
/* out_seen[0]: store_rv before the lookup; out_seen[1]: rv of the newest
 * published event after it (0 if the window is empty).  When [1] > [0] the
 * ring holds events the store may not show yet (a writer mid-change, or a
 * writer that died before applying its last event). */
int sc_store_get(struct sc_layout *L, const uint8_t *key, uint32_t key_len,
                 uint8_t *out, uint64_t out_cap, uint64_t *out_value_len, uint64_t *out_rv,
                 uint64_t *out_seen);
int sc_store_scan(struct sc_layout *L, uint64_t gen, uint64_t *cursor,
                  const uint8_t *prefix, uint32_t prefix_len,
                  uint8_t *out, uint64_t out_cap, uint64_t *out_used, uint32_t *out_count);
/* test hook: with fd >= 0, the next sc_store_scan reads one byte from fd
 * after its first live entry (a reader stopped in the middle of a scan) */
void sc_test_set_scan_pause_fd(int fd);
/* load-acquire of the 8 bytes at `offset` of the header (8-aligned) */
int sc_header_load(struct sc_layout *L, uint32_t offset, uint64_t *out);
/* a copy of the whole header (for diagnostics: status) */
int sc_header_copy(struct sc_layout *L, struct sc_header *out);
/* the newest published rv: the header's, or the newest slot's if a writer
 * published it and has not stored the header's rv yet */
int sc_newest_rv(struct sc_layout *L, uint64_t *out);
/* out[0]: events in the window, out[1]: payload bytes they hold */
int sc_ring_usage(struct sc_layout *L, uint64_t *out);
/* Stop the reader functions on this mapping (they return SC_CLOSED), wake
 * every thread of this process waiting on it, and return once none is
 * inside any more: only then may the mapping go. */
void sc_detach(struct sc_layout *L);
