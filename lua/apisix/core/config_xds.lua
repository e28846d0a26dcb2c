--
-- Licensed to the Apache Software Foundation (ASF) under one or more
-- contributor license agreements.  See the NOTICE file distributed with
-- this work for additional information regarding copyright ownership.
-- The ASF licenses this file to You under the Apache License, Version 2.0
-- (the "License"); you may not use this file except in compliance with
-- the License.  You may obtain a copy of the License at
--
--     http://www.apache.org/licenses/LICENSE-2.0
--
-- Unless required by applicable law or agreed to in writing, software
-- distributed under the License is distributed on an "AS IS" BASIS,
-- WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
-- See the License for the specific language governing permissions and
-- limitations under the License.
--

--- An incremental config provider for ngx.shared["xds-config"].
--
-- A drop-in for stock `apisix.core.config_xds` (same `new`, `get`, `fetch_created_obj`,
-- `init_worker`; the objects keep `values`, `values_hash` and `conf_version` as APISIX's
-- callers use them). Instead of re-reading the whole dict once a second, every worker
-- checks `version` every `check_interval` seconds and applies only the keys the writer's
-- change log (`apisix.core.xds_log`) names, each decoded and checked with the object's
-- own `item_schema` and `checker`, in slices of at most `budget` seconds of CPU. A worker
-- that fell behind the log, or a writer without a log, gets a full reload, which also
-- decodes only the keys whose value changed. An object's `conf_version` moves only when
-- one of its items changed; `obj:changes_since(conf_version)` tells which (routers use
-- it to rebuild only what a change touches). A changed item that fails its check is
-- skipped alone, logged at error level and listed in `amesh:refused:<worker id>` of
-- the version dict; its previous version keeps serving.
--
-- @module core.config_xds

local config_local      = require("apisix.core.config_local")
local log               = require("apisix.core.log")
local json              = require("apisix.core.json")
local lua_os_clock      = os.clock    -- before `os` names apisix.core.os
local os                = require("apisix.core.os")
local check_schema      = require("apisix.core.schema").check
local xds_log           = require("apisix.core.xds_log")
local new_tab           = require("table.new")
local clear_tab         = require("table.clear")
local ffi               = require("ffi")
local C                 = ffi.C
local setmetatable      = setmetatable
local tostring          = tostring
local tonumber          = tonumber
local type              = type
local pairs             = pairs
local ipairs            = ipairs
local pcall             = pcall
local error             = error
local io_open           = io.open
local io_close          = io.close
local package           = package
local sub_str           = string.sub
local str_find          = string.find
local str_byte          = string.byte
local tab_concat        = table.concat
local crc32             = ngx.crc32_long
local ngx_sleep         = ngx.sleep
local ngx_timer_every   = ngx.timer.every
local ngx_time          = ngx.time
local ngx_now           = ngx.now
local ngx_update_time   = ngx.update_time
local ngx_re_match      = ngx.re.match
local ngx_re_gmatch     = ngx.re.gmatch
local exiting           = ngx.worker.exiting
local worker_id         = ngx.worker.id
local config            = ngx.shared["xds-config"]
local conf_ver          = ngx.shared["xds-config-version"]
local is_http           = ngx.config.subsystem == "http"

local SLASH = str_byte("/")
local CHANGES_KEPT = 64           -- conf_versions an object remembers for changes_since
local REFUSED_LISTED = 20         -- refused items named in amesh:refused:<worker>

local process
if is_http then
    process = require("ngx.process")
end

local shdict_udata_to_zone
if not pcall(function() return C.ngx_http_lua_ffi_shdict_udata_to_zone end) then
    shdict_udata_to_zone = C.ngx_meta_lua_ffi_shdict_udata_to_zone
else
    shdict_udata_to_zone = C.ngx_http_lua_ffi_shdict_udata_to_zone
end

pcall(ffi.cdef, [[
extern void initial(void* config_zone, void* version_zone);
]])

-- CPU time of this thread (the event loop): budgets must not count other threads of the
-- process (an embedded agent's). Declared under its own name, so that no other cdef of
-- clock_gettime (the host's) can clash.
local os_clock
do
    local ok = pcall(ffi.cdef, [[
        typedef struct { long sec; long nsec; } apisix_xds_timespec_t;
        int apisix_xds_clock_gettime(int clk_id, apisix_xds_timespec_t *tp)
            __asm__("clock_gettime");
    ]])
    if ok then
        local ts = ffi.new("apisix_xds_timespec_t")
        local CLOCK_THREAD_CPUTIME_ID = 3
        os_clock = function()
            C.apisix_xds_clock_gettime(CLOCK_THREAD_CPUTIME_ID, ts)
            return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
        end
    else
        os_clock = lua_os_clock
    end
end


local _M = {
    version = 0.2,
    local_conf = config_local.local_conf,
    -- tunables (seconds)
    check_interval = 0.005,
    budget = 0.002,
    -- while a worker holds no item at all there is nothing to serve: longer slices
    empty_budget = 0.05,
}

local created_obj = {}        -- "/routes" -> obj
local position                -- the change-log entry this worker applied ("<run>:<seq>")
local seen_version            -- the `version` this worker applied
local modified_index = 0      -- per-item modifiedIndex: moves for every applied change
local refused = {}            -- key -> error of the items kept at their previous version
local refused_dirty = false
local syncing = false
local stats = {applied = 0, full_reloads = 0, max_slice = 0, cpu = 0}
_M.stats = stats


local mt = {
    __index = _M,
    __tostring = function(self)
        return " xds key: " .. self.key
    end
}


local function load_shared_lib(lib_name)
    local tried_paths = new_tab(32, 0)
    local iter, err = ngx_re_gmatch(package.cpath, "[^;]+", "jo")
    if not iter then
        error("failed to gmatch: " .. err)
    end

    while true do
        local it = iter()
        if not it then
            break
        end
        local fpath = ngx_re_match(it[0], "(.*/)", "jo")
        if fpath then
            local spath = fpath[0] .. lib_name
            local f = io_open(spath)
            if f ~= nil then
                io_close(f)
                return ffi.load(spath)
            end
            tried_paths[#tried_paths + 1] = spath
        end
    end

    return nil, tried_paths
end


local function load_libxds(lib_name)
    local xdsagent, tried_paths = load_shared_lib(lib_name)
    if not xdsagent then
        error("can not load xds library, tried paths: " .. tab_concat(tried_paths, "\r\n"))
    end

    xdsagent.initial(ffi.cast("void*", shdict_udata_to_zone(config[1])),
                     ffi.cast("void*", shdict_udata_to_zone(conf_ver[1])))
end


-- "/routes/r1" -> "/routes", "r1"; "/plugins" -> "/plugins", nil
local function split_key(key)
    if str_byte(key, 1) ~= SLASH then
        return nil
    end
    local slash = str_find(key, "/", 2, true)
    if not slash then
        return key, nil
    end
    return sub_str(key, 1, slash - 1), sub_str(key, slash + 1)
end


local function set_refused(key, err)
    if refused[key] ~= err then
        refused[key] = err
        refused_dirty = true
    end
end


local function clear_refused(key)
    if refused[key] then
        refused[key] = nil
        refused_dirty = true
    end
end


local function publish_refused()
    if not refused_dirty then
        return
    end
    refused_dirty = false

    local list, n = {}, 0
    for key, err in pairs(refused) do
        n = n + 1
        if n <= REFUSED_LISTED then
            list[n] = {key = key, error = err}
        end
    end

    local status_key = "amesh:refused:" .. (worker_id() or "agent")
    if n == 0 then
        conf_ver:delete(status_key)
        return
    end

    local ok, err = conf_ver:safe_set(status_key, json.encode({
        worker = worker_id(), count = n, refused = list, time = ngx_time(),
    }))
    if not ok then
        log.error("failed to report refused xds items: ", err)
    end
end


local function compact(self)
    local values = self.values
    local live = new_tab(#values - self.tombstones, 0)
    local hash = self.values_hash
    for _, item in ipairs(values) do
        if item then
            live[#live + 1] = item
            hash[item.id] = #live
        end
    end
    self.values = live
    self.tombstones = 0
end


-- an object's items changed: bump its conf_version once and remember which ids moved
local function commit_obj(self)
    local ids = self.pending_ids
    if not ids then
        return
    end
    self.pending_ids = nil

    if self.tombstones >= 100 and self.tombstones * 4 >= #self.values then
        compact(self)
    end

    local ver = self.conf_version + 1
    self.conf_version = ver
    self.changes[ver] = ids
    self.changes[ver - CHANGES_KEPT] = nil
end


local function note_change(self, id)
    local ids = self.pending_ids
    if not ids then
        ids = {}
        self.pending_ids = ids
    end
    ids[#ids + 1] = id
end


local function remove_item(self, id, key)
    clear_refused(key)
    local idx = self.values_hash[id]
    if not idx then
        return
    end

    self.values[idx] = false
    self.values_hash[id] = nil
    self.tombstones = self.tombstones + 1
    note_change(self, id)
end


-- check a decoded item the way stock config_xds does (same log lines)
local function check_item(self, key, conf, conf_str, err)
    if not conf then
        log.error("decode the conf of [", key, "] failed, err: ", err,
                  ", conf_str: ", conf_str)
        return false, "decode failed: " .. tostring(err)
    end

    if not self.single_item and type(conf) ~= "table" then
        log.error("invalid conf of [", key, "], conf: ", conf, ", it should be an object")
        return false, "it should be an object"
    end

    if self.item_schema then
        local ok, serr = check_schema(self.item_schema, conf)
        if not ok then
            log.error("failed to check the conf of [", key, "] err:", serr)
            return false, serr
        end
    end

    if self.checker then
        local ok, cerr = self.checker(conf)
        if not ok then
            log.error("failed to check the conf of [", key, "] err:", cerr)
            return false, cerr
        end
    end

    return true
end


-- apply one key's current dict value (nil: deleted) to its object
local function apply_key(self, key, id, conf_str)
    stats.applied = stats.applied + 1
    if conf_str == nil then
        return remove_item(self, id, key)
    end

    local crc = crc32(conf_str)
    local idx = self.values_hash[id]
    local prev = idx and self.values[idx]
    if prev and prev.crc == crc and prev.len == #conf_str then
        clear_refused(key)
        return
    end

    local conf, err = json.decode(conf_str)
    local ok, cerr = check_item(self, key, conf, conf_str, err)
    if not ok then
        -- skipped alone: the previous version, if any, keeps serving
        set_refused(key, cerr)
        return
    end
    clear_refused(key)

    if type(conf) == "table" and not self.single_item then
        conf.id = id        -- the key names the item, as config_etcd does
    end

    modified_index = modified_index + 1
    local item = {value = conf, modifiedIndex = modified_index, key = key,
                  id = id, crc = crc, len = #conf_str}

    if idx then
        self.values[idx] = item
    else
        local values = self.values
        values[#values + 1] = item
        self.values_hash[id] = #values
    end
    note_change(self, id)

    if self.filter then
        self.filter(item)
    end
end


local function object_of(key)
    local prefix, id = split_key(key)
    if not prefix then
        return nil
    end
    local obj = created_obj[prefix]
    if not obj then
        return nil
    end
    if id == nil then
        if not obj.single_item then
            return nil
        end
        id = prefix
    end
    return obj, id
end


local function commit_all()
    for _, obj in pairs(created_obj) do
        commit_obj(obj)
    end
    publish_refused()
end


-- a cooperative slice: commit what changed and yield once the budget is spent
local slice_start = 0
local budget = _M.budget
local function maybe_yield(can_yield)
    if not can_yield then
        return
    end
    local used = os_clock() - slice_start
    if used < budget then
        return
    end
    if used > stats.max_slice then
        stats.max_slice = used
    end
    commit_all()
    stats.cpu = stats.cpu + (os_clock() - slice_start)
    ngx_sleep(0.001)    -- ngx.sleep(0) needs OpenResty's delayed-events patch
    slice_start = os_clock()
end


local function apply_keys(keys, can_yield)
    for i = 1, #keys do
        local key = keys[i]
        local obj, id = object_of(key)
        if obj then
            apply_key(obj, key, id, config:get(key))
        end
        maybe_yield(can_yield)
    end
end


-- the data keys of the dict, one index bucket (or, without an index, all) per call
local function key_batches()
    if not xds_log.indexed(config) then
        local done = false
        return function()
            if done then
                return nil
            end
            done = true
            return xds_log.all_keys(config)
        end
    end

    local b = -1
    return function()
        b = b + 1
        if b >= xds_log.INDEX_BUCKETS then
            return nil
        end
        return xds_log.bucket_keys(config, b, {})
    end
end


-- items of `obj` whose key is no longer in the dict (a compaction at a yield replaces
-- obj.values, never the array walked here; remove_item looks items up by id)
local function remove_unseen(obj, seen, can_yield)
    local values = obj.values
    for i = 1, #values do
        local item = values[i]
        if item and not seen[item.key] then
            remove_item(obj, item.id, item.key)
        end
        if i % 256 == 0 then
            maybe_yield(can_yield)
        end
    end
end


-- every data key of the dict, applied to its object; then what is gone is removed
local function full_reload(can_yield)
    stats.full_reloads = stats.full_reloads + 1
    local seen = {}
    for keys in key_batches() do
        for i = 1, #keys do
            seen[keys[i]] = true
        end
        apply_keys(keys, can_yield)
    end

    for _, obj in pairs(created_obj) do
        remove_unseen(obj, seen, can_yield)
    end
end


-- the boot load of one object (init_worker: not sliced); the key list is read once
local boot_keys
local function boot_load(obj)
    if not boot_keys then
        boot_keys = {}
        for keys in key_batches() do
            for i = 1, #keys do
                local prefix = split_key(keys[i])
                if prefix then
                    local group = boot_keys[prefix]
                    if not group then
                        group = {}
                        boot_keys[prefix] = group
                    end
                    group[#group + 1] = keys[i]
                end
            end
        end
    end
    local keys = boot_keys[obj.key] or {}
    for i = 1, #keys do
        local _, id = object_of(keys[i])
        if id then
            apply_key(obj, keys[i], id, config:get(keys[i]))
        end
    end
end


local function sync(can_yield)
    local version = conf_ver:get("version")
    if version == nil or version == seen_version then
        return
    end

    slice_start = os_clock()
    ngx_update_time()
    local wall_start = ngx_now()
    budget = _M.budget
    local empty = true
    for _, obj in pairs(created_obj) do
        if #obj.values > obj.tombstones then
            empty = false
            break
        end
    end
    if empty then
        budget = _M.empty_budget
    end

    -- the writer logs a batch before it bumps `version`: a bump the log does not
    -- explain comes from a writer without one (stock libxds), so reload everything
    local head = xds_log.head(config)
    local keys = head and position and head ~= position
                 and xds_log.read(config, position, head)
    if keys then
        apply_keys(keys, can_yield)
    else
        full_reload(can_yield)
    end
    position = head
    seen_version = version
    commit_all()

    local used = os_clock() - slice_start
    stats.cpu = stats.cpu + used
    if used > stats.max_slice then
        stats.max_slice = used
    end
    ngx_update_time()
    stats.last_sync_s = ngx_now() - wall_start
end


local retry_at = 0
local function tick(premature)
    if premature or syncing or exiting() then
        return
    end
    boot_keys = nil
    if retry_at > 0 and ngx_now() < retry_at then
        return
    end
    syncing = true
    local ok, err = pcall(sync, true)
    syncing = false
    if ok then
        retry_at = 0
        return
    end
    log.error("failed to sync data from xds: ", err, ", full reload in 1 s")
    seen_version = nil     -- retried as a full reload
    position = nil
    retry_at = ngx_now() + 1
end


--- A config object for the keys `<key>/<id>` of the dict (or the single key `key`).
function _M.new(key, opts)
    local obj = setmetatable({
        automatic = opts and opts.automatic,
        item_schema = opts and opts.item_schema,
        checker = opts and opts.checker,
        filter = opts and opts.filter,
        single_item = opts and opts.single_item,
        key = key,
        conf_version = 0,
        values = new_tab(8, 0),
        values_hash = new_tab(0, 8),
        tombstones = 0,
        changes = {},
        sync_times = 0,
        running = true,
    }, mt)

    if obj.automatic then
        if not key then
            return nil, "missing `key` argument"
        end

        -- block until the writer published a first version, as stock config_xds does
        while not conf_ver:get("version") do
            os.usleep(1000)
        end

        created_obj[key] = obj
        if not seen_version then
            -- the first object: remember where the log was, then load synchronously
            seen_version = conf_ver:get("version")
            position = xds_log.head(config)
        end
        local ok, err = pcall(boot_load, obj)
        if not ok then
            log.error("failed to fetch data from xds ", err, ", ", key)
        end
        commit_obj(obj)
        publish_refused()
        return obj
    end

    if key then
        created_obj[key] = obj
    end
    return obj
end


function _M.get(self, key)
    local values_hash = self.values_hash
    if not values_hash then
        return nil
    end

    local idx = values_hash[tostring(key)]
    if not idx then
        return nil
    end

    return self.values[idx]
end


--- The ids whose items changed after conf_version `since` (a table id -> true), or nil
-- when this object no longer remembers that far back (rebuild from `values`).
function _M.changes_since(self, since)
    local now = self.conf_version
    if since == now then
        return {}
    end
    if type(since) ~= "number" or since > now or now - since > CHANGES_KEPT then
        return nil
    end

    local out = {}
    local changes = self.changes
    for v = since + 1, now do
        local ids = changes[v]
        if not ids then
            return nil
        end
        for i = 1, #ids do
            out[ids[i]] = true
        end
    end
    return out
end


function _M.close(self)
    self.running = false
    if self.key then
        created_obj[self.key] = nil
    end
    clear_tab(self.changes)
end


function _M.fetch_created_obj(key)
    return created_obj[key]
end


--- This thread's CPU seconds (the clock the slices are measured with).
_M.clock = os_clock


--- For tests and benchmarks: apply what the dicts hold now, without yielding.
function _M.sync_now()
    sync(false)
end


function _M.init_worker()
    if process and process.type() == "privileged agent" then
        load_libxds("libxds.so")
    end

    -- every process that creates config objects keeps them current (APISIX's privileged
    -- agent creates them too)
    local ok, err = ngx_timer_every(_M.check_interval, tick)
    if not ok then
        return nil, "failed to create the xds sync timer: " .. err
    end
    return true
end


return _M
