/* initial() mode: the library's own writer thread stores batches into APISIX's zones with
 * lua-nginx-module's FFI shdict functions (resolved at run time), following the dict
 * protocol (docs/dict-protocol.md): safe stores (no eviction) with every return code
 * checked, an undo entry per changed key, deletes after the data, one version bump per
 * batch that changed something; a failed store or read rolls the batch back and reports it.
 * FULL batches reconcile through the key index: each index SET is stored as the union of
 * the old and new lists, the keys only the old index names are deleted at COMMIT, then the
 * new lists replace the unions. An exit fence (stop flag + in-flight counter, run from a
 * cleanup of nginx's cycle pool) keeps writes away from a worker that is exiting. */
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
#include <unistd.h>

#include "amesh.h"
#include "queue.h"
#include "state.h"

#define OP_SET 0
#define OP_SAFE 0x4
#define T_NIL 0
#define T_STRING 4
#define STATUS_EVERY_US 250000 /* how often the writer publishes amesh_status() */
#define FENCE_WAIT_MS 200      /* the exit fence's bound on writes in flight */

typedef int (*store_fn)(void *zone, int op, const unsigned char *key, size_t key_len,
                        int value_type, const unsigned char *str, size_t str_len, double num,
                        long exptime_ms, int user_flags, char **errmsg, int *forcible);
typedef int (*get_fn)(void *zone, const unsigned char *key, size_t key_len, int *value_type,
                      unsigned char **buf, size_t *len, double *num, int *user_flags,
                      int get_stale, int *is_stale, char **errmsg);
typedef size_t (*capacity_fn)(void *zone);

static store_fn shd_store;
static get_fn shd_get;
static void *zone_cfg, *zone_ver;
/* nginx's flags, with nginx's types: ngx_quit/ngx_terminate are sig_atomic_t, ngx_exiting
 * an ngx_uint_t (pointer-sized). */
static volatile sig_atomic_t *ngx_quit_p, *ngx_terminate_p;
static volatile uintptr_t *ngx_exiting_p;
static atomic_int stopping, in_flight, running;
static atomic_ullong batches_applied, batches_failed, stores;
static atomic_ullong open_batch; /* the batch between BEGIN and COMMIT, 0 if none */
static const char *fence_kind = "none";
static pthread_mutex_t version_lock = PTHREAD_MUTEX_INITIALIZER; /* version_text vs status */
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

/* Every touch of the zones goes through enter/leave so the exit fence can wait for it
 * (the fence sets `stopping` then reads `in_flight`; enter does the reverse). */
static int enter(void) {
    atomic_fetch_add(&in_flight, 1);
    if (nginx_exiting()) {
        atomic_fetch_sub(&in_flight, 1);
        return 0;
    }
    return 1;
}
static void leave(void) { atomic_fetch_sub(&in_flight, 1); }

/* The value of key as a malloc'd NUL-terminated copy: 1 found, 0 absent, -1 error (*why).
 * An error is never "absent": taking it so would lose an undo entry or an index list. */
static int get_value(void *zone, const char *key, size_t key_len, char **out, size_t *out_len,
                     const char **why) {
    char small[256];
    unsigned char *buf = (unsigned char *)small;
    size_t len = sizeof(small);
    int type = T_NIL, flags = 0, stale = 0;
    double num = 0;
    char *err = NULL;
    *out = NULL;
    *out_len = 0;
    int rc = shd_get(zone, (const unsigned char *)key, key_len, &type, &buf, &len, &num, &flags,
                     0, &stale, &err);
    if (rc != 0) {
        *why = err ? err : "shdict get failed (no memory)";
        return -1;
    }
    if (type == T_NIL) return 0;
    if (type != T_STRING) {
        *why = "not a string value";
        return -1;
    }
    char *copy;
    if (buf != (unsigned char *)small) { /* the module malloc()ed a buffer for a large value */
        copy = realloc(buf, len + 1);
        if (copy == NULL) free(buf);
    } else {
        copy = malloc(len + 1);
        if (copy) memcpy(copy, small, len);
    }
    if (copy == NULL) {
        *why = "no memory";
        return -1;
    }
    copy[len] = '\0';
    *out = copy;
    *out_len = len;
    return 1;
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

/* -- small growable arrays -------------------------------------------------------------- */

static int grow(void **arr, size_t *cap, size_t n, size_t size) {
    if (n < *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 64;
    void *p = realloc(*arr, nc * size);
    if (p == NULL) return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

typedef struct {
    char **v;
    size_t n, cap;
} strvec_t;

static int strvec_push(strvec_t *s, char *str) {
    if (grow((void **)&s->v, &s->cap, s->n, sizeof(char *)) != 0) return -1;
    s->v[s->n++] = str;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int strvec_has(const strvec_t *s, const char *str) {
    return s->n && bsearch(&str, s->v, s->n, sizeof(char *), cmp_str) != NULL;
}

/* The non-empty lines of text (len bytes) as a sorted vector pointing into *copy, a
 * scratch copy the caller frees with the vector. -1 on out of memory. */
static int split_lines(const char *text, size_t len, char **copy, strvec_t *lines) {
    *copy = malloc(len + 1);
    if (*copy == NULL) return -1;
    memcpy(*copy, text, len);
    (*copy)[len] = '\0';
    for (char *line = *copy, *nl; line; line = nl ? nl + 1 : NULL) {
        nl = strchr(line, '\n');
        if (nl) *nl = '\0';
        if (*line && strvec_push(lines, line) != 0) return -1;
    }
    if (lines->n) qsort(lines->v, lines->n, sizeof(char *), cmp_str);
    return 0;
}

static void free_lines(char *copy, strvec_t *lines) {
    free(copy);
    free(lines->v);
    *lines = (strvec_t){0};
}

/* -- batches ---------------------------------------------------------------------------- */

typedef struct {
    char *key;
    size_t key_len;
    char *old; /* previous value, NULL if the key was absent */
    size_t old_len;
} undo_t;

typedef struct {
    char *old; /* FULL: the bucket's lines when the batch began (NULL: none) */
    size_t old_len;
    char *fresh; /* FULL: the bucket's lines as the batch sets them (NULL: not set) */
    size_t fresh_len;
} bucket_t;

typedef struct {
    uint64_t id;
    uint32_t flags;
    int failed, changed;
    undo_t *undo;
    size_t n_undo, cap_undo;
    strvec_t set_keys; /* FULL: the data keys this batch sets, sorted at COMMIT */
    bucket_t buckets[AMESH_INDEX_BUCKETS];
} batch_t;

static void batch_reset(batch_t *b) {
    for (size_t i = 0; i < b->n_undo; i++) {
        free(b->undo[i].key);
        free(b->undo[i].old);
    }
    for (size_t i = 0; i < b->set_keys.n; i++) free(b->set_keys.v[i]);
    b->set_keys.n = 0;
    for (int i = 0; i < AMESH_INDEX_BUCKETS; i++) {
        free(b->buckets[i].old);
        free(b->buckets[i].fresh);
        b->buckets[i] = (bucket_t){0};
    }
    b->n_undo = 0;
    b->failed = b->changed = 0;
}

static int is_full(const batch_t *b) { return (b->flags & AMESH_BATCH_FULL) != 0; }

static void rollback(batch_t *b) {
    const char *why;
    for (size_t i = b->n_undo; i-- > 0;) {
        undo_t *u = &b->undo[i];
        if (!enter()) return; /* exiting: the next agent's FULL batch converges the prefix */
        if (store(zone_cfg, u->key, u->key_len, u->old, u->old_len, &why) != 0)
            amesh_log_error("rollback of %.*s in batch %llu failed: %s", (int)u->key_len,
                            u->key, (unsigned long long)b->id, why);
        leave();
    }
}

/* Refuse the batch: undo what it changed, keep the version, report why (naming the key). */
static int fail(batch_t *b, const char *what, const char *key, size_t key_len, const char *why) {
    char msg[512];
    snprintf(msg, sizeof(msg), "%s of %.*s failed: %s", what, (int)key_len, key, why);
    b->failed = 1;
    amesh_log_error("%s; batch %llu rolled back, version kept", msg, (unsigned long long)b->id);
    rollback(b);
    atomic_fetch_add(&batches_failed, 1);
    amesh_reports_put(b->id, -1, msg);
    return -1;
}

/* Store val (NULL: delete) under key unless it already holds it, with an undo entry.
 * 0 done, -1 the batch failed (or the fence closed: then nothing is reported, the worker
 * is exiting and the next agent's FULL batch converges what is left). */
static int change(batch_t *b, const char *key, size_t key_len, const char *val, size_t val_len) {
    if (b->failed) return -1;
    if (!enter()) {
        b->failed = 1;
        return -1;
    }
    char *old;
    size_t old_len;
    const char *why = "no memory";
    int found = get_value(zone_cfg, key, key_len, &old, &old_len, &why);
    if (found < 0) {
        leave();
        return fail(b, "read", key, key_len, why);
    }
    if ((!found && val == NULL) ||
        (found && val && old_len == val_len && memcmp(old, val, old_len) == 0)) {
        free(old); /* unchanged: no store, no version bump */
        leave();
        return 0;
    }
    /* The undo entry goes in before the store, and stays when the store fails: a safe
     * store that cannot allocate a value of another size has already freed the old one. */
    char *key_copy = strndup(key, key_len);
    if (key_copy == NULL || grow((void **)&b->undo, &b->cap_undo, b->n_undo, sizeof(undo_t))) {
        leave();
        free(key_copy);
        free(old);
        return fail(b, "store", key, key_len, "no memory");
    }
    b->undo[b->n_undo++] = (undo_t){key_copy, key_len, found ? old : NULL, old_len};
    int rc = store(zone_cfg, key, key_len, val, val_len, &why);
    leave();
    if (rc != 0) return fail(b, "store", key, key_len, why);
    b->changed = 1;
    return 0;
}

/* The bucket number of an index key ("amesh:index:NN"), or -1 for any other key. */
static int index_bucket(const char *key, size_t key_len) {
    size_t plen = sizeof(AMESH_KEY_INDEX_PREFIX) - 1;
    if (key_len != plen + 2 || memcmp(key, AMESH_KEY_INDEX_PREFIX, plen) != 0) return -1;
    char hi = key[plen], lo = key[plen + 1];
    if (hi < '0' || hi > '9' || lo < '0' || lo > '9') return -1;
    int n = (hi - '0') * 10 + (lo - '0');
    return n < AMESH_INDEX_BUCKETS ? n : -1;
}

static int index_key(int bucket, char *out, size_t len) {
    return snprintf(out, len, "%s%02d", AMESH_KEY_INDEX_PREFIX, bucket);
}

/* FULL, at BEGIN: every bucket's old lines, before this batch rewrites the index. */
static void read_old_index(batch_t *b) {
    for (int i = 0; i < AMESH_INDEX_BUCKETS && !b->failed; i++) {
        char ikey[32];
        int n = index_key(i, ikey, sizeof(ikey));
        const char *why = "no memory";
        if (!enter()) {
            b->failed = 1;
            return;
        }
        bucket_t *bk = &b->buckets[i];
        int found = get_value(zone_cfg, ikey, (size_t)n, &bk->old, &bk->old_len, &why);
        leave();
        if (found < 0) fail(b, "read", ikey, (size_t)n, why);
    }
}

/* fresh's lines, then the old lines it lacks: the index lists old and new keys while both
 * may exist. NULL on out of memory. */
static char *union_lines(const bucket_t *bk, size_t *out_len) {
    char *copy = NULL, *old_copy = NULL;
    strvec_t fresh = {0}, old = {0};
    char *out = malloc(bk->fresh_len + bk->old_len + 2);
    if (out == NULL || split_lines(bk->fresh, bk->fresh_len, &copy, &fresh) != 0 ||
        split_lines(bk->old, bk->old_len, &old_copy, &old) != 0) {
        free(out);
        out = NULL;
    } else {
        size_t n = bk->fresh_len;
        memcpy(out, bk->fresh, n);
        for (size_t i = 0; i < old.n; i++) {
            if (strvec_has(&fresh, old.v[i])) continue;
            if (n) out[n++] = '\n';
            size_t l = strlen(old.v[i]);
            memcpy(out + n, old.v[i], l);
            n += l;
        }
        *out_len = n;
    }
    free_lines(copy, &fresh);
    free_lines(old_copy, &old);
    return out;
}

/* FULL: an index SET is remembered as the bucket's new list and stored as old ∪ new. */
static void set_index_bucket(batch_t *b, const amesh_change_t *c, int bucket) {
    bucket_t *bk = &b->buckets[bucket];
    free(bk->fresh);
    bk->fresh = malloc(c->value_len + 1);
    if (bk->fresh == NULL) {
        fail(b, "store", c->key, c->key_len, "no memory");
        return;
    }
    memcpy(bk->fresh, c->value, c->value_len);
    bk->fresh[c->value_len] = '\0';
    bk->fresh_len = c->value_len;
    if (bk->old == NULL) {
        change(b, c->key, c->key_len, c->value, c->value_len);
        return;
    }
    size_t len = 0;
    char *both = union_lines(bk, &len);
    if (both == NULL) {
        fail(b, "store", c->key, c->key_len, "no memory");
        return;
    }
    change(b, c->key, c->key_len, both, len);
    free(both);
}

static void apply(batch_t *b, const amesh_change_t *c) {
    if (b->failed) return;
    if (is_full(b) && c->value) {
        int bucket = index_bucket(c->key, c->key_len);
        if (bucket >= 0) {
            set_index_bucket(b, c, bucket);
            return;
        }
        if (c->key_len && c->key[0] == '/') {
            char *key = strndup(c->key, c->key_len);
            if (key == NULL || strvec_push(&b->set_keys, key) != 0) {
                free(key);
                fail(b, "store", c->key, c->key_len, "no memory");
                return;
            }
        }
    }
    change(b, c->key, c->key_len, c->value, c->value_len);
}

/* FULL, at COMMIT: delete the data keys only the old index lists. */
static void delete_stale(batch_t *b) {
    if (b->set_keys.n) qsort(b->set_keys.v, b->set_keys.n, sizeof(char *), cmp_str);
    for (int i = 0; i < AMESH_INDEX_BUCKETS && !b->failed; i++) {
        bucket_t *bk = &b->buckets[i];
        if (bk->old == NULL) continue;
        char *copy = NULL;
        strvec_t old = {0};
        if (split_lines(bk->old, bk->old_len, &copy, &old) != 0) {
            char ikey[32];
            size_t klen = (size_t)index_key(i, ikey, sizeof(ikey));
            fail(b, "read", ikey, klen, "no memory");
        }
        for (size_t k = 0; k < old.n && !b->failed; k++) {
            if (old.v[k][0] == '/' && !strvec_has(&b->set_keys, old.v[k]))
                change(b, old.v[k], strlen(old.v[k]), NULL, 0);
        }
        free_lines(copy, &old);
    }
}

/* FULL, at COMMIT after delete_stale: each bucket's final list. A bucket the batch did not
 * set keeps only the lines that still name a key (outside "/", or set by the batch). */
static void store_final_index(batch_t *b) {
    for (int i = 0; i < AMESH_INDEX_BUCKETS && !b->failed; i++) {
        bucket_t *bk = &b->buckets[i];
        char ikey[32];
        size_t klen = (size_t)index_key(i, ikey, sizeof(ikey));
        if (bk->fresh) {
            change(b, ikey, klen, bk->fresh, bk->fresh_len);
            continue;
        }
        if (bk->old == NULL) continue;
        char *copy = NULL, *kept = malloc(bk->old_len + 1);
        strvec_t old = {0};
        if (kept == NULL || split_lines(bk->old, bk->old_len, &copy, &old) != 0) {
            fail(b, "store", ikey, klen, "no memory");
        } else {
            size_t n = 0;
            for (size_t k = 0; k < old.n; k++) {
                if (old.v[k][0] == '/' && !strvec_has(&b->set_keys, old.v[k])) continue;
                size_t l = strlen(old.v[k]);
                if (n) kept[n++] = '\n';
                memcpy(kept + n, old.v[k], l);
                n += l;
            }
            change(b, ikey, klen, n ? kept : NULL, n);
        }
        free(kept);
        free_lines(copy, &old);
    }
}

/* A new 13-digit millisecond version, always different from the last one. Only the writer
 * thread (and prepare, before it runs) changes version_text; the lock is for status. */
static int bump_version(const char **why) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    unsigned long long now = (unsigned long long)tv.tv_sec * 1000ULL + tv.tv_usec / 1000;
    unsigned long long prev = strtoull(version_text, NULL, 10);
    if (now <= prev) now = prev + 1;
    char next[sizeof(version_text)];
    int n = snprintf(next, sizeof(next), "%llu", now);
    *why = "writer is stopping";
    if (!enter()) return -1;
    int rc = store(zone_ver, AMESH_KEY_VERSION, sizeof(AMESH_KEY_VERSION) - 1, next, (size_t)n,
                   why);
    leave();
    if (rc == 0) {
        pthread_mutex_lock(&version_lock);
        memcpy(version_text, next, sizeof(next));
        pthread_mutex_unlock(&version_lock);
    }
    return rc;
}

static void commit(batch_t *b) {
    if (!b->failed && is_full(b)) {
        delete_stale(b);
        store_final_index(b);
    }
    if (b->failed) return; /* rolled back and reported, or fenced */
    const char *why;
    if (b->changed && bump_version(&why) != 0) {
        if (!nginx_exiting())
            fail(b, "store", AMESH_KEY_VERSION, sizeof(AMESH_KEY_VERSION) - 1, why);
        return;
    }
    atomic_fetch_add(&batches_applied, 1);
    amesh_reports_put(b->id, 0, b->changed ? "applied" : "unchanged");
}

/* The library's status in the version dict (AMESH_KEY_STATUS) in the Lua consumer's shape,
 * {"library": amesh_status()}, so require("amesh").status() reads the same fields in both
 * modes; a safe store (it can never evict "version"), only when it changed. */
static void publish_status(char **last, size_t *last_len) {
    static const char head[] = "{\"library\":";
    const size_t skip = sizeof(head) - 1;
    char *json = NULL;
    size_t len = 0, cap = 0;
    do { /* the agent may publish a longer status between the two calls: size again */
        free(json);
        cap = amesh_status(NULL, 0) + 64;
        json = malloc(skip + cap + 2);
        if (json == NULL) return;
        len = amesh_status(json + skip, cap);
    } while (len >= cap);
    memcpy(json, head, skip);
    len += skip;
    json[len++] = '}';
    json[len] = '\0';
    if (*last && *last_len == len && memcmp(*last, json, len) == 0) {
        free(json);
        return;
    }
    const char *why;
    int rc = -1;
    if (enter()) {
        rc = store(zone_ver, AMESH_KEY_STATUS, sizeof(AMESH_KEY_STATUS) - 1, json, len, &why);
        leave();
    }
    if (rc != 0) { /* not stored: try again next time */
        free(json);
        return;
    }
    free(*last);
    *last = json;
    *last_len = len;
}

static void *writer_main(void *arg) {
    (void)arg;
    static batch_t b;
    char *published = NULL;
    size_t published_len = 0;
    uint64_t next_status = 0;
    while (!nginx_exiting()) {
        amesh_msg_t *list;
        int n = amesh_queue_take_wait(&list, 256, 100);
        if (n == AMESH_ESTOPPED) break;
        for (amesh_msg_t *m = list; m; m = m->next) {
            const amesh_change_t *c = &m->change;
            if (c->op == AMESH_OP_BEGIN) {
                batch_reset(&b);
                b.id = c->batch;
                b.flags = c->flags;
                atomic_store(&open_batch, b.id);
                if (is_full(&b)) read_old_index(&b);
            } else if (c->op == AMESH_OP_COMMIT) {
                commit(&b);
                atomic_store(&open_batch, 0);
                batch_reset(&b); /* free the undo copies at once */
            } else {
                apply(&b, c);
            }
        }
        amesh_msg_free_list(list);
        uint64_t now = amesh_clock_us();
        if (now >= next_status) {
            next_status = now + STATUS_EVERY_US;
            publish_status(&published, &published_len);
        }
    }
    atomic_store(&running, 0);
    return NULL;
}

/* -- start and the exit fence ----------------------------------------------------------- */

static void *resolve(const char *http_name, const char *meta_name) {
    void *f = dlsym(RTLD_DEFAULT, http_name);
    return f ? f : dlsym(RTLD_DEFAULT, meta_name); /* apisix-runtime's meta module */
}

int amesh_writer_prepare(void *config_zone, void *version_zone) {
    if (atomic_load(&running)) {
        amesh_log_error("initial(): the writer already runs in this process");
        return AMESH_EALREADY;
    }
    shd_store = (store_fn)resolve("ngx_http_lua_ffi_shdict_store", "ngx_meta_lua_ffi_shdict_store");
    shd_get = (get_fn)resolve("ngx_http_lua_ffi_shdict_get", "ngx_meta_lua_ffi_shdict_get");
    capacity_fn capacity = (capacity_fn)resolve("ngx_http_lua_ffi_shdict_capacity",
                                                "ngx_meta_lua_ffi_shdict_capacity");
    if (!shd_store || !shd_get) {
        amesh_log_error("initial(): lua-nginx-module's shdict FFI functions are not loaded");
        return AMESH_ERUNTIME;
    }
    zone_cfg = config_zone;
    zone_ver = version_zone;
    if (capacity) amesh_dict_capacity(capacity(config_zone)); /* before the agent starts */

    /* Workers wait in init_worker until a version exists: write one at once if absent
     * (never over an existing one: a reload keeps serving the last config). */
    char *cur;
    size_t len;
    const char *why = "";
    int found = get_value(zone_ver, AMESH_KEY_VERSION, sizeof(AMESH_KEY_VERSION) - 1, &cur,
                          &len, &why);
    if (found > 0) {
        pthread_mutex_lock(&version_lock);
        snprintf(version_text, sizeof(version_text), "%s", cur);
        pthread_mutex_unlock(&version_lock);
    } else if (found == 0 && bump_version(&why) != 0) {
        amesh_log_error("initial(): cannot store the version: %s", why);
    } else if (found < 0) {
        amesh_log_error("initial(): cannot read the version (kept as is): %s", why);
    }
    free(cur);
    if (store(zone_cfg, AMESH_KEY_SENTINEL, sizeof(AMESH_KEY_SENTINEL) - 1, "1", 1, &why) != 0)
        amesh_log_error("initial(): cannot store the sentinel key: %s", why);
    return AMESH_OK;
}

/* nginx's ngx_pool_cleanup_t: { handler, data, next }. */
typedef struct pool_cleanup_s {
    void (*handler)(void *data);
    void *data;
    struct pool_cleanup_s *next;
} pool_cleanup_t;
typedef pool_cleanup_t *(*cleanup_add_fn)(void *pool, size_t size);

static void fence_cleanup(void *data) {
    (void)data;
    if (amesh_writer_fence(FENCE_WAIT_MS) != AMESH_OK)
        amesh_log_error("exit fence: writes still in flight after %d ms", FENCE_WAIT_MS);
    else /* one line per exiting writer: operators (and tests) see the fence closed */
        fprintf(stderr, "amesh: exit fence closed in process %d: no more writes (open batch "
                "%llu)\n", (int)getpid(), (unsigned long long)atomic_load(&open_batch));
}

/* The fence runs from a cleanup of the worker's cycle pool: ngx_worker_process_exit()
 * destroys that pool, which holds the shm zones, and runs its cleanups first; atexit()
 * would run after the zones are gone. Layout assumption: ngx_cycle (exported as
 * `volatile ngx_cycle_t *ngx_cycle`) starts { void ****conf_ctx; ngx_pool_t *pool; ... },
 * unchanged since nginx 0.x, so the pool is the cycle's second pointer. */
static void register_fence(void) {
    void *volatile *cycle_var = dlsym(RTLD_DEFAULT, "ngx_cycle");
    cleanup_add_fn add = (cleanup_add_fn)dlsym(RTLD_DEFAULT, "ngx_pool_cleanup_add");
    void **cycle = cycle_var ? (void **)*cycle_var : NULL;
    pool_cleanup_t *cln = (add && cycle && cycle[1]) ? add(cycle[1], 0) : NULL;
    if (cln) {
        cln->handler = fence_cleanup;
        cln->data = NULL;
        fence_kind = "pool cleanup";
    } else {
        fence_kind = "flags only (ngx_cycle or ngx_pool_cleanup_add not found)";
        amesh_log_error("initial(): no nginx pool cleanup; the writer stops on nginx's exit "
                        "flags only");
    }
}

int amesh_writer_run(void) {
    atomic_store(&running, 1);
    if (amesh_spawn_detached(writer_main) != 0) {
        atomic_store(&running, 0);
        amesh_log_error("initial(): cannot start the writer thread");
        return AMESH_ERUNTIME;
    }
    register_fence();
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
    pthread_mutex_lock(&version_lock);
    snprintf(buf, len,
             "{\"running\":%s,\"batches_applied\":%llu,\"batches_failed\":%llu,\"stores\":%llu,"
             "\"version\":\"%s\",\"dict_capacity\":%zu,\"fence\":\"%s\",\"stopping\":%s,"
             "\"pid\":%d}",
             atomic_load(&running) ? "true" : "false",
             (unsigned long long)atomic_load(&batches_applied),
             (unsigned long long)atomic_load(&batches_failed),
             (unsigned long long)atomic_load(&stores), version_text, amesh_dict_capacity_get(),
             fence_kind, atomic_load(&stopping) ? "true" : "false", (int)getpid());
    pthread_mutex_unlock(&version_lock);
}
