/* The smallest correct kvhost plugin: it accepts every chunk, keeps none, and says so. */
#include "kvhost_plugin.h"
#include <stdlib.h>

struct kvh_backend { const kvh_host_api *host; };

static kvh_status create(const kvh_host_api *host, const kvh_options *opts, const kvh_model_metadata *md,
                         kvh_backend **out, kvh_message_buf err) {
    (void)opts; (void)md; (void)err;
    if (!(*out = calloc(1, sizeof **out))) return KVH_ERR_NO_SPACE;
    (*out)->host = host; /* valid until process exit: keep it for logging */
    return KVH_OK;
}
static void destroy(kvh_backend *b) { free(b); }
static kvh_status each(kvh_status *item_status, size_t n, kvh_status s) {
    for (size_t i = 0; i < n; i++) item_status[i] = s; /* every item gets a result */
    return KVH_OK;
}
static kvh_status contains(kvh_backend *b, const kvh_contains_batch *r) { (void)b; return each(r->item_status, r->len, KVH_ERR_NOT_FOUND); }
static kvh_status get(kvh_backend *b, const kvh_get_batch *r, kvh_completion d) { (void)b; (void)d; return each(r->item_status, r->len, KVH_ERR_NOT_FOUND); }
static kvh_status remove_keys(kvh_backend *b, const kvh_key_batch *r, bool f) { (void)b; (void)f; return each(r->item_status, r->len, KVH_ERR_NOT_FOUND); }
static kvh_status put(kvh_backend *b, const kvh_put_batch *r, kvh_completion d) {
    (void)d; /* returns OK, not PENDING: the completion never fires */
    if (b->host->log) b->host->log(b->host->host_ctx, KVH_LOG_DEBUG, KVH_STR_LIT("tiny"), KVH_STR_LIT("put"));
    return each(r->item_status, r->len, KVH_OK);
}
static const kvh_backend_vtable VTABLE = { .struct_size = sizeof(kvh_backend_vtable), .create = create,
    .destroy = destroy, .contains = contains, .put = put, .get = get, .remove = remove_keys };
static const kvh_plugin_descriptor DESC = { .struct_size = sizeof DESC, .abi_major = KVH_ABI_MAJOR,
    .abi_minor = KVH_ABI_MINOR, .class_name = "tiny", .plugin_version = "1.0.0",
    .capabilities = KVH_CAP_DISCARDS, .vtable = &VTABLE };
KVH_DECLARE_PLUGIN(tiny) { (void)host; return &DESC; }
