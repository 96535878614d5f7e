// kvhost_plugin.hpp compiled as C++17 from two translation units (this one and header_hpp_b.cpp), warning-free
// under -Wall -Wextra -Werror -pedantic, and exercised: this unit exports two classes with KVH_EXPORT_BACKEND and
// drives their vtables the way the host does (sync and deferred completions, exceptions, last_error, create
// errors, Pending's cancel-on-drop); header_hpp_b.cpp uses the same inline helpers and thread-local slot.
#include "kvhost_plugin.hpp"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

int hpp_b_checks(const kvh_backend_vtable *vt, kvh_backend *backend); // header_hpp_b.cpp

namespace {

int g_failures = 0;
#define EXPECT(cond)                                                                 \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::fprintf(stderr, "header_hpp_a.cpp:%d: FAILED %s\n", __LINE__, #cond); \
            g_failures++;                                                            \
        }                                                                            \
    } while (0)

// ---- a test backend: one slot, put is deferred to a thread when the key says so ----

class Probe final : public kvh::Backend {
  public:
    static constexpr uint64_t capabilities =
        KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_CLEAR | KVH_CAP_ASYNC_CONTAINS | KVH_CAP_ASYNC_REMOVE;
    static constexpr kvh_option_spec options[] = {
        kvh::option("mode", "normal", "normal or refuse"),
        kvh::option("limit", "10", "a number"),
    };

    explicit Probe(const kvh::CreateArgs &args) : kvh::Backend(args) {
        const kvh::Options o = args.options();
        if (o.get_or("mode", "normal") == "refuse") {
            throw kvh::Error(KVH_ERR_INVALID_CONFIG, "probe: refused by option mode");
        }
        if (o.get_or("mode", "normal") == "throw") {
            throw std::runtime_error("constructor blew up");
        }
        limit_ = o.get_u64("limit", 10, 1, 100);
    }

    kvh::Status contains(kvh::ContainsBatch batch) override {
        for (size_t i = 0; i < batch.size(); i++) {
            if (batch.key(i).canonical() == "throw") {
                throw std::runtime_error("contains threw");
            }
            if (has_ && batch.key(i).canonical() == key_) {
                batch.set_found(i, meta_);
            } else {
                batch.set_missing(i);
            }
        }
        return KVH_OK;
    }

    kvh::Status put(kvh::Request<kvh::PutBatch> &req) override {
        kvh::PutBatch batch = req.batch();
        std::string_view first = batch.size() > 0 ? batch.key(0).canonical() : std::string_view();
        if (first == "async" || first == "drop") {
            kvh::Pending<kvh::PutBatch> p = req.defer();
            if (first == "drop") {
                return KVH_PENDING; // p goes out of scope pending: completes with CANCELED
            }
            worker_ = std::thread([this, p = std::move(p)]() mutable {
                kvh::PutBatch b = p.batch();
                for (size_t i = 0; i < b.size(); i++) {
                    store(b, i);
                }
                p.complete(KVH_OK);
            });
            return KVH_PENDING;
        }
        if (first == "twice") {
            kvh::Pending<kvh::PutBatch> p = req.defer();
            (void)req.defer(); // throws std::logic_error; p then cancels during unwinding
            return KVH_PENDING;
        }
        if (first == "liar") {
            return KVH_PENDING; // PENDING without defer(): the trampoline must refuse it
        }
        if (first == "fail") {
            return failf(KVH_ERR_NO_SPACE, "probe: no room for %zu chunks", batch.size());
        }
        if (first == "silent") {
            return KVH_ERR_IO; // no message: the trampoline makes one
        }
        for (size_t i = 0; i < batch.size(); i++) {
            store(batch, i);
        }
        return KVH_OK;
    }

    kvh::Status get(kvh::Request<kvh::GetBatch> &req) override {
        kvh::GetBatch batch = req.batch();
        for (size_t i = 0; i < batch.size(); i++) {
            if (has_ && batch.key(i).canonical() == key_) {
                batch.fill(i, data_.data(), data_.size(), meta_);
            } else {
                batch.set_missing(i);
            }
        }
        return KVH_OK;
    }

    kvh::Status remove(kvh::KeyBatch batch, bool) override {
        for (size_t i = 0; i < batch.size(); i++) {
            if (batch.key(i).canonical() == "typed") {
                throw kvh::Error(KVH_ERR_UNAVAILABLE, "server gone");
            }
            bool hit = has_ && batch.key(i).canonical() == key_;
            has_ = has_ && !hit;
            batch.set_status(i, hit ? KVH_OK : KVH_ERR_NOT_FOUND);
        }
        return KVH_OK;
    }

    // Answered from a thread (as a network backend would), except a key "now": answered in the call.
    kvh::Status contains_async(kvh::Request<kvh::ContainsBatch> &req) override {
        if (req.batch().size() > 0 && req.batch().key(0).canonical() == "now") {
            return contains(req.batch());
        }
        kvh::Pending<kvh::ContainsBatch> p = req.defer();
        if (req.batch().size() > 0 && req.batch().key(0).canonical() == "throw") {
            throw std::runtime_error("contains_async threw after defer"); // p cancels while unwinding
        }
        if (lookup_.joinable()) {
            lookup_.join();
        }
        lookup_ = std::thread([this, p = std::move(p)]() mutable {
            contains(p.batch());
            p.complete(KVH_OK);
        });
        return KVH_PENDING;
    }
    kvh::Status remove_async(kvh::Request<kvh::KeyBatch> &req, bool force) override {
        if (!force) {
            throw kvh::Error(KVH_ERR_INVALID_ARG, "only forced removes here");
        }
        kvh::Pending<kvh::KeyBatch> p = req.defer();
        if (remover_.joinable()) {
            remover_.join();
        }
        remover_ = std::thread([this, p = std::move(p)]() mutable {
            remove(p.batch(), true);
            p.complete(KVH_OK);
        });
        return KVH_PENDING;
    }

    kvh::Status flush() override { return KVH_OK; }
    kvh::Status health(std::string &detail) override {
        detail = "probe: ok, limit " + std::to_string(limit_);
        return KVH_OK;
    }
    kvh::Status clear() override {
        has_ = false;
        return KVH_OK;
    }
    bool shutdown() noexcept override {
        for (std::thread *t : {&worker_, &lookup_, &remover_}) {
            if (t->joinable()) {
                t->join();
            }
        }
        return true;
    }

  private:
    void store(kvh::PutBatch b, size_t i) {
        key_ = std::string(b.key(i).canonical());
        data_.assign(b.data(i).begin(), b.data(i).end());
        meta_ = b.meta(i);
        has_ = true;
        b.set_status(i, KVH_OK);
    }
    std::thread worker_;
    std::thread lookup_;
    std::thread remover_;
    std::string key_;
    std::vector<uint8_t> data_;
    kvh_chunk_meta meta_{};
    bool has_ = false;
    uint64_t limit_ = 0;
};

// A second class: no options, no optional operations, built by a static factory that can refuse.
class Minimal final : public kvh::Backend {
  public:
    static std::unique_ptr<Minimal> create(const kvh::CreateArgs &args, kvh::CreateError &error) {
        if (args.metadata() != nullptr && args.metadata()->world_size > 8) {
            error.status = KVH_ERR_INVALID_CONFIG;
            error.message = "minimal: world_size above 8";
            return nullptr;
        }
        return std::unique_ptr<Minimal>(new Minimal(args));
    }
    kvh::Status contains(kvh::ContainsBatch b) override {
        for (size_t i = 0; i < b.size(); i++) b.set_missing(i);
        return KVH_OK;
    }
    kvh::Status put(kvh::Request<kvh::PutBatch> &req) override {
        for (size_t i = 0; i < req.batch().size(); i++) req.batch().set_status(i, KVH_OK);
        return KVH_OK;
    }
    kvh::Status get(kvh::Request<kvh::GetBatch> &req) override {
        for (size_t i = 0; i < req.batch().size(); i++) req.batch().set_missing(i);
        return KVH_OK;
    }
    kvh::Status remove(kvh::KeyBatch b, bool) override {
        for (size_t i = 0; i < b.size(); i++) b.set_status(i, KVH_ERR_NOT_FOUND);
        return KVH_OK;
    }

  private:
    explicit Minimal(const kvh::CreateArgs &args) : kvh::Backend(args) {}
};

} // namespace

KVH_EXPORT_BACKEND(probe, Probe, "1.2.3", "header test backend");
KVH_EXPORT_BACKEND(minimal, Minimal, "0.0.1", nullptr);

// ---- a fake host ----

namespace {

std::atomic<int> g_errors_logged{0};
std::string g_last_log;

void host_log(void *, int32_t level, kvh_str target, kvh_str message) {
    if (level == KVH_LOG_ERROR) {
        g_errors_logged++;
    }
    g_last_log = std::string(kvh::to_view(target)) + "|" + std::string(kvh::to_view(message));
}
bool host_log_enabled(void *, int32_t) { return true; }

kvh_host_api make_host() {
    kvh_host_api h{};
    h.struct_size = sizeof h;
    h.abi_major = KVH_ABI_MAJOR;
    h.abi_minor = KVH_ABI_MINOR;
    h.log = host_log;
    h.log_enabled = host_log_enabled;
    return h;
}
const kvh_host_api g_host = make_host();

struct Done {
    std::atomic<int> fired{0};
    std::atomic<int> status{KVH_ERR_NO_RESULT};
};
void on_done(void *user, kvh_status status, kvh_str) {
    Done *d = static_cast<Done *>(user);
    d->status = status;
    d->fired++;
}

kvh_key make_key(const char *text) {
    kvh_key k{};
    k.canonical.ptr = text;
    k.canonical.len = std::strlen(text);
    k.layer_id = KVH_NO_LAYER;
    return k;
}

std::string last_error(const kvh_backend_vtable *vt, kvh_backend *b) {
    char buf[256];
    size_t n = vt->last_error(b, buf, sizeof buf);
    return n == 0 ? std::string() : std::string(buf);
}

// One put request; owns everything its batch points to, so it may outlive the call (PENDING).
struct PutReq {
    uint8_t bytes[4] = {1, 2, 3, 4};
    kvh_key key{};
    kvh_bytes src{};
    kvh_chunk_meta meta{};
    kvh_status item = KVH_ERR_NO_RESULT;
    kvh_put_batch batch{};
    Done done;
};

kvh_status put1(const kvh_backend_vtable *vt, kvh_backend *b, const char *key, PutReq &r) {
    r.key = make_key(key);
    r.src = kvh_bytes{r.bytes, sizeof r.bytes};
    r.meta = kvh_chunk_meta{};
    r.meta.length = sizeof r.bytes;
    r.meta.fmt = KVH_FMT_BINARY;
    r.item = KVH_ERR_NO_RESULT;
    r.batch = kvh_put_batch{&r.key, &r.src, &r.meta, &r.item, 1};
    return vt->put(b, &r.batch, kvh_completion{on_done, &r.done});
}

} // namespace

int main() {
    const kvh_plugin_descriptor *d = KVH_PLUGIN_SYMBOL(probe)(&g_host);
    EXPECT(d == KVH_PLUGIN_SYMBOL(probe)(&g_host));
    EXPECT(std::strcmp(d->class_name, "probe") == 0 && std::strcmp(d->plugin_version, "1.2.3") == 0);
    EXPECT(d->capabilities == (KVH_CAP_FLUSH | KVH_CAP_HEALTH | KVH_CAP_CLEAR | KVH_CAP_ASYNC_CONTAINS | KVH_CAP_ASYNC_REMOVE));
    EXPECT(d->options_len == 2 && std::strcmp(d->options[1].key, "limit") == 0);
    const kvh_backend_vtable *vt = d->vtable;
    EXPECT(vt->struct_size == sizeof(kvh_backend_vtable));
    EXPECT(vt->flush && vt->health && vt->clear && vt->last_error && !vt->pin && !vt->unpin && !vt->prefetch);
    EXPECT(vt->contains_async && vt->remove_async);

    // create: options, a kvh::Error, an unexpected exception.
    kvh_option opts[2] = {{{"mode", 4}, {"normal", 6}}, {{"limit", 5}, {"42", 2}}};
    kvh_options options{opts, 2};
    kvh_model_metadata md{};
    md.struct_size = sizeof md;
    md.world_size = 1;
    char err[128] = "";
    kvh_backend *b = nullptr;
    EXPECT(vt->create(&g_host, &options, &md, &b, kvh_message_buf{err, sizeof err}) == KVH_OK && b != nullptr);

    kvh_backend *refused = nullptr;
    opts[0].value = kvh_str{"refuse", 6};
    EXPECT(vt->create(&g_host, &options, &md, &refused, kvh_message_buf{err, sizeof err}) == KVH_ERR_INVALID_CONFIG);
    EXPECT(refused == nullptr && std::strstr(err, "refused by option mode") != nullptr);
    opts[0].value = kvh_str{"throw", 5};
    EXPECT(vt->create(&g_host, &options, &md, &refused, kvh_message_buf{err, sizeof err}) == KVH_ERR_PANIC);
    EXPECT(std::strstr(err, "constructor blew up") != nullptr);
    opts[0].value = kvh_str{"normal", 6};
    opts[1].value = kvh_str{"1000", 4};
    EXPECT(vt->create(&g_host, &options, &md, &refused, kvh_message_buf{err, 8}) == KVH_ERR_INVALID_CONFIG);
    EXPECT(std::strlen(err) == 7); // truncated to the buffer

    // put, synchronous.
    PutReq sync;
    EXPECT(put1(vt, b, "sync", sync) == KVH_OK && sync.item == KVH_OK && sync.done.fired == 0);
    // put deferred to a thread: PENDING, completes once with OK.
    PutReq async;
    EXPECT(put1(vt, b, "async", async) == KVH_PENDING);
    vt->destroy(b); // joins the worker through shutdown()
    EXPECT(async.done.fired == 1 && async.done.status == KVH_OK && async.item == KVH_OK);

    b = nullptr;
    EXPECT(vt->create(&g_host, &options, &md, &b, kvh_message_buf{err, sizeof err}) == KVH_ERR_INVALID_CONFIG);
    opts[1].value = kvh_str{"42", 2};
    EXPECT(vt->create(&g_host, &options, &md, &b, kvh_message_buf{err, sizeof err}) == KVH_OK);
    EXPECT(put1(vt, b, "sync", sync) == KVH_OK && sync.item == KVH_OK);

    // A Pending dropped without completing: CANCELED, once, and the call still says PENDING.
    PutReq dropped;
    EXPECT(put1(vt, b, "drop", dropped) == KVH_PENDING && dropped.done.fired == 1 && dropped.done.status == KVH_ERR_CANCELED);
    // defer() twice throws after the first defer: PENDING, completion CANCELED, error logged.
    PutReq twice;
    int errors = g_errors_logged;
    EXPECT(put1(vt, b, "twice", twice) == KVH_PENDING && twice.done.fired == 1 && twice.done.status == KVH_ERR_CANCELED);
    EXPECT(g_errors_logged == errors + 1 && g_last_log.find("defer() called twice") != std::string::npos);
    // PENDING without defer(): refused as INTERNAL, completion never fires.
    PutReq liar;
    EXPECT(put1(vt, b, "liar", liar) == KVH_ERR_INTERNAL && liar.done.fired == 0);
    EXPECT(last_error(vt, b).find("without Request::defer()") != std::string::npos);
    // Errors with and without a message.
    PutReq failed;
    EXPECT(put1(vt, b, "fail", failed) == KVH_ERR_NO_SPACE && failed.done.fired == 0);
    EXPECT(last_error(vt, b) == "probe: no room for 1 chunks");
    EXPECT(put1(vt, b, "silent", failed) == KVH_ERR_IO && failed.done.fired == 0);
    EXPECT(last_error(vt, b) == "probe: put failed: IO");

    // contains: a hit with metadata, and an exception -> PANIC, logged, last_error.
    kvh_key keys[2] = {make_key("sync"), make_key("absent")};
    kvh_chunk_meta metas[2];
    kvh_status st[2] = {KVH_ERR_NO_RESULT, KVH_ERR_NO_RESULT};
    kvh_contains_batch cb{keys, metas, st, 2, 0, 0};
    EXPECT(vt->contains(b, &cb) == KVH_OK && st[0] == KVH_OK && metas[0].length == 4 && st[1] == KVH_ERR_NOT_FOUND);
    kvh_key bad = make_key("throw");
    kvh_contains_batch cbad{&bad, metas, st, 1, 0, 0};
    errors = g_errors_logged;
    EXPECT(vt->contains(b, &cbad) == KVH_ERR_PANIC && g_errors_logged == errors + 1);
    EXPECT(last_error(vt, b) == "probe: exception in contains: contains threw");
    EXPECT(g_last_log == "probe|probe: exception in contains: contains threw");
    // NULL batch.
    EXPECT(vt->contains(b, nullptr) == KVH_ERR_NULL_PARAM && !last_error(vt, b).empty());

    // get: fill, too small.
    uint8_t small[2];
    uint8_t big[16];
    kvh_key gk[2] = {make_key("sync"), make_key("sync")};
    kvh_mut_bytes dst[2] = {{small, sizeof small}, {big, sizeof big}};
    uint64_t out_len[2];
    kvh_chunk_meta out_meta[2];
    kvh_status gs[2];
    kvh_get_batch gb{gk, dst, out_len, out_meta, gs, 2};
    Done gdone;
    EXPECT(vt->get(b, &gb, kvh_completion{on_done, &gdone}) == KVH_OK && gdone.fired == 0);
    EXPECT(gs[0] == KVH_ERR_BUFFER_TOO_SMALL && out_len[0] == 4 && gs[1] == KVH_OK && out_len[1] == 4 && big[3] == 4);

    // remove: a kvh::Error is its status, not a panic.
    kvh_key rk = make_key("typed");
    kvh_status rs;
    kvh_key_batch kb{&rk, &rs, 1};
    errors = g_errors_logged;
    EXPECT(vt->remove(b, &kb, false) == KVH_ERR_UNAVAILABLE && g_errors_logged == errors);
    EXPECT(last_error(vt, b) == "probe: remove: server gone");

    // contains_async: deferred to a thread (same answers as contains), answered in the call, an
    // exception after defer (PENDING, completion CANCELED once), a NULL completion.
    {
        kvh_status ast[2] = {KVH_ERR_NO_RESULT, KVH_ERR_NO_RESULT};
        kvh_chunk_meta ameta[2];
        kvh_contains_batch acb{keys, ameta, ast, 2, 0, 0};
        Done adone;
        EXPECT(vt->contains_async(b, &acb, kvh_completion{on_done, &adone}) == KVH_PENDING);
        while (adone.fired == 0) std::this_thread::yield();
        EXPECT(adone.fired == 1 && adone.status == KVH_OK && ast[0] == KVH_OK && ameta[0].length == 4 && ast[1] == KVH_ERR_NOT_FOUND);
        kvh_key now = make_key("now");
        kvh_contains_batch ncb{&now, ameta, ast, 1, 0, 0};
        Done ndone;
        EXPECT(vt->contains_async(b, &ncb, kvh_completion{on_done, &ndone}) == KVH_OK && ndone.fired == 0 && ast[0] == KVH_ERR_NOT_FOUND);
        kvh_contains_batch tcb{&bad, ameta, ast, 1, 0, 0};
        Done tdone;
        errors = g_errors_logged;
        EXPECT(vt->contains_async(b, &tcb, kvh_completion{on_done, &tdone}) == KVH_PENDING);
        EXPECT(tdone.fired == 1 && tdone.status == KVH_ERR_CANCELED && g_errors_logged == errors + 1);
        EXPECT(vt->contains_async(b, &ncb, kvh_completion{nullptr, nullptr}) == KVH_ERR_NULL_PARAM);
    }
    // remove_async: deferred, then the key is gone; a kvh::Error before defer is the call's status.
    {
        kvh_key sk = make_key("sync");
        kvh_status s1 = KVH_ERR_NO_RESULT;
        kvh_key_batch rkb{&sk, &s1, 1};
        Done rdone;
        EXPECT(vt->remove_async(b, &rkb, false, kvh_completion{on_done, &rdone}) == KVH_ERR_INVALID_ARG && rdone.fired == 0);
        EXPECT(last_error(vt, b) == "probe: remove_async: only forced removes here");
        EXPECT(vt->remove_async(b, &rkb, true, kvh_completion{on_done, &rdone}) == KVH_PENDING);
        while (rdone.fired == 0) std::this_thread::yield();
        EXPECT(rdone.fired == 1 && rdone.status == KVH_OK && s1 == KVH_OK);
        kvh_status after = KVH_ERR_NO_RESULT;
        kvh_chunk_meta am;
        kvh_contains_batch after_b{&sk, &am, &after, 1, 0, 0};
        EXPECT(vt->contains(b, &after_b) == KVH_OK && after == KVH_ERR_NOT_FOUND);
        EXPECT(put1(vt, b, "sync", sync) == KVH_OK); // back, for the checks below
    }

    // health truncates into the host buffer.
    char hm[8];
    EXPECT(vt->health(b, kvh_message_buf{hm, sizeof hm}) == KVH_OK && std::strcmp(hm, "probe: ") == 0);
    EXPECT(vt->flush(b) == KVH_OK && vt->clear(b) == KVH_OK);

    // The other unit shares the inline helpers and this thread's last-error slot.
    EXPECT(hpp_b_checks(vt, b) == 0);

    // A fresh thread has no last error.
    size_t fresh = 1;
    std::thread([&] { fresh = vt->last_error(b, nullptr, 0); }).join();
    EXPECT(fresh == 0);
    vt->destroy(b);

    // The factory-built class.
    const kvh_plugin_descriptor *m = KVH_PLUGIN_SYMBOL(minimal)(&g_host);
    EXPECT(m->description == nullptr && m->options == nullptr && m->options_len == 0 && m->capabilities == 0);
    EXPECT(!m->vtable->flush && !m->vtable->health && !m->vtable->clear);
    md.world_size = 16;
    kvh_backend *mb = nullptr;
    EXPECT(m->vtable->create(&g_host, &options, &md, &mb, kvh_message_buf{err, sizeof err}) == KVH_ERR_INVALID_CONFIG);
    EXPECT(mb == nullptr && std::strcmp(err, "minimal: world_size above 8") == 0);
    md.world_size = 2;
    EXPECT(m->vtable->create(&g_host, nullptr, &md, &mb, kvh_message_buf{err, sizeof err}) == KVH_OK && mb != nullptr);
    m->vtable->destroy(mb);

    if (g_failures == 0) {
        std::printf("kvhost_plugin.hpp: all checks passed\n");
    }
    return g_failures == 0 ? 0 : 1;
}
