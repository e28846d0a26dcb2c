"""The whole slice under a real nginx (master + 2 workers): file source -> agent -> library
-> Lua -> ngx.shared, read by every worker."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nginx import BUNDLED_MESH, PACKAGE_DIR

BUNDLED = BUNDLED_MESH
USER = "nobody nogroup" if os.geteuid() == 0 else None  # workers as nobody, like APISIX
REVIEWS_V1 = "outbound|9080|v1|reviews.default.svc.cluster.local"


def _mesh(tmp_path: Path) -> Path:
    dst = tmp_path / "mesh"
    shutil.copytree(BUNDLED, dst)
    os.chmod(dst, 0o755)
    return dst


def _config(mesh: Path, **extra: object) -> dict:
    return {"source": f"file://{mesh}", "limits": {"file_poll_interval": 0.05}, **extra}


def _agent(n) -> dict:
    return n.status()["library"]["agent"] or {}


def _synced(n) -> bool:
    status = n.status()
    agent = status["library"]["agent"] or {}
    return bool(agent.get("synced")) and status["consumer"]["batches_applied"] >= 1


def _write_yaml_atomic(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _set_endpoint(mesh: Path, cluster: str, address: str) -> None:
    path = mesh / "endpoints.yaml"
    doc = yaml.safe_load(path.read_text())
    for cla in doc["resources"]:
        if cla["cluster_name"] == cluster:
            ep = cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["address"] = address
    _write_yaml_atomic(path, doc)


def _upstream_hosts(objects: dict, cluster_name: str) -> list[str]:
    for key, obj in objects.items():
        if key.startswith("/upstreams/") and obj.get("name") == cluster_name:
            return [node["host"] for node in obj["nodes"]]
    raise KeyError(cluster_name)


def _all_workers_read(n, version: str) -> bool:
    seen = n.seen()
    keys = sum(1 for k in n.dump() if k.startswith("/"))
    return all(seen.get(f"version:{w}") == version and seen.get(f"keys:{w}") == str(keys)
               for w in (0, 1))


def test_bundled_mesh_reaches_the_dict_and_every_worker(tmp_path, make_nginx) -> None:
    mesh = _mesh(tmp_path)
    n = make_nginx(config=_config(mesh), user=USER).start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    objects = n.objects()
    upstream_names = {o["name"] for k, o in objects.items() if k.startswith("/upstreams/")}
    assert REVIEWS_V1 in upstream_names and len(upstream_names) == 7
    assert _upstream_hosts(objects, REVIEWS_V1) == ["127.0.0.11"]
    routes = [o for k, o in objects.items() if k.startswith("/routes/")]
    assert any("reviews" in o.get("hosts", []) for o in routes)
    for key, obj in objects.items():  # APISIX's rule: a string id equal to the key's last part
        assert key.rsplit("/", 1)[1] == obj["id"]
        assert re.fullmatch(r"[a-zA-Z0-9-_.]{1,64}", obj["id"])
    version = n.version()
    assert re.fullmatch(r"\d{13}", version)
    n.wait_for(lambda: _all_workers_read(n, version), what="both workers read the version")
    assert n.dump()["amesh:sentinel"] == "1"


def test_source_edits_update_and_delete_keys_with_one_version_bump(tmp_path, make_nginx) -> None:
    mesh = _mesh(tmp_path)
    n = make_nginx(config=_config(mesh), user=USER).start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    v1, applied = n.version(), n.status()["consumer"]["batches_applied"]

    _set_endpoint(mesh, REVIEWS_V1, "127.0.0.99")
    n.wait_for(lambda: _upstream_hosts(n.objects(), REVIEWS_V1) == ["127.0.0.99"],
               what="endpoint change in the dict")
    v2 = n.wait_for(lambda: n.version() != v1 and n.version(), what="version bump")
    n.wait_for(lambda: n.status()["consumer"]["batches_applied"] == applied + 1,
               what="exactly one more batch")
    assert n.status()["consumer"]["batches_applied"] == applied + 1  # one change, one bump
    n.wait_for(lambda: _all_workers_read(n, v2), what="both workers read the new version")

    # Touching a file without changing it is not a change: no batch, no version bump.
    loads, batches = _agent(n)["source"]["loads"], _agent(n)["sink"]["batches"]
    os.utime(mesh / "routes.yaml")
    n.wait_for(lambda: _agent(n)["source"]["loads"] > loads, what="the touched file re-read")
    assert _agent(n)["sink"]["batches"] == batches  # nothing queued
    assert n.version() == v2

    # Removing a cluster and its endpoints deletes its upstream key.
    for name in ("clusters.yaml", "endpoints.yaml"):
        doc = yaml.safe_load((mesh / name).read_text())
        doc["resources"] = [r for r in doc["resources"]
                            if REVIEWS_V1 not in (r.get("name"), r.get("cluster_name"))]
        _write_yaml_atomic(mesh / name, doc)
    n.wait_for(lambda: REVIEWS_V1 not in {o.get("name") for o in n.objects().values()},
               what="upstream deleted")
    v3 = n.version()
    assert v3 not in (v1, v2)
    n.wait_for(lambda: _all_workers_read(n, v3), what="both workers read the deletion")


STOCK_APISIX_HARNESS = r"""
    if ngx.worker.id() == 0 then
        local ffi = require("ffi")
        ffi.cdef[[
            void *ngx_http_lua_ffi_shdict_udata_to_zone(void *zone_udata);
            void initial(void *config_zone, void *version_zone);
        ]]
        local lib
        for path in package.cpath:gmatch("[^;]+") do
            local dir = path:match("^(.*)/[^/]*$")
            if dir then
                local ok, l = pcall(ffi.load, dir .. "/libxds.so")
                if ok then lib = l break end
            end
        end
        if not lib then ngx.log(ngx.ERR, "test: libxds.so not found") return end
        local C = ffi.C
        lib.initial(C.ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared["xds-config"][1]),
                    C.ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared["xds-config-version"][1]))
    end
"""


def _stock_apisix_nginx(tmp_path: Path, make_nginx, mesh: Path):
    """What APISIX's config_xds.lua does: find libxds.so on package.cpath, turn the dicts
    into zones, call initial(); the library writes the dicts from its own thread. Its
    settings come from amesh.json beside the libxds.so it was loaded as (here a symlink)."""
    libdir = tmp_path / "cpath"
    libdir.mkdir()
    os.chmod(libdir, 0o755)
    (libdir / "libxds.so").symlink_to(PACKAGE_DIR / "libxds.so")
    (libdir / "amesh.json").write_text(json.dumps(_config(mesh)))
    n = make_nginx(init_worker=STOCK_APISIX_HARNESS, init="", exit_worker="", user=USER,
                   cpath=f"{libdir}/?.so").start()
    n.wait_for(lambda: REVIEWS_V1 in {o.get("name") for o in n.objects().values()},
               what="initial() wrote the upstreams")
    return n


def test_stock_apisix_initial_entry_point(tmp_path, make_nginx) -> None:
    mesh = _mesh(tmp_path)
    n = _stock_apisix_nginx(tmp_path, make_nginx, mesh)
    version = n.version()
    assert re.fullmatch(r"\d{13}", version)
    assert n.dump()["amesh:sentinel"] == "1"
    n.wait_for(lambda: _all_workers_read(n, n.version()), what="workers read initial()'s data")
    # Changes flow through the writer thread too.
    _set_endpoint(mesh, REVIEWS_V1, "127.0.0.98")
    n.wait_for(lambda: _upstream_hosts(n.objects(), REVIEWS_V1) == ["127.0.0.98"],
               what="endpoint change written by initial()'s writer")
    assert n.version() != version
    assert n.quit() < 2
    assert "exited on signal" not in n.log_text()


@contextlib.contextmanager
def _streaming_endpoint_changes(mesh: Path) -> Iterator[None]:
    """Keep the agent busy: an endpoint moves every 20 ms while the block runs."""
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            _set_endpoint(mesh, REVIEWS_V1, f"127.0.1.{i % 250 + 1}")
            i += 1
            stop.wait(0.02)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        yield
    finally:
        stop.set()
        streamer.join()


@pytest.mark.parametrize("mode", ["lua", "initial"])
def test_reload_kill_and_quit_under_streaming_changes(tmp_path, make_nginx, mode: str) -> None:
    mesh = _mesh(tmp_path)
    if mode == "lua":
        n = make_nginx(config=_config(mesh), user=USER).start()
        n.wait_for(lambda: _synced(n), what="first batch applied")
    else:
        n = _stock_apisix_nginx(tmp_path, make_nginx, mesh)
    with _streaming_endpoint_changes(mesh):
        for _ in range(50):
            n.reload()
            time.sleep(0.15)
        # kill -9 the agent's worker: the master respawns it and the agent comes back.
        if mode == "lua":
            # The status may still be an exiting worker's: wait for a live agent's.
            killed = [n.wait_for(lambda: (p := n.status()["agent_process"]) in n.worker_pids()
                                 and p, what="a live agent's pid")]
        else:  # initial() has no Lua status: kill every worker, worker 0 among them
            killed = n.worker_pids()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        n.wait_for(lambda: not set(killed) & set(n.worker_pids()) and len(n.worker_pids()) == 2,
                   what="workers respawned")
        if mode == "lua":
            n.wait_for(lambda: n.status()["agent_process"] not in killed and _synced(n),
                       timeout=15, what="agent back in a respawned worker")
    _set_endpoint(mesh, REVIEWS_V1, "127.0.0.77")
    n.wait_for(lambda: _upstream_hosts(n.objects(), REVIEWS_V1) == ["127.0.0.77"],
               timeout=15, what="dict converges after reloads and kill")
    # Consistent: exactly the keys of the mesh, nothing duplicated or left over.
    upstreams = [o["name"] for k, o in n.objects().items() if k.startswith("/upstreams/")]
    assert sorted(upstreams) == sorted(set(upstreams)) and len(upstreams) == 7
    crashes = [line for line in re.findall(r".*exited on signal.*", n.log_text())
               if not any(f"process {pid} exited on signal 9" in line for pid in killed)]
    assert crashes == []  # only the workers we killed
    assert n.quit() < 2


@pytest.mark.parametrize("mode", ["lua", "initial"])
def test_reload_onto_another_source_reconciles_the_dict(tmp_path, make_nginx, mode) -> None:
    """The dict survives a reload; the new agent's first batch removes what the old one
    wrote and the new source lacks (through the key index), and nothing else."""
    mesh = _mesh(tmp_path)
    smaller = tmp_path / "smaller"
    shutil.copytree(mesh, smaller)
    for name in ("clusters.yaml", "endpoints.yaml"):
        doc = yaml.safe_load((smaller / name).read_text())
        doc["resources"] = [r for r in doc["resources"]
                            if REVIEWS_V1 not in (r.get("name"), r.get("cluster_name"))]
        _write_yaml_atomic(smaller / name, doc)
    if mode == "lua":
        n = make_nginx(config=_config(mesh), user=USER).start()
        n.wait_for(lambda: _synced(n), what="first batch applied")
        n.write_conf(_config(smaller))
    else:
        n = _stock_apisix_nginx(tmp_path, make_nginx, mesh)
        (tmp_path / "cpath" / "amesh.json").write_text(json.dumps(_config(smaller)))
    before = set(n.objects())
    n.reload()
    n.wait_for(lambda: REVIEWS_V1 not in {o.get("name") for o in n.objects().values()},
               what="the old run's upstream reconciled away")
    objects = n.objects()
    after = set(objects)
    assert len(before - after) == 1  # exactly that key, nothing else
    # Routes that named the removed cluster now name the no-endpoint upstream that answers
    # 503 as Envoy does; nothing else is new.
    assert all(k.startswith("/upstreams/") and not objects[k].get("nodes")
               for k in after - before), after - before
    assert n.dump()["amesh:sentinel"] == "1"


def test_batches_wake_the_consumer_without_polling(tmp_path, make_nginx) -> None:
    """With the safety poll slowed to 30 s, changes still land at once: the library's
    wakeup socket drives the consumer. Graceful quit still ends the blocked receive."""
    mesh = _mesh(tmp_path)
    config = json.dumps(_config(mesh))
    init = f"""
        local ok, err = require("amesh").init_worker({{
            config = [==[{config}]==], safety_interval = 30 }})
        if not ok then ngx.log(ngx.ERR, "test: ", err) end
    """
    n = make_nginx(init_worker=init, user=USER).start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    t0 = time.monotonic()
    _set_endpoint(mesh, REVIEWS_V1, "127.0.0.55")
    n.wait_for(lambda: _upstream_hosts(n.objects(), REVIEWS_V1) == ["127.0.0.55"],
               timeout=5, what="change drained on a wakeup")
    assert time.monotonic() - t0 < 5  # far below the 30 s safety poll
    status = n.wait_for(lambda: (s := n.status())["wakeup"]["wakeups"] >= 2 and s,
                        what="wakeups counted")
    assert status["wakeup"]["state"] == "connected"
    assert n.quit() < 2
    assert "exited on signal" not in n.log_text()


def test_no_worker_runs_the_agent_when_the_host_has_a_privileged_agent(tmp_path,
                                                                      make_nginx) -> None:
    """privileged_agent = true: the privileged agent runs amesh, so no worker does (Debian's
    nginx has no privileged agent: here nothing may start at all)."""
    mesh = _mesh(tmp_path)
    init = f"""require("amesh").init_worker({{ config = [==[{json.dumps(_config(mesh))}]==],
                                              privileged_agent = true }})"""
    n = make_nginx(init_worker=init, user=USER).start()
    # Both workers serve requests: their init_worker (where an agent would start) is done.
    n.wait_for(lambda: {n.get("/whoami").strip() for _ in range(20)} == {"0", "1"},
               what="both workers serving")
    assert "no status published yet" in n.get("/status")
    assert not n.objects()
    assert "agent started" not in n.log_text()


def test_reload_with_the_control_plane_down_keeps_the_last_config(tmp_path, make_nginx) -> None:
    """After a reload the new agent cannot reach its control plane: until a whole config
    arrives it changes nothing, so the dict keeps serving what the last run wrote."""
    mesh = _mesh(tmp_path)
    n = make_nginx(config=_config(mesh), user=USER).start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    before, version = n.dump(), n.version()
    n.write_conf({"source": "grpc://127.0.0.1:9", "xds": {
        "backoff": {"max_seconds": 0.5},
        "node": {"pod_name": "amesh-0", "namespace": "default", "ip": "127.0.0.1"}}})
    n.reload()
    n.wait_for(lambda: (a := _agent(n)) and a["source"].get("kind") == "ads"
               and a["source"]["last_error"], what="new agent failing to connect")
    n.wait_for(lambda: _agent(n)["source"]["reconnects"] >= 3, timeout=15,
               what="the new agent retried (backoff) and still has nothing")
    assert n.version() == version
    assert {k: v for k, v in n.dump().items() if k.startswith("/")} == {
        k: v for k, v in before.items() if k.startswith("/")}


def test_invalid_start_config_is_reported_and_nginx_keeps_serving(make_nginx) -> None:
    n = make_nginx(config={"source": "http://nowhere", "bogus": 1}, user=USER).start()
    status = n.wait_for(lambda: n.status()["consumer"]["last_error"] and n.status(),
                        what="start error in status")
    assert "unknown field" in status["consumer"]["last_error"]
    assert "amesh: agent not started (-1)" in n.log_text()
    assert n.get("/whoami").strip() in ("0", "1")
    assert re.fullmatch(r"\d{13}", n.version())  # workers are never left waiting


def test_unreadable_python_runtime_is_reported(tmp_path, make_nginx) -> None:
    home = tmp_path / "python-home"
    (home / "lib").mkdir(parents=True)
    os.chmod(home, 0o000)
    n = make_nginx(config={}, user=USER, env={"AMESH_PYTHON_HOME": str(home)}).start()
    status = n.wait_for(lambda: n.status()["consumer"]["last_error"] and n.status(),
                        what="runtime error in status")
    assert "not readable" in status["consumer"]["last_error"]
    assert str(home) in status["consumer"]["last_error"]
    assert "agent not started (-3)" in n.log_text()
    assert n.get("/whoami").strip() in ("0", "1")


def test_malformed_resource_is_rejected_alone(tmp_path, make_nginx) -> None:
    mesh = _mesh(tmp_path)
    n = make_nginx(config=_config(mesh), user=USER).start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    (mesh / "bad.yaml").write_text(
        '- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
        '  name: broken\n  connect_timeout: not-a-duration\n'
        '- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
        '  name: extra\n  type: STATIC\n  load_assignment:\n    cluster_name: extra\n'
        '    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: '
        '{address: 127.0.0.5, port_value: 80}}}}]}]\n')
    n.wait_for(lambda: "extra" in {o.get("name") for o in n.objects().values()},
               what="the good resource of the file applied")
    errors = n.wait_for(lambda: _agent(n)["source"]["errors"], what="error in status")
    assert any("broken" in e and "connect_timeout" in e for e in errors), errors
    assert "broken" not in {o.get("name") for o in n.objects().values()}
    assert REVIEWS_V1 in {o.get("name") for o in n.objects().values()}
    assert re.search(r"amesh: .*broken", n.log_text())
    # A file that no longer parses keeps its last good resources.
    (mesh / "endpoints.yaml").write_text("resources: [unclosed\n")
    n.wait_for(lambda: any("cannot load" in e for e in _agent(n)["source"]["errors"]),
               what="unparseable file reported")
    assert _upstream_hosts(n.objects(), REVIEWS_V1) == ["127.0.0.11"]


def test_full_dict_fails_the_batch_whole_and_recovers(tmp_path, make_nginx) -> None:
    mesh = _mesh(tmp_path)
    n = make_nginx(config=_config(mesh), user=USER, dict_size="1m").start()
    n.wait_for(lambda: _synced(n), what="first batch applied")
    version = n.version()
    before = n.dump()
    n.get("/fill")
    # A change that needs more room than the dict has: a new cluster with a large name set.
    doc = {"resources": [{
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": f"big-{i}-" + "x" * 200, "type": "STATIC",
        "load_assignment": {"cluster_name": f"big-{i}", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": f"127.0.2.{j}",
                                                         "port_value": 80}}}}
            for j in range(1, 60)]}]}} for i in range(40)]}
    _write_yaml_atomic(mesh / "big.yaml", doc)
    n.wait_for(lambda: n.status()["consumer"]["batches_failed"] >= 1, what="failed batch")
    status = n.status()
    assert "no memory" in status["consumer"]["last_error"]
    assert n.version() == version  # not bumped
    after = {k: v for k, v in n.dump().items() if not k.startswith("filler:")}
    assert after == before  # nothing half-written: the batch was rolled back
    assert "rolled back, version kept" in n.log_text()
    assert n.get("/whoami").strip() in ("0", "1")
    # Room again: the agent's resync lands everything.
    n.get("/unfill")
    n.wait_for(lambda: sum(1 for o in n.objects().values()
                           if str(o.get("name", "")).startswith("big-")) == 40,
               timeout=20, what="resync after the dict has room")
    assert n.version() != version
