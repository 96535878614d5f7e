#include "kvhost_plugin.h"

int header_b_check(void) {
    kvh_chunk_meta m = {0};
    m.ndim = 4;
    return (int)(m.ndim != 4) + (int)(sizeof(kvh_key) != 96) + (KVH_NO_LAYER == -1 ? 0 : 1);
}
