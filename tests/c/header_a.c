/* Compiled with header_b.c into one program: the headers must be includable from two translation units
 * and compile warning-free as C11 under -Wall -Wextra -Werror -pedantic. Both units include
 * kvhost_plugin_util.h with one shared last-error slot (defined here): an error set in header_b.c is
 * reported here. */
#include "kvhost_plugin.h"
#include "kvhost_plugin.h" /* include guard */
#define KVH_UTIL_SHARED_LAST_ERROR
#define KVH_UTIL_DEFINE_LAST_ERROR
#include "kvhost_plugin_util.h"
#include "kvhost_plugin_util.h" /* include guard */

int header_b_check(void);
void header_b_fail(const kvh_backend *backend);

int main(void) {
    kvh_backend_vtable vt = {0};
    vt.struct_size = (uint32_t)sizeof vt;
    kvh_status s = KVH_ERR_NOT_FOUND;
    const kvh_backend *backend = (const kvh_backend *)&vt;
    char text[64];
    header_b_fail(backend);
    size_t len = kvh_util_last_error(backend, text, sizeof text);
    int shared = len == strlen("set in header_b.c") && strcmp(text, "set in header_b.c") == 0;
    return (vt.struct_size >= KVH_VTABLE_V1_2_SIZE && s == -3 && 0 - KVH_ERR_IO == 7 && header_b_check() == 0 && shared &&
            strcmp(kvh_util_status_name(KVH_ERR_BUSY), "BUSY") == 0)
               ? 0
               : 1;
}
