/*
 * plugin_driver: a small C host for kvhost storage plugins.
 *
 *     plugin_driver <plugin.so> <class_name> [key=value ...]
 *
 * It does, in plain C, what the kvhost host does: dlopen the plugin, look up kvh_plugin_<class>_v1, check
 * the descriptor, create a backend with the given options (the option schema's defaults fill in the rest),
 * then drive every vtable entry the plugin has: put, contains, get, remove, pin/unpin, prefetch, flush,
 * health, clear and last_error, four threads at once, and finally destroy with operations still in flight.
 * Each phase prints one line; the last line is "N passed, M failed" (N and M count checks). The exit
 * status is 0 only when nothing failed.
 *
 * tests/integration/sanitizers.rs builds it and the C plugins with AddressSanitizer+UBSan, and without
 * them for valgrind memcheck, and runs it against each plugin. It is also the reference for how a C host
 * drives the ABI in include/kvhost_plugin.h.
 *
 * KVH_DRIVER_VERBOSE=1 prints the plugin's log messages on stderr (otherwise they are only counted).
 *
 * What the driver expects of the data path:
 *   - by default, a stored chunk reads back with the same bytes and metadata (so the store must hold the
 *     ~300 KiB the driver puts without evicting, and accept 36 queued operations);
 *   - with KVH_CAP_DISCARDS (the `log` plugin) every lookup misses;
 *   - for the test fixtures named in KNOWN_FIXTURES, their documented defect (fx_throws: put fails with
 *     KVH_ERR_PANIC; fx_hang: put and get complete only when the backend is destroyed).
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -pthread -I include tests/c/plugin_driver.c \
 *           -o plugin_driver -ldl
 */

#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime */

#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ================================================================================================ */
/* Checks and phases                                                                                */
/* ================================================================================================ */

static atomic_long g_passed;
static atomic_long g_failed;

/* Records one check; on failure prints where and why on stderr. Safe from any thread. */
#define CHECK(cond, ...) check_at(__LINE__, (cond), #cond, __VA_ARGS__)

static void check_at(int line, bool ok, const char *expr, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void check_at(int line, bool ok, const char *expr, const char *fmt, ...) {
    if (ok) {
        atomic_fetch_add(&g_passed, 1);
        return;
    }
    atomic_fetch_add(&g_failed, 1);
    char text[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(text, sizeof text, fmt, args);
    va_end(args);
    fprintf(stderr, "FAIL plugin_driver.c:%d: %s [%s]\n", line, text, expr);
}

static void print_summary(void) {
    printf("%ld passed, %ld failed\n", atomic_load(&g_passed), atomic_load(&g_failed));
    fflush(stdout);
}

/* A failure after which the driver cannot go on safely (for example a completion that never fired: the
 * plugin may still write into the request, so its memory can never be freed). */
static _Noreturn void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void fatal(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "FATAL: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    atomic_fetch_add(&g_failed, 1);
    print_summary();
    fflush(stderr);
    _Exit(1);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_us(long us) {
    struct timespec ts = { .tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}

static struct {
    const char *name;
    long passed;
    long failed;
    double start_ms;
} g_phase;

static void phase_begin(const char *name) {
    g_phase.name = name;
    g_phase.passed = atomic_load(&g_passed);
    g_phase.failed = atomic_load(&g_failed);
    g_phase.start_ms = now_ms();
}

/* Prints the phase line: "[ ok ] name  N checks  T ms  detail". */
static void phase_end(const char *detail_fmt, ...) __attribute__((format(printf, 1, 2)));
static void phase_end(const char *detail_fmt, ...) {
    char detail[256];
    va_list args;
    va_start(args, detail_fmt);
    vsnprintf(detail, sizeof detail, detail_fmt, args);
    va_end(args);
    long passed = atomic_load(&g_passed) - g_phase.passed;
    long failed = atomic_load(&g_failed) - g_phase.failed;
    printf("[%s] %-18s %4ld checks %8.1f ms  %s\n", failed == 0 ? " ok " : "FAIL", g_phase.name, passed + failed,
           now_ms() - g_phase.start_ms, detail);
    fflush(stdout);
}

static void phase_skip(const char *name, const char *why) {
    printf("[skip] %-18s %s\n", name, why);
    fflush(stdout);
}

/* ================================================================================================ */
/* Small helpers                                                                                    */
/* ================================================================================================ */

/* Whether `len` bytes at `text` are valid UTF-8 (the ABI's strings are UTF-8). */
static bool utf8_valid(const char *text, size_t len) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        size_t extra = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 4;
        if (extra == 4 || len - i <= extra) {
            return false; /* not a lead byte, or a truncated sequence */
        }
        for (size_t k = 1; k <= extra; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return false;
            }
        }
        i += extra + 1;
    }
    return true;
}

/* Whether a borrowed kvh_str obeys the ABI: ptr NULL only when len is 0, valid UTF-8. */
static bool str_valid(kvh_str s) {
    return s.len == 0 || (s.ptr != NULL && utf8_valid(s.ptr, s.len));
}

/* 64-bit FNV-1a. The real host uses XXH3-64; the ABI only needs some stable 64-bit hash of the
 * canonical string for sharding, and FNV-1a fits in four lines. */
static uint64_t fnv1a64(const char *text, size_t len) {
    uint64_t hash = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) {
        hash = (hash ^ (unsigned char)text[i]) * 1099511628211ull;
    }
    return hash;
}

/* Buffers the plugin writes into are followed by CANARY_LEN bytes of CANARY; a write past the capacity
 * the driver passed shows up as a changed canary (valgrind cannot see it: it is inside the allocation). */
#define CANARY 0xCD
#define CANARY_LEN 16

static bool canary_intact(const void *after_end) {
    const unsigned char *p = after_end;
    for (size_t i = 0; i < CANARY_LEN; i++) {
        if (p[i] != CANARY) {
            return false;
        }
    }
    return true;
}

/* ================================================================================================ */
/* The host API handed to the plugin                                                                */
/* ================================================================================================ */

struct host_ctx {
    bool verbose;                  /* print every message (KVH_DRIVER_VERBOSE) */
    atomic_long messages[6];       /* by level, 1..5 */
    atomic_long malformed;         /* messages breaking the ABI: bad level, NULL/non-UTF-8 strings */
};

static struct host_ctx g_host_ctx;

static void host_log(void *ctx, int32_t level, kvh_str target, kvh_str message) {
    struct host_ctx *host = ctx;
    bool well_formed = host == &g_host_ctx && level >= KVH_LOG_ERROR && level <= KVH_LOG_TRACE &&
                       str_valid(target) && str_valid(message);
    if (!well_formed) {
        atomic_fetch_add(&g_host_ctx.malformed, 1);
        fprintf(stderr, "malformed log call: ctx=%p level=%d target.len=%zu message.len=%zu\n", ctx, (int)level,
                target.len, message.len);
        return;
    }
    atomic_fetch_add(&host->messages[level], 1);
    if (host->verbose) {
        static const char *const LEVELS[] = { "", "ERROR", "WARN", "INFO", "DEBUG", "TRACE" };
        fprintf(stderr, "  [%s %.*s] %.*s\n", LEVELS[level], (int)target.len, target.len ? target.ptr : "",
                (int)message.len, message.len ? message.ptr : "");
    }
}

/* Every level is enabled, so the plugins' formatting code (trace lines per key included) runs under the
 * sanitizers too. */
static bool host_log_enabled(void *ctx, int32_t level) {
    (void)level;
    return ctx == &g_host_ctx;
}

#define INSTANCE_NAME "driver"

/* Lives until process exit, as the ABI requires. */
static const kvh_host_api g_host_api = {
    .struct_size = sizeof(kvh_host_api),
    .abi_major = KVH_ABI_MAJOR,
    .abi_minor = KVH_ABI_MINOR,
    .host_ctx = &g_host_ctx,
    .instance_name = { INSTANCE_NAME, sizeof INSTANCE_NAME - 1 }, /* a literal: NUL at ptr[len] */
    .log = host_log,
    .log_enabled = host_log_enabled,
};

/* ================================================================================================ */
/* The plugin under test                                                                            */
/* ================================================================================================ */

/* Fixtures with a deliberate, documented defect; the driver checks the defect instead of tripping on it. */
enum quirk {
    QUIRK_NONE,
    QUIRK_PUT_THROWS,      /* tests/fixtures/cpp/fx_throws.cpp: put always fails with KVH_ERR_PANIC */
    QUIRK_NEVER_COMPLETES, /* tests/fixtures/c/fx_hang.c: put/get stay PENDING until destroy cancels them */
};

static const struct {
    const char *class_name;
    enum quirk quirk;
} KNOWN_FIXTURES[] = {
    { "throws", QUIRK_PUT_THROWS },
    { "hang", QUIRK_NEVER_COMPLETES },
};

static struct {
    const char *path;
    const char *class_name;
    kvh_plugin_descriptor desc; /* copy of the plugin's descriptor, zero past its struct_size */
    kvh_backend_vtable vt;      /* copy of the plugin's vtable, zero past its struct_size */
    uint64_t caps;
    enum quirk quirk;
    bool hits;                  /* stored chunks read back: not DISCARDS, and put works */
    kvh_backend *backend;
} g;

static bool has_cap(uint64_t cap) {
    return (g.caps & cap) != 0;
}

/* ================================================================================================ */
/* Keys                                                                                             */
/* ================================================================================================ */

#define MODEL_NAME "driver/model"
#define DTYPE_NAME "bfloat16"
#define WORLD_SIZE 1u
#define WORKER_ID 0u
#define MAX_BATCH 8
#define KEY_TEXT_MAX 96
/* This key id carries a tag (`lora%adapter-1`), so tags are exercised too. */
#define TAGGED_KEY_ID 10

/* The keys of one batch, with the storage their strings point into. Never copy it after keys_add: the
 * kvh_key entries point into the struct itself. */
struct keys {
    size_t len;
    kvh_key k[MAX_BATCH];
    char text[MAX_BATCH][KEY_TEXT_MAX];
    kvh_tag tag[MAX_BATCH];
};

/* Adds the key of chunk `id`: "driver/model@1@0@<id in hex>@bfloat16[@lora%adapter-1]". */
static void keys_add(struct keys *ks, int64_t id) {
    if (ks->len == MAX_BATCH) {
        fatal("keys_add: more than %d keys in a batch", MAX_BATCH);
    }
    size_t i = ks->len++;
    char *text = ks->text[i];
    int len = snprintf(text, KEY_TEXT_MAX, "%s@%u@%u@%" PRIx64 "@%s", MODEL_NAME, WORLD_SIZE, WORKER_ID, (uint64_t)id,
                       DTYPE_NAME);
    bool tagged = id == TAGGED_KEY_ID;
    if (tagged) {
        len += snprintf(text + len, KEY_TEXT_MAX - (size_t)len, "@lora%%adapter-1");
        ks->tag[i] = (kvh_tag){ KVH_STR_LIT("lora"), KVH_STR_LIT("adapter-1") };
    }
    ks->k[i] = (kvh_key){
        .canonical = { text, (size_t)len }, /* snprintf wrote the NUL at text[len] */
        .model_name = KVH_STR_LIT(MODEL_NAME),
        .dtype = KVH_STR_LIT(DTYPE_NAME),
        .tags = tagged ? &ks->tag[i] : NULL,
        .tags_len = tagged ? 1 : 0,
        .chunk_hash = id,
        .key_hash = fnv1a64(text, (size_t)len),
        .world_size = WORLD_SIZE,
        .worker_id = WORKER_ID,
        .layer_id = KVH_NO_LAYER,
        .reserved = 0,
    };
}

/* ================================================================================================ */
/* Chunks: contents and metadata are derived from (id, version, size), so reads can be verified     */
/* ================================================================================================ */

static uint8_t chunk_byte(int64_t id, int version, size_t i) {
    return (uint8_t)((uint64_t)id * 131u + (uint64_t)version * 17u + (uint64_t)i * 7u);
}

/* The metadata stored with a chunk: opaque bytes, shape [version, size]. */
static kvh_chunk_meta chunk_meta(int version, size_t size) {
    kvh_chunk_meta meta = { 0 };
    meta.length = size;
    meta.fmt = KVH_FMT_BINARY;
    meta.dtype = KVH_DTYPE_UINT8;
    meta.ndim = 2;
    meta.shape[0] = version;
    meta.shape[1] = (int32_t)size;
    return meta;
}

static bool meta_equal(const kvh_chunk_meta *a, const kvh_chunk_meta *b) {
    return a->length == b->length && a->fmt == b->fmt && a->dtype == b->dtype && a->ndim == b->ndim &&
           memcmp(a->shape, b->shape, sizeof a->shape) == 0 && a->reserved == b->reserved;
}

/* Checks one chunk read back by get: length, metadata and every byte. */
static void check_chunk(int64_t id, int version, size_t size, uint64_t out_len, const kvh_chunk_meta *meta,
                        const uint8_t *data) {
    kvh_chunk_meta want = chunk_meta(version, size);
    CHECK(out_len == size, "get key %" PRId64 ": out_len %" PRIu64 ", want %zu", id, out_len, size);
    CHECK(meta_equal(meta, &want), "get key %" PRId64 ": metadata differs from what was put", id);
    size_t bad = 0;
    for (size_t i = 0; i < size && out_len == size; i++) {
        bad += data[i] != chunk_byte(id, version, i);
    }
    CHECK(bad == 0, "get key %" PRId64 ": %zu of %zu bytes differ from what was put", id, bad, size);
}

/* ================================================================================================ */
/* Completions                                                                                      */
/* ================================================================================================ */

static atomic_long g_pending;     /* calls that returned KVH_PENDING */
static atomic_long g_completions; /* completion callbacks received */

/* Completion state of one put/get/prefetch request. The plugin gets a pointer to it as user_data. */
struct op {
    atomic_int fired;           /* completions received: must end at exactly 1 for PENDING, 0 otherwise */
    atomic_int status;          /* status the completion reported */
    atomic_bool items_written;  /* every item_status was written when the completion fired */
    const kvh_status *item_status;
    size_t len;
    /* Options, set by the caller before the request is submitted (zero by default):
     * reentrant_keys: the callback calls contains on the first of these keys (the ABI lets a host call
     *   back into the plugin from a completion) and stores the item status in reentrant_status;
     * wait_for_gate: when called on a plugin thread, the callback blocks until g_gate_open is set,
     *   holding up that thread. */
    const struct keys *reentrant_keys;
    atomic_int reentrant_status;
    bool wait_for_gate;
};

static atomic_bool g_gate_open;
static pthread_t g_main_thread;

/* Resets the completion state before a submission (the options above are left as they are). */
static void op_init(struct op *op, const kvh_status *item_status, size_t len) {
    atomic_init(&op->fired, 0);
    atomic_init(&op->status, KVH_ERR_NO_RESULT);
    atomic_init(&op->items_written, false);
    atomic_init(&op->reentrant_status, KVH_ERR_NO_RESULT);
    op->item_status = item_status;
    op->len = len;
}

static void on_complete(void *user_data, kvh_status status, kvh_str message) {
    struct op *op = user_data;
    bool written = true;
    for (size_t i = 0; i < op->len; i++) {
        written = written && op->item_status[i] != KVH_ERR_NO_RESULT;
    }
    atomic_store(&op->items_written, written);
    atomic_store(&op->status, status);
    if (!str_valid(message)) {
        atomic_fetch_add(&g_host_ctx.malformed, 1);
        fprintf(stderr, "malformed completion message (len %zu)\n", message.len);
    }
    if (op->reentrant_keys != NULL) {
        kvh_chunk_meta meta;
        kvh_status item = KVH_ERR_NO_RESULT;
        kvh_contains_batch batch = { op->reentrant_keys->k, &meta, &item, 1, 0, 0 };
        kvh_status rc = g.vt.contains(g.backend, &batch);
        atomic_store(&op->reentrant_status, rc == KVH_OK ? item : rc);
    }
    if (op->wait_for_gate && !pthread_equal(pthread_self(), g_main_thread)) {
        double deadline = now_ms() + 10000.0;
        while (!atomic_load(&g_gate_open) && now_ms() < deadline) {
            sleep_us(1000);
        }
    }
    atomic_fetch_add(&g_completions, 1);
    /* Last touch: once `fired` is set the submitting thread may free the request. */
    atomic_fetch_add(&op->fired, 1);
}

static kvh_completion completion_for(struct op *op) {
    return (kvh_completion){ on_complete, op };
}

/* Waits up to 10 s for the completion. */
static bool op_wait(struct op *op) {
    double deadline = now_ms() + 10000.0;
    long pause_us = 10;
    while (atomic_load(&op->fired) == 0) {
        if (now_ms() > deadline) {
            return false;
        }
        sleep_us(pause_us);
        pause_us = pause_us < 1000 ? pause_us * 2 : 1000;
    }
    return true;
}

/* What a host does with the return value of put, get or prefetch: KVH_PENDING means wait for the
 * completion and use its status; anything else is final and the completion must never fire. Returns the
 * status of the whole operation. */
static kvh_status op_finish(struct op *op, kvh_status rc, const char *what) {
    if (rc != KVH_PENDING) {
        CHECK(atomic_load(&op->fired) == 0, "%s returned %s, yet its completion fired", what, kvh_util_status_name(rc));
        return rc;
    }
    atomic_fetch_add(&g_pending, 1);
    if (!op_wait(op)) {
        fatal("%s returned PENDING but its completion did not fire within 10 s", what);
    }
    kvh_status status = atomic_load(&op->status);
    CHECK(atomic_load(&op->fired) == 1, "%s: completion fired %d times", what, atomic_load(&op->fired));
    CHECK(status != KVH_PENDING, "%s: completion reported PENDING", what);
    if (status == KVH_OK) {
        CHECK(atomic_load(&op->items_written), "%s: completion fired before every item_status was written", what);
    }
    return status;
}

/* ================================================================================================ */
/* last_error                                                                                       */
/* ================================================================================================ */

/* Called right after a call failed as a whole, on the same thread, as the host does: the plugin's
 * last_error (if it has one) must explain the failure, NUL-terminated and truncated to the buffer. */
static void check_last_error(const char *after) {
    if (g.vt.last_error == NULL) {
        return;
    }
    char buf[256 + CANARY_LEN];
    memset(buf, CANARY, sizeof buf);
    size_t len = g.vt.last_error(g.backend, buf, 256);
    CHECK(len > 0, "last_error after a failed %s returned 0", after);
    if (len == 0) {
        return;
    }
    CHECK(memchr(buf, '\0', 256) != NULL, "last_error after %s: message not NUL-terminated", after);
    CHECK(canary_intact(buf + 256), "last_error after %s wrote past its buffer", after);
    if (len < 256) {
        CHECK(strnlen(buf, 256) == len, "last_error after %s returned %zu for a %zu-byte message", after, len,
              strnlen(buf, 256));
    }
    CHECK(str_valid((kvh_str){ buf, strnlen(buf, 256) }), "last_error after %s: not UTF-8", after);

    char small[8 + CANARY_LEN];
    memset(small, CANARY, sizeof small);
    size_t again = g.vt.last_error(g.backend, small, 8);
    CHECK(again == len, "last_error with a small buffer returned %zu, then %zu", len, again);
    CHECK(memchr(small, '\0', 8) != NULL && canary_intact(small + 8), "last_error ignored its 8-byte capacity");
    CHECK(strncmp(small, buf, strnlen(small, 8)) == 0, "truncated last_error is not a prefix of the message");

    char none[CANARY_LEN];
    memset(none, CANARY, sizeof none);
    CHECK(g.vt.last_error(g.backend, none, 0) == len && canary_intact(none), "last_error with cap 0 wrote or changed");
}

/* ================================================================================================ */
/* Requests                                                                                         */
/* ================================================================================================ */

/* Each request owns everything its batch points to, so it can outlive the call that submitted it (a
 * PENDING request must stay valid until its completion has returned). Allocated with calloc. */

struct put_req {
    struct op op;
    struct keys keys;
    uint8_t *data[MAX_BATCH];
    kvh_bytes src[MAX_BATCH];
    kvh_chunk_meta meta[MAX_BATCH];
    kvh_status status[MAX_BATCH];
    kvh_put_batch batch;
};

static void *xcalloc(size_t size) {
    void *p = calloc(1, size);
    if (p == NULL) {
        fatal("out of memory");
    }
    return p;
}

/* Adds chunk (id, version, size). An empty chunk is passed as { NULL, 0 }, which the ABI allows. */
static void put_add(struct put_req *r, int64_t id, int version, size_t size) {
    size_t i = r->keys.len;
    keys_add(&r->keys, id);
    r->data[i] = size > 0 ? malloc(size) : NULL;
    if (size > 0 && r->data[i] == NULL) {
        fatal("out of memory");
    }
    for (size_t b = 0; b < size; b++) {
        r->data[i][b] = chunk_byte(id, version, b);
    }
    r->src[i] = (kvh_bytes){ r->data[i], size };
    r->meta[i] = chunk_meta(version, size);
}

/* Calls put. Returns what put returned (PENDING or final). Item statuses start as KVH_ERR_NO_RESULT, as
 * the host writes them. */
static kvh_status put_submit(struct put_req *r) {
    for (size_t i = 0; i < MAX_BATCH; i++) {
        r->status[i] = KVH_ERR_NO_RESULT;
    }
    /* Arrays are never NULL, even for an empty batch (the ABI does not promise plugins NULL is fine). */
    r->batch = (kvh_put_batch){ r->keys.k, r->src, r->meta, r->status, r->keys.len };
    op_init(&r->op, r->status, r->keys.len);
    return g.vt.put(g.backend, &r->batch, completion_for(&r->op));
}

static void put_free(struct put_req *r) {
    for (size_t i = 0; i < r->keys.len; i++) {
        free(r->data[i]);
    }
    free(r);
}

/* Checks the result of a finished put whose chunks should all be stored. */
static void check_put_result(struct put_req *r, kvh_status status, const char *what) {
    if (g.quirk == QUIRK_PUT_THROWS) {
        CHECK(status == KVH_ERR_PANIC, "%s: want PANIC from the throwing fixture, got %s", what, kvh_util_status_name(status));
        return;
    }
    CHECK(status == KVH_OK, "%s failed: %s", what, kvh_util_status_name(status));
    if (status != KVH_OK) {
        return;
    }
    for (size_t i = 0; i < r->keys.len; i++) {
        CHECK(r->status[i] == KVH_OK, "%s: item %zu (%s) is %s", what, i, r->keys.text[i], kvh_util_status_name(r->status[i]));
    }
}

/* Puts and waits. Returns the status of the whole operation. */
static kvh_status put_sync(struct put_req *r, const char *what) {
    kvh_status rc = put_submit(r);
    kvh_status status = op_finish(&r->op, rc, what);
    if (rc != KVH_PENDING && rc != KVH_OK) {
        check_last_error(what);
    }
    check_put_result(r, status, what);
    return status;
}

struct get_req {
    struct op op;
    struct keys keys;
    uint8_t *buf[MAX_BATCH];
    size_t cap[MAX_BATCH];
    kvh_mut_bytes dst[MAX_BATCH];
    uint64_t out_len[MAX_BATCH];
    kvh_chunk_meta out_meta[MAX_BATCH];
    kvh_status status[MAX_BATCH];
    kvh_get_batch batch;
};

/* Adds key `id` with a destination of `cap` bytes (a zero-capacity destination is { NULL, 0 }). */
static void get_add(struct get_req *r, int64_t id, size_t cap) {
    size_t i = r->keys.len;
    keys_add(&r->keys, id);
    r->cap[i] = cap;
    if (cap > 0) {
        r->buf[i] = malloc(cap + CANARY_LEN);
        if (r->buf[i] == NULL) {
            fatal("out of memory");
        }
        memset(r->buf[i], CANARY, cap + CANARY_LEN);
    }
    r->dst[i] = (kvh_mut_bytes){ r->buf[i], cap };
}

static kvh_status get_submit(struct get_req *r) {
    for (size_t i = 0; i < MAX_BATCH; i++) {
        r->status[i] = KVH_ERR_NO_RESULT;
        r->out_len[i] = UINT64_MAX;
        memset(&r->out_meta[i], 0xEE, sizeof r->out_meta[i]);
    }
    r->batch = (kvh_get_batch){ r->keys.k, r->dst, r->out_len, r->out_meta, r->status, r->keys.len };
    op_init(&r->op, r->status, r->keys.len);
    return g.vt.get(g.backend, &r->batch, completion_for(&r->op));
}

/* Gets and waits; checks the whole call succeeded and no destination was overrun. */
static kvh_status get_sync(struct get_req *r, const char *what) {
    kvh_status rc = get_submit(r);
    kvh_status status = op_finish(&r->op, rc, what);
    if (rc != KVH_PENDING && rc != KVH_OK) {
        check_last_error(what);
    }
    CHECK(status == KVH_OK, "%s failed: %s", what, kvh_util_status_name(status));
    for (size_t i = 0; i < r->keys.len; i++) {
        if (r->cap[i] > 0) {
            CHECK(canary_intact(r->buf[i] + r->cap[i]), "%s: item %zu written past its %zu-byte buffer", what, i,
                  r->cap[i]);
        }
    }
    return status;
}

static void get_free(struct get_req *r) {
    for (size_t i = 0; i < r->keys.len; i++) {
        free(r->buf[i]);
    }
    free(r);
}

/* A contains_async request that may outlive the call (destroy phase). */
struct contains_req {
    struct op op;
    struct keys keys;
    kvh_chunk_meta meta[MAX_BATCH];
    kvh_status status[MAX_BATCH];
    kvh_contains_batch batch;
};

/* remove, pin, unpin, prefetch and remove_async. */
struct key_req {
    struct op op;
    struct keys keys;
    kvh_status status[MAX_BATCH];
    kvh_key_batch batch;
};

enum key_call { CALL_REMOVE, CALL_FORCE_REMOVE, CALL_PIN, CALL_UNPIN, CALL_PREFETCH, CALL_REMOVE_ASYNC };
static const char *const KEY_CALL_NAMES[] = { "remove", "remove(force)", "pin", "unpin", "prefetch", "remove_async" };

static bool key_call_is_async(enum key_call call) {
    return call == CALL_PREFETCH || call == CALL_REMOVE_ASYNC;
}

/* Submits a key batch call. prefetch and remove_async may return PENDING; the others are synchronous. */
static kvh_status key_submit(struct key_req *r, enum key_call call) {
    for (size_t i = 0; i < MAX_BATCH; i++) {
        r->status[i] = KVH_ERR_NO_RESULT;
    }
    r->batch = (kvh_key_batch){ r->keys.k, r->status, r->keys.len };
    op_init(&r->op, r->status, r->keys.len);
    switch (call) {
    case CALL_REMOVE: return g.vt.remove(g.backend, &r->batch, false);
    case CALL_FORCE_REMOVE: return g.vt.remove(g.backend, &r->batch, true);
    case CALL_PIN: return g.vt.pin(g.backend, &r->batch);
    case CALL_UNPIN: return g.vt.unpin(g.backend, &r->batch);
    case CALL_PREFETCH: return g.vt.prefetch(g.backend, &r->batch, completion_for(&r->op));
    case CALL_REMOVE_ASYNC: return g.vt.remove_async(g.backend, &r->batch, true, completion_for(&r->op));
    }
    return KVH_ERR_INTERNAL;
}

/* Calls and (for prefetch) waits; checks the whole call succeeded and every item was answered. */
static void key_sync(struct key_req *r, enum key_call call) {
    const char *what = KEY_CALL_NAMES[call];
    kvh_status rc = key_submit(r, call);
    kvh_status status = key_call_is_async(call) ? op_finish(&r->op, rc, what) : rc;
    if (!key_call_is_async(call)) {
        CHECK(rc != KVH_PENDING, "%s is synchronous but returned PENDING", what);
    }
    if (rc != KVH_PENDING && rc != KVH_OK) {
        check_last_error(what);
    }
    CHECK(status == KVH_OK, "%s failed: %s", what, kvh_util_status_name(status));
    for (size_t i = 0; i < r->keys.len && status == KVH_OK; i++) {
        CHECK(r->status[i] != KVH_ERR_NO_RESULT, "%s: item %zu not answered", what, i);
    }
}

/* One-key shorthands; they return the item status. */
static kvh_status key_call1(enum key_call call, int64_t id) {
    struct key_req *r = xcalloc(sizeof *r);
    keys_add(&r->keys, id);
    key_sync(r, call);
    kvh_status item = r->status[0];
    free(r);
    return item;
}

/* contains of `len` ids; item statuses and metadata go to the caller's arrays. */
static void contains_ids(const int64_t *ids, size_t len, uint32_t pin, kvh_status *status, kvh_chunk_meta *meta) {
    struct keys *ks = xcalloc(sizeof *ks);
    for (size_t i = 0; i < len; i++) {
        keys_add(ks, ids[i]);
        status[i] = KVH_ERR_NO_RESULT;
    }
    kvh_contains_batch batch = { ks->k, meta, status, len, pin, 0 };
    kvh_status rc = g.vt.contains(g.backend, &batch);
    if (rc != KVH_OK) {
        check_last_error("contains");
    }
    CHECK(rc == KVH_OK, "contains failed: %s", kvh_util_status_name(rc));
    for (size_t i = 0; i < len; i++) {
        CHECK(status[i] != KVH_ERR_NO_RESULT, "contains: item %zu not answered", i);
    }
    free(ks);
}

/* contains_async of `len` ids, waited for; same contract as contains_ids. */
static void contains_ids_async(const int64_t *ids, size_t len, kvh_status *status, kvh_chunk_meta *meta) {
    struct keys *ks = xcalloc(sizeof *ks);
    for (size_t i = 0; i < len; i++) {
        keys_add(ks, ids[i]);
        status[i] = KVH_ERR_NO_RESULT;
    }
    struct op *op = xcalloc(sizeof *op);
    op_init(op, status, len);
    kvh_contains_batch batch = { ks->k, meta, status, len, 0, 0 };
    kvh_status rc = g.vt.contains_async(g.backend, &batch, completion_for(op));
    if (rc != KVH_PENDING && rc != KVH_OK) {
        check_last_error("contains_async");
    }
    kvh_status whole = op_finish(op, rc, "contains_async");
    CHECK(whole == KVH_OK, "contains_async failed: %s", kvh_util_status_name(whole));
    for (size_t i = 0; i < len && whole == KVH_OK; i++) {
        CHECK(status[i] != KVH_ERR_NO_RESULT, "contains_async: item %zu not answered", i);
    }
    free(op);
    free(ks);
}

static kvh_status contains1(int64_t id, uint32_t pin) {
    kvh_status status;
    kvh_chunk_meta meta;
    contains_ids(&id, 1, pin, &status, &meta);
    return status;
}

/* The status the driver expects for a key it stored and has not removed. */
static kvh_status stored_status(void) {
    return g.hits ? KVH_OK : KVH_ERR_NOT_FOUND;
}

/* For plugins that keep nothing, remove/pin/unpin may answer either way. */
static bool ok_or_missing(kvh_status s) {
    return s == KVH_OK || s == KVH_ERR_NOT_FOUND;
}

/* ================================================================================================ */
/* Phase: load                                                                                      */
/* ================================================================================================ */

static bool option_key_valid(const char *key) {
    if (key == NULL || *key == '\0') {
        return false;
    }
    for (const char *c = key; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_')) {
            return false;
        }
    }
    return true;
}

static void caps_text(uint64_t caps, char *out, size_t cap) {
    static const char *const NAMES[] = { "PIN",      "PREFETCH", "FLUSH", "HEALTH",         "PERSISTENT",
                                         "SHARED",   "DISCARDS", "CLEAR", "ASYNC_CONTAINS", "ASYNC_REMOVE" };
    const unsigned n_names = sizeof NAMES / sizeof NAMES[0];
    size_t used = 0;
    out[0] = '\0';
    for (unsigned bit = 0; bit < 64; bit++) {
        if ((caps >> bit) & 1u) {
            int n = bit < n_names ? snprintf(out + used, cap - used, "%s%s", used ? "," : "", NAMES[bit])
                            : snprintf(out + used, cap - used, "%sbit%u", used ? "," : "", bit);
            used = n > 0 && (size_t)n < cap - used ? used + (size_t)n : used;
        }
    }
    if (used == 0) {
        snprintf(out, cap, "none");
    }
}

/* dlopen, entry point, and the descriptor checks the host makes before any other call. */
static void phase_load(void) {
    phase_begin("load");
    void *lib = dlopen(g.path, RTLD_NOW | RTLD_LOCAL); /* never closed: the host never unloads a plugin */
    if (lib == NULL) {
        fatal("dlopen %s: %s", g.path, dlerror());
    }
    char symbol[128];
    snprintf(symbol, sizeof symbol, "kvh_plugin_%s_v1", g.class_name);
    void *address = dlsym(lib, symbol);
    if (address == NULL) {
        fatal("dlsym %s: %s", symbol, dlerror());
    }
    /* POSIX guarantees a data pointer from dlsym converts to a function pointer; ISO C needs the memcpy. */
    kvh_plugin_entry_fn entry;
    _Static_assert(sizeof entry == sizeof address, "function and data pointers differ in size");
    memcpy(&entry, &address, sizeof entry);

    const kvh_plugin_descriptor *desc = entry(&g_host_api);
    if (desc == NULL) {
        fatal("%s returned NULL (the plugin refused this host)", symbol);
    }
    CHECK(entry(&g_host_api) == desc, "a second call of the entry point returned another descriptor");

    /* Fields past the plugin's struct_size do not exist: copy only what it has, the rest stays zero. */
    CHECK(desc->struct_size >= KVH_DESCRIPTOR_V1_0_SIZE, "descriptor struct_size %u < %d", desc->struct_size,
          KVH_DESCRIPTOR_V1_0_SIZE);
    if (desc->struct_size < KVH_DESCRIPTOR_V1_0_SIZE) {
        fatal("descriptor too small to use");
    }
    memcpy(&g.desc, desc, desc->struct_size < sizeof g.desc ? desc->struct_size : sizeof g.desc);
    CHECK(g.desc.abi_major == KVH_ABI_MAJOR, "descriptor abi_major %u, want %d", g.desc.abi_major, KVH_ABI_MAJOR);
    CHECK(g.desc.class_name != NULL && strcmp(g.desc.class_name, g.class_name) == 0, "class_name '%s', want '%s'",
          g.desc.class_name ? g.desc.class_name : "(null)", g.class_name);
    CHECK(g.desc.plugin_version != NULL && *g.desc.plugin_version != '\0', "plugin_version missing");
    CHECK(g.desc.vtable != NULL, "vtable is NULL");
    if (g.desc.vtable == NULL || g.desc.abi_major != KVH_ABI_MAJOR) {
        fatal("descriptor unusable");
    }

    const kvh_backend_vtable *vt = g.desc.vtable;
    CHECK(vt->struct_size >= KVH_VTABLE_V1_0_SIZE, "vtable struct_size %u < %d", vt->struct_size, KVH_VTABLE_V1_0_SIZE);
    if (vt->struct_size < KVH_VTABLE_V1_0_SIZE) {
        fatal("vtable too small to use");
    }
    memcpy(&g.vt, vt, vt->struct_size < sizeof g.vt ? vt->struct_size : sizeof g.vt);
    CHECK(g.vt.create && g.vt.destroy && g.vt.contains && g.vt.put && g.vt.get && g.vt.remove,
          "a required function (create, destroy, contains, put, get, remove) is NULL");
    if (!(g.vt.create && g.vt.destroy && g.vt.contains && g.vt.put && g.vt.get && g.vt.remove)) {
        fatal("vtable unusable");
    }

    /* Each optional function is present exactly when its capability bit is set. */
    g.caps = g.desc.capabilities;
    CHECK(has_cap(KVH_CAP_PIN) == (g.vt.pin != NULL) && has_cap(KVH_CAP_PIN) == (g.vt.unpin != NULL),
          "KVH_CAP_PIN disagrees with pin/unpin");
    CHECK(has_cap(KVH_CAP_PREFETCH) == (g.vt.prefetch != NULL), "KVH_CAP_PREFETCH disagrees with prefetch");
    CHECK(has_cap(KVH_CAP_FLUSH) == (g.vt.flush != NULL), "KVH_CAP_FLUSH disagrees with flush");
    CHECK(has_cap(KVH_CAP_HEALTH) == (g.vt.health != NULL), "KVH_CAP_HEALTH disagrees with health");
    CHECK(has_cap(KVH_CAP_CLEAR) == (g.vt.clear != NULL), "KVH_CAP_CLEAR disagrees with clear");
    CHECK(has_cap(KVH_CAP_ASYNC_CONTAINS) == (g.vt.contains_async != NULL),
          "KVH_CAP_ASYNC_CONTAINS disagrees with contains_async");
    CHECK(has_cap(KVH_CAP_ASYNC_REMOVE) == (g.vt.remove_async != NULL), "KVH_CAP_ASYNC_REMOVE disagrees with remove_async");
    /* From here on, trust the function pointers, not the bits. */
    g.caps &= ~(uint64_t)((g.vt.pin && g.vt.unpin ? 0 : KVH_CAP_PIN) | (g.vt.prefetch ? 0 : KVH_CAP_PREFETCH) |
                          (g.vt.flush ? 0 : KVH_CAP_FLUSH) | (g.vt.health ? 0 : KVH_CAP_HEALTH) |
                          (g.vt.clear ? 0 : KVH_CAP_CLEAR) | (g.vt.contains_async ? 0 : KVH_CAP_ASYNC_CONTAINS) |
                          (g.vt.remove_async ? 0 : KVH_CAP_ASYNC_REMOVE));

    /* The option schema. */
    CHECK(g.desc.options_len == 0 || g.desc.options != NULL, "options is NULL but options_len is %zu",
          g.desc.options_len);
    bool schema_ok = g.desc.options_len == 0 || g.desc.options != NULL;
    for (size_t i = 0; i < g.desc.options_len && g.desc.options != NULL; i++) {
        const kvh_option_spec *spec = &g.desc.options[i];
        schema_ok = schema_ok && option_key_valid(spec->key);
        CHECK(option_key_valid(spec->key), "option %zu: key '%s' is not [a-z0-9_]+", i, spec->key ? spec->key : "(null)");
        CHECK(spec->doc != NULL, "option %zu: doc is NULL", i);
        CHECK((spec->flags & ~(uint32_t)(KVH_OPTION_REQUIRED | KVH_OPTION_SECRET)) == 0 && spec->reserved == 0,
              "option %zu: unknown flags or non-zero reserved", i);
        for (size_t j = 0; j < i && spec->key != NULL; j++) {
            CHECK(g.desc.options[j].key == NULL || strcmp(g.desc.options[j].key, spec->key) != 0,
                  "option '%s' declared twice", spec->key);
        }
    }
    if (!schema_ok) {
        fatal("option schema unusable");
    }

    for (size_t i = 0; i < sizeof KNOWN_FIXTURES / sizeof KNOWN_FIXTURES[0]; i++) {
        if (strcmp(g.class_name, KNOWN_FIXTURES[i].class_name) == 0) {
            g.quirk = KNOWN_FIXTURES[i].quirk;
        }
    }
    g.hits = !has_cap(KVH_CAP_DISCARDS) && g.quirk == QUIRK_NONE;

    char caps[128];
    caps_text(g.desc.capabilities, caps, sizeof caps);
    phase_end("class=%s version=%s caps=%s%s", g.class_name, g.desc.plugin_version, caps,
              g.quirk == QUIRK_PUT_THROWS        ? " (fixture: put throws)"
              : g.quirk == QUIRK_NEVER_COMPLETES ? " (fixture: ops complete only at destroy)"
                                                 : "");
}

/* ================================================================================================ */
/* Phase: create                                                                                    */
/* ================================================================================================ */

/* Builds the options the way the host does (every schema key, in schema order, defaults filled in,
 * unknown keys rejected) and creates the backend. */
static void phase_create(int argc, char **argv) {
    phase_begin("create");
    size_t n_specs = g.desc.options_len;
    kvh_option *items = xcalloc((n_specs ? n_specs : 1) * sizeof *items);
    size_t n_items = 0;

    for (int a = 0; a < argc; a++) {
        const char *eq = strchr(argv[a], '=');
        bool known = false;
        for (size_t i = 0; eq != NULL && i < n_specs; i++) {
            const char *key = g.desc.options[i].key;
            known = known || (strlen(key) == (size_t)(eq - argv[a]) && strncmp(key, argv[a], strlen(key)) == 0);
        }
        if (!known) {
            fatal("option '%s' is not key=value with a key from the plugin's schema", argv[a]);
        }
    }
    char shown[512] = "";
    size_t shown_len = 0;
    for (size_t i = 0; i < n_specs; i++) {
        const kvh_option_spec *spec = &g.desc.options[i];
        size_t key_len = strlen(spec->key);
        const char *value = spec->default_value;
        for (int a = 0; a < argc; a++) {
            if (strncmp(argv[a], spec->key, key_len) == 0 && argv[a][key_len] == '=') {
                value = argv[a] + key_len + 1; /* the last one given wins */
            }
        }
        if (value == NULL) {
            if (spec->flags & KVH_OPTION_REQUIRED) {
                fatal("required option '%s' not given", spec->key);
            }
            continue; /* optional without default: left out */
        }
        /* argv strings and the plugin's defaults are NUL-terminated, as the ABI requires of option values. */
        items[n_items++] = (kvh_option){ { spec->key, key_len }, { value, strlen(value) } };
        int w = snprintf(shown + shown_len, sizeof shown - shown_len, "%s%s=%s", shown_len ? " " : "", spec->key,
                         (spec->flags & KVH_OPTION_SECRET) ? "***" : value);
        shown_len = w > 0 && (size_t)w < sizeof shown - shown_len ? shown_len + (size_t)w : shown_len;
    }
    kvh_options options = { items, n_items };

    /* A small model: 2 layers, 256-token chunks, 8 KV heads of 64, bfloat16. */
    kvh_model_metadata metadata = {
        .struct_size = sizeof(kvh_model_metadata),
        .world_size = WORLD_SIZE,
        .worker_id = WORKER_ID,
        .chunk_size = 256,
        .dtype_code = KVH_DTYPE_BFLOAT16,
        .use_mla = 0,
        .model_name = KVH_STR_LIT(MODEL_NAME),
        .dtype = KVH_STR_LIT(DTYPE_NAME),
        .kv_shape = { 2, 2, 256, 8, 64 },
        .full_chunk_bytes = 2ull * 2 * 256 * 8 * 64 * 2,
    };

    char error[256 + CANARY_LEN];
    memset(error, CANARY, sizeof error);
    error[0] = '\0';
    kvh_backend *backend = NULL;
    kvh_status rc = g.vt.create(&g_host_api, &options, &metadata, &backend, (kvh_message_buf){ error, 256 });
    CHECK(canary_intact(error + 256), "create wrote past its error buffer");
    if (rc != KVH_OK) {
        error[255] = '\0';
        fatal("create failed: %s: %s", kvh_util_status_name(rc), error);
    }
    CHECK(backend != NULL, "create returned OK without a backend");
    if (backend == NULL) {
        fatal("no backend");
    }
    g.backend = backend;
    free(items); /* valid during create only */
    phase_end("%s", shown_len ? shown : "(no options)");
}

/* ================================================================================================ */
/* Phase: put                                                                                       */
/* ================================================================================================ */

/* The chunks the put phase stores. A key put twice may hold either version afterwards ("a key already
 * stored may be kept or replaced"). */
static const struct chunk {
    int batch;
    int64_t id;
    int version;
    size_t size;
} PUTS[] = {
    /* batch 0: one chunk per size, including an empty chunk (src { NULL, 0 }) */
    { 0, 1, 1, 0 }, { 0, 2, 1, 1 }, { 0, 3, 1, 100 }, { 0, 4, 1, 4096 }, { 0, 5, 1, 65543 }, { 0, 6, 1, 257 },
    /* batch 1: the same key twice in one batch, and a tagged key */
    { 1, 7, 1, 300 }, { 1, 8, 1, 50 }, { 1, 7, 2, 310 }, { 1, TAGGED_KEY_ID, 1, 128 },
    /* batch 2: a stored key put again with new contents */
    { 2, 3, 2, 200 },
    /* batch 3: its completion calls contains from inside the callback */
    { 3, 9, 1, 64 },
};
#define N_PUTS (sizeof PUTS / sizeof PUTS[0])
#define N_PUT_BATCHES 4
/* Ids of the keys above, once each, and two keys never stored. */
static const int64_t STORED_IDS[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, TAGGED_KEY_ID };
#define N_STORED_IDS (sizeof STORED_IDS / sizeof STORED_IDS[0])
#define MISSING_ID_A 1000
#define MISSING_ID_B 1001

/* The largest chunk ever put under `id`. */
static size_t max_size_of(int64_t id) {
    size_t max = 0;
    for (size_t i = 0; i < N_PUTS; i++) {
        if (PUTS[i].id == id && PUTS[i].size > max) {
            max = PUTS[i].size;
        }
    }
    return max;
}

/* The chunk of `id` whose metadata is `meta`, or NULL when no put stored such a chunk. */
static const struct chunk *chunk_for_meta(int64_t id, const kvh_chunk_meta *meta) {
    for (size_t i = 0; i < N_PUTS; i++) {
        kvh_chunk_meta want = chunk_meta(PUTS[i].version, PUTS[i].size);
        if (PUTS[i].id == id && meta_equal(&want, meta)) {
            return &PUTS[i];
        }
    }
    return NULL;
}

static void phase_put(void) {
    phase_begin("put");
    long errors_before = atomic_load(&g_host_ctx.messages[KVH_LOG_ERROR]);

    /* An empty batch. */
    struct put_req *empty = xcalloc(sizeof *empty);
    put_sync(empty, "put of an empty batch");
    put_free(empty);

    for (int b = 0; b < N_PUT_BATCHES; b++) {
        struct put_req *r = xcalloc(sizeof *r);
        for (size_t i = 0; i < N_PUTS; i++) {
            if (PUTS[i].batch == b) {
                put_add(r, PUTS[i].id, PUTS[i].version, PUTS[i].size);
            }
        }
        char what[32];
        snprintf(what, sizeof what, "put batch %d", b);
        bool reentrant = b == N_PUT_BATCHES - 1;
        if (reentrant) {
            r->op.reentrant_keys = &r->keys;
        }
        kvh_status status = put_sync(r, what);
        /* A synchronous plugin never calls the completion, so there is nothing to check then. */
        if (reentrant && status == KVH_OK && atomic_load(&r->op.fired) == 1) {
            kvh_status seen = atomic_load(&r->op.reentrant_status);
            CHECK(seen == stored_status(), "contains from inside put's completion: %s, want %s", kvh_util_status_name(seen),
                  kvh_util_status_name(stored_status()));
        }
        put_free(r);
    }

    if (g.quirk == QUIRK_PUT_THROWS) {
        CHECK(atomic_load(&g_host_ctx.messages[KVH_LOG_ERROR]) > errors_before,
              "put threw but nothing was logged at error level");
    }
    phase_end("%d batches + 1 empty, chunks of 0 B to 64 KiB, duplicate keys%s", N_PUT_BATCHES,
              g.quirk == QUIRK_PUT_THROWS ? ", each put PANIC as expected" : "");
}

/* ================================================================================================ */
/* Phase: contains                                                                                  */
/* ================================================================================================ */

static void phase_contains(void) {
    phase_begin("contains");
    int64_t ids[N_STORED_IDS + 2];
    for (size_t i = 0; i < N_STORED_IDS; i++) {
        ids[i] = STORED_IDS[i];
    }
    ids[N_STORED_IDS] = MISSING_ID_A;
    ids[N_STORED_IDS + 1] = MISSING_ID_B;
    size_t n = N_STORED_IDS + 2;
    kvh_status status[N_STORED_IDS + 2];
    kvh_chunk_meta meta[N_STORED_IDS + 2];
    /* MAX_BATCH keys at a time. */
    for (size_t start = 0; start < n; start += MAX_BATCH) {
        size_t len = n - start < MAX_BATCH ? n - start : MAX_BATCH;
        contains_ids(ids + start, len, 0, status + start, meta + start);
    }
    size_t hits = 0;
    for (size_t i = 0; i < n; i++) {
        bool stored = i < N_STORED_IDS;
        kvh_status want = stored ? stored_status() : KVH_ERR_NOT_FOUND;
        CHECK(status[i] == want, "contains key %" PRId64 ": %s, want %s", ids[i], kvh_util_status_name(status[i]),
              kvh_util_status_name(want));
        if (status[i] == KVH_OK) {
            hits++;
            CHECK(chunk_for_meta(ids[i], &meta[i]) != NULL, "contains key %" PRId64 ": metadata matches no put",
                  ids[i]);
        }
    }
    /* An empty batch. */
    kvh_status none[1];
    kvh_chunk_meta none_meta[1];
    contains_ids(NULL, 0, 0, none, none_meta);
    /* contains_async (ABI 1.2) answers what contains answers. */
    bool async = has_cap(KVH_CAP_ASYNC_CONTAINS) && g.quirk != QUIRK_NEVER_COMPLETES;
    if (async) {
        kvh_status astatus[N_STORED_IDS + 2];
        kvh_chunk_meta ameta[N_STORED_IDS + 2];
        for (size_t start = 0; start < n; start += MAX_BATCH) {
            size_t len = n - start < MAX_BATCH ? n - start : MAX_BATCH;
            contains_ids_async(ids + start, len, astatus + start, ameta + start);
        }
        for (size_t i = 0; i < n; i++) {
            CHECK(astatus[i] == status[i], "contains_async key %" PRId64 ": %s, contains said %s", ids[i],
                  kvh_util_status_name(astatus[i]), kvh_util_status_name(status[i]));
            if (astatus[i] == KVH_OK && status[i] == KVH_OK) {
                CHECK(meta_equal(&ameta[i], &meta[i]), "contains_async key %" PRId64 ": other metadata", ids[i]);
            }
        }
        contains_ids_async(NULL, 0, none, none_meta);
    }
    phase_end("%zu keys, %zu hits%s", n, hits, async ? "; contains_async agrees" : "");
}

/* ================================================================================================ */
/* Phase: get                                                                                       */
/* ================================================================================================ */

static void check_get_hit(const struct get_req *r, size_t i) {
    int64_t id = r->keys.k[i].chunk_hash;
    const struct chunk *c = chunk_for_meta(id, &r->out_meta[i]);
    CHECK(c != NULL, "get key %" PRId64 ": metadata matches no put", id);
    if (c != NULL) {
        check_chunk(id, c->version, c->size, r->out_len[i], &r->out_meta[i], r->buf[i]);
    }
}

static void phase_get(void) {
    phase_begin("get");
    size_t hits = 0;

    /* Every stored key into a buffer that fits, and a missing key. */
    struct get_req *r = xcalloc(sizeof *r);
    for (size_t i = 0; i < N_STORED_IDS && r->keys.len < MAX_BATCH - 1; i++) {
        get_add(r, STORED_IDS[i], max_size_of(STORED_IDS[i]));
    }
    get_add(r, MISSING_ID_A, 64);
    get_sync(r, "get of stored keys");
    for (size_t i = 0; i < r->keys.len; i++) {
        bool stored = r->keys.k[i].chunk_hash != MISSING_ID_A;
        kvh_status want = stored ? stored_status() : KVH_ERR_NOT_FOUND;
        CHECK(r->status[i] == want, "get %s: %s, want %s", r->keys.text[i], kvh_util_status_name(r->status[i]), kvh_util_status_name(want));
        if (r->status[i] == KVH_OK) {
            hits++;
            check_get_hit(r, i);
        }
    }
    get_free(r);

    /* The rest of the stored keys, one at a time. */
    for (size_t i = MAX_BATCH - 1; i < N_STORED_IDS; i++) {
        r = xcalloc(sizeof *r);
        get_add(r, STORED_IDS[i], max_size_of(STORED_IDS[i]) + 10);
        get_sync(r, "get of one key");
        CHECK(r->status[0] == stored_status(), "get %s: %s", r->keys.text[0], kvh_util_status_name(r->status[0]));
        if (r->status[0] == KVH_OK) {
            hits++;
            check_get_hit(r, 0);
        }
        get_free(r);
    }

    /* Buffers that are too small: 100 bytes for a 4096-byte chunk, none at all for 65543 bytes; next to an
     * exact fit (1 byte), in one batch. */
    r = xcalloc(sizeof *r);
    get_add(r, 4, 100);
    get_add(r, 5, 0);
    get_add(r, 2, 1);
    get_sync(r, "get into small buffers");
    if (g.hits) {
        CHECK(r->status[0] == KVH_ERR_BUFFER_TOO_SMALL && r->out_len[0] == 4096,
              "get 4096 B into 100 B: %s, out_len %" PRIu64 ", want BUFFER_TOO_SMALL, 4096", kvh_util_status_name(r->status[0]),
              r->out_len[0]);
        CHECK(r->status[1] == KVH_ERR_BUFFER_TOO_SMALL && r->out_len[1] == 65543,
              "get 65543 B into 0 B: %s, out_len %" PRIu64 ", want BUFFER_TOO_SMALL, 65543", kvh_util_status_name(r->status[1]),
              r->out_len[1]);
        CHECK(r->status[2] == KVH_OK, "get 1 B into 1 B: %s", kvh_util_status_name(r->status[2]));
        if (r->status[2] == KVH_OK) {
            check_get_hit(r, 2);
        }
    } else {
        for (size_t i = 0; i < 3; i++) {
            CHECK(r->status[i] == KVH_ERR_NOT_FOUND, "get %s: %s, want NOT_FOUND", r->keys.text[i],
                  kvh_util_status_name(r->status[i]));
        }
    }
    get_free(r);

    /* An empty batch. */
    r = xcalloc(sizeof *r);
    get_sync(r, "get of an empty batch");
    get_free(r);
    phase_end("%zu hits, miss, BUFFER_TOO_SMALL, empty batch", hits);
}

/* ================================================================================================ */
/* Phase: pin / unpin                                                                               */
/* ================================================================================================ */

static void phase_pin(void) {
    phase_begin("pin");
    /* Two fresh keys. */
    struct put_req *p = xcalloc(sizeof *p);
    put_add(p, 20, 1, 128);
    put_add(p, 21, 1, 128);
    put_sync(p, "put for pin");
    put_free(p);

    if (g.hits) {
        /* Pins are counted, and a pinned key survives a non-forced remove. */
        struct key_req *r = xcalloc(sizeof *r);
        keys_add(&r->keys, 20);
        keys_add(&r->keys, MISSING_ID_A);
        key_sync(r, CALL_PIN);
        CHECK(r->status[0] == KVH_OK && r->status[1] == KVH_ERR_NOT_FOUND, "pin [stored, missing]: %s, %s",
              kvh_util_status_name(r->status[0]), kvh_util_status_name(r->status[1]));
        free(r);
        CHECK(key_call1(CALL_PIN, 20) == KVH_OK, "second pin");
        kvh_status s = key_call1(CALL_REMOVE, 20);
        CHECK(s != KVH_OK && contains1(20, 0) == KVH_OK, "remove of a key pinned twice: %s, and it is gone",
              kvh_util_status_name(s));
        CHECK(key_call1(CALL_UNPIN, 20) == KVH_OK, "first unpin");
        s = key_call1(CALL_REMOVE, 20);
        CHECK(s != KVH_OK && contains1(20, 0) == KVH_OK, "remove of a key still pinned once: %s, and it is gone",
              kvh_util_status_name(s));
        CHECK(key_call1(CALL_UNPIN, 20) == KVH_OK, "second unpin");
        CHECK(key_call1(CALL_REMOVE, 20) == KVH_OK, "remove after the last unpin");
        CHECK(contains1(20, 0) == KVH_ERR_NOT_FOUND, "key still there after remove");

        /* contains(pin=1) pins; a forced remove removes a pinned key. */
        CHECK(contains1(21, 1) == KVH_OK, "contains with pin");
        s = key_call1(CALL_REMOVE, 21);
        CHECK(s != KVH_OK, "remove of a key pinned by contains: %s", kvh_util_status_name(s));
        CHECK(key_call1(CALL_FORCE_REMOVE, 21) == KVH_OK, "forced remove of a pinned key");
        CHECK(contains1(21, 0) == KVH_ERR_NOT_FOUND, "key still there after a forced remove");
    } else {
        CHECK(ok_or_missing(key_call1(CALL_PIN, 20)), "pin");
        CHECK(ok_or_missing(key_call1(CALL_UNPIN, 20)), "unpin");
        CHECK(contains1(21, 1) == KVH_ERR_NOT_FOUND, "contains with pin on a plugin that keeps nothing");
    }
    /* Empty batches. */
    struct key_req *r = xcalloc(sizeof *r);
    key_sync(r, CALL_PIN);
    key_sync(r, CALL_UNPIN);
    free(r);
    phase_end("%s", g.hits ? "counted pins, remove refused while pinned, forced remove, contains(pin=1)"
                           : "pin, unpin and contains(pin=1) on a plugin that keeps nothing");
}

/* ================================================================================================ */
/* Phase: remove                                                                                    */
/* ================================================================================================ */

static void phase_remove(void) {
    phase_begin("remove");
    struct key_req *r = xcalloc(sizeof *r);
    keys_add(&r->keys, 2);
    keys_add(&r->keys, MISSING_ID_A);
    key_sync(r, CALL_REMOVE);
    kvh_status removed = r->status[0];
    kvh_status missing = r->status[1];
    free(r);
    kvh_status forced = key_call1(CALL_FORCE_REMOVE, 4);
    if (g.hits) {
        CHECK(removed == KVH_OK && missing == KVH_ERR_NOT_FOUND, "remove [stored, missing]: %s, %s",
              kvh_util_status_name(removed), kvh_util_status_name(missing));
        CHECK(forced == KVH_OK, "forced remove: %s", kvh_util_status_name(forced));
    } else {
        CHECK(ok_or_missing(removed) && ok_or_missing(missing) && ok_or_missing(forced), "remove: %s %s %s",
              kvh_util_status_name(removed), kvh_util_status_name(missing), kvh_util_status_name(forced));
    }
    CHECK(contains1(2, 0) == KVH_ERR_NOT_FOUND && contains1(4, 0) == KVH_ERR_NOT_FOUND, "removed keys still there");
    if (g.quirk != QUIRK_NEVER_COMPLETES) {
        struct get_req *gr = xcalloc(sizeof *gr);
        get_add(gr, 2, 16);
        get_sync(gr, "get after remove");
        CHECK(gr->status[0] == KVH_ERR_NOT_FOUND, "get after remove: %s", kvh_util_status_name(gr->status[0]));
        get_free(gr);
    }
    r = xcalloc(sizeof *r);
    key_sync(r, CALL_REMOVE); /* empty batch */
    free(r);
    /* remove_async (ABI 1.2), on a key put for it. */
    bool async = has_cap(KVH_CAP_ASYNC_REMOVE) && g.quirk != QUIRK_NEVER_COMPLETES;
    if (async) {
        struct put_req *pr = xcalloc(sizeof *pr);
        put_add(pr, 300001, 1, 5000);
        put_sync(pr, "put for remove_async");
        put_free(pr);
        kvh_status first = key_call1(CALL_REMOVE_ASYNC, 300001);
        kvh_status second = key_call1(CALL_REMOVE_ASYNC, 300001);
        if (g.hits) {
            CHECK(first == KVH_OK && second == KVH_ERR_NOT_FOUND, "remove_async twice: %s, %s", kvh_util_status_name(first),
                  kvh_util_status_name(second));
        } else {
            CHECK(ok_or_missing(first) && ok_or_missing(second), "remove_async: %s %s", kvh_util_status_name(first),
                  kvh_util_status_name(second));
        }
        CHECK(contains1(300001, 0) == KVH_ERR_NOT_FOUND, "key still there after remove_async");
        r = xcalloc(sizeof *r);
        key_sync(r, CALL_REMOVE_ASYNC); /* empty batch */
        free(r);
    }
    phase_end("plain, forced, missing key, empty batch%s", async ? "; remove_async" : "");
}

/* ================================================================================================ */
/* Phase: prefetch                                                                                  */
/* ================================================================================================ */

static void phase_prefetch(void) {
    phase_begin("prefetch");
    struct key_req *r = xcalloc(sizeof *r);
    keys_add(&r->keys, 3);
    keys_add(&r->keys, 5);
    keys_add(&r->keys, MISSING_ID_A);
    key_sync(r, CALL_PREFETCH);
    if (g.hits) {
        CHECK(r->status[0] == KVH_OK && r->status[1] == KVH_OK && r->status[2] == KVH_ERR_NOT_FOUND,
              "prefetch [stored, stored, missing]: %s %s %s", kvh_util_status_name(r->status[0]), kvh_util_status_name(r->status[1]),
              kvh_util_status_name(r->status[2]));
    } else {
        /* Per-item OK promises a cheap get; a plugin that keeps nothing cannot promise that. */
        for (size_t i = 0; i < 3; i++) {
            CHECK(r->status[i] != KVH_OK, "prefetch item %zu OK on a plugin that keeps nothing", i);
        }
    }
    free(r);
    r = xcalloc(sizeof *r);
    key_sync(r, CALL_PREFETCH); /* empty batch */
    free(r);
    phase_end("stored, missing, empty batch");
}

/* ================================================================================================ */
/* Phase: flush                                                                                     */
/* ================================================================================================ */

static void phase_flush(void) {
    phase_begin("flush");
    /* Flush while puts are still in flight, then wait for them. */
    enum { N = 8 };
    struct put_req *r[N];
    kvh_status rc[N];
    for (int i = 0; i < N; i++) {
        r[i] = xcalloc(sizeof *r[i]);
        put_add(r[i], 30 + i, 1, 1024);
        rc[i] = put_submit(r[i]);
        if (rc[i] != KVH_PENDING && rc[i] != KVH_OK) {
            check_last_error("put before flush");
        }
    }
    kvh_status flushed = g.vt.flush(g.backend);
    if (flushed != KVH_OK) {
        check_last_error("flush");
    }
    CHECK(flushed == KVH_OK, "flush with puts in flight: %s", kvh_util_status_name(flushed));
    for (int i = 0; i < N; i++) {
        check_put_result(r[i], op_finish(&r[i]->op, rc[i], "put before flush"), "put before flush");
        put_free(r[i]);
    }
    flushed = g.vt.flush(g.backend);
    CHECK(flushed == KVH_OK, "flush: %s", kvh_util_status_name(flushed));
    for (int i = 0; i < N; i++) {
        CHECK(contains1(30 + i, 0) == stored_status(), "key %d after flush", 30 + i);
    }
    phase_end("with %d puts in flight, and idle", N);
}

/* ================================================================================================ */
/* Phase: health                                                                                    */
/* ================================================================================================ */

static void phase_health(void) {
    phase_begin("health");
    char message[256 + CANARY_LEN];
    memset(message, CANARY, sizeof message);
    kvh_status rc = g.vt.health(g.backend, (kvh_message_buf){ message, 256 });
    CHECK(rc == KVH_OK, "health: %s", kvh_util_status_name(rc));
    CHECK(memchr(message, '\0', 256) != NULL && canary_intact(message + 256), "health message not NUL-terminated "
                                                                              "within its buffer");
    message[255] = '\0';
    CHECK(strlen(message) > 0 && str_valid((kvh_str){ message, strlen(message) }), "health message empty or not UTF-8");

    char small[4 + CANARY_LEN];
    memset(small, CANARY, sizeof small);
    rc = g.vt.health(g.backend, (kvh_message_buf){ small, 4 });
    CHECK(rc == KVH_OK && memchr(small, '\0', 4) != NULL && canary_intact(small + 4),
          "health with a 4-byte buffer: %s, or it overran", kvh_util_status_name(rc));
    CHECK(strncmp(small, message, strnlen(small, 4)) == 0, "truncated health message is not a prefix");

    rc = g.vt.health(g.backend, (kvh_message_buf){ NULL, 0 });
    CHECK(rc == KVH_OK, "health without a buffer: %s", kvh_util_status_name(rc));
    phase_end("\"%s\"", message);
}

/* ================================================================================================ */
/* Phase: clear                                                                                     */
/* ================================================================================================ */

/* clear removes every chunk, pinned ones too; the backend keeps working afterwards. */
static void phase_clear(void) {
    phase_begin("clear");
    struct put_req *p = xcalloc(sizeof *p);
    put_add(p, 40, 1, 512);
    put_add(p, 41, 1, 512);
    put_sync(p, "put before clear");
    put_free(p);
    bool pinned = has_cap(KVH_CAP_PIN) && g.hits;
    if (pinned) {
        CHECK(key_call1(CALL_PIN, 41) == KVH_OK, "pin before clear");
    }

    kvh_status rc = g.vt.clear(g.backend);
    if (rc != KVH_OK) {
        check_last_error("clear");
    }
    CHECK(rc == KVH_OK, "clear: %s", kvh_util_status_name(rc));
    kvh_status status[MAX_BATCH];
    kvh_chunk_meta meta[MAX_BATCH];
    int64_t ids[MAX_BATCH] = { 40, 41, 1, 3, 5, 7, 9, TAGGED_KEY_ID };
    contains_ids(ids, MAX_BATCH, 0, status, meta);
    for (size_t i = 0; i < MAX_BATCH; i++) {
        CHECK(status[i] == KVH_ERR_NOT_FOUND, "key %" PRId64 " after clear: %s", ids[i], kvh_util_status_name(status[i]));
    }
    if (pinned) {
        kvh_status unpinned = key_call1(CALL_UNPIN, 41);
        CHECK(unpinned == KVH_ERR_NOT_FOUND, "unpin of a key removed by clear: %s", kvh_util_status_name(unpinned));
    }

    /* Still usable. */
    p = xcalloc(sizeof *p);
    put_add(p, 42, 1, 100);
    put_sync(p, "put after clear");
    put_free(p);
    struct get_req *r = xcalloc(sizeof *r);
    get_add(r, 42, 100);
    get_sync(r, "get after clear");
    CHECK(r->status[0] == stored_status(), "get after clear: %s", kvh_util_status_name(r->status[0]));
    if (r->status[0] == KVH_OK) {
        check_chunk(42, 1, 100, r->out_len[0], &r->out_meta[0], r->buf[0]);
    }
    get_free(r);
    rc = g.vt.clear(g.backend);
    CHECK(rc == KVH_OK, "second clear: %s", kvh_util_status_name(rc));
    phase_end("removes every chunk%s; the backend works afterwards", pinned ? " (pinned too)" : "");
}

/* ================================================================================================ */
/* Phase: last_error                                                                                */
/* ================================================================================================ */

static void *last_error_fresh_thread(void *arg) {
    size_t *out = arg;
    char buf[64];
    *out = g.vt.last_error(g.backend, buf, sizeof buf);
    return NULL;
}

static void phase_last_error(void) {
    phase_begin("last_error");
    /* A thread that never made a failed call has no last error. */
    size_t fresh = SIZE_MAX;
    pthread_t thread;
    if (pthread_create(&thread, NULL, last_error_fresh_thread, &fresh) != 0) {
        fatal("pthread_create failed");
    }
    pthread_join(thread, NULL);
    CHECK(fresh == 0, "last_error on a thread without failed calls returned %zu", fresh);

    /* On this thread: whatever it returns, it respects the buffer and reports a consistent length. */
    char buf[256 + CANARY_LEN];
    memset(buf, CANARY, sizeof buf);
    size_t len = g.vt.last_error(g.backend, buf, 256);
    if (len > 0) {
        check_last_error("call earlier in this run");
    } else {
        CHECK(canary_intact(buf + 256), "last_error wrote past its buffer");
    }
    buf[255] = '\0';
    phase_end("fresh thread: 0; this thread: %zu%s%s%s", len, len ? " \"" : "", len ? buf : "", len ? "\"" : "");
}

/* ================================================================================================ */
/* Phase: concurrency                                                                               */
/* ================================================================================================ */

#define N_THREADS 4
#define N_ROUNDS 50

/* One thread's life cycle of its own keys: put, get, contains, pin/unpin, prefetch, health, remove,
 * get again. Keys are distinct per thread, so every result is predictable. */
static void *concurrency_thread(void *arg) {
    int t = (int)(intptr_t)arg;
    for (int round = 0; round < N_ROUNDS; round++) {
        int64_t id = 100000 * (t + 1) + round;
        size_t size = 64 + (size_t)(round * 997 % 4000);

        struct put_req *p = xcalloc(sizeof *p);
        put_add(p, id, 1, size);
        put_sync(p, "concurrent put");
        put_free(p);

        struct get_req *r = xcalloc(sizeof *r);
        get_add(r, id, size);
        get_sync(r, "concurrent get");
        CHECK(r->status[0] == stored_status(), "concurrent get %s: %s", r->keys.text[0], kvh_util_status_name(r->status[0]));
        if (r->status[0] == KVH_OK) {
            check_chunk(id, 1, size, r->out_len[0], &r->out_meta[0], r->buf[0]);
        }
        get_free(r);

        CHECK(contains1(id, 0) == stored_status(), "concurrent contains");
        if (has_cap(KVH_CAP_PIN) && round % 4 == 0) {
            kvh_status pinned = key_call1(CALL_PIN, id);
            kvh_status unpinned = key_call1(CALL_UNPIN, id);
            CHECK(g.hits ? pinned == KVH_OK && unpinned == KVH_OK : ok_or_missing(pinned) && ok_or_missing(unpinned),
                  "concurrent pin/unpin: %s, %s", kvh_util_status_name(pinned), kvh_util_status_name(unpinned));
        }
        if (has_cap(KVH_CAP_PREFETCH) && round % 3 == 0) {
            kvh_status s = key_call1(CALL_PREFETCH, id);
            CHECK(g.hits ? s == KVH_OK : s != KVH_OK, "concurrent prefetch: %s", kvh_util_status_name(s));
        }
        if (has_cap(KVH_CAP_HEALTH) && round % 8 == 0) {
            char message[128];
            CHECK(g.vt.health(g.backend, (kvh_message_buf){ message, sizeof message }) == KVH_OK, "concurrent health");
        }
        kvh_status removed = key_call1(round % 2 ? CALL_FORCE_REMOVE : CALL_REMOVE, id);
        CHECK(g.hits ? removed == KVH_OK : ok_or_missing(removed), "concurrent remove: %s", kvh_util_status_name(removed));

        r = xcalloc(sizeof *r);
        get_add(r, id, size);
        get_sync(r, "concurrent get after remove");
        CHECK(r->status[0] == KVH_ERR_NOT_FOUND, "concurrent get after remove: %s", kvh_util_status_name(r->status[0]));
        get_free(r);
    }
    return NULL;
}

static void phase_concurrency(void) {
    phase_begin("concurrency");
    pthread_t threads[N_THREADS];
    for (int t = 0; t < N_THREADS; t++) {
        if (pthread_create(&threads[t], NULL, concurrency_thread, (void *)(intptr_t)t) != 0) {
            fatal("pthread_create failed");
        }
    }
    for (int t = 0; t < N_THREADS; t++) {
        pthread_join(threads[t], NULL);
    }
    phase_end("%d threads x %d rounds of put/get/contains/remove on their own keys", N_THREADS, N_ROUNDS);
}

/* ================================================================================================ */
/* Phase: destroy with operations in flight                                                         */
/* ================================================================================================ */

#define N_IN_FLIGHT 36

static void *open_gate_later(void *arg) {
    (void)arg;
    sleep_us(50000);
    atomic_store(&g_gate_open, true);
    return NULL;
}

/* Submits N_IN_FLIGHT operations without waiting, then destroys the backend. Every completion that runs
 * on a plugin thread blocks until a helper thread opens a gate 50 ms after destroy started, so no
 * operation can count as finished before destroy is called: neither on a plugin with a worker thread
 * (the first completion holds up the worker, the rest stay queued) nor on one completing from its I/O
 * library's callbacks (rados). The ABI: destroy finishes or cancels every pending operation, their
 * callbacks fire before it returns, and none fires after. */
static void phase_destroy(void) {
    phase_begin("destroy in flight");
    struct {
        enum { OP_PUT, OP_GET, OP_PREFETCH, OP_CONTAINS } kind;
        void *req;
        struct op *op;
        kvh_status rc;
    } ops[N_IN_FLIGHT];
    size_t pending = 0;
    size_t refused_busy = 0;

    for (int i = 0; i < N_IN_FLIGHT; i++) {
        int kind = i % 3;
        if (kind == OP_PREFETCH && !has_cap(KVH_CAP_PREFETCH)) {
            kind = has_cap(KVH_CAP_ASYNC_CONTAINS) ? OP_CONTAINS : OP_GET;
        }
        ops[i].kind = kind;
        if (kind == OP_PUT) {
            struct put_req *r = xcalloc(sizeof *r);
            for (int j = 0; j < 4; j++) {
                put_add(r, 200000 + i * 4 + j, 1, 16384);
            }
            r->op.wait_for_gate = true;
            ops[i].req = r;
            ops[i].op = &r->op;
            ops[i].rc = put_submit(r);
        } else if (kind == OP_GET) {
            struct get_req *r = xcalloc(sizeof *r);
            get_add(r, 3, 256);                      /* stored in the put phase */
            get_add(r, 200000 + (i - 1) * 4, 16384); /* put just before: may or may not be stored yet */
            get_add(r, MISSING_ID_B, 64);
            r->op.wait_for_gate = true;
            ops[i].req = r;
            ops[i].op = &r->op;
            ops[i].rc = get_submit(r);
        } else if (kind == OP_CONTAINS) {
            struct contains_req *r = xcalloc(sizeof *r);
            keys_add(&r->keys, 3);
            keys_add(&r->keys, MISSING_ID_B);
            r->batch = (kvh_contains_batch){ r->keys.k, r->meta, r->status, r->keys.len, 0, 0 };
            r->status[0] = r->status[1] = KVH_ERR_NO_RESULT;
            op_init(&r->op, r->status, r->keys.len);
            r->op.wait_for_gate = true;
            ops[i].req = r;
            ops[i].op = &r->op;
            ops[i].rc = g.vt.contains_async(g.backend, &r->batch, completion_for(&r->op));
        } else {
            struct key_req *r = xcalloc(sizeof *r);
            keys_add(&r->keys, 5);
            keys_add(&r->keys, MISSING_ID_B);
            r->op.wait_for_gate = true;
            ops[i].req = r;
            ops[i].op = &r->op;
            ops[i].rc = key_submit(r, CALL_PREFETCH);
        }
        if (ops[i].rc == KVH_PENDING) {
            pending++;
            atomic_fetch_add(&g_pending, 1);
        } else if (ops[i].rc == KVH_ERR_BUSY) {
            refused_busy++;
            check_last_error("put/get refused with BUSY");
        } else if (ops[i].kind == OP_PUT && g.quirk == QUIRK_PUT_THROWS) {
            CHECK(ops[i].rc == KVH_ERR_PANIC, "put: want PANIC from the throwing fixture, got %s", kvh_util_status_name(ops[i].rc));
        } else {
            CHECK(ops[i].rc == KVH_OK, "op %d returned %s", i, kvh_util_status_name(ops[i].rc));
        }
    }

    size_t in_flight = 0;
    for (int i = 0; i < N_IN_FLIGHT; i++) {
        if (ops[i].rc == KVH_PENDING) {
            in_flight += atomic_load(&ops[i].op->fired) == 0;
        } else {
            CHECK(atomic_load(&ops[i].op->fired) == 0, "op %d returned %s, yet its completion fired", i,
                  kvh_util_status_name(ops[i].rc));
        }
    }
    if (pending > 0 && refused_busy == 0) {
        CHECK(in_flight >= 32, "only %zu of %d operations still in flight at destroy", in_flight, N_IN_FLIGHT);
    }

    pthread_t opener;
    if (pthread_create(&opener, NULL, open_gate_later, NULL) != 0) {
        fatal("pthread_create failed");
    }
    g.vt.destroy(g.backend);
    long completions_after_destroy = atomic_load(&g_completions);
    g.backend = NULL;

    size_t ok = 0, canceled = 0, other = 0;
    for (int i = 0; i < N_IN_FLIGHT; i++) {
        if (ops[i].rc != KVH_PENDING) {
            continue;
        }
        int fired = atomic_load(&ops[i].op->fired);
        CHECK(fired == 1, "op %d: completion fired %d times by the time destroy returned", i, fired);
        kvh_status status = atomic_load(&ops[i].op->status);
        if (status == KVH_OK) {
            ok++;
            CHECK(atomic_load(&ops[i].op->items_written), "op %d completed OK without every item_status", i);
        } else if (status == KVH_ERR_CANCELED) {
            canceled++;
        } else {
            other++;
        }
    }
    pthread_join(opener, NULL);
    /* No callback may fire after destroy returned: give a late one the chance to show up. */
    sleep_us(50000);
    CHECK(atomic_load(&g_completions) == completions_after_destroy, "%ld completions fired after destroy returned",
          atomic_load(&g_completions) - completions_after_destroy);
    for (int i = 0; i < N_IN_FLIGHT; i++) {
        if (ops[i].rc == KVH_PENDING) {
            CHECK(atomic_load(&ops[i].op->fired) == 1, "op %d: fired again after destroy", i);
        }
        switch (ops[i].kind) {
        case OP_PUT: put_free(ops[i].req); break;
        case OP_GET: get_free(ops[i].req); break;
        case OP_PREFETCH: free(ops[i].req); break;
        case OP_CONTAINS: free(ops[i].req); break;
        }
    }
    if (pending == 0) {
        phase_end("%d operations, all synchronous: nothing in flight", N_IN_FLIGHT);
    } else {
        phase_end("%d submitted, %zu in flight at destroy; all completed before it returned (%zu OK, %zu canceled, "
                  "%zu other)%s",
                  N_IN_FLIGHT, in_flight, ok, canceled, other, refused_busy ? ", some refused with BUSY" : "");
    }
}

/* ================================================================================================ */
/* Phase: host API summary                                                                          */
/* ================================================================================================ */

static void phase_host(void) {
    phase_begin("host api");
    CHECK(atomic_load(&g_host_ctx.malformed) == 0, "%ld malformed log calls or completion messages",
          atomic_load(&g_host_ctx.malformed));
    CHECK(atomic_load(&g_completions) == atomic_load(&g_pending), "%ld PENDING returns but %ld completions",
          atomic_load(&g_pending), atomic_load(&g_completions));
    phase_end("%ld PENDING, %ld completions; log messages error=%ld warn=%ld info=%ld debug=%ld trace=%ld",
              atomic_load(&g_pending), atomic_load(&g_completions), atomic_load(&g_host_ctx.messages[1]),
              atomic_load(&g_host_ctx.messages[2]), atomic_load(&g_host_ctx.messages[3]),
              atomic_load(&g_host_ctx.messages[4]), atomic_load(&g_host_ctx.messages[5]));
}

/* ================================================================================================ */
/* main                                                                                             */
/* ================================================================================================ */

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <plugin.so> <class_name> [key=value ...]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *verbose = getenv("KVH_DRIVER_VERBOSE");
    g_host_ctx.verbose = verbose != NULL && *verbose != '\0' && strcmp(verbose, "0") != 0;
    g_main_thread = pthread_self();
    g.path = argv[1];
    g.class_name = argv[2];

    phase_load();
    phase_create(argc - 3, argv + 3);

    /* fx_hang never completes a put or get on its own: only the synchronous calls and destroy apply. */
    bool async_works = g.quirk != QUIRK_NEVER_COMPLETES;
    if (async_works) {
        phase_put();
    } else {
        phase_skip("put", "the fixture completes puts only at destroy");
    }
    phase_contains();
    if (async_works) {
        phase_get();
    } else {
        phase_skip("get", "the fixture completes gets only at destroy");
    }
    if (has_cap(KVH_CAP_PIN) && async_works) {
        phase_pin();
    } else {
        phase_skip("pin", has_cap(KVH_CAP_PIN) ? "the fixture completes puts only at destroy" : "no KVH_CAP_PIN");
    }
    phase_remove();
    if (has_cap(KVH_CAP_PREFETCH)) {
        phase_prefetch();
    } else {
        phase_skip("prefetch", "no KVH_CAP_PREFETCH");
    }
    if (has_cap(KVH_CAP_FLUSH) && async_works) {
        phase_flush();
    } else {
        phase_skip("flush", has_cap(KVH_CAP_FLUSH) ? "the fixture completes puts only at destroy" : "no KVH_CAP_FLUSH");
    }
    if (has_cap(KVH_CAP_HEALTH)) {
        phase_health();
    } else {
        phase_skip("health", "no KVH_CAP_HEALTH");
    }
    if (has_cap(KVH_CAP_CLEAR) && async_works) {
        phase_clear();
    } else {
        phase_skip("clear", has_cap(KVH_CAP_CLEAR) ? "the fixture completes puts only at destroy" : "no KVH_CAP_CLEAR");
    }
    if (g.vt.last_error != NULL) {
        phase_last_error();
    } else {
        phase_skip("last_error", "not implemented (optional)");
    }
    if (async_works) {
        phase_concurrency();
    } else {
        phase_skip("concurrency", "the fixture completes puts only at destroy");
    }
    phase_destroy();
    phase_host();

    print_summary();
    return atomic_load(&g_failed) == 0 ? 0 : 1;
}
