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
local format, concat = string.format, table.concat

local OP_BEGIN, OP_SET, OP_DELETE, OP_COMMIT = abi.OP_BEGIN, abi.OP_SET, abi.OP_DELETE, abi.OP_COMMIT
local BATCH_FULL = abi.BATCH_FULL
local INDEX_PREFIX, INDEX_BUCKETS = abi.KEY_INDEX_PREFIX, abi.INDEX_BUCKETS
local INDEX_PREFIX_LEN = #INDEX_PREFIX

local _M = { _VERSION = "0.1.0" }

local defaults = {
    dict = "xds-config",             -- what stock APISIX reads: /routes/<id>, /upstreams/<id>
    version_dict = "xds-config-version",
    version_key = abi.KEY_VERSION,
    -- status_dict: where the status goes (default version_dict; stored with safe_set, so
    -- the status can never evict "version")
    status_key = abi.KEY_STATUS,
    sentinel_key = abi.KEY_SENTINEL, -- keeps the data dict from ever being empty
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

local tick_start = 0

local function over_budget()
    return now_us() - tick_start > opts.tick_budget_us
end

-- A batch, as docs/dict-protocol.md lays it out. Every key it changes gets an undo entry
-- (false: the key did not exist), so a refused batch goes back to the dict it found.
local function new_batch(id, flags, dict)
    local b = { id = id, full = (flags % 2) == BATCH_FULL, undo_keys = {}, undo_vals = {},
                keys = {}, new_index = {}, changed = false, failed = false,
                t0 = tick_start, changes = 0 }
    if b.full then
        -- The index an earlier run left, read before this batch rewrites it.
        local old, any = {}, false
        for i = 0, INDEX_BUCKETS - 1 do
            local k = format("%s%02d", INDEX_PREFIX, i)
            old[k] = dict:get(k)
            any = any or old[k] ~= nil
        end
        b.old_index = old
        if not any then
            b.unindexed = dict:get_keys(0) -- another writer's data, or a first start
        end
    end
    return b
end

local function store(dict, key, value)
    if value == nil then
        return dict:delete(key)
    end
    -- safe_set: a plain set could evict unrelated keys from a full dict
    return dict:safe_set(key, value)
end

local function refuse_batch(err, key)
    batch.failed = true
    batch.rollback_pos = #batch.undo_keys
    batch.error = "store of " .. key .. " failed: " .. tostring(err)
end

-- Undo a refused batch in slices (newest change first), then report it. Returns true once
-- the rollback is done.
local function rollback_step(dict)
    local keys, vals = batch.undo_keys, batch.undo_vals
    local i = batch.rollback_pos
    while i > 0 do
        local old = vals[i]
        local ok, err = store(dict, keys[i], old ~= false and old or nil)
        if not ok then
            log_error("cannot restore ", keys[i], " while rolling back: ", err)
        end
        i = i - 1
        if i % 256 == 0 and over_budget() then
            batch.rollback_pos = i
            return false
        end
    end
    batch.rollback_pos = 0
    if not batch.reported then
        batch.reported = true
        counters.batches_failed = counters.batches_failed + 1
        counters.last_error = batch.error
        log_error(batch.error, "; batch ", tostring(batch.id), " rolled back, version kept (",
                  #keys, " keys restored)")
        report(batch.id, -1, batch.error)
    end
    return true
end

local function union_lines(old, new)
    if not old or old == "" then
        return new
    end
    local seen, extra = {}, {}
    for k in gmatch(new, "[^\n]+") do
        seen[k] = true
    end
    for k in gmatch(old, "[^\n]+") do
        if not seen[k] then
            extra[#extra + 1] = k
        end
    end
    if #extra == 0 then
        return new
    end
    return new == "" and concat(extra, "\n") or (new .. "\n" .. concat(extra, "\n"))
end

-- One SET (value) or DELETE (value nil); unchanged values cost a get and nothing else.
local function apply_change(dict, key, value)
    if batch.full and value ~= nil and not batch.finalizing then
        batch.keys[key] = true
        if sub(key, 1, INDEX_PREFIX_LEN) == INDEX_PREFIX then
            -- Old and new keys coexist until COMMIT: the index lists both.
            batch.new_index[key] = value
            value = union_lines(batch.old_index[key], value)
        end
    end
    local old = dict:get(key)
    if old == value then
        return
    end
    -- The undo entry goes first: a failed safe_set of a larger value has already freed the
    -- old one (lua-nginx-module removes the node before it allocates the new one).
    local n = #batch.undo_keys + 1
    batch.undo_keys[n] = key
    if old == nil then
        old = false
    end
    batch.undo_vals[n] = old
    local ok, err = store(dict, key, value)
    if not ok then
        return refuse_batch(err, key)
    end
    if value == nil then
        counters.deletes = counters.deletes + 1
    else
        counters.sets = counters.sets + 1
    end
    batch.changed = true
end

-- A FULL batch deletes what an earlier run (or a reload) left under "/" and the batch
-- lacks: the keys of the old index (or, with no index at all, of get_keys at BEGIN),
-- walked in slices across ticks. Then each bucket forgets the keys just deleted.
local function reconcile_candidates()
    if batch.unindexed then
        return batch.unindexed
    end
    local keys = {}
    for _, list in pairs(batch.old_index) do
        for k in gmatch(list, "[^\n]+") do
            keys[#keys + 1] = k
        end
    end
    return keys
end

-- Returns true once the batch is committed (or failed), false to resume on the next tick.
local function commit_step(dict, vdict)
    if batch.full then
        local keys = batch.scan
        if not keys then
            keys = reconcile_candidates()
            batch.scan, batch.pos = keys, 1
            return false -- listing was this tick's work
        end
        local i = batch.pos
        while i <= #keys do
            local k = keys[i]
            i = i + 1
            if sub(k, 1, 1) == "/" and not batch.keys[k] then
                apply_change(dict, k, nil)
                if batch.failed then
                    return true
                end
            end
            if i % 256 == 0 and over_budget() then
                batch.pos = i
                return false
            end
        end
        batch.pos = i
        batch.finalizing = true -- the new lists, as the agent sent them
        for k, v in pairs(batch.new_index) do
            apply_change(dict, k, v) -- a no-op where no old key was merged in
            if batch.failed then
                return true
            end
            batch.new_index[k] = nil
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
    if batch.failed then
        if not rollback_step(dict) then
            return false
        end
        if not batch.committing then
            return true -- the rest of the refused batch is skipped until its COMMIT
        end
    elseif not commit_step(dict, vdict) then
        return false
    end
    if batch.failed and batch.rollback_pos > 0 then
        return false -- the store that failed was in the COMMIT step: undo it first
    end
    if not batch.failed then
        counters.last_batch_us = now_us() - batch.t0
        counters.last_batch_changes = batch.changes
        ngx.update_time()
        counters.last_commit_at = ngx.now()
    end
    batch = nil
    return true
end

local function process(dict, vdict, op, flags, id, key, value)
    if op == OP_BEGIN then
        batch = new_batch(id, flags, dict)
        return true
    end
    if not batch then
        return true
    end
    if op == OP_COMMIT then
        batch.committing = true
        return finish_batch(dict, vdict)
    end
    if batch.failed then
        return true -- skipped: the batch is refused
    end
    batch.changes = batch.changes + 1
    apply_change(dict, key, value)
    return true
end

-- Apply queued changes until the queue is empty (returns false) or the tick's budget is
-- spent (returns true: more work is waiting). Pending work of the current batch (a
-- rollback, a reconcile) goes first; nothing of a later batch is applied before it.
local function drain_polls(dict, vdict)
    if batch and (batch.committing or (batch.failed and batch.rollback_pos > 0)) then
        if not finish_batch(dict, vdict) then
            return true
        end
    end
    local buf = changes_buf
    for _ = 1, opts.max_polls do
        if over_budget() then
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
            local key, value
            if op == OP_SET then
                key, value = ffi_string(c.key, c.key_len), ffi_string(c.value, c.value_len)
            elseif op == OP_DELETE then
                key = ffi_string(c.key, c.key_len)
            end
            -- A poll stops after a COMMIT: nothing else is left in buf when this pauses.
            if not process(dict, vdict, op, c.flags, c.batch, key, value) then
                return true
            end
            if batch and batch.failed and batch.rollback_pos > 0 then
                -- Undo before anything else; the rest of this poll is of the refused batch.
                for j = i + 1, n - 1 do
                    if buf[j].op == OP_COMMIT then
                        batch.committing = true
                    end
                end
                if not finish_batch(dict, vdict) then
                    return true
                end
                break
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
    -- A quiet mesh: one read timeout an hour. A quitting worker does not wait for it: the
    -- library shuts this connection (and its listener) as soon as nginx starts to exit.
    sock:settimeouts(1000, 1000, 3600 * 1000)
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

local status_store_failed = false

-- What amesh's APISIX config provider refused, per worker (lua/apisix/core/config_xds.lua
-- lists it under amesh:refused:<worker id> of the version dict): JSON objects, as stored.
local function apisix_refused(vdict)
    local found = {}
    for i = -1, ngx.worker.count() - 1 do
        local v = vdict:get("amesh:refused:" .. (i < 0 and "agent" or i))
        if v then
            found[#found + 1] = v
        end
    end
    return "[" .. concat(found, ",") .. "]"
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
        .. wakeup.wakeups .. '},"apisix_refused":' .. apisix_refused(ngx.shared[opts.version_dict])
        .. ',"library":' .. library_status() .. '}'
    -- safe_set: a status that does not fit fails alone, never evicting "version".
    local ok, err = ngx.shared[opts.status_dict]:safe_set(opts.status_key, concat(parts))
    if not ok and not status_store_failed then
        log_error("cannot store status (", #parts, " parts): ", err)
    end
    status_store_failed = not ok
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
    opts.status_dict = user_opts.status_dict or opts.version_dict
    if not ngx.shared[opts.status_dict] then
        local err = "lua_shared_dict " .. opts.status_dict .. " (status_dict) is required"
        log_error(err)
        return nil, err
    end
    local okc, capacity = pcall(dict.capacity, dict) -- lua-resty-core's shdict
    if okc and capacity then
        lib.amesh_dict_capacity(capacity) -- objects that can never fit are rejected alone
    end
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
-- status_dict: where the agent process publishes (its init_worker option; default the
-- version dict).
function _M.status(status_dict)
    local name = status_dict or (opts and opts.status_dict) or defaults.version_dict
    local vdict = ngx.shared[name]
    local s = vdict and vdict:get((opts and opts.status_key) or defaults.status_key)
    return s or '{"error":"no status published yet"}'
end

return _M
