#include "kvhost_plugin.h"

int header_cpp_b(void) { return sizeof(kvh_plugin_descriptor) == KVH_DESCRIPTOR_V1_0_SIZE ? 0 : 1; }
