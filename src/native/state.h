/* Process-wide state shared by the ABI, the embedded interpreter and the writer. */
#ifndef AMESH_STATE_H
#define AMESH_STATE_H

#include <stdarg.h>
#include <stddef.h>

#define AMESH_MODE_NONE 0
#define AMESH_MODE_POLL 1    /* Lua drains amesh_poll() */
#define AMESH_MODE_INITIAL 2 /* stock APISIX: the library's writer thread stores into zones */

void amesh_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Also to stderr, which nginx points at its error log. */
void amesh_log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void amesh_set_agent_status(const char *json, size_t len);

/* A detached thread started with every signal blocked (it and its children never take
 * nginx's signals). 0 on success. */
int amesh_spawn_detached(void *(*fn)(void *));

/* embed.c: the start config for initial(): amesh.json next to the library, else "{}". */
const char *amesh_initial_config(void);

/* embed.c: start the interpreter (or attach to a running one) and the agent. */
int amesh_embed_start(const char *config_json, int mode);

/* wakeup.c: the socket that wakes the Lua consumer when a batch is queued. */
int amesh_wakeup_start(void);
const char *amesh_wakeup_path(void);
void amesh_wakeup_notify(void);

/* writer.c: nginx is shutting down (its quit/terminate/exiting flags); 0 outside nginx. */
int amesh_nginx_exiting(void);

/* amesh.c: what amesh_dict_capacity() was told (0 = unknown). */
size_t amesh_dict_capacity_get(void);

/* writer.c: initial()'s zone writer. prepare resolves the shdict functions, tells the
 * capacity and stores a version if none exists and the sentinel (nginx's thread, before the
 * agent starts); run starts the writer thread and the exit fence. */
int amesh_writer_prepare(void *config_zone, void *version_zone);
int amesh_writer_run(void);
int amesh_writer_fence(int timeout_ms);
void amesh_writer_status(char *buf, size_t len);

#endif
