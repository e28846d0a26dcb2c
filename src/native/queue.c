#include "queue.h"
#include "state.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static struct timespec deadline_after(int timeout_ms) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += timeout_ms / 1000;
    t.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cond = PTHREAD_COND_INITIALIZER;
static amesh_msg_t *q_head, *q_tail;
static atomic_size_t q_depth; /* written under q_lock, read without it */
static atomic_int q_closed; /* written under q_lock, read without it by status */

amesh_msg_t *amesh_msg_new(int op, uint32_t flags, uint64_t batch, const char *key,
                           size_t key_len, const char *value, size_t value_len) {
    /* One allocation per message: key and value follow the header, NUL-terminated. */
    amesh_msg_t *m = malloc(sizeof(*m) + key_len + 1 + (value ? value_len + 1 : 0));
    if (m == NULL) return NULL;
    char *p = (char *)(m + 1);
    m->next = NULL;
    m->change.op = op;
    m->change.flags = flags;
    m->change.batch = batch;
    m->change.key = p;
    m->change.key_len = key_len;
    if (key_len) memcpy(p, key, key_len);
    p[key_len] = '\0';
    p += key_len + 1;
    if (value) {
        memcpy(p, value, value_len);
        p[value_len] = '\0';
        m->change.value = p;
        m->change.value_len = value_len;
    } else {
        m->change.value = NULL;
        m->change.value_len = 0;
    }
    return m;
}

void amesh_msg_free_list(amesh_msg_t *head) {
    while (head) {
        amesh_msg_t *next = head->next;
        free(head);
        head = next;
    }
}

int amesh_queue_push(amesh_msg_t *head, amesh_msg_t *tail, size_t count) {
    pthread_mutex_lock(&q_lock);
    if (q_closed) {
        pthread_mutex_unlock(&q_lock);
        amesh_msg_free_list(head);
        return AMESH_ESTOPPED;
    }
    if (q_tail) q_tail->next = head;
    else q_head = head;
    q_tail = tail;
    q_depth += count;
    pthread_cond_signal(&q_cond);
    pthread_mutex_unlock(&q_lock);
    amesh_wakeup_notify();
    return AMESH_OK;
}

/* Caller holds q_lock. */
static int take_locked(amesh_msg_t **out, int max) {
    int n = 0;
    amesh_msg_t *first = q_head, *last = NULL, *m = q_head;
    while (m && n < max) {
        last = m;
        m = m->next;
        n++;
        if (last->change.op == AMESH_OP_COMMIT) break; /* one batch per take */
    }
    if (n == 0) {
        *out = NULL;
        return 0;
    }
    q_head = m;
    if (m == NULL) q_tail = NULL;
    last->next = NULL;
    q_depth -= (size_t)n;
    *out = first;
    return n;
}

int amesh_queue_try_take(amesh_msg_t **out, int max) {
    *out = NULL;
    /* nginx's thread must never wait: a contended lock means "nothing yet". */
    if (pthread_mutex_trylock(&q_lock) != 0) return AMESH_EBUSY;
    int n = q_closed ? AMESH_ESTOPPED : take_locked(out, max);
    pthread_mutex_unlock(&q_lock);
    return n;
}

int amesh_queue_take_wait(amesh_msg_t **out, int max, int timeout_ms) {
    struct timespec deadline = deadline_after(timeout_ms);
    *out = NULL;
    pthread_mutex_lock(&q_lock);
    while (!q_closed && q_head == NULL) {
        if (pthread_cond_timedwait(&q_cond, &q_lock, &deadline) == ETIMEDOUT) break;
    }
    int n = q_closed ? AMESH_ESTOPPED : take_locked(out, max);
    pthread_mutex_unlock(&q_lock);
    return n;
}

size_t amesh_queue_depth(void) {
    return atomic_load(&q_depth); /* for status: never waits on the producer's lock */
}

void amesh_queue_close(void) {
    pthread_mutex_lock(&q_lock);
    q_closed = 1;
    pthread_cond_broadcast(&q_cond);
    pthread_mutex_unlock(&q_lock);
}

int amesh_queue_closed(void) {
    return atomic_load(&q_closed);
}

/* Reports: a small ring; when full the oldest are overwritten (the agent only needs the
 * newest verdicts: a lost success is repaired by the next one, a failure sets a flag). */
#define REPORT_RING 256
static pthread_mutex_t r_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t r_cond = PTHREAD_COND_INITIALIZER;
static amesh_report_t r_ring[REPORT_RING];
static unsigned r_start, r_count;

void amesh_reports_put(uint64_t batch, int status, const char *message) {
    pthread_mutex_lock(&r_lock);
    unsigned slot = (r_start + r_count) % REPORT_RING;
    if (r_count == REPORT_RING) r_start = (r_start + 1) % REPORT_RING;
    else r_count++;
    r_ring[slot].batch = batch;
    r_ring[slot].status = status;
    snprintf(r_ring[slot].message, sizeof(r_ring[slot].message), "%s", message ? message : "");
    pthread_cond_signal(&r_cond);
    pthread_mutex_unlock(&r_lock);
}

int amesh_reports_wait(amesh_report_t *out, int max, int timeout_ms) {
    struct timespec deadline = deadline_after(timeout_ms);
    pthread_mutex_lock(&r_lock);
    while (r_count == 0) {
        if (pthread_cond_timedwait(&r_cond, &r_lock, &deadline) == ETIMEDOUT) break;
    }
    int n = 0;
    while (r_count > 0 && n < max) {
        out[n++] = r_ring[r_start];
        r_start = (r_start + 1) % REPORT_RING;
        r_count--;
    }
    pthread_mutex_unlock(&r_lock);
    return n;
}
