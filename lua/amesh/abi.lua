-- The C ABI of libamesh.so, declared once. Must match include/amesh.h
-- (tests/test_abi.py compares the two).
local ffi = require("ffi")

ffi.cdef[[
typedef struct amesh_change_s {
    int op;
    uint32_t flags;
    uint64_t batch;
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
} amesh_change_t;

int amesh_start(const char *config_json);
void amesh_dict_capacity(size_t capacity_bytes);
const char *amesh_last_error(void);
int amesh_poll(amesh_change_t *changes, int max_changes);
const char *amesh_wakeup_socket(void);
void amesh_report(uint64_t batch, int status, const char *message);
size_t amesh_status(char *buf, size_t buf_len);
uint64_t amesh_clock_us(void);
int amesh_stop(int timeout_ms);
void initial(void *config_zone, void *version_zone);
]]

return {
    ABI_VERSION = 1,
    OK = 0, EINVAL = -1, EALREADY = -2, ERUNTIME = -3, ESTOPPED = -4, EBUSY = -5,
    OP_BEGIN = 1, OP_SET = 2, OP_DELETE = 3, OP_COMMIT = 4,
    BATCH_FULL = 1,
    -- The dict protocol's keys (docs/dict-protocol.md).
    KEY_SENTINEL = "amesh:sentinel",
    KEY_INDEX_PREFIX = "amesh:index:",
    INDEX_BUCKETS = 64,
    KEY_LOG_HEAD = "amesh:log:head",
    KEY_LOG_PREFIX = "amesh:log:",
    LOG_SLOTS = 256,
    KEY_VERSION = "version",
    KEY_STATUS = "amesh:status",
}
