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

--- radixtree_host_uri's selection, updated in proportion to the change.
--
-- Same semantics as `apisix.http.router.radixtree_host_uri`: one uri router per route host
-- (its routes in `values` order), tried for the request's exact host, then for the
-- wildcard hosts `*X` whose X ends the host, longest X first, then the routes without
-- a host. Where the stock router rebuilds everything whenever the routes' conf_version
-- moves, this one asks the config object which route ids changed
-- (`obj:changes_since(version)`, offered by amesh's config_xds) and rebuilds only the uri
-- routers of the hosts those routes had or have. Hosts whose route lists are identical
-- share one uri router. Without `changes_since`, or when services changed (a route may
-- take its hosts from its service), it rebuilds everything, like the stock router.
--
-- @module http.router.radixtree_host_uri_incremental

local require = require
local router = require("apisix.utils.router")
local core = require("apisix.core")
local event = require("apisix.core.event")
local get_services = require("apisix.http.service").services
local service_fetch = require("apisix.http.service").get
local ipairs = ipairs
local pairs = pairs
local next = next
local type = type
local loadstring = loadstring
local tostring = tostring
local sort_tab = table.sort
local tab_concat = table.concat
local str_byte = string.byte
local sub_str = string.sub

local ASTERISK = str_byte("*")

local _M = {version = 0.1}

-- per worker state, rebuilt by full_build
local built_version        -- user_routes.conf_version the router reflects
local built_services       -- the services' conf_version it reflects
local entries = {}         -- route id -> {route, rt (radixtree route), hosts or false}
local members = {}         -- host -> {route id -> true}
local hostless = {}        -- route id -> true (routes without hosts)
local exact = {}           -- host -> uri router
local wild = {}            -- suffix X of a host "*X" -> uri router
local wild_lens = {}       -- the distinct #X, longest first
local host_sig = {}        -- host -> signature of its router
local shared = {}          -- signature -> {router = r, refs = n}
local only_uri_router
_M.stats = {full_builds = 0, host_rebuilds = 0, routers_built = 0, cpu = 0, max_sync = 0}
local clock = core.config.clock or os.clock


local function radixtree_route(route)
    local value = route.value
    local filter_fun, err
    if value.filter_func then
        filter_fun, err = loadstring("return " .. value.filter_func, "router#" .. value.id)
        if not filter_fun then
            core.log.error("failed to load filter function: ", err, " route id: ", value.id)
            return nil
        end
        filter_fun = filter_fun()
    end

    return {
        id = value.id,
        paths = value.uris or value.uri,
        methods = value.methods,
        priority = value.priority,
        remote_addrs = value.remote_addrs or value.remote_addr,
        vars = value.vars,
        filter_fun = filter_fun,
        handler = function (api_ctx, match_opts)
            api_ctx.matched_params = nil
            api_ctx.matched_route = route
            api_ctx.curr_req_matched = match_opts.matched
            api_ctx.real_curr_req_matched_path = match_opts.matched._path
        end
    }
end


local function route_hosts(route)
    local value = route.value
    local hosts = value.hosts
    if not hosts then
        if value.host then
            hosts = {value.host}
        elseif value.service_id then
            local service = service_fetch(value.service_id)
            if not service then
                core.log.error("failed to fetch service configuration by ",
                               "id: ", value.service_id)
            else
                hosts = service.value.hosts
            end
        end
    end
    return hosts
end


-- the routes of a set of ids, in the order of the config object's values
local function ordered(ids, user_routes)
    local list = {}
    local hash = user_routes.values_hash
    for id in pairs(ids) do
        list[#list + 1] = id
    end
    sort_tab(list, function(a, b)
        return hash[a] < hash[b]
    end)
    return list
end


local function set_wild_lens()
    local lens, seen = {}, {}
    for suffix in pairs(wild) do
        local n = #suffix
        if not seen[n] then
            seen[n] = true
            lens[#lens + 1] = n
        end
    end
    sort_tab(lens, function(a, b) return a > b end)
    wild_lens = lens
end


local function release(sig)
    local s = shared[sig]
    if s then
        s.refs = s.refs - 1
        if s.refs <= 0 then
            shared[sig] = nil
        end
    end
end


-- (re)build the uri router of one host from its member routes; returns true when the
-- set of wildcard suffixes changed
local function rebuild_host(host, user_routes)
    _M.stats.host_rebuilds = _M.stats.host_rebuilds + 1
    local is_wild = str_byte(host, 1) == ASTERISK
    local slot = is_wild and sub_str(host, 2) or host
    local tab = is_wild and wild or exact
    local ids = members[host]

    local old_sig = host_sig[host]
    if not ids or not next(ids) then
        members[host] = nil
        host_sig[host] = nil
        tab[slot] = nil
        if old_sig then
            release(old_sig)
        end
        return is_wild
    end

    local list = ordered(ids, user_routes)
    local parts = {}
    for i, id in ipairs(list) do
        parts[i] = id .. "#" .. tostring(entries[id].route.modifiedIndex)
    end
    local sig = tab_concat(parts, "\0")
    if sig == old_sig then
        return false
    end

    local s = shared[sig]
    if not s then
        local rts = {}
        for i, id in ipairs(list) do
            rts[i] = entries[id].rt
        end
        s = {router = router.new(rts), refs = 0}
        shared[sig] = s
        _M.stats.routers_built = _M.stats.routers_built + 1
    end
    s.refs = s.refs + 1
    if old_sig then
        release(old_sig)
    end
    host_sig[host] = sig
    local had = tab[slot] ~= nil
    tab[slot] = s.router
    return is_wild and not had
end


local function rebuild_hostless(user_routes)
    local rts = {}
    for i, id in ipairs(ordered(hostless, user_routes)) do
        rts[i] = entries[id].rt
    end
    only_uri_router = router.new(rts)
end


-- forget a route; marks the hosts it had
local function remove_entry(id, dirty)
    local e = entries[id]
    if not e then
        return false
    end
    entries[id] = nil
    if e.hosts then
        for _, host in ipairs(e.hosts) do
            local m = members[host]
            if m then
                m[id] = nil
            end
            dirty[host] = true
        end
        return false
    end
    hostless[id] = nil
    return true
end


-- add a route (as the config object holds it now); marks the hosts it has
local function add_entry(route, dirty)
    if type(route) ~= "table" then
        return false
    end
    local status = core.table.try_read_attr(route, "value", "status")
    if status and status ~= 1 then
        return false
    end

    local rt = radixtree_route(route)
    if not rt then
        return false
    end
    local id = route.value.id
    local hosts = route_hosts(route)
    local e = {route = route, rt = rt, hosts = hosts or false}
    entries[id] = e

    if not hosts then
        hostless[id] = true
        return true
    end
    for _, host in ipairs(hosts) do
        local m = members[host]
        if not m then
            m = {}
            members[host] = m
        end
        m[id] = true
        dirty[host] = true
    end
    return false
end


local function full_build(user_routes)
    _M.stats.full_builds = _M.stats.full_builds + 1
    entries, members, hostless = {}, {}, {}
    exact, wild, host_sig, shared = {}, {}, {}, {}

    local dirty = {}
    local routes = user_routes.values or {}
    for _, route in ipairs(routes) do
        add_entry(route, dirty)
    end
    for host in pairs(dirty) do
        rebuild_host(host, user_routes)
    end
    set_wild_lens()
    rebuild_hostless(user_routes)
    event.push(event.CONST.BUILD_ROUTER, routes)
end


local function apply_changes(user_routes, ids)
    local dirty, hostless_dirty = {}, false
    for id in pairs(ids) do
        if remove_entry(id, dirty) then
            hostless_dirty = true
        end
        if add_entry(user_routes:get(id), dirty) then
            hostless_dirty = true
        end
    end

    local wild_changed = false
    for host in pairs(dirty) do
        if rebuild_host(host, user_routes) then
            wild_changed = true
        end
    end
    if wild_changed then
        set_wild_lens()
    end
    if hostless_dirty then
        rebuild_hostless(user_routes)
    end
end


--- Bring the router up to date with the config object (cheap when nothing changed).
function _M.sync(user_routes)
    user_routes = user_routes or _M.user_routes
    local _, service_version = get_services()
    local version = user_routes.conf_version
    if built_version == version and built_services == service_version
       and only_uri_router then
        return
    end

    local t0 = clock()
    local ids = built_services == service_version and only_uri_router
                and user_routes.changes_since and user_routes:changes_since(built_version)
    if ids then
        apply_changes(user_routes, ids)
    else
        full_build(user_routes)
    end
    built_version = version
    built_services = service_version

    local used = clock() - t0
    local stats = _M.stats
    stats.cpu = stats.cpu + used
    if used > stats.max_sync then
        stats.max_sync = used
    end
end


function _M.match(api_ctx)
    _M.sync(_M.user_routes)
    return _M.matching(api_ctx)
end


local function try(r, api_ctx, match_opts, host)
    if not r:dispatch(api_ctx.var.uri, match_opts, api_ctx, match_opts) then
        return false
    end
    if api_ctx.real_curr_req_matched_path then
        api_ctx.curr_req_matched._path = api_ctx.real_curr_req_matched_path
        api_ctx.real_curr_req_matched_path = nil
    end
    api_ctx.curr_req_matched._host = host
    return true
end


function _M.matching(api_ctx)
    core.log.info("route match mode: radixtree_host_uri_incremental")

    local match_opts = core.tablepool.fetch("route_match_opts", 0, 16)
    match_opts.method = api_ctx.var.request_method
    match_opts.remote_addr = api_ctx.var.remote_addr
    match_opts.vars = api_ctx.var
    match_opts.host = api_ctx.var.host
    match_opts.matched = core.tablepool.fetch("matched_route_record", 0, 4)

    local host = api_ctx.var.host
    if host then
        local r = exact[host]
        if r and try(r, api_ctx, match_opts, host) then
            core.tablepool.release("route_match_opts", match_opts)
            return true
        end

        local n = #host
        for _, len in ipairs(wild_lens) do
            if len <= n then
                local suffix = len == 0 and "" or sub_str(host, n - len + 1)
                r = wild[suffix]
                if r and try(r, api_ctx, match_opts, "*" .. suffix) then
                    core.tablepool.release("route_match_opts", match_opts)
                    return true
                end
            end
        end
    end

    local ok = only_uri_router:dispatch(api_ctx.var.uri, match_opts, api_ctx, match_opts)
    core.tablepool.release("route_match_opts", match_opts)
    return ok
end


return _M
