/*
 * kvhost storage plugin `logstore`: a log-structured KV-chunk store on ONE preallocated file, in C++17 on
 * kvhost_plugin.hpp.
 *
 * Design (README.md has the long version and the on-disk format):
 * - The file is preallocated (fallocate) to `size_gib`. Block 0 is a superblock; the rest is a ring of
 *   records. Every record starts on a 4 KiB boundary: a header block (fixed header + canonical key,
 *   CRC32C-protected) and the chunk data, padded to 4 KiB. Writes only ever append at the ring's head,
 *   sequentially; when a record does not fit before the end of the file, the head wraps to the start
 *   and the oldest records are overwritten (their index entries are evicted first).
 * - Every record carries a sequence number (strictly increasing, never reused) and `live_from`: the
 *   sequence number of the oldest record still live when it was written. On open, a scan finds the
 *   newest valid record M; the live records are the valid ones with seq in [M.live_from, M.seq],
 *   replayed in seq order (last generation wins; tombstones remove; a clear record starts a new window).
 * - An in-memory index maps canonical key -> record (offset, length, CRC32C, kvh_chunk_meta).
 * - One I/O thread owns the file's data path: put and get are queued and return KVH_PENDING; the thread
 *   writes records (pwritev straight from the host's buffer, or through an aligned staging buffer with
 *   O_DIRECT) and reads chunks with pread straight into the host's destination buffer (a bounce buffer
 *   only for O_DIRECT with an unaligned destination), verifies CRC32C, then completes. contains,
 *   remove, clear, flush and health are synchronous; remove and clear update the index at once and
 *   queue a tombstone / clear record, so the file and the index agree after a restart.
 *
 * Locks: `index_mu_` (index, ring, head) and `q_mu_` (queue, sequence counter). Order: index_mu_ before
 * q_mu_; the I/O thread never holds both; no lock is held while a completion fires.
 *
 * Build: c++ -std=c++17 -shared -fPIC -O2 -Wall -Wextra -Werror -pedantic -fvisibility=hidden -pthread \
 *            -I../../include logstore.cpp -o libkvhost_logstore.so
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_DIRECT, fallocate */
#endif

#include "kvhost_plugin.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define LOGSTORE_HW_CRC 1
#endif

namespace {

/* ================================================================================================ */
/* Constants and on-disk format                                                                     */
/* ================================================================================================ */

constexpr uint64_t kBlock = 4096;                  // alignment of every record and every I/O
constexpr uint64_t kMinFileBytes = 1ull << 20;     // smallest store: 1 MiB
constexpr uint64_t kMaxFileBytes = 1ull << 50;     // largest store: 1 PiB
constexpr size_t kHeaderFixed = 128;               // fixed part of a record header
constexpr size_t kHeaderCrcAt = 124;               // header CRC field (covers [0,124) + key)
constexpr size_t kMaxKeyLen = 64 * 1024;           // longest canonical key
constexpr size_t kIoBufBytes = 4u << 20;           // staging / bounce / scan window
constexpr size_t kMaxQueue = 4096;                 // queued put/get operations before KVH_ERR_BUSY
constexpr size_t kMaxGroup = 64;                   // operations the I/O thread takes per round
constexpr uint32_t kFormatVersion = 1;

// "KVHLOGS1" and "KVHLREC1" read as little-endian u64.
constexpr uint64_t magic_of(const char (&s)[9]) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | static_cast<uint8_t>(s[i]);
    }
    return v;
}
constexpr uint64_t kSuperMagic = magic_of("KVHLOGS1");
constexpr uint64_t kRecordMagic = magic_of("KVHLREC1");

enum RecordKind : uint16_t { kChunk = 1, kTombstone = 2, kClear = 3 };

constexpr uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Little-endian field access (the format is little-endian on every host).
inline void put_u16(uint8_t *p, uint16_t v) {
    for (int i = 0; i < 2; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t get_u16(const uint8_t *p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
inline uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* ================================================================================================ */
/* CRC32C (Castagnoli): SSE4.2 crc32 instruction when the CPU has it, else slice-by-8 in software     */
/* ================================================================================================ */

class Crc32c {
  public:
    static uint32_t extend(uint32_t crc, const void *data, size_t len) noexcept {
        return instance().hw_ ? extend_hw(crc, static_cast<const uint8_t *>(data), len)
                              : extend_sw(crc, static_cast<const uint8_t *>(data), len);
    }
    static uint32_t of(const void *data, size_t len) noexcept { return extend(0, data, len); }
    static bool hardware() noexcept { return instance().hw_; }

  private:
    Crc32c() noexcept {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
            table_[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++) {
            for (int t = 1; t < 8; t++) table_[t][i] = (table_[t - 1][i] >> 8) ^ table_[0][table_[t - 1][i] & 0xFF];
        }
#ifdef LOGSTORE_HW_CRC
        __builtin_cpu_init();
        hw_ = __builtin_cpu_supports("sse4.2");
        // Trust the instruction only if it agrees with the table on the standard check value.
        if (hw_ && extend_hw(0, reinterpret_cast<const uint8_t *>("123456789"), 9) != 0xE3069283u) {
            hw_ = false;
        }
#endif
    }
    static const Crc32c &instance() noexcept {
        static const Crc32c crc;
        return crc;
    }
    static uint32_t extend_sw(uint32_t crc, const uint8_t *p, size_t len) noexcept {
        const auto &t = instance().table_;
        uint32_t c = ~crc;
        while (len >= 8) {
            const uint32_t lo = c ^ get_u32(p);
            const uint32_t hi = get_u32(p + 4);
            c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
                t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
            p += 8;
            len -= 8;
        }
        while (len-- > 0) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
        return ~c;
    }
#ifdef LOGSTORE_HW_CRC
    __attribute__((target("sse4.2"))) static uint32_t extend_hw(uint32_t crc, const uint8_t *p, size_t len) noexcept {
        uint64_t c = ~crc;
        while (len >= 8) {
            uint64_t v;
            std::memcpy(&v, p, 8);
            c = _mm_crc32_u64(c, v);
            p += 8;
            len -= 8;
        }
        uint32_t c32 = static_cast<uint32_t>(c);
        while (len-- > 0) c32 = _mm_crc32_u8(c32, *p++);
        return ~c32;
    }
#else
    static uint32_t extend_hw(uint32_t crc, const uint8_t *p, size_t len) noexcept { return extend_sw(crc, p, len); }
#endif
    uint32_t table_[8][256];
    bool hw_ = false;
};

/* ================================================================================================ */
/* Small system helpers                                                                             */
/* ================================================================================================ */

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

/** A 4 KiB-aligned heap buffer (for O_DIRECT). */
class AlignedBuf {
  public:
    AlignedBuf() = default;
    explicit AlignedBuf(size_t size) : size_(size) {
        void *p = nullptr;
        if (posix_memalign(&p, kBlock, size) != 0) {
            throw std::bad_alloc();
        }
        ptr_ = static_cast<uint8_t *>(p);
        std::memset(ptr_, 0, size);
    }
    AlignedBuf(AlignedBuf &&o) noexcept : ptr_(o.ptr_), size_(o.size_) {
        o.ptr_ = nullptr;
        o.size_ = 0;
    }
    AlignedBuf &operator=(AlignedBuf &&o) noexcept {
        std::swap(ptr_, o.ptr_);
        std::swap(size_, o.size_);
        return *this;
    }
    ~AlignedBuf() { std::free(ptr_); }
    uint8_t *data() const noexcept { return ptr_; }
    size_t size() const noexcept { return size_; }

  private:
    uint8_t *ptr_ = nullptr;
    size_t size_ = 0;
};

/** pread until `len` bytes or EOF; returns bytes read, or -errno. */
int64_t pread_full(int fd, void *buf, size_t len, uint64_t off) noexcept {
    size_t done = 0;
    while (done < len) {
        const ssize_t n = ::pread(fd, static_cast<uint8_t *>(buf) + done, len - done, static_cast<off_t>(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) break;
        done += static_cast<size_t>(n);
    }
    return static_cast<int64_t>(done);
}

/** pwritev all of `iov` (modified in place); returns 0 or an errno. */
int pwritev_full(int fd, struct iovec *iov, int cnt, uint64_t off) noexcept {
    while (cnt > 0) {
        const ssize_t n = ::pwritev(fd, iov, cnt, static_cast<off_t>(off));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EIO;
        off += static_cast<uint64_t>(n);
        size_t left = static_cast<size_t>(n);
        while (cnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = static_cast<uint8_t *>(iov->iov_base) + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

int pwrite_full(int fd, const void *buf, size_t len, uint64_t off) noexcept {
    struct iovec iov{const_cast<void *>(buf), len};
    return pwritev_full(fd, &iov, 1, off);
}

/** Parses "1", "0.25", "64.5" (GiB, up to 9 decimals) into bytes. False when malformed. */
bool parse_gib(std::string_view text, uint64_t &bytes) {
    uint64_t whole = 0, frac = 0, scale = 1;
    size_t i = 0;
    bool digits = false;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; i++) {
        whole = whole * 10 + static_cast<uint64_t>(text[i] - '0');
        digits = true;
        if (whole > (kMaxFileBytes >> 30)) return false;
    }
    if (i < text.size() && text[i] == '.') {
        for (i++; i < text.size() && text[i] >= '0' && text[i] <= '9'; i++) {
            if (scale >= 1000000000ull) return false;
            frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
            scale *= 10;
            digits = true;
        }
    }
    if (!digits || i != text.size()) return false;
    bytes = (whole << 30) + (frac << 30) / scale;
    return true;
}

std::string mib(uint64_t bytes) { return kvh::format("%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

/* ================================================================================================ */
/* Record header codec                                                                              */
/* ================================================================================================ */

/*
 * Record header, little-endian, at the record's first byte (4 KiB-aligned):
 *   0  u64 magic "KVHLREC1"      40 u64 data_len          72  i32 meta.fmt
 *   8  u16 format version (1)    48 u64 record_len        76  i32 meta.dtype
 *   10 u16 kind                  56 u32 data CRC32C       80  u32 meta.ndim
 *   12 u32 key_len               60 u32 data_offset       84  i32 meta.shape[4]
 *   16 u64 seq                   64 u64 meta.length       100 u32 meta.reserved
 *   24 u64 live_from                                      104 u64 written (unix ns)
 *   32 u64 store_id                                       112 12 bytes zero
 *                                                         124 u32 header CRC32C of [0,124) + key
 *   128 key bytes (canonical string), zero padding to data_offset (a multiple of 4096),
 *   data_len bytes of chunk data at data_offset, zero padding to record_len (a multiple of 4096).
 */
struct RecordHeader {
    uint16_t kind = kChunk;
    uint64_t seq = 0;
    uint64_t live_from = 0;
    uint64_t store_id = 0;
    uint64_t data_len = 0;
    uint64_t record_len = 0;
    uint32_t data_crc = 0;
    uint32_t data_offset = 0;
    kvh_chunk_meta meta{};
    uint64_t written_ns = 0;
};

uint32_t data_offset_for(size_t key_len) { return static_cast<uint32_t>(round_up(kHeaderFixed + key_len, kBlock)); }

/** Writes the header and key into `out` (data_offset bytes, zero-filled here). */
void encode_header(const RecordHeader &h, std::string_view key, uint8_t *out) {
    std::memset(out, 0, h.data_offset);
    put_u64(out + 0, kRecordMagic);
    put_u16(out + 8, static_cast<uint16_t>(kFormatVersion));
    put_u16(out + 10, h.kind);
    put_u32(out + 12, static_cast<uint32_t>(key.size()));
    put_u64(out + 16, h.seq);
    put_u64(out + 24, h.live_from);
    put_u64(out + 32, h.store_id);
    put_u64(out + 40, h.data_len);
    put_u64(out + 48, h.record_len);
    put_u32(out + 56, h.data_crc);
    put_u32(out + 60, h.data_offset);
    put_u64(out + 64, h.meta.length);
    put_u32(out + 72, static_cast<uint32_t>(h.meta.fmt));
    put_u32(out + 76, static_cast<uint32_t>(h.meta.dtype));
    put_u32(out + 80, h.meta.ndim);
    for (int i = 0; i < 4; i++) put_u32(out + 84 + 4 * i, static_cast<uint32_t>(h.meta.shape[i]));
    put_u32(out + 100, h.meta.reserved);
    put_u64(out + 104, h.written_ns);
    if (!key.empty()) std::memcpy(out + kHeaderFixed, key.data(), key.size());
    const uint32_t crc = Crc32c::extend(Crc32c::of(out, kHeaderCrcAt), key.data(), key.size());
    put_u32(out + kHeaderCrcAt, crc);
}

/** Reads the fixed part at `p` (kHeaderFixed bytes). Returns key_len via `key_len`, or false when the
 *  magic, version or lengths are wrong. The CRC is checked by check_header_crc once the key is there. */
bool decode_fixed(const uint8_t *p, uint64_t store_id, RecordHeader &h, uint32_t &key_len) {
    if (get_u64(p) != kRecordMagic || get_u16(p + 8) != kFormatVersion) return false;
    h.kind = get_u16(p + 10);
    key_len = get_u32(p + 12);
    h.seq = get_u64(p + 16);
    h.live_from = get_u64(p + 24);
    h.store_id = get_u64(p + 32);
    h.data_len = get_u64(p + 40);
    h.record_len = get_u64(p + 48);
    h.data_crc = get_u32(p + 56);
    h.data_offset = get_u32(p + 60);
    h.meta.length = get_u64(p + 64);
    h.meta.fmt = static_cast<int32_t>(get_u32(p + 72));
    h.meta.dtype = static_cast<int32_t>(get_u32(p + 76));
    h.meta.ndim = get_u32(p + 80);
    for (int i = 0; i < 4; i++) h.meta.shape[i] = static_cast<int32_t>(get_u32(p + 84 + 4 * i));
    h.meta.reserved = get_u32(p + 100);
    h.written_ns = get_u64(p + 104);
    if (h.store_id != store_id || key_len > kMaxKeyLen || h.kind < kChunk || h.kind > kClear) return false;
    if (h.data_offset != data_offset_for(key_len)) return false;
    if (h.data_len > h.record_len || h.record_len != h.data_offset + round_up(h.data_len, kBlock)) return false;
    if (h.kind == kChunk ? h.meta.length != h.data_len : h.data_len != 0) return false;
    return true;
}

bool check_header_crc(const uint8_t *p, uint32_t key_len) {
    const uint32_t crc = Crc32c::extend(Crc32c::of(p, kHeaderCrcAt), p + kHeaderFixed, key_len);
    return crc == get_u32(p + kHeaderCrcAt);
}

/* Superblock, block 0: u64 magic "KVHLOGS1", u32 version, u32 block size, u64 file bytes, u64 data start,
 * u64 store_id, u64 created (unix s), u32 CRC32C of [0,48). The rest of the block is zero. */
constexpr size_t kSuperCrcAt = 48;

/* ================================================================================================ */
/* The backend                                                                                      */
/* ================================================================================================ */

class LogStore final : public kvh::Backend {
  public:
    static constexpr uint64_t capabilities = KVH_CAP_PERSISTENT | KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_CLEAR | KVH_CAP_STATS;
    static constexpr kvh_option_spec options[] = {
        kvh::option("path", nullptr, "The store's file (created and preallocated if missing; one instance per file)",
                    KVH_OPTION_REQUIRED),
        kvh::option("size_gib", "1", "File size in GiB, decimals allowed (e.g. 0.25); at least 1 MiB; fixed once formatted"),
        kvh::option("o_direct", "false", "Open the file with O_DIRECT (bypass the page cache)"),
        kvh::option("sync", "none", "none: durable on flush/destroy; always: fdatasync before a put completes"),
        kvh::option("verify_on_open", "true", "Check every record's data CRC32C while rebuilding the index on open"),
    };

    explicit LogStore(const kvh::CreateArgs &args);
    ~LogStore() override;

    kvh::Status contains(kvh::ContainsBatch batch) override;
    kvh::Status put(kvh::Request<kvh::PutBatch> &req) override;
    kvh::Status get(kvh::Request<kvh::GetBatch> &req) override;
    kvh::Status remove(kvh::KeyBatch batch, bool force) override;
    kvh::Status flush() override;
    kvh::Status health(std::string &detail) override;
    kvh::Status stats(kvh::Stats &out) override;
    kvh::Status clear() override;
    bool shutdown() noexcept override;

  private:
    /** One indexed key: its newest record, or a tombstone (removed; kept until its record leaves the
     *  ring so an older in-flight put cannot resurrect the key). */
    struct Entry {
        uint64_t seq = 0;
        uint64_t offset = 0; // record start
        uint64_t data_len = 0;
        uint32_t data_offset = 0;
        uint32_t data_crc = 0;
        kvh_chunk_meta meta{};
        bool tombstone = false;
    };
    /** One record in the ring, oldest first. */
    struct Rec {
        uint64_t offset;
        uint64_t len;
        uint64_t seq;
        std::string key; // empty for a clear record
    };
    /** A queued operation. */
    struct Op {
        enum Kind { Put, Get, Tombstone, Clear } kind = Put;
        kvh::Pending<kvh::PutBatch> put;
        kvh::Pending<kvh::GetBatch> get;
        uint64_t seq = 0; // first sequence number of a put; the record's for tombstone/clear
        std::string key;  // tombstone
        kvh::Status status = KVH_OK;
        std::string message;
    };

    // Setup.
    void open_file();
    void load_or_format();
    void scan();

    // The I/O thread.
    void io_loop() noexcept;
    void execute(Op &op, bool &wrote);
    void execute_put(Op &op, bool &wrote);
    void execute_get(Op &op);
    bool write_record(uint64_t off, RecordHeader &h, std::string_view key, kvh::ByteSpan data);
    uint64_t ring_used(uint64_t tail, uint64_t head) const;
    uint64_t allocate(uint64_t len, uint64_t seq, const std::string &key, uint64_t &live_from);
    void evict_front();
    void note_io_error(const std::string &what);

    // Configuration.
    std::string path_;
    uint64_t file_bytes_ = 0;
    uint64_t data_start_ = kBlock;
    bool o_direct_ = false;
    bool sync_always_ = false;
    bool verify_on_open_ = true;
    int fd_ = -1;
    uint64_t store_id_ = 0;

    // Index, ring and head: index_mu_.
    mutable std::shared_mutex index_mu_;
    std::unordered_map<std::string, Entry> index_;
    std::deque<Rec> ring_;
    uint64_t head_ = kBlock;
    uint64_t clear_floor_ = 0;
    uint64_t chunks_ = 0;
    uint64_t live_bytes_ = 0;
    uint64_t evictions_ = 0;

    // Queue: q_mu_.
    std::mutex q_mu_;
    std::condition_variable q_cv_;
    std::condition_variable progress_cv_;
    std::deque<Op> queue_;
    uint64_t next_seq_ = 1;
    uint64_t submitted_ = 0;
    uint64_t executed_ = 0;
    bool stopping_ = false;

    // I/O thread state (only the I/O thread touches these).
    std::thread io_;
    AlignedBuf stage_;

    // Counters for health.
    std::atomic<uint64_t> corrupt_{0};
    std::atomic<uint64_t> io_errors_{0};
    std::atomic<bool> write_failing_{false};
    std::mutex err_mu_;
    std::string last_io_error_;
};

/* ---- create ---- */

LogStore::LogStore(const kvh::CreateArgs &args) : kvh::Backend(args) {
    const kvh::Options o = args.options();
    path_ = std::string(o.require("path"));
    if (path_.empty()) {
        throw kvh::Error(KVH_ERR_INVALID_CONFIG, "logstore: option 'path' is empty");
    }
    const std::string_view size_text = o.get_or("size_gib", "1");
    uint64_t bytes = 0;
    if (!parse_gib(size_text, bytes) || bytes / kBlock * kBlock < kMinFileBytes) {
        throw kvh::Error(KVH_ERR_INVALID_CONFIG,
                         kvh::format("logstore: invalid value '%.*s' for option 'size_gib' (a number of GiB such as 1 or "
                                     "0.25, at least 1 MiB and at most 1 PiB)",
                                     static_cast<int>(size_text.size()), size_text.data()));
    }
    file_bytes_ = bytes / kBlock * kBlock;
    o_direct_ = o.get_bool("o_direct", false);
    verify_on_open_ = o.get_bool("verify_on_open", true);
    const std::string_view sync = o.get_or("sync", "none");
    if (sync == "always") {
        sync_always_ = true;
    } else if (sync != "none") {
        throw kvh::Error(KVH_ERR_INVALID_CONFIG, kvh::format("logstore: invalid value '%.*s' for option 'sync' (none or always)",
                                                             static_cast<int>(sync.size()), sync.data()));
    }
    stage_ = AlignedBuf(kIoBufBytes);
    open_file();
    try {
        load_or_format();
        io_ = std::thread([this] { io_loop(); });
    } catch (...) {
        ::close(fd_);
        fd_ = -1;
        throw;
    }
}

LogStore::~LogStore() {
    if (io_.joinable()) {
        (void)shutdown(); // only if deleted without destroy's shutdown() (never through the ABI)
    }
    if (fd_ >= 0) {
        ::close(fd_);
    }
}

void LogStore::open_file() {
    int flags = O_RDWR | O_CREAT | O_CLOEXEC;
    if (o_direct_) {
        flags |= O_DIRECT;
    }
    fd_ = ::open(path_.c_str(), flags, 0644);
    if (fd_ < 0) {
        const int err = errno;
        throw kvh::Error(err == EINVAL && o_direct_ ? KVH_ERR_INVALID_CONFIG : KVH_ERR_IO,
                         "logstore: cannot open " + path_ + ": " + errno_text(err) +
                             (err == EINVAL && o_direct_ ? " (the file system may not support O_DIRECT)" : ""));
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        const int err = errno;
        ::close(fd_);
        fd_ = -1;
        throw kvh::Error(err == EWOULDBLOCK ? KVH_ERR_BUSY : KVH_ERR_IO,
                         "logstore: cannot lock " + path_ + ": " +
                             (err == EWOULDBLOCK ? std::string("it is in use by another logstore instance") : errno_text(err)));
    }
}

void LogStore::load_or_format() {
    struct stat st{};
    if (::fstat(fd_, &st) != 0) {
        throw kvh::Error(KVH_ERR_IO, "logstore: fstat " + path_ + ": " + errno_text(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        throw kvh::Error(KVH_ERR_INVALID_CONFIG, "logstore: " + path_ + " is not a regular file");
    }
    uint8_t *sb = stage_.data();
    std::memset(sb, 0, kBlock);
    if (st.st_size > 0) {
        const int64_t n = pread_full(fd_, sb, kBlock, 0);
        if (n < 0) {
            throw kvh::Error(KVH_ERR_IO, "logstore: reading the superblock of " + path_ + ": " + errno_text(static_cast<int>(-n)));
        }
    }
    const bool blank = std::all_of(sb, sb + kBlock, [](uint8_t b) { return b == 0; });
    if (!blank) {
        const bool valid = get_u64(sb) == kSuperMagic && get_u32(sb + kSuperCrcAt) == Crc32c::of(sb, kSuperCrcAt);
        if (!valid) {
            throw kvh::Error(KVH_ERR_INVALID_CONFIG, "logstore: " + path_ +
                                                         " exists and is not a logstore file (no valid superblock); "
                                                         "refusing to overwrite it: delete it or choose another path");
        }
        const uint32_t version = get_u32(sb + 8);
        const uint64_t formatted = get_u64(sb + 16);
        if (version != kFormatVersion || get_u32(sb + 12) != kBlock || get_u64(sb + 24) != kBlock) {
            throw kvh::Error(KVH_ERR_INVALID_CONFIG,
                             kvh::format("logstore: %s has format version %u (this plugin reads version %u)", path_.c_str(),
                                         version, kFormatVersion));
        }
        if (formatted != file_bytes_) {
            throw kvh::Error(KVH_ERR_INVALID_CONFIG,
                             kvh::format("logstore: %s was formatted with %llu bytes but size_gib asks for %llu; the size of "
                                         "a store is fixed: use the old size_gib or a new file",
                                         path_.c_str(), static_cast<unsigned long long>(formatted),
                                         static_cast<unsigned long long>(file_bytes_)));
        }
        if (static_cast<uint64_t>(st.st_size) < file_bytes_) {
            throw kvh::Error(KVH_ERR_IO, kvh::format("logstore: %s is shorter (%lld bytes) than its superblock says", path_.c_str(),
                                                     static_cast<long long>(st.st_size)));
        }
        store_id_ = get_u64(sb + 32);
        scan();
        return;
    }

    // A new (or all-zero) file: preallocate, then write the superblock.
    const auto started = std::chrono::steady_clock::now();
    if (static_cast<uint64_t>(st.st_size) < file_bytes_) {
        if (::fallocate(fd_, 0, 0, static_cast<off_t>(file_bytes_)) != 0) {
            const int err = errno;
            const int rc = (err == EOPNOTSUPP || err == ENOSYS) ? ::posix_fallocate(fd_, 0, static_cast<off_t>(file_bytes_)) : err;
            if (rc != 0) {
                throw kvh::Error(rc == ENOSPC ? KVH_ERR_NO_SPACE : KVH_ERR_IO,
                                 "logstore: preallocating " + mib(file_bytes_) + " for " + path_ + ": " + errno_text(rc));
            }
        }
    }
    std::random_device rd;
    store_id_ = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
    if (store_id_ == 0) store_id_ = 1;
    std::memset(sb, 0, kBlock);
    put_u64(sb, kSuperMagic);
    put_u32(sb + 8, kFormatVersion);
    put_u32(sb + 12, static_cast<uint32_t>(kBlock));
    put_u64(sb + 16, file_bytes_);
    put_u64(sb + 24, kBlock);
    put_u64(sb + 32, store_id_);
    put_u64(sb + 40, static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                               std::chrono::system_clock::now().time_since_epoch())
                                               .count()));
    put_u32(sb + kSuperCrcAt, Crc32c::of(sb, kSuperCrcAt));
    int err = pwrite_full(fd_, sb, kBlock, 0);
    if (err == 0 && ::fdatasync(fd_) != 0) err = errno;
    if (err != 0) {
        throw kvh::Error(KVH_ERR_IO, "logstore: writing the superblock of " + path_ + ": " + errno_text(err));
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
    logf(KVH_LOG_INFO, "logstore: formatted %s: %s preallocated in %lld ms, o_direct=%s sync=%s crc32c=%s", path_.c_str(),
         mib(file_bytes_).c_str(), static_cast<long long>(ms), o_direct_ ? "true" : "false", sync_always_ ? "always" : "none",
         Crc32c::hardware() ? "sse4.2" : "software");
}

/* ---- scan: rebuild the index from the file ---- */

namespace scan_detail {

/** Reads of the file through one aligned window (works with O_DIRECT). A miss reads `read_ahead` bytes
 *  (at least what was asked for, at most the window): the whole window for a sequential pass over the
 *  data, a little for a walk over headers only. */
class Reader {
  public:
    Reader(int fd, uint64_t file_end, uint8_t *buf, size_t cap, size_t read_ahead)
        : fd_(fd), end_(file_end), buf_(buf), cap_(cap), read_ahead_(read_ahead) {}
    /** `len` bytes at `off` (len <= window/2), or nullptr on a read error / past the end. */
    const uint8_t *view(uint64_t off, size_t len) {
        if (off + len > end_) return nullptr;
        if (off < start_ || off + len > start_ + have_) {
            start_ = off / kBlock * kBlock;
            const uint64_t need = round_up(off + len - start_, kBlock);
            const uint64_t ahead = std::min<uint64_t>(cap_, std::max<uint64_t>(need, read_ahead_));
            const size_t want = static_cast<size_t>(std::min<uint64_t>(ahead, end_ - start_));
            const int64_t n = pread_full(fd_, buf_, want, start_);
            if (n < 0) {
                error_ = static_cast<int>(-n);
                have_ = 0;
                return nullptr;
            }
            have_ = static_cast<size_t>(n);
            if (off + len > start_ + have_) return nullptr;
        }
        return buf_ + (off - start_);
    }
    /** CRC32C of `len` bytes at `off`; false on a read error. */
    bool crc(uint64_t off, uint64_t len, uint32_t &out) {
        uint32_t c = 0;
        while (len > 0) {
            const size_t piece = static_cast<size_t>(std::min<uint64_t>(len, cap_ / 2));
            const uint8_t *p = view(off, piece);
            if (p == nullptr) return false;
            c = Crc32c::extend(c, p, piece);
            off += piece;
            len -= piece;
        }
        out = c;
        return true;
    }
    int error() const { return error_; }

  private:
    int fd_;
    uint64_t end_;
    uint8_t *buf_;
    size_t cap_;
    size_t read_ahead_;
    uint64_t start_ = 0;
    size_t have_ = 0;
    int error_ = 0;
};

struct Found {
    RecordHeader h;
    uint64_t offset;
    std::string key;
};

} // namespace scan_detail

void LogStore::scan() {
    using scan_detail::Found;
    const auto started = std::chrono::steady_clock::now();
    // With verify_on_open the scan reads the whole live part sequentially; without, only the header
    // blocks (64 KiB at a time, so small records still come several per read).
    scan_detail::Reader reader(fd_, file_bytes_, stage_.data(), stage_.size(), verify_on_open_ ? stage_.size() : 64 * 1024);
    std::vector<Found> found;
    uint64_t invalid_blocks = 0, bad_data = 0;
    uint64_t off = data_start_;
    while (off + kBlock <= file_bytes_) {
        const uint8_t *p = reader.view(off, kHeaderFixed);
        if (p == nullptr) {
            if (reader.error() != 0) {
                throw kvh::Error(KVH_ERR_IO, kvh::format("logstore: reading %s at offset %llu: %s", path_.c_str(),
                                                         static_cast<unsigned long long>(off), errno_text(reader.error()).c_str()));
            }
            break;
        }
        RecordHeader h;
        uint32_t key_len = 0;
        bool ok = decode_fixed(p, store_id_, h, key_len) && off + h.record_len <= file_bytes_;
        if (ok) {
            p = reader.view(off, kHeaderFixed + key_len);
            ok = p != nullptr && check_header_crc(p, key_len);
        }
        if (!ok) {
            invalid_blocks++;
            off += kBlock;
            continue;
        }
        Found f{h, off, std::string(reinterpret_cast<const char *>(p + kHeaderFixed), key_len)};
        // The header is intact, so record_len is trustworthy: skip the data either way.
        bool data_ok = true;
        if (verify_on_open_ && h.kind == kChunk) {
            uint32_t crc = 0;
            data_ok = reader.crc(off + h.data_offset, h.data_len, crc) && crc == h.data_crc;
        }
        if (data_ok && (h.kind != kChunk || !f.key.empty())) {
            found.push_back(std::move(f));
        } else {
            bad_data++;
        }
        off += h.record_len;
    }

    // The newest valid record decides the live window [live_from, seq].
    uint64_t newest_seq = 0, live_from = 0, newest_end = data_start_;
    for (const Found &f : found) {
        if (f.h.seq > newest_seq) {
            newest_seq = f.h.seq;
            live_from = f.h.live_from;
            newest_end = f.offset + f.h.record_len;
        }
    }
    std::vector<const Found *> live;
    for (const Found &f : found) {
        if (f.h.seq >= live_from && f.h.seq <= newest_seq) live.push_back(&f);
    }
    std::sort(live.begin(), live.end(), [](const Found *a, const Found *b) { return a->h.seq < b->h.seq; });
    for (const Found *f : live) {
        ring_.push_back(Rec{f->offset, f->h.record_len, f->h.seq, f->key});
        if (f->h.kind == kClear) {
            index_.clear();
            continue;
        }
        Entry e;
        e.seq = f->h.seq;
        e.offset = f->offset;
        e.tombstone = f->h.kind == kTombstone;
        e.data_len = f->h.data_len;
        e.data_offset = f->h.data_offset;
        e.data_crc = f->h.data_crc;
        e.meta = f->h.meta;
        index_[f->key] = e;
    }
    for (const auto &kv : index_) {
        if (!kv.second.tombstone) {
            chunks_++;
            live_bytes_ += kv.second.data_len;
        }
    }
    head_ = newest_end >= file_bytes_ ? data_start_ : newest_end;
    next_seq_ = newest_seq + 1;
    clear_floor_ = live_from;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
    logf(KVH_LOG_INFO,
         "logstore: opened %s (%s): %llu chunks (%s) recovered from %zu live of %zu valid records in %lld ms; %llu records "
         "failed their data CRC, %llu blocks skipped; head at %llu, next seq %llu",
         path_.c_str(), mib(file_bytes_).c_str(), static_cast<unsigned long long>(chunks_), mib(live_bytes_).c_str(), live.size(),
         found.size(), static_cast<long long>(ms), static_cast<unsigned long long>(bad_data),
         static_cast<unsigned long long>(invalid_blocks), static_cast<unsigned long long>(head_),
         static_cast<unsigned long long>(next_seq_));
    if (bad_data > 0) {
        corrupt_ += bad_data;
        logf(KVH_LOG_WARN, "logstore: %s: %llu records failed their data checksum and were dropped", path_.c_str(),
             static_cast<unsigned long long>(bad_data));
    }
}

/* ---- destroy ---- */

bool LogStore::shutdown() noexcept {
    if (io_.get_id() == std::this_thread::get_id()) {
        log(KVH_LOG_ERROR, "logstore: destroy called from a completion callback (the I/O thread); refusing");
        return false;
    }
    {
        std::lock_guard<std::mutex> lk(q_mu_);
        stopping_ = true;
    }
    q_cv_.notify_all();
    if (io_.joinable()) {
        io_.join(); // the I/O thread drains the queue first: every pending operation completes
    }
    if (fd_ >= 0 && ::fdatasync(fd_) != 0) {
        logf(KVH_LOG_ERROR, "logstore: fdatasync %s at destroy: %s", path_.c_str(), errno_text(errno).c_str());
    }
    std::shared_lock<std::shared_mutex> lk(index_mu_);
    logf(KVH_LOG_INFO, "logstore: closed %s: %llu chunks (%s), %llu evicted, %llu corrupt, %llu I/O errors", path_.c_str(),
         static_cast<unsigned long long>(chunks_), mib(live_bytes_).c_str(), static_cast<unsigned long long>(evictions_),
         static_cast<unsigned long long>(corrupt_.load()), static_cast<unsigned long long>(io_errors_.load()));
    return true;
}

/* ---- synchronous operations ---- */

kvh::Status LogStore::contains(kvh::ContainsBatch batch) {
    std::shared_lock<std::shared_mutex> lk(index_mu_);
    for (size_t i = 0; i < batch.size(); i++) {
        const auto it = index_.find(std::string(batch.key(i).canonical()));
        if (it == index_.end() || it->second.tombstone) {
            batch.set_missing(i);
        } else {
            batch.set_found(i, it->second.meta);
        }
    }
    return KVH_OK;
}

kvh::Status LogStore::remove(kvh::KeyBatch batch, bool) {
    size_t removed = 0;
    {
        std::unique_lock<std::shared_mutex> lk(index_mu_);
        for (size_t i = 0; i < batch.size(); i++) {
            std::string key(batch.key(i).canonical());
            const auto it = index_.find(key);
            if (it == index_.end() || it->second.tombstone) {
                batch.set_status(i, KVH_ERR_NOT_FOUND);
                continue;
            }
            // The tombstone record takes the next sequence number, so it outranks every put queued
            // before it; the index entry becomes a tombstone with that number.
            Op op;
            op.kind = Op::Tombstone;
            op.key = key;
            uint64_t seq;
            {
                std::lock_guard<std::mutex> q(q_mu_);
                seq = op.seq = next_seq_++;
                queue_.push_back(std::move(op));
                submitted_++;
            }
            Entry &e = it->second;
            chunks_--;
            live_bytes_ -= e.data_len;
            e = Entry{};
            e.seq = seq;
            e.tombstone = true;
            batch.set_status(i, KVH_OK);
            removed++;
        }
    }
    if (removed > 0) {
        q_cv_.notify_one();
    }
    return KVH_OK;
}

kvh::Status LogStore::clear() {
    {
        std::unique_lock<std::shared_mutex> lk(index_mu_);
        Op op;
        op.kind = Op::Clear;
        uint64_t seq;
        {
            std::lock_guard<std::mutex> q(q_mu_);
            seq = op.seq = next_seq_++;
            queue_.push_back(std::move(op));
            submitted_++;
        }
        index_.clear();
        ring_.clear(); // what is on disk is dead from here on; the ring just overwrites it
        clear_floor_ = seq;
        chunks_ = 0;
        live_bytes_ = 0;
    }
    q_cv_.notify_one();
    log(KVH_LOG_DEBUG, "logstore: clear");
    return KVH_OK;
}

kvh::Status LogStore::flush() {
    if (io_.get_id() == std::this_thread::get_id()) {
        return fail(KVH_ERR_UNSUPPORTED, "logstore: flush called from a completion callback (the I/O thread)");
    }
    {
        // Everything queued before this call (puts, removes, clears) is written first.
        std::unique_lock<std::mutex> lk(q_mu_);
        const uint64_t target = submitted_;
        progress_cv_.wait(lk, [&] { return executed_ >= target; });
    }
    if (::fdatasync(fd_) != 0) {
        const int err = errno;
        note_io_error("fdatasync: " + errno_text(err));
        return failf(KVH_ERR_IO, "logstore: fdatasync %s: %s", path_.c_str(), errno_text(err).c_str());
    }
    return KVH_OK;
}

// The ring's area is the capacity: a full ring overwrites (evicts) its oldest records.
kvh::Status LogStore::stats(kvh::Stats &out) {
    uint64_t chunks, live, head, tail, evictions;
    {
        std::shared_lock<std::shared_mutex> lk(index_mu_);
        chunks = chunks_;
        live = live_bytes_;
        head = head_;
        tail = ring_.empty() ? head_ : ring_.front().offset;
        evictions = evictions_;
    }
    uint64_t queued;
    {
        std::lock_guard<std::mutex> lk(q_mu_);
        queued = queue_.size();
    }
    out.counter("evictions", evictions)
        .gauge("bytes_used", live)
        .gauge("capacity_bytes", file_bytes_ - data_start_)
        .gauge("entries", chunks)
        .gauge("ring_used_bytes", ring_used(tail, head))
        .gauge("queued", queued)
        .counter("corrupt", corrupt_.load())
        .counter("io_errors", io_errors_.load());
    return KVH_OK;
}

kvh::Status LogStore::health(std::string &detail) {
    uint64_t chunks, live, head, tail, evictions;
    {
        std::shared_lock<std::shared_mutex> lk(index_mu_);
        chunks = chunks_;
        live = live_bytes_;
        head = head_;
        tail = ring_.empty() ? head_ : ring_.front().offset;
        evictions = evictions_;
    }
    uint64_t queued, next_seq;
    {
        std::lock_guard<std::mutex> lk(q_mu_);
        queued = queue_.size();
        next_seq = next_seq_;
    }
    const uint64_t area = file_bytes_ - data_start_;
    const uint64_t used = ring_used(tail, head);
    detail = kvh::format("logstore: %s: %llu chunks (%s) in %s of %s, head at %llu, next seq %llu, %llu queued; %llu evicted, "
                         "%llu corrupt, %llu I/O errors",
                         path_.c_str(), static_cast<unsigned long long>(chunks), mib(live).c_str(), mib(used).c_str(),
                         mib(area).c_str(), static_cast<unsigned long long>(head), static_cast<unsigned long long>(next_seq),
                         static_cast<unsigned long long>(queued), static_cast<unsigned long long>(evictions),
                         static_cast<unsigned long long>(corrupt_.load()), static_cast<unsigned long long>(io_errors_.load()));
    struct stat st{};
    if (::fstat(fd_, &st) != 0 || st.st_nlink == 0) {
        detail += "; the file was deleted";
        return KVH_ERR_IO;
    }
    if (write_failing_.load()) {
        std::lock_guard<std::mutex> lk(err_mu_);
        detail += "; last write failed: " + last_io_error_;
        return KVH_ERR_IO;
    }
    return KVH_OK;
}

/* ---- asynchronous operations: queue for the I/O thread ---- */

kvh::Status LogStore::put(kvh::Request<kvh::PutBatch> &req) {
    Op op; // declared before the lock: if push_back throws, the lock is released before op's Pending cancels
    op.kind = Op::Put;
    std::unique_lock<std::mutex> lk(q_mu_);
    if (queue_.size() >= kMaxQueue) {
        return failf(KVH_ERR_BUSY, "logstore: %zu operations queued; retry later", queue_.size());
    }
    op.put = req.defer();
    op.seq = next_seq_;
    next_seq_ += req.batch().size();
    queue_.push_back(std::move(op));
    submitted_++;
    lk.unlock();
    q_cv_.notify_one();
    return KVH_PENDING;
}

kvh::Status LogStore::get(kvh::Request<kvh::GetBatch> &req) {
    Op op;
    op.kind = Op::Get;
    std::unique_lock<std::mutex> lk(q_mu_);
    if (queue_.size() >= kMaxQueue) {
        return failf(KVH_ERR_BUSY, "logstore: %zu operations queued; retry later", queue_.size());
    }
    op.get = req.defer();
    queue_.push_back(std::move(op));
    submitted_++;
    lk.unlock();
    q_cv_.notify_one();
    return KVH_PENDING;
}

/* ---- the I/O thread ---- */

void LogStore::io_loop() noexcept {
    std::vector<Op> group;
    try {
        group.reserve(kMaxGroup); // so taking operations under q_mu_ does not allocate
    } catch (...) {
    }
    for (;;) {
        group.clear();
        {
            std::unique_lock<std::mutex> lk(q_mu_);
            q_cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (queue_.empty()) {
                return; // stopping, and every queued operation has completed
            }
            try {
                while (!queue_.empty() && group.size() < kMaxGroup) {
                    group.push_back(std::move(queue_.front()));
                    queue_.pop_front();
                }
            } catch (...) {
                // Out of memory growing `group`: run what we have; the rest stays queued.
            }
        }
        bool wrote = false;
        for (Op &op : group) {
            try {
                execute(op, wrote);
            } catch (const std::exception &e) {
                op.status = KVH_ERR_INTERNAL;
                op.message = e.what();
            } catch (...) {
                op.status = KVH_ERR_INTERNAL;
                op.message = "unknown exception";
            }
        }
        if (wrote && sync_always_ && ::fdatasync(fd_) != 0) {
            const std::string why = "fdatasync: " + errno_text(errno);
            note_io_error(why);
            for (Op &op : group) {
                if (op.kind == Op::Put && op.status == KVH_OK) {
                    op.status = KVH_ERR_IO;
                    op.message = "logstore: " + why;
                }
            }
        }
        {
            std::lock_guard<std::mutex> lk(q_mu_);
            executed_ += group.size();
        }
        progress_cv_.notify_all();
        // Completions: no lock held, per-item results written.
        for (Op &op : group) {
            if (op.kind == Op::Put) {
                op.put.complete(op.status, op.message);
            } else if (op.kind == Op::Get) {
                op.get.complete(op.status, op.message);
            }
        }
    }
}

void LogStore::execute(Op &op, bool &wrote) {
    switch (op.kind) {
    case Op::Put:
        execute_put(op, wrote);
        return;
    case Op::Get:
        execute_get(op);
        return;
    case Op::Tombstone:
    case Op::Clear: {
        RecordHeader h;
        h.kind = op.kind == Op::Clear ? kClear : kTombstone;
        h.seq = op.seq;
        h.data_offset = data_offset_for(op.key.size());
        h.record_len = h.data_offset;
        uint64_t off;
        {
            std::unique_lock<std::shared_mutex> lk(index_mu_);
            off = allocate(h.record_len, h.seq, op.key, h.live_from);
        }
        if (op.kind == Op::Clear) {
            h.live_from = h.seq; // everything older is dead
        }
        wrote = true;
        write_record(off, h, op.key, kvh::ByteSpan{});
        return;
    }
    }
}

/** Bytes of the data area between the ring's tail and head. */
uint64_t LogStore::ring_used(uint64_t tail, uint64_t head) const {
    return tail <= head ? head - tail : (file_bytes_ - tail) + (head - data_start_);
}

/** Reserves `len` bytes at the head for record `seq` (under index_mu_): wraps when the record does not
 *  fit before the end, evicts every ring record it overwrites, appends it to the ring. */
uint64_t LogStore::allocate(uint64_t len, uint64_t seq, const std::string &key, uint64_t &live_from) {
    if (head_ + len > file_bytes_) {
        // Wrap. The tail of the previous lap, [head_, end), is skipped: its records are the oldest
        // ones and go first.
        while (!ring_.empty() && ring_.front().offset >= head_) {
            evict_front();
        }
        head_ = data_start_;
    }
    const uint64_t off = head_;
    const uint64_t end = off + len;
    while (!ring_.empty() && ring_.front().offset < end && ring_.front().offset + ring_.front().len > off) {
        evict_front();
    }
    ring_.push_back(Rec{off, len, seq, key});
    head_ = end >= file_bytes_ ? data_start_ : end;
    live_from = std::max(ring_.front().seq, clear_floor_);
    return off;
}

void LogStore::evict_front() {
    const Rec &r = ring_.front();
    const auto it = index_.find(r.key);
    if (it != index_.end() && it->second.seq == r.seq) {
        if (!it->second.tombstone) {
            chunks_--;
            live_bytes_ -= it->second.data_len;
            evictions_++;
        }
        index_.erase(it);
    }
    ring_.pop_front();
}

void LogStore::note_io_error(const std::string &what) {
    io_errors_++;
    write_failing_ = true;
    try {
        std::lock_guard<std::mutex> lk(err_mu_);
        last_io_error_ = what;
    } catch (...) {
    }
    logf(KVH_LOG_ERROR, "logstore: %s: %s", path_.c_str(), what.c_str());
}

/** Writes one record (header `h`, `key`, `data`) at `off`, allocated by allocate(). Returns whether it
 *  reached the file (else the error is counted and logged). I/O thread only: uses the staging buffer. */
bool LogStore::write_record(uint64_t off, RecordHeader &h, std::string_view key, kvh::ByteSpan data) {
    h.store_id = store_id_;
    h.written_ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
    uint8_t *stage = stage_.data();
    encode_header(h, key, stage);
    int err = 0;
    if (!o_direct_) {
        // Straight from the host's buffer: header block(s), data, zero padding.
        static const uint8_t zeros[kBlock] = {};
        struct iovec iov[3];
        int cnt = 0;
        iov[cnt++] = iovec{stage, h.data_offset};
        if (data.len > 0) {
            iov[cnt++] = iovec{const_cast<uint8_t *>(data.ptr), data.len};
        }
        const uint64_t pad = round_up(data.len, kBlock) - data.len;
        if (pad > 0) {
            iov[cnt++] = iovec{const_cast<uint8_t *>(zeros), static_cast<size_t>(pad)};
        }
        err = pwritev_full(fd_, iov, cnt, off);
    } else {
        // O_DIRECT: through the aligned staging buffer, whole blocks only.
        size_t fill = h.data_offset;
        uint64_t at = off;
        const uint8_t *p = data.ptr;
        size_t left = data.len;
        while (err == 0 && left > 0) {
            const size_t n = std::min(left, stage_.size() - fill);
            std::memcpy(stage + fill, p, n);
            fill += n;
            p += n;
            left -= n;
            if (fill == stage_.size()) {
                err = pwrite_full(fd_, stage, fill, at);
                at += fill;
                fill = 0;
            }
        }
        if (err == 0 && fill > 0) {
            const size_t padded = static_cast<size_t>(round_up(fill, kBlock));
            std::memset(stage + fill, 0, padded - fill);
            err = pwrite_full(fd_, stage, padded, at);
        }
    }
    if (err != 0) {
        note_io_error(kvh::format("writing %llu bytes at offset %llu: %s", static_cast<unsigned long long>(h.record_len),
                                  static_cast<unsigned long long>(off), errno_text(err).c_str()));
        return false;
    }
    write_failing_ = false;
    return true;
}

void LogStore::execute_put(Op &op, bool &wrote) {
    const kvh::PutBatch b = op.put.batch();
    const uint64_t area = file_bytes_ - data_start_;
    size_t stored = 0;
    for (size_t i = 0; i < b.size(); i++) {
        const uint64_t seq = op.seq + i;
        const std::string key(b.key(i).canonical());
        const kvh::ByteSpan data = b.data(i);
        const kvh_chunk_meta &meta = b.meta(i);
        if (key.empty() || key.size() > kMaxKeyLen || (data.len > 0 && data.ptr == nullptr) || meta.length != data.len ||
            meta.ndim > 4) {
            b.set_status(i, KVH_ERR_INVALID_ARG);
            continue;
        }
        RecordHeader h;
        h.kind = kChunk;
        h.seq = seq;
        h.data_len = data.len;
        h.data_offset = data_offset_for(key.size());
        h.record_len = h.data_offset + round_up(data.len, kBlock);
        h.meta = meta;
        if (h.record_len > area) {
            b.set_status(i, KVH_ERR_NO_SPACE);
            continue;
        }
        h.data_crc = Crc32c::of(data.ptr, data.len);
        uint64_t off;
        {
            std::unique_lock<std::shared_mutex> lk(index_mu_);
            off = allocate(h.record_len, seq, key, h.live_from);
        }
        wrote = true;
        if (!write_record(off, h, key, data)) {
            b.set_status(i, KVH_ERR_IO);
            continue;
        }
        {
            // Newest generation wins; a remove or clear issued after this put was queued outranks it.
            std::unique_lock<std::shared_mutex> lk(index_mu_);
            if (seq >= clear_floor_) {
                Entry e;
                e.seq = seq;
                e.offset = off;
                e.data_len = data.len;
                e.data_offset = h.data_offset;
                e.data_crc = h.data_crc;
                e.meta = meta;
                auto it = index_.find(key);
                if (it == index_.end()) {
                    index_.emplace(key, e);
                    chunks_++;
                    live_bytes_ += e.data_len;
                } else if (it->second.seq < seq) {
                    if (!it->second.tombstone) {
                        chunks_--;
                        live_bytes_ -= it->second.data_len;
                    }
                    it->second = e;
                    chunks_++;
                    live_bytes_ += e.data_len;
                }
            }
        }
        b.set_status(i, KVH_OK);
        stored++;
    }
    logf(KVH_LOG_DEBUG, "logstore: put: %zu of %zu chunks stored", stored, b.size());
}

void LogStore::execute_get(Op &op) {
    const kvh::GetBatch b = op.get.batch();
    size_t hits = 0;
    for (size_t i = 0; i < b.size(); i++) {
        const std::string key(b.key(i).canonical());
        Entry e;
        {
            std::shared_lock<std::shared_mutex> lk(index_mu_);
            const auto it = index_.find(key);
            if (it == index_.end() || it->second.tombstone) {
                b.set_missing(i);
                continue;
            }
            e = it->second;
        }
        const kvh::MutByteSpan dst = b.dst(i);
        if (dst.len < e.data_len) {
            b.set_too_small(i, e.data_len);
            continue;
        }
        // Only this thread writes the file, so the record cannot be overwritten while we read it.
        const uint64_t at = e.offset + e.data_offset;
        const size_t len = static_cast<size_t>(e.data_len);
        int err = 0;
        uint32_t crc = 0;
        if (len > 0) {
            const size_t aligned_len = static_cast<size_t>(round_up(len, kBlock));
            const bool direct_ok = !o_direct_ || (reinterpret_cast<uintptr_t>(dst.ptr) % kBlock == 0 && dst.len >= aligned_len);
            if (direct_ok) {
                // Straight into the host's buffer.
                const size_t want = o_direct_ ? aligned_len : len;
                const int64_t n = pread_full(fd_, dst.ptr, want, at);
                err = n < 0 ? static_cast<int>(-n) : static_cast<size_t>(n) < len ? EIO : 0;
                if (err == 0) crc = Crc32c::of(dst.ptr, len);
            } else {
                // O_DIRECT into an unaligned buffer: bounce through the aligned stage.
                size_t done = 0;
                while (err == 0 && done < len) {
                    const size_t piece = std::min(len - done, stage_.size());
                    const size_t piece_aligned = static_cast<size_t>(round_up(piece, kBlock));
                    const int64_t n = pread_full(fd_, stage_.data(), piece_aligned, at + done);
                    err = n < 0 ? static_cast<int>(-n) : static_cast<size_t>(n) < piece ? EIO : 0;
                    if (err == 0) {
                        std::memcpy(dst.ptr + done, stage_.data(), piece);
                        crc = Crc32c::extend(crc, stage_.data(), piece);
                        done += piece;
                    }
                }
            }
        }
        if (err != 0) {
            io_errors_++;
            logf(KVH_LOG_ERROR, "logstore: %s: reading %zu bytes at offset %llu: %s", path_.c_str(), len,
                 static_cast<unsigned long long>(at), errno_text(err).c_str());
            b.set_status(i, KVH_ERR_IO);
            continue;
        }
        if (crc != e.data_crc) {
            corrupt_++;
            logf(KVH_LOG_WARN, "logstore: %s: chunk %s at offset %llu failed its CRC32C check; dropped from the index", path_.c_str(),
                 key.c_str(), static_cast<unsigned long long>(e.offset));
            {
                std::unique_lock<std::shared_mutex> lk(index_mu_);
                const auto it = index_.find(key);
                if (it != index_.end() && it->second.seq == e.seq && !it->second.tombstone) {
                    chunks_--;
                    live_bytes_ -= it->second.data_len;
                    index_.erase(it);
                }
            }
            b.set_status(i, KVH_ERR_CORRUPT);
            continue;
        }
        b.set_found(i, e.data_len, e.meta);
        hits++;
    }
    logf(KVH_LOG_DEBUG, "logstore: get: %zu of %zu chunks found", hits, b.size());
}

} // namespace

KVH_EXPORT_BACKEND(logstore, LogStore, "0.1.0",
                   "Log-structured store on one preallocated file: sequential 4 KiB-aligned appends, ring overwrite, CRC32C, "
                   "index rebuilt on open");
