#include "kvhost_plugin.h"
#include "kvhost_plugin_util.h"

int header_cpp_b(void) {
    // This unit's slot is its own: nothing set here, so nothing to report.
    const kvh_backend *backend = nullptr;
    char text[8];
    return (sizeof(kvh_plugin_descriptor) == KVH_DESCRIPTOR_V1_0_SIZE && kvh_util_last_error(backend, text, sizeof text) == 0 &&
            kvh_util_str_equals(kvh_str{"ab", 2}, "ab"))
               ? 0
               : 1;
}
