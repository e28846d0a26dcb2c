/* The C ABI (include/amesh.h): thin functions over the queue, the embedded agent and the
 * zone writer. Nothing here takes the GIL. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "amesh.h"
#include "queue.h"
#include "state.h"

#define AMESH_EXPORT __attribute__((visibility("default")))

static pthread_mutex_t st_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_error[1024];
static char *agent_status; /* JSON published by the agent */
static size_t agent_status_len;
static atomic_int started_mode;
static atomic_ullong changes_polled;
static atomic_size_t dict_capacity; /* bytes, 0 = unknown */
static amesh_msg_t *handed; /* messages whose pointers the last amesh_poll() gave out */

void amesh_set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&st_lock);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    pthread_mutex_unlock(&st_lock);
    va_end(ap);
}

void amesh_log_error(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    amesh_set_error("%s", line);
    fprintf(stderr, "amesh: %s\n", line);
}

void amesh_set_agent_status(const char *json, size_t len) {
    char *copy = malloc(len + 1);
    if (copy == NULL) return;
    memcpy(copy, json, len);
    copy[len] = '\0';
    pthread_mutex_lock(&st_lock);
    char *old = agent_status;
    agent_status = copy;
    agent_status_len = len;
    pthread_mutex_unlock(&st_lock);
    free(old);
}

int amesh_spawn_detached(void *(*fn)(void *)) {
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &saved); /* the new thread inherits the full mask */
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&tid, &attr, fn, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return rc;
}

AMESH_EXPORT const char *amesh_last_error(void) {
    /* The buffer is static: a racing writer can only make the text newer, never invalid. */
    return last_error;
}

/* nginx's process type (ngx_process, an ngx_uint_t): the agent runs in a worker or
 * OpenResty's privileged agent, never in the master, whose fork would copy Python and grpc
 * threads. */
#define NGX_PROCESS_WORKER 3
#define NGX_PROCESS_HELPER 4

static int in_nginx_master(unsigned long *type) {
    const volatile uintptr_t *ngx_process = dlsym(RTLD_DEFAULT, "ngx_process");
    if (ngx_process == NULL) return 0; /* not inside nginx (tests, tools) */
    *type = (unsigned long)*ngx_process;
    return *type != NGX_PROCESS_WORKER && *type != NGX_PROCESS_HELPER;
}

static int start_mode(const char *config_json, int mode) {
    int expected = AMESH_MODE_NONE;
    unsigned long type = 0;
    if (config_json == NULL) {
        amesh_set_error("start config is NULL");
        return AMESH_EINVAL;
    }
    if (in_nginx_master(&type)) {
        amesh_set_error("the agent must start in init_worker (a worker or the privileged "
                        "agent), not in nginx's master or init phase (ngx_process=%lu)", type);
        return AMESH_EINVAL;
    }
    if (!atomic_compare_exchange_strong(&started_mode, &expected, mode)) {
        amesh_set_error("the agent is already started in this process");
        return AMESH_EALREADY;
    }
    int rc = amesh_embed_start(config_json, mode);
    if (rc != AMESH_OK) atomic_store(&started_mode, AMESH_MODE_NONE);
    return rc;
}

AMESH_EXPORT int amesh_start(const char *config_json) {
    int rc = start_mode(config_json, AMESH_MODE_POLL);
    if (rc == AMESH_OK) amesh_wakeup_start(); /* optional: the consumer polls without it */
    return rc;
}

AMESH_EXPORT const char *amesh_wakeup_socket(void) { return amesh_wakeup_path(); }

AMESH_EXPORT int amesh_poll(amesh_change_t *changes, int max_changes) {
    if (changes == NULL || max_changes <= 0) return AMESH_EINVAL;
    amesh_msg_t *list;
    int n = amesh_queue_try_take(&list, max_changes);
    if (n <= 0) return n; /* empty, busy or stopped: keep the previous batch's pointers */
    amesh_msg_free_list(handed);
    handed = list;
    int i = 0;
    for (amesh_msg_t *m = list; m; m = m->next) changes[i++] = m->change;
    atomic_fetch_add(&changes_polled, (unsigned long long)n);
    return n;
}

AMESH_EXPORT void amesh_report(uint64_t batch, int status, const char *message) {
    amesh_reports_put(batch, status, message);
}

AMESH_EXPORT size_t amesh_status(char *buf, size_t buf_len) {
    static const char *modes[] = {"none", "poll", "initial"};
    char writer[512];
    amesh_writer_status(writer, sizeof(writer));
    size_t depth = amesh_queue_depth();
    pthread_mutex_lock(&st_lock);
    /* last_error is produced by amesh itself; quotes and backslashes are replaced so the
     * JSON stays valid without an escaper. */
    char err[sizeof(last_error)];
    size_t i = 0;
    for (; last_error[i] && i < sizeof(err) - 1; i++) {
        char c = last_error[i];
        err[i] = (c == '"' || c == '\\' || (unsigned char)c < 0x20) ? '\'' : c;
    }
    err[i] = '\0';
    int n = snprintf(buf, buf_len,
                     "{\"abi\":%d,\"mode\":\"%s\",\"queue_depth\":%zu,\"changes_polled\":%llu,"
                     "\"stopped\":%s,\"last_error\":\"%s\",\"writer\":%s,\"agent\":%s}",
                     AMESH_ABI_VERSION, modes[atomic_load(&started_mode)], depth,
                     (unsigned long long)atomic_load(&changes_polled),
                     amesh_queue_closed() ? "true" : "false", err, writer,
                     agent_status ? agent_status : "null");
    pthread_mutex_unlock(&st_lock);
    return n < 0 ? 0 : (size_t)n;
}

AMESH_EXPORT uint64_t amesh_clock_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

AMESH_EXPORT int amesh_stop(int timeout_ms) {
    amesh_queue_close();
    return amesh_writer_fence(timeout_ms);
}

AMESH_EXPORT void amesh_dict_capacity(size_t capacity_bytes) {
    atomic_store(&dict_capacity, capacity_bytes);
}

size_t amesh_dict_capacity_get(void) { return atomic_load(&dict_capacity); }

AMESH_EXPORT void initial(void *config_zone, void *version_zone) {
    if (config_zone == NULL || version_zone == NULL) {
        amesh_log_error("initial(): a shared dict zone is NULL (declare lua_shared_dict "
                        "xds-config and xds-config-version)");
        return;
    }
    /* The zones first (the capacity the agent sizes objects by, a version workers can wait
     * for), then the agent; the writer thread only once this call owns the agent: on
     * EALREADY another consumer drains the queue, and two would split its batches. */
    if (amesh_writer_prepare(config_zone, version_zone) != AMESH_OK) return;
    const char *cfg = amesh_initial_config();
    if (cfg == NULL) return; /* already logged */
    int rc = start_mode(cfg, AMESH_MODE_INITIAL);
    if (rc == AMESH_EALREADY) {
        amesh_log_error("initial(): the agent already runs in this process (require(\"amesh\")?); "
                        "no writer started");
        return;
    }
    if (rc != AMESH_OK) {
        amesh_log_error("initial(): agent not started: %s", last_error);
        return;
    }
    if (amesh_writer_run() != AMESH_OK) amesh_queue_close(); /* no consumer: refuse batches */
}
