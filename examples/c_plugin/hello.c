/* A complete kvhost plugin: an unbounded in-memory store, synchronous, single lock. */
#include "kvhost_plugin.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct item { struct item *next; kvh_chunk_meta meta; size_t key_len, len; char *key; unsigned char *data; } item;
struct kvh_backend { pthread_mutex_t lock; item *items; };

static item *find(kvh_backend *b, const kvh_key *k) {
    for (item *i = b->items; i; i = i->next)
        if (i->key_len == k->canonical.len && !memcmp(i->key, k->canonical.ptr, i->key_len)) return i;
    return NULL;
}
static kvh_status create(const kvh_host_api *h, const kvh_options *o, const kvh_model_metadata *m,
                         kvh_backend **out, kvh_message_buf err) {
    (void)h; (void)o; (void)m; (void)err;
    kvh_backend *b = calloc(1, sizeof *b);
    if (!b) return KVH_ERR_NO_SPACE;
    pthread_mutex_init(&b->lock, NULL);
    *out = b;
    return KVH_OK;
}
static void destroy(kvh_backend *b) {
    for (item *i = b->items, *n; i; i = n) { n = i->next; free(i->key); free(i->data); free(i); }
    free(b);
}
static kvh_status contains(kvh_backend *b, const kvh_contains_batch *r) {
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < r->len; i++) {
        item *it = find(b, &r->keys[i]);
        r->item_status[i] = it ? KVH_OK : KVH_ERR_NOT_FOUND;
        if (it) r->out_meta[i] = it->meta;
    }
    pthread_mutex_unlock(&b->lock);
    return KVH_OK;
}
static kvh_status put(kvh_backend *b, const kvh_put_batch *r, kvh_completion done) {
    (void)done; /* synchronous: never PENDING, so the completion never fires */
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < r->len; i++) {
        item *it = find(b, &r->keys[i]);
        if (!it && (it = calloc(1, sizeof *it))) {
            it->key = malloc(r->keys[i].canonical.len);
            memcpy(it->key, r->keys[i].canonical.ptr, it->key_len = r->keys[i].canonical.len);
            it->next = b->items; b->items = it;
        }
        unsigned char *copy = it ? malloc(r->src[i].len ? r->src[i].len : 1) : NULL;
        if (!copy) { r->item_status[i] = KVH_ERR_NO_SPACE; continue; }
        memcpy(copy, r->src[i].ptr, r->src[i].len);
        free(it->data); it->data = copy; it->len = r->src[i].len; it->meta = r->meta[i];
        r->item_status[i] = KVH_OK;
    }
    pthread_mutex_unlock(&b->lock);
    return KVH_OK;
}
static kvh_status get(kvh_backend *b, const kvh_get_batch *r, kvh_completion done) {
    (void)done;
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < r->len; i++) {
        item *it = find(b, &r->keys[i]);
        if (!it) { r->item_status[i] = KVH_ERR_NOT_FOUND; continue; }
        r->out_len[i] = it->len;
        if (it->len > r->dst[i].len) { r->item_status[i] = KVH_ERR_BUFFER_TOO_SMALL; continue; }
        memcpy(r->dst[i].ptr, it->data, it->len);
        r->out_meta[i] = it->meta;
        r->item_status[i] = KVH_OK;
    }
    pthread_mutex_unlock(&b->lock);
    return KVH_OK;
}
static kvh_status remove_keys(kvh_backend *b, const kvh_key_batch *r, bool force) {
    (void)force;
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < r->len; i++) {
        item **p = &b->items;
        while (*p && !((*p)->key_len == r->keys[i].canonical.len && !memcmp((*p)->key, r->keys[i].canonical.ptr, (*p)->key_len))) p = &(*p)->next;
        r->item_status[i] = *p ? KVH_OK : KVH_ERR_NOT_FOUND;
        if (*p) { item *dead = *p; *p = dead->next; free(dead->key); free(dead->data); free(dead); }
    }
    pthread_mutex_unlock(&b->lock);
    return KVH_OK;
}
static const kvh_backend_vtable VTABLE = {
    .struct_size = sizeof(kvh_backend_vtable),
    .create = create, .destroy = destroy, .contains = contains, .put = put, .get = get, .remove = remove_keys,
};
static const kvh_plugin_descriptor DESCRIPTOR = {
    .struct_size = sizeof(kvh_plugin_descriptor), .abi_major = KVH_ABI_MAJOR, .abi_minor = KVH_ABI_MINOR,
    .class_name = "hello", .plugin_version = "0.1.0", .vtable = &VTABLE,
};
KVH_DECLARE_PLUGIN(hello) { (void)host; return &DESCRIPTOR; }
