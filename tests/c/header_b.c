#include "kvhost_plugin.h"
#define KVH_UTIL_SHARED_LAST_ERROR
#include "kvhost_plugin_util.h"

int header_b_check(void);
void header_b_fail(const kvh_backend *backend);

int header_b_check(void) {
    kvh_chunk_meta m = {0};
    m.ndim = 4;
    return (int)(m.ndim != 4) + (int)(sizeof(kvh_key) != 96) + (KVH_NO_LAYER == -1 ? 0 : 1);
}

void header_b_fail(const kvh_backend *backend) { kvh_util_set_last_error(backend, "set in %s", "header_b.c"); }
