/* Compiled with header_b.c into one program: the header must be includable from two translation units
 * and compile warning-free as C11 under -Wall -Wextra -Werror -pedantic. */
#include "kvhost_plugin.h"
#include "kvhost_plugin.h" /* include guard */

int header_b_check(void);

int main(void) {
    kvh_backend_vtable vt = {0};
    vt.struct_size = (uint32_t)sizeof vt;
    kvh_status s = KVH_ERR_NOT_FOUND;
    return (vt.struct_size == KVH_VTABLE_V1_2_SIZE && s == -3 && 0 - KVH_ERR_IO == 7 && header_b_check() == 0) ? 0 : 1;
}
