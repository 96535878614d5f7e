/*
 * kvhost storage plugin `log`: a "black hole" backend that stores nothing and logs every call.
 *
 * A C port of LMCache's `lmc_external_log_backend` (ExternalLogBackend): contains and get always miss,
 * put accepts and drops the data, pin/unpin/remove succeed. Every call is logged through the host
 * logger, at the level chosen by the `level` option, with the key's canonical string and the size.
 * Useful to see which calls the host makes, and as the smallest complete example of the ABI.
 *
 * Every call finishes synchronously: put, get and prefetch never return KVH_PENDING, so their
 * completion callbacks never fire. The backend keeps no state besides atomic call counters, so every
 * function is safe to call from any thread concurrently.
 *
 * Build: cc -std=c11 -shared -fPIC -O2 -g -Wall -Wextra -Werror -pedantic -fvisibility=hidden -pthread \
 *            -I<dir of kvhost_plugin.h> log.c -o libkvhost_log.so
 */

#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"

#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG_TARGET "log"

/* ------------------------------------------------------------------------------------------------ */
/* Call counters                                                                                    */
/* ------------------------------------------------------------------------------------------------ */

enum log_call {
    CALL_CONTAINS,
    CALL_PUT,
    CALL_GET,
    CALL_REMOVE,
    CALL_PIN,
    CALL_UNPIN,
    CALL_PREFETCH,
    CALL_FLUSH,
    CALL_HEALTH,
    CALL_CLEAR,
    CALL_COUNT
};

static const char *const CALL_NAMES[CALL_COUNT] = {
    "contains", "put", "get", "remove", "pin", "unpin", "prefetch", "flush", "health", "clear",
};

struct kvh_backend {
    /* Valid until process exit (ABI guarantee), so it is safe to keep. */
    const kvh_host_api *host;
    /* KVH_LOG_* level at which calls are logged (the `level` option). */
    int32_t level;
    /* Calls per operation, reported by destroy. Relaxed atomics: they are statistics only. */
    atomic_uint_fast64_t calls[CALL_COUNT];
};

static void count_call(kvh_backend *backend, enum log_call call) {
    atomic_fetch_add_explicit(&backend->calls[call], 1, memory_order_relaxed);
}

/* ------------------------------------------------------------------------------------------------ */
/* Per-thread last error                                                                            */
/* ------------------------------------------------------------------------------------------------ */

static size_t log_last_error(kvh_backend *backend, char *buf, size_t cap) {
    return kvh_util_last_error(backend, buf, cap);
}

/* ------------------------------------------------------------------------------------------------ */
/* Options                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

static const kvh_option_spec LOG_OPTIONS[] = {
    {
        .key = "level",
        .default_value = "info",
        .doc = "Level at which calls are logged: error, warn, info, debug or trace.",
        .flags = 0,
        .reserved = 0,
    },
};

static const struct {
    const char *name;
    int32_t level;
} LOG_LEVELS[] = {
    { "error", KVH_LOG_ERROR }, { "warn", KVH_LOG_WARN },   { "info", KVH_LOG_INFO },
    { "debug", KVH_LOG_DEBUG }, { "trace", KVH_LOG_TRACE },
};

/* Parses the `level` option. Returns 0 on success, -1 (with a message in `error`) otherwise. */
static int parse_level(kvh_str value, int32_t *out_level, kvh_message_buf error) {
    for (size_t i = 0; i < sizeof LOG_LEVELS / sizeof LOG_LEVELS[0]; i++) {
        if (kvh_util_str_equals(value, LOG_LEVELS[i].name)) {
            *out_level = LOG_LEVELS[i].level;
            return 0;
        }
    }
    kvh_util_write_message(error, "log: invalid value '%.*s' for option 'level' (expected error, warn, info, debug or trace)",
                  kvh_util_str_precision(value), kvh_util_str_chars(value));
    return -1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Operations                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static kvh_status log_create(const kvh_host_api *host, const kvh_options *options, const kvh_model_metadata *metadata,
                             kvh_backend **out_backend, kvh_message_buf error) {
    (void)metadata; /* A black hole does not care what model it drops. */
    if (out_backend == NULL) {
        kvh_util_write_message(error, "log: create: out_backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    *out_backend = NULL;
    if (host == NULL || options == NULL || (options->items == NULL && options->len > 0)) {
        kvh_util_write_message(error, "log: create: host or options is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    /* We keep `host` and call its log functions, which exist only in a table of at least v1.0 size. */
    if (host->abi_major != KVH_ABI_MAJOR || host->struct_size < KVH_HOST_API_V1_0_SIZE) {
        kvh_util_write_message(error, "log: create: host API %u (size %u) is not compatible with ABI %d", (unsigned)host->abi_major,
                      (unsigned)host->struct_size, KVH_ABI_MAJOR);
        return KVH_ERR_ABI_MISMATCH;
    }

    int32_t level = KVH_LOG_INFO; /* The option's default, for a host that did not fill it in. */
    for (size_t i = 0; i < options->len; i++) {
        const kvh_option *option = &options->items[i];
        if (kvh_util_str_equals(option->key, "level")) {
            if (parse_level(option->value, &level, error) != 0) {
                return KVH_ERR_INVALID_CONFIG;
            }
        } else {
            kvh_util_write_message(error, "log: unknown option '%.*s'", kvh_util_str_precision(option->key), kvh_util_str_chars(option->key));
            return KVH_ERR_INVALID_CONFIG;
        }
    }

    kvh_backend *backend = calloc(1, sizeof *backend);
    if (backend == NULL) {
        kvh_util_write_message(error, "log: create: out of memory");
        return KVH_ERR_INTERNAL;
    }
    backend->host = host;
    backend->level = level;
    for (size_t i = 0; i < CALL_COUNT; i++) {
        atomic_init(&backend->calls[i], 0);
    }
    kvh_util_log(host, LOG_TARGET, level, "create instance=%.*s", kvh_util_str_precision(host->instance_name), kvh_util_str_chars(host->instance_name));
    *out_backend = backend;
    return KVH_OK;
}

static void log_destroy(kvh_backend *backend) {
    if (backend == NULL) {
        return;
    }
    /* " name=count" per operation; 9 x (10 + 20) bytes at most, so the buffer never truncates. */
    char summary[320] = "";
    size_t used = 0;
    for (size_t i = 0; i < CALL_COUNT; i++) {
        unsigned long long count = atomic_load_explicit(&backend->calls[i], memory_order_relaxed);
        int written = snprintf(summary + used, sizeof summary - used, " %s=%llu", CALL_NAMES[i], count);
        if (written < 0 || (size_t)written >= sizeof summary - used) {
            break;
        }
        used += (size_t)written;
    }
    kvh_util_log(backend->host, LOG_TARGET, backend->level, "destroy calls:%s", summary);
    free(backend);
}

static kvh_status log_contains(kvh_backend *backend, const kvh_contains_batch *batch) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "contains", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "contains", "keys, out_meta or item_status");
    }
    count_call(backend, CALL_CONTAINS);
    int verbose = kvh_util_log_enabled(backend->host, backend->level);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        if (verbose) {
            kvh_util_log(backend->host, LOG_TARGET, backend->level, "contains key=%.*s pin=%u", kvh_util_str_precision(key->canonical),
                     kvh_util_str_chars(key->canonical), (unsigned)batch->pin);
        }
        /* Nothing is ever stored, so there is nothing to pin either. */
        memset(&batch->out_meta[i], 0, sizeof batch->out_meta[i]);
        batch->item_status[i] = KVH_ERR_NOT_FOUND;
    }
    return KVH_OK;
}

static kvh_status log_put(kvh_backend *backend, const kvh_put_batch *batch, kvh_completion done) {
    (void)done; /* Finished synchronously: the completion never fires. */
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "put", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->src == NULL || batch->meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "put", "keys, src, meta or item_status");
    }
    count_call(backend, CALL_PUT);
    int verbose = kvh_util_log_enabled(backend->host, backend->level);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        if (verbose) {
            kvh_util_log(backend->host, LOG_TARGET, backend->level, "put key=%.*s size=%zu", kvh_util_str_precision(key->canonical),
                     kvh_util_str_chars(key->canonical), batch->src[i].len);
        }
        batch->item_status[i] = KVH_OK; /* Accepted and dropped. */
    }
    return KVH_OK;
}

static kvh_status log_get(kvh_backend *backend, const kvh_get_batch *batch, kvh_completion done) {
    (void)done; /* Finished synchronously: the completion never fires. */
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "get", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->dst == NULL || batch->out_len == NULL ||
                           batch->out_meta == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "get", "keys, dst, out_len, out_meta or item_status");
    }
    count_call(backend, CALL_GET);
    int verbose = kvh_util_log_enabled(backend->host, backend->level);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        if (verbose) {
            kvh_util_log(backend->host, LOG_TARGET, backend->level, "get key=%.*s size=%zu", kvh_util_str_precision(key->canonical),
                     kvh_util_str_chars(key->canonical), batch->dst[i].len);
        }
        batch->out_len[i] = 0;
        memset(&batch->out_meta[i], 0, sizeof batch->out_meta[i]);
        batch->item_status[i] = KVH_ERR_NOT_FOUND;
    }
    return KVH_OK;
}

/* remove, pin and unpin: log each key and report success, as the Python original returns True. */
static kvh_status log_key_batch_ok(kvh_backend *backend, const kvh_key_batch *batch, enum log_call call, const char *suffix) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, CALL_NAMES[call], "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, CALL_NAMES[call], "keys or item_status");
    }
    count_call(backend, call);
    int verbose = kvh_util_log_enabled(backend->host, backend->level);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        if (verbose) {
            kvh_util_log(backend->host, LOG_TARGET, backend->level, "%s key=%.*s%s", CALL_NAMES[call], kvh_util_str_precision(key->canonical),
                     kvh_util_str_chars(key->canonical), suffix);
        }
        batch->item_status[i] = KVH_OK;
    }
    return KVH_OK;
}

static kvh_status log_remove(kvh_backend *backend, const kvh_key_batch *batch, bool force) {
    return log_key_batch_ok(backend, batch, CALL_REMOVE, force ? " force=1" : " force=0");
}

static kvh_status log_pin(kvh_backend *backend, const kvh_key_batch *batch) {
    return log_key_batch_ok(backend, batch, CALL_PIN, "");
}

static kvh_status log_unpin(kvh_backend *backend, const kvh_key_batch *batch) {
    return log_key_batch_ok(backend, batch, CALL_UNPIN, "");
}

static kvh_status log_prefetch(kvh_backend *backend, const kvh_key_batch *batch, kvh_completion done) {
    (void)done; /* Finished synchronously: the completion never fires. */
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    if (batch == NULL) {
        return kvh_util_null_param(backend, "prefetch", "batch");
    }
    if (batch->len > 0 && (batch->keys == NULL || batch->item_status == NULL)) {
        return kvh_util_null_param(backend, "prefetch", "keys or item_status");
    }
    count_call(backend, CALL_PREFETCH);
    int verbose = kvh_util_log_enabled(backend->host, backend->level);
    for (size_t i = 0; i < batch->len; i++) {
        const kvh_key *key = &batch->keys[i];
        if (verbose) {
            kvh_util_log(backend->host, LOG_TARGET, backend->level, "prefetch key=%.*s", kvh_util_str_precision(key->canonical),
                     kvh_util_str_chars(key->canonical));
        }
        /* Per-item OK would promise a cheap get; nothing is stored, so every key is a miss. */
        batch->item_status[i] = KVH_ERR_NOT_FOUND;
    }
    return KVH_OK;
}

static kvh_status log_flush(kvh_backend *backend) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    count_call(backend, CALL_FLUSH);
    kvh_util_log(backend->host, LOG_TARGET, backend->level, "flush");
    return KVH_OK;
}

static kvh_status log_clear(kvh_backend *backend) {
    if (backend == NULL) {
        return KVH_ERR_NULL_PARAM;
    }
    count_call(backend, CALL_CLEAR);
    kvh_util_log(backend->host, LOG_TARGET, backend->level, "clear");
    return KVH_OK;
}

static kvh_status log_health(kvh_backend *backend, kvh_message_buf message) {
    if (backend == NULL) {
        kvh_util_write_message(message, "log backend: backend is NULL");
        return KVH_ERR_NULL_PARAM;
    }
    count_call(backend, CALL_HEALTH);
    kvh_util_log(backend->host, LOG_TARGET, backend->level, "health");
    kvh_util_write_message(message, "log backend: ok");
    return KVH_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* Descriptor and entry point                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static const kvh_backend_vtable LOG_VTABLE = {
    .struct_size = sizeof(kvh_backend_vtable),
    .reserved = 0,
    .create = log_create,
    .destroy = log_destroy,
    .contains = log_contains,
    .put = log_put,
    .get = log_get,
    .remove = log_remove,
    .last_error = log_last_error,
    .pin = log_pin,
    .unpin = log_unpin,
    .prefetch = log_prefetch,
    .flush = log_flush,
    .health = log_health,
    .clear = log_clear,
};

static const kvh_plugin_descriptor LOG_DESCRIPTOR = {
    .struct_size = sizeof(kvh_plugin_descriptor),
    .abi_major = KVH_ABI_MAJOR,
    .abi_minor = KVH_ABI_MINOR,
    .class_name = "log",
    .plugin_version = "0.1.0",
    .description = "Black hole: stores nothing, logs every call (C port of LMCache's lmc_external_log_backend)",
    /* DISCARDS: puts are accepted but nothing is kept, so the host never expects a hit. */
    .capabilities = KVH_CAP_PIN | KVH_CAP_PREFETCH | KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_DISCARDS |
                    KVH_CAP_CLEAR,
    .options = LOG_OPTIONS,
    .options_len = sizeof LOG_OPTIONS / sizeof LOG_OPTIONS[0],
    .vtable = &LOG_VTABLE,
};

KVH_DECLARE_PLUGIN(log) {
    (void)host; /* Nothing to negotiate: the descriptor is static and the same for every host. */
    return &LOG_DESCRIPTOR;
}
