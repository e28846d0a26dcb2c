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

--- The reader's side of an xds writer's change log and key index in ngx.shared.DICT.
--
-- Keys (written by the writer with every batch, before it bumps `version`):
--   amesh:log:head   "<run>:<seq>" of the newest entry
--   amesh:log:SSS    (SSS = seq % 256, three digits) "<run>:<seq>\n<kind>\n<key>\n<key>..."
--                    kind "delta" lists the data keys the batch set or deleted; "full"
--                    means: reload everything
--   amesh:index:NN   (NN = crc32(key) % 64, two digits) the data keys of that bucket
-- A reader at "<run>:<s>" reads the entries s+1 .. head. Another run, an overwritten slot
-- (more than 256 entries behind) or a "full" entry means a full reload.
--
-- @module core.xds_log

local tonumber          = tonumber
local type              = type
local ipairs            = ipairs
local sub_str           = string.sub
local str_find          = string.find
local str_format        = string.format
local str_byte          = string.byte

local SLASH = str_byte("/")

local _M = {
    HEAD_KEY = "amesh:log:head",
    SLOT_PREFIX = "amesh:log:",
    SLOTS = 256,
    INDEX_PREFIX = "amesh:index:",
    INDEX_BUCKETS = 64,
}


-- "<run>:<seq>" -> run, seq
local function parse_position(pos)
    if type(pos) ~= "string" then
        return nil
    end
    local colon, last = nil, 0
    while true do
        local at = str_find(pos, ":", last + 1, true)
        if not at then
            break
        end
        colon, last = at, at
    end
    if not colon then
        return nil
    end
    return sub_str(pos, 1, colon - 1), tonumber(sub_str(pos, colon + 1))
end
_M.parse_position = parse_position


function _M.head(dict)
    return dict:get(_M.HEAD_KEY)
end


function _M.slot_key(seq)
    return str_format("amesh:log:%03d", seq % _M.SLOTS)
end


-- append the lines of `text` from byte `from` on to `out` (data keys only, once each)
local function add_lines(out, seen, text, from)
    local len = #text
    while from <= len do
        local nl = str_find(text, "\n", from, true) or len + 1
        if nl > from and str_byte(text, from) == SLASH then
            local key = sub_str(text, from, nl - 1)
            if not seen[key] then
                seen[key] = true
                out[#out + 1] = key
            end
        end
        from = nl + 1
    end
end


--- The data keys changed after `position` up to `head`, in the order the batches
-- named them first; nil when the reader must reload everything.
function _M.read(dict, position, head)
    local run, from = parse_position(position)
    local head_run, to = parse_position(head)
    if not run or not from or not to or run ~= head_run or to < from
       or to - from > _M.SLOTS then
        return nil
    end

    local keys, seen = {}, {}
    for seq = from + 1, to do
        local entry = dict:get(_M.slot_key(seq))
        if not entry then
            return nil
        end
        local tag = run .. ":" .. seq
        local nl = str_find(entry, "\n", 1, true)
        if not nl or sub_str(entry, 1, nl - 1) ~= tag then
            return nil                      -- overwritten: fell too far behind
        end
        local nl2 = str_find(entry, "\n", nl + 1, true)
        local kind = sub_str(entry, nl + 1, (nl2 or #entry + 1) - 1)
        if kind ~= "delta" then
            return nil
        end
        if nl2 then
            add_lines(keys, seen, entry, nl2 + 1)
        end
    end
    return keys
end


--- Does the dict carry a key index?
function _M.indexed(dict)
    for b = 0, _M.INDEX_BUCKETS - 1 do
        if dict:get(str_format("amesh:index:%02d", b)) then
            return true
        end
    end
    return false
end


--- The data keys of index bucket `b` (0-based), appended to `out`.
function _M.bucket_keys(dict, b, out)
    local text = dict:get(str_format("amesh:index:%02d", b))
    if text then
        add_lines(out, {}, text, 1)
    end
    return out
end


--- Every data key of a dict without an index (one get_keys(0): not sliced).
function _M.all_keys(dict)
    local out = {}
    for _, key in ipairs(dict:get_keys(0)) do
        if str_byte(key, 1) == SLASH then
            out[#out + 1] = key
        end
    end
    return out
end


return _M
