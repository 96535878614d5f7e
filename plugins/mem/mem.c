/*
 * kvhost storage plugin `mem`: a bounded in-memory KV-chunk store.
 *
 * - Stores a private copy of every chunk and its kvh_chunk_meta in a chained hash table keyed by the
 *   key's canonical string (key_hash picks the bucket; canonical bytes decide equality).
 * - Capacity is counted in chunk-data bytes. When a put does not fit, the oldest entries (insertion
 *   order, FIFO) are evicted; pinned entries are never evicted. If pins make room impossible, or the
 *   chunk is larger than the capacity, that item fails with KVH_ERR_NO_SPACE and nothing is evicted.
 * - Chunk data lives in buffers that are recycled through a pool instead of being returned to the
 *   operating system (see "Chunk-data buffers" below): fresh memory costs a kernel page fault and
 *   zeroing per page, which for large chunks is far slower than the copy. Pooled buffers and stored
 *   data together stay within the capacity; the pool gives way before any chunk is evicted.
 * - put, get and prefetch are asynchronous: they are queued for one worker thread and return
 *   KVH_PENDING; the worker writes the per-item results, releases its locks, then fires the completion.
 *   contains, remove, pin, unpin, flush and health are synchronous.
 *
 * Locks: `queue_lock` guards the operation queue, `store_lock` guards the table. No code path holds
 * both, and no lock is held while calling a completion callback.
 *
 * Build: cc -std=c11 -shared -fPIC -O2 -g -Wall -Wextra -Werror -pedantic -fvisibility=hidden -pthread \
 *            -I<dir of kvhost_plugin.h> mem.c -o libkvhost_mem.so
 */

#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime, sysconf */
#define _DEFAULT_SOURCE         /* MAP_ANONYMOUS, MAP_POPULATE, madvise */

#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_TARGET "mem"

/* Upper bounds of the numeric options, so a typo cannot hang the worker or exhaust memory at create. */
#define MEM_MAX_DELAY_US 60000000u    /* 60 s per item */
#define MEM_MAX_QUEUE_LIMIT 1048576u  /* the queue is preallocated: max_queue slots of 32 bytes */
#define MEM_INITIAL_BUCKETS 64u       /* power of two; the table doubles when it gets fuller than 1 entry/bucket */

/* ------------------------------------------------------------------------------------------------ */
/* Chunk-data buffers and the buffer pool                                                           */
/* ------------------------------------------------------------------------------------------------ */

/* Chunk data lives in buffers that are recycled rather than returned to the operating system: a fresh
 * large allocation has to be faulted in and zeroed page by page by the kernel, which is several times
 * slower than the copy that fills it. When a chunk leaves the store (evicted, removed, replaced,
 * cleared), its buffer goes to the pool, and a later put takes a pooled buffer of a suitable size.
 *
 * Sizes: a new buffer's capacity is the chunk length rounded up to 64 bytes (below 64 KiB) or to
 * 4 KiB (from 64 KiB up), so rounding wastes less than 1/16. A put takes the smallest pooled buffer
 * with capacity >= its length and <= length + length/4 (best fit within 25 %), else allocates a new
 * one.
 *
 * Allocation: buffers of MEM_MMAP_MIN bytes or more are mapped with mmap. By default the mapping is
 * populated at once (MAP_POPULATE: the kernel zeroes the pages in one pass, cheaper than a page fault
 * per 4 KiB during the copy). With the option huge_pages it is instead aligned to 2 MiB and marked
 * MADV_HUGEPAGE, so it is faulted in 2 MiB at a time where the kernel allows it. Smaller buffers come
 * from malloc.
 *
 * Bound: the pool only keeps a buffer while used_bytes + pending_bytes + pool_bytes stays within
 * capacity_bytes; beyond that, buffers are freed (pooled ones first, before any chunk is evicted). */

#define MEM_SMALL_GRANULE ((size_t)64)    /* capacity granule below MEM_LARGE_MIN */
#define MEM_LARGE_GRANULE ((size_t)4096)  /* capacity granule from MEM_LARGE_MIN up */
#define MEM_LARGE_MIN ((size_t)64 << 10)
#define MEM_MMAP_MIN ((size_t)2 << 20)    /* from here on, buffers are mmapped */
#define MEM_HUGE_ALIGN ((size_t)2 << 20)  /* alignment of mmapped buffers with huge_pages */
#define MEM_TOUCH_STRIDE 4096u            /* prefault writes one byte per this many */
#define MEM_POOL_BINS 496u                /* see pool_bin: 8 bins per power of two, up to 2^64 */

/* A chunk-data buffer. The header is a small malloc block; the data is a separate allocation. */
struct mem_buf {
    struct mem_buf *next; /* pool bin list, or a list of buffers to free */
    uint8_t *data;        /* cap bytes */
    size_t cap;
    size_t map_len; /* bytes mmapped at data (munmap on free), or 0 when data came from malloc */
};

/* The capacity a new buffer gets for `len` (> 0) bytes, or 0 when that would overflow. */
static size_t buf_class(size_t len) {
    size_t granule = len < MEM_LARGE_MIN ? MEM_SMALL_GRANULE : MEM_LARGE_GRANULE;
    if (len > SIZE_MAX - (granule - 1)) {
        return 0;
    }
    return (len + granule - 1) / granule * granule;
}

/* Maps at least `cap` bytes for a buffer (see the comment above); `*map_len` receives the length
 * mapped, a multiple of the page size. Returns NULL when out of memory. */
static void *buf_map(size_t cap, int huge_pages, size_t *map_len) {
    long page = sysconf(_SC_PAGESIZE);
    size_t page_size = page > 0 ? (size_t)page : 4096;
    if (cap > SIZE_MAX - MEM_HUGE_ALIGN - page_size) {
        return NULL;
    }
    cap = (cap + page_size - 1) / page_size * page_size;
    *map_len = cap;
    if (!huge_pages) {
        int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MAP_POPULATE
        flags |= MAP_POPULATE;
#endif
        void *map = mmap(NULL, cap, PROT_READ | PROT_WRITE, flags, -1, 0);
        return map == MAP_FAILED ? NULL : map;
    }
    /* Map 2 MiB extra and trim, so the buffer starts on a 2 MiB boundary and every whole 2 MiB of it
     * can be a huge page. */
    size_t reserve = cap + MEM_HUGE_ALIGN;
    void *map = mmap(NULL, reserve, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        return NULL;
    }
    uintptr_t start = (uintptr_t)map;
    uintptr_t aligned = (start + (MEM_HUGE_ALIGN - 1)) & ~(uintptr_t)(MEM_HUGE_ALIGN - 1);
    size_t head = (size_t)(aligned - start);
    size_t tail = reserve - head - cap;
    if (head > 0) {
        munmap(map, head);
    }
    if (tail > 0) {
        munmap((void *)(aligned + cap), tail);
    }
#ifdef MADV_HUGEPAGE
    (void)madvise((void *)aligned, cap, MADV_HUGEPAGE); /* advice only: without THP it is 4 KiB pages */
#endif
    return (void *)aligned;
}

/* Allocates a buffer of buf_class(len) bytes. Called without any lock. Returns NULL when out of memory. */
static struct mem_buf *buf_alloc(size_t len, int huge_pages) {
    size_t cap = buf_class(len);
    if (cap == 0) {
        return NULL;
    }
    struct mem_buf *buf = malloc(sizeof *buf);
    if (buf == NULL) {
        return NULL;
    }
    buf->next = NULL;
    buf->cap = cap;
    buf->map_len = 0;
    if (cap < MEM_MMAP_MIN) {
        buf->data = malloc(cap);
    } else {
        buf->data = buf_map(cap, huge_pages, &buf->map_len);
    }
    if (buf->data == NULL) {
        free(buf);
        return NULL;
    }
    return buf;
}

static void buf_free(struct mem_buf *buf) {
    if (buf == NULL) {
        return;
    }
    if (buf->map_len > 0) {
        munmap(buf->data, buf->map_len);
    } else {
        free(buf->data);
    }
    free(buf);
}

static void buf_free_list(struct mem_buf *list) {
    while (list != NULL) {
        struct mem_buf *next = list->next;
        buf_free(list);
        list = next;
    }
}

/* Pool bin of a capacity: 8 bins per power of two (by the 3 bits after the leading one), so bins are
 * ordered by size and every capacity in bin i is smaller than every capacity in bin i + 1. */
static size_t pool_bin(size_t cap) {
    if (cap < 8) {
        return cap;
    }
    unsigned top = 0;
    for (size_t v = cap; v > 1; v >>= 1) {
        top++;
    }
    return (size_t)(top - 2) * 8 + ((cap >> (top - 3)) & 7);
}

/* a + b, saturating at UINT64_MAX. */
static uint64_t sat_add(uint64_t a, uint64_t b) {
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* ------------------------------------------------------------------------------------------------ */
/* The store: hash table + FIFO list + buffer pool                                                  */
/* ------------------------------------------------------------------------------------------------ */

/* One stored chunk: the header, then the canonical key (NUL-terminated, for logging), in one block.
 * The data is in `buf` (NULL for an empty chunk). */
struct mem_entry {
    struct mem_entry *bucket_next; /* hash chain; also links a list of entries waiting to be freed */
    struct mem_entry *older;       /* FIFO neighbours (insertion order) */
    struct mem_entry *newer;
    struct mem_buf *buf;
    uint64_t key_hash;
    size_t canonical_len;
    size_t data_len;
    uint32_t pin_count;
    kvh_chunk_meta meta;
    char canonical[]; /* canonical_len bytes + NUL */
};

struct mem_store {
    struct mem_entry **buckets; /* bucket_count chains; bucket_count is a power of two */
    size_t bucket_count;
    size_t entry_count;
    struct mem_entry *oldest; /* FIFO: eviction starts here */
    struct mem_entry *newest;
    uint64_t capacity_bytes;
    uint64_t used_bytes;    /* sum of data_len over all entries; never exceeds capacity_bytes */
    uint64_t pinned_bytes;  /* sum of data_len over entries with pin_count > 0 */
    uint64_t pending_bytes; /* data bytes of puts that have made room and are copying (not yet linked) */
    uint64_t evictions;
    int huge_pages; /* immutable: how new buffers are mapped (buf_map) */

    struct mem_buf *pool[MEM_POOL_BINS]; /* idle buffers, LIFO per bin (see pool_bin) */
    size_t pool_count;
    uint64_t pool_bytes;   /* sum of cap over pooled buffers */
    uint64_t held_bytes;   /* sum of cap over all buffers but new ones of puts still copying */
    uint64_t pool_reused;  /* puts that took a pooled buffer */
    uint64_t pool_misses;  /* puts that allocated a new buffer */
    uint64_t pool_dropped; /* buffers freed because the pool had no room for them */
};

static int store_init(struct mem_store *store, uint64_t capacity_bytes, int huge_pages) {
    memset(store, 0, sizeof *store);
    store->buckets = calloc(MEM_INITIAL_BUCKETS, sizeof *store->buckets);
    if (store->buckets == NULL) {
        return -1;
    }
    store->bucket_count = MEM_INITIAL_BUCKETS;
    store->capacity_bytes = capacity_bytes;
    store->huge_pages = huge_pages;
    return 0;
}

/* Frees a list of entries linked by bucket_next, with any buffer they still own. */
static void free_entry_list(struct mem_entry *list) {
    while (list != NULL) {
        struct mem_entry *next = list->bucket_next;
        buf_free(list->buf);
        free(list);
        list = next;
    }
}

static void store_free(struct mem_store *store) {
    struct mem_entry *entry = store->oldest;
    while (entry != NULL) {
        struct mem_entry *newer = entry->newer;
        buf_free(entry->buf);
        free(entry);
        entry = newer;
    }
    for (size_t bin = 0; bin < MEM_POOL_BINS; bin++) {
        buf_free_list(store->pool[bin]);
    }
    free(store->buckets);
    memset(store, 0, sizeof *store);
}

/* Whether the pool may keep `cap` more bytes: stored data, data being copied in, and pooled buffers
 * together stay within the capacity. */
static int pool_has_room(const struct mem_store *store, uint64_t cap) {
    uint64_t committed = sat_add(sat_add(store->used_bytes, store->pending_bytes), store->pool_bytes);
    return committed <= store->capacity_bytes && cap <= store->capacity_bytes - committed;
}

/* Puts a buffer in the pool unconditionally; the caller restores the bound with pool_trim. */
static void pool_push(struct mem_store *store, struct mem_buf *buf) {
    size_t bin = pool_bin(buf->cap);
    buf->next = store->pool[bin];
    store->pool[bin] = buf;
    store->pool_count++;
    store->pool_bytes += buf->cap;
}

/* Gives back a buffer that no entry uses any more: into the pool when it has room, else onto
 * `*dropped` for the caller to free once the lock is released. */
static void pool_give(struct mem_store *store, struct mem_buf *buf, struct mem_buf **dropped) {
    if (buf == NULL) {
        return;
    }
    if (pool_has_room(store, buf->cap)) {
        pool_push(store, buf);
    } else {
        buf->next = *dropped;
        *dropped = buf;
        store->held_bytes -= buf->cap;
        store->pool_dropped++;
    }
}

/* Takes the smallest pooled buffer with len <= cap <= len + len/4, or returns NULL. */
static struct mem_buf *pool_take(struct mem_store *store, size_t len) {
    size_t limit = len + len / 4;
    if (limit < len) {
        limit = SIZE_MAX;
    }
    size_t last_bin = pool_bin(limit);
    for (size_t bin = pool_bin(len); bin <= last_bin && bin < MEM_POOL_BINS; bin++) {
        struct mem_buf **best = NULL;
        for (struct mem_buf **link = &store->pool[bin]; *link != NULL; link = &(*link)->next) {
            size_t cap = (*link)->cap;
            if (cap >= len && cap <= limit && (best == NULL || cap < (*best)->cap)) {
                best = link;
                if (cap == buf_class(len)) {
                    break; /* nothing smaller can fit */
                }
            }
        }
        if (best != NULL) { /* later bins only hold larger buffers */
            struct mem_buf *buf = *best;
            *best = buf->next;
            buf->next = NULL;
            store->pool_count--;
            store->pool_bytes -= buf->cap;
            return buf;
        }
    }
    return NULL;
}

/* Frees pooled buffers, largest first, until the pool fits in what the capacity leaves free. */
static void pool_trim(struct mem_store *store, struct mem_buf **dropped) {
    size_t bin = MEM_POOL_BINS;
    while (store->pool_count > 0 && !pool_has_room(store, 0) && bin > 0) {
        if (store->pool[bin - 1] == NULL) {
            bin--;
            continue;
        }
        struct mem_buf *buf = store->pool[bin - 1];
        store->pool[bin - 1] = buf->next;
        store->pool_count--;
        store->pool_bytes -= buf->cap;
        store->held_bytes -= buf->cap;
        store->pool_dropped++;
        buf->next = *dropped;
        *dropped = buf;
    }
}

static size_t bucket_of(const struct mem_store *store, uint64_t key_hash) {
    return (size_t)(key_hash & (uint64_t)(store->bucket_count - 1));
}

static struct mem_entry *store_find(const struct mem_store *store, const kvh_key *key) {
    struct mem_entry *entry = store->buckets[bucket_of(store, key->key_hash)];
    for (; entry != NULL; entry = entry->bucket_next) {
        if (entry->key_hash == key->key_hash && entry->canonical_len == key->canonical.len &&
            memcmp(entry->canonical, key->canonical.ptr, key->canonical.len) == 0) {
            return entry;
        }
    }
    return NULL;
}

/* Doubles the bucket array. On allocation failure the table keeps working with longer chains. */
static void store_grow(struct mem_store *store) {
    if (store->bucket_count > SIZE_MAX / 2 / sizeof *store->buckets) {
        return;
    }
    size_t new_count = store->bucket_count * 2;
    struct mem_entry **new_buckets = calloc(new_count, sizeof *new_buckets);
    if (new_buckets == NULL) {
        return;
    }
    for (size_t i = 0; i < store->bucket_count; i++) {
        struct mem_entry *entry = store->buckets[i];
        while (entry != NULL) {
            struct mem_entry *next = entry->bucket_next;
            size_t bucket = (size_t)(entry->key_hash & (uint64_t)(new_count - 1));
            entry->bucket_next = new_buckets[bucket];
            new_buckets[bucket] = entry;
            entry = next;
        }
    }
    free(store->buckets);
    store->buckets = new_buckets;
    store->bucket_count = new_count;
}

/* Adds an entry as the newest. The caller has made room for it. */
static void store_link(struct mem_store *store, struct mem_entry *entry) {
    size_t bucket = bucket_of(store, entry->key_hash);
    entry->bucket_next = store->buckets[bucket];
    store->buckets[bucket] = entry;
    entry->older = store->newest;
    entry->newer = NULL;
    if (store->newest != NULL) {
        store->newest->newer = entry;
    } else {
        store->oldest = entry;
    }
    store->newest = entry;
    store->entry_count++;
    store->used_bytes += entry->data_len;
    if (entry->pin_count > 0) {
        store->pinned_bytes += entry->data_len;
    }
    if (store->entry_count > store->bucket_count) {
        store_grow(store);
    }
}

/* Takes an entry out of the table and the FIFO list, without freeing it. */
static void store_unlink(struct mem_store *store, struct mem_entry *entry) {
    struct mem_entry **link = &store->buckets[bucket_of(store, entry->key_hash)];
    while (*link != entry) {
        link = &(*link)->bucket_next;
    }
    *link = entry->bucket_next;
    entry->bucket_next = NULL;
    if (entry->older != NULL) {
        entry->older->newer = entry->newer;
    } else {
        store->oldest = entry->newer;
    }
    if (entry->newer != NULL) {
        entry->newer->older = entry->older;
    } else {
        store->newest = entry->older;
    }
    entry->older = NULL;
    entry->newer = NULL;
    store->entry_count--;
    store->used_bytes -= entry->data_len;
    if (entry->pin_count > 0) {
        store->pinned_bytes -= entry->data_len;
    }
}

/* Disposes of an entry that has been unlinked: its buffer goes to the pool (or onto `*dropped`), the
 * header onto `*graveyard`. Both lists are freed by the caller once the lock is released. */
static void store_discard(struct mem_store *store, struct mem_entry *entry, struct mem_entry **graveyard,
                          struct mem_buf **dropped) {
    pool_give(store, entry->buf, dropped);
    entry->buf = NULL;
    entry->bucket_next = *graveyard;
    *graveyard = entry;
}

/* Evicts the oldest unpinned entries until `needed` bytes fit, counting `replaced` (the entry a put
 * is about to replace, or NULL) as already gone and never evicting it. Room taken by puts in progress
 * (pending_bytes) counts as used. Evicted entries go on `*graveyard`; their buffers go to the pool
 * unconditionally, so the put can take one of them whatever their rounding: the caller then calls
 * pool_trim. Returns 0, or -1 without evicting anything when pinned entries leave too little room. */
static int store_make_room(struct mem_store *store, uint64_t needed, const struct mem_entry *replaced,
                           struct mem_entry **graveyard, size_t *evicted) {
    uint64_t replaced_bytes = replaced != NULL ? replaced->data_len : 0;
    uint64_t pinned_others = store->pinned_bytes - (replaced != NULL && replaced->pin_count > 0 ? replaced_bytes : 0);
    /* Check first, so a put that cannot succeed does not evict anything. */
    if (store->pending_bytes > store->capacity_bytes - pinned_others ||
        needed > store->capacity_bytes - pinned_others - store->pending_bytes) {
        return -1;
    }
    /* needed <= capacity here, so `limit` does not wrap; comparing with it cannot underflow. */
    uint64_t limit = store->capacity_bytes - needed;
    uint64_t used_others = store->used_bytes - replaced_bytes + store->pending_bytes;
    struct mem_entry *candidate = store->oldest;
    while (used_others > limit && candidate != NULL) {
        struct mem_entry *next = candidate->newer;
        if (candidate != replaced && candidate->pin_count == 0) {
            used_others -= candidate->data_len;
            store_unlink(store, candidate);
            if (candidate->buf != NULL) {
                pool_push(store, candidate->buf);
                candidate->buf = NULL;
            }
            candidate->bucket_next = *graveyard;
            *graveyard = candidate;
            store->evictions++;
            (*evicted)++;
        }
        candidate = next;
    }
    /* Unreachable while the byte counters are right; checked so a bug cannot break the capacity bound. */
    return used_others <= limit ? 0 : -1;
}

/* Inserts a new entry, replacing any entry with the same key (which keeps its pins: each pin still
 * needs its unpin). Returns KVH_OK, or KVH_ERR_NO_SPACE (`entry` is not taken). Evicted entries are
 * handled as in store_make_room, the replaced one by store_discard; the caller then calls pool_trim. */
static kvh_status store_insert(struct mem_store *store, struct mem_entry *entry, struct mem_entry **graveyard,
                               struct mem_buf **dropped, size_t *evicted) {
    kvh_key lookup = { 0 };
    lookup.canonical = (kvh_str){ entry->canonical, entry->canonical_len };
    lookup.key_hash = entry->key_hash;
    struct mem_entry *existing = store_find(store, &lookup);
    if (store_make_room(store, entry->data_len, existing, graveyard, evicted) != 0) {
        return KVH_ERR_NO_SPACE;
    }
    if (existing != NULL) {
        entry->pin_count = existing->pin_count;
        store_unlink(store, existing);
        store_link(store, entry);
        store_discard(store, existing, graveyard, dropped); /* after linking: the pool sees the new used_bytes */
    } else {
        store_link(store, entry);
    }
    return KVH_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* Backend                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

enum mem_op_kind { MEM_OP_PUT, MEM_OP_GET, MEM_OP_PREFETCH };

/* A queued asynchronous operation. The batch is host memory, valid until the completion returns. */
struct mem_op {
    enum mem_op_kind kind;
    union {
        const kvh_put_batch *put;
        const kvh_get_batch *get;
        const kvh_key_batch *prefetch;
    } batch;
    kvh_completion done;
};

struct kvh_backend {
    /* Valid until process exit (ABI guarantee), so it is safe to keep. */
    const kvh_host_api *host;
    uint64_t delay_us;

    pthread_mutex_t store_lock;
    struct mem_store store; /* guarded by store_lock; store.capacity_bytes is immutable */

    pthread_mutex_t queue_lock;
    pthread_cond_t work_ready; /* signalled when an op is queued or stopping is set */
    pthread_cond_t progress;   /* broadcast each time an op has completed */
    struct mem_op *ring;       /* preallocated queue of ring_capacity (= max_queue) slots */
    size_t ring_capacity;
    size_t ring_head;
    size_t ring_count;
    uint64_t submitted; /* ops ever queued; op number n completes when completed reaches n */
    uint64_t completed; /* ops whose completion callback has returned */
    int stopping;       /* set by destroy: refuse new ops, drain the queue, exit */
    pthread_t worker;
};

/* Sleeps to simulate a slow medium. Called without any lock held. */
static void simulate_delay(uint64_t delay_us) {
    if (delay_us == 0) {
        return;
    }
    struct timespec remaining = {
        .tv_sec = (time_t)(delay_us / 1000000u),
        .tv_nsec = (long)(delay_us % 1000000u) * 1000L,
    };
    while (nanosleep(&remaining, &remaining) != 0 && errno == EINTR) {
    }
}

/* The ABI allows `canonical.ptr` to be NULL only for an empty string, and an empty key is no key. */
static int key_is_valid(const kvh_key *key) {
    return key->canonical.ptr != NULL && key->canonical.len > 0;
}

/* A new, unlinked entry for `key` with no data yet. Returns NULL when out of memory. */
static struct mem_entry *entry_new(const kvh_key *key, const kvh_chunk_meta *meta, size_t data_len) {
    size_t header = sizeof(struct mem_entry);
    if (key->canonical.len > SIZE_MAX - header - 1) {
        return NULL;
    }
    struct mem_entry *entry = malloc(header + key->canonical.len + 1);
    if (entry == NULL) {
        return NULL;
    }
    memset(entry, 0, header);
    entry->key_hash = key->key_hash;
    entry->canonical_len = key->canonical.len;
    entry->data_len = data_len;
    entry->meta = *meta;
    memcpy(entry->canonical, key->canonical.ptr, key->canonical.len);
    entry->canonical[key->canonical.len] = '\0';
    return entry;
}

/* Stores one chunk, in three steps: under the store lock, make room (evicting FIFO) and take a pooled
 * buffer; without the lock, copy the chunk (into a new buffer if the pool had none); under the lock
 * again, link the entry. The bytes are reserved in pending_bytes in between, so the room made in the
 * first step stays free. `*evicted` receives the number of entries evicted to make room. */
static kvh_status put_one(kvh_backend *backend, const kvh_key *key, const kvh_bytes *src, const kvh_chunk_meta *meta,
                          size_t *evicted) {
    *evicted = 0;
    if (!key_is_valid(key) || (src->ptr == NULL && src->len > 0)) {
        return KVH_ERR_INVALID_ARG;
    }
    /* The metadata is returned as-is by contains and get, so it must describe the bytes stored. */
    if (meta->length != (uint64_t)src->len) {
        return KVH_ERR_INVALID_ARG;
    }
    if ((uint64_t)src->len > backend->store.capacity_bytes) {
        return KVH_ERR_NO_SPACE;
    }
    size_t len = src->len;
    struct mem_entry *entry = entry_new(key, meta, len);
    if (entry == NULL) {
        return KVH_ERR_NO_SPACE; /* out of memory: the store cannot hold it */
    }
    struct mem_store *store = &backend->store;
    struct mem_entry *graveyard = NULL;
    struct mem_buf *dropped = NULL;
    struct mem_buf *buf = NULL;
    kvh_status status = KVH_OK;

    pthread_mutex_lock(&backend->store_lock);
    if (store_make_room(store, len, store_find(store, key), &graveyard, evicted) != 0) {
        status = KVH_ERR_NO_SPACE;
    } else if (len > 0) {
        store->pending_bytes += len;
        buf = pool_take(store, len); /* possibly the buffer of an entry just evicted */
        if (buf != NULL) {
            store->pool_reused++;
        } else {
            store->pool_misses++;
        }
    }
    pool_trim(store, &dropped); /* pooled buffers go before stored chunks do */
    pthread_mutex_unlock(&backend->store_lock);
    free_entry_list(graveyard); /* outside the lock: unmapping large buffers can be slow */
    buf_free_list(dropped);
    graveyard = NULL;
    dropped = NULL;
    if (status != KVH_OK) {
        free(entry);
        return status;
    }

    int fresh = 0;
    if (len > 0) {
        if (buf == NULL) {
            buf = buf_alloc(len, store->huge_pages);
            fresh = 1;
        }
        if (buf == NULL) {
            pthread_mutex_lock(&backend->store_lock);
            store->pending_bytes -= len;
            pthread_mutex_unlock(&backend->store_lock);
            free(entry);
            return KVH_ERR_NO_SPACE; /* out of memory */
        }
        /* Without the lock: copying a large chunk must not block readers. */
        memcpy(buf->data, src->ptr, len);
        entry->buf = buf;
    }

    pthread_mutex_lock(&backend->store_lock);
    store->pending_bytes -= len;
    if (fresh) {
        store->held_bytes += buf->cap;
    }
    /* Normally evicts nothing (the room was made above); it re-checks in case the store changed. */
    status = store_insert(store, entry, &graveyard, &dropped, evicted);
    if (status != KVH_OK) {
        pool_give(store, entry->buf, &dropped);
        entry->buf = NULL;
    }
    pool_trim(store, &dropped);
    pthread_mutex_unlock(&backend->store_lock);
    if (status != KVH_OK) {
        free(entry);
    }
    free_entry_list(graveyard);
    buf_free_list(dropped);
    return status;
}

static kvh_status get_one(kvh_backend *backend, const kvh_key *key, const kvh_mut_bytes *dst, uint64_t *out_len,
                          kvh_chunk_meta *out_meta) {
    *out_len = 0;
    memset(out_meta, 0, sizeof *out_meta);
    if (!key_is_valid(key) || (dst->ptr == NULL && dst->len > 0)) {
        return KVH_ERR_INVALID_ARG;
    }
    kvh_status status;
    pthread_mutex_lock(&backend->store_lock);
    struct mem_entry *entry = store_find(&backend->store, key);
    if (entry == NULL) {
        status = KVH_ERR_NOT_FOUND;
    } else if (dst->len < entry->data_len) {
        *out_len = entry->data_len;
        status = KVH_ERR_BUFFER_TOO_SMALL;
    } else {
        /* Copied under the lock: the entry may be replaced or evicted as soon as it is released. */
        if (entry->data_len > 0) {
            memcpy(dst->ptr, entry->buf->data, entry->data_len);
        }
        *out_len = entry->data_len;
        *out_meta = entry->meta;
        status = KVH_OK;
    }
    pthread_mutex_unlock(&backend->store_lock);
    return status;
}

static kvh_status prefetch_one(kvh_backend *backend, const kvh_key *key) {
    if (!key_is_valid(key)) {
        return KVH_ERR_INVALID_ARG;
    }
    pthread_mutex_lock(&backend->store_lock);
    /* Everything is already in memory: a stored key is as cheap to get as it will ever be. */
    kvh_status status = store_find(&backend->store, key) != NULL ? KVH_OK : KVH_ERR_NOT_FOUND;
    pthread_mutex_unlock(&backend->store_lock);
    return status;
}

/* Runs one queued op on the worker: writes every per-item result. Takes the store lock per item so
 * synchronous calls interleave with long batches, and sleeps the simulated delay outside it. */
static void run_op(kvh_backend *backend, const struct mem_op *op) {
    const kvh_host_api *host = backend->host;
    int trace = kvh_util_log_enabled(host, KVH_LOG_TRACE);
    size_t ok = 0;
    size_t len = 0;
    switch (op->kind) {
    case MEM_OP_PUT: {
        const kvh_put_batch *batch = op->batch.put;
        size_t evicted_total = 0;
        len = batch->len;
        for (size_t i = 0; i < len; i++) {
            simulate_delay(backend->delay_us);
            size_t evicted = 0;
            kvh_status status = put_one(backend, &batch->keys[i], &batch->src[i], &batch->meta[i], &evicted);
            batch->item_status[i] = status;
            ok += status == KVH_OK;
            evicted_total += evicted;
            if (trace) {
                kvh_util_log(host, MEM_TARGET, KVH_LOG_TRACE, "put key=%.*s size=%zu -> %s evicted=%zu",
                         kvh_util_str_precision(batch->keys[i].canonical), kvh_util_str_chars(batch->keys[i].canonical),
                         batch->src[i].len, kvh_util_status_name(status), evicted);
            }
        }
        kvh_util_log(host, MEM_TARGET, KVH_LOG_DEBUG, "put batch: %zu items, %zu stored, %zu evicted", len, ok, evicted_total);
        break;
    }
    case MEM_OP_GET: {
        const kvh_get_batch *batch = op->batch.get;
        len = batch->len;
        for (size_t i = 0; i < len; i++) {
            simulate_delay(backend->delay_us);
            kvh_status status = get_one(backend, &batch->keys[i], &batch->dst[i], &batch->out_len[i], &batch->out_meta[i]);
            batch->item_status[i] = status;
            ok += status == KVH_OK;
            if (trace) {
                kvh_util_log(host, MEM_TARGET, KVH_LOG_TRACE, "get key=%.*s size=%llu -> %s", kvh_util_str_precision(batch->keys[i].canonical),
                         kvh_util_str_chars(batch->keys[i].canonical), (unsigned long long)batch->out_len[i], kvh_util_status_name(status));
            }
        }
        kvh_util_log(host, MEM_TARGET, KVH_LOG_DEBUG, "get batch: %zu items, %zu hits", len, ok);
        break;
    }
    case MEM_OP_PREFETCH: {
        const kvh_key_batch *batch = op->batch.prefetch;
        len = batch->len;
        for (size_t i = 0; i < len; i++) {
            simulate_delay(backend->delay_us);
            kvh_status status = prefetch_one(backend, &batch->keys[i]);
            batch->item_status[i] = status;
            ok += status == KVH_OK;
            if (trace) {
                kvh_util_log(host, MEM_TARGET, KVH_LOG_TRACE, "prefetch key=%.*s -> %s", kvh_util_str_precision(batch->keys[i].canonical),
                         kvh_util_str_chars(batch->keys[i].canonical), kvh_util_status_name(status));
            }
        }
        kvh_util_log(host, MEM_TARGET, KVH_LOG_DEBUG, "prefetch batch: %zu items, %zu present", len, ok);
        break;
    }
    }
}

static void *worker_main(void *arg) {
    kvh_backend *backend = arg;
    pthread_mutex_lock(&backend->queue_lock);
    for (;;) {
        while (backend->ring_count == 0 && !backend->stopping) {
            pthread_cond_wait(&backend->work_ready, &backend->queue_lock);
        }
        if (backend->ring_count == 0) {
            break; /* stopping, and every queued op has been completed */
        }
        struct mem_op op = backend->ring[backend->ring_head];
        backend->ring_head = (backend->ring_head + 1) % backend->ring_capacity;
        backend->ring_count--;
        pthread_mutex_unlock(&backend->queue_lock);

        run_op(backend, &op);
        /* No plugin lock is held here (ABI rule), and the batch is not touched after this call. */
        op.done.complete(op.done.user_data, KVH_OK, KVH_STR_LIT(""));

        pthread_mutex_lock(&backend->queue_lock);
        backend->completed++;
        pthread_cond_broadcast(&backend->progress);
    }
    pthread_mutex_unlock(&backend->queue_lock);
    return NULL;
}

/* Queues an async op. Returns KVH_PENDING, or an error (and the completion will never fire). */
static kvh_status submit(kvh_backend *backend, const struct mem_op *op, const char *operation, size_t items) {
    pthread_mutex_lock(&backend->queue_lock);
    if (backend->stopping) {
        pthread_mutex_unlock(&backend->queue_lock);
        kvh_util_set_last_error(backend, "%s: backend is being destroyed", operation);
        return KVH_ERR_CANCELED;
    }
    if (backend->ring_count == backend->ring_capacity) {
        pthread_mutex_unlock(&backend->queue_lock);
        kvh_util_set_last_error(backend, "%s: queue full (max_queue=%zu operations)", operation, backend->ring_capacity);
        kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_DEBUG, "%s of %zu items refused: queue full", operation, items);
        return KVH_ERR_BUSY;
    }
    backend->ring[(backend->ring_head + backend->ring_count) % backend->ring_capacity] = *op;
    backend->ring_count++;
    backend->submitted++;
    pthread_cond_signal(&backend->work_ready);
    pthread_mutex_unlock(&backend->queue_lock);
    /* The op may already have completed: the batch must not be touched from here on. */
    return KVH_PENDING;
}

/* Option `prefault`: fills the pool, before the backend is in use, with touched buffers for chunks of
 * `chunk_bytes` (the model's full chunk), as many as fit in the capacity, so that puts of full chunks
 * never wait for the kernel to fault memory in. Failures only shorten the pool (logged). */
static void store_prefault(struct mem_store *store, const kvh_host_api *host, uint64_t chunk_bytes) {
    if (chunk_bytes == 0 || chunk_bytes > store->capacity_bytes || chunk_bytes > SIZE_MAX || buf_class((size_t)chunk_bytes) == 0) {
        kvh_util_log(host, MEM_TARGET, KVH_LOG_WARN, "prefault: skipped (full chunk of %llu bytes, capacity %llu bytes)",
                 (unsigned long long)chunk_bytes, (unsigned long long)store->capacity_bytes);
        return;
    }
    struct timespec start;
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    size_t len = (size_t)chunk_bytes;
    while (pool_has_room(store, buf_class(len))) {
        struct mem_buf *buf = buf_alloc(len, store->huge_pages);
        if (buf == NULL) {
            kvh_util_log(host, MEM_TARGET, KVH_LOG_WARN, "prefault: out of memory after %zu buffers", store->pool_count);
            break;
        }
        for (size_t offset = 0; offset < buf->cap; offset += MEM_TOUCH_STRIDE) {
            buf->data[offset] = 0; /* faults the page in, unless MAP_POPULATE did already */
        }
        store->held_bytes += buf->cap;
        struct mem_buf *dropped = NULL;
        pool_give(store, buf, &dropped); /* fits: checked above */
        buf_free_list(dropped);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    double ms = (double)(end.tv_sec - start.tv_sec) * 1e3 + (double)(end.tv_nsec - start.tv_nsec) / 1e6;
    kvh_util_log(host, MEM_TARGET, KVH_LOG_INFO, "prefault: %zu buffers of %zu bytes (%llu bytes) in %.0f ms", store->pool_count,
             buf_class(len), (unsigned long long)store->pool_bytes, ms);
}

/* ------------------------------------------------------------------------------------------------ */
/* Options                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

enum mem_option { OPT_CAPACITY_BYTES, OPT_DELAY_US, OPT_MAX_QUEUE, OPT_PREFAULT, OPT_HUGE_PAGES, OPT_COUNT };

static const kvh_option_spec MEM_OPTIONS[OPT_COUNT] = {
    [OPT_CAPACITY_BYTES] = { .key = "capacity_bytes",
                             .default_value = "1073741824",
                             .doc = "Maximum bytes of chunk data held; oldest unpinned chunks are evicted beyond it.",
                             .flags = 0,
                             .reserved = 0 },
    [OPT_DELAY_US] = { .key = "delay_us",
                       .default_value = "0",
                       .doc = "Microseconds the worker sleeps per item of put, get and prefetch (simulates a slow medium).",
                       .flags = 0,
                       .reserved = 0 },
    [OPT_MAX_QUEUE] = { .key = "max_queue",
                        .default_value = "4096",
                        .doc = "Queued put/get/prefetch operations beyond which new ones are refused with BUSY.",
                        .flags = 0,
                        .reserved = 0 },
    [OPT_PREFAULT] = { .key = "prefault",
                       .default_value = "false",
                       .doc = "true: at create, allocate and touch pooled buffers for full chunks up to capacity_bytes.",
                       .flags = 0,
                       .reserved = 0 },
    [OPT_HUGE_PAGES] = { .key = "huge_pages",
                         .default_value = "false",
                         .doc = "true: map chunk buffers of 2 MiB or more 2 MiB-aligned with MADV_HUGEPAGE instead of MAP_POPULATE.",
                         .flags = 0,
                         .reserved = 0 },
};

/* Accepted values of each option, parallel to MEM_OPTIONS: an integer range, or a boolean (0 or 1). */
static const struct {
    uint64_t min;
    uint64_t max;
    int boolean;
} MEM_OPTION_RANGES[OPT_COUNT] = {
    [OPT_CAPACITY_BYTES] = { 1, UINT64_MAX, 0 },
    [OPT_DELAY_US] = { 0, MEM_MAX_DELAY_US, 0 },
    [OPT_MAX_QUEUE] = { 1, MEM_MAX_QUEUE_LIMIT, 0 },
    [OPT_PREFAULT] = { 0, 1, 1 },
    [OPT_HUGE_PAGES] = { 0, 1, 1 },
};

/* Parses a plain decimal integer: digits only (no sign, no spaces), no overflow. */
static int parse_u64(kvh_str text, uint64_t *out) {
    if (text.ptr == NULL || text.len == 0) {
        return -1;
    }
    uint64_t value = 0;
    for (size_t i = 0; i < text.len; i++) {
        unsigned digit = (unsigned)(unsigned char)text.ptr[i] - '0';
        if (digit > 9 || value > (UINT64_MAX - digit) / 10) {
            return -1;
        }
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

/* Parses the value of option `opt`: an integer in its range, or for a boolean `true`/`false` (also
 * `1`/`0`) as 1/0. Returns 0, or -1 when the value is not accepted. */
static int parse_value(size_t opt, kvh_str text, uint64_t *out) {
    if (MEM_OPTION_RANGES[opt].boolean && (kvh_util_str_equals(text, "true") || kvh_util_str_equals(text, "false"))) {
        *out = kvh_util_str_equals(text, "true") ? 1 : 0;
        return 0;
    }
    uint64_t value = 0;
    if (parse_u64(text, &value) != 0 || value < MEM_OPTION_RANGES[opt].min || value > MEM_OPTION_RANGES[opt].max) {
        return -1;
    }
    *out = value;
    return 0;
}

/* Fills values[] from the options: defaults first (for a host that did not fill them in), then the
 * given values. Returns 0, or -1 with a message naming the option and its bad value in `error`. */
static int parse_options(const kvh_options *options, uint64_t values[OPT_COUNT], kvh_message_buf error) {
    for (size_t opt = 0; opt < OPT_COUNT; opt++) {
        const char *fallback = MEM_OPTIONS[opt].default_value;
        if (parse_value(opt, (kvh_str){ fallback, strlen(fallback) }, &values[opt]) != 0) {
            kvh_util_write_message(error, "mem: internal error: bad default for option '%s'", MEM_OPTIONS[opt].key);
            return -1;
        }
    }
    for (size_t i = 0; i < options->len; i++) {
        const kvh_option *option = &options->items[i];
        size_t opt = 0;
        while (opt < OPT_COUNT && !kvh_util_str_equals(option->key, MEM_OPTIONS[opt].key)) {
            opt++;
        }
        if (opt == OPT_COUNT) {
            kvh_util_write_message(error, "mem: unknown option '%.*s'", kvh_util_str_precision(option->key), kvh_util_str_chars(option->key));
            return -1;
        }
        uint64_t value = 0;
        if (parse_value(opt, option->value, &value) != 0) {
            if (MEM_OPTION_RANGES[opt].boolean) {
                kvh_util_write_message(error, "mem: invalid value '%.*s' for option '%s' (expected true or false)",
                              kvh_util_str_precision(option->value), kvh_util_str_chars(option->value), MEM_OPTIONS[opt].key);
                return -1;
            }
            kvh_util_write_message(error, "mem: invalid value '%.*s' for option '%s' (expected an integer from %llu to %llu)",
                          kvh_util_str_precision(option->value), kvh_util_str_chars(option->value), MEM_OPTIONS[opt].key,
                          (unsigned long long)MEM_OPTION_RANGES[opt].min, (unsigned long long)MEM_OPTION_RANGES[opt].max);
            return -1;
        }
        values[opt] = value;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Operations                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static kvh_status mem_create(const kvh_host_api *host, const kvh_options *options, const kvh_model_metadata *metadata,
                             kvh_backend **out_backend, kvh_message_buf error) {
    /* Chunks are opaque bytes: the store uses the model only for the buffer size of `prefault`. */
    if (out_backend == NULL) {
        kvh_util_write_message(error, "mem: create: out_backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    *out_backend = NULL;
    if (host == NULL || options == NULL || (options->items == NULL && options->len > 0)) {
        kvh_util_write_message(error, "mem: create: host or options is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    /* We keep `host` and call its log functions, which exist only in a table of at least v1.0 size. */
    if (host->abi_major != KVH_ABI_MAJOR || host->struct_size < KVH_HOST_API_V1_0_SIZE) {
        kvh_util_write_message(error, "mem: create: host API %u (size %u) is not compatible with ABI %d", (unsigned)host->abi_major,
                      (unsigned)host->struct_size, KVH_ABI_MAJOR);
        return KVH_ERR_ABI_MISMATCH;
    }
    uint64_t values[OPT_COUNT];
    if (parse_options(options, values, error) != 0) {
        return KVH_ERR_INVALID_CONFIG;
    }

    kvh_backend *backend = calloc(1, sizeof *backend);
    if (backend == NULL) {
        kvh_util_write_message(error, "mem: create: out of memory");
        return KVH_ERR_INTERNAL;
    }
    backend->host = host;
    backend->delay_us = values[OPT_DELAY_US];
    backend->ring_capacity = (size_t)values[OPT_MAX_QUEUE];
    backend->ring = calloc(backend->ring_capacity, sizeof *backend->ring);
    if (backend->ring == NULL || store_init(&backend->store, values[OPT_CAPACITY_BYTES], values[OPT_HUGE_PAGES] != 0) != 0) {
        kvh_util_write_message(error, "mem: create: out of memory");
        goto fail_memory;
    }
    if (values[OPT_PREFAULT] != 0) {
        uint64_t chunk_bytes = 0;
        if (metadata != NULL && metadata->struct_size >= KVH_MODEL_METADATA_V1_0_SIZE) {
            chunk_bytes = metadata->full_chunk_bytes;
        }
        store_prefault(&backend->store, host, chunk_bytes);
    }
    if (pthread_mutex_init(&backend->store_lock, NULL) != 0) {
        kvh_util_write_message(error, "mem: create: cannot initialise a mutex");
        goto fail_memory;
    }
    if (pthread_mutex_init(&backend->queue_lock, NULL) != 0) {
        kvh_util_write_message(error, "mem: create: cannot initialise a mutex");
        goto fail_store_lock;
    }
    if (pthread_cond_init(&backend->work_ready, NULL) != 0) {
        kvh_util_write_message(error, "mem: create: cannot initialise a condition variable");
        goto fail_queue_lock;
    }
    if (pthread_cond_init(&backend->progress, NULL) != 0) {
        kvh_util_write_message(error, "mem: create: cannot initialise a condition variable");
        goto fail_work_ready;
    }
    int rc = pthread_create(&backend->worker, NULL, worker_main, backend);
    if (rc != 0) {
        kvh_util_write_message(error, "mem: create: cannot start the worker thread: %s", strerror(rc));
        goto fail_progress;
    }

    kvh_util_log(host, MEM_TARGET, KVH_LOG_INFO,
             "create instance=%.*s capacity_bytes=%llu delay_us=%llu max_queue=%zu prefault=%s huge_pages=%s",
             kvh_util_str_precision(host->instance_name), kvh_util_str_chars(host->instance_name),
             (unsigned long long)values[OPT_CAPACITY_BYTES], (unsigned long long)backend->delay_us,
             backend->ring_capacity, values[OPT_PREFAULT] != 0 ? "true" : "false",
             values[OPT_HUGE_PAGES] != 0 ? "true" : "false");
    *out_backend = backend;
    return KVH_OK;

fail_progress:
    pthread_cond_destroy(&backend->progress);
fail_work_ready:
    pthread_cond_destroy(&backend->work_ready);
fail_queue_lock:
    pthread_mutex_destroy(&backend->queue_lock);
fail_store_lock:
    pthread_mutex_destroy(&backend->store_lock);
fail_memory:
    store_free(&backend->store);
    free(backend->ring);
    free(backend);
    return KVH_ERR_INTERNAL;
}

static void mem_destroy(kvh_backend *backend) {
    if (backend == NULL) {
        return;
    }
    if (pthread_equal(pthread_self(), backend->worker)) {
        /* From inside a completion callback: joining would deadlock and freeing would pull the backend
         * out from under the running worker. Leaking is the only safe answer to this host bug. */
        kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_ERROR, "destroy called from a completion callback: refused, backend leaked");
        return;
    }
    /* The worker completes every queued op (each callback fires) before it exits. */
    pthread_mutex_lock(&backend->queue_lock);
    backend->stopping = 1;
    pthread_cond_signal(&backend->work_ready);
    pthread_mutex_unlock(&backend->queue_lock);
    pthread_join(backend->worker, NULL);

    const struct mem_store *store = &backend->store;
    kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_INFO,
             "destroy: %zu chunks, %llu/%llu bytes, %llu evictions, %llu async ops; buffers: %llu reused, %llu new, "
             "%llu dropped, %zu pooled (%llu bytes)",
             store->entry_count, (unsigned long long)store->used_bytes, (unsigned long long)store->capacity_bytes,
             (unsigned long long)store->evictions, (unsigned long long)backend->completed,
             (unsigned long long)store->pool_reused, (unsigned long long)store->pool_misses,
             (unsigned long long)store->pool_dropped, store->pool_count, (unsigned long long)store->pool_bytes);
    store_free(&backend->store);
    free(backend->ring);
    pthread_cond_destroy(&backend->progress);
    pthread_cond_destroy(&backend->work_ready);
    pthread_mutex_destroy(&backend->queue_lock);
    pthread_mutex_destroy(&backend->store_lock);
    free(backend);
}

static kvh_status mem_contains(kvh_backend *backend, const kvh_contains_batch *batch) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "contains", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "contains", "keys, out_meta or item_status");
    }
    size_t present = 0;
    pthread_mutex_lock(&backend->store_lock);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        memset(&batch->out_meta[i], 0, sizeof batch->out_meta[i]);
        if (!key_is_valid(key)) {
            batch->item_status[i] = KVH_ERR_INVALID_ARG;
            continue;
        }
        struct mem_entry *entry = store_find(&backend->store, key);
        if (entry == NULL) {
            batch->item_status[i] = KVH_ERR_NOT_FOUND;
        } else if (batch->pin != 0 && entry->pin_count == UINT32_MAX) {
            batch->item_status[i] = KVH_ERR_INVALID_ARG; /* the pin count would overflow */
        } else {
            if (batch->pin != 0 && entry->pin_count++ == 0) {
                backend->store.pinned_bytes += entry->data_len;
            }
            batch->out_meta[i] = entry->meta;
            batch->item_status[i] = KVH_OK;
            present++;
        }
    }
    pthread_mutex_unlock(&backend->store_lock);

    if (kvh_util_log_enabled(backend->host, KVH_LOG_TRACE)) {
        for (size_t i = 0; i < batch->len; i++) {
            kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_TRACE, "contains key=%.*s pin=%u -> %s",
                     kvh_util_str_precision(batch->keys[i].canonical), kvh_util_str_chars(batch->keys[i].canonical),
                     (unsigned)batch->pin, kvh_util_status_name(batch->item_status[i]));
        }
    }
    kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_DEBUG, "contains: %zu keys, %zu present%s", batch->len, present,
             batch->pin != 0 ? " (pinned)" : "");
    return KVH_OK;
}

static kvh_status mem_put(kvh_backend *backend, const kvh_put_batch *batch, kvh_completion done) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "put", "batch");
    }
    if (done.complete == NULL) {
        return kvh_util_null_param(backend, "put", "done.complete");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->src == NULL || batch->meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "put", "keys, src, meta or item_status");
    }
    struct mem_op op = { .kind = MEM_OP_PUT, .batch.put = batch, .done = done };
    return submit(backend, &op, "put", batch->len);
}

static kvh_status mem_get(kvh_backend *backend, const kvh_get_batch *batch, kvh_completion done) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "get", "batch");
    }
    if (done.complete == NULL) {
        return kvh_util_null_param(backend, "get", "done.complete");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->dst == NULL || batch->out_len == NULL ||
                           batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "get", "keys, dst, out_len, out_meta or item_status");
    }
    struct mem_op op = { .kind = MEM_OP_GET, .batch.get = batch, .done = done };
    return submit(backend, &op, "get", batch->len);
}

static kvh_status mem_prefetch(kvh_backend *backend, const kvh_key_batch *batch, kvh_completion done) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "prefetch", "batch");
    }
    if (done.complete == NULL) {
        return kvh_util_null_param(backend, "prefetch", "done.complete");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "prefetch", "keys or item_status");
    }
    struct mem_op op = { .kind = MEM_OP_PREFETCH, .batch.prefetch = batch, .done = done };
    return submit(backend, &op, "prefetch", batch->len);
}

enum mem_key_op { KEY_OP_REMOVE, KEY_OP_FORCE_REMOVE, KEY_OP_PIN, KEY_OP_UNPIN };

static const char *const KEY_OP_NAMES[] = { "remove", "remove(force)", "pin", "unpin" };

/* One item of remove, pin or unpin, under the store lock. Removed entries are discarded (their buffer
 * to the pool or `*dropped`, their header to `*graveyard`). */
static kvh_status key_op_one(struct mem_store *store, enum mem_key_op op, const kvh_key *key, struct mem_entry **graveyard,
                             struct mem_buf **dropped) {
    if (!key_is_valid(key)) {
        return KVH_ERR_INVALID_ARG;
    }
    struct mem_entry *entry = store_find(store, key);
    if (entry == NULL) {
        return KVH_ERR_NOT_FOUND;
    }
    switch (op) {
    case KEY_OP_REMOVE:
    case KEY_OP_FORCE_REMOVE:
        if (entry->pin_count > 0 && op != KEY_OP_FORCE_REMOVE) {
            return KVH_ERR_BUSY; /* someone relies on it staying; retry after unpin, or force */
        }
        store_unlink(store, entry);
        store_discard(store, entry, graveyard, dropped);
        return KVH_OK;
    case KEY_OP_PIN:
        if (entry->pin_count == UINT32_MAX) {
            return KVH_ERR_INVALID_ARG;
        }
        if (entry->pin_count++ == 0) {
            store->pinned_bytes += entry->data_len;
        }
        return KVH_OK;
    case KEY_OP_UNPIN:
        if (entry->pin_count == 0) {
            return KVH_ERR_INVALID_ARG; /* more unpins than pins */
        }
        if (--entry->pin_count == 0) {
            store->pinned_bytes -= entry->data_len;
        }
        return KVH_OK;
    }
    return KVH_ERR_INTERNAL;
}

/* remove, pin and unpin: synchronous, one lock hold for the whole batch. */
static kvh_status run_key_op(kvh_backend *backend, const kvh_key_batch *batch, enum mem_key_op op) {
    const char *name = KEY_OP_NAMES[op];
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, name, "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, name, "keys or item_status");
    }
    struct mem_entry *graveyard = NULL;
    struct mem_buf *dropped = NULL;
    size_t ok = 0;
    pthread_mutex_lock(&backend->store_lock);
    for (size_t i = 0; i < batch->len; i++) {
        batch->item_status[i] = key_op_one(&backend->store, op, &batch->keys[i], &graveyard, &dropped);
        ok += batch->item_status[i] == KVH_OK;
    }
    pthread_mutex_unlock(&backend->store_lock);
    free_entry_list(graveyard);
    buf_free_list(dropped);

    if (kvh_util_log_enabled(backend->host, KVH_LOG_TRACE)) {
        for (size_t i = 0; i < batch->len; i++) {
            kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_TRACE, "%s key=%.*s -> %s", name, kvh_util_str_precision(batch->keys[i].canonical),
                     kvh_util_str_chars(batch->keys[i].canonical), kvh_util_status_name(batch->item_status[i]));
        }
    }
    kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_DEBUG, "%s: %zu keys, %zu OK", name, batch->len, ok);
    return KVH_OK;
}

static kvh_status mem_remove(kvh_backend *backend, const kvh_key_batch *batch, bool force) {
    return run_key_op(backend, batch, force ? KEY_OP_FORCE_REMOVE : KEY_OP_REMOVE);
}

static kvh_status mem_pin(kvh_backend *backend, const kvh_key_batch *batch) {
    return run_key_op(backend, batch, KEY_OP_PIN);
}

static kvh_status mem_unpin(kvh_backend *backend, const kvh_key_batch *batch) {
    return run_key_op(backend, batch, KEY_OP_UNPIN);
}

/* Waits until every op queued before the call has completed (callback returned). Ops queued
 * meanwhile by other threads are not waited for, so a busy producer cannot starve a flush. */
static kvh_status mem_flush(kvh_backend *backend) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    pthread_mutex_lock(&backend->queue_lock);
    if (pthread_equal(pthread_self(), backend->worker)) {
        /* From inside a completion callback: the worker would wait for itself forever. */
        pthread_mutex_unlock(&backend->queue_lock);
        kvh_util_set_last_error(backend, "flush: called from a completion callback");
        return KVH_ERR_UNSUPPORTED;
    }
    uint64_t target = backend->submitted;
    while (backend->completed < target) {
        pthread_cond_wait(&backend->progress, &backend->queue_lock);
    }
    pthread_mutex_unlock(&backend->queue_lock);
    kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_DEBUG, "flush: %llu ops completed", (unsigned long long)target);
    return KVH_OK;
}

/* Empties the store. Under the lock, entries are detached and their buffers given to the pool (as
 * much as the capacity allows); headers and the buffers the pool had no room for are freed after
 * the lock is released, so readers are not blocked while memory is returned. Pinned entries go too:
 * clear is explicit. */
static kvh_status mem_clear(kvh_backend *backend) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    pthread_mutex_lock(&backend->store_lock);
    struct mem_store *store = &backend->store;
    struct mem_entry *detached = store->oldest;
    size_t chunks = store->entry_count;
    memset(store->buckets, 0, store->bucket_count * sizeof *store->buckets);
    store->oldest = NULL;
    store->newest = NULL;
    store->entry_count = 0;
    store->used_bytes = 0;
    store->pinned_bytes = 0;
    struct mem_entry *graveyard = NULL;
    struct mem_buf *dropped = NULL;
    while (detached != NULL) {
        struct mem_entry *newer = detached->newer;
        store_discard(store, detached, &graveyard, &dropped);
        detached = newer;
    }
    pthread_mutex_unlock(&backend->store_lock);
    free_entry_list(graveyard);
    buf_free_list(dropped);
    kvh_util_log(backend->host, MEM_TARGET, KVH_LOG_DEBUG, "clear: %zu chunks removed", chunks);
    return KVH_OK;
}

static kvh_status mem_health(kvh_backend *backend, kvh_message_buf message) {
    if (backend == NULL) {
        kvh_util_write_message(message, "mem: backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    pthread_mutex_lock(&backend->store_lock);
    const struct mem_store *store = &backend->store;
    size_t chunks = store->entry_count;
    unsigned long long used = store->used_bytes;
    unsigned long long capacity = store->capacity_bytes;
    size_t pooled = store->pool_count;
    unsigned long long pool_bytes = store->pool_bytes;
    unsigned long long held = store->held_bytes;
    pthread_mutex_unlock(&backend->store_lock);
    kvh_util_write_message(message, "mem: %zu chunks, %llu/%llu bytes; pool: %zu buffers, %llu bytes; buffers held: %llu bytes",
                  chunks, used, capacity, pooled, pool_bytes, held);
    return KVH_OK;
}

static kvh_status mem_stats(kvh_backend *backend, kvh_stats_buf *out) {
    if (backend == NULL || out == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    pthread_mutex_lock(&backend->store_lock);
    const struct mem_store store = backend->store; /* a consistent snapshot, copied under the lock */
    pthread_mutex_unlock(&backend->store_lock);
    kvh_util_stats_begin(out);
    kvh_util_stat(out, "evictions", KVH_STAT_COUNTER, store.evictions);
    kvh_util_stat(out, "bytes_used", KVH_STAT_GAUGE, store.used_bytes);
    kvh_util_stat(out, "capacity_bytes", KVH_STAT_GAUGE, store.capacity_bytes);
    kvh_util_stat(out, "entries", KVH_STAT_GAUGE, store.entry_count);
    kvh_util_stat(out, "pinned_bytes", KVH_STAT_GAUGE, store.pinned_bytes);
    kvh_util_stat(out, "pool_bytes", KVH_STAT_GAUGE, store.pool_bytes);
    kvh_util_stat(out, "buffers_held_bytes", KVH_STAT_GAUGE, store.held_bytes);
    kvh_util_stat(out, "pool_reused", KVH_STAT_COUNTER, store.pool_reused);
    kvh_util_stat(out, "pool_misses", KVH_STAT_COUNTER, store.pool_misses);
    return kvh_util_stats_end(out);
}

static size_t mem_last_error(kvh_backend *backend, char *buf, size_t cap) {
    return kvh_util_last_error(backend, buf, cap);
}

/* ------------------------------------------------------------------------------------------------ */
/* Descriptor and entry point                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static const kvh_backend_vtable MEM_VTABLE = {
    .struct_size = sizeof(kvh_backend_vtable),
    .reserved = 0,
    .create = mem_create,
    .destroy = mem_destroy,
    .contains = mem_contains,
    .put = mem_put,
    .get = mem_get,
    .remove = mem_remove,
    .last_error = mem_last_error,
    .pin = mem_pin,
    .unpin = mem_unpin,
    .prefetch = mem_prefetch,
    .flush = mem_flush,
    .health = mem_health,
    .clear = mem_clear,
    .stats = mem_stats,
};

static const kvh_plugin_descriptor MEM_DESCRIPTOR = {
    .struct_size = sizeof(kvh_plugin_descriptor),
    .abi_major = KVH_ABI_MAJOR,
    .abi_minor = KVH_ABI_MINOR,
    .class_name = "mem",
    .plugin_version = "0.1.0",
    .description = "Bounded in-memory store with FIFO eviction, pins and an async worker thread",
    .capabilities = KVH_CAP_PIN | KVH_CAP_PREFETCH | KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_CLEAR | KVH_CAP_STATS,
    .options = MEM_OPTIONS,
    .options_len = OPT_COUNT,
    .vtable = &MEM_VTABLE,
};

KVH_DECLARE_PLUGIN(mem) {
    (void)host; /* Nothing to negotiate: the descriptor is static and the same for every host. */
    return &MEM_DESCRIPTOR;
}
