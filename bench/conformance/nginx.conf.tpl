# nginx.conf for stock APISIX fed by amesh, rendered by bench/conformance_apisix.py.
# The http part of APISIX's apisix/cli/ngx_tpl.lua as the conformance runner needs it: the
# shared dicts, the proxy location and its phases, @grpc_pass, the mirror locations.
# init_worker starts amesh (stock initial() path or require("amesh")); the control server
# on a loopback port is the runner's own (what the dicts hold and what config_xds loaded).
@LOAD_MODULES@
master_process on;
worker_processes 1;
user root root;
daemon off;
error_log logs/error.log info;
pid logs/nginx.pid;
events { worker_connections 1024; }
worker_shutdown_timeout 3s;

http {
    map $http_host $var_x_forwarded_port {
        default         $server_port;
        "~:(?<p>\d+)$" $p;
    }
    map $http_host $var_x_forwarded_host {
        default $http_host;
        ""      $host;
    }
    lua_package_path  "@LUA_PATH@;;";
    lua_package_cpath "@LUA_CPATH@;;";
    lua_shared_dict internal-status 10m;
    lua_shared_dict upstream-healthcheck 10m;
    lua_shared_dict worker-events 10m;
    lua_shared_dict lrucache-lock 10m;
    lua_shared_dict balancer-ewma 10m;
    lua_shared_dict balancer-ewma-locks 10m;
    lua_shared_dict balancer-ewma-last-touched-at 10m;
    lua_shared_dict etcd-cluster-health-check 10m;
    lua_shared_dict status-report 1m;
    lua_shared_dict xds-config 32m;
    lua_shared_dict xds-config-version 1m;

    underscores_in_headers on;
    real_ip_header X-Real-IP;
    set_real_ip_from 127.0.0.1;
    set_real_ip_from unix:;
    lua_socket_log_errors off;
    resolver 127.0.0.1 ipv6=off;
    lua_http10_buffering off;
    lua_regex_match_limit 100000;
    access_log logs/access.log combined buffer=16384 flush=1;
    client_max_body_size 0;
    variables_hash_max_size 2048;
    server_tokens off;
    include @MIME_TYPES@;

    upstream apisix_backend {
        server 0.0.0.1;
        balancer_by_lua_block { apisix.http_balancer_phase() }
        keepalive 320;
    }

    init_by_lua_block {
        require "resty.core"
        apisix = require("apisix")
        apisix.http_init({ dns_resolver = { "127.0.0.1" } })
        require("apisix.constants").apisix_lua_home = "@APISIX@"
    }

    init_worker_by_lua_block {
@FEED_WORKER@
        apisix.http_init_worker()
    }

    exit_worker_by_lua_block {
@FEED_EXIT@
        apisix.http_exit_worker()
    }

    server {
        listen unix:@PREFIX@/logs/worker_events.sock;
        access_log off;
        location / { content_by_lua_block { require("resty.events.compat").run() } }
    }

    server {
        listen 127.0.0.1:@CONTROL@;
        access_log off;
        location /dump { content_by_lua_block {
            local cjson = require "cjson.safe"
            local d, out = ngx.shared["xds-config"], {}
            for _, k in ipairs(d:get_keys(0)) do out[k] = d:get(k) end
            ngx.say(cjson.encode({version = ngx.shared["xds-config-version"]:get("version"),
                                  keys = out}))
        } }
        location /loaded { content_by_lua_block {
            local cjson = require "cjson.safe"
            local xds = require("apisix.core.config_xds")
            local out = {}
            for _, k in ipairs({"/routes", "/upstreams", "/services", "/ssls", "/plugin_configs",
                                "/global_rules", "/stream_routes", "/consumers",
                                "/plugin_metadata", "/protos", "/secrets"}) do
                local o = xds.fetch_created_obj(k)
                if o then
                    local ids = {}
                    for _, it in ipairs(o.values or {}) do ids[#ids + 1] = it.value.id end
                    out[k] = {conf_version = o.conf_version, ids = ids}
                end
            end
            out.version = ngx.shared["xds-config-version"]:get("version")
            ngx.say(cjson.encode(out))
        } }
    }

    server {
@LISTEN@
        server_name _;
        proxy_ssl_name $upstream_host;
        proxy_ssl_server_name on;

        location / {
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
            set $apisix_upstream_response_time $upstream_response_time;
            set $request_type                'traditional_http';
            set $llm_content_risk_level      '';
            set $request_llm_model           '';
            set $llm_time_to_first_token     '0';
            set $llm_model                   '';
            set $llm_prompt_tokens           '0';
            set $llm_completion_tokens       '0';
            set $llm_total_tokens            '0';
            set $llm_stream                  'false';
            set $llm_has_tool_calls          'false';
            set $llm_tool_count              '0';
            set $llm_end_user_id             '';
            set $llm_cache_read_input_tokens '0';
            set $llm_cache_creation_input_tokens '0';
            set $llm_reasoning_tokens        '0';

            access_by_lua_block { apisix.http_access_phase() }

            proxy_http_version 1.1;
            proxy_set_header   Host              $upstream_host;
            proxy_set_header   Upgrade           $upstream_upgrade;
            proxy_set_header   Connection        $upstream_connection;
            proxy_set_header   X-Real-IP         $remote_addr;
            proxy_pass_header  Date;
            # APISIX's init.lua restores client-sent X-Forwarded-* from these
            set $original_x_forwarded_proto $http_x_forwarded_proto;
            set $original_x_forwarded_host   $http_x_forwarded_host;
            set $original_x_forwarded_port   $http_x_forwarded_port;
            set $original_x_forwarded_for    '';
            set $original_forwarded          $http_forwarded;
            more_set_input_headers "X-Forwarded-Proto: $scheme";
            more_set_input_headers "X-Forwarded-Host: $var_x_forwarded_host";
            more_set_input_headers "X-Forwarded-Port: $var_x_forwarded_port";
            more_set_input_headers "Forwarded: ";
            proxy_set_header   X-Forwarded-For   $proxy_add_x_forwarded_for;
            proxy_pass      $upstream_scheme://apisix_backend$upstream_uri;
            mirror          /proxy_mirror;

            header_filter_by_lua_block { apisix.http_header_filter_phase() }
            body_filter_by_lua_block { apisix.http_body_filter_phase() }
            log_by_lua_block { apisix.http_log_phase() }
        }

        location @grpc_pass {
            access_by_lua_block { apisix.grpc_access_phase() }
            grpc_set_header   "Host" $upstream_host;
            grpc_set_header   Content-Type application/grpc;
            grpc_set_header   TE trailers;
            grpc_socket_keepalive on;
            grpc_pass         $upstream_scheme://apisix_backend;
            mirror           /proxy_mirror_grpc;
            header_filter_by_lua_block { apisix.http_header_filter_phase() }
            body_filter_by_lua_block { apisix.http_body_filter_phase() }
            log_by_lua_block { apisix.http_log_phase() }
        }

        location = /proxy_mirror_grpc {
            internal;
            if ($upstream_mirror_uri = "") { return 200; }
            rewrite ^ $upstream_mirror_grpc_path break;
            grpc_pass $upstream_mirror_host;
        }

        location = /proxy_mirror {
            internal;
            if ($upstream_mirror_uri = "") { return 200; }
            proxy_http_version 1.1;
            proxy_set_header Host $upstream_host;
            proxy_pass $upstream_mirror_uri;
        }
    }
}
