/*
 * amesh: the C ABI of libamesh.so (also installed as libxds.so).
 *
 * The library embeds CPython. One process (the privileged agent, or nginx worker 0)
 * calls amesh_start(); the agent then runs on its own threads and queues changes for
 * the shared dicts. nginx's thread only ever calls the non-blocking functions below:
 * none of them takes the GIL or waits for I/O.
 *
 * This header is the one definition of the ABI: lua/amesh/abi.lua must declare the
 * same functions (tests/test_abi.py checks that they agree).
 */
#ifndef AMESH_H
#define AMESH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AMESH_ABI_VERSION 1

/* Return codes. */
#define AMESH_OK 0
#define AMESH_EINVAL (-1)    /* bad argument or invalid start config */
#define AMESH_EALREADY (-2)  /* the agent was already started in this process */
#define AMESH_ERUNTIME (-3)  /* the Python runtime is missing, unreadable or not the one built for */
#define AMESH_ESTOPPED (-4)  /* amesh_stop() was called */
#define AMESH_EBUSY (-5)     /* the queue is locked by the producer: try again on the next tick */

/* Change operations, in the order a consumer sees them for one batch:
 * BEGIN, then SETs (upstreams before the routes that use them), then DELETEs, then COMMIT. */
#define AMESH_OP_BEGIN 1
#define AMESH_OP_SET 2
#define AMESH_OP_DELETE 3
#define AMESH_OP_COMMIT 4

/* Batch flags (on BEGIN and COMMIT). */
#define AMESH_BATCH_FULL 0x1 /* the batch holds every key the agent owns: delete all others */

/* The dict protocol (docs/dict-protocol.md): keys amesh keeps beside the data keys
 * ("/<type>/<id>") of the data dict. Python (amesh_ext/protocol.py) and Lua
 * (lua/amesh/abi.lua) carry the same values; tests/test_abi.py checks they agree. */
#define AMESH_KEY_SENTINEL "amesh:sentinel"  /* the data dict is never empty */
#define AMESH_KEY_INDEX_PREFIX "amesh:index:" /* + 2 digits: crc32(key) % AMESH_INDEX_BUCKETS */
#define AMESH_INDEX_BUCKETS 64                /* an index bucket lists its keys, one a line */
#define AMESH_KEY_LOG_HEAD "amesh:log:head"   /* "<run>:<seq>" of the newest change-log entry */
#define AMESH_KEY_LOG_PREFIX "amesh:log:"     /* + 3 digits: slot seq % AMESH_LOG_SLOTS */
#define AMESH_LOG_SLOTS 256
/* In the version dict: */
#define AMESH_KEY_VERSION "version"           /* what stock APISIX's config_xds watches */
#define AMESH_KEY_STATUS "amesh:status"       /* the agent's status (never evicts "version") */

typedef struct amesh_change_s {
    int op;
    uint32_t flags;
    uint64_t batch; /* batch sequence number, increasing */
    const char *key;
    size_t key_len;
    const char *value; /* JSON text for SET; NULL otherwise */
    size_t value_len;
} amesh_change_t;

/* The data dict's capacity in bytes (lua-resty-core's shdict:capacity()), told by the
 * consumer before amesh_start(); the initial() writer reads it from its zone. The agent
 * rejects, alone, an object too large to ever fit (limits.max_object_bytes). */
void amesh_dict_capacity(size_t capacity_bytes);

/* Start the agent once per process. config_json: see README ("Start config").
 * Returns AMESH_OK at once (the agent connects in the background) or an error code;
 * amesh_last_error() then says why. Never exits or aborts the host process. */
int amesh_start(const char *config_json);

/* The last error of this process, "" if none. The string stays valid until the next error. */
const char *amesh_last_error(void);

/* Take up to max_changes queued changes, without blocking and without the GIL; a call
 * returns changes of one batch only (it stops after a COMMIT).
 * Returns the number filled (0 when the queue is empty), or AMESH_EBUSY / AMESH_ESTOPPED.
 * Pointers in changes[] stay valid until the next amesh_poll() call. */
int amesh_poll(amesh_change_t *changes, int max_changes);

/* The unix socket that signals queued batches ("" if there is none): a consumer connected
 * to it receives a byte per queued batch and can drain at once instead of polling.
 * Created by amesh_start(); only peers with the same uid are accepted. */
const char *amesh_wakeup_socket(void);

/* The consumer's verdict on a committed batch: status 0 applied, < 0 failed (message says
 * why, e.g. "no memory" for a full dict). The agent re-sends what a failed batch held. */
void amesh_report(uint64_t batch, int status, const char *message);

/* A JSON snapshot of the agent's state, NUL-terminated into buf (truncated to buf_len).
 * Returns the full length of the JSON (call again with a larger buffer if >= buf_len). */
size_t amesh_status(char *buf, size_t buf_len);

/* Monotonic clock in microseconds, for a consumer's own timing (tick budgets, stats)
 * without declaring libc functions that its host may declare differently. */
uint64_t amesh_clock_us(void);

/* Fence for the exit path: no more writes or queued changes; waits up to timeout_ms for
 * writes in flight. Returns AMESH_OK, or AMESH_EBUSY if writes were still in flight. */
int amesh_stop(int timeout_ms);

/* Stock APISIX entry point (config_xds.lua): zones from
 * ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared["xds-config"][1]) and "xds-config-version".
 * Starts the agent with the config file found next to this library (amesh.json) and writes
 * into the zones from the library's own writer thread. Returns at once; errors go to stderr
 * (nginx's error log) and amesh_status(). */
void initial(void *config_zone, void *version_zone);

#ifdef __cplusplus
}
#endif

#endif /* AMESH_H */
