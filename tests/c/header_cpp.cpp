// The header compiled as C++17 from two translation units (this one and header_b.c's C++ twin below).
#include "kvhost_plugin.h"
#include <cstdio>

int header_cpp_b(void);

int main() {
    kvh_backend_vtable vt{};
    vt.struct_size = sizeof vt;
    return (vt.struct_size == KVH_VTABLE_V1_2_SIZE && header_cpp_b() == 0) ? 0 : 1;
}
