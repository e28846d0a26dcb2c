"""amesh's APISIX config provider (lua/apisix/core/config_xds.lua) in a real nginx, no APISIX.

APISIX's own modules the provider uses (config_local, log, json, os, schema) are small stubs
(tests/lua_stubs/); everything else is the module APISIX would load. The test is the
writer: it stores keys, the key index, change-log entries and version bumps in the
order docs/dict-protocol.md gives, and each worker reports what its config objects hold
(a timer in the test config), so every assertion waits for an observed state.
The provider's behaviour inside real APISIX is measured by bench/bench_apisix_incremental.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from amesh_ext.protocol import (
    KEY_LOG_HEAD,
    bucket_of,
    index_key,
    index_value,
    log_entry,
    log_slot_key,
)
from nginx import Nginx

STUBS = Path(__file__).resolve().parent / "lua_stubs"

USER = "nobody nogroup" if os.geteuid() == 0 else None  # workers as nobody, like APISIX


def _init(stubs: Path) -> str:
    return f'package.path = "{stubs}/?.lua;" .. package.path'

INIT_WORKER = r"""
    local versions = ngx.shared["xds-config-version"]
    versions:add("version", "0000000000001")
    local cjson = require("cjson.safe")
    local xds = require("apisix.core.config_xds")
    xds.check_interval = 0.002
    local filtered = 0
    local routes = xds.new("/routes", {automatic = true, item_schema = {required = {"uri"}},
                                       filter = function() filtered = filtered + 1 end})
    local upstreams = xds.new("/upstreams", {automatic = true,
                                             checker = function(conf)
                                                 if conf.nodes == "bad" then
                                                     return false, "bad nodes"
                                                 end
                                                 return true
                                             end})
    assert(xds.init_worker())

    local seen, id = ngx.shared["amesh-test"], ngx.worker.id()
    local last_cv = routes.conf_version
    local function describe(obj)
        local items = {}
        for _, item in ipairs(obj.values) do
            if item then
                items[item.value.id] = {mi = item.modifiedIndex, value = item.value}
            end
        end
        return {conf_version = obj.conf_version, items = items}
    end
    ngx.timer.every(0.002, function()
        local changed = nil
        if routes.conf_version ~= last_cv then
            changed = routes:changes_since(last_cv)
            last_cv = routes.conf_version
        end
        local old = cjson.decode(seen:get("state:" .. id) or "{}") or {}
        local route_changes = old.route_changes or {}
        if changed then
            local ids = {}
            for k in pairs(changed) do ids[#ids + 1] = k end
            table.sort(ids)
            route_changes[#route_changes + 1] = ids
        end
        seen:set("state:" .. id, cjson.encode({
            pid = ngx.worker.pid(),
            version = versions:get("version"),
            routes = describe(routes), upstreams = describe(upstreams),
            route_changes = route_changes, filtered = filtered,
            stats = xds.stats,
            refused = versions:get("amesh:refused:" .. id),
        }))
    end)
"""

WRITE = r"""
        location = /write {
            client_body_buffer_size 8m;
            client_max_body_size 8m;
            content_by_lua_block {
                -- the test's writer: [[dict, key, value or null], ...] stored in order
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
"""


class Writer:
    """Batches as the agent lays them out, written through /write."""

    def __init__(self, nginx: Nginx, run: str = "run1") -> None:
        self.nginx = nginx
        self.run = run
        self.seq = 0
        self.keys: set[str] = set()
        self.version = 1

    def post(self, ops: list[list[Any]]) -> None:
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.nginx.port}/write",
                                     data=json.dumps(ops).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.read().strip() == b"ok"

    def batch(self, sets: dict[str, Any], deletes: list[str] = (), *, log: str = "delta",
              bump: bool = True) -> None:
        ops: list[list[Any]] = []
        touched = {bucket_of(k) for k in [*sets, *deletes]}
        after = (self.keys | set(sets)) - set(deletes)
        for b in sorted(touched):   # pre-images: what is there and what will be
            ops.append(["xds-config", index_key(b), index_value(
                k for k in self.keys | after if bucket_of(k) == b).decode()])
        for k, v in sets.items():
            ops.append(["xds-config", k, v if isinstance(v, str) else json.dumps(v)])
        for k in deletes:
            ops.append(["xds-config", k, None])
        for b in sorted(touched):
            ops.append(["xds-config", index_key(b),
                        index_value(k for k in after if bucket_of(k) == b).decode()])
        self.keys = after
        if log != "none":
            self.seq += 1
            entry = log_entry(self.run, self.seq, None if log == "full" else
                              [*sets, *deletes]).decode()
            ops.append(["xds-config", log_slot_key(self.seq), entry])
            ops.append(["xds-config", KEY_LOG_HEAD, f"{self.run}:{self.seq}"])
        if bump:
            self.version += 1
            ops.append(["xds-config-version", "version", f"{self.version:013d}"])
        self.post(ops)


def states(nginx: Nginx) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in nginx.seen().items() if k.startswith("state:")}


def wait_all(nginx: Nginx, pred: Any, what: str) -> dict[str, Any]:
    def check() -> Any:
        s = states(nginx)
        return len(s) == 2 and all(pred(v) for v in s.values()) and s
    try:
        return nginx.wait_for(check, 10, what)
    except AssertionError:
        print(json.dumps(states(nginx), indent=1)[:3000])
        raise


CJSON = "/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so"


@pytest.fixture
def nginx(tmp_path: Path):
    if not Path(CJSON).exists():
        raise RuntimeError(f"{CJSON} is missing (APISIX's JSON): apt-get install lua-cjson")
    # The stubs are read by the workers (nobody): a copy in the prefix they can traverse.
    stubs = shutil.copytree(STUBS, tmp_path / "lua_stubs")
    n = Nginx(tmp_path / "nginx", init=_init(stubs), init_worker=INIT_WORKER, exit_worker="",
              extra_locations=WRITE, user=USER).start()
    yield n
    n.stop()


def route(rid: str, uri: str = "/", up: str = "u1") -> dict[str, Any]:
    return {"id": rid, "uri": uri, "upstream_id": up}


def upstream(uid: str, node: str = "10.0.0.1:80") -> dict[str, Any]:
    return {"id": uid, "nodes": {node: 1}, "type": "roundrobin"}


def test_only_changed_keys_apply_and_conf_version_moves_per_object(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1"), "/routes/r1": route("r1"),
             "/routes/r2": route("r2", "/b")})
    s = wait_all(nginx, lambda v: set(v["routes"]["items"]) == {"r1", "r2"}
                 and "u1" in v["upstreams"]["items"], "the first batch in both workers")
    before = {k: (v["routes"]["conf_version"], v["routes"]["items"]["r1"]["mi"],
                  v["routes"]["items"]["r2"]["mi"], v["upstreams"]["conf_version"])
              for k, v in s.items()}
    # the workers booted before the writer's first entry: that batch is a full reload
    reloads = {k: v["stats"]["full_reloads"] for k, v in s.items()}

    # an endpoint change: only /upstreams moves
    w.batch({"/upstreams/u1": upstream("u1", "10.0.0.2:80")})
    s = wait_all(nginx, lambda v: "10.0.0.2:80" in v["upstreams"]["items"]["u1"]["value"]
                 ["nodes"], "the endpoint change")
    for k, v in s.items():
        rcv, r1mi, r2mi, ucv = before[k]
        assert v["routes"]["conf_version"] == rcv
        assert v["upstreams"]["conf_version"] == ucv + 1

    # one route changed: routes move once, only r2's modifiedIndex, changes_since names r2
    w.batch({"/routes/r2": route("r2", "/c")})
    s = wait_all(nginx, lambda v: v["routes"]["items"]["r2"]["value"]["uri"] == "/c",
                 "the route change")
    for k, v in s.items():
        rcv, r1mi, r2mi, _ = before[k]
        assert v["routes"]["conf_version"] == rcv + 1
        assert v["routes"]["items"]["r1"]["mi"] == r1mi
        assert v["routes"]["items"]["r2"]["mi"] != r2mi
        assert v["route_changes"][-1] == ["r2"]
        assert v["stats"]["full_reloads"] == reloads[k]

    # a delete
    w.batch({}, ["/routes/r1"])
    wait_all(nginx, lambda v: set(v["routes"]["items"]) == {"r2"}
             and v["route_changes"][-1] == ["r1"], "the delete")


def test_refused_item_is_skipped_alone_and_reported(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1"), "/routes/r1": route("r1", "/a")})
    wait_all(nginx, lambda v: "r1" in v["routes"]["items"], "the first batch")

    bad = {"id": "r1", "upstream_id": "u1"}          # no uri: the schema refuses it
    w.batch({"/routes/r1": bad, "/routes/r2": route("r2", "/b"),
             "/upstreams/u2": {"id": "u2", "nodes": "bad"}})
    s = wait_all(nginx, lambda v: "r2" in v["routes"]["items"] and v.get("refused"),
                 "the batch with refused items")
    for v in s.values():
        assert v["routes"]["items"]["r1"]["value"]["uri"] == "/a"   # the last good one serves
        assert "u2" not in v["upstreams"]["items"]
        refused = json.loads(v["refused"])
        assert refused["count"] == 2
        assert {r["key"] for r in refused["refused"]} == {"/routes/r1", "/upstreams/u2"}
        assert "uri" in next(r["error"] for r in refused["refused"] if r["key"] == "/routes/r1")
    assert 'failed to check the conf of [/routes/r1]' in nginx.log_text()

    w.batch({"/routes/r1": route("r1", "/fixed")}, ["/upstreams/u2"])
    wait_all(nginx, lambda v: v["routes"]["items"]["r1"]["value"]["uri"] == "/fixed"
             and not v.get("refused"), "the fix clears the report")


def test_full_reload_when_log_is_from_another_run_or_left_behind(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1"), "/routes/r1": route("r1"),
             "/routes/r2": route("r2", "/b")})
    s = wait_all(nginx, lambda v: set(v["routes"]["items"]) == {"r1", "r2"}, "first batch")
    mi = {k: v["routes"]["items"]["r1"]["mi"] for k, v in s.items()}

    # a new writer run: a FULL batch that drops r2 and changes nothing else
    w2 = Writer(nginx, run="run2")
    w2.keys, w2.version = set(w.keys), w.version
    w2.batch({"/routes/r1": route("r1"), "/upstreams/u1": upstream("u1")}, ["/routes/r2"],
             log="full")
    s = wait_all(nginx, lambda v: set(v["routes"]["items"]) == {"r1"}, "the full batch")
    for k, v in s.items():
        assert v["stats"]["full_reloads"] >= 1
        assert v["routes"]["items"]["r1"]["mi"] == mi[k]  # unchanged value: not re-applied

    # more than 256 batches before the version moves: the slots were overwritten
    for i in range(300):
        w2.batch({f"/routes/x{i}": route(f"x{i}", f"/x{i}")}, bump=False)
    w2.batch({"/routes/last": route("last", "/last")})
    s = wait_all(nginx, lambda v: len(v["routes"]["items"]) == 302, "the catch-up")
    for v in s.values():
        assert v["stats"]["full_reloads"] >= 2

    # a writer without a change log at all (stock libxds): version bumps mean full reloads
    w2.batch({"/routes/nolog": route("nolog", "/n")}, log="none")
    wait_all(nginx, lambda v: "nolog" in v["routes"]["items"], "a bump without a log entry")


def test_a_large_batch_is_applied_in_slices(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1")})
    wait_all(nginx, lambda v: "u1" in v["upstreams"]["items"], "first batch")
    sets = {f"/routes/r{i}": route(f"r{i}", f"/p{i}") for i in range(3000)}
    w.batch(sets)
    reloads = {k: v["stats"]["full_reloads"] for k, v in states(nginx).items()}
    s = wait_all(nginx, lambda v: len(v["routes"]["items"]) == 3000, "3000 routes")
    for k, v in s.items():
        # each slice stops after the 2 ms budget (CPU time), plus the item in hand
        assert v["stats"]["max_slice"] < 0.008, v["stats"]
        assert v["stats"]["full_reloads"] == reloads[k]
        # conf_version moved once per slice, not once per item
        assert len(v["route_changes"]) < 3000
        assert sum(len(c) for c in v["route_changes"]) == 3000


def test_many_deletes_compact_the_values_and_keep_ids_consistent(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1"),
             **{f"/routes/r{i}": route(f"r{i}", f"/p{i}") for i in range(400)}})
    wait_all(nginx, lambda v: len(v["routes"]["items"]) == 400, "400 routes")
    w.batch({}, [f"/routes/r{i}" for i in range(0, 400, 2)])      # 200 tombstones
    wait_all(nginx, lambda v: len(v["routes"]["items"]) == 200, "200 deleted")
    w.batch({"/routes/r1": route("r1", "/changed"), "/routes/new": route("new", "/new")})
    s = wait_all(nginx, lambda v: v["routes"]["items"]["r1"]["value"]["uri"] == "/changed"
                 and "new" in v["routes"]["items"], "changes after the compaction")
    for v in s.values():
        assert set(v["routes"]["items"]) == {f"r{i}" for i in range(1, 400, 2)} | {"new"}
    assert "failed to sync" not in nginx.log_text()


def test_a_reload_boots_from_the_dict_and_follows_the_log(nginx: Nginx) -> None:
    w = Writer(nginx)
    w.batch({"/upstreams/u1": upstream("u1"), "/routes/r1": route("r1"),
             "/routes/r2": route("r2", "/b")})
    s = wait_all(nginx, lambda v: set(v["routes"]["items"]) == {"r1", "r2"}, "first batch")
    old_pids = {v["pid"] for v in s.values()}

    nginx.reload()          # the dicts survive; new workers load them at boot
    s = wait_all(nginx, lambda v: v["pid"] not in old_pids
                 and set(v["routes"]["items"]) == {"r1", "r2"}, "the new workers' boot load")
    for v in s.values():
        assert v["stats"]["full_reloads"] == 0

    # the boot remembered the log's head: the next batch is applied as a delta
    w.batch({"/routes/r3": route("r3", "/c")})
    s = wait_all(nginx, lambda v: v["pid"] not in old_pids and "r3" in v["routes"]["items"],
                 "a batch after the reload")
    for v in s.values():
        assert v["stats"]["full_reloads"] == 0
        assert v["route_changes"][-1] == ["r3"]


def test_reader_constants_agree_with_the_protocol() -> None:
    """lua/apisix/core/xds_log.lua carries the dict protocol's keys (docs/dict-protocol.md)
    without depending on amesh: they must stay what amesh_ext.protocol (amesh.h) says."""
    import re

    from amesh_ext import protocol
    text = (Path(__file__).resolve().parent.parent / "lua/apisix/core/xds_log.lua").read_text()

    def const(name: str) -> str:
        m = re.search(rf"{name} = \"?([^\",\n]+)\"?,", text)
        assert m, name
        return m.group(1)

    assert const("HEAD_KEY") == protocol.KEY_LOG_HEAD
    assert const("SLOT_PREFIX") == protocol.KEY_LOG_PREFIX
    assert int(const("SLOTS")) == protocol.LOG_SLOTS
    assert const("INDEX_PREFIX") == protocol.KEY_INDEX_PREFIX
    assert int(const("INDEX_BUCKETS")) == protocol.INDEX_BUCKETS
    assert '"amesh:log:%03d"' in text and '"amesh:index:%02d"' in text
    assert protocol.log_slot_key(7) == "amesh:log:007" and protocol.index_key(3) == "amesh:index:03"
