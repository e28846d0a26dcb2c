/* initial() mode: the library's own writer thread stores batches into APISIX's zones with
 * lua-nginx-module's FFI shdict functions (resolved at run time). Per batch: safe stores
 * (no eviction) with every return code checked, deletes after the data, one version bump
 * only when something changed; a failed store rolls the batch back and is reported. An exit
 * fence (stop flag + in-flight counter) keeps writes away from a worker that is exiting. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "amesh.h"
#include "queue.h"
#include "state.h"

#define OP_SET 0
#define OP_SAFE 0x4
#define T_NIL 0
#define T_STRING 4
#define INDEX_BUCKETS 64 /* must match amesh_ext.sink.INDEX_BUCKETS */

typedef int (*store_fn)(void *zone, int op, const unsigned char *key, size_t key_len,
                        int value_type, const unsigned char *str, size_t str_len, double num,
                        long exptime_ms, int user_flags, char **errmsg, int *forcible);
typedef int (*get_fn)(void *zone, const unsigned char *key, size_t key_len, int *value_type,
                      unsigned char **buf, size_t *len, double *num, int *user_flags,
                      int get_stale, int *is_stale, char **errmsg);

static store_fn shd_store;
static get_fn shd_get;
static void *zone_cfg, *zone_ver;
static volatile sig_atomic_t *ngx_quit_p, *ngx_terminate_p, *ngx_exiting_p;
static atomic_int stopping, in_flight, running;
static atomic_ullong batches_applied, batches_failed, stores;
static char version_text[32];

int amesh_nginx_exiting(void) {
    static atomic_int resolved;
    if (!atomic_exchange(&resolved, 1)) {
        /* nginx exports these (modules link against it): set by its signal handlers. */
        ngx_quit_p = dlsym(RTLD_DEFAULT, "ngx_quit");
        ngx_terminate_p = dlsym(RTLD_DEFAULT, "ngx_terminate");
        ngx_exiting_p = dlsym(RTLD_DEFAULT, "ngx_exiting");
    }
    return (ngx_quit_p && *ngx_quit_p) || (ngx_terminate_p && *ngx_terminate_p) ||
           (ngx_exiting_p && *ngx_exiting_p);
}

static int nginx_exiting(void) { return atomic_load(&stopping) || amesh_nginx_exiting(); }

/* Every touch of the zones goes through enter/leave so the exit fence can wait for it. */
static int enter(void) {
    atomic_fetch_add(&in_flight, 1);
    if (nginx_exiting()) {
        atomic_fetch_sub(&in_flight, 1);
        return 0;
    }
    return 1;
}
static void leave(void) { atomic_fetch_sub(&in_flight, 1); }

/* A copy of the current string value (NULL if absent); *found tells absent from error. */
static char *get_copy(void *zone, const char *key, size_t key_len, size_t *out_len) {
    char small[256];
    unsigned char *buf = (unsigned char *)small;
    size_t len = sizeof(small);
    int type = T_NIL, flags = 0, stale = 0;
    double num = 0;
    char *err = NULL;
    int rc = shd_get(zone, (const unsigned char *)key, key_len, &type, &buf, &len, &num, &flags,
                     0, &stale, &err);
    char *copy = NULL;
    if (rc == 0 && type == T_STRING) {
        copy = malloc(len + 1);
        if (copy) {
            memcpy(copy, buf, len);
            copy[len] = '\0';
            *out_len = len;
        }
    }
    if (buf != (unsigned char *)small) free(buf); /* the module malloc()s large values */
    return copy;
}

static int store(void *zone, const char *key, size_t key_len, const char *val, size_t val_len,
                 const char **why) {
    char *err = NULL;
    int forcible = 0;
    int rc = shd_store(zone, val ? OP_SAFE : OP_SET, (const unsigned char *)key, key_len,
                       val ? T_STRING : T_NIL, (const unsigned char *)val, val_len, 0, 0, 0,
                       &err, &forcible);
    atomic_fetch_add(&stores, 1);
    if (rc != 0 || forcible) {
        *why = err ? err : (forcible ? "forcible store evicted keys" : "store failed");
        return -1;
    }
    return 0;
}

typedef struct {
    char *key;
    size_t key_len;
    char *old; /* previous value, NULL if the key was absent */
    size_t old_len;
} undo_t;

typedef struct {
    uint64_t id;
    uint32_t flags;
    int failed, changed;
    undo_t *undo;
    size_t n_undo, cap_undo;
    char **set_keys; /* FULL batches: keys this batch holds */
    size_t n_set, cap_set;
    char *old_index; /* FULL batches: keys the previous index listed */
    size_t old_len;
} batch_t;

static void batch_reset(batch_t *b) {
    for (size_t i = 0; i < b->n_undo; i++) {
        free(b->undo[i].key);
        free(b->undo[i].old);
    }
    for (size_t i = 0; i < b->n_set; i++) free(b->set_keys[i]);
    free(b->old_index);
    b->old_index = NULL;
    b->n_undo = b->n_set = b->old_len = 0;
    b->failed = b->changed = 0;
}

static int grow(void **arr, size_t *cap, size_t n, size_t size) {
    if (n < *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 64;
    void *p = realloc(*arr, nc * size);
    if (p == NULL) return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

static void rollback(batch_t *b) {
    const char *why;
    for (size_t i = b->n_undo; i-- > 0;) {
        undo_t *u = &b->undo[i];
        if (enter()) {
            store(zone_cfg, u->key, u->key_len, u->old, u->old_len, &why);
            leave();
        }
    }
}

/* Apply one SET (value) or DELETE (value NULL), remembering the old value for rollback. */
static void apply_change(batch_t *b, const amesh_change_t *c) {
    if (b->failed) return;
    if ((b->flags & AMESH_BATCH_FULL) && c->value) {
        if (grow((void **)&b->set_keys, &b->cap_set, b->n_set, sizeof(char *)) == 0)
            b->set_keys[b->n_set++] = strndup(c->key, c->key_len);
    }
    if (!enter()) {
        b->failed = 1;
        return;
    }
    size_t old_len = 0;
    char *old = get_copy(zone_cfg, c->key, c->key_len, &old_len);
    if ((old == NULL && c->value == NULL) ||
        (old && c->value && old_len == c->value_len && memcmp(old, c->value, old_len) == 0)) {
        free(old); /* unchanged: no store, no version bump */
        leave();
        return;
    }
    const char *why = NULL;
    int rc = store(zone_cfg, c->key, c->key_len, c->value, c->value_len, &why);
    leave();
    if (rc != 0 || grow((void **)&b->undo, &b->cap_undo, b->n_undo, sizeof(undo_t)) != 0) {
        free(old);
        b->failed = 1;
        amesh_log_error("store of %.*s failed: %s; batch %llu rolled back, version kept",
                        (int)c->key_len, c->key, why ? why : "no memory",
                        (unsigned long long)b->id);
        rollback(b);
        amesh_reports_put(b->id, -1, why ? why : "no memory");
        return;
    }
    b->undo[b->n_undo++] = (undo_t){strndup(c->key, c->key_len), c->key_len, old, old_len};
    b->changed = 1;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* FULL batch, at BEGIN: the keys an earlier run listed in its index (before this batch
 * rewrites the index), as one buffer of NUL-separated keys. */
static void read_old_index(batch_t *b) {
    for (int i = 0; i < INDEX_BUCKETS; i++) {
        char ikey[32];
        size_t len = 0;
        int n = snprintf(ikey, sizeof(ikey), "amesh:index:%02d", i);
        if (!enter()) return;
        char *list = get_copy(zone_cfg, ikey, (size_t)n, &len);
        leave();
        if (list == NULL) continue;
        char *grown = realloc(b->old_index, b->old_len + len + 1);
        if (grown) {
            b->old_index = grown;
            memcpy(b->old_index + b->old_len, list, len);
            b->old_len += len;
            b->old_index[b->old_len++] = '\n';
        }
        free(list);
    }
}

/* FULL batch, at COMMIT: delete the old keys this batch does not hold. */
static void delete_stale(batch_t *b) {
    qsort(b->set_keys, b->n_set, sizeof(char *), cmp_str);
    char *end = b->old_index + b->old_len;
    for (char *line = b->old_index; line && line < end && !b->failed;) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        if (nl == NULL) break;
        *nl = '\0';
        if (*line && !bsearch(&line, b->set_keys, b->n_set, sizeof(char *), cmp_str)) {
            amesh_change_t del = {AMESH_OP_DELETE, 0, b->id, line, strlen(line), NULL, 0};
            apply_change(b, &del);
        }
        line = nl + 1;
    }
}

static void bump_version(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    unsigned long long now = (unsigned long long)tv.tv_sec * 1000ULL + tv.tv_usec / 1000;
    unsigned long long prev = strtoull(version_text, NULL, 10);
    if (now <= prev) now = prev + 1; /* always a different value */
    snprintf(version_text, sizeof(version_text), "%llu", now);
    const char *why;
    if (enter()) {
        if (store(zone_ver, "version", 7, version_text, strlen(version_text), &why) != 0)
            amesh_log_error("cannot store version: %s", why);
        leave();
    }
}

static void commit(batch_t *b) {
    if (b->failed) {
        atomic_fetch_add(&batches_failed, 1);
        return; /* already rolled back and reported */
    }
    if (b->flags & AMESH_BATCH_FULL) delete_stale(b);
    if (b->failed) {
        atomic_fetch_add(&batches_failed, 1);
        return;
    }
    if (b->changed) bump_version();
    atomic_fetch_add(&batches_applied, 1);
    amesh_reports_put(b->id, 0, b->changed ? "applied" : "unchanged");
}

static void *writer_main(void *arg) {
    (void)arg;
    batch_t b = {0};
    while (!nginx_exiting()) {
        amesh_msg_t *list;
        int n = amesh_queue_take_wait(&list, 256, 200);
        if (n == AMESH_ESTOPPED) break;
        for (amesh_msg_t *m = list; m; m = m->next) {
            const amesh_change_t *c = &m->change;
            if (c->op == AMESH_OP_BEGIN) {
                batch_reset(&b);
                b.id = c->batch;
                b.flags = c->flags;
                if (b.flags & AMESH_BATCH_FULL) read_old_index(&b);
            } else if (c->op == AMESH_OP_COMMIT) {
                commit(&b);
            } else {
                apply_change(&b, c);
            }
        }
        amesh_msg_free_list(list);
    }
    atomic_store(&running, 0);
    return NULL;
}

static void fence_at_exit(void) { amesh_writer_fence(200); }

int amesh_writer_start(void *config_zone, void *version_zone) {
    if (atomic_load(&running)) {
        amesh_log_error("initial(): the writer already runs in this process");
        return AMESH_EALREADY;
    }
    shd_store = (store_fn)dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_store");
    if (!shd_store) shd_store = (store_fn)dlsym(RTLD_DEFAULT, "ngx_meta_lua_ffi_shdict_store");
    shd_get = (get_fn)dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_get");
    if (!shd_get) shd_get = (get_fn)dlsym(RTLD_DEFAULT, "ngx_meta_lua_ffi_shdict_get");
    if (!shd_store || !shd_get) {
        amesh_log_error("initial(): lua-nginx-module's shdict FFI functions are not loaded");
        return AMESH_ERUNTIME;
    }
    zone_cfg = config_zone;
    zone_ver = version_zone;

    /* Workers wait in init_worker until a version exists: write one at once if absent
     * (never over an existing one: a reload keeps serving the last config). */
    size_t len = 0;
    char *cur = get_copy(zone_ver, "version", 7, &len);
    const char *why;
    if (cur) snprintf(version_text, sizeof(version_text), "%s", cur);
    else bump_version();
    free(cur);
    if (store(zone_cfg, "amesh:sentinel", 14, "1", 1, &why) != 0)
        amesh_log_error("cannot store the sentinel key: %s", why);

    if (amesh_spawn_detached(writer_main) != 0) {
        amesh_log_error("initial(): cannot start the writer thread");
        return AMESH_ERUNTIME;
    }
    atomic_store(&running, 1);
    atexit(fence_at_exit);
    return AMESH_OK;
}

int amesh_writer_fence(int timeout_ms) {
    atomic_store(&stopping, 1);
    struct timespec tick = {0, 1000000};
    for (int waited = 0; atomic_load(&in_flight) > 0; waited++) {
        if (waited >= timeout_ms) return AMESH_EBUSY;
        nanosleep(&tick, NULL);
    }
    return AMESH_OK;
}

void amesh_writer_status(char *buf, size_t len) {
    snprintf(buf, len,
             "{\"running\":%s,\"batches_applied\":%llu,\"batches_failed\":%llu,\"stores\":%llu,"
             "\"version\":\"%s\"}",
             atomic_load(&running) ? "true" : "false",
             (unsigned long long)atomic_load(&batches_applied),
             (unsigned long long)atomic_load(&batches_failed),
             (unsigned long long)atomic_load(&stores), version_text);
}
