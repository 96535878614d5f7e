// The headers compiled as C++17 from two translation units (this one and header_cpp_b.cpp), the
// utility header included by both with its default per-unit last-error slot.
#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"
#include <cstdio>
#include <cstring>

int header_cpp_b(void);

int main() {
    kvh_backend_vtable vt{};
    vt.struct_size = sizeof vt;
    const kvh_backend *backend = reinterpret_cast<const kvh_backend *>(&vt);
    kvh_util_set_last_error(backend, "%s", "per unit");
    char text[16];
    bool own = kvh_util_last_error(backend, text, sizeof text) == 8 && std::strcmp(text, "per unit") == 0;
    return (vt.struct_size >= KVH_VTABLE_V1_2_SIZE && header_cpp_b() == 0 && own) ? 0 : 1;
}
