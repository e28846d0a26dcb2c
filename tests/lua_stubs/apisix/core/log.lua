-- Test stub: apisix.core.log's level functions over ngx.log.
local ngx_log = ngx.log
local function at(level) return function(...) ngx_log(level, ...) end end
return {error = at(ngx.ERR), warn = at(ngx.WARN), info = at(ngx.INFO), debug = at(ngx.DEBUG)}
