// Second translation unit of the kvhost_plugin.hpp test (see header_hpp_a.cpp): the header's inline functions,
// inline variables and templates must link cleanly when two units include it, and share one thread-local
// last-error slot.
#include "kvhost_plugin.hpp"

#include <cstring>
#include <string>

int hpp_b_checks(const kvh_backend_vtable *vt, kvh_backend *backend) {
    int failures = 0;
    // UTF-8-safe truncation: "é" is two bytes and must not be cut in half.
    char buf[4];
    if (kvh::copy_message(buf, sizeof buf, "ab\xc3\xa9") != 4 || std::strcmp(buf, "ab") != 0) {
        failures++;
    }
    if (std::strcmp(kvh::status_name(KVH_ERR_CORRUPT), "CORRUPT") != 0 || std::strcmp(kvh::status_name(12345), "UNKNOWN") != 0) {
        failures++;
    }
    if (kvh::format("%d-%s", 7, "x") != "7-x") {
        failures++;
    }
    // An empty Pending is inert; a Request defers once.
    kvh::Pending<kvh::KeyBatch> empty;
    empty.complete(KVH_OK);
    if (empty.pending()) {
        failures++;
    }
    // The slot unit A's vtable reads is the one this unit writes (keyed by the backend's Backend subobject,
    // which is the kvh_backend pointer for a class with kvh::Backend as its only base).
    kvh::detail::set_last_error(backend, "set from unit b");
    char text[64];
    if (vt->last_error(backend, text, sizeof text) != std::strlen("set from unit b") || std::strcmp(text, "set from unit b") != 0) {
        failures++;
    }
    // Options helpers.
    kvh_option items[1] = {{{"n", 1}, {"12x", 3}}};
    kvh_options opts{items, 1};
    try {
        (void)kvh::Options(&opts).get_u64("n", 0);
        failures++;
    } catch (const kvh::Error &e) {
        if (e.status() != KVH_ERR_INVALID_CONFIG || std::string(e.what()).find("'12x'") == std::string::npos) {
            failures++;
        }
    }
    if (kvh::Options(&opts).get_or("missing", "dflt") != "dflt" || kvh::Options(nullptr).size() != 0) {
        failures++;
    }
    return failures;
}
