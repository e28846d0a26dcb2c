# The APISIX kit's nginx.conf (../shared/apisix/nginx.conf.tpl, itself modeled on APISIX's
# apisix/cli/ngx_tpl.lua, http part), copied for amesh's APISIX benchmarks and runners
# (bench/apisix_run.py renders it). Differences from the kit's: the nginx prefix @PREFIX@ is
# separate from the APISIX tree @WORK@ (several runs can share one APISIX install);
# @EXTRA_LUA_PATH@ is what config.yaml's apisix.extra_lua_path gives APISIX's CLI (amesh's
# Lua root: its config_xds and router) plus the kit's multi-worker shim; a `bench` dict, a
# 5 ms timer-lag probe per worker, an X-Pid response header naming the answering worker,
# two probe backends (@BACKEND_A@, @BACKEND_B@) and control endpoints (@CONTROL@).
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
load_module /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so;
master_process on;
worker_processes @WORKERS@;
user root root;
daemon off;
error_log logs/error.log @LOG_LEVEL@;
pid logs/nginx.pid;
events { accept_mutex off; worker_connections 1024; }
worker_shutdown_timeout 5s;
env APISIX_PROFILE;

http {
    map $http_host $var_x_forwarded_port {
        default         $server_port;
        "~:(?<p>\d+)$" $p;
    }
    map $http_host $var_x_forwarded_host {
        default $http_host;
        ""      $host;
    }
    # APISIX tree first, then its Lua deps, then shims, then Debian's resty.core/lrucache/cjson...
    lua_package_path  "@EXTRA_LUA_PATH@@WORK@/?.lua;@WORK@/?/init.lua;@WORK@/deps/lua/?.lua;@WORK@/deps/lua/?/init.lua;@WORK@/shim/?.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";
    lua_package_cpath "@XDS_DIR@/?.so;@WORK@/deps/lib/?.so;/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;";

    lua_max_pending_timers 16384;
    lua_max_running_timers 4096;
    lua_shared_dict internal-status 10m;
    lua_shared_dict upstream-healthcheck 10m;
    lua_shared_dict worker-events 10m;
    lua_shared_dict lrucache-lock 10m;
    lua_shared_dict balancer-ewma 10m;
    lua_shared_dict balancer-ewma-locks 10m;
    lua_shared_dict balancer-ewma-last-touched-at 10m;
    lua_shared_dict etcd-cluster-health-check 10m;
    lua_shared_dict status-report 1m;
    lua_shared_dict xds-config  @DICT_SIZE@;
    lua_shared_dict xds-config-version  1m;
    lua_shared_dict bench 1m;

    # http defaults from apisix/cli/config.lua (nginx_config.http), as ngx_tpl.lua renders them
    underscores_in_headers on;
    real_ip_header X-Real-IP;
    real_ip_recursive off;
    set_real_ip_from 127.0.0.1;
    set_real_ip_from unix:;
    keepalive_timeout 60s;
    client_header_timeout 60s;
    client_body_timeout 60s;
    send_timeout 10s;
    open_file_cache max=1000 inactive=60;
    lua_ssl_verify_depth 5;
    lua_socket_log_errors off;
    resolver 127.0.0.1 ipv6=off;
    resolver_timeout 5;
    lua_http10_buffering off;
    lua_regex_match_limit 100000;
    lua_regex_cache_max_entries 8192;
    log_format main escape=default '$remote_addr - [$time_local] $http_host "$request" $status $body_bytes_sent $request_time "$upstream_addr" $upstream_status';
    access_log off;
    client_max_body_size 0;
    variables_hash_max_size 2048;
    server_tokens off;
    include mime.types;
    charset utf-8;

    upstream apisix_backend {
        server 0.0.0.1;
        balancer_by_lua_block {
            apisix.http_balancer_phase()
        }
        keepalive 320;
        keepalive_requests 1000;
        keepalive_timeout 60s;
    }

    init_by_lua_block {
        require "resty.core"
        apisix = require("apisix")
        apisix.http_init({ dns_resolver = { "127.0.0.1" } })
        require("apisix.constants").apisix_lua_home = "@WORK@"
    }

    init_worker_by_lua_block {
        -- SHIM (README "Shims" #1): Debian nginx has no privileged agent, so APISIX's
        -- config_xds.init_worker() never calls libxds.so's initial(). Do exactly what
        -- config_xds.load_libxds() does, once, in worker 0, before APISIX's own init_worker
        -- (whose config_xds.new() blocks until a version appears).
        -- (the writer is libxds, or none when the runner writes the dicts itself)
        if ngx.worker.id() == 0 and "@WRITER@" == "libxds" then
            local ffi = require "ffi"
            pcall(ffi.cdef, [[ void *ngx_http_lua_ffi_shdict_udata_to_zone(void *zone_udata);
                              void initial(void *config_zone, void *version_zone); ]])
            local lib = ffi.load("@XDS_DIR@/libxds.so")
            local C = ffi.C
            lib.initial(ffi.cast("void*", C.ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared["xds-config"][1])),
                        ffi.cast("void*", C.ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared["xds-config-version"][1])))
        end
        if "@WRITER@" == "none" then
            ngx.shared["xds-config-version"]:add("version", "0000000000001")
        end
        apisix.http_init_worker()

        -- bench only: the largest lag of a 5 ms timer since the last /lag?reset, and when
        -- this worker's timer first saw each new `version` (wall clock)
        local bench, pid, expect, seen = ngx.shared.bench, ngx.worker.pid(), nil, nil
        local versions = ngx.shared["xds-config-version"]
        ngx.timer.every(0.005, function(premature)
            if premature then return end
            ngx.update_time()
            local now = ngx.now()
            local v = versions:get("version")
            if v ~= seen then
                seen = v
                bench:set("bump:" .. pid, now)
            end
            -- amesh's provider and router account their own CPU (this thread's clock)
            local p = package.loaded["apisix.core.config_xds"]
            local r = package.loaded["apisix.http.router.radixtree_host_uri_incremental"]
            if p and p.stats and p.stats.cpu then
                if bench:get("reset:" .. pid) then
                    bench:delete("reset:" .. pid)
                    p.stats.max_slice = 0
                    if r then r.stats.max_sync = 0 end
                end
                bench:set("pcpu:" .. pid, p.stats.cpu + (r and r.stats.cpu or 0))
                bench:set("pslice:" .. pid, math.max(p.stats.max_slice,
                                                     r and r.stats.max_sync or 0))
            end
            if expect then
                local lag = now - expect
                if lag > (bench:get("lag:" .. pid) or 0) then bench:set("lag:" .. pid, lag) end
            end
            expect = now + 0.005
        end)
    }

    exit_worker_by_lua_block {
        apisix.http_exit_worker()
    }

    # the server block for lua-resty-events (as in ngx_tpl.lua)
    server {
        listen unix:@PREFIX@/logs/worker_events.sock;
        access_log off;
        location / {
            content_by_lua_block {
                require("resty.events.compat").run()
            }
        }
    }

    # harness only (not APISIX): dump the xds dicts as APISIX sees them
    server {
        listen 127.0.0.1:@CONTROL@;
        access_log off;
        location = /version { content_by_lua_block {
            ngx.say(ngx.shared["xds-config-version"]:get("version") or "")
        } }
        location = /dict { content_by_lua_block {
            local d = ngx.shared["xds-config"]
            local keys = d:get_keys(0)
            ngx.say(require("cjson.safe").encode({capacity = d:capacity(),
                free = d:free_space(), keys = #keys}))
        } }
        location = /lag { content_by_lua_block {
            local bench, out = ngx.shared.bench, {}
            for _, k in ipairs(bench:get_keys(0)) do
                if k:sub(1, 4) == "lag:" then
                    out[k:sub(5)] = bench:get(k)
                    if ngx.var.arg_reset then
                        bench:set(k, 0)
                        bench:set("reset:" .. k:sub(5), true)
                    end
                elseif k:sub(1, 5) == "bump:" or k:sub(1, 5) == "pcpu:" then
                    out[k] = bench:get(k)
                elseif k:sub(1, 7) == "pslice:" then
                    out[k] = bench:get(k)
                end
            end
            ngx.say(require("cjson.safe").encode(out))
        } }
        location = /write {
            # the runner as the writer (writer none): [[dict, key, value or null], ...]
            client_body_buffer_size 16m;
            client_max_body_size 16m;
            content_by_lua_block {
                ngx.req.read_body()
                local ops = require("cjson.safe").decode(ngx.req.get_body_data())
                for _, op in ipairs(ops) do
                    local dict = ngx.shared[op[1]]
                    if op[3] == ngx.null then dict:delete(op[2])
                    else assert(dict:safe_set(op[2], op[3])) end
                end
                ngx.say("ok")
            }
        }
        location = /routes { content_by_lua_block {
            -- what this worker's /routes object holds: conf_version, id -> desc
            local o = require("apisix.core.config_xds").fetch_created_obj("/routes")
            local ids = {}
            for _, it in ipairs(o and o.values or {}) do
                if it then ids[it.value.id] = it.value.desc or "" end
            end
            ngx.say(require("cjson.safe").encode({conf_version = o and o.conf_version, ids = ids}))
        } }
        location = /router_check {
            # route selection of the stock radixtree_host_uri and amesh's incremental router
            # over the same config object, for a list of requests
            client_body_buffer_size 16m;
            client_max_body_size 16m;
            content_by_lua_block {
                local cjson = require("cjson.safe")
                ngx.req.read_body()
                local reqs = cjson.decode(ngx.req.get_body_data())
                local routes = require("apisix.core.config_xds").fetch_created_obj("/routes")
                local routers = {
                    stock = require("apisix.http.router.radixtree_host_uri"),
                    incremental = require("apisix.http.router.radixtree_host_uri_incremental"),
                }
                local out = {}
                for i, r in ipairs(reqs) do
                    local res = {}
                    for name, rt in pairs(routers) do
                        rt.user_routes = routes
                        local var = {host = r.host, uri = r.uri, request_method = r.method,
                                     remote_addr = "127.0.0.1"}
                        for k, v in pairs(r.headers or {}) do var["http_" .. k] = v end
                        local ctx = {var = var}
                        local ok = rt.match(ctx)
                        local m = ctx.curr_req_matched or {}
                        res[name] = ok and {ctx.matched_route.value.id, m._host or "", m._path or ""}
                                    or false
                    end
                    out[i] = res
                end
                ngx.say(cjson.encode(out))
            }
        }
        location = /provider_stats { content_by_lua_block {
            ngx.say(require("cjson.safe").encode(require("apisix.core.config_xds").stats or {}))
        } }
        location = /router_stats { content_by_lua_block {
            ngx.say(require("cjson.safe").encode(
                require("apisix.http.router.radixtree_host_uri_incremental").stats))
        } }
        location = /refused { content_by_lua_block {
            local d, out = ngx.shared["xds-config-version"], {}
            for _, k in ipairs(d:get_keys(0)) do
                if k:sub(1, 14) == "amesh:refused:" then out[k] = d:get(k) end
            end
            ngx.say(require("cjson.safe").encode(out))
        } }
    }

    # bench only: the endpoints probe upstreams point at
    server { listen @BACKEND_A@; access_log off; location / { return 200 "A"; } }
    server { listen @BACKEND_B@; access_log off; location / { return 200 "B"; } }

    server {
        @LISTEN_LINES@
        server_name _;

        set $opentelemetry_context_traceparent          '';
        set $opentelemetry_trace_id                     '';
        set $opentelemetry_span_id                      '';
        set $rate_limiting_info '';

        # apisix.http.proxy_ssl_server_name defaults to true
        proxy_ssl_name $upstream_host;
        proxy_ssl_server_name on;

        location / {
            add_header X-Pid $pid always;
            set $upstream_mirror_host        '';
            set $upstream_mirror_uri         '';
            set $upstream_mirror_grpc_path   '';
            set $upstream_upgrade            '';
            set $upstream_connection         '';
            set $upstream_scheme             'http';
            set $upstream_host               $http_host;
            set $upstream_unresolved_host    '';
            set $upstream_uri                '';
            set $request_line                '';
            set $ctx_ref                     '';
            set $llm_content_risk_level         '';
            set $apisix_upstream_response_time  $upstream_response_time;
            set $request_type               'traditional_http';
            set $request_llm_model              '';
            set $llm_time_to_first_token        '0';
            set $llm_model                      '';
            set $llm_prompt_tokens              '0';
            set $llm_completion_tokens          '0';
            set $llm_total_tokens               '0';
            set $llm_stream                     'false';
            set $llm_has_tool_calls             'false';
            set $llm_tool_count                 '0';
            set $llm_end_user_id                '';
            set $llm_cache_read_input_tokens    '0';
            set $llm_cache_creation_input_tokens '0';
            set $llm_reasoning_tokens           '0';

            access_by_lua_block {
                apisix.http_access_phase()
            }

            proxy_http_version 1.1;
            proxy_set_header   Host              $upstream_host;
            proxy_set_header   Upgrade           $upstream_upgrade;
            proxy_set_header   Connection        $upstream_connection;
            proxy_set_header   X-Real-IP         $remote_addr;
            proxy_pass_header  Date;
            set $original_x_forwarded_proto $http_x_forwarded_proto;
            set $original_x_forwarded_host   $http_x_forwarded_host;
            set $original_x_forwarded_port   $http_x_forwarded_port;
            set $original_x_forwarded_for    '';
            set $original_forwarded          $http_forwarded;
            more_set_input_headers "X-Forwarded-Proto: $scheme";
            more_set_input_headers "X-Forwarded-Host: $var_x_forwarded_host";
            more_set_input_headers "X-Forwarded-Port: $var_x_forwarded_port";
            more_set_input_headers "Forwarded: ";
            proxy_set_header   X-Forwarded-For      $proxy_add_x_forwarded_for;

            proxy_pass      $upstream_scheme://apisix_backend$upstream_uri;
            mirror          /proxy_mirror;

            header_filter_by_lua_block {
                apisix.http_header_filter_phase()
            }
            body_filter_by_lua_block {
                apisix.http_body_filter_phase()
            }
            log_by_lua_block {
                apisix.http_log_phase()
            }
        }

        # as in ngx_tpl.lua (the non-apisix-runtime branch): upstreams with scheme grpc/grpcs
        location @grpc_pass {
            access_by_lua_block {
                apisix.grpc_access_phase()
            }
            grpc_set_header   "Host" $upstream_host;
            grpc_set_header   Content-Type application/grpc;
            grpc_set_header   TE trailers;
            grpc_socket_keepalive on;
            grpc_pass         $upstream_scheme://apisix_backend;
            mirror           /proxy_mirror_grpc;
            header_filter_by_lua_block {
                apisix.http_header_filter_phase()
            }
            body_filter_by_lua_block {
                apisix.http_body_filter_phase()
            }
            log_by_lua_block {
                apisix.http_log_phase()
            }
        }

        location = /proxy_mirror_grpc {
            internal;
            if ($upstream_mirror_uri = "") {
                return 200;
            }
            rewrite ^ $upstream_mirror_grpc_path break;
            grpc_pass $upstream_mirror_host;
        }

        location = /proxy_mirror {
            internal;
            if ($upstream_mirror_uri = "") {
                return 200;
            }
            proxy_http_version 1.1;
            proxy_set_header Host $upstream_host;
            proxy_pass $upstream_mirror_uri;
        }
    }
}
