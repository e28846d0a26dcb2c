# APISIX's conf/config.yaml for the conformance runner: a data plane fed by xDS through
# shared dicts (config_provider xds), the default router, the plugins amesh emits.
apisix:
  node_listen: 9080          # informative: nginx.conf is rendered by the runner
  enable_admin: false
  enable_control: false
  enable_ipv6: false
  ssl:
    enable: false
  router:
    http: radixtree_host_uri
deployment:
  role: data_plane
  role_data_plane:
    config_provider: xds
nginx_config:
  error_log_level: info
plugins:
  - fault-injection
  - proxy-rewrite
  - response-rewrite
  - redirect
  - traffic-split
  - proxy-mirror
  - cors
stream_plugins: []
