#include "queue.h"
#include "state.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Timed waits run on CLOCK_MONOTONIC: a wall-clock step (NTP, an operator) must neither
 * stretch a wait nor end it early. The conditions get that clock once, before first use. */
static pthread_cond_t q_cond, r_cond;
static pthread_once_t conds_once = PTHREAD_ONCE_INIT;

static void init_conds(void) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&q_cond, &attr);
    pthread_cond_init(&r_cond, &attr);
    pthread_condattr_destroy(&attr);
}

static pthread_cond_t *cond(pthread_cond_t *c) {
    pthread_once(&conds_once, init_conds);
    return c;
}

static struct timespec deadline_after(int timeout_ms) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += timeout_ms / 1000;
    t.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
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
    pthread_cond_signal(cond(&q_cond));
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
        if (pthread_cond_timedwait(cond(&q_cond), &q_lock, &deadline) == ETIMEDOUT) break;
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
    pthread_cond_broadcast(cond(&q_cond));
    pthread_mutex_unlock(&q_lock);
}

int amesh_queue_closed(void) {
    return atomic_load(&q_closed);
}

/* Reports: a small ring. A failure report is never lost: when the ring is full the oldest
 * success goes (the next verdict repairs it); when only failures are left the oldest one
 * goes and failure_lost is set, which the next wait returns as a failure of batch 0, so the
 * agent resyncs all the same. */
#define REPORT_RING 256
static pthread_mutex_t r_lock = PTHREAD_MUTEX_INITIALIZER;
static amesh_report_t r_ring[REPORT_RING];
static unsigned r_start, r_count;
static int failure_lost;

/* The longest prefix of s that fits in cap - 1 bytes without cutting a UTF-8 character. */
static size_t utf8_prefix(const char *s, size_t cap) {
    size_t n = strlen(s);
    if (n < cap) return n;
    n = cap - 1;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--; /* s[n]: a continuation byte */
    return n;
}

/* Caller holds r_lock, the ring is full: make room for one report. */
static void drop_one_locked(void) {
    unsigned victim = 0;
    while (victim < r_count && r_ring[(r_start + victim) % REPORT_RING].status < 0) victim++;
    if (victim == r_count) {
        victim = 0; /* only failures: drop the oldest, remembered as lost */
        failure_lost = 1;
    }
    for (unsigned i = victim; i > 0; i--) /* close the gap: older reports move up one */
        r_ring[(r_start + i) % REPORT_RING] = r_ring[(r_start + i - 1) % REPORT_RING];
    r_start = (r_start + 1) % REPORT_RING;
    r_count--;
}

void amesh_reports_put(uint64_t batch, int status, const char *message) {
    const char *text = message ? message : "";
    pthread_mutex_lock(&r_lock);
    if (r_count == REPORT_RING) drop_one_locked();
    amesh_report_t *r = &r_ring[(r_start + r_count) % REPORT_RING];
    r_count++;
    r->batch = batch;
    r->status = status;
    size_t n = utf8_prefix(text, sizeof(r->message));
    memcpy(r->message, text, n);
    r->message[n] = '\0';
    pthread_cond_signal(cond(&r_cond));
    pthread_mutex_unlock(&r_lock);
}

int amesh_reports_wait(amesh_report_t *out, int max, int timeout_ms) {
    struct timespec deadline = deadline_after(timeout_ms);
    pthread_mutex_lock(&r_lock);
    while (r_count == 0 && !failure_lost) {
        if (pthread_cond_timedwait(cond(&r_cond), &r_lock, &deadline) == ETIMEDOUT) break;
    }
    int n = 0;
    if (failure_lost && max > 0) {
        out[n++] = (amesh_report_t){.batch = 0, .status = -1,
                                    .message = "a failure report was lost"};
        failure_lost = 0;
    }
    while (r_count > 0 && n < max) {
        out[n++] = r_ring[r_start];
        r_start = (r_start + 1) % REPORT_RING;
        r_count--;
    }
    pthread_mutex_unlock(&r_lock);
    return n;
}
