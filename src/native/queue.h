/* The change queue between the agent (producer, a Python thread) and one consumer
 * (the Lua timer through amesh_poll, or the initial() writer thread). */
#ifndef AMESH_QUEUE_H
#define AMESH_QUEUE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "amesh.h"

typedef struct amesh_msg_s {
    struct amesh_msg_s *next;
    amesh_change_t change; /* key/value point into the same allocation */
} amesh_msg_t;

/* Build one message (key and value copied). NULL on out of memory. */
amesh_msg_t *amesh_msg_new(int op, uint32_t flags, uint64_t batch, const char *key,
                           size_t key_len, const char *value, size_t value_len);
void amesh_msg_free_list(amesh_msg_t *head);

/* Append a whole batch (a linked list built outside the lock) atomically.
 * Returns AMESH_ESTOPPED once the queue is closed. */
int amesh_queue_push(amesh_msg_t *head, amesh_msg_t *tail, size_t count);

/* Non-blocking take (trylock): up to max messages, never past a COMMIT (a take holds
 * changes of one batch only); the caller owns the returned list. */
int amesh_queue_try_take(amesh_msg_t **out, int max);

/* Blocking take for the writer thread: waits up to timeout_ms for messages. */
int amesh_queue_take_wait(amesh_msg_t **out, int max, int timeout_ms);

size_t amesh_queue_depth(void);
void amesh_queue_close(void);
int amesh_queue_closed(void);

/* Consumer verdicts, read by the agent. */
typedef struct {
    uint64_t batch;
    int status;
    char message[240];
} amesh_report_t;

void amesh_reports_put(uint64_t batch, int status, const char *message);
/* Waits up to timeout_ms; returns the number of reports copied into out. */
int amesh_reports_wait(amesh_report_t *out, int max, int timeout_ms);

#endif
