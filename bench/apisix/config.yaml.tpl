# APISIX's conf/config.yaml for amesh's APISIX runs (from the kit's ../shared/apisix/config.yaml).
# bench/apisix_run.py renders @EXTRA_LUA_PATH@ and @ROUTER@: for amesh's provider and router,
# extra_lua_path is amesh's Lua root (`amesh paths`: lua_package_path) and the router
# radixtree_host_uri_incremental; for stock APISIX, "" and radixtree_host_uri. APISIX's CLI
# puts extra_lua_path in front of lua_package_path; the runner's nginx.conf does the same.
apisix:
  node_listen: 9080          # informative only: nginx.conf is written by hand (see nginx.conf.tpl)
  extra_lua_path: "@EXTRA_LUA_PATH@"
  enable_admin: false
  enable_control: false
  enable_ipv6: false
  enable_reuseport: false
  ssl:
    enable: false
  router:
    http: @ROUTER@
deployment:
  role: data_plane
  role_data_plane:
    config_provider: xds
nginx_config:
  error_log_level: warn
  http:
    custom_lua_shared_dict:      # APISIX 3.18 declares the xds dicts only when config_center: xds
      xds-config: @DICT_SIZE@   # sizing rule: docs/apisix.md
      xds-config-version: 1m
# only the plugins amesh's translator emits (grep src/amesh_ext/translate)
plugins:
  - fault-injection
  - proxy-rewrite
  - response-rewrite
  - redirect
  - traffic-split
  - proxy-mirror
  - cors
stream_plugins: []
