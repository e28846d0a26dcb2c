-- Test stub (no APISIX in CI): what amesh's config_xds needs from apisix.core.config_local.
return {local_conf = function() return {} end}
