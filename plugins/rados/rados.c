/*
 * kvhost storage plugin `rados`: KV chunks as objects in a Ceph RADOS pool, through librados' C API.
 *
 * Layout (see README.md for the full description):
 * - A chunk of L bytes is stored as ceil(L / S) objects (at least one), where S is the stripe unit
 *   (option max_object_bytes, recorded per chunk). The HEAD object holds a 128-byte header record at
 *   offset 0 (magic, format version, length, stripe unit, object count, a CRC32C of the data, the
 *   generation, the kvh_chunk_meta, the key's length, CRC32C and FNV-1a-64, and a CRC32C of the record)
 *   and bytes [0, min(L, S)) of the chunk from offset 4096. STRIPE objects hold the rest, S bytes each.
 * - Object names: <object_prefix><escaped canonical key> for the head, and
 *   <head name>#<generation, 16 hex digits>.<stripe index> for stripe 1, 2, ... The escaping keeps
 *   A-Z a-z 0-9 - _ . @ and writes every other byte as %XX (upper-case hex), so distinct keys get
 *   distinct names and no head name contains '#'. An escaped key longer than KEY_NAME_MAX bytes is
 *   cut and followed by ~<FNV-1a-64 of the canonical key, 16 hex digits>; the key's identity in the
 *   header tells such names apart.
 * - Every put has a fresh random 64-bit generation. Stripes are written first, the head (data and header
 *   in one atomic write op) LAST, so a chunk is visible only once complete. The head write is a
 *   compare-and-swap on the object's version: create-exclusive for a new key, else assert_version(the
 *   version read) + data + header + truncate. After a successful replacement the old generation's
 *   stripes are removed in the background. Readers read the head (header + data atomically), then the
 *   stripes of the generation it names, which are immutable: a reader sees either the old or the new
 *   chunk, never a mix, and a stripe that vanished (replaced or removed meanwhile, or deleted by hand)
 *   makes the read a miss.
 * - remove reads the head's version, removes the head with assert_version (head first: invisible at
 *   once), then its stripes.
 *
 * Asynchrony: put and get run as state machines over rados_aio_* operations whose completion callbacks
 * (on librados' finisher thread) advance them; the host's completion fires from there, exactly once,
 * with no plugin lock held. At most max_in_flight librados operations per backend are in flight; more
 * wait in a FIFO queue (bounded by the host's own batches). Writes are passed to librados straight from
 * the host's source buffers and reads land straight in its destination buffers (librados' C API copies
 * write data into its own buffer once; there is no way to lend it memory from C).
 *
 * Synchronous calls (contains, remove, clear, health) use completions without callbacks and wait with
 * rados_aio_wait_for_complete, whose flag librados sets on its messenger thread, not the finisher: so
 * they also work when the host calls them from inside a completion callback.
 *
 * Failures: every librados operation has a deadline (op_timeout_s sets rados_osd_op_timeout,
 * rados_mon_op_timeout and client_mount_timeout), and the ioctx has FULL_TRY set, so a full pool answers
 * ENOSPC/EDQUOT instead of blocking writes. Once an operation times out, operations that were waiting in
 * the queue at that moment fail at once with KVH_ERR_UNAVAILABLE instead of each waiting out its own
 * deadline; later operations are attempted normally, so the backend recovers as soon as the cluster
 * answers again (librados reconnects to the monitors and resends to OSDs by itself).
 *
 * Locks: `lock` (per backend) guards the queue and counters; `mu` (per batch) guards the state of the
 * batch's items. A thread may take a batch's mu and then the backend's lock, never the other way round,
 * and no lock is held while calling into librados to submit, or while calling a host completion.
 *
 * Build: cc -std=c11 -shared -fPIC -O2 -g -Wall -Wextra -Werror -pedantic -fvisibility=hidden -pthread \
 *            -I<dir of kvhost_plugin.h> rados.c -o libkvhost_rados.so -lrados
 */

#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime, strndup */
#define _DEFAULT_SOURCE

#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"

#include <rados/librados.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define RADOS_CRC_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define RADOS_CRC_ARM 1
#endif

#define RADOS_TARGET "rados"
#define RADOS_VERSION "0.1.0"

/* Limits. */
#define KEY_MAX 4096u                   /* canonical key bytes accepted (longer keys: INVALID_ARG) */
#define KEY_NAME_MAX 512u               /* escaped key bytes in an object name before it is hashed */
#define KEY_NAME_CUT 480u               /* escaped bytes kept in a hashed name */
#define PREFIX_MAX 128u                 /* object_prefix bytes */
#define MAX_PARTS 65536u                /* objects per chunk */
#define CAS_RETRIES 8                   /* head write attempts when other writers race on the same key */
#define HEALTH_WAIT_MAX_S 5u            /* health waits at most this long (or op_timeout_s if shorter) */

/* The header record at offset 0 of every head object, format version 1 (little-endian; see README). */
#define HEADER_MAGIC "KVHRADOS"
#define HEADER_VERSION 1u
#define HEADER_BYTES 128u               /* the record */
#define DATA_OFFSET 4096u               /* where the head object's chunk data starts */
#define HEADER_FLAG_DATA_CRC 1u         /* data_crc holds a CRC32C of the whole chunk */

/* Internal errno values: an operation never sent because the cluster had just timed out, and an
 * operation refused because the backend is being destroyed. */
#define ERR_SKIPPED (-EHOSTDOWN)
#define ERR_STOPPING (-ECANCELED)

/* ------------------------------------------------------------------------------------------------ */
/* librados return codes                                                                            */
/* ------------------------------------------------------------------------------------------------ */

/* strerror for a negative librados return value, including this file's internal codes. */
static const char *rc_text(int rc) {
    switch (rc) {
    case ERR_SKIPPED: return "not attempted: the cluster did not answer an earlier operation within op_timeout_s";
    case ERR_STOPPING: return "canceled: the backend is being destroyed";
    case -ETIMEDOUT: return "no answer within op_timeout_s (Connection timed out)";
    default: return strerror(rc < 0 ? -rc : rc);
    }
}

/* Maps a negative librados return value to a status. */
static kvh_status status_of(int rc) {
    switch (rc) {
    case 0: return KVH_OK;
    case -ENOENT: return KVH_ERR_NOT_FOUND;
    case -ETIMEDOUT: return KVH_ERR_TIMEOUT;
    case -ENOSPC:
    case -EDQUOT: return KVH_ERR_NO_SPACE;
    case ERR_SKIPPED:
    case -ENOTCONN:
    case -ECONNREFUSED:
    case -ECONNRESET:
    case -EHOSTUNREACH:
    case -ENETUNREACH:
    case -ESHUTDOWN:
    case -EPIPE: return KVH_ERR_UNAVAILABLE;
    case ERR_STOPPING: return KVH_ERR_CANCELED;
    case -ENOMEM: return KVH_ERR_INTERNAL;
    default: return KVH_ERR_IO;
    }
}

/* Failures that mean "the cluster is not answering" (the breaker and fail-fast loops look for these). */
static int rc_is_outage(int rc) {
    return rc == -ETIMEDOUT || rc == ERR_SKIPPED || rc == -ENOTCONN || rc == -ECONNREFUSED || rc == -ESHUTDOWN ||
           rc == -EHOSTUNREACH || rc == -ENETUNREACH;
}

/* ------------------------------------------------------------------------------------------------ */
/* CRC32C (Castagnoli)                                                                              */
/* ------------------------------------------------------------------------------------------------ */

/* Slicing-by-8 tables for the portable path; SSE4.2 (x86-64, detected at run time) or the ARMv8 CRC
 * extension (when compiled for it) otherwise. All paths compute the same standard CRC32C.
 *
 * The hardware path runs three independent CRC streams over three consecutive CRC_BLOCK-byte blocks
 * (the instruction's latency is three times its throughput), then joins them: a CRC is linear, so the
 * CRC of A||B from state s is Z(crc of A from s) ^ (crc of B from 0), where Z is the operator
 * "append CRC_BLOCK zero bytes", applied through four 256-entry tables (crc_shift). */
#define CRC_BLOCK 4096u
static uint32_t crc_table[8][256];
static uint32_t crc_shift_table[4][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static int crc_hw;

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        }
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        for (int k = 1; k < 8; k++) {
            crc_table[k][n] = (crc_table[k - 1][n] >> 8) ^ crc_table[0][crc_table[k - 1][n] & 0xFFu];
        }
    }
    /* Z applied to each single-bit state, then to every byte value in each byte position. */
    uint32_t column[32];
    for (int bit = 0; bit < 32; bit++) {
        uint32_t c = 1u << bit;
        for (uint32_t i = 0; i < CRC_BLOCK; i++) {
            c = (c >> 8) ^ crc_table[0][c & 0xFFu];
        }
        column[bit] = c;
    }
    for (int pos = 0; pos < 4; pos++) {
        for (uint32_t v = 0; v < 256; v++) {
            uint32_t c = 0;
            for (int bit = 0; bit < 8; bit++) {
                if (v & (1u << bit)) {
                    c ^= column[pos * 8 + bit];
                }
            }
            crc_shift_table[pos][v] = c;
        }
    }
#if defined(RADOS_CRC_X86)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#elif defined(RADOS_CRC_ARM)
    crc_hw = 1;
#endif
}

/* Updates a raw (pre-inverted) CRC state with `len` bytes. */
static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF] ^
              crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^ crc_table[2][(v >> 40) & 0xFF] ^
              crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        len -= 8;
    }
#endif
    while (len-- > 0) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFFu];
    }
    return crc;
}

/* Appends CRC_BLOCK zero bytes to a raw CRC state. */
static uint32_t crc_shift(uint32_t crc) {
    return crc_shift_table[0][crc & 0xFF] ^ crc_shift_table[1][(crc >> 8) & 0xFF] ^
           crc_shift_table[2][(crc >> 16) & 0xFF] ^ crc_shift_table[3][crc >> 24];
}

#if defined(RADOS_CRC_X86)
__attribute__((target("sse4.2"))) static uint32_t crc_hw_update(uint32_t crc, const uint8_t *p, size_t len) {
    while (len >= 3 * CRC_BLOCK) {
        uint64_t a = crc;
        uint64_t b = 0;
        uint64_t c3 = 0;
        for (uint32_t off = 0; off < CRC_BLOCK; off += 8) {
            uint64_t va;
            uint64_t vb;
            uint64_t vc;
            memcpy(&va, p + off, 8);
            memcpy(&vb, p + CRC_BLOCK + off, 8);
            memcpy(&vc, p + 2 * CRC_BLOCK + off, 8);
            a = _mm_crc32_u64(a, va);
            b = _mm_crc32_u64(b, vb);
            c3 = _mm_crc32_u64(c3, vc);
        }
        crc = crc_shift(crc_shift((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c3;
        p += 3 * CRC_BLOCK;
        len -= 3 * CRC_BLOCK;
    }
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len-- > 0) {
        c32 = _mm_crc32_u8(c32, *p++);
    }
    return c32;
}
#elif defined(RADOS_CRC_ARM)
static uint32_t crc_hw_update(uint32_t crc, const uint8_t *p, size_t len) {
    while (len >= 3 * CRC_BLOCK) {
        uint32_t a = crc;
        uint32_t b = 0;
        uint32_t c3 = 0;
        for (uint32_t off = 0; off < CRC_BLOCK; off += 8) {
            uint64_t va;
            uint64_t vb;
            uint64_t vc;
            memcpy(&va, p + off, 8);
            memcpy(&vb, p + CRC_BLOCK + off, 8);
            memcpy(&vc, p + 2 * CRC_BLOCK + off, 8);
            a = __crc32cd(a, va);
            b = __crc32cd(b, vb);
            c3 = __crc32cd(c3, vc);
        }
        crc = crc_shift(crc_shift(a) ^ b) ^ c3;
        p += 3 * CRC_BLOCK;
        len -= 3 * CRC_BLOCK;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __crc32cd(crc, v);
        p += 8;
        len -= 8;
    }
    while (len-- > 0) {
        crc = __crc32cb(crc, *p++);
    }
    return crc;
}
#endif

/* CRC32C of `len` bytes (0 for none). */
static uint32_t crc32c(const void *data, size_t len) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    uint32_t crc = 0xFFFFFFFFu;
    if (len == 0) {
        return 0;
    }
#if defined(RADOS_CRC_X86) || defined(RADOS_CRC_ARM)
    if (crc_hw) {
        return ~crc_hw_update(crc, p, len);
    }
#endif
    return ~crc_sw(crc, p, len);
}

/* ------------------------------------------------------------------------------------------------ */
/* Object names                                                                                     */
/* ------------------------------------------------------------------------------------------------ */

static int name_safe(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
           c == '.' || c == '@';
}

static uint64_t fnv1a64(const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t hash = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) {
        hash = (hash ^ p[i]) * 1099511628211ull;
    }
    return hash;
}

/* The head object's name of a key: prefix + escaped canonical key (hashed when long). NULL when out of
 * memory. */
static char *head_name(const char *prefix, size_t prefix_len, const char *key, size_t key_len) {
    static const char HEX[] = "0123456789ABCDEF";
    size_t escaped = 0;
    for (size_t i = 0; i < key_len; i++) {
        escaped += name_safe((unsigned char)key[i]) ? 1 : 3;
    }
    int hashed = escaped > KEY_NAME_MAX;
    size_t body = hashed ? KEY_NAME_CUT + 1 + 16 : escaped;
    char *name = malloc(prefix_len + body + 1);
    if (name == NULL) {
        return NULL;
    }
    memcpy(name, prefix, prefix_len);
    char *out = name + prefix_len;
    size_t used = 0;
    for (size_t i = 0; i < key_len; i++) {
        unsigned char c = (unsigned char)key[i];
        size_t need = name_safe(c) ? 1 : 3;
        if (hashed && used + need > KEY_NAME_CUT) {
            break; /* never split a %XX triple */
        }
        if (need == 1) {
            out[used++] = (char)c;
        } else {
            out[used++] = '%';
            out[used++] = HEX[c >> 4];
            out[used++] = HEX[c & 15];
        }
    }
    if (hashed) {
        used += (size_t)snprintf(out + used, 1 + 16 + 1, "~%016" PRIx64, fnv1a64(key, key_len));
    }
    out[used] = '\0';
    return name;
}

/* A stripe object's name: <head>#<generation>.<index>. */
static char *stripe_name(const char *head, uint64_t gen, uint32_t index) {
    size_t len = strlen(head) + 1 + 16 + 1 + 10 + 1;
    char *name = malloc(len);
    if (name != NULL) {
        snprintf(name, len, "%s#%016" PRIx64 ".%" PRIu32, head, gen, index);
    }
    return name;
}

/* ------------------------------------------------------------------------------------------------ */
/* The header record                                                                                */
/* ------------------------------------------------------------------------------------------------ */

/* What a head object's header says about its chunk. */
struct chunk_info {
    uint64_t length;
    uint64_t stripe_unit;
    uint32_t parts;
    uint32_t flags;
    uint32_t data_crc;
    uint64_t gen;
    kvh_chunk_meta meta;
};

static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}
static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}
static uint16_t get_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}
static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Objects a chunk of `length` bytes takes with stripe unit `unit`. */
static uint64_t parts_for(uint64_t length, uint64_t unit) {
    return length == 0 ? 1 : (length - 1) / unit + 1;
}

/* Bytes of chunk data in the head object. */
static uint64_t head_len_of(const struct chunk_info *info) {
    return info->length < info->stripe_unit ? info->length : info->stripe_unit;
}

/* Encodes the header record (HEADER_BYTES). The key is identified by its length, CRC32C and FNV-1a-64:
 * object names already tell short keys apart exactly, and these tell apart the long keys whose names
 * share a cut prefix and a hash. */
static void header_encode(uint8_t out[HEADER_BYTES], const struct chunk_info *info, const char *key,
                          size_t key_len) {
    memset(out, 0, HEADER_BYTES);
    memcpy(out, HEADER_MAGIC, 8);
    put_u16(out + 8, HEADER_VERSION);
    put_u16(out + 10, HEADER_BYTES);
    put_u32(out + 12, info->flags);
    put_u64(out + 16, info->length);
    put_u64(out + 24, info->stripe_unit);
    put_u32(out + 32, info->parts);
    put_u32(out + 36, info->data_crc);
    put_u64(out + 40, info->gen);
    put_u32(out + 48, (uint32_t)info->meta.fmt);
    put_u32(out + 52, (uint32_t)info->meta.dtype);
    put_u32(out + 56, info->meta.ndim);
    for (int i = 0; i < 4; i++) {
        put_u32(out + 60 + 4 * i, (uint32_t)info->meta.shape[i]);
    }
    put_u32(out + 76, info->meta.reserved);
    put_u32(out + 80, (uint32_t)key_len);
    put_u32(out + 84, crc32c(key, key_len));
    put_u64(out + 88, fnv1a64(key, key_len));
    /* out + 96 .. 123: reserved, zero */
    put_u32(out + HEADER_BYTES - 4, crc32c(out, HEADER_BYTES - 4));
}

enum header_verdict {
    HEADER_OK,      /* a valid record for this key */
    HEADER_FOREIGN, /* absent, not ours, another key, or a newer format: not served (a miss) */
    HEADER_CORRUPT, /* ours, but damaged: KVH_ERR_CORRUPT */
};

/* Decodes and checks a header record (`len` bytes were read) against the key asked for (key == NULL:
 * any key). */
static enum header_verdict header_decode(const uint8_t *h, size_t len, const char *key, size_t key_len,
                                         struct chunk_info *info) {
    if (len < 12 || memcmp(h, HEADER_MAGIC, 8) != 0) {
        return HEADER_FOREIGN;
    }
    if (get_u16(h + 8) != HEADER_VERSION) {
        return HEADER_FOREIGN; /* a format this plugin does not know: never guess */
    }
    if (len < HEADER_BYTES || get_u16(h + 10) != HEADER_BYTES ||
        crc32c(h, HEADER_BYTES - 4) != get_u32(h + HEADER_BYTES - 4)) {
        return HEADER_CORRUPT;
    }
    if (key != NULL && (get_u32(h + 80) != key_len || get_u32(h + 84) != crc32c(key, key_len) ||
                        get_u64(h + 88) != fnv1a64(key, key_len))) {
        return HEADER_FOREIGN; /* a hashed name shared with another key */
    }
    memset(info, 0, sizeof *info);
    info->flags = get_u32(h + 12);
    info->length = get_u64(h + 16);
    info->stripe_unit = get_u64(h + 24);
    info->parts = get_u32(h + 32);
    info->data_crc = get_u32(h + 36);
    info->gen = get_u64(h + 40);
    info->meta.length = info->length;
    info->meta.fmt = (int32_t)get_u32(h + 48);
    info->meta.dtype = (int32_t)get_u32(h + 52);
    info->meta.ndim = get_u32(h + 56);
    for (int i = 0; i < 4; i++) {
        info->meta.shape[i] = (int32_t)get_u32(h + 60 + 4 * i);
    }
    info->meta.reserved = get_u32(h + 76);
    if (info->stripe_unit == 0 || info->parts == 0 || info->parts > MAX_PARTS || info->meta.ndim > 4 ||
        parts_for(info->length, info->stripe_unit) != info->parts) {
        return HEADER_CORRUPT;
    }
    return HEADER_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* Backend, batches, operations                                                                     */
/* ------------------------------------------------------------------------------------------------ */

struct rop;

struct kvh_backend {
    const kvh_host_api *host; /* valid until process exit (ABI) */
    rados_t cluster;
    rados_ioctx_t io;

    /* Configuration, immutable after create. */
    char *cluster_name;
    char *user;     /* "client.<id>" */
    char *mon_host; /* for messages */
    char *pool;
    char *nspace;
    char *prefix;
    size_t prefix_len;
    uint64_t stripe_unit;
    unsigned max_in_flight;
    unsigned op_timeout_s;
    int checksum;
    uint64_t gen_seed;
    atomic_uint_fast64_t gen_counter;

    pthread_mutex_t lock;
    pthread_cond_t idle;     /* broadcast when outstanding drops to 0 */
    unsigned in_flight;      /* operations submitted to librados and not completed */
    size_t outstanding;      /* operations alive (queued, in flight or finishing) */
    struct rop *queue_head;  /* operations waiting for an in-flight slot */
    struct rop *queue_tail;
    size_t queued;
    uint64_t timeout_epoch;  /* +1 each time an operation times out */
    int stopping;
    struct probe *probes;    /* health probes still in flight */
    struct timespec last_warn;
    uint64_t warns_suppressed;

    /* Counters (health, destroy). */
    atomic_uint_fast64_t puts_ok, put_errors, gets_hit, gets_miss, get_errors, corrupt, timeouts, skipped,
        replaced, replaced_unread, bytes_in, bytes_out, gc_objects;
    atomic_int no_cmpext; /* the pool refused cmpext once: overwrites read the old header first */
};

/* One async put/get call. */
struct ritem;
struct rbatch {
    kvh_backend *b;
    int is_put;
    const kvh_put_batch *put;
    const kvh_get_batch *get;
    kvh_completion done;
    pthread_mutex_t mu;
    size_t refs; /* unfinished items + 1 while the submitting call runs */
    size_t n;
    size_t ok;
    struct ritem *items;
};

enum phase { PH_STRIPES, PH_HEAD, PH_PARTS, PH_DONE };

struct ritem {
    struct rbatch *batch;
    size_t index;
    const char *key;
    size_t key_len;
    char *head;
    enum phase phase;
    uint32_t parts_left;   /* operations of the current phase still running */
    int retries;
    int rc;                /* first failure (negative errno), 0 while fine */
    kvh_status fail;       /* a status decided without an errno (CORRUPT, NOT_FOUND...), else KVH_OK */
    struct chunk_info info;
    uint64_t version;      /* the head object's version: put, the one replaced; get, the one read */
    /* put */
    const uint8_t *src;
    uint8_t header[HEADER_BYTES];
    int cas_no_stripes;    /* the next CAS also asserts that the replaced head names no stripes */
    int old_valid;
    struct chunk_info old;
    /* get */
    uint8_t *dst;
    size_t cap;
    size_t head_read;
    int missing;           /* a stripe was absent or short: the chunk is broken */
};

enum rop_kind {
    ROP_STRIPE_WRITE, /* put: write_full of one stripe */
    ROP_HEAD_CREATE,  /* put: create-exclusive + data + header */
    ROP_HEAD_READ,    /* put: the header and version of an existing head */
    ROP_HEAD_CAS,     /* put: assert_version [+ cmpext: no stripes] + data + header + truncate */
    ROP_GET_HEAD,     /* get: header + data of the head */
    ROP_GET_PART,     /* get: a stripe, or the rest of the head's data (guarded by assert_version) */
    ROP_REMOVE,       /* background: remove an object (ENOENT is fine) */
    ROP_REMOVE_IF,    /* background: remove a head if its version is still the one read */
};

/* One librados operation. */
struct rop {
    struct rop *next;
    kvh_backend *b;
    struct ritem *item; /* NULL for background operations */
    enum rop_kind kind;
    uint32_t part;
    uint64_t epoch;
    rados_completion_t c;
    rados_write_op_t wop;
    rados_read_op_t rdop;
    uint64_t version;      /* ROP_REMOVE_IF: the version to match; after completion: the object's version */
    uint8_t header[HEADER_BYTES];
    size_t header_read;
    int header_rval;
    size_t bytes_read;
    int read_rval;
    int cmp_rval;
    char *oid;             /* owned, except when it is the item's head name */
    int owns_oid;
};

static void issue(kvh_backend *b, struct rop *r);
static void rop_finish(struct rop *r, int rc);

static uint64_t next_gen(kvh_backend *b) {
    uint64_t x = b->gen_seed + 0x9E3779B97F4A7C15ull * (atomic_fetch_add(&b->gen_counter, 1) + 1);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Failures are logged at warn level at most once a second per backend (a dead cluster fails every
 * operation); the others go to debug, and the next warning says how many were held back. */
static void log_failure(kvh_backend *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_failure(kvh_backend *b, const char *fmt, ...) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&b->lock);
    int warn = now.tv_sec > b->last_warn.tv_sec ||
               (b->last_warn.tv_sec == 0 && b->last_warn.tv_nsec == 0);
    uint64_t suppressed = 0;
    if (warn) {
        b->last_warn = now;
        suppressed = b->warns_suppressed;
        b->warns_suppressed = 0;
    } else {
        b->warns_suppressed++;
    }
    pthread_mutex_unlock(&b->lock);
    int32_t level = warn ? KVH_LOG_WARN : KVH_LOG_DEBUG;
    if (!kvh_util_log_enabled(b->host, level)) {
        return;
    }
    char text[768];
    va_list args;
    va_start(args, fmt);
    vsnprintf(text, sizeof text, fmt, args);
    va_end(args);
    if (suppressed > 0) {
        kvh_util_log(b->host, RADOS_TARGET, level, "%s (%" PRIu64 " similar messages in the last second went to debug level)", text,
                 suppressed);
    } else {
        kvh_util_log(b->host, RADOS_TARGET, level, "%s", text);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* The in-flight window                                                                             */
/* ------------------------------------------------------------------------------------------------ */

static struct rop *rop_new(kvh_backend *b, struct ritem *item, enum rop_kind kind, uint32_t part) {
    struct rop *r = calloc(1, sizeof *r);
    if (r != NULL) {
        r->b = b;
        r->item = item;
        r->kind = kind;
        r->part = part;
    }
    return r;
}

static void rop_free(struct rop *r) {
    if (r->owns_oid) {
        free(r->oid);
    }
    free(r);
}

static int rop_is_background(const struct rop *r) {
    return r->kind == ROP_REMOVE || r->kind == ROP_REMOVE_IF;
}

static void rop_callback(rados_completion_t c, void *arg);

/* Adds the writes of a head object to `wop`: the header at 0, then the data at DATA_OFFSET. The OSD
 * then computes no whole-object data digest (a write at 0 covering the object would make it CRC the
 * whole payload on every put; here at most the 128 header bytes of a new object are, and the data write
 * that follows, not at the object's end, drops the digest). Header first rather than data first: the
 * OSD's transaction decoding then copies half as many bytes (measured on memstore: 0.76 instead of 0.83
 * OSD CPU seconds per GB written). The chunk's own CRC32C covers the data. */
static void add_head_writes(rados_write_op_t wop, const struct ritem *it) {
    size_t head_len = (size_t)head_len_of(&it->info);
    rados_write_op_write(wop, (const char *)it->header, HEADER_BYTES, 0);
    if (head_len > 0) {
        rados_write_op_write(wop, (const char *)it->src, head_len, DATA_OFFSET);
    }
}

/* Bytes 32..35 of a head (the header's object count) when its chunk has no stripes: a CAS that also
 * compares them replaces only a head with no stripes to remove, so it needs no read of the old header
 * first. */
#define HEADER_PARTS_OFFSET 32u
static const char ONE_PART[4] = { 1, 0, 0, 0 };

/* Ceph's cmpext answers a mismatch at byte i with -MAX_ERRNO - i (MAX_ERRNO = 4095). */
static int rc_is_cmpext_mismatch(int rc) {
    return rc <= -4095 && rc > -4095 - (int)sizeof ONE_PART;
}

/* Builds and sends one operation. Called with no lock held and an in-flight slot taken. Returns 0, or
 * the negative errno of a submission that failed synchronously: then no callback will fire, and the
 * caller gives the slot back and finishes the operation itself. */
static int submit(struct rop *r) {
    kvh_backend *b = r->b;
    struct ritem *it = r->item;
    int rc = rados_aio_create_completion2(r, rop_callback, &r->c);
    if (rc < 0) {
        return rc;
    }
    switch (r->kind) {
    case ROP_STRIPE_WRITE: {
        uint64_t off = (uint64_t)r->part * it->info.stripe_unit;
        uint64_t len = it->info.length - off < it->info.stripe_unit ? it->info.length - off : it->info.stripe_unit;
        rc = rados_aio_write_full(b->io, r->oid, r->c, (const char *)it->src + off, (size_t)len);
        break;
    }
    case ROP_HEAD_CREATE:
    case ROP_HEAD_CAS:
        r->wop = rados_create_write_op();
        if (r->wop == NULL) {
            rc = -ENOMEM;
            break;
        }
        if (r->kind == ROP_HEAD_CREATE) {
            rados_write_op_create(r->wop, LIBRADOS_CREATE_EXCLUSIVE, NULL);
            add_head_writes(r->wop, it);
        } else {
            uint64_t head_len = head_len_of(&it->info);
            rados_write_op_assert_version(r->wop, it->version);
            if (it->cas_no_stripes) {
                rados_write_op_cmpext(r->wop, ONE_PART, sizeof ONE_PART, HEADER_PARTS_OFFSET, &r->cmp_rval);
            }
            add_head_writes(r->wop, it);
            rados_write_op_truncate(r->wop, head_len > 0 ? DATA_OFFSET + head_len : HEADER_BYTES);
        }
        rc = rados_aio_write_op_operate(r->wop, b->io, r->c, r->oid, NULL, 0);
        break;
    case ROP_HEAD_READ:
    case ROP_GET_HEAD:
        r->rdop = rados_create_read_op();
        if (r->rdop == NULL) {
            rc = -ENOMEM;
            break;
        }
        rados_read_op_read(r->rdop, 0, HEADER_BYTES, (char *)r->header, &r->header_read, &r->header_rval);
        if (r->kind == ROP_GET_HEAD && it->head_read > 0) {
            rados_read_op_read(r->rdop, DATA_OFFSET, it->head_read, (char *)it->dst, &r->bytes_read, &r->read_rval);
        }
        rc = rados_aio_read_op_operate(r->rdop, b->io, r->c, r->oid, 0);
        break;
    case ROP_GET_PART:
        if (r->part == 0) {
            /* The rest of the head's data, when its writer used a larger stripe unit than this reader's
             * first read: only from the very version read first. */
            r->rdop = rados_create_read_op();
            if (r->rdop == NULL) {
                rc = -ENOMEM;
                break;
            }
            rados_read_op_assert_version(r->rdop, it->version);
            rados_read_op_read(r->rdop, DATA_OFFSET + it->head_read, (size_t)(head_len_of(&it->info) - it->head_read),
                               (char *)it->dst + it->head_read, &r->bytes_read, &r->read_rval);
            rc = rados_aio_read_op_operate(r->rdop, b->io, r->c, r->oid, 0);
        } else {
            uint64_t off = (uint64_t)r->part * it->info.stripe_unit;
            uint64_t len = it->info.length - off < it->info.stripe_unit ? it->info.length - off : it->info.stripe_unit;
            rc = rados_aio_read(b->io, r->oid, r->c, (char *)it->dst + off, (size_t)len, 0);
        }
        break;
    case ROP_REMOVE:
        rc = rados_aio_remove(b->io, r->oid, r->c);
        break;
    case ROP_REMOVE_IF:
        r->wop = rados_create_write_op();
        if (r->wop == NULL) {
            rc = -ENOMEM;
            break;
        }
        rados_write_op_assert_version(r->wop, r->version);
        rados_write_op_remove(r->wop);
        rc = rados_aio_write_op_operate(r->wop, b->io, r->c, r->oid, NULL, 0);
        break;
    }
    if (rc < 0) {
        /* Nothing was sent: no callback will fire. */
        rados_aio_release(r->c);
        r->c = NULL;
        if (r->wop != NULL) {
            rados_release_write_op(r->wop);
            r->wop = NULL;
        }
        if (r->rdop != NULL) {
            rados_release_read_op(r->rdop);
            r->rdop = NULL;
        }
    }
    return rc;
}

/* Gives back an in-flight slot and starts queued operations while slots are free. Queued operations
 * that were waiting when an operation timed out fail at once (ERR_SKIPPED); data operations queued
 * while the backend is being destroyed fail with ERR_STOPPING. */
static void slot_release(kvh_backend *b, int slot_held) {
    pthread_mutex_lock(&b->lock);
    if (slot_held) {
        b->in_flight--;
    }
    for (;;) {
        struct rop *r = b->queue_head;
        if (r == NULL || b->in_flight >= b->max_in_flight) {
            break;
        }
        b->queue_head = r->next;
        if (b->queue_head == NULL) {
            b->queue_tail = NULL;
        }
        b->queued--;
        r->next = NULL;
        int rc = 0;
        if (r->epoch < b->timeout_epoch) {
            rc = ERR_SKIPPED;
        } else if (b->stopping && !rop_is_background(r)) {
            rc = ERR_STOPPING;
        } else {
            b->in_flight++;
        }
        pthread_mutex_unlock(&b->lock);
        if (rc == 0) {
            rc = submit(r);
            if (rc < 0) {
                pthread_mutex_lock(&b->lock);
                b->in_flight--;
                pthread_mutex_unlock(&b->lock);
            }
        }
        if (rc < 0) {
            rop_finish(r, rc);
        }
        pthread_mutex_lock(&b->lock);
    }
    pthread_mutex_unlock(&b->lock);
}

/* Sends `r` now if a slot is free, else queues it. Never blocks. */
static void issue(kvh_backend *b, struct rop *r) {
    pthread_mutex_lock(&b->lock);
    b->outstanding++;
    if (b->stopping && !rop_is_background(r)) {
        pthread_mutex_unlock(&b->lock);
        rop_finish(r, ERR_STOPPING);
        return;
    }
    if (b->in_flight < b->max_in_flight && b->queue_head == NULL) {
        b->in_flight++;
        pthread_mutex_unlock(&b->lock);
        int rc = submit(r);
        if (rc < 0) {
            slot_release(b, 1);
            rop_finish(r, rc);
        }
        return;
    }
    r->epoch = b->timeout_epoch;
    r->next = NULL;
    if (b->queue_tail != NULL) {
        b->queue_tail->next = r;
    } else {
        b->queue_head = r;
    }
    b->queue_tail = r;
    b->queued++;
    pthread_mutex_unlock(&b->lock);
}

/* librados' completion callback (its finisher thread). */
static void rop_callback(rados_completion_t c, void *arg) {
    struct rop *r = arg;
    kvh_backend *b = r->b;
    int rc = rados_aio_get_return_value(c);
    r->version = rados_aio_get_version(c);
    rados_aio_release(c);
    r->c = NULL;
    if (r->wop != NULL) {
        rados_release_write_op(r->wop);
        r->wop = NULL;
    }
    if (r->rdop != NULL) {
        rados_release_read_op(r->rdop);
        r->rdop = NULL;
    }
    if (rc == -ETIMEDOUT) {
        pthread_mutex_lock(&b->lock);
        b->timeout_epoch++;
        pthread_mutex_unlock(&b->lock);
    }
    slot_release(b, 1);
    rop_finish(r, rc);
}

/* ------------------------------------------------------------------------------------------------ */
/* Items and batches                                                                                */
/* ------------------------------------------------------------------------------------------------ */

static void batch_free(struct rbatch *batch) {
    for (size_t i = 0; i < batch->n; i++) {
        free(batch->items[i].head);
    }
    pthread_mutex_destroy(&batch->mu);
    free(batch->items);
    free(batch);
}

/* Drops one reference; the last one completes the host's operation (from_submitter: the submitting
 * call's own reference, whose release reports instead whether everything finished synchronously). */
static int batch_release(struct rbatch *batch, int from_submitter) {
    pthread_mutex_lock(&batch->mu);
    int last = --batch->refs == 0;
    pthread_mutex_unlock(&batch->mu);
    if (!last) {
        return 0;
    }
    kvh_backend *b = batch->b;
    kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "%s batch: %zu items, %zu %s", batch->is_put ? "put" : "get", batch->n, batch->ok,
             batch->is_put ? "stored" : "hits");
    if (!from_submitter) {
        kvh_completion done = batch->done;
        batch_free(batch);
        /* No plugin lock is held, and nothing of the host's batch is touched after this. */
        done.complete(done.user_data, KVH_OK, KVH_STR_LIT(""));
    } else {
        batch_free(batch);
    }
    return 1;
}

/* Background removal of an object (a stripe of a replaced, failed or broken chunk). */
static void remove_later(kvh_backend *b, const char *oid_template_head, uint64_t gen, uint32_t part) {
    struct rop *r = rop_new(b, NULL, ROP_REMOVE, part);
    char *oid = stripe_name(oid_template_head, gen, part);
    if (r == NULL || oid == NULL) {
        free(r);
        free(oid);
        return; /* out of memory: the stripe stays behind as garbage (clear removes it) */
    }
    r->oid = oid;
    r->owns_oid = 1;
    issue(b, r);
}

/* Removes stripes 1..parts-1 of generation `gen` of `head`, in the background. Skipped while the
 * backend is being destroyed (they would only delay destroy; clear removes leftovers). */
static void remove_stripes_later(kvh_backend *b, const char *head, uint64_t gen, uint32_t parts) {
    pthread_mutex_lock(&b->lock);
    int stopping = b->stopping;
    pthread_mutex_unlock(&b->lock);
    if (stopping) {
        return;
    }
    for (uint32_t part = 1; part < parts; part++) {
        remove_later(b, head, gen, part);
    }
    atomic_fetch_add(&b->gc_objects, parts > 0 ? parts - 1 : 0);
}

/* Writes the item's result into the host's arrays and drops its reference on the batch. */
static void item_finish(struct ritem *it, kvh_status status) {
    struct rbatch *batch = it->batch;
    kvh_backend *b = batch->b;
    size_t i = it->index;
    it->phase = PH_DONE;
    if (batch->is_put) {
        batch->put->item_status[i] = status;
        if (status == KVH_OK) {
            atomic_fetch_add(&b->puts_ok, 1);
            atomic_fetch_add(&b->bytes_in, it->info.length);
        } else {
            atomic_fetch_add(&b->put_errors, 1);
        }
    } else {
        batch->get->item_status[i] = status;
        if (status == KVH_OK) {
            batch->get->out_len[i] = it->info.length;
            batch->get->out_meta[i] = it->info.meta;
            atomic_fetch_add(&b->gets_hit, 1);
            atomic_fetch_add(&b->bytes_out, it->info.length);
        } else {
            batch->get->out_len[i] = status == KVH_ERR_BUFFER_TOO_SMALL ? it->info.length : 0;
            memset(&batch->get->out_meta[i], 0, sizeof batch->get->out_meta[i]);
            if (status == KVH_ERR_NOT_FOUND || status == KVH_ERR_BUFFER_TOO_SMALL) {
                atomic_fetch_add(&b->gets_miss, status == KVH_ERR_NOT_FOUND);
            } else {
                atomic_fetch_add(&b->get_errors, 1);
            }
        }
    }
    if (status == KVH_ERR_TIMEOUT) {
        atomic_fetch_add(&b->timeouts, 1);
    }
    if (kvh_util_log_enabled(b->host, KVH_LOG_TRACE)) {
        kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_TRACE, "%s key=%.*s object=%s size=%" PRIu64 " -> %s", batch->is_put ? "put" : "get",
                 (int)it->key_len, it->key ? it->key : "", it->head ? it->head : "-", it->info.length,
                 kvh_util_status_name(status));
    }
    pthread_mutex_lock(&batch->mu);
    batch->ok += status == KVH_OK;
    pthread_mutex_unlock(&batch->mu);
    batch_release(batch, 0);
}

/* The status of a failed item, logging the cause. */
static kvh_status item_failure(struct ritem *it, const char *what) {
    kvh_backend *b = it->batch->b;
    if (it->fail != KVH_OK) {
        return it->fail;
    }
    kvh_status status = status_of(it->rc);
    if (status == KVH_ERR_NOT_FOUND && it->batch->is_put) {
        status = KVH_ERR_IO; /* a put's object (or pool) vanished under it: not a miss */
    }
    if (it->rc == ERR_SKIPPED) {
        atomic_fetch_add(&b->skipped, 1);
    }
    if (it->rc == ERR_STOPPING) {
        kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "%s of key %.*s: %s", what, (int)it->key_len, it->key, rc_text(it->rc));
    } else if (status != KVH_ERR_NOT_FOUND) {
        /* head is NULL when naming the object ran out of memory. */
        log_failure(b, "%s of key %.*s (object %s in pool %s): %s -> %s", what, (int)it->key_len, it->key,
                    it->head != NULL ? it->head : "-", b->pool, rc_text(it->rc), kvh_util_status_name(status));
    }
    return status;
}

/* After a failed put: removes the stripes it wrote, unless the failure means the cluster is not
 * answering. Then the removals would only time out too, and the head write may even have been applied
 * before its answer was lost, in which case removing the stripes would break a complete chunk. Stripes
 * left behind are never read (no head names their generation); clear removes them. */
static void put_abandon_stripes(struct ritem *it) {
    if (it->info.parts > 1 && !rc_is_outage(it->rc)) {
        remove_stripes_later(it->batch->b, it->head, it->info.gen, it->info.parts);
    }
}

/* Issues the head operation of a put (create, read or compare-and-swap). */
static void put_issue_head(struct ritem *it, enum rop_kind kind) {
    kvh_backend *b = it->batch->b;
    struct rop *r = rop_new(b, it, kind, 0);
    if (r == NULL) {
        it->rc = -ENOMEM;
        put_abandon_stripes(it);
        item_finish(it, item_failure(it, "put"));
        return;
    }
    r->oid = it->head;
    issue(b, r);
}

static void put_start(struct rbatch *batch, size_t i) {
    kvh_backend *b = batch->b;
    struct ritem *it = &batch->items[i];
    const kvh_key *key = &batch->put->keys[i];
    const kvh_bytes *src = &batch->put->src[i];
    const kvh_chunk_meta *meta = &batch->put->meta[i];
    it->batch = batch;
    it->index = i;
    if (key->canonical.ptr == NULL || key->canonical.len == 0 || key->canonical.len > KEY_MAX ||
        (src->ptr == NULL && src->len > 0) || meta->length != (uint64_t)src->len || meta->ndim > 4) {
        it->fail = KVH_ERR_INVALID_ARG;
        it->key = kvh_util_str_chars(key->canonical);
        it->key_len = key->canonical.ptr != NULL && key->canonical.len <= KEY_MAX ? key->canonical.len : 0;
        log_failure(b, "put item %zu: invalid (key of %zu bytes, src %s with %zu bytes, meta.length %" PRIu64
                       ", ndim %u): keys must be 1 to %u bytes, meta.length must equal the source length, ndim <= 4",
                    i, key->canonical.len, src->ptr == NULL ? "NULL" : "set", src->len, meta->length, meta->ndim,
                    KEY_MAX);
        item_finish(it, KVH_ERR_INVALID_ARG);
        return;
    }
    it->key = key->canonical.ptr;
    it->key_len = key->canonical.len;
    it->src = src->ptr;
    it->info.length = src->len;
    it->info.stripe_unit = b->stripe_unit;
    uint64_t parts = parts_for(it->info.length, b->stripe_unit);
    if (parts > MAX_PARTS) {
        it->fail = KVH_ERR_INVALID_ARG;
        log_failure(b, "put of key %.*s: %" PRIu64 " bytes would take %" PRIu64 " objects of %" PRIu64
                       " bytes (at most %u): raise max_object_bytes",
                    (int)it->key_len, it->key, it->info.length, parts, b->stripe_unit, MAX_PARTS);
        item_finish(it, KVH_ERR_INVALID_ARG);
        return;
    }
    it->info.parts = (uint32_t)parts;
    it->info.gen = next_gen(b);
    it->info.meta = *meta;
    it->info.meta.length = it->info.length;
    if (b->checksum) {
        it->info.flags |= HEADER_FLAG_DATA_CRC;
        it->info.data_crc = crc32c(it->src, (size_t)it->info.length);
    }
    it->head = head_name(b->prefix, b->prefix_len, it->key, it->key_len);
    if (it->head == NULL) {
        it->rc = -ENOMEM;
        item_finish(it, item_failure(it, "put"));
        return;
    }
    header_encode(it->header, &it->info, it->key, it->key_len);

    if (it->info.parts == 1) {
        it->phase = PH_HEAD;
        put_issue_head(it, ROP_HEAD_CREATE);
        return;
    }
    /* Stripes first; the head goes out when the last one has been written. */
    struct rop **rops = calloc(it->info.parts - 1, sizeof *rops);
    int oom = rops == NULL;
    for (uint32_t part = 1; part < it->info.parts && !oom; part++) {
        struct rop *r = rop_new(b, it, ROP_STRIPE_WRITE, part);
        char *oid = stripe_name(it->head, it->info.gen, part);
        if (r == NULL || oid == NULL) {
            free(r);
            free(oid);
            oom = 1;
            break;
        }
        r->oid = oid;
        r->owns_oid = 1;
        rops[part - 1] = r;
    }
    if (oom) {
        for (uint32_t part = 1; rops != NULL && part < it->info.parts; part++) {
            if (rops[part - 1] != NULL) {
                rop_free(rops[part - 1]);
            }
        }
        free(rops);
        it->rc = -ENOMEM;
        item_finish(it, item_failure(it, "put"));
        return;
    }
    it->phase = PH_STRIPES;
    it->parts_left = it->info.parts - 1;
    for (uint32_t part = 1; part < it->info.parts; part++) {
        issue(b, rops[part - 1]);
    }
    free(rops);
}

/* One finished operation of a put. */
static void put_step(struct rop *r, int rc) {
    struct ritem *it = r->item;
    struct rbatch *batch = it->batch;
    kvh_backend *b = batch->b;
    switch (r->kind) {
    case ROP_STRIPE_WRITE: {
        pthread_mutex_lock(&batch->mu);
        if (rc < 0 && it->rc == 0) {
            it->rc = rc;
        }
        int last = --it->parts_left == 0;
        int failed = it->rc != 0;
        pthread_mutex_unlock(&batch->mu);
        if (!last) {
            return;
        }
        if (failed) {
            put_abandon_stripes(it);
            item_finish(it, item_failure(it, "put"));
            return;
        }
        it->phase = PH_HEAD;
        put_issue_head(it, ROP_HEAD_CREATE);
        return;
    }
    case ROP_HEAD_CREATE:
    case ROP_HEAD_CAS: {
        int no_stripes = it->cas_no_stripes;
        it->cas_no_stripes = 0;
        if (rc == 0) {
            if (r->kind == ROP_HEAD_CAS) {
                atomic_fetch_add(&b->replaced, 1);
                atomic_fetch_add(&b->replaced_unread, no_stripes);
                /* no_stripes: the compare proved the old head has none (old_valid is 0 then). */
                if (it->old_valid && it->old.parts > 1 && it->old.gen != it->info.gen) {
                    remove_stripes_later(b, it->head, it->old.gen, it->old.parts);
                }
            }
            item_finish(it, KVH_OK);
            return;
        }
        int mismatch = r->kind == ROP_HEAD_CAS && no_stripes && rc_is_cmpext_mismatch(rc);
        if (r->kind == ROP_HEAD_CAS && no_stripes && rc == -EOPNOTSUPP) {
            /* A pool that cannot compare extents: read the old header from now on. */
            atomic_store(&b->no_cmpext, 1);
            mismatch = 1;
        }
        if (rc == -EEXIST || mismatch ||
            ((rc == -ERANGE || rc == -EOVERFLOW || rc == -ENOENT) && r->kind == ROP_HEAD_CAS)) {
            /* Another version is there (EEXIST), it changed since we learnt its version (ERANGE,
             * EOVERFLOW: the version assertion failed), it names stripes (mismatch), or it was removed
             * since (ENOENT): replace it, read it (again), or create it afresh. An EEXIST answer carries
             * the object's version: a chunk without stripes likely replaces one without stripes, so it
             * tries a CAS on that version which also checks that (one round trip instead of two; a wrong
             * or missing version only makes that CAS fail); a striped one reads the old header first,
             * to know which stripes to remove. */
            if (++it->retries <= CAS_RETRIES) {
                if (rc == -ENOENT) {
                    put_issue_head(it, ROP_HEAD_CREATE);
                } else if (rc == -EEXIST && r->version != 0 && it->info.parts == 1 && !atomic_load(&b->no_cmpext)) {
                    it->version = r->version;
                    it->old_valid = 0;
                    it->cas_no_stripes = 1;
                    put_issue_head(it, ROP_HEAD_CAS);
                } else {
                    put_issue_head(it, ROP_HEAD_READ);
                }
                return;
            }
            it->fail = KVH_ERR_BUSY;
            log_failure(b, "put of key %.*s (object %s): other writers replaced it %d times in a row; gave up",
                        (int)it->key_len, it->key, it->head, CAS_RETRIES);
        } else {
            it->rc = rc;
        }
        put_abandon_stripes(it);
        item_finish(it, item_failure(it, "put"));
        return;
    }
    case ROP_HEAD_READ: {
        if (rc == -ENOENT) {
            if (++it->retries <= CAS_RETRIES) {
                put_issue_head(it, ROP_HEAD_CREATE);
                return;
            }
            it->fail = KVH_ERR_BUSY;
        } else if (rc < 0) {
            it->rc = rc;
        } else if (r->header_rval < 0) {
            it->rc = r->header_rval;
        } else {
            /* Whatever is there (an older version, or not ours at all) is replaced if it is still this
             * version when the write arrives; an older version's stripes are removed afterwards. */
            it->version = r->version;
            it->old_valid = header_decode(r->header, r->header_read, NULL, 0, &it->old) == HEADER_OK;
            put_issue_head(it, ROP_HEAD_CAS);
            return;
        }
        put_abandon_stripes(it);
        item_finish(it, item_failure(it, "put"));
        return;
    }
    default:
        it->rc = -EINVAL;
        item_finish(it, item_failure(it, "put"));
        return;
    }
}

static void get_start(struct rbatch *batch, size_t i) {
    kvh_backend *b = batch->b;
    struct ritem *it = &batch->items[i];
    const kvh_key *key = &batch->get->keys[i];
    const kvh_mut_bytes *dst = &batch->get->dst[i];
    it->batch = batch;
    it->index = i;
    if (key->canonical.ptr == NULL || key->canonical.len == 0 || key->canonical.len > KEY_MAX ||
        (dst->ptr == NULL && dst->len > 0)) {
        it->key = kvh_util_str_chars(key->canonical);
        it->key_len = key->canonical.ptr != NULL && key->canonical.len <= KEY_MAX ? key->canonical.len : 0;
        log_failure(b, "get item %zu: invalid (key of %zu bytes, dst %s with %zu bytes)", i, key->canonical.len,
                    dst->ptr == NULL ? "NULL" : "set", dst->len);
        item_finish(it, KVH_ERR_INVALID_ARG);
        return;
    }
    it->key = key->canonical.ptr;
    it->key_len = key->canonical.len;
    it->dst = dst->ptr;
    it->cap = dst->len;
    it->head_read = (size_t)(it->cap < b->stripe_unit ? it->cap : b->stripe_unit);
    it->head = head_name(b->prefix, b->prefix_len, it->key, it->key_len);
    struct rop *r = it->head != NULL ? rop_new(b, it, ROP_GET_HEAD, 0) : NULL;
    if (r == NULL) {
        it->rc = -ENOMEM;
        item_finish(it, item_failure(it, "get"));
        return;
    }
    r->oid = it->head;
    it->phase = PH_HEAD;
    issue(b, r);
}

/* The end of a get whose parts have all been read (or failed). */
static void get_conclude(struct ritem *it) {
    kvh_backend *b = it->batch->b;
    if (it->missing && it->rc == 0) {
        /* Stripes never come back under the same generation: the chunk is broken for good. Remove it
         * (the head only if it is still the version read), so contains stops reporting it. */
        log_failure(b, "get of key %.*s (object %s): a stripe of generation %016" PRIx64 " is missing or short: "
                       "reported as a miss, removing the broken chunk",
                    (int)it->key_len, it->key, it->head, it->info.gen);
        struct rop *r = rop_new(b, NULL, ROP_REMOVE_IF, 0);
        char *oid = strdup(it->head);
        if (r != NULL && oid != NULL) {
            r->oid = oid;
            r->owns_oid = 1;
            r->version = it->version;
            issue(b, r);
            remove_stripes_later(b, it->head, it->info.gen, it->info.parts);
        } else {
            free(r);
            free(oid);
        }
        item_finish(it, KVH_ERR_NOT_FOUND);
        return;
    }
    if (it->rc != 0 || it->fail != KVH_OK) {
        item_finish(it, item_failure(it, "get"));
        return;
    }
    if ((it->info.flags & HEADER_FLAG_DATA_CRC) != 0 && b->checksum &&
        crc32c(it->dst, (size_t)it->info.length) != it->info.data_crc) {
        atomic_fetch_add(&b->corrupt, 1);
        log_failure(b, "get of key %.*s (object %s, %u objects): data CRC32C mismatch: not served", (int)it->key_len,
                    it->key, it->head, it->info.parts);
        item_finish(it, KVH_ERR_CORRUPT);
        return;
    }
    item_finish(it, KVH_OK);
}

/* One finished operation of a get. */
static void get_step(struct rop *r, int rc) {
    struct ritem *it = r->item;
    struct rbatch *batch = it->batch;
    kvh_backend *b = batch->b;
    if (r->kind == ROP_GET_HEAD) {
        if (rc < 0) {
            it->rc = rc;
            item_finish(it, rc == -ENOENT ? KVH_ERR_NOT_FOUND : item_failure(it, "get"));
            return;
        }
        if (r->header_rval < 0) {
            it->rc = r->header_rval;
            item_finish(it, item_failure(it, "get"));
            return;
        }
        enum header_verdict verdict = header_decode(r->header, r->header_read, it->key, it->key_len, &it->info);
        if (verdict == HEADER_FOREIGN) {
            kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "get of key %.*s: object %s has no header of this format for this key: a miss",
                     (int)it->key_len, it->key, it->head);
            item_finish(it, KVH_ERR_NOT_FOUND);
            return;
        }
        if (verdict == HEADER_CORRUPT) {
            atomic_fetch_add(&b->corrupt, 1);
            log_failure(b, "get of key %.*s: object %s has a damaged header: not served", (int)it->key_len, it->key,
                        it->head);
            item_finish(it, KVH_ERR_CORRUPT);
            return;
        }
        it->version = r->version;
        if (it->info.length > it->cap) {
            item_finish(it, KVH_ERR_BUFFER_TOO_SMALL);
            return;
        }
        uint64_t head_len = it->info.length < it->info.stripe_unit ? it->info.length : it->info.stripe_unit;
        size_t got = it->head_read > 0 ? (r->read_rval < 0 ? 0 : r->bytes_read) : 0;
        if (it->head_read > 0 && r->read_rval < 0) {
            it->rc = r->read_rval;
            item_finish(it, item_failure(it, "get"));
            return;
        }
        uint64_t expect = head_len < it->head_read ? head_len : it->head_read;
        if ((uint64_t)got != expect) {
            atomic_fetch_add(&b->corrupt, 1);
            log_failure(b, "get of key %.*s: object %s holds %zu bytes of data where its header says %" PRIu64 ": not served",
                        (int)it->key_len, it->key, it->head, got, head_len);
            item_finish(it, KVH_ERR_CORRUPT);
            return;
        }
        it->head_read = got;
        uint32_t tail = (uint64_t)got < head_len ? 1u : 0u;
        uint32_t count = tail + it->info.parts - 1;
        if (count == 0) {
            get_conclude(it);
            return;
        }
        struct rop **rops = calloc(count, sizeof *rops);
        int oom = rops == NULL;
        for (uint32_t k = 0; k < count && !oom; k++) {
            uint32_t part = tail ? k : k + 1;
            struct rop *p = rop_new(b, it, ROP_GET_PART, part);
            char *oid = part == 0 ? it->head : stripe_name(it->head, it->info.gen, part);
            if (p == NULL || oid == NULL) {
                free(p);
                if (part != 0) {
                    free(oid);
                }
                oom = 1;
                break;
            }
            p->oid = oid;
            p->owns_oid = part != 0;
            rops[k] = p;
        }
        if (oom) {
            for (uint32_t k = 0; rops != NULL && k < count; k++) {
                if (rops[k] != NULL) {
                    rop_free(rops[k]);
                }
            }
            free(rops);
            it->rc = -ENOMEM;
            item_finish(it, item_failure(it, "get"));
            return;
        }
        it->phase = PH_PARTS;
        it->parts_left = count;
        for (uint32_t k = 0; k < count; k++) {
            issue(b, rops[k]);
        }
        free(rops);
        return;
    }
    /* ROP_GET_PART */
    uint64_t expect;
    if (r->part == 0) {
        uint64_t head_len = it->info.length < it->info.stripe_unit ? it->info.length : it->info.stripe_unit;
        expect = head_len - it->head_read;
    } else {
        uint64_t off = (uint64_t)r->part * it->info.stripe_unit;
        expect = it->info.length - off < it->info.stripe_unit ? it->info.length - off : it->info.stripe_unit;
    }
    int got_rc = r->part == 0 ? (rc < 0 ? rc : (r->read_rval < 0 ? r->read_rval : (int)r->bytes_read)) : rc;
    pthread_mutex_lock(&batch->mu);
    if (got_rc == -ENOENT || got_rc == -ERANGE || got_rc == -EOVERFLOW || (got_rc >= 0 && (uint64_t)got_rc != expect)) {
        /* Absent (removed, replaced, or lost), replaced under us (ERANGE, EOVERFLOW: the head's version
         * changed since its first read), or short. */
        it->missing = 1;
    } else if (got_rc < 0 && it->rc == 0) {
        it->rc = got_rc;
    }
    int last = --it->parts_left == 0;
    pthread_mutex_unlock(&batch->mu);
    if (last) {
        get_conclude(it);
    }
}

/* Dispatches a finished operation, frees it, and lets destroy know when the last one is done. */
static void rop_finish(struct rop *r, int rc) {
    kvh_backend *b = r->b;
    if (r->item == NULL) {
        if (rc < 0 && rc != -ENOENT && rc != -ERANGE && rc != -EOVERFLOW) {
            kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "background removal of object %s: %s", r->oid, rc_text(rc));
        }
    } else if (r->item->batch->is_put) {
        put_step(r, rc);
    } else {
        get_step(r, rc);
    }
    rop_free(r);
    pthread_mutex_lock(&b->lock);
    if (--b->outstanding == 0) {
        pthread_cond_broadcast(&b->idle);
    }
    pthread_mutex_unlock(&b->lock);
}

/* ------------------------------------------------------------------------------------------------ */
/* put / get                                                                                        */
/* ------------------------------------------------------------------------------------------------ */

static struct rbatch *batch_new(kvh_backend *b, size_t n, const char *operation) {
    struct rbatch *batch = calloc(1, sizeof *batch);
    if (batch == NULL || (batch->items = calloc(n, sizeof *batch->items)) == NULL) {
        free(batch);
        kvh_util_set_last_error(b, "rados: %s of %zu items: out of memory", operation, n);
        return NULL;
    }
    if (pthread_mutex_init(&batch->mu, NULL) != 0) {
        free(batch->items);
        free(batch);
        kvh_util_set_last_error(b, "rados: %s: cannot initialise a mutex", operation);
        return NULL;
    }
    batch->b = b;
    batch->n = n;
    batch->refs = n + 1;
    return batch;
}

static int backend_stopping(kvh_backend *b) {
    pthread_mutex_lock(&b->lock);
    int stopping = b->stopping;
    pthread_mutex_unlock(&b->lock);
    return stopping;
}

static kvh_status kr_put(kvh_backend *b, const kvh_put_batch *batch, kvh_completion done) {
    if (b == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(b, "put", "batch");
    }
    if (done.complete == NULL) {
        return kvh_util_null_param(b, "put", "done.complete");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->src == NULL || batch->meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(b, "put", "keys, src, meta or item_status");
    }
    if (backend_stopping(b)) {
        kvh_util_set_last_error(b, "rados: put: the backend is being destroyed");
        return KVH_ERR_CANCELED;
    }
    if (batch->len == 0) {
        return KVH_OK;
    }
    struct rbatch *rb = batch_new(b, batch->len, "put");
    if (rb == NULL) {
        return KVH_ERR_INTERNAL;
    }
    rb->is_put = 1;
    rb->put = batch;
    rb->done = done;
    for (size_t i = 0; i < batch->len; i++) {
        put_start(rb, i);
    }
    /* The batch may have completed already (from librados' thread): it must not be touched now. */
    return batch_release(rb, 1) ? KVH_OK : KVH_PENDING;
}

static kvh_status kr_get(kvh_backend *b, const kvh_get_batch *batch, kvh_completion done) {
    if (b == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(b, "get", "batch");
    }
    if (done.complete == NULL) {
        return kvh_util_null_param(b, "get", "done.complete");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->dst == NULL || batch->out_len == NULL ||
                           batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(b, "get", "keys, dst, out_len, out_meta or item_status");
    }
    if (backend_stopping(b)) {
        kvh_util_set_last_error(b, "rados: get: the backend is being destroyed");
        return KVH_ERR_CANCELED;
    }
    if (batch->len == 0) {
        return KVH_OK;
    }
    struct rbatch *rb = batch_new(b, batch->len, "get");
    if (rb == NULL) {
        return KVH_ERR_INTERNAL;
    }
    rb->get = batch;
    rb->done = done;
    for (size_t i = 0; i < batch->len; i++) {
        get_start(rb, i);
    }
    return batch_release(rb, 1) ? KVH_OK : KVH_PENDING;
}

/* ------------------------------------------------------------------------------------------------ */
/* Synchronous operations: contains, remove, clear                                                  */
/* ------------------------------------------------------------------------------------------------ */

/* One operation waited for by the calling thread (no callback: see the comment at the top). */
struct sop {
    rados_completion_t c;
    rados_read_op_t rdop;
    rados_write_op_t wop;
    uint8_t header[HEADER_BYTES];
    size_t header_read;
    int header_rval;
    uint64_t version; /* the object's version, after sop_wait */
    int rc;
    int sent;
};

static void sop_reset(struct sop *s) {
    if (s->rdop != NULL) {
        rados_release_read_op(s->rdop);
    }
    if (s->wop != NULL) {
        rados_release_write_op(s->wop);
    }
    if (s->c != NULL) {
        rados_aio_release(s->c);
    }
    memset(s, 0, sizeof *s);
}

/* Sends a read of the header record of head object `oid`. */
static void sop_read_header(kvh_backend *b, struct sop *s, const char *oid) {
    sop_reset(s);
    s->rc = rados_aio_create_completion2(NULL, NULL, &s->c);
    if (s->rc < 0) {
        return;
    }
    s->rdop = rados_create_read_op();
    if (s->rdop == NULL) {
        s->rc = -ENOMEM;
        return;
    }
    rados_read_op_read(s->rdop, 0, HEADER_BYTES, (char *)s->header, &s->header_read, &s->header_rval);
    s->rc = rados_aio_read_op_operate(s->rdop, b->io, s->c, oid, 0);
    s->sent = s->rc == 0;
}

/* Sends a removal of `oid`, conditional on its version being `version` unless that is 0. */
static void sop_remove(kvh_backend *b, struct sop *s, const char *oid, uint64_t version) {
    sop_reset(s);
    s->rc = rados_aio_create_completion2(NULL, NULL, &s->c);
    if (s->rc < 0) {
        return;
    }
    if (version == 0) {
        s->rc = rados_aio_remove(b->io, oid, s->c);
    } else {
        s->wop = rados_create_write_op();
        if (s->wop == NULL) {
            s->rc = -ENOMEM;
            return;
        }
        rados_write_op_assert_version(s->wop, version);
        rados_write_op_remove(s->wop);
        s->rc = rados_aio_write_op_operate(s->wop, b->io, s->c, oid, NULL, 0);
    }
    s->sent = s->rc == 0;
}

/* Waits for a sent operation; returns its result (a read's header_rval folded in). */
static int sop_wait(kvh_backend *b, struct sop *s) {
    if (s->sent) {
        rados_aio_wait_for_complete(s->c);
        s->rc = rados_aio_get_return_value(s->c);
        s->version = rados_aio_get_version(s->c);
        s->sent = 0;
        if (s->rc == 0 && s->rdop != NULL && s->header_rval < 0) {
            s->rc = s->header_rval;
        }
        if (s->rc == -ETIMEDOUT) {
            pthread_mutex_lock(&b->lock);
            b->timeout_epoch++;
            pthread_mutex_unlock(&b->lock);
        }
    }
    return s->rc;
}

static size_t window_of(const kvh_backend *b, size_t remaining) {
    return remaining < b->max_in_flight ? remaining : b->max_in_flight;
}

static kvh_status kr_contains(kvh_backend *b, const kvh_contains_batch *batch) {
    if (b == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(b, "contains", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(b, "contains", "keys, out_meta or item_status");
    }
    size_t n = batch->len;
    struct sop *sops = calloc(n > 0 ? window_of(b, n) : 1, sizeof *sops);
    char **names = calloc(n > 0 ? window_of(b, n) : 1, sizeof *names);
    if (sops == NULL || names == NULL) {
        free(sops);
        free(names);
        kvh_util_set_last_error(b, "rados: contains of %zu keys: out of memory", n);
        return KVH_ERR_INTERNAL;
    }
    size_t present = 0;
    int outage = 0; /* a failure that means the cluster is not answering: the rest fail fast */
    kvh_status outage_status = KVH_OK;
    for (size_t start = 0; start < n; start += window_of(b, n - start)) {
        size_t w = window_of(b, n - start);
        for (size_t k = 0; k < w; k++) {
            size_t i = start + k;
            const kvh_key *key = &batch->keys[i];
            memset(&batch->out_meta[i], 0, sizeof batch->out_meta[i]);
            batch->item_status[i] = KVH_ERR_NO_RESULT;
            if (key->canonical.ptr == NULL || key->canonical.len == 0 || key->canonical.len > KEY_MAX) {
                batch->item_status[i] = KVH_ERR_INVALID_ARG;
                continue;
            }
            if (outage) {
                batch->item_status[i] = outage_status;
                continue;
            }
            names[k] = head_name(b->prefix, b->prefix_len, key->canonical.ptr, key->canonical.len);
            if (names[k] == NULL) {
                batch->item_status[i] = KVH_ERR_INTERNAL;
                continue;
            }
            sop_read_header(b, &sops[k], names[k]);
        }
        for (size_t k = 0; k < w; k++) {
            size_t i = start + k;
            if (batch->item_status[i] != KVH_ERR_NO_RESULT) {
                continue;
            }
            const kvh_key *key = &batch->keys[i];
            int rc = sop_wait(b, &sops[k]);
            kvh_status status;
            if (rc == -ENOENT) {
                status = KVH_ERR_NOT_FOUND;
            } else if (rc < 0) {
                int err = rc;
                status = status_of(err);
                log_failure(b, "contains of key %.*s (object %s in pool %s): %s -> %s", kvh_util_str_precision(key->canonical),
                            kvh_util_str_chars(key->canonical), names[k], b->pool, rc_text(err), kvh_util_status_name(status));
                if (rc_is_outage(err) && !outage) {
                    outage = 1;
                    outage_status = status;
                }
            } else {
                struct chunk_info info;
                enum header_verdict verdict = header_decode(sops[k].header, sops[k].header_read, key->canonical.ptr,
                                                            key->canonical.len, &info);
                if (verdict == HEADER_OK) {
                    batch->out_meta[i] = info.meta;
                    status = KVH_OK;
                    present++;
                } else if (verdict == HEADER_FOREIGN) {
                    status = KVH_ERR_NOT_FOUND;
                } else {
                    status = KVH_ERR_CORRUPT;
                    atomic_fetch_add(&b->corrupt, 1);
                    log_failure(b, "contains of key %.*s: object %s has a damaged header",
                                kvh_util_str_precision(key->canonical), kvh_util_str_chars(key->canonical), names[k]);
                }
            }
            batch->item_status[i] = status;
            if (kvh_util_log_enabled(b->host, KVH_LOG_TRACE)) {
                kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_TRACE, "contains key=%.*s object=%s -> %s", kvh_util_str_precision(key->canonical),
                         kvh_util_str_chars(key->canonical), names[k], kvh_util_status_name(status));
            }
        }
        for (size_t k = 0; k < w; k++) {
            sop_reset(&sops[k]);
            free(names[k]);
            names[k] = NULL;
        }
    }
    free(sops);
    free(names);
    kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "contains: %zu keys, %zu present%s", n, present,
             outage ? " (the cluster stopped answering: the rest were not asked)" : "");
    return KVH_OK;
}

/* Removes objects (ENOENT is fine), max_in_flight at a time; returns how many could not be removed. */
static size_t remove_objects_sync(kvh_backend *b, char **names, size_t count) {
    size_t failed = 0;
    struct sop *sops = calloc(window_of(b, count > 0 ? count : 1), sizeof *sops);
    if (sops == NULL) {
        return count;
    }
    for (size_t start = 0; start < count; start += window_of(b, count - start)) {
        size_t w = window_of(b, count - start);
        for (size_t k = 0; k < w; k++) {
            sop_remove(b, &sops[k], names[start + k], 0);
        }
        for (size_t k = 0; k < w; k++) {
            int rc = sop_wait(b, &sops[k]);
            if (rc < 0 && rc != -ENOENT) {
                failed++;
                kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "remove: object %s: %s (left behind; clear removes it)",
                         names[start + k], rc_text(rc));
            }
            sop_reset(&sops[k]);
        }
    }
    free(sops);
    return failed;
}

/* State of one key during remove. */
struct rm_state {
    char *head;
    uint64_t version; /* of the head, when read */
    struct chunk_info info;
    int valid;
    int stage; /* RM_READ, RM_REMOVE, RM_DONE */
    int retries;
    kvh_status status;
};

enum { RM_READ, RM_REMOVE, RM_DONE };

/* Reads each head's header and version, removes the head if it is still that version (so a concurrent
 * put's newer version is never half-removed), then removes the stripes of the removed generation. */
static kvh_status kr_remove(kvh_backend *b, const kvh_key_batch *batch, bool force) {
    (void)force; /* no pins: nothing to force */
    if (b == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(b, "remove", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(b, "remove", "keys or item_status");
    }
    size_t n = batch->len;
    size_t cap = n > 0 ? window_of(b, n) : 1;
    struct sop *sops = calloc(cap, sizeof *sops);
    struct rm_state *st = calloc(cap, sizeof *st);
    if (sops == NULL || st == NULL) {
        free(sops);
        free(st);
        kvh_util_set_last_error(b, "rados: remove of %zu keys: out of memory", n);
        return KVH_ERR_INTERNAL;
    }
    size_t removed = 0;
    int outage = 0;
    kvh_status outage_status = KVH_OK;
    for (size_t start = 0; start < n; start += window_of(b, n - start)) {
        size_t w = window_of(b, n - start);
        for (size_t k = 0; k < w; k++) {
            const kvh_key *key = &batch->keys[start + k];
            memset(&st[k], 0, sizeof st[k]);
            st[k].stage = RM_DONE;
            if (key->canonical.ptr == NULL || key->canonical.len == 0 || key->canonical.len > KEY_MAX) {
                st[k].status = KVH_ERR_INVALID_ARG;
            } else if (outage) {
                st[k].status = outage_status;
            } else if ((st[k].head = head_name(b->prefix, b->prefix_len, key->canonical.ptr, key->canonical.len)) == NULL) {
                st[k].status = KVH_ERR_INTERNAL;
            } else {
                st[k].stage = RM_READ;
            }
        }
        /* Rounds: every key still in progress sends its next operation, then all are waited for. */
        for (int busy = 1; busy;) {
            busy = 0;
            for (size_t k = 0; k < w; k++) {
                if (st[k].stage == RM_READ) {
                    sop_read_header(b, &sops[k], st[k].head);
                } else if (st[k].stage == RM_REMOVE) {
                    sop_remove(b, &sops[k], st[k].head, st[k].version);
                }
            }
            for (size_t k = 0; k < w; k++) {
                const kvh_key *key = &batch->keys[start + k];
                int stage = st[k].stage;
                if (stage == RM_DONE) {
                    continue;
                }
                int rc = sop_wait(b, &sops[k]);
                int changed = rc == -ERANGE || rc == -EOVERFLOW; /* the version assertion failed */
                if (stage == RM_READ && rc == 0) {
                    /* Not ours (no valid header): still removed, it is under this backend's name. */
                    st[k].valid = header_decode(sops[k].header, sops[k].header_read, NULL, 0, &st[k].info) == HEADER_OK;
                    st[k].version = sops[k].version;
                    st[k].stage = RM_REMOVE;
                } else if (stage == RM_REMOVE && rc == 0) {
                    st[k].status = KVH_OK;
                    st[k].stage = RM_DONE;
                } else if (stage == RM_REMOVE && changed && ++st[k].retries <= CAS_RETRIES) {
                    st[k].stage = RM_READ; /* replaced since it was read: read it again */
                } else if (rc == -ENOENT) {
                    st[k].status = KVH_ERR_NOT_FOUND; /* not there, or removed by someone else meanwhile */
                    st[k].stage = RM_DONE;
                } else {
                    st[k].status = changed ? KVH_ERR_BUSY : status_of(rc);
                    st[k].stage = RM_DONE;
                    log_failure(b, "remove of key %.*s (object %s): %s -> %s", kvh_util_str_precision(key->canonical),
                                kvh_util_str_chars(key->canonical), st[k].head,
                                changed ? "replaced by other writers on every attempt" : rc_text(rc),
                                kvh_util_status_name(st[k].status));
                    if (rc_is_outage(rc) && !outage) {
                        outage = 1;
                        outage_status = st[k].status;
                    }
                }
                busy = busy || st[k].stage != RM_DONE;
            }
        }
        /* Stripes of the removed heads: the chunks are already invisible, this only frees their space. */
        size_t stripes = 0;
        for (size_t k = 0; k < w; k++) {
            if (st[k].status == KVH_OK && st[k].valid) {
                stripes += st[k].info.parts - 1;
            }
        }
        char **names = stripes > 0 ? calloc(stripes, sizeof *names) : NULL;
        size_t named = 0;
        for (size_t k = 0; k < w && names != NULL; k++) {
            for (uint32_t part = 1; st[k].status == KVH_OK && st[k].valid && part < st[k].info.parts; part++) {
                if ((names[named] = stripe_name(st[k].head, st[k].info.gen, part)) != NULL) {
                    named++;
                }
            }
        }
        if (named < stripes) {
            kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_WARN, "remove: out of memory: %zu stripes left behind (clear removes them)",
                     stripes - named);
        }
        remove_objects_sync(b, names, named);
        for (size_t k = 0; k < named; k++) {
            free(names[k]);
        }
        free(names);
        for (size_t k = 0; k < w; k++) {
            batch->item_status[start + k] = st[k].status;
            removed += st[k].status == KVH_OK;
            if (kvh_util_log_enabled(b->host, KVH_LOG_TRACE)) {
                const kvh_key *key = &batch->keys[start + k];
                kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_TRACE, "remove key=%.*s -> %s", kvh_util_str_precision(key->canonical),
                         kvh_util_str_chars(key->canonical), kvh_util_status_name(st[k].status));
            }
            free(st[k].head);
            st[k].head = NULL;
            sop_reset(&sops[k]);
        }
    }
    free(sops);
    free(st);
    kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "remove: %zu keys, %zu removed%s", n, removed,
             outage ? " (the cluster stopped answering: the rest were not asked)" : "");
    return KVH_OK;
}

/* Removes every object of this backend: all names starting with object_prefix in the pool's namespace. */
static kvh_status kr_clear(kvh_backend *b) {
    if (b == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    rados_list_ctx_t list = NULL;
    int rc = rados_nobjects_list_open(b->io, &list);
    if (rc < 0) {
        kvh_util_set_last_error(b, "rados: clear: cannot list pool %s namespace '%s': %s", b->pool, b->nspace, rc_text(rc));
        return status_of(rc);
    }
    size_t w = b->max_in_flight;
    struct sop *sops = calloc(w, sizeof *sops);
    char **names = calloc(w, sizeof *names);
    if (sops == NULL || names == NULL) {
        free(sops);
        free(names);
        rados_nobjects_list_close(list);
        kvh_util_set_last_error(b, "rados: clear: out of memory");
        return KVH_ERR_INTERNAL;
    }
    size_t removed = 0;
    size_t used = 0;
    int failed = 0;
    int list_rc = 0;
    for (int listing = 1; listing || used > 0;) {
        if (listing && used < w) {
            const char *entry = NULL;
            list_rc = rados_nobjects_list_next(list, &entry, NULL, NULL);
            if (list_rc == -ENOENT) {
                listing = 0;
                list_rc = 0;
            } else if (list_rc < 0) {
                listing = 0;
            } else if (entry != NULL && strncmp(entry, b->prefix, b->prefix_len) == 0) {
                names[used] = strdup(entry);
                if (names[used] == NULL) {
                    list_rc = -ENOMEM;
                    listing = 0;
                } else {
                    sop_remove(b, &sops[used], names[used], 0);
                    used++;
                }
            }
            if (listing && used < w) {
                continue;
            }
        }
        for (size_t k = 0; k < used; k++) {
            int r = sop_wait(b, &sops[k]);
            if (r == 0) {
                removed++;
            } else if (r != -ENOENT && failed++ == 0) {
                kvh_util_set_last_error(b, "rados: clear: removing object %s from pool %s: %s", names[k], b->pool, rc_text(r));
                rc = r;
            }
            sop_reset(&sops[k]);
            free(names[k]);
            names[k] = NULL;
        }
        used = 0;
    }
    rados_nobjects_list_close(list);
    free(sops);
    free(names);
    if (list_rc < 0) {
        kvh_util_set_last_error(b, "rados: clear: listing pool %s namespace '%s' failed after %zu objects removed: %s", b->pool,
                       b->nspace, removed, rc_text(list_rc));
        return status_of(list_rc);
    }
    if (failed > 0) {
        kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_WARN, "clear: %zu objects removed, %d could not be removed", removed, failed);
        return status_of(rc);
    }
    kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_DEBUG, "clear: %zu objects removed from pool %s namespace '%s' (prefix '%s')", removed,
             b->pool, b->nspace, b->prefix);
    return KVH_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* health                                                                                           */
/* ------------------------------------------------------------------------------------------------ */

/* A stat of a name no chunk uses: ENOENT from the OSD proves the whole path works. Probes that outlive
 * their health call are kept here until they complete (their output fields must stay valid). */
struct probe {
    struct probe *next;
    rados_completion_t c;
    uint64_t size;
    time_t mtime;
};

static void probes_reap(kvh_backend *b, int wait) {
    pthread_mutex_lock(&b->lock);
    struct probe **link = &b->probes;
    while (*link != NULL) {
        struct probe *p = *link;
        if (!wait && !rados_aio_is_complete(p->c)) {
            link = &p->next;
            continue;
        }
        *link = p->next;
        pthread_mutex_unlock(&b->lock);
        rados_aio_wait_for_complete(p->c);
        rados_aio_release(p->c);
        free(p);
        pthread_mutex_lock(&b->lock);
        link = &b->probes;
    }
    pthread_mutex_unlock(&b->lock);
}

/* ABI 1.3 stats: the counters health prints, as numbers; no I/O. A shared pool has no capacity or
 * entry count of this instance's own, so neither is reported. */
static kvh_status kr_stats(kvh_backend *b, kvh_stats_buf *out) {
    if (b == NULL || out == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    pthread_mutex_lock(&b->lock);
    uint64_t in_flight = b->in_flight;
    uint64_t queued = b->queued;
    pthread_mutex_unlock(&b->lock);
    kvh_util_stats_begin(out);
    kvh_util_stat(out, "puts_ok", KVH_STAT_COUNTER, atomic_load(&b->puts_ok));
    kvh_util_stat(out, "put_errors", KVH_STAT_COUNTER, atomic_load(&b->put_errors));
    kvh_util_stat(out, "gets_hit", KVH_STAT_COUNTER, atomic_load(&b->gets_hit));
    kvh_util_stat(out, "gets_miss", KVH_STAT_COUNTER, atomic_load(&b->gets_miss));
    kvh_util_stat(out, "get_errors", KVH_STAT_COUNTER, atomic_load(&b->get_errors));
    kvh_util_stat(out, "corrupt", KVH_STAT_COUNTER, atomic_load(&b->corrupt));
    kvh_util_stat(out, "timeouts", KVH_STAT_COUNTER, atomic_load(&b->timeouts));
    kvh_util_stat(out, "bytes_in", KVH_STAT_COUNTER, atomic_load(&b->bytes_in));
    kvh_util_stat(out, "bytes_out", KVH_STAT_COUNTER, atomic_load(&b->bytes_out));
    kvh_util_stat(out, "gc_objects", KVH_STAT_COUNTER, atomic_load(&b->gc_objects));
    kvh_util_stat(out, "in_flight", KVH_STAT_GAUGE, in_flight);
    kvh_util_stat(out, "queued", KVH_STAT_GAUGE, queued);
    return kvh_util_stats_end(out);
}

static kvh_status kr_health(kvh_backend *b, kvh_message_buf message) {
    if (b == NULL) {
        kvh_util_write_message(message, "rados: backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    probes_reap(b, 0);
    struct probe *p = calloc(1, sizeof *p);
    char *oid = malloc(b->prefix_len + sizeof "#health");
    int rc = p == NULL || oid == NULL ? -ENOMEM : rados_aio_create_completion2(NULL, NULL, &p->c);
    double started = now_s();
    if (rc == 0) {
        memcpy(oid, b->prefix, b->prefix_len);
        memcpy(oid + b->prefix_len, "#health", sizeof "#health");
        rc = rados_aio_stat(b->io, oid, p->c, &p->size, &p->mtime);
        if (rc < 0) {
            rados_aio_release(p->c);
            p->c = NULL;
        }
    }
    free(oid);
    int answered = 0;
    if (rc == 0) {
        double wait = b->op_timeout_s < HEALTH_WAIT_MAX_S ? b->op_timeout_s : HEALTH_WAIT_MAX_S;
        while (!(answered = rados_aio_is_complete(p->c)) && now_s() - started < wait) {
            struct timespec pause = { 0, 1000000 };
            nanosleep(&pause, NULL);
        }
        if (answered) {
            rc = rados_aio_get_return_value(p->c);
            rados_aio_release(p->c);
            free(p);
        } else {
            pthread_mutex_lock(&b->lock);
            p->next = b->probes;
            b->probes = p;
            pthread_mutex_unlock(&b->lock);
            rc = -ETIMEDOUT;
        }
    } else {
        free(p);
    }
    double ms = (now_s() - started) * 1e3;
    pthread_mutex_lock(&b->lock);
    unsigned in_flight = b->in_flight;
    size_t queued = b->queued;
    pthread_mutex_unlock(&b->lock);
    char counters[384];
    snprintf(counters, sizeof counters,
             "%u in flight, %zu queued; puts %" PRIu64 " ok / %" PRIu64 " failed, gets %" PRIu64 " hits / %" PRIu64
             " misses / %" PRIu64 " failed, %" PRIu64 " timeouts, %" PRIu64 " corrupt",
             in_flight, queued, (uint64_t)atomic_load(&b->puts_ok), (uint64_t)atomic_load(&b->put_errors),
             (uint64_t)atomic_load(&b->gets_hit), (uint64_t)atomic_load(&b->gets_miss),
             (uint64_t)atomic_load(&b->get_errors), (uint64_t)atomic_load(&b->timeouts),
             (uint64_t)atomic_load(&b->corrupt));
    if (rc == 0 || rc == -ENOENT) {
        kvh_util_write_message(message, "rados: pool %s namespace '%s' on %s (mon_host %s) answers in %.1f ms; %s", b->pool,
                      b->nspace, b->cluster_name, b->mon_host, ms, counters);
        return KVH_OK;
    }
    kvh_status status = rc == -ETIMEDOUT ? KVH_ERR_UNAVAILABLE : status_of(rc);
    kvh_util_write_message(message, "rados: pool %s namespace '%s' on %s (mon_host %s) as %s: probe failed after %.1f ms: %s; %s",
                  b->pool, b->nspace, b->cluster_name, b->mon_host, b->user, ms, rc_text(rc), counters);
    return status;
}

static size_t kr_last_error(kvh_backend *b, char *buf, size_t cap) {
    return kvh_util_last_error(b, buf, cap);
}

/* ------------------------------------------------------------------------------------------------ */
/* Options                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

enum rados_option {
    OPT_POOL,
    OPT_NAMESPACE,
    OPT_CONF,
    OPT_CLUSTER,
    OPT_USER,
    OPT_KEYRING,
    OPT_KEY,
    OPT_OBJECT_PREFIX,
    OPT_OP_TIMEOUT_S,
    OPT_MAX_OBJECT_BYTES,
    OPT_MAX_IN_FLIGHT,
    OPT_CHECKSUM,
    OPT_COUNT
};

static const kvh_option_spec RADOS_OPTIONS[OPT_COUNT] = {
    [OPT_POOL] = { "pool", NULL, "RADOS pool holding the chunks (it must exist).", KVH_OPTION_REQUIRED, 0 },
    [OPT_NAMESPACE] = { "namespace", "", "RADOS namespace inside the pool (empty: the default namespace).", 0, 0 },
    [OPT_CONF] = { "conf", "",
                   "Path of ceph.conf (empty: $CEPH_CONF, /etc/ceph/$cluster.conf, ~/.ceph/$cluster.conf, "
                   "./$cluster.conf).",
                   0, 0 },
    [OPT_CLUSTER] = { "cluster", "ceph", "Cluster name ($cluster in the configuration search path).", 0, 0 },
    [OPT_USER] = { "user", "admin", "cephx user id (client.<user>).", 0, 0 },
    [OPT_KEYRING] = { "keyring", "", "Path of the keyring holding client.<user>'s key (empty: from ceph.conf).", 0, 0 },
    [OPT_KEY] = { "key", NULL, "client.<user>'s cephx secret, base64 (instead of a keyring file).", KVH_OPTION_SECRET, 0 },
    [OPT_OBJECT_PREFIX] = { "object_prefix", "kvh/",
                            "Prefix of every object name; clear removes every object with it in the namespace.", 0, 0 },
    [OPT_OP_TIMEOUT_S] = { "op_timeout_s", "10",
                           "Seconds before any RADOS operation (and connecting) fails: rados_osd_op_timeout, "
                           "rados_mon_op_timeout, client_mount_timeout.",
                           0, 0 },
    [OPT_MAX_OBJECT_BYTES] = { "max_object_bytes", "4194304",
                               "Largest object written; bigger chunks are striped over several objects.", 0, 0 },
    [OPT_MAX_IN_FLIGHT] = { "max_in_flight", "16",
                            "RADOS operations in flight per backend; more are queued in order.", 0, 0 },
    /* Default false: RADOS already CRCs every byte on the wire and BlueStore at rest (see README). */
    [OPT_CHECKSUM] = { "checksum", "false",
                       "true: store a CRC32C of every chunk's data and verify it on get (RADOS' own wire and "
                       "BlueStore checksums are relied on otherwise).",
                       0, 0 },
};

struct rados_config {
    const char *text[OPT_COUNT]; /* NUL-terminated copies (owned), or NULL when not given */
    uint64_t op_timeout_s;
    uint64_t max_object_bytes;
    uint64_t max_in_flight;
    int checksum;
};

static void config_free(struct rados_config *config) {
    for (size_t i = 0; i < OPT_COUNT; i++) {
        free((char *)config->text[i]);
        config->text[i] = NULL;
    }
}

static int parse_u64(const char *text, uint64_t *out) {
    if (text == NULL || *text == '\0') {
        return -1;
    }
    uint64_t value = 0;
    for (const char *c = text; *c != '\0'; c++) {
        unsigned digit = (unsigned)(unsigned char)*c - '0';
        if (digit > 9 || value > (UINT64_MAX - digit) / 10) {
            return -1;
        }
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

static int printable(const char *text, int allow_space) {
    for (const unsigned char *c = (const unsigned char *)text; *c != '\0'; c++) {
        if (*c < 0x20 || *c == 0x7F || (!allow_space && *c == ' ')) {
            return 0;
        }
    }
    return 1;
}

/* Reads the options (defaults first). Returns 0, or -1 with the reason in `error`. */
static int parse_options(const kvh_options *options, struct rados_config *config, kvh_message_buf error) {
    memset(config, 0, sizeof *config);
    for (size_t opt = 0; opt < OPT_COUNT; opt++) {
        if (RADOS_OPTIONS[opt].default_value != NULL) {
            config->text[opt] = strdup(RADOS_OPTIONS[opt].default_value);
            if (config->text[opt] == NULL) {
                kvh_util_write_message(error, "rados: out of memory");
                return -1;
            }
        }
    }
    for (size_t i = 0; i < options->len; i++) {
        const kvh_option *option = &options->items[i];
        size_t opt = 0;
        while (opt < OPT_COUNT && !kvh_util_str_equals(option->key, RADOS_OPTIONS[opt].key)) {
            opt++;
        }
        if (opt == OPT_COUNT) {
            kvh_util_write_message(error, "rados: unknown option '%.*s'", kvh_util_str_precision(option->key), kvh_util_str_chars(option->key));
            return -1;
        }
        if (option->value.ptr == NULL && option->value.len > 0) {
            kvh_util_write_message(error, "rados: option '%s' has a NULL value", RADOS_OPTIONS[opt].key);
            return -1;
        }
        if (option->value.len > 4096 || (option->value.len > 0 && memchr(option->value.ptr, '\0', option->value.len))) {
            kvh_util_write_message(error, "rados: option '%s' is longer than 4096 bytes or contains a NUL byte",
                          RADOS_OPTIONS[opt].key);
            return -1;
        }
        char *copy = malloc(option->value.len + 1);
        if (copy == NULL) {
            kvh_util_write_message(error, "rados: out of memory");
            return -1;
        }
        if (option->value.len > 0) {
            memcpy(copy, option->value.ptr, option->value.len);
        }
        copy[option->value.len] = '\0';
        free((char *)config->text[opt]);
        config->text[opt] = copy;
    }
    const char *pool = config->text[OPT_POOL];
    if (pool == NULL || *pool == '\0' || strlen(pool) > 256 || !printable(pool, 0)) {
        kvh_util_write_message(error, "rados: option 'pool' is required: the name of an existing RADOS pool (1 to 256 printable "
                             "characters, no spaces)");
        return -1;
    }
    if (strlen(config->text[OPT_NAMESPACE]) > 256 || !printable(config->text[OPT_NAMESPACE], 0)) {
        kvh_util_write_message(error, "rados: invalid value '%s' for option 'namespace' (at most 256 printable characters, no "
                             "spaces)",
                      config->text[OPT_NAMESPACE]);
        return -1;
    }
    const char *cluster = config->text[OPT_CLUSTER];
    int cluster_ok = *cluster != '\0' && strlen(cluster) <= 64;
    for (const char *c = cluster; *c != '\0'; c++) {
        cluster_ok = cluster_ok && ((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                                    *c == '-' || *c == '_');
    }
    if (!cluster_ok) {
        kvh_util_write_message(error, "rados: invalid value '%s' for option 'cluster' (1 to 64 of A-Z a-z 0-9 - _)", cluster);
        return -1;
    }
    const char *user = config->text[OPT_USER];
    if (strncmp(user, "client.", 7) == 0) {
        user += 7;
    }
    if (*user == '\0' || strlen(user) > 128 || !printable(user, 0)) {
        kvh_util_write_message(error, "rados: invalid value '%s' for option 'user' (a cephx client id such as admin or kvhost)",
                      config->text[OPT_USER]);
        return -1;
    }
    const char *prefix = config->text[OPT_OBJECT_PREFIX];
    int prefix_ok = strlen(prefix) <= PREFIX_MAX;
    for (const unsigned char *c = (const unsigned char *)prefix; *c != '\0'; c++) {
        prefix_ok = prefix_ok && *c > 0x20 && *c < 0x7F && *c != '#' && *c != '~' && *c != '%';
    }
    if (!prefix_ok) {
        kvh_util_write_message(error, "rados: invalid value '%s' for option 'object_prefix' (at most %u printable ASCII "
                             "characters without spaces, '#', '~' or '%%')",
                      prefix, PREFIX_MAX);
        return -1;
    }
    static const struct {
        size_t opt;
        uint64_t min;
        uint64_t max;
    } RANGES[] = {
        { OPT_OP_TIMEOUT_S, 1, 3600 },
        { OPT_MAX_OBJECT_BYTES, 4096, 128u << 20 },
        { OPT_MAX_IN_FLIGHT, 1, 1024 },
    };
    uint64_t *targets[] = { &config->op_timeout_s, &config->max_object_bytes, &config->max_in_flight };
    for (size_t k = 0; k < sizeof RANGES / sizeof RANGES[0]; k++) {
        const char *text = config->text[RANGES[k].opt];
        uint64_t value = 0;
        if (parse_u64(text, &value) != 0 || value < RANGES[k].min || value > RANGES[k].max) {
            kvh_util_write_message(error, "rados: invalid value '%s' for option '%s' (expected an integer from %" PRIu64 " to %" PRIu64 ")",
                          text, RADOS_OPTIONS[RANGES[k].opt].key, RANGES[k].min, RANGES[k].max);
            return -1;
        }
        *targets[k] = value;
    }
    const char *checksum = config->text[OPT_CHECKSUM];
    if (strcmp(checksum, "true") == 0 || strcmp(checksum, "1") == 0) {
        config->checksum = 1;
    } else if (strcmp(checksum, "false") == 0 || strcmp(checksum, "0") == 0) {
        config->checksum = 0;
    } else {
        kvh_util_write_message(error, "rados: invalid value '%s' for option 'checksum' (expected true or false)", checksum);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* create / destroy                                                                                 */
/* ------------------------------------------------------------------------------------------------ */

static uint64_t random_seed(uint64_t mix) {
    uint64_t seed = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t got = read(fd, &seed, sizeof seed);
        (void)got; /* on failure the seed is still mixed from time, pid and the client id below */
        close(fd);
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return seed ^ mix ^ ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16);
}

/* Sets a librados option to max(current, wanted) for the numeric options that bound in-flight work.
 * Returns 0 or librados' error. */
static int conf_at_least(rados_t cluster, const char *option, uint64_t wanted) {
    char current[64];
    uint64_t value = 0;
    if (rados_conf_get(cluster, option, current, sizeof current) == 0 && parse_u64(current, &value) == 0 &&
        value >= wanted) {
        return 0;
    }
    char text[32];
    snprintf(text, sizeof text, "%" PRIu64, wanted);
    return rados_conf_set(cluster, option, text);
}

static void backend_free(kvh_backend *b) {
    free(b->cluster_name);
    free(b->user);
    free(b->mon_host);
    free(b->pool);
    free(b->nspace);
    free(b->prefix);
    free(b);
}

static kvh_status kr_create(const kvh_host_api *host, const kvh_options *options, const kvh_model_metadata *metadata,
                               kvh_backend **out_backend, kvh_message_buf error) {
    (void)metadata; /* chunks are opaque bytes */
    if (out_backend == NULL) {
        kvh_util_write_message(error, "rados: create: out_backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    *out_backend = NULL;
    if (host == NULL || options == NULL || (options->items == NULL && options->len > 0)) {
        kvh_util_write_message(error, "rados: create: host or options is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    if (host->abi_major != KVH_ABI_MAJOR || host->struct_size < KVH_HOST_API_V1_0_SIZE) {
        kvh_util_write_message(error, "rados: create: host API %u (size %u) is not compatible with ABI %d", (unsigned)host->abi_major,
                      (unsigned)host->struct_size, KVH_ABI_MAJOR);
        return KVH_ERR_ABI_MISMATCH;
    }
    struct rados_config config;
    if (parse_options(options, &config, error) != 0) {
        config_free(&config);
        return KVH_ERR_INVALID_CONFIG;
    }
    kvh_backend *b = calloc(1, sizeof *b);
    const char *id = config.text[OPT_USER];
    if (strncmp(id, "client.", 7) == 0) {
        id += 7;
    }
    size_t user_len = strlen(id) + sizeof "client.";
    if (b != NULL) {
        b->host = host;
        b->user = malloc(user_len);
        b->cluster_name = strdup(config.text[OPT_CLUSTER]);
        b->pool = strdup(config.text[OPT_POOL]);
        b->nspace = strdup(config.text[OPT_NAMESPACE]);
        b->prefix = strdup(config.text[OPT_OBJECT_PREFIX]);
    }
    if (b == NULL || b->user == NULL || b->cluster_name == NULL || b->pool == NULL || b->nspace == NULL ||
        b->prefix == NULL) {
        kvh_util_write_message(error, "rados: create: out of memory");
        if (b != NULL) {
            backend_free(b);
        }
        config_free(&config);
        return KVH_ERR_INTERNAL;
    }
    snprintf(b->user, user_len, "client.%s", id);
    b->prefix_len = strlen(b->prefix);
    b->stripe_unit = config.max_object_bytes;
    b->max_in_flight = (unsigned)config.max_in_flight;
    b->op_timeout_s = (unsigned)config.op_timeout_s;
    b->checksum = config.checksum;

    const char *conf = config.text[OPT_CONF];
    int rc = rados_create2(&b->cluster, b->cluster_name, b->user, 0);
    if (rc < 0) {
        kvh_util_write_message(error, "rados: create: rados_create2(cluster %s, %s): %s", b->cluster_name, b->user, rc_text(rc));
        backend_free(b);
        config_free(&config);
        return KVH_ERR_INTERNAL;
    }
    kvh_status status = KVH_ERR_INVALID_CONFIG;
    rc = rados_conf_read_file(b->cluster, *conf != '\0' ? conf : NULL);
    if (rc < 0 && *conf != '\0') {
        kvh_util_write_message(error, "rados: cannot read ceph configuration '%s': %s", conf, rc_text(rc));
        goto fail_cluster;
    }
    rc = rados_conf_parse_env(b->cluster, NULL); /* CEPH_ARGS */
    if (rc < 0) {
        kvh_util_write_message(error, "rados: cannot parse CEPH_ARGS: %s", rc_text(rc));
        goto fail_cluster;
    }
    const char *keyring = config.text[OPT_KEYRING];
    if (*keyring != '\0' && (rc = rados_conf_set(b->cluster, "keyring", keyring)) < 0) {
        kvh_util_write_message(error, "rados: invalid value for option 'keyring': %s", rc_text(rc));
        goto fail_cluster;
    }
    const char *key = config.text[OPT_KEY];
    if (key != NULL && *key != '\0' && (rc = rados_conf_set(b->cluster, "key", key)) < 0) {
        kvh_util_write_message(error, "rados: invalid value for option 'key' (not shown): %s", rc_text(rc));
        goto fail_cluster;
    }
    char timeout[24];
    snprintf(timeout, sizeof timeout, "%u", b->op_timeout_s);
    const char *timeouts[] = { "rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout" };
    for (size_t i = 0; i < sizeof timeouts / sizeof timeouts[0]; i++) {
        if ((rc = rados_conf_set(b->cluster, timeouts[i], timeout)) < 0) {
            kvh_util_write_message(error, "rados: setting %s=%s: %s", timeouts[i], timeout, rc_text(rc));
            goto fail_cluster;
        }
    }
    /* librados' own throttles must never hold back what max_in_flight allows (a throttled submission
     * blocks the submitting thread, which may be librados' finisher running our callback): not being
     * able to raise them is a failure, not something to run with. */
    const struct {
        const char *option;
        uint64_t wanted;
    } throttles[] = {
        { "objecter_inflight_ops", (uint64_t)b->max_in_flight * 4 + 64 },
        { "objecter_inflight_op_bytes", (uint64_t)b->max_in_flight * (b->stripe_unit + (1u << 16)) * 2 },
    };
    for (size_t i = 0; i < sizeof throttles / sizeof throttles[0]; i++) {
        if ((rc = conf_at_least(b->cluster, throttles[i].option, throttles[i].wanted)) < 0) {
            kvh_util_write_message(error, "rados: setting %s to at least %" PRIu64 ": %s", throttles[i].option,
                          throttles[i].wanted, rc_text(rc));
            goto fail_cluster;
        }
    }

    char mon_host[1024];
    if (rados_conf_get(b->cluster, "mon_host", mon_host, sizeof mon_host) != 0 || mon_host[0] == '\0') {
        snprintf(mon_host, sizeof mon_host, "(not set%s%s)", *conf != '\0' ? " in " : ": no conf option and none found",
                 *conf != '\0' ? conf : "");
    }
    b->mon_host = strdup(mon_host);
    if (b->mon_host == NULL) {
        kvh_util_write_message(error, "rados: create: out of memory");
        status = KVH_ERR_INTERNAL;
        goto fail_cluster;
    }
    double started = now_s();
    rc = rados_connect(b->cluster);
    if (rc < 0) {
        kvh_util_write_message(error, "rados: cannot connect to cluster '%s' at mon_host %s as %s: %s (after %.1f s; "
                             "op_timeout_s=%u)",
                      b->cluster_name, b->mon_host, b->user, rc_text(rc), now_s() - started, b->op_timeout_s);
        status = KVH_ERR_UNAVAILABLE;
        goto fail_cluster;
    }
    rc = rados_ioctx_create(b->cluster, b->pool, &b->io);
    if (rc < 0) {
        if (rc == -ENOENT) {
            kvh_util_write_message(error, "rados: pool '%s' does not exist on cluster '%s' (mon_host %s); create it, e.g. "
                                 "`ceph osd pool create %s`",
                          b->pool, b->cluster_name, b->mon_host, b->pool);
            status = KVH_ERR_INVALID_CONFIG;
        } else {
            kvh_util_write_message(error, "rados: cannot open pool '%s' on cluster '%s' (mon_host %s): %s", b->pool,
                          b->cluster_name, b->mon_host, rc_text(rc));
            status = status_of(rc) == KVH_ERR_TIMEOUT ? KVH_ERR_UNAVAILABLE : KVH_ERR_IO;
        }
        goto fail_connected;
    }
    rados_ioctx_set_namespace(b->io, b->nspace);
    /* A full pool answers writes with ENOSPC/EDQUOT instead of blocking them until it has room. */
    rados_set_pool_full_try(b->io);

    /* Prove the data path (OSDs reachable, caps sufficient) before the host relies on it. */
    {
        char *probe = malloc(b->prefix_len + sizeof "#health");
        if (probe == NULL) {
            kvh_util_write_message(error, "rados: create: out of memory");
            status = KVH_ERR_INTERNAL;
            goto fail_ioctx;
        }
        memcpy(probe, b->prefix, b->prefix_len);
        memcpy(probe + b->prefix_len, "#health", sizeof "#health");
        uint64_t size = 0;
        time_t mtime = 0;
        started = now_s();
        rc = rados_stat(b->io, probe, &size, &mtime);
        free(probe);
        if (rc < 0 && rc != -ENOENT) {
            kvh_util_write_message(error, "rados: pool '%s' namespace '%s' on cluster '%s' (mon_host %s) did not answer a probe "
                                 "read as %s: %s (after %.1f s)%s",
                          b->pool, b->nspace, b->cluster_name, b->mon_host, b->user, rc_text(rc), now_s() - started,
                          rc == -EPERM || rc == -EACCES ? "; the user needs caps like mon 'allow r' osd 'allow rw pool=<pool>'"
                                                        : "");
            status = rc == -ETIMEDOUT ? KVH_ERR_UNAVAILABLE : status_of(rc);
            goto fail_ioctx;
        }
    }

    b->gen_seed = random_seed(rados_get_instance_id(b->cluster));
    if (pthread_mutex_init(&b->lock, NULL) != 0) {
        kvh_util_write_message(error, "rados: create: cannot initialise a mutex");
        status = KVH_ERR_INTERNAL;
        goto fail_ioctx;
    }
    if (pthread_cond_init(&b->idle, NULL) != 0) {
        kvh_util_write_message(error, "rados: create: cannot initialise a condition variable");
        pthread_mutex_destroy(&b->lock);
        status = KVH_ERR_INTERNAL;
        goto fail_ioctx;
    }
    char fsid[64] = "?";
    if (rados_cluster_fsid(b->cluster, fsid, sizeof fsid) < 0) {
        snprintf(fsid, sizeof fsid, "?"); /* only for the log line below */
    }
    kvh_util_log(host, RADOS_TARGET, KVH_LOG_INFO,
             "create instance=%.*s cluster=%s fsid=%s mon_host=%s user=%s pool=%s namespace='%s' object_prefix='%s' "
             "op_timeout_s=%u max_object_bytes=%" PRIu64 " max_in_flight=%u checksum=%s%s",
             kvh_util_str_precision(host->instance_name), kvh_util_str_chars(host->instance_name), b->cluster_name, fsid, b->mon_host,
             b->user, b->pool, b->nspace, b->prefix, b->op_timeout_s, b->stripe_unit, b->max_in_flight,
             b->checksum ? "true" : "false", key != NULL && *key != '\0' ? " key=(set, not shown)" : "");
    config_free(&config);
    *out_backend = b;
    return KVH_OK;

fail_ioctx:
    rados_ioctx_destroy(b->io);
fail_connected:
fail_cluster:
    rados_shutdown(b->cluster);
    backend_free(b);
    config_free(&config);
    return status;
}

static void kr_destroy(kvh_backend *b) {
    if (b == NULL) {
        return;
    }
    /* No new data operations; queued ones fail with CANCELED at once; in-flight ones finish (each within
     * op_timeout_s) and their callbacks, host completions included, run before this returns. */
    pthread_mutex_lock(&b->lock);
    b->stopping = 1;
    struct rop *queued = b->queue_head;
    b->queue_head = NULL;
    b->queue_tail = NULL;
    b->queued = 0;
    pthread_mutex_unlock(&b->lock);
    size_t canceled = 0;
    while (queued != NULL) {
        struct rop *next = queued->next;
        queued->next = NULL;
        canceled++;
        rop_finish(queued, ERR_STOPPING);
        queued = next;
    }
    pthread_mutex_lock(&b->lock);
    while (b->outstanding > 0) {
        pthread_cond_wait(&b->idle, &b->lock);
    }
    pthread_mutex_unlock(&b->lock);
    probes_reap(b, 1);
    kvh_util_log(b->host, RADOS_TARGET, KVH_LOG_INFO,
             "destroy: puts %" PRIu64 " ok / %" PRIu64 " failed (%" PRIu64 " replaced an older version, %" PRIu64
             " of them without reading it first), gets %" PRIu64
             " hits / %" PRIu64 " misses / %" PRIu64 " failed; %" PRIu64 " timeouts, %" PRIu64 " not attempted, %" PRIu64
             " corrupt; %" PRIu64 " bytes in, %" PRIu64 " bytes out; %" PRIu64 " stale stripes removed; %zu queued "
             "operations canceled",
             (uint64_t)atomic_load(&b->puts_ok), (uint64_t)atomic_load(&b->put_errors), (uint64_t)atomic_load(&b->replaced),
             (uint64_t)atomic_load(&b->replaced_unread),
             (uint64_t)atomic_load(&b->gets_hit), (uint64_t)atomic_load(&b->gets_miss),
             (uint64_t)atomic_load(&b->get_errors), (uint64_t)atomic_load(&b->timeouts),
             (uint64_t)atomic_load(&b->skipped), (uint64_t)atomic_load(&b->corrupt), (uint64_t)atomic_load(&b->bytes_in),
             (uint64_t)atomic_load(&b->bytes_out), (uint64_t)atomic_load(&b->gc_objects), canceled);
    rados_ioctx_destroy(b->io);
    rados_shutdown(b->cluster);
    pthread_cond_destroy(&b->idle);
    pthread_mutex_destroy(&b->lock);
    backend_free(b);
}

/* ------------------------------------------------------------------------------------------------ */
/* Descriptor and entry point                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static const kvh_backend_vtable RADOS_VTABLE = {
    .struct_size = sizeof(kvh_backend_vtable),
    .reserved = 0,
    .create = kr_create,
    .destroy = kr_destroy,
    .contains = kr_contains,
    .put = kr_put,
    .get = kr_get,
    .remove = kr_remove,
    .last_error = kr_last_error,
    .pin = NULL,
    .unpin = NULL,
    .prefetch = NULL,
    .flush = NULL,
    .health = kr_health,
    .stats = kr_stats,
    .clear = kr_clear,
};

static const kvh_plugin_descriptor RADOS_DESCRIPTOR = {
    .struct_size = sizeof(kvh_plugin_descriptor),
    .abi_major = KVH_ABI_MAJOR,
    .abi_minor = KVH_ABI_MINOR,
    .class_name = "rados",
    .plugin_version = RADOS_VERSION,
    .description = "Ceph RADOS pool through librados: striped objects, atomic head-last writes, async I/O",
    .capabilities = KVH_CAP_HEALTH | KVH_CAP_PERSISTENT | KVH_CAP_SHARED | KVH_CAP_CLEAR | KVH_CAP_STATS,
    .options = RADOS_OPTIONS,
    .options_len = OPT_COUNT,
    .vtable = &RADOS_VTABLE,
};

KVH_DECLARE_PLUGIN(rados) {
    (void)host;
    return &RADOS_DESCRIPTOR;
}
