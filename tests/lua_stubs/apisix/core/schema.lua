-- Test stub: apisix.core.schema.check for schemas of the form {required = {"field", ...}}.
local _M = {}
function _M.check(schema, conf)
    for _, field in ipairs(schema.required or {}) do
        if conf[field] == nil then
            return false, "property \"" .. field .. "\" is required"
        end
    end
    return true
end
return _M
