-- require("amesh"): start the amesh agent in one nginx process and move its changes into
-- ngx.shared dicts that every worker (and stock APISIX's config_xds) reads.
--
--   init_by_lua_block        { require("amesh").init() }            -- optional: privileged agent
--   init_worker_by_lua_block { require("amesh").init_worker({ config = '{"source": ...}' }) }
--   exit_worker_by_lua_block { require("amesh").exit_worker() }      -- optional
--   location = /amesh/status { content_by_lua_block { ngx.say(require("amesh").status()) } }
local ffi = require("ffi")
local abi = require("amesh.abi")

local ngx = ngx
local ngx_log, ERR, INFO = ngx.log, ngx.ERR, ngx.INFO
local ffi_string, tonumber, tostring, pairs = ffi.string, tonumber, tostring, pairs
local sub, gmatch, floor, min = string.sub, string.gmatch, math.floor, math.min
local ipairs, format = ipairs, string.format

local OP_BEGIN, OP_SET, OP_DELETE, OP_COMMIT = abi.OP_BEGIN, abi.OP_SET, abi.OP_DELETE, abi.OP_COMMIT
local BATCH_FULL = abi.BATCH_FULL
local INDEX_PREFIX = "amesh:index:" -- amesh_ext.sink.INDEX_PREFIX
local INDEX_PREFIX_LEN = #INDEX_PREFIX

local _M = { _VERSION = "0.1.0" }

local defaults = {
    dict = "xds-config",             -- what stock APISIX reads: /routes/<id>, /upstreams/<id>
    version_dict = "xds-config-version",
    version_key = "version",
    status_key = "amesh:status",     -- in version_dict; APISIX only reads "version"
    sentinel_key = "amesh:sentinel", -- keeps the data dict from ever being empty
    wakeup = true,                   -- drain when the library signals a batch (unix socket)…
    safety_interval = 0.05,          -- …and poll this often in case a wakeup is lost;
    interval = 0.002,                -- without the wakeup socket, poll this often
    max_changes = 128,               -- per amesh_poll call
    max_polls = 16,                  -- per timer tick, and…
    tick_budget_us = 2000,           -- …no new poll after this long: bounds the event-loop stall
    status_interval = 1,
}

local privileged_agent_enabled = false
local lib, opts, changes_buf, status_buf
local batch -- the batch being applied
local counters = { batches_applied = 0, batches_failed = 0, batches_unchanged = 0,
                   sets = 0, deletes = 0, last_error = "", start_us = 0,
                   max_tick_us = 0,          -- the longest drain() call: the event-loop stall
                   last_batch_us = 0,        -- first poll of the last batch to its commit
                   last_commit_at = 0,       -- unix time of the last commit (ms resolution)
                   last_batch_changes = 0 }

local function now_us()
    return tonumber(lib.amesh_clock_us()) -- the library's clock: no libc cdef to clash with
end

local function log_error(...)
    ngx_log(ERR, "amesh: ", ...)
end

-- Where the library lives: next to this file's directory (the installed package), or opts.library.
local function default_library()
    local src = debug.getinfo(1, "S").source
    local dir = src:match("^@(.*)/lua/[^/]*$")
    return dir and (dir .. "/libamesh.so") or "libamesh.so"
end

-- Call in init_by_lua: asks for OpenResty's privileged agent process; on Debian's nginx
-- (no core patch) it is unavailable and the agent runs in worker 0 instead.
function _M.init()
    local ok, process = pcall(require, "ngx.process")
    if ok and process.enable_privileged_agent then
        local enabled, err = process.enable_privileged_agent()
        privileged_agent_enabled = enabled and true or false
        if not enabled then
            ngx_log(INFO, "amesh: no privileged agent (", err, "), worker 0 runs the agent")
        end
    end
end

-- with_agent: whether a privileged agent process exists (it then runs the agent, never a
-- worker). init() knows when it enabled one; a host that enabled it itself (APISIX does)
-- says so with opts.privileged_agent = true.
local function is_agent_process(with_agent)
    local ok, process = pcall(require, "ngx.process")
    local ptype = ok and process.type() or "worker"
    if ptype == "privileged agent" then
        return true
    end
    return ptype == "worker" and not with_agent and ngx.worker.id() == 0
end

local function bump_version(vdict)
    ngx.update_time()
    local now = floor(ngx.now() * 1000)
    local prev = tonumber(vdict:get(opts.version_key)) or 0
    if now <= prev then
        now = prev + 1 -- always a different value, also within one millisecond
    end
    local ok, err = vdict:safe_set(opts.version_key, tostring(now))
    if not ok then
        log_error("cannot store ", opts.version_key, ": ", err)
    end
end

local function report(id, status, message)
    lib.amesh_report(id, status, message)
end

-- Undo a failed batch: what it changed goes back to the values it found.
local function fail_batch(dict, err, key)
    local undo = batch.undo
    for i = #undo, 1, -2 do
        local k, old = undo[i - 1], undo[i]
        if old == false then
            dict:delete(k)
        else
            -- safe_set: a plain set could evict unrelated keys from a full dict
            local ok, rerr = dict:safe_set(k, old)
            if not ok then
                log_error("cannot restore ", k, " while rolling back: ", rerr)
            end
        end
    end
    batch.failed = true
    counters.batches_failed = counters.batches_failed + 1
    counters.last_error = "store of " .. key .. " failed: " .. tostring(err)
    log_error(counters.last_error, "; batch ", tostring(batch.id), " rolled back, version kept")
    report(batch.id, -1, tostring(err))
end

-- One SET (value) or DELETE (value nil); unchanged values cost a get and nothing else.
local function apply_change(dict, key, value)
    local old = dict:get(key)
    if batch.full and value ~= nil then
        batch.keys[key] = true
        if old and sub(key, 1, INDEX_PREFIX_LEN) == INDEX_PREFIX then
            batch.old_index[#batch.old_index + 1] = old -- what the last run listed
        end
    end
    if old == value then
        return
    end
    local ok, err
    if value == nil then
        ok, err = dict:delete(key)
        counters.deletes = counters.deletes + 1
    else
        ok, err = dict:safe_set(key, value)
        counters.sets = counters.sets + 1
    end
    if not ok then
        return fail_batch(dict, err, key)
    end
    local undo = batch.undo
    undo[#undo + 1] = key
    undo[#undo + 1] = (old == nil) and false or old
    batch.changed = true
end

-- A FULL batch deletes what an earlier run (or a reload) left under "/" and the batch
-- lacks. The earlier run's key index (captured as the batch rewrote it) says which keys
-- those are. A dict without an index (first start, or data of another writer) is listed
-- with get_keys when the batch begins, before the batch adds its own keys: get_keys costs
-- ~10 ms per 30,000 keys. Either way the walk is sliced across ticks.
local RECONCILE_SLICE = 2000
local INDEX_BUCKETS = 64 -- amesh_ext.sink.INDEX_BUCKETS

local function keys_without_index(dict)
    for b = 0, INDEX_BUCKETS - 1 do
        if dict:get(format("%s%02d", INDEX_PREFIX, b)) then
            return nil
        end
    end
    return dict:get_keys(0)
end

local function reconcile_candidates()
    if batch.unindexed then
        return batch.unindexed
    end
    local keys = {}
    for _, list in ipairs(batch.old_index) do
        for k in gmatch(list, "[^\n]+") do
            keys[#keys + 1] = k
        end
    end
    return keys
end

-- Returns true once the batch is committed (or failed), false to resume on the next tick.
local function commit_step(dict, vdict)
    if batch.failed then
        return true
    end
    if batch.full then
        local keys = batch.scan
        if not keys then
            keys = reconcile_candidates()
            batch.scan, batch.pos = keys, 1
            return false -- listing was this tick's work
        end
        local last = min(#keys, batch.pos + RECONCILE_SLICE - 1)
        for i = batch.pos, last do
            local k = keys[i]
            if sub(k, 1, 1) == "/" and not batch.keys[k] then
                apply_change(dict, k, nil)
                if batch.failed then
                    return true
                end
            end
        end
        batch.pos = last + 1
        if batch.pos <= #keys then
            return false
        end
    end
    if batch.changed then
        bump_version(vdict)
        counters.batches_applied = counters.batches_applied + 1
        report(batch.id, 0, "applied")
    else
        counters.batches_unchanged = counters.batches_unchanged + 1
        report(batch.id, 0, "unchanged")
    end
    return true
end

local function finish_batch(dict, vdict)
    if not commit_step(dict, vdict) then
        return false
    end
    counters.last_batch_us = now_us() - batch.t0
    counters.last_batch_changes = batch.changes
    ngx.update_time()
    counters.last_commit_at = ngx.now()
    batch = nil
    return true
end

local tick_start = 0

-- Apply queued changes until the queue is empty (returns false) or the tick's budget is
-- spent (returns true: more work is waiting).
local function drain_polls(dict, vdict)
    if batch and batch.committing and not finish_batch(dict, vdict) then
        return true
    end
    local buf = changes_buf
    for _ = 1, opts.max_polls do
        if now_us() - tick_start > opts.tick_budget_us then
            return true
        end
        local n = lib.amesh_poll(buf, opts.max_changes)
        if n <= 0 then
            if n == abi.EBUSY then
                return true -- the producer holds the lock for a moment
            end
            if n ~= 0 and n ~= abi.ESTOPPED then
                log_error("amesh_poll: ", n)
            end
            return false
        end
        for i = 0, n - 1 do
            local c = buf[i]
            local op = c.op
            if op == OP_BEGIN then
                batch = { id = c.batch, full = (c.flags % 2) == BATCH_FULL, undo = {},
                          keys = {}, old_index = {}, changed = false, failed = false,
                          t0 = tick_start, changes = 0 }
                if batch.full then
                    batch.unindexed = keys_without_index(dict)
                end
            elseif batch and not batch.failed then
                batch.changes = batch.changes + 1
                if op == OP_SET then
                    apply_change(dict, ffi_string(c.key, c.key_len),
                                 ffi_string(c.value, c.value_len))
                elseif op == OP_DELETE then
                    apply_change(dict, ffi_string(c.key, c.key_len), nil)
                elseif op == OP_COMMIT then
                    -- A poll stops after a COMMIT: nothing else is left in buf.
                    batch.committing = true
                    if not finish_batch(dict, vdict) then
                        return true
                    end
                end
            end
        end
    end
    return true
end

local function drain(premature)
    if premature then
        return
    end
    tick_start = now_us()
    local more = drain_polls(ngx.shared[opts.dict], ngx.shared[opts.version_dict])
    local took = now_us() - tick_start
    if took > counters.max_tick_us then
        counters.max_tick_us = took
    end
    if more then
        -- Yield to the event loop, then go on: a wakeup was already spent on this work.
        ngx.timer.at(0, drain)
    end
end

-- Event-driven draining: a cosocket blocked on the library's wakeup socket (one byte per
-- queued batch). The library shuts the socket down when nginx exits, ending the loop.
local wakeup = { state = "off", wakeups = 0 }
local fast_timer_started = false

local function start_fast_timer()
    if not fast_timer_started then
        fast_timer_started = true
        ngx.timer.every(opts.interval, drain)
    end
end

local function wakeup_loop(premature, path)
    if premature or ngx.worker.exiting() then
        return
    end
    local sock = ngx.socket.tcp()
    local ok, err = sock:connect("unix:" .. path)
    if not ok then
        wakeup.state = "connect failed: " .. tostring(err)
        log_error("wakeup socket ", path, ": ", err, "; polling every ", opts.interval, " s")
        start_fast_timer()
        return
    end
    wakeup.state = "connected"
    sock:settimeouts(1000, 1000, 3600 * 1000) -- a quiet mesh: one read timeout an hour
    while not ngx.worker.exiting() do
        local data, rerr = sock:receiveany(4096)
        if data then
            wakeup.wakeups = wakeup.wakeups + 1
            drain(false)
        elseif rerr ~= "timeout" then
            wakeup.state = "closed: " .. tostring(rerr)
            break
        end
    end
    sock:close()
    if not ngx.worker.exiting() then
        ngx.timer.at(0.1, wakeup_loop, path)
    end
end

local function json_string(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return string.format("\\u%04x", c:byte())
    end) .. '"'
end

local function library_status()
    local n = tonumber(lib.amesh_status(status_buf, 65536))
    if n >= 65536 then
        local big = ffi.new("char[?]", n + 1)
        lib.amesh_status(big, n + 1)
        return ffi_string(big, n)
    end
    return ffi_string(status_buf, n)
end

local function publish_status(premature)
    if premature then
        return
    end
    local parts = { '{"agent_process":', tostring(ngx.worker.pid()), ',"consumer":{' }
    for k, v in pairs(counters) do
        parts[#parts + 1] = '"' .. k .. '":' .. (type(v) == "string" and json_string(v) or v) .. ","
    end
    parts[#parts] = sub(parts[#parts], 1, -2)
    parts[#parts + 1] = '},"wakeup":{"state":' .. json_string(wakeup.state) .. ',"wakeups":'
        .. wakeup.wakeups .. '},"library":' .. library_status() .. '}'
    local ok, err = ngx.shared[opts.version_dict]:set(opts.status_key, table.concat(parts))
    if not ok then
        log_error("cannot store status: ", err)
    end
end

-- Call in init_worker_by_lua. opts.config: the start config as a JSON string.
function _M.init_worker(user_opts)
    user_opts = user_opts or {}
    local with_agent = user_opts.privileged_agent
    if with_agent == nil then
        with_agent = privileged_agent_enabled
    end
    if not is_agent_process(with_agent) then
        return true
    end
    opts = {}
    for k, v in pairs(defaults) do
        opts[k] = user_opts[k] == nil and v or user_opts[k]
    end
    local dict, vdict = ngx.shared[opts.dict], ngx.shared[opts.version_dict]
    if not dict or not vdict then
        local err = "lua_shared_dict " .. opts.dict .. " and " .. opts.version_dict .. " are required"
        log_error(err)
        return nil, err
    end
    -- Workers that wait for a version must not wait for the agent: write one now if none
    -- exists (a reload keeps the existing one and the last config keeps serving).
    if vdict:get(opts.version_key) == nil then
        bump_version(vdict)
    end
    dict:safe_add(opts.sentinel_key, "1")

    local ok, loaded = pcall(ffi.load, user_opts.library or default_library())
    if not ok then
        log_error("cannot load the library: ", loaded)
        return nil, loaded
    end
    lib = loaded
    changes_buf = ffi.new("amesh_change_t[?]", opts.max_changes)
    status_buf = ffi.new("char[?]", 65536)
    local config = user_opts.config or "{}"
    local t0 = now_us()
    local rc = lib.amesh_start(config)
    counters.start_us = now_us() - t0
    if rc ~= abi.OK then
        local err = ffi_string(lib.amesh_last_error())
        counters.last_error = err
        log_error("agent not started (", rc, "): ", err)
        publish_status()
        return nil, err
    end
    ngx_log(INFO, "amesh: agent started in process ", ngx.worker.pid())
    local path = ffi_string(lib.amesh_wakeup_socket())
    local okt, terr
    if opts.wakeup and path ~= "" then
        okt, terr = ngx.timer.every(opts.safety_interval, drain)
        if okt then
            okt, terr = ngx.timer.at(0, wakeup_loop, path)
        end
    else
        wakeup.state = "off"
        fast_timer_started = true
        okt, terr = ngx.timer.every(opts.interval, drain)
    end
    if not okt then
        log_error("cannot start the poll timers: ", terr)
        return nil, terr
    end
    ngx.timer.every(opts.status_interval, publish_status)
    ngx.timer.at(0, publish_status)
    return true
end

-- Call in exit_worker_by_lua: the agent stops queueing; nothing is written after this.
function _M.exit_worker()
    if lib then
        lib.amesh_stop(200)
    end
end

-- The agent's status as JSON (from any worker): what the agent process last published.
function _M.status()
    local name = (opts and opts.version_dict) or defaults.version_dict
    local vdict = ngx.shared[name]
    local s = vdict and vdict:get((opts and opts.status_key) or defaults.status_key)
    return s or '{"error":"no status published yet"}'
end

return _M
