/*
 * kvhost_plugin.hpp: a header-only C++17 wrapper over the kvhost storage-plugin C ABI (kvhost_plugin.h).
 *
 * Hand-written, NOT generated. It adds no ABI of its own: everything that crosses the plugin boundary is
 * still the C structs and function pointers of kvhost_plugin.h. STL types are used only inside the
 * plugin (no std:: type ever appears in a function the host calls), and no C++ exception ever crosses
 * the boundary: every entry of the vtable is a `noexcept` trampoline that catches everything.
 *
 * A backend in four steps:
 *
 *     #include "kvhost_plugin.hpp"
 *
 *     class MyStore final : public kvh::Backend {
 *       public:
 *         // Capabilities: each optional operation you override needs its bit, and each bit its override
 *         // (checked at compile time by KVH_EXPORT_BACKEND).
 *         static constexpr uint64_t capabilities = KVH_CAP_FLUSH | KVH_CAP_PERSISTENT;
 *         // Options: every key the config may give (see kvh::option).
 *         static constexpr kvh_option_spec options[] = {
 *             kvh::option("path", nullptr, "Where the data goes", KVH_OPTION_REQUIRED),
 *         };
 *
 *         explicit MyStore(const kvh::CreateArgs &args) : kvh::Backend(args) {
 *             path_ = std::string(args.options().get_or("path", ""));   // throw kvh::Error to refuse
 *         }
 *         kvh::Status contains(kvh::ContainsBatch batch) override;            // synchronous
 *         kvh::Status put(kvh::Request<kvh::PutBatch> &req) override;          // sync, or req.defer()
 *         kvh::Status get(kvh::Request<kvh::GetBatch> &req) override;
 *         kvh::Status remove(kvh::KeyBatch batch, bool force) override;
 *         kvh::Status flush() override;
 *     };
 *
 *     KVH_EXPORT_BACKEND(my_store, MyStore, "1.0.0", "What my store is, in one line");
 *
 * Build: c++ -std=c++17 -shared -fPIC -O2 -Wall -Wextra -Werror -pedantic -fvisibility=hidden -pthread \
 *            -I<dir of kvhost_plugin.h and this file> my_store.cpp -o libmy_store.so
 *
 * Ownership, lifetimes and threads follow kvhost_plugin.h; each type below restates what applies to it.
 * In short: every view type (Key, the batches, ByteSpan) borrows host memory and is valid for the call,
 * or, for an operation deferred with Request::defer(), until its Pending is completed. The backend
 * object is owned by the host through the opaque kvh_backend pointer: created by the `create`
 * trampoline, deleted by the `destroy` trampoline.
 *
 * Async operations (put, get, prefetch, contains_async, remove_async): either finish synchronously
 * (write every item status and return a status other than KVH_PENDING; the completion never fires), or call `req.defer()` to take a
 * move-only kvh::Pending, hand it to another thread, and return KVH_PENDING. The Pending completes the
 * operation exactly once: explicitly with complete(status), or with KVH_ERR_CANCELED when it is
 * destroyed without having been completed. Once defer() was called the trampoline returns KVH_PENDING
 * whatever happens next (even if the method then throws), because the completion will fire.
 */

#ifndef KVHOST_PLUGIN_HPP
#define KVHOST_PLUGIN_HPP

#include "kvhost_plugin.h"

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#if __cplusplus < 201703L
#error "kvhost_plugin.hpp needs C++17 (-std=c++17)"
#endif

#if defined(__GNUC__) || defined(__clang__)
/** printf-style format checking; `fmt` and `args` are 1-based parameter positions (`this` counts). */
#define KVH_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define KVH_PRINTF(fmt, args)
#endif

namespace kvh {

/** A status code: KVH_OK, KVH_PENDING or a KVH_ERR_* code (kvhost_plugin.h). Plain int32_t. */
using Status = kvh_status;

/** Chunk metadata as the ABI defines it (plain C struct, copied by value). */
using ChunkMeta = kvh_chunk_meta;

class Backend;

/* ================================================================================================ */
/* Small text helpers                                                                               */
/* ================================================================================================ */

/** The name of a status code ("OK", "NOT_FOUND", ...), or "UNKNOWN" for codes this header does not
 *  know: ::kvh_status_name, the table generated into kvhost_plugin.h. Static string; any thread. */
inline const char *status_name(Status status) noexcept { return ::kvh_status_name(status); }

/** A borrowed kvh_str as a string_view (no copy; same lifetime as the kvh_str). NULL with length 0 is
 *  an empty view. */
inline std::string_view to_view(kvh_str s) noexcept {
    return s.len == 0 || s.ptr == nullptr ? std::string_view() : std::string_view(s.ptr, s.len);
}

/** A kvh_str borrowing `s` (no copy): valid as long as the characters of `s` are. */
inline kvh_str to_str(std::string_view s) noexcept {
    kvh_str out{};
    out.ptr = s.empty() ? nullptr : s.data();
    out.len = s.size();
    return out;
}

/** The largest length <= `len` that does not cut a UTF-8 sequence of `text` in half, so truncated
 *  messages stay valid UTF-8 (the ABI's strings are UTF-8). */
inline size_t utf8_prefix(const char *text, size_t len) noexcept {
    size_t lead = len;
    while (lead > 0 && len - lead < 3 && (static_cast<unsigned char>(text[lead - 1]) & 0xC0) == 0x80) {
        lead--;
    }
    if (lead == 0) {
        return len;
    }
    const unsigned char first = static_cast<unsigned char>(text[lead - 1]);
    const size_t needed = first < 0x80 ? 1 : (first & 0xE0) == 0xC0 ? 2 : (first & 0xF0) == 0xE0 ? 3 : (first & 0xF8) == 0xF0 ? 4 : 1;
    return len - (lead - 1) < needed ? lead - 1 : len;
}

/** Copies `text` into the C buffer `buf` of `cap` bytes: NUL-terminated, truncated at a UTF-8 boundary
 *  to fit. Writes nothing when `buf` is NULL or `cap` is 0. Returns the full length of `text`.
 *  `buf` is the caller's; any thread. */
inline size_t copy_message(char *buf, size_t cap, std::string_view text) noexcept {
    if (buf == nullptr || cap == 0) {
        return text.size();
    }
    size_t n = text.size();
    if (n >= cap) {
        n = utf8_prefix(text.data(), cap - 1);
    }
    if (n > 0) {
        std::memcpy(buf, text.data(), n);
    }
    buf[n] = '\0';
    return text.size();
}

/** copy_message into a host kvh_message_buf (create's error, health's message). */
inline void write_message(kvh_message_buf buf, std::string_view text) noexcept {
    (void)copy_message(buf.ptr, buf.cap, text);
}

/** vsnprintf into a std::string. May throw std::bad_alloc. */
inline std::string vformat(const char *fmt, va_list args) {
    va_list again;
    va_copy(again, args);
    char small[256];
    const int n = std::vsnprintf(small, sizeof small, fmt, args);
    std::string out;
    if (n < 0) {
        va_end(again);
        return out;
    }
    if (static_cast<size_t>(n) < sizeof small) {
        out.assign(small, static_cast<size_t>(n));
    } else {
        out.resize(static_cast<size_t>(n) + 1);
        std::vsnprintf(&out[0], out.size(), fmt, again);
        out.resize(static_cast<size_t>(n));
    }
    va_end(again);
    return out;
}

/** snprintf into a std::string. May throw std::bad_alloc. */
inline std::string format(const char *fmt, ...) KVH_PRINTF(1, 2);
inline std::string format(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string out = vformat(fmt, args);
    va_end(args);
    return out;
}

/* ================================================================================================ */
/* Logging                                                                                          */
/* ================================================================================================ */

/** Whether the host would record a message at `level` (KVH_LOG_*), so callers can skip formatting.
 *  `host` is the one given to create (valid until process exit); any thread; never throws. */
inline bool log_enabled(const kvh_host_api *host, int32_t level) noexcept {
    if (host == nullptr || host->log == nullptr) {
        return false;
    }
    const size_t has_enabled = offsetof(kvh_host_api, log_enabled) + sizeof host->log_enabled;
    if (host->struct_size < has_enabled || host->log_enabled == nullptr) {
        return true;
    }
    return host->log_enabled(host->host_ctx, level);
}

/** Logs `message` at `level` (KVH_LOG_*) through the host, with `target` naming the plugin module (may
 *  be empty). Both strings are borrowed for the call only. Any thread; never throws; never blocks long
 *  (the host's promise). */
inline void log(const kvh_host_api *host, int32_t level, std::string_view message, std::string_view target = {}) noexcept {
    if (!log_enabled(host, level)) {
        return;
    }
    host->log(host->host_ctx, level, to_str(target), to_str(message));
}

/** printf-style log(): formats only when the level is enabled. Never throws (a failed allocation drops
 *  the message). */
inline void logf(const kvh_host_api *host, int32_t level, std::string_view target, const char *fmt, ...) KVH_PRINTF(4, 5);
inline void logf(const kvh_host_api *host, int32_t level, std::string_view target, const char *fmt, ...) {
    if (!log_enabled(host, level)) {
        return;
    }
    try {
        va_list args;
        va_start(args, fmt);
        std::string text = vformat(fmt, args);
        va_end(args);
        host->log(host->host_ctx, level, to_str(target), to_str(text));
    } catch (...) {
        // Out of memory while formatting a log line: drop the line.
    }
}

/* ================================================================================================ */
/* Errors                                                                                           */
/* ================================================================================================ */

/**
 * An exception carrying a status: the way to fail a constructor (then create returns `status()` with
 * `what()` in the host's error buffer), or to fail a whole data-path call with a specific status and a
 * message (then the trampoline returns `status()` and keeps `what()` for last_error; the backend is not
 * poisoned). Any other exception is a bug: the trampoline turns it into KVH_ERR_PANIC and logs it at
 * error level. A status of KVH_OK or KVH_PENDING is reported as KVH_ERR_INTERNAL.
 */
class Error : public std::runtime_error {
  public:
    Error(Status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    Status status() const noexcept { return status_ == KVH_OK || status_ == KVH_PENDING ? KVH_ERR_INTERNAL : status_; }

  private:
    Status status_;
};

namespace detail {

/** This thread's last error: the message and the backend it belongs to. One per thread per plugin
 *  library (C++17 inline variable: one instance across the library's translation units). */
struct LastError {
    const void *backend = nullptr;
    std::string text;
    uint64_t serial = 0; // bumped on every set, so a trampoline can tell whether the call set one
};

inline LastError &last_error_slot() noexcept {
    static thread_local LastError slot;
    return slot;
}

/** Records `text` as this thread's last error for `backend`. Never throws (out of memory keeps an
 *  empty message, the serial still moves). */
inline void set_last_error(const void *backend, std::string_view text) noexcept {
    LastError &slot = last_error_slot();
    slot.backend = backend;
    slot.serial++;
    try {
        slot.text.assign(text.data(), text.size());
    } catch (...) {
        slot.text.clear();
    }
}

} // namespace detail

/* ================================================================================================ */
/* Views over the ABI's batch structs                                                               */
/* ================================================================================================ */

/** A borrowed read-only byte range (span-like). Owned by the host; valid as the batch it came from. */
struct ByteSpan {
    const uint8_t *ptr = nullptr; ///< First byte; NULL only when len is 0.
    size_t len = 0;               ///< Bytes.
    const uint8_t *data() const noexcept { return ptr; }
    size_t size() const noexcept { return len; }
    bool empty() const noexcept { return len == 0; }
    const uint8_t *begin() const noexcept { return ptr; }
    const uint8_t *end() const noexcept { return ptr + len; }
};

/** A borrowed writable byte range (span-like). Owned by the host; writable by the plugin for the
 *  lifetime of the request it came from. */
struct MutByteSpan {
    uint8_t *ptr = nullptr; ///< First byte; NULL only when len is 0.
    size_t len = 0;         ///< Capacity in bytes.
    uint8_t *data() const noexcept { return ptr; }
    size_t size() const noexcept { return len; }
    bool empty() const noexcept { return len == 0; }
    uint8_t *begin() const noexcept { return ptr; }
    uint8_t *end() const noexcept { return ptr + len; }
};

/** A borrowed view of one kvh_key. Every string is host memory, valid for the call (or until the
 *  deferred operation completes). Copy what you keep (e.g. `std::string(key.canonical())`). */
class Key {
  public:
    explicit Key(const kvh_key &key) noexcept : k_(&key) {}
    /** The canonical string: two keys are the same key exactly when these are equal. The host puts a
     *  NUL at canonical().data()[size()]. */
    std::string_view canonical() const noexcept { return to_view(k_->canonical); }
    std::string_view model_name() const noexcept { return to_view(k_->model_name); }
    std::string_view dtype() const noexcept { return to_view(k_->dtype); }
    /** XXH3-64 of the canonical string: stable, good for sharding. */
    uint64_t key_hash() const noexcept { return k_->key_hash; }
    /** Low 64 bits of the chunk hash (the canonical string is authoritative). */
    int64_t chunk_hash() const noexcept { return k_->chunk_hash; }
    uint32_t world_size() const noexcept { return k_->world_size; }
    uint32_t worker_id() const noexcept { return k_->worker_id; }
    /** Layer id, or KVH_NO_LAYER. */
    int32_t layer_id() const noexcept { return k_->layer_id; }
    size_t tag_count() const noexcept { return k_->tags == nullptr ? 0 : k_->tags_len; }
    std::string_view tag_key(size_t i) const noexcept { return to_view(k_->tags[i].key); }
    std::string_view tag_value(size_t i) const noexcept { return to_view(k_->tags[i].value); }
    /** The C struct. */
    const kvh_key &raw() const noexcept { return *k_; }

  private:
    const kvh_key *k_;
};

/**
 * Arguments of `contains` (a view of the host's kvh_contains_batch; valid for the call). For every i,
 * call set_found or set_missing (or set_status with an error).
 */
class ContainsBatch {
  public:
    using raw_type = kvh_contains_batch;
    explicit ContainsBatch(const kvh_contains_batch *b) noexcept : b_(b) {}
    size_t size() const noexcept { return b_->len; }
    Key key(size_t i) const noexcept { return Key(b_->keys[i]); }
    /** The host asks to pin present keys (only passed to KVH_CAP_PIN backends). */
    bool pin() const noexcept { return b_->pin != 0; }
    void set_found(size_t i, const ChunkMeta &meta) const noexcept {
        b_->out_meta[i] = meta;
        b_->item_status[i] = KVH_OK;
    }
    void set_missing(size_t i) const noexcept {
        b_->out_meta[i] = ChunkMeta{};
        b_->item_status[i] = KVH_ERR_NOT_FOUND;
    }
    void set_status(size_t i, Status s) const noexcept { b_->item_status[i] = s; }
    const kvh_contains_batch &raw() const noexcept { return *b_; }

  private:
    const kvh_contains_batch *b_;
};

/**
 * Arguments of `put` (a view of the host's kvh_put_batch). Valid for the call, or until the Pending of a
 * deferred put is completed; the host does not touch it meanwhile. data(i) is read-only.
 */
class PutBatch {
  public:
    using raw_type = kvh_put_batch;
    explicit PutBatch(const kvh_put_batch *b) noexcept : b_(b) {}
    size_t size() const noexcept { return b_->len; }
    Key key(size_t i) const noexcept { return Key(b_->keys[i]); }
    /** The chunk bytes (NULL with length 0 for an empty chunk). */
    ByteSpan data(size_t i) const noexcept { return ByteSpan{b_->src[i].ptr, b_->src[i].len}; }
    /** The metadata to store with the chunk; the host guarantees meta(i).length == data(i).len. */
    const ChunkMeta &meta(size_t i) const noexcept { return b_->meta[i]; }
    /** KVH_OK stored, or an error (KVH_ERR_NO_SPACE, KVH_ERR_INVALID_ARG, ...). */
    void set_status(size_t i, Status s) const noexcept { b_->item_status[i] = s; }
    const kvh_put_batch &raw() const noexcept { return *b_; }

  private:
    const kvh_put_batch *b_;
};

/**
 * Arguments of `get` (a view of the host's kvh_get_batch). Valid for the call, or until the Pending of a
 * deferred get is completed. For every i call one of fill, set_found, set_too_small, set_missing or
 * set_status.
 */
class GetBatch {
  public:
    using raw_type = kvh_get_batch;
    explicit GetBatch(const kvh_get_batch *b) noexcept : b_(b) {}
    size_t size() const noexcept { return b_->len; }
    Key key(size_t i) const noexcept { return Key(b_->keys[i]); }
    /** The host's destination buffer: write at most dst(i).len bytes. */
    MutByteSpan dst(size_t i) const noexcept { return MutByteSpan{b_->dst[i].ptr, b_->dst[i].len}; }
    /** Copies `len` bytes into dst(i) and reports a hit with `meta` (meta.length should equal len); or,
     *  when dst(i) is too small, reports KVH_ERR_BUFFER_TOO_SMALL with `len` as the size needed.
     *  Returns whether the bytes were copied. */
    bool fill(size_t i, const void *data, size_t len, const ChunkMeta &meta) const noexcept {
        if (b_->dst[i].len < len) {
            set_too_small(i, len);
            return false;
        }
        if (len > 0) {
            std::memcpy(b_->dst[i].ptr, data, len);
        }
        set_found(i, len, meta);
        return true;
    }
    /** Reports a hit whose `len` bytes the plugin already wrote into dst(i) (e.g. with pread). */
    void set_found(size_t i, uint64_t len, const ChunkMeta &meta) const noexcept {
        b_->out_len[i] = len;
        b_->out_meta[i] = meta;
        b_->item_status[i] = KVH_OK;
    }
    /** KVH_ERR_BUFFER_TOO_SMALL; `needed` bytes would fit. */
    void set_too_small(size_t i, uint64_t needed) const noexcept {
        b_->out_len[i] = needed;
        b_->item_status[i] = KVH_ERR_BUFFER_TOO_SMALL;
    }
    void set_missing(size_t i) const noexcept {
        b_->out_len[i] = 0;
        b_->item_status[i] = KVH_ERR_NOT_FOUND;
    }
    void set_status(size_t i, Status s) const noexcept { b_->item_status[i] = s; }
    const kvh_get_batch &raw() const noexcept { return *b_; }

  private:
    const kvh_get_batch *b_;
};

/** Arguments of `remove`, `pin`, `unpin` and `prefetch` (a view of the host's kvh_key_batch). Valid for
 *  the call, or until a deferred prefetch completes. */
class KeyBatch {
  public:
    using raw_type = kvh_key_batch;
    explicit KeyBatch(const kvh_key_batch *b) noexcept : b_(b) {}
    size_t size() const noexcept { return b_->len; }
    Key key(size_t i) const noexcept { return Key(b_->keys[i]); }
    /** KVH_OK, KVH_ERR_NOT_FOUND or an error. */
    void set_status(size_t i, Status s) const noexcept { b_->item_status[i] = s; }
    const kvh_key_batch &raw() const noexcept { return *b_; }

  private:
    const kvh_key_batch *b_;
};

/* ================================================================================================ */
/* Completions                                                                                      */
/* ================================================================================================ */

/**
 * The completion of one deferred operation (put, get, prefetch, contains_async or remove_async), taken with
 * Request::defer(). Move-only.
 *
 * It completes the operation exactly once: with complete(status), or, if it is destroyed (or assigned
 * over) while still pending, with KVH_ERR_CANCELED. An empty Pending (default-constructed, moved from, or
 * already completed) does nothing.
 *
 * Rules the ABI imposes on completing (the caller's job):
 *   - write every item status of batch() before complete(KVH_OK);
 *   - hold none of your own locks when complete() runs, nor when a still-pending Pending is destroyed
 *     (the host's callback may call straight back into the backend);
 *   - after complete() the batch is the host's again: do not touch it.
 * Any thread may complete it.
 */
template <class Batch>
class Pending {
  public:
    using raw_type = typename Batch::raw_type;

    Pending() noexcept = default;
    Pending(const raw_type *raw, kvh_completion done) noexcept : raw_(raw), done_(done) {}
    Pending(Pending &&other) noexcept : raw_(other.raw_), done_(other.done_) { other.release(); }
    Pending &operator=(Pending &&other) noexcept {
        if (this != &other) {
            complete(KVH_ERR_CANCELED, "operation dropped without completion");
            raw_ = other.raw_;
            done_ = other.done_;
            other.release();
        }
        return *this;
    }
    Pending(const Pending &) = delete;
    Pending &operator=(const Pending &) = delete;
    ~Pending() { complete(KVH_ERR_CANCELED, "operation dropped without completion"); }

    /** Whether this still owes the host a completion. */
    bool pending() const noexcept { return done_.complete != nullptr; }
    explicit operator bool() const noexcept { return pending(); }

    /** The request's arguments. Only while pending(). */
    Batch batch() const noexcept { return Batch(raw_); }

    /**
     * Completes the operation: `status` KVH_OK when every item status is written, or an error for the
     * whole operation (the host then ignores the item statuses), with an optional UTF-8 `message`
     * borrowed for the call. KVH_PENDING is not a final status and is reported as KVH_ERR_INTERNAL.
     * Does nothing when not pending().
     */
    void complete(Status status, std::string_view message = {}) noexcept {
        if (done_.complete == nullptr) {
            return;
        }
        const kvh_completion done = done_;
        release(); // before the call: the callback may free everything the request points to
        done.complete(done.user_data, status == KVH_PENDING ? KVH_ERR_INTERNAL : status, to_str(message));
    }

  private:
    void release() noexcept {
        raw_ = nullptr;
        done_ = kvh_completion{};
    }
    const raw_type *raw_ = nullptr;
    kvh_completion done_{};
};

/**
 * One asynchronous call (put, get, prefetch, contains_async or remove_async) as the backend method sees
 * it. Lives on the trampoline's stack: valid for the method call only. Either finish it now (write the item statuses through batch()
 * and return a final status; the completion never fires) or take a Pending with defer() and return
 * KVH_PENDING.
 */
template <class Batch>
class Request {
  public:
    using raw_type = typename Batch::raw_type;
    Request(const raw_type *raw, kvh_completion done) noexcept : raw_(raw), done_(done) {}
    Request(const Request &) = delete;
    Request &operator=(const Request &) = delete;

    /** The arguments; valid for the call, or, once deferred, until the Pending completes. */
    Batch batch() const noexcept { return Batch(raw_); }

    /** Takes the completion: from now on the operation is PENDING and the returned object must complete
     *  it (see Pending). At most once per request (a second call throws std::logic_error). */
    Pending<Batch> defer() {
        if (deferred_) {
            throw std::logic_error("Request::defer() called twice");
        }
        deferred_ = true;
        return Pending<Batch>(raw_, done_);
    }

    /** Whether defer() was called. */
    bool deferred() const noexcept { return deferred_; }

  private:
    const raw_type *raw_;
    kvh_completion done_;
    bool deferred_ = false;
};

/* ================================================================================================ */
/* Options and create arguments                                                                     */
/* ================================================================================================ */

/** One option spec for a backend's static `options` array. All strings must be static (string
 *  literals): the descriptor points at them for the life of the process. `default_value` may be NULL
 *  (no default). `flags`: KVH_OPTION_REQUIRED, KVH_OPTION_SECRET. */
constexpr kvh_option_spec option(const char *key, const char *default_value, const char *doc, uint32_t flags = 0) noexcept {
    kvh_option_spec spec{};
    spec.key = key;
    spec.default_value = default_value;
    spec.doc = doc;
    spec.flags = flags;
    spec.reserved = 0;
    return spec;
}

/** The options given to create (a view of the host's kvh_options): every key of the schema, defaults
 *  filled in (optional keys without default may be absent). Valid during create only: copy what you
 *  keep. */
class Options {
  public:
    explicit Options(const kvh_options *o) noexcept : o_(o) {}
    size_t size() const noexcept { return o_ == nullptr || o_->items == nullptr ? 0 : o_->len; }
    std::string_view key(size_t i) const noexcept { return to_view(o_->items[i].key); }
    std::string_view value(size_t i) const noexcept { return to_view(o_->items[i].value); }
    /** Whether `name` was given (or has a default). */
    bool has(std::string_view name) const noexcept { return find(name) != nullptr; }
    /** The value of `name`, or `fallback` when absent. */
    std::string_view get_or(std::string_view name, std::string_view fallback) const noexcept {
        const kvh_option *o = find(name);
        return o == nullptr ? fallback : to_view(o->value);
    }
    /** The value of `name`; throws kvh::Error(KVH_ERR_INVALID_CONFIG) when absent. */
    std::string_view require(std::string_view name) const {
        const kvh_option *o = find(name);
        if (o == nullptr) {
            throw Error(KVH_ERR_INVALID_CONFIG, "option '" + std::string(name) + "' is required");
        }
        return to_view(o->value);
    }
    /** A plain decimal integer in [min, max] (no sign, spaces or units); absent: `fallback`. Throws
     *  kvh::Error(KVH_ERR_INVALID_CONFIG) naming the option and the value otherwise. */
    uint64_t get_u64(std::string_view name, uint64_t fallback, uint64_t min = 0, uint64_t max = UINT64_MAX) const {
        const kvh_option *o = find(name);
        if (o == nullptr) {
            return fallback;
        }
        const std::string_view v = to_view(o->value);
        uint64_t out = 0;
        bool ok = !v.empty() && v.size() <= 20;
        for (char c : v) {
            if (!ok || c < '0' || c > '9' || out > (UINT64_MAX - static_cast<uint64_t>(c - '0')) / 10) {
                ok = false;
                break;
            }
            out = out * 10 + static_cast<uint64_t>(c - '0');
        }
        if (!ok || out < min || out > max) {
            throw Error(KVH_ERR_INVALID_CONFIG, format("invalid value '%.*s' for option '%.*s' (expected an integer from %llu to %llu)",
                                                       static_cast<int>(v.size()), v.data(), static_cast<int>(name.size()), name.data(),
                                                       static_cast<unsigned long long>(min), static_cast<unsigned long long>(max)));
        }
        return out;
    }
    /** true/false/1/0/yes/no/on/off (lower case); absent: `fallback`. Throws kvh::Error otherwise. */
    bool get_bool(std::string_view name, bool fallback) const {
        const kvh_option *o = find(name);
        if (o == nullptr) {
            return fallback;
        }
        const std::string_view v = to_view(o->value);
        if (v == "true" || v == "1" || v == "yes" || v == "on") {
            return true;
        }
        if (v == "false" || v == "0" || v == "no" || v == "off") {
            return false;
        }
        throw Error(KVH_ERR_INVALID_CONFIG, format("invalid value '%.*s' for option '%.*s' (expected true or false)",
                                                   static_cast<int>(v.size()), v.data(), static_cast<int>(name.size()), name.data()));
    }

  private:
    const kvh_option *find(std::string_view name) const noexcept {
        for (size_t i = 0; i < size(); i++) {
            if (to_view(o_->items[i].key) == name) {
                return &o_->items[i];
            }
        }
        return nullptr;
    }
    const kvh_options *o_;
};

/**
 * Everything create gets. `host()` lives until process exit (keep it); `options()` and `metadata()`
 * only during create (copy what you keep). `class_name()` is the static class name of the export.
 */
class CreateArgs {
  public:
    CreateArgs(const kvh_host_api *host, const kvh_options *options, const kvh_model_metadata *metadata,
               const char *class_name) noexcept
        : host_(host), options_(options), metadata_(metadata), class_name_(class_name) {}
    const kvh_host_api *host() const noexcept { return host_; }
    Options options() const noexcept { return Options(options_); }
    /** The model; may be NULL if the host passed none. Fields past metadata()->struct_size are absent. */
    const kvh_model_metadata *metadata() const noexcept { return metadata_; }
    /** The configured instance name (storage_plugins entry), or empty. */
    std::string_view instance_name() const noexcept { return host_ == nullptr ? std::string_view() : to_view(host_->instance_name); }
    const char *class_name() const noexcept { return class_name_; }

  private:
    const kvh_host_api *host_;
    const kvh_options *options_;
    const kvh_model_metadata *metadata_;
    const char *class_name_;
};

/* ================================================================================================ */
/* The backend base class                                                                           */
/* ================================================================================================ */

/**
 * What Backend::stats() fills (ABI 1.3): the host's array of named counters and gauges. Entries past
 * the array are counted, not written, so the host can offer a larger one. Names are 1-47 bytes of
 * [a-z0-9_]; see kvh_stat for the well-known ones (evictions, bytes_used, capacity_bytes, entries,
 * no_space).
 */
class Stats {
public:
    explicit Stats(kvh_stats_buf *out) noexcept : out_(out) { out_->len = 0; }
    /** A count that only grows while the backend lives. */
    Stats &counter(std::string_view name, uint64_t value) noexcept { return add(name, KVH_STAT_COUNTER, value); }
    /** A level that may go up and down. */
    Stats &gauge(std::string_view name, uint64_t value) noexcept { return add(name, KVH_STAT_GAUGE, value); }
    /** KVH_OK, or KVH_ERR_BUFFER_TOO_SMALL when more entries were added than the host offered. */
    kvh_status status() const noexcept { return out_->len <= out_->cap ? KVH_OK : KVH_ERR_BUFFER_TOO_SMALL; }

private:
    Stats &add(std::string_view name, uint32_t kind, uint64_t value) noexcept {
        if (out_->items != nullptr && out_->len < out_->cap) {
            kvh_stat &stat = out_->items[out_->len];
            std::memset(stat.name, 0, sizeof stat.name);
            std::memcpy(stat.name, name.data(), name.size() < KVH_STAT_NAME_CAP - 1 ? name.size() : KVH_STAT_NAME_CAP - 1);
            stat.value = value;
            stat.kind = kind;
            stat.reserved = 0;
        }
        out_->len++;
        return *this;
    }
    kvh_stats_buf *out_;
};

/**
 * Base class of a C++ backend. Subclass it, override the four required operations, override the
 * optional ones you support and declare their bits in `static constexpr uint64_t capabilities`, then
 * export the class with KVH_EXPORT_BACKEND.
 *
 * Construction: the subclass has a constructor taking `const kvh::CreateArgs &` (throw kvh::Error to
 * refuse, e.g. KVH_ERR_INVALID_CONFIG), or a static factory
 *     static std::unique_ptr<T> create(const kvh::CreateArgs &args, kvh::CreateError &error);
 * returning nullptr after filling `error` (used instead of the constructor when it exists).
 *
 * Threads: every data-path method (`contains` ... `remove_async`) may be called from any host thread,
 * concurrently; make them thread-safe. The constructor, `shutdown()` and the destructor run on a
 * [control] thread with no other call in progress on this backend.
 *
 * Every method may throw: kvh::Error becomes its status (message kept for last_error); any other
 * exception becomes KVH_ERR_PANIC, logged at error level and kept for last_error (the host then
 * poisons the backend). Overrides must be public (the export checks them at compile time).
 */
class Backend {
  public:
    /** Informational and operation capability bits (KVH_CAP_*). Hide it in the subclass. */
    static constexpr uint64_t capabilities = 0;
    /** The option schema: hide it in the subclass with `static constexpr kvh_option_spec options[]`. */
    static constexpr std::nullptr_t options = nullptr;

    explicit Backend(const CreateArgs &args) : host_(args.host()), target_(args.class_name() ? args.class_name() : "") {}
    Backend(const Backend &) = delete;
    Backend &operator=(const Backend &) = delete;
    virtual ~Backend() = default;

    /* ---- required ---- */

    /** [any-thread] Synchronous: which keys are stored, with their metadata. */
    virtual Status contains(ContainsBatch batch) = 0;
    /** [any-thread] Store chunks: finish now, or req.defer() and return KVH_PENDING. */
    virtual Status put(Request<PutBatch> &req) = 0;
    /** [any-thread] Read chunks into host buffers: finish now, or req.defer() and return KVH_PENDING. */
    virtual Status get(Request<GetBatch> &req) = 0;
    /** [any-thread] Synchronous. `force`: remove pinned keys too. */
    virtual Status remove(KeyBatch batch, bool force) = 0;

    /* ---- optional: override together with the capability bit ---- */

    /** [any-thread] KVH_CAP_PIN. */
    virtual Status pin(KeyBatch) { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_PIN. */
    virtual Status unpin(KeyBatch) { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_PREFETCH. Same PENDING rule as put. */
    virtual Status prefetch(Request<KeyBatch> &) { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_FLUSH. Make every put completed so far durable. */
    virtual Status flush() { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_HEALTH. Write a human-readable detail into `detail` (either way); quick. */
    virtual Status health(std::string &detail) {
        detail = "health not implemented";
        return KVH_ERR_UNSUPPORTED;
    }
    /** [any-thread] KVH_CAP_CLEAR. Remove every chunk of this instance, pinned ones too. */
    virtual Status clear() { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_ASYNC_CONTAINS (ABI 1.2). contains() with a completion, for a backend that
     *  needs I/O to answer: req.defer(), answer every key from your own thread, complete. Same PENDING
     *  rule as put. contains() stays required and must give the same answers. */
    virtual Status contains_async(Request<ContainsBatch> &) { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_ASYNC_REMOVE (ABI 1.2). remove() with a completion; once it completes the
     *  keys are no longer served. remove() stays required. */
    virtual Status remove_async(Request<KeyBatch> &, bool /*force*/) { return KVH_ERR_UNSUPPORTED; }
    /** [any-thread] KVH_CAP_STATS (ABI 1.3). Report counters and gauges (out.counter("evictions", n),
     *  out.gauge("bytes_used", n), ...). Quick, no I/O: the host calls it for every metrics scrape. */
    virtual Status stats(Stats &) { return KVH_ERR_UNSUPPORTED; }

    /** [control] Called by destroy right before the object is deleted: finish or cancel every pending
     *  operation (their completions must have fired when it returns) and join your threads here, while
     *  the whole object is still alive. Return false when that is impossible (e.g. destroy was called
     *  from one of your own threads, a host bug): the object is then leaked, not deleted. Default:
     *  nothing to do, true. */
    virtual bool shutdown() noexcept { return true; }

    /* ---- helpers for subclasses ---- */

    /** The host API (valid until process exit). */
    const kvh_host_api *host() const noexcept { return host_; }
    /** The class name, used as the log target. */
    const char *target() const noexcept { return target_; }
    bool log_enabled(int32_t level) const noexcept { return kvh::log_enabled(host_, level); }
    /** Logs through the host with this class as target. Any thread; never throws. */
    void log(int32_t level, std::string_view message) const noexcept { kvh::log(host_, level, message, target_); }
    void logf(int32_t level, const char *fmt, ...) const KVH_PRINTF(3, 4) {
        if (!kvh::log_enabled(host_, level)) {
            return;
        }
        try {
            va_list args;
            va_start(args, fmt);
            std::string text = vformat(fmt, args);
            va_end(args);
            kvh::log(host_, level, text, target_);
        } catch (...) {
        }
    }
    /** Records `message` as this thread's last error for this backend (what the host reads with
     *  last_error right after a failed synchronous call) and returns `status`. */
    Status fail(Status status, std::string_view message) const noexcept {
        detail::set_last_error(this, message);
        return status;
    }
    /** printf-style fail(). */
    Status failf(Status status, const char *fmt, ...) const KVH_PRINTF(3, 4) {
        try {
            va_list args;
            va_start(args, fmt);
            std::string text = vformat(fmt, args);
            va_end(args);
            detail::set_last_error(this, text);
        } catch (...) {
            detail::set_last_error(this, std::string_view());
        }
        return status;
    }

  private:
    const kvh_host_api *host_;
    const char *target_;
};

/** What a static `create` factory reports when it returns nullptr. */
struct CreateError {
    Status status = KVH_ERR_INVALID_CONFIG;
    std::string message;
};

/* ================================================================================================ */
/* The export machinery (used through KVH_EXPORT_BACKEND)                                          */
/* ================================================================================================ */

namespace detail {

template <class T, class = void>
struct has_factory : std::false_type {};
template <class T>
struct has_factory<T, std::void_t<decltype(T::create(std::declval<const CreateArgs &>(), std::declval<CreateError &>()))>>
    : std::true_type {};

/** Whether T (or a class between it and Backend) overrides `method`: &T::method then has a class type
 *  other than Backend. */
template <class Sig>
using backend_member = Sig Backend::*;
#define KVH_DETAIL_OVERRIDES(T, method, Sig) (!std::is_same<decltype(&T::method), backend_member<Sig>>::value)

/**
 * The descriptor, vtable and trampolines of one exported class. `Tag` (made by KVH_EXPORT_BACKEND)
 * names the C++ type (`Tag::type`) and the static strings of the descriptor.
 */
template <class Tag>
struct Exporter {
    using T = typename Tag::type;
    static_assert(std::is_base_of<Backend, T>::value, "KVH_EXPORT_BACKEND: the class must derive from kvh::Backend");

    static constexpr uint64_t caps = T::capabilities;
    static constexpr uint64_t known_caps = KVH_CAP_PIN | KVH_CAP_PREFETCH | KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_PERSISTENT |
                                           KVH_CAP_SHARED | KVH_CAP_DISCARDS | KVH_CAP_CLEAR | KVH_CAP_ASYNC_CONTAINS |
                                           KVH_CAP_ASYNC_REMOVE | KVH_CAP_STATS;
    static_assert((caps & ~known_caps) == 0, "capabilities has a bit this header does not know");
    static_assert(((caps & KVH_CAP_PIN) != 0) == KVH_DETAIL_OVERRIDES(T, pin, Status(KeyBatch)),
                  "KVH_CAP_PIN must be set exactly when pin() is overridden");
    static_assert(((caps & KVH_CAP_PIN) != 0) == KVH_DETAIL_OVERRIDES(T, unpin, Status(KeyBatch)),
                  "KVH_CAP_PIN must be set exactly when unpin() is overridden");
    static_assert(((caps & KVH_CAP_PREFETCH) != 0) == KVH_DETAIL_OVERRIDES(T, prefetch, Status(Request<KeyBatch> &)),
                  "KVH_CAP_PREFETCH must be set exactly when prefetch() is overridden");
    static_assert(((caps & KVH_CAP_FLUSH) != 0) == KVH_DETAIL_OVERRIDES(T, flush, Status()),
                  "KVH_CAP_FLUSH must be set exactly when flush() is overridden");
    static_assert(((caps & KVH_CAP_HEALTH) != 0) == KVH_DETAIL_OVERRIDES(T, health, Status(std::string &)),
                  "KVH_CAP_HEALTH must be set exactly when health() is overridden");
    static_assert(((caps & KVH_CAP_CLEAR) != 0) == KVH_DETAIL_OVERRIDES(T, clear, Status()),
                  "KVH_CAP_CLEAR must be set exactly when clear() is overridden");
    static_assert(((caps & KVH_CAP_ASYNC_CONTAINS) != 0) ==
                      KVH_DETAIL_OVERRIDES(T, contains_async, Status(Request<ContainsBatch> &)),
                  "KVH_CAP_ASYNC_CONTAINS must be set exactly when contains_async() is overridden");
    static_assert(((caps & KVH_CAP_ASYNC_REMOVE) != 0) == KVH_DETAIL_OVERRIDES(T, remove_async, Status(Request<KeyBatch> &, bool)),
                  "KVH_CAP_ASYNC_REMOVE must be set exactly when remove_async() is overridden");
    static_assert(((caps & KVH_CAP_STATS) != 0) == KVH_DETAIL_OVERRIDES(T, stats, Status(Stats &)),
                  "KVH_CAP_STATS must be set exactly when stats() is overridden");

    static T *self(kvh_backend *b) noexcept { return reinterpret_cast<T *>(b); }
    /** The identity last_error is keyed by: the Backend subobject (what Backend::fail uses as `this`). */
    static const void *id(const T *backend) noexcept { return static_cast<const Backend *>(backend); }

    /** Called inside a catch block for an unexpected exception: log at error level, keep for
     *  last_error. */
    static void report_panic(const T *backend, const char *op, const char *what) noexcept {
        try {
            std::string msg = std::string(Tag::class_name) + ": exception in " + op + ": " + what;
            kvh::log(backend->host(), KVH_LOG_ERROR, msg, Tag::class_name);
            set_last_error(id(backend), msg);
        } catch (...) {
            set_last_error(id(backend), "exception (out of memory while reporting it)");
        }
    }

    static void report_error(const T *backend, const char *op, const Error &e) noexcept {
        try {
            set_last_error(id(backend), std::string(Tag::class_name) + ": " + op + ": " + e.what());
        } catch (...) {
            set_last_error(id(backend), std::string_view());
        }
    }

    /** After a synchronous call: a failure without a message gets a generic one, so last_error never
     *  reports an older failure as this one's reason. */
    static Status finish_sync(const T *backend, const char *op, Status status, uint64_t serial_before) noexcept {
        if (status == KVH_PENDING) {
            try {
                set_last_error(id(backend), std::string(Tag::class_name) + ": " + op + " returned KVH_PENDING but is synchronous");
            } catch (...) {
            }
            return KVH_ERR_INTERNAL;
        }
        if (status != KVH_OK && last_error_slot().serial == serial_before) {
            try {
                set_last_error(id(backend), std::string(Tag::class_name) + ": " + op + " failed: " + status_name(status));
            } catch (...) {
            }
        }
        return status;
    }

    /** After an async call (put, get, prefetch, contains_async, remove_async). */
    static Status finish_async(const T *backend, const char *op, bool deferred, Status status, uint64_t serial_before) noexcept {
        if (deferred) {
            if (status != KVH_PENDING) {
                kvh::logf(backend->host(), KVH_LOG_WARN, Tag::class_name, "%s: %s returned %s after defer(); reporting KVH_PENDING",
                     Tag::class_name, op, status_name(status));
            }
            return KVH_PENDING;
        }
        if (status == KVH_PENDING) {
            try {
                set_last_error(id(backend), std::string(Tag::class_name) + ": " + op + " returned KVH_PENDING without Request::defer()");
            } catch (...) {
            }
            return KVH_ERR_INTERNAL;
        }
        return finish_sync(backend, op, status, serial_before);
    }

    static Status null_param(const T *backend, const char *op, const char *what) noexcept {
        try {
            set_last_error(id(backend), std::string(Tag::class_name) + ": " + op + ": " + what + " is NULL");
        } catch (...) {
        }
        return KVH_ERR_NULL_PARAM;
    }

    /* ---- trampolines ---- */

    static kvh_status tr_create(const kvh_host_api *host, const kvh_options *options, const kvh_model_metadata *metadata,
                                kvh_backend **out_backend, kvh_message_buf error) noexcept {
        if (out_backend == nullptr) {
            write_message(error, "create: out_backend is NULL");
            return KVH_ERR_NULL_PARAM;
        }
        *out_backend = nullptr;
        const CreateArgs args(host, options, metadata, Tag::class_name);
        try {
            std::unique_ptr<T> made;
            if constexpr (has_factory<T>::value) {
                CreateError err;
                made = T::create(args, err);
                if (!made) {
                    const Status s = err.status == KVH_OK || err.status == KVH_PENDING ? KVH_ERR_INTERNAL : err.status;
                    write_message(error, err.message.empty() ? std::string_view(status_name(s)) : std::string_view(err.message));
                    return s;
                }
            } else {
                made.reset(new T(args));
            }
            *out_backend = reinterpret_cast<kvh_backend *>(made.release());
            return KVH_OK;
        } catch (const Error &e) {
            write_message(error, e.what());
            return e.status();
        } catch (const std::exception &e) {
            create_panic(host, error, e.what());
            return KVH_ERR_PANIC;
        } catch (...) {
            create_panic(host, error, "unknown exception");
            return KVH_ERR_PANIC;
        }
    }

    static void create_panic(const kvh_host_api *host, kvh_message_buf error, const char *what) noexcept {
        try {
            std::string msg = std::string(Tag::class_name) + ": exception in create: " + what;
            kvh::log(host, KVH_LOG_ERROR, msg, Tag::class_name);
            write_message(error, msg);
        } catch (...) {
            write_message(error, what);
        }
    }

    static void tr_destroy(kvh_backend *b) noexcept {
        if (b == nullptr) {
            return;
        }
        T *backend = self(b);
        const kvh_host_api *host = backend->host();
        if (!static_cast<Backend *>(backend)->shutdown()) {
            kvh::log(host, KVH_LOG_ERROR, "destroy: the backend could not shut down; leaking it", Tag::class_name);
            return;
        }
        try {
            delete backend;
        } catch (...) {
            // Only reachable with a noexcept(false) destructor; the memory may be lost.
            kvh::log(host, KVH_LOG_ERROR, "exception in destroy", Tag::class_name);
        }
    }

    static kvh_status tr_contains(kvh_backend *b, const kvh_contains_batch *batch) noexcept {
        if (b == nullptr) {
            return KVH_ERR_NULL_PARAM;
        }
        T *backend = self(b);
        if (batch == nullptr) {
            return null_param(backend, "contains", "batch");
        }
        if (batch->len > 0 && (batch->keys == nullptr || batch->out_meta == nullptr || batch->item_status == nullptr)) {
            return null_param(backend, "contains", "keys, out_meta or item_status");
        }
        const uint64_t serial = last_error_slot().serial;
        try {
            return finish_sync(backend, "contains", static_cast<Backend *>(backend)->contains(ContainsBatch(batch)), serial);
        } catch (const Error &e) {
            report_error(backend, "contains", e);
            return e.status();
        } catch (const std::exception &e) {
            report_panic(backend, "contains", e.what());
        } catch (...) {
            report_panic(backend, "contains", "unknown exception");
        }
        return KVH_ERR_PANIC;
    }

    /** The body of every async trampoline: the NULL checks (`arrays_present(*batch)` says whether the
     *  batch's arrays are there, `arrays` names them for the error), then `call(backend, req)` behind the
     *  exception boundary. */
    template <class Batch, class Present, class Call>
    static kvh_status run_async(kvh_backend *b, const char *op, const typename Batch::raw_type *batch, kvh_completion done,
                                const char *arrays, Present arrays_present, Call call) noexcept {
        if (b == nullptr) {
            return KVH_ERR_NULL_PARAM;
        }
        T *backend = self(b);
        if (batch == nullptr) {
            return null_param(backend, op, "batch");
        }
        if (done.complete == nullptr) {
            return null_param(backend, op, "done.complete");
        }
        if (batch->len > 0 && !arrays_present(*batch)) {
            return null_param(backend, op, arrays);
        }
        const uint64_t serial = last_error_slot().serial;
        Request<Batch> req(batch, done);
        try {
            const Status s = call(static_cast<Backend *>(backend), req);
            return finish_async(backend, op, req.deferred(), s, serial);
        } catch (const Error &e) {
            report_error(backend, op, e);
            return req.deferred() ? KVH_PENDING : e.status();
        } catch (const std::exception &e) {
            report_panic(backend, op, e.what());
        } catch (...) {
            report_panic(backend, op, "unknown exception");
        }
        // Deferred: the Pending (wherever it is now) completes the operation, so it stays PENDING.
        return req.deferred() ? KVH_PENDING : KVH_ERR_PANIC;
    }

    static kvh_status tr_put(kvh_backend *b, const kvh_put_batch *batch, kvh_completion done) noexcept {
        return run_async<PutBatch>(
            b, "put", batch, done, "keys, src, meta or item_status",
            [](const kvh_put_batch &r) {
                return r.keys != nullptr && r.src != nullptr && r.meta != nullptr && r.item_status != nullptr;
            },
            [](Backend *backend, Request<PutBatch> &req) { return backend->put(req); });
    }

    static kvh_status tr_get(kvh_backend *b, const kvh_get_batch *batch, kvh_completion done) noexcept {
        return run_async<GetBatch>(
            b, "get", batch, done, "keys, dst, out_len, out_meta or item_status",
            [](const kvh_get_batch &r) {
                return r.keys != nullptr && r.dst != nullptr && r.out_len != nullptr && r.out_meta != nullptr &&
                       r.item_status != nullptr;
            },
            [](Backend *backend, Request<GetBatch> &req) { return backend->get(req); });
    }

    static bool key_arrays(const kvh_key_batch &r) noexcept { return r.keys != nullptr && r.item_status != nullptr; }

    static kvh_status tr_prefetch(kvh_backend *b, const kvh_key_batch *batch, kvh_completion done) noexcept {
        return run_async<KeyBatch>(b, "prefetch", batch, done, "keys or item_status", key_arrays,
                                   [](Backend *backend, Request<KeyBatch> &req) { return backend->prefetch(req); });
    }

    static kvh_status tr_contains_async(kvh_backend *b, const kvh_contains_batch *batch, kvh_completion done) noexcept {
        return run_async<ContainsBatch>(
            b, "contains_async", batch, done, "keys, out_meta or item_status",
            [](const kvh_contains_batch &r) {
                return r.keys != nullptr && r.out_meta != nullptr && r.item_status != nullptr;
            },
            [](Backend *backend, Request<ContainsBatch> &req) { return backend->contains_async(req); });
    }

    static kvh_status tr_remove_async(kvh_backend *b, const kvh_key_batch *batch, bool force, kvh_completion done) noexcept {
        return run_async<KeyBatch>(
            b, "remove_async", batch, done, "keys or item_status", key_arrays,
            [force](Backend *backend, Request<KeyBatch> &req) { return backend->remove_async(req, force); });
    }

    template <class Call>
    static kvh_status run_key_op(kvh_backend *b, const char *op, const kvh_key_batch *batch, Call call) noexcept {
        if (b == nullptr) {
            return KVH_ERR_NULL_PARAM;
        }
        T *backend = self(b);
        if (batch == nullptr) {
            return null_param(backend, op, "batch");
        }
        if (batch->len > 0 && !key_arrays(*batch)) {
            return null_param(backend, op, "keys or item_status");
        }
        const uint64_t serial = last_error_slot().serial;
        try {
            return finish_sync(backend, op, call(static_cast<Backend *>(backend), KeyBatch(batch)), serial);
        } catch (const Error &e) {
            report_error(backend, op, e);
            return e.status();
        } catch (const std::exception &e) {
            report_panic(backend, op, e.what());
        } catch (...) {
            report_panic(backend, op, "unknown exception");
        }
        return KVH_ERR_PANIC;
    }

    static kvh_status tr_remove(kvh_backend *b, const kvh_key_batch *batch, bool force) noexcept {
        return run_key_op(b, "remove", batch, [force](Backend *be, KeyBatch kb) { return be->remove(kb, force); });
    }
    static kvh_status tr_pin(kvh_backend *b, const kvh_key_batch *batch) noexcept {
        return run_key_op(b, "pin", batch, [](Backend *be, KeyBatch kb) { return be->pin(kb); });
    }
    static kvh_status tr_unpin(kvh_backend *b, const kvh_key_batch *batch) noexcept {
        return run_key_op(b, "unpin", batch, [](Backend *be, KeyBatch kb) { return be->unpin(kb); });
    }

    template <class Call>
    static kvh_status run_plain(kvh_backend *b, const char *op, Call call) noexcept {
        if (b == nullptr) {
            return KVH_ERR_NULL_PARAM;
        }
        T *backend = self(b);
        const uint64_t serial = last_error_slot().serial;
        try {
            return finish_sync(backend, op, call(static_cast<Backend *>(backend)), serial);
        } catch (const Error &e) {
            report_error(backend, op, e);
            return e.status();
        } catch (const std::exception &e) {
            report_panic(backend, op, e.what());
        } catch (...) {
            report_panic(backend, op, "unknown exception");
        }
        return KVH_ERR_PANIC;
    }

    static kvh_status tr_flush(kvh_backend *b) noexcept {
        return run_plain(b, "flush", [](Backend *be) { return be->flush(); });
    }
    static kvh_status tr_clear(kvh_backend *b) noexcept {
        return run_plain(b, "clear", [](Backend *be) { return be->clear(); });
    }

    static kvh_status tr_health(kvh_backend *b, kvh_message_buf message) noexcept {
        if (b == nullptr) {
            write_message(message, "backend is NULL");
            return KVH_ERR_NULL_PARAM;
        }
        T *backend = self(b);
        try {
            std::string detail;
            Status s = static_cast<Backend *>(backend)->health(detail);
            if (s == KVH_PENDING) {
                s = KVH_ERR_INTERNAL;
            }
            write_message(message, detail.empty() ? std::string_view(status_name(s)) : std::string_view(detail));
            return s;
        } catch (const Error &e) {
            report_error(backend, "health", e);
            write_message(message, e.what());
            return e.status();
        } catch (const std::exception &e) {
            report_panic(backend, "health", e.what());
            write_message(message, e.what());
        } catch (...) {
            report_panic(backend, "health", "unknown exception");
            write_message(message, "unknown exception");
        }
        return KVH_ERR_PANIC;
    }

    static kvh_status tr_stats(kvh_backend *b, kvh_stats_buf *out) noexcept {
        if (out == nullptr) {
            return KVH_ERR_NULL_PARAM;
        }
        return run_plain(b, "stats", [out](Backend *be) {
            Stats stats(out);
            Status s = be->stats(stats);
            return s == KVH_OK ? Status(stats.status()) : s;
        });
    }

    static size_t tr_last_error(kvh_backend *b, char *buf, size_t cap) noexcept {
        const LastError &slot = last_error_slot();
        if (b == nullptr || slot.backend != id(self(b)) || slot.text.empty()) {
            return 0;
        }
        return copy_message(buf, cap, slot.text);
    }

    /* ---- the static tables ---- */

    // Value-initialise, then assign: fields a newer header appends stay NULL and the source still
    // compiles under -Wextra -Werror (aggregate initialisation would warn about the missing ones).
    static kvh_backend_vtable make_vtable() noexcept {
        kvh_backend_vtable vt{};
        vt.struct_size = sizeof(kvh_backend_vtable);
        vt.create = tr_create;
        vt.destroy = tr_destroy;
        vt.contains = tr_contains;
        vt.put = tr_put;
        vt.get = tr_get;
        vt.remove = tr_remove;
        vt.last_error = tr_last_error;
        if (caps & KVH_CAP_PIN) {
            vt.pin = tr_pin;
            vt.unpin = tr_unpin;
        }
        if (caps & KVH_CAP_PREFETCH) {
            vt.prefetch = tr_prefetch;
        }
        if (caps & KVH_CAP_FLUSH) {
            vt.flush = tr_flush;
        }
        if (caps & KVH_CAP_HEALTH) {
            vt.health = tr_health;
        }
        if (caps & KVH_CAP_CLEAR) {
            vt.clear = tr_clear;
        }
        if (caps & KVH_CAP_ASYNC_CONTAINS) {
            vt.contains_async = tr_contains_async;
        }
        if (caps & KVH_CAP_ASYNC_REMOVE) {
            vt.remove_async = tr_remove_async;
        }
        if (caps & KVH_CAP_STATS) {
            vt.stats = tr_stats;
        }
        return vt;
    }

    static kvh_plugin_descriptor make_descriptor(const kvh_backend_vtable *vt) noexcept {
        kvh_plugin_descriptor d{};
        d.struct_size = sizeof(kvh_plugin_descriptor);
        d.abi_major = KVH_ABI_MAJOR;
        d.abi_minor = KVH_ABI_MINOR;
        d.class_name = Tag::class_name;
        d.plugin_version = Tag::plugin_version;
        d.description = Tag::description;
        d.capabilities = caps;
        if constexpr (std::is_array<decltype(T::options)>::value) {
            d.options = T::options;
            d.options_len = std::extent<decltype(T::options)>::value;
        } else {
            d.options = nullptr;
            d.options_len = 0;
        }
        d.vtable = vt;
        return d;
    }

    /** The static descriptor, built on first use (thread-safe; the entry point is [control] anyway). */
    static const kvh_plugin_descriptor *descriptor() noexcept {
        static const kvh_backend_vtable vtable = make_vtable();
        static const kvh_plugin_descriptor desc = make_descriptor(&vtable);
        return &desc;
    }
};

#undef KVH_DETAIL_OVERRIDES

} // namespace detail
} // namespace kvh

/**
 * Exports C++ class `CppType` (derived from kvh::Backend) as backend class `class_name` (a bare
 * identifier, [a-z0-9_]+, also the entry symbol's suffix): defines the static descriptor (version,
 * description, CppType::capabilities, CppType::options), the vtable of noexcept trampolines, and the
 * `extern "C"` entry point kvh_plugin_<class_name>_v1. Use once per class, at namespace scope, in one
 * translation unit of the library, followed by a semicolon. `version` and `description` are string
 * literals (description may be nullptr).
 */
#define KVH_EXPORT_BACKEND(class_name_, CppType, version_, description_)                                 \
    namespace {                                                                                          \
    struct kvh_export_tag_##class_name_ {                                                                \
        using type = CppType;                                                                            \
        static constexpr const char *class_name = #class_name_;                                         \
        static constexpr const char *plugin_version = version_;                                         \
        static constexpr const char *description = description_;                                        \
    };                                                                                                   \
    }                                                                                                    \
    extern "C" KVH_DECLARE_PLUGIN(class_name_) {                                                         \
        (void)host; /* the descriptor is the same for every host */                                     \
        return ::kvh::detail::Exporter<kvh_export_tag_##class_name_>::descriptor();                      \
    }                                                                                                    \
    static_assert(true, "KVH_EXPORT_BACKEND is followed by a semicolon")

#endif /* KVHOST_PLUGIN_HPP */
