"""The initial() writer (src/native/writer.c) under faults, through Debian's nginx as stock
APISIX drives it (libxds.so found on package.cpath, initial(config_zone, version_zone)):
kill -9 in the middle of a large FULL batch, a refused batch, a FULL batch onto a previous
run's dict, reloads while the writer writes, and a second consumer refused. After each
fault the dict is compared key by key with what a fresh run of the same config writes.
Also, in a hosting Python process: the report ring and the capacity the agent reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

import test_nginx_foundation as foundation
from nginx import PACKAGE_DIR, lua_long_string

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import synthetic_mesh

USER = foundation.USER
# The library under test; another build (say the one before a fix) can be pointed at.
LIBXDS = Path(os.environ.get("AMESH_TEST_LIBXDS") or PACKAGE_DIR / "libxds.so")
BIG_SERVICES = 8700  # ~20,000 keys (upstreams and routes) in one FULL batch

# Test-only views of the dicts: a digest per key (values of 20,000 keys are too much to
# ship), the data dict's used bytes (cheap enough to poll while a batch lands), and a
# planted key (a string, or a number with &number=1).
LOCATIONS = r"""
        location = /digest {
            content_by_lua_block {
                local dict = ngx.shared[ngx.var.arg_dict or "xds-config"]
                local out = {}
                for _, k in ipairs(dict:get_keys(0)) do
                    local v = dict:get(k)
                    if v ~= nil then out[#out + 1] = k .. "\t" .. ngx.md5(tostring(v)) end
                end
                ngx.print(table.concat(out, "\n"))
            }
        }
        location = /used {
            content_by_lua_block {
                local dict = ngx.shared["xds-config"]
                ngx.say(dict:capacity() - dict:free_space())
            }
        }
        location = /unindexed {
            content_by_lua_block {
                -- The protocol's invariant: every data key is listed in the key index.
                local dict = ngx.shared["xds-config"]
                local listed = {}
                for b = 0, 63 do
                    local lines = dict:get(string.format("amesh:index:%02d", b)) or ""
                    for key in tostring(lines):gmatch("[^\n]+") do listed[key] = true end
                end
                for _, k in ipairs(dict:get_keys(0)) do
                    if k:sub(1, 1) == "/" and not listed[k] then ngx.say(k) end
                end
            }
        }
        location = /plant {
            content_by_lua_block {
                local value = ngx.var.arg_value
                if ngx.var.arg_number then value = tonumber(value) end
                local ok = ngx.shared["xds-config"]:set(ngx.var.arg_key, value)
                ngx.say(ok)
            }
        }
"""


def _digest(n, *, log: bool = False) -> dict[str, str]:
    """key -> md5 of its value. The change log is left out unless asked for: its entries
    name the run, so only a dict compared with itself within one run can include it."""
    lines = n.get("/digest", timeout=30).splitlines()
    pairs = dict(line.split("\t", 1) for line in lines if line)
    return {k: v for k, v in pairs.items() if log or not k.startswith("amesh:log:")}


def _library_status(n) -> dict:
    """What the writer publishes in the version dict (amesh_status(): writer and agent)."""
    return json.loads(n.dump("xds-config-version")["amesh:status"])["library"]


def _writer(n) -> dict:
    return _library_status(n)["writer"]


def _used(n) -> int:
    return int(n.get("/used"))


def _stock(tmp_path: Path, make_nginx, source: Path, *, dict_size: str = "64m",
           init_worker: str = foundation.STOCK_APISIX_HARNESS, name: str = "cpath"):
    """nginx as stock APISIX runs it, reading amesh.json beside a libxds.so symlink."""
    libdir = tmp_path / name
    libdir.mkdir()
    os.chmod(libdir, 0o755)
    (libdir / "libxds.so").symlink_to(LIBXDS)
    n = make_nginx(init_worker=init_worker, init="", exit_worker="", user=USER,
                   cpath=f"{libdir}/?.so", dict_size=dict_size, extra_locations=LOCATIONS)
    n.amesh_json = libdir / "amesh.json"
    _point_at(n, source)
    return n.start()


def _point_at(n, source: Path) -> None:
    """The config the next initial() in this nginx reads."""
    n.amesh_json.write_text(json.dumps(foundation._config(source)))


def _applied_by(n, pid: int) -> dict | None:
    """The writer of process pid, once it applied its first batch and nothing is queued."""
    status = _library_status(n)
    writer = status["writer"]
    ok = writer["pid"] == pid and writer["batches_applied"] >= 1 and status["queue_depth"] == 0
    return status if ok else None


def _new_writer(n, old: set[int]) -> int:
    """The pid of a writer that is not one of `old` and runs in a live worker."""
    def pid() -> int | None:
        p = _writer(n)["pid"]
        return p if p not in old and p in n.worker_pids() else None
    return n.wait_for(pid, timeout=20, what="a new writer process")


def _settled(n, pid: int, timeout: float = 60) -> dict:
    return n.wait_for(lambda: _applied_by(n, pid), timeout=timeout,
                      what=f"the writer in {pid} applied its batch")


def _expected(tmp_path: Path, make_nginx, source: Path, dict_size: str = "64m") -> dict:
    """The oracle: what a fresh run of this config leaves in an empty dict."""
    n = _stock(tmp_path, make_nginx, source, dict_size=dict_size, name=f"oracle-{source.name}")
    _settled(n, _new_writer(n, set()))
    digest = _digest(n)
    n.stop()
    return digest


def _mesh(tmp_path: Path, name: str, services: int, rename: str = "") -> Path:
    path = synthetic_mesh.write_mesh(tmp_path / name, services)
    if rename:  # other service names: keys no other mesh of the test shares
        for f in path.iterdir():
            f.write_text(f.read_text().replace("svc-", rename))
    os.chmod(path, 0o755)
    return path


def _no_crash(n, killed: set[int] = frozenset()) -> None:
    """No worker died but the ones killed, and nginx raised no alert except about those
    (its own notice that a killed worker held a zone's lock)."""
    lines = [line for line in n.log_text().splitlines()
             if not any(re.search(rf"\b{pid}\b", line) for pid in killed)]
    bad = [line for line in lines
           if "exited on signal" in line or re.search(r"\[(alert|emerg|crit)\]", line)]
    assert bad == []


def _diff(actual: dict[str, str], expected: dict[str, str]) -> dict[str, list[str]]:
    return {"missing": sorted(expected.keys() - actual.keys())[:10],
            "left over": sorted(actual.keys() - expected.keys())[:10],
            "other value": sorted(k for k in expected.keys() & actual.keys()
                                  if expected[k] != actual[k])[:10]}


def test_kill_mid_full_batch_then_a_reduced_config_converges_exactly(tmp_path,
                                                                      make_nginx) -> None:
    """Run 1 lands mesh A. Run 2's FULL batch (mesh B, ~20,000 keys, none of A's) is cut by
    kill -9 halfway: the dict then holds A, part of B, and an index listing both (each
    index SET was stored as the union of old and new lists, before the data). Run 3 (mesh
    C, 50 services) must leave exactly C: A and B's prefix reconciled away via the index."""
    mesh_a = _mesh(tmp_path, "a", 100, rename="old-")
    mesh_b = _mesh(tmp_path, "b", BIG_SERVICES)
    mesh_c = _mesh(tmp_path, "c", 50)
    expected = _expected(tmp_path, make_nginx, mesh_c)

    n = _stock(tmp_path, make_nginx, mesh_a)
    first = _new_writer(n, set())
    _settled(n, first)
    keys_a = {k for k in _digest(n) if k.startswith("/")}
    assert n.get("/unindexed") == ""
    version = n.version()

    _point_at(n, mesh_b)
    n.reload()
    second = _new_writer(n, {first})
    base = _used(n)
    n.wait_for(lambda: _used(n) > base + (2 << 20), timeout=60, what="run 2's batch landing")
    # The worker the master respawns starts no agent (a config it refuses): the cut state
    # stays put while it is looked at.
    n.amesh_json.write_text('{"source": 1}')
    others = set(n.worker_pids()) - {second}
    os.kill(second, signal.SIGKILL)
    idle = n.wait_for(lambda: len(new := set(n.worker_pids()) - others - {second}) == 1
                      and "agent not started" in n.log_text() and new.pop(),
                      what="worker 0 respawned without an agent")
    cut = _digest(n)
    assert n.version() == version, "run 2's FULL batch committed before the kill"
    assert n.get("/unindexed", timeout=30) == ""  # the index names every key left
    assert len([k for k in cut if k.startswith("/")]) - len(keys_a) > 1000  # B partly written

    _point_at(n, mesh_c)
    os.kill(idle, signal.SIGKILL)  # the next worker 0 runs mesh C
    third = _new_writer(n, {first, second})
    _settled(n, third)
    actual = _digest(n)
    assert actual == expected, _diff(actual, expected)
    assert n.version() != version
    _no_crash(n, killed={second, idle})


def test_refused_batch_leaves_the_dict_as_it_was_key_by_key(tmp_path, make_nginx) -> None:
    """A batch the full dict cannot take, then the FULL resyncs it causes, are rolled back:
    every key (data, index, change log, sentinel) holds its value from before, version
    kept; the failure names the key. With room again the resync lands."""
    mesh = foundation._mesh(tmp_path)
    n = _stock(tmp_path, make_nginx, mesh, dict_size="1m")
    pid = _new_writer(n, set())
    _settled(n, pid)
    assert _writer(n)["dict_capacity"] == 1 << 20  # the zone's, told before the agent ran
    assert n.status()["library"]["mode"] == "initial"  # require("amesh").status() reads it
    before, version = _digest(n, log=True), n.version()
    n.get("/fill")
    filled = {k for k in _digest(n, log=True) if k.startswith("filler:")}
    big = _mesh(tmp_path, "big", 40, rename="big-")  # 48 clusters that cannot fit now
    for name in ("clusters.json", "endpoints.json"):
        os.replace(big / name, mesh / f"big-{name}")  # whole files: the source reads them
    # The delta batch, then at least one FULL resync (after a 1 s backoff), refused; the
    # agent's status shows the report, which names the key.
    refused = r"store of \S+ failed: no memory"
    status = n.wait_for(lambda: (s := _library_status(n))["writer"]["batches_failed"] >= 2
                        and re.search(refused, json.dumps(s["agent"])) and s,
                        timeout=20, what="a refused batch and a refused FULL resync, reported")
    assert re.search(refused, status["last_error"]), status
    after = {k: v for k, v in _digest(n, log=True).items() if k not in filled}
    assert after == before, _diff(after, before)
    assert n.version() == version
    assert "rolled back, version kept" in n.log_text()

    n.get("/unfill")
    n.wait_for(lambda: sum(1 for o in n.objects().values()
                           if "|big-" in str(o.get("name", ""))) == 48,
               timeout=30, what="the resync once the dict has room")
    assert n.version() != version
    _no_crash(n)


def test_full_batch_onto_a_previous_runs_dict_deletes_exactly_the_stale_keys(
        tmp_path, make_nginx) -> None:
    """A reload onto a smaller source: the new run's FULL batch deletes what only the old
    index lists, keeps keys amesh never listed (another writer's "/" key, keys outside
    "/"), and leaves every other key as a fresh run of the new source writes it."""
    mesh = foundation._mesh(tmp_path)
    smaller = tmp_path / "smaller"
    shutil.copytree(mesh, smaller)
    for name in ("clusters.yaml", "endpoints.yaml"):
        doc = yaml.safe_load((smaller / name).read_text())
        doc["resources"] = [r for r in doc["resources"] if foundation.REVIEWS_V1 not in (
            r.get("name"), r.get("cluster_name"))]
        foundation._write_yaml_atomic(smaller / name, doc)
    expected = _expected(tmp_path, make_nginx, smaller)

    n = _stock(tmp_path, make_nginx, mesh)
    first = _new_writer(n, set())
    _settled(n, first)
    planted = {"/routes/not-amesh": "{}", "foreign:key": "kept"}
    for key, value in planted.items():
        assert n.get(f"/plant?key={key}&value={value}").strip() == "true"
    planted_digest = {k: v for k, v in _digest(n).items() if k in planted}
    stale = {k for k in _digest(n) if k.startswith("/")} - expected.keys() - planted.keys()
    assert stale  # the reviews v1 upstream at least

    _point_at(n, smaller)
    n.reload()
    _settled(n, _new_writer(n, {first}))
    actual = _digest(n)
    assert actual == {**expected, **planted_digest}, _diff(actual, {**expected,
                                                                    **planted_digest})
    _no_crash(n)


def test_a_value_that_cannot_be_read_fails_the_batch_and_changes_nothing(
        tmp_path, make_nginx) -> None:
    """A number under an index key (another writer's, or damage): the next FULL batch cannot
    read that old list, so it must not take it as absent (that would forget the keys it
    lists). The batch is refused, naming the key, and the dict stays as it was."""
    mesh = foundation._mesh(tmp_path)
    n = _stock(tmp_path, make_nginx, mesh)
    first = _new_writer(n, set())
    _settled(n, first)
    assert n.get("/plant?key=amesh:index:05&value=42&number=1").strip() == "true"
    before, version = _digest(n, log=True), n.version()
    n.reload()
    second = _new_writer(n, {first})
    status = n.wait_for(lambda: (s := _library_status(n))["writer"]["pid"] == second
                        and s["writer"]["batches_failed"] >= 1 and s, timeout=20,
                        what="the new run's FULL batch refused")
    assert "read of amesh:index:05 failed: not a string value" in status["last_error"]
    after = _digest(n, log=True)
    assert after == before, _diff(after, before)
    assert n.version() == version
    _no_crash(n)


def _fences(n) -> dict[int, int]:
    """pid -> the batch its exit fence cut (0: none was open), from the error log."""
    found = re.findall(r"exit fence closed in process (\d+): .*open batch (\d+)", n.log_text())
    return {int(pid): int(batch) for pid, batch in found}


def test_worker_exits_and_reloads_while_the_writer_writes_fence_every_old_writer(
        tmp_path, make_nginx) -> None:
    """The writer's worker quits gracefully in the middle of a ~20,000-key FULL batch (the
    signal a reload sends it, here sent at once: the master's reload waits 100 ms first),
    then reloads come 0.3 s apart: every old worker's exit runs the fence from its cycle
    pool's cleanup (the first one cutting its batch: no write after it), no worker crashes,
    and a last reload onto a small source converges the dict exactly."""
    mesh_b = _mesh(tmp_path, "b", BIG_SERVICES)
    mesh_c = _mesh(tmp_path, "c", 50)
    expected = _expected(tmp_path, make_nginx, mesh_c)

    n = _stock(tmp_path, make_nginx, mesh_b)
    writers = [_new_writer(n, set())]
    assert _writer(n)["fence"] == "pool cleanup"
    base = _used(n)
    n.wait_for(lambda: _used(n) > base + (128 << 10), timeout=60, what="the first batch landing")
    os.kill(writers[0], signal.SIGQUIT)
    fences = n.wait_for(lambda: writers[0] in (f := _fences(n)) and f,
                        what="the first writer's fence")
    assert fences[writers[0]] != 0  # it cut the FULL batch
    writers.append(_new_writer(n, set(writers)))  # the master respawns worker 0
    for _ in range(6):
        n.reload()
        writers.append(_new_writer(n, set(writers)))
        time.sleep(0.3)
    _point_at(n, mesh_c)
    n.reload()
    last = _new_writer(n, set(writers))
    _settled(n, last)
    n.wait_for(lambda: not set(writers) & set(n.worker_pids()), timeout=20,
               what="old workers gone")
    assert set(_fences(n)) >= set(writers)
    assert "still in flight" not in n.log_text()
    actual = _digest(n)
    assert actual == expected, _diff(actual, expected)
    _no_crash(n)
    assert n.quit() < 2


def test_initial_after_the_agent_started_in_this_process_starts_no_second_consumer(
        tmp_path, make_nginx) -> None:
    """require("amesh") started the agent in worker 0 with the same library; APISIX's
    initial() then gets EALREADY: it logs it and starts no writer, so the Lua consumer
    alone drains the queue (two consumers would split every batch)."""
    mesh = foundation._mesh(tmp_path)
    libdir = tmp_path / "cpath"
    lua_first = f"""
        if ngx.worker.id() == 0 then
            require("amesh").init_worker({{
                config = {lua_long_string(json.dumps(foundation._config(mesh)))},
                library = "{libdir}/libxds.so", interval = 0.002 }})
        end
    """
    n = _stock(tmp_path, make_nginx, mesh, init_worker=lua_first +
               foundation.STOCK_APISIX_HARNESS)
    n.wait_for(lambda: foundation._synced(n), what="the Lua consumer applied a batch")
    assert "no writer started" in n.log_text()
    foundation._set_endpoint(mesh, foundation.REVIEWS_V1, "127.0.0.66")
    n.wait_for(lambda: foundation._upstream_hosts(n.objects(), foundation.REVIEWS_V1)
               == ["127.0.0.66"], what="a change drained by the Lua consumer")
    writer = n.status()["library"]["writer"]
    assert writer["running"] is False and writer["batches_applied"] == 0
    assert writer["batches_failed"] == 0
    _no_crash(n)


REPORTS_DRIVER = textwrap.dedent("""
    import ctypes, json, sys
    lib = ctypes.CDLL(sys.argv[1])
    # A start config the agent refuses: _amesh_native is registered, but no agent thread
    # drains the reports, so this process reads them alone.
    assert lib.amesh_start(b'{"source": 1}') == -1
    import _amesh_native as native

    def drain():
        out = []
        while batch := native.wait_reports(0):
            out += batch
        return out

    def report(batch, status, message):
        lib.amesh_report(ctypes.c_uint64(batch), status, message)

    out = {}
    lib.amesh_dict_capacity(ctypes.c_size_t(12345))
    out["capacity"] = native.dict_capacity()
    for i in range(1, 11):
        report(i, -1, b"failed")
    for i in range(11, 311):
        report(i, 0, b"applied")
    out["mixed"] = drain()
    for i in range(1, 301):
        report(i, -1, b"failed")
    out["failures"] = drain()
    report(1, -1, ("\\u00e9" * 200).encode())  # 400 bytes: cut at 239
    report(2, -1, b"bad \\xff\\xfe bytes")
    out["text"] = drain()
    print(json.dumps(out))
""")


def test_report_ring_keeps_failures_and_never_raises_on_text() -> None:
    """The ring drops successes first; with only failures left it returns one synthetic
    failure (batch 0) so the agent resyncs; a message cut inside a UTF-8 character or not
    UTF-8 at all is read without raising. dict_capacity() returns what the consumer told."""
    proc = subprocess.run([sys.executable, "-c", REPORTS_DRIVER, str(LIBXDS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["capacity"] == 12345
    mixed = out["mixed"]
    assert len(mixed) == 256
    assert [b for b, s, _ in mixed if s < 0] == list(range(1, 11))  # every failure kept
    assert [b for b, s, _ in mixed if s == 0] == list(range(65, 311))  # newest successes
    failures = out["failures"]
    assert failures[0] == [0, -1, "a failure report was lost"]
    assert [b for b, _, _ in failures[1:]] == list(range(45, 301))
    (_, _, cut), (_, _, bad) = out["text"]
    assert cut == "\u00e9" * 119  # 238 bytes: the 120th character did not fit whole
    assert bad == "bad \ufffd\ufffd bytes"
