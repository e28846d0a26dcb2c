-- Test stub: apisix.core.os.usleep.
local ffi = require("ffi")
pcall(ffi.cdef, "int usleep(unsigned int usec);")
return {usleep = function(us) ffi.C.usleep(us) end}
