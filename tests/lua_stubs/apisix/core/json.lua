-- Test stub: apisix.core.json's decode/encode (cjson.safe).
local cjson = require("cjson.safe")
return {decode = cjson.decode, encode = cjson.encode}
