/*
 * kvhost_plugin_util.h: optional helpers for storage plugins written in C (C11).
 *
 * Not part of the ABI and not generated: every function here is `static`, so it is compiled into the
 * plugin that includes it and nothing crosses the plugin boundary. Include it after
 * `kvhost_plugin.h`. What it gives:
 *
 * - kvh_util_utf8_boundary, kvh_util_write_message: fill a host `kvh_message_buf` with a formatted
 *   message, truncated (on a UTF-8 character boundary) rather than overflowed;
 * - kvh_util_str_precision, kvh_util_str_chars, kvh_util_str_equals: print and compare `kvh_str`s
 *   (which are not NUL-terminated) safely, `printf("%.*s", kvh_util_str_precision(s), kvh_util_str_chars(s))`;
 * - kvh_util_status_name: the name of a `kvh_status`, for log lines;
 * - kvh_util_log_enabled, kvh_util_log: format a message and hand it to the host's logger under the
 *   plugin's target, skipping the formatting when the host would drop it;
 * - kvh_util_stats_begin, kvh_util_stat, kvh_util_stats_end: fill the `stats` entry's array (ABI 1.3),
 *   counting what does not fit so the host can offer a larger one;
 * - kvh_util_set_last_error, kvh_util_last_error, kvh_util_null_param: the per-thread "last error"
 *   the ABI's `last_error` entry reports. The slot remembers which backend set it, so one backend never
 *   reports another's error when a thread uses several.
 *
 * Threads: every function may be called from any thread.
 *
 * Linkage: every function is `static` (internal linkage), so any number of translation units of one
 * plugin may include this header and link together. The last-error slot is per thread and, by
 * default, per translation unit: errors set in one .c file are seen by `kvh_util_last_error` called
 * in the same file. A plugin of several files that sets errors in one and answers `last_error` in
 * another defines KVH_UTIL_SHARED_LAST_ERROR before including this header in every file, and
 * KVH_UTIL_DEFINE_LAST_ERROR as well in exactly one of them: the slot is then one hidden-visibility
 * variable shared by the whole plugin and never exported from it.
 *
 * Languages: C11 and C++17 (the slot is `_Thread_local` in C and `thread_local` in C++).
 */
#ifndef KVHOST_PLUGIN_UTIL_H
#define KVHOST_PLUGIN_UTIL_H

#include "kvhost_plugin.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define KVH_UTIL_PRINTF(fmt_index, args_index) __attribute__((format(printf, fmt_index, args_index)))
#define KVH_UTIL_UNUSED __attribute__((unused))
#else
#define KVH_UTIL_PRINTF(fmt_index, args_index)
#define KVH_UTIL_UNUSED
#endif

/* The largest length <= len that does not end inside a UTF-8 sequence, so that truncated messages stay
 * valid UTF-8 (the ABI's message buffers hold UTF-8). */
static KVH_UTIL_UNUSED size_t kvh_util_utf8_boundary(const char *text, size_t len) {
    size_t lead = len;
    /* A character is at most 4 bytes: walk back over at most 3 continuation bytes (10xxxxxx). */
    while (lead > 0 && len - lead < 3 && ((unsigned char)text[lead - 1] & 0xC0) == 0x80) {
        lead--;
    }
    if (lead == 0) {
        return len;
    }
    unsigned char first = (unsigned char)text[lead - 1];
    size_t needed = first < 0x80            ? 1
                    : (first & 0xE0) == 0xC0 ? 2
                    : (first & 0xF0) == 0xE0 ? 3
                    : (first & 0xF8) == 0xF0 ? 4
                                             : 1;
    size_t present = len - (lead - 1);
    return present < needed ? lead - 1 : len;
}

/* Write a formatted, NUL-terminated message into a host buffer, truncated to its capacity. */
static KVH_UTIL_UNUSED void kvh_util_write_message(kvh_message_buf buf, const char *fmt, ...) KVH_UTIL_PRINTF(2, 3);
static KVH_UTIL_UNUSED void kvh_util_write_message(kvh_message_buf buf, const char *fmt, ...) {
    if (buf.ptr == NULL || buf.cap == 0) {
        return;
    }
    va_list args;
    va_start(args, fmt);
    int written = vsnprintf(buf.ptr, buf.cap, fmt, args);
    va_end(args);
    if (written < 0) {
        buf.ptr[0] = '\0';
    } else if ((size_t)written >= buf.cap) {
        buf.ptr[kvh_util_utf8_boundary(buf.ptr, buf.cap - 1)] = '\0';
    }
}

/* The length of a kvh_str as a printf precision ("%.*s"), clamped so the int conversion is defined. */
static KVH_UTIL_UNUSED int kvh_util_str_precision(kvh_str s) {
    if (s.ptr == NULL) {
        return 0;
    }
    return s.len > (size_t)INT_MAX ? INT_MAX : (int)s.len;
}

/* A pointer for "%.*s": never NULL, because passing NULL to %s is undefined even with precision 0. */
static KVH_UTIL_UNUSED const char *kvh_util_str_chars(kvh_str s) {
    return s.ptr != NULL ? s.ptr : "";
}

/* Whether a kvh_str holds exactly the bytes of a C string. */
static KVH_UTIL_UNUSED int kvh_util_str_equals(kvh_str s, const char *literal) {
    size_t len = strlen(literal);
    return s.len == len && (len == 0 || (s.ptr != NULL && memcmp(s.ptr, literal, len) == 0));
}

/* The name of a status code ("UNKNOWN" for codes this header does not know): kvh_status_name, the
 * table generated into kvhost_plugin.h. */
static KVH_UTIL_UNUSED const char *kvh_util_status_name(kvh_status status) {
    return kvh_status_name(status);
}

/* Whether a message at `level` would be recorded: lets callers skip formatting and per-key loops. */
static KVH_UTIL_UNUSED int kvh_util_log_enabled(const kvh_host_api *host, int32_t level) {
    if (host == NULL || host->log == NULL) {
        return 0;
    }
    return host->log_enabled == NULL || host->log_enabled(host->host_ctx, level);
}

/* Format a message and hand it to the host's logger under `target` (the plugin's name). Long
 * messages (keys with many tags) are formatted on the heap rather than truncated; if that allocation
 * fails the message is truncated. */
static KVH_UTIL_UNUSED void kvh_util_log(const kvh_host_api *host, const char *target, int32_t level, const char *fmt, ...)
    KVH_UTIL_PRINTF(4, 5);
static KVH_UTIL_UNUSED void kvh_util_log(const kvh_host_api *host, const char *target, int32_t level, const char *fmt, ...) {
    if (!kvh_util_log_enabled(host, level)) {
        return;
    }
    char stack_text[512];
    char *heap_text = NULL;
    const char *text = stack_text;
    va_list args;
    va_list args_again;
    va_start(args, fmt);
    va_copy(args_again, args);
    int written = vsnprintf(stack_text, sizeof stack_text, fmt, args);
    va_end(args);
    size_t len = 0;
    if (written >= 0 && (size_t)written < sizeof stack_text) {
        len = (size_t)written;
    } else if (written >= 0) {
        heap_text = (char *)malloc((size_t)written + 1);
        if (heap_text != NULL && vsnprintf(heap_text, (size_t)written + 1, fmt, args_again) == written) {
            text = heap_text;
            len = (size_t)written;
        } else {
            len = kvh_util_utf8_boundary(stack_text, sizeof stack_text - 1);
        }
    }
    va_end(args_again);
    if (written >= 0) {
        kvh_str target_str = { target, strlen(target) };
        kvh_str text_str = { text, len };
        host->log(host->host_ctx, level, target_str, text_str);
    }
    free(heap_text);
}

/* `stats` (ABI 1.3): start an answer (nothing written yet). */
static KVH_UTIL_UNUSED void kvh_util_stats_begin(kvh_stats_buf *out) {
    out->len = 0;
}

/* `stats`: add one entry. `name` is 1-47 bytes of [a-z0-9_] (longer names are cut at 47); `kind` is
 * KVH_STAT_COUNTER or KVH_STAT_GAUGE. An entry past the host's array is counted, not written. */
static KVH_UTIL_UNUSED void kvh_util_stat(kvh_stats_buf *out, const char *name, uint32_t kind, uint64_t value) {
    if (out->items != NULL && out->len < out->cap) {
        kvh_stat *stat = &out->items[out->len];
        size_t len = strlen(name);
        len = len < KVH_STAT_NAME_CAP - 1 ? len : KVH_STAT_NAME_CAP - 1;
        memset(stat->name, 0, sizeof stat->name);
        memcpy(stat->name, name, len);
        stat->value = value;
        stat->kind = kind;
        stat->reserved = 0;
    }
    out->len++;
}

/* `stats`: the status to return: KVH_OK, or KVH_ERR_BUFFER_TOO_SMALL with `len` the entries needed. */
static KVH_UTIL_UNUSED kvh_status kvh_util_stats_end(const kvh_stats_buf *out) {
    return out->len <= out->cap ? KVH_OK : KVH_ERR_BUFFER_TOO_SMALL;
}

/* Bytes of a last-error message kept (longer ones are truncated on a character boundary). Define it
 * before including this header to change it. */
#ifndef KVH_UTIL_LAST_ERROR_CAP
#define KVH_UTIL_LAST_ERROR_CAP 512
#endif

#ifdef __cplusplus
#define KVH_UTIL_THREAD_LOCAL thread_local
#else
#define KVH_UTIL_THREAD_LOCAL _Thread_local
#endif

/* This thread's last error, and the backend that set it. */
struct kvh_util_last_error_slot {
    const kvh_backend *backend;
    size_t len;
    char text[KVH_UTIL_LAST_ERROR_CAP];
};

#if defined(KVH_UTIL_SHARED_LAST_ERROR)
#if !defined(__GNUC__) && !defined(__clang__)
#error "KVH_UTIL_SHARED_LAST_ERROR needs __attribute__((visibility)) (GCC or Clang) to keep the slot inside the plugin"
#endif
#ifdef __cplusplus
extern "C" {
#endif
/* One slot for the whole plugin: hidden, so the dynamic linker never exports or interposes it. */
extern __attribute__((visibility("hidden"))) KVH_UTIL_THREAD_LOCAL struct kvh_util_last_error_slot kvh_util_tls_last_error;
#ifdef KVH_UTIL_DEFINE_LAST_ERROR
__attribute__((visibility("hidden"))) KVH_UTIL_THREAD_LOCAL struct kvh_util_last_error_slot kvh_util_tls_last_error;
#endif
#ifdef __cplusplus
}
#endif
#else
static KVH_UTIL_THREAD_LOCAL struct kvh_util_last_error_slot kvh_util_tls_last_error;
#endif

/* Record this thread's last error for `backend` (what its `last_error` entry then reports). */
static KVH_UTIL_UNUSED void kvh_util_set_last_error(const kvh_backend *backend, const char *fmt, ...) KVH_UTIL_PRINTF(2, 3);
static KVH_UTIL_UNUSED void kvh_util_set_last_error(const kvh_backend *backend, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    int written = vsnprintf(kvh_util_tls_last_error.text, sizeof kvh_util_tls_last_error.text, fmt, args);
    va_end(args);
    size_t len = 0;
    if (written >= 0) {
        len = (size_t)written < sizeof kvh_util_tls_last_error.text
                  ? (size_t)written
                  : kvh_util_utf8_boundary(kvh_util_tls_last_error.text, sizeof kvh_util_tls_last_error.text - 1);
    }
    kvh_util_tls_last_error.text[len] = '\0';
    kvh_util_tls_last_error.len = len;
    kvh_util_tls_last_error.backend = backend;
}

/* The ABI's `last_error` for `backend`: copy this thread's last error (if `backend` set it) into
 * `buf` (NUL-terminated, truncated to `cap`) and return its full length, or 0 if there is none. */
static KVH_UTIL_UNUSED size_t kvh_util_last_error(const kvh_backend *backend, char *buf, size_t cap) {
    if (backend == NULL || kvh_util_tls_last_error.backend != backend || kvh_util_tls_last_error.len == 0) {
        return 0;
    }
    if (buf != NULL && cap > 0) {
        size_t copy = kvh_util_tls_last_error.len < cap
                          ? kvh_util_tls_last_error.len
                          : kvh_util_utf8_boundary(kvh_util_tls_last_error.text, cap - 1);
        memcpy(buf, kvh_util_tls_last_error.text, copy);
        buf[copy] = '\0';
    }
    return kvh_util_tls_last_error.len;
}

/* Record a whole-call NULL_PARAM error ("<operation>: <what> is NULL") and return it. */
static KVH_UTIL_UNUSED kvh_status kvh_util_null_param(const kvh_backend *backend, const char *operation, const char *what) {
    kvh_util_set_last_error(backend, "%s: %s is NULL", operation, what);
    return KVH_ERR_NULL_PARAM;
}

#endif /* KVHOST_PLUGIN_UTIL_H */
