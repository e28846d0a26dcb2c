"""The Lua consumer (require("amesh") draining amesh_poll on nginx's thread) under faults,
through Debian's nginx: kill -9 in the middle of a FULL batch, a first batch the dict
refuses, kill -9 of the agent's worker under churn that adds and removes services, 100
reloads 0.1 s apart, a status with thousands of rejected resources, an object that can
never fit, a source path that does not exist. After each fault the dict is compared key by
key with what a fresh run of the final config writes into an empty dict.

The initial() writer faces the same faults in test_writer_faults.py; the helpers that read
a dict (digest per key, used bytes) are shared from there."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import test_nginx_foundation as foundation
import test_writer_faults as faults
from churn import service_churn
from nginx import lua_long_string

USER = foundation.USER
BIG_SERVICES = faults.BIG_SERVICES


def _init_worker(source: Path, **opts: object) -> str:
    """init_worker for the agent on `source`; opts are amesh init_worker options."""
    config = json.dumps(foundation._config(source))
    extra = "".join(f"{k} = {json.dumps(v)}, " for k, v in opts.items())
    return (f'local ok, err = require("amesh").init_worker({{ config = '
            f'{lua_long_string(config)}, {extra}}})\n'
            '        if not ok then ngx.log(ngx.ERR, "test: amesh init_worker: ", err) end')


def _nginx(make_nginx, source: Path, *, dict_size: str = "64m", **opts: object):
    return make_nginx(init_worker=_init_worker(source, **opts), user=USER, dict_size=dict_size,
                      extra_locations=faults.LOCATIONS).start()


def _agent_pid(n) -> int:
    return n.status()["agent_process"]


def _ready_in(n, pid: int | None = None) -> dict | None:
    """The agent's status once it (in process pid, if given) says the dict is complete."""
    status = n.status()
    agent = status["library"]["agent"] or {}
    if pid is not None and status["agent_process"] != pid:
        return None
    return status if agent.get("ready") else None


def _new_agent(n, old: set[int], timeout: float = 30) -> int:
    def pid() -> int | None:
        p = _agent_pid(n)
        return p if p not in old and p in n.worker_pids() else None
    return n.wait_for(pid, timeout=timeout, what="an agent in a new worker")


def _expected(tmp_path: Path, make_nginx, source: Path, dict_size: str = "64m") -> dict:
    """The oracle: what a fresh agent on this config leaves in an empty dict."""
    n = _nginx(make_nginx, source, dict_size=dict_size)
    n.wait_for(lambda: _ready_in(n), timeout=60, what="oracle ready")
    digest = faults._digest(n)
    n.stop()
    return digest


def _link(link: Path, target: Path) -> None:
    """Point the agent's source (a symlink) at another mesh, atomically."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


class Lua:
    """The Lua consumer in worker 0 (require("amesh"))."""

    @staticmethod
    def start(make_nginx, tmp_path: Path, source: Path, dict_size: str = "64m"):
        return _nginx(make_nginx, source, dict_size=dict_size)

    @staticmethod
    def status(n) -> dict:
        """The library's status (mode, writer or consumer, and the agent's)."""
        return n.status()["library"]

    @staticmethod
    def pid(n) -> int:
        return _agent_pid(n)

    @staticmethod
    def refused(n) -> int:
        return n.status()["consumer"]["batches_failed"]


class Initial:
    """Stock APISIX's path: initial() and the library's writer thread."""

    @staticmethod
    def start(make_nginx, tmp_path: Path, source: Path, dict_size: str = "64m"):
        return faults._stock(tmp_path, make_nginx, source, dict_size=dict_size)

    @staticmethod
    def status(n) -> dict:
        return faults._library_status(n)

    @staticmethod
    def pid(n) -> int:
        return faults._writer(n)["pid"]

    @staticmethod
    def refused(n) -> int:
        return faults._writer(n)["batches_failed"]


WRITERS = [Lua, Initial]


def _agent_of(mode, n) -> dict:
    return mode.status(n).get("agent") or {}


def _ready(mode, n, pid: int | None = None) -> dict | None:
    """The agent's status once it (in process pid, if given) says the dict is complete."""
    if pid is not None and mode.pid(n) != pid:
        return None
    agent = _agent_of(mode, n)
    return agent if agent.get("ready") else None


def _new_pid(mode, n, old: set[int], timeout: float = 30) -> int:
    def pid() -> int | None:
        p = mode.pid(n)
        return p if p not in old and p in n.worker_pids() else None
    return n.wait_for(pid, timeout=timeout, what="an agent in a new worker")


def test_kill_mid_full_batch_then_a_reduced_config_converges_exactly(tmp_path,
                                                                      make_nginx) -> None:
    """Run 1 lands mesh A. Run 2's FULL batch (mesh B, ~20,000 keys, none of A's) is cut by
    kill -9 of the agent's worker halfway; the respawned agent reads mesh C: the dict must
    hold exactly C (A's keys and B's half reconciled away through the index)."""
    mesh_a = faults._mesh(tmp_path, "a", 100, rename="old-")
    mesh_b = faults._mesh(tmp_path, "b", BIG_SERVICES)
    mesh_c = faults._mesh(tmp_path, "c", 50)
    expected = _expected(tmp_path, make_nginx, mesh_c)
    current = tmp_path / "current"
    _link(current, mesh_a)
    # A slow drain (16 changes a tick) keeps the FULL batch in flight long enough to cut.
    n = _nginx(make_nginx, current, max_changes=16, max_polls=1)
    first = n.wait_for(lambda: (s := _ready_in(n)) and s["agent_process"], timeout=30,
                       what="run 1 ready")
    keys_a = {k for k in faults._digest(n) if k.startswith("/")}
    version = n.version()

    _link(current, mesh_b)
    n.reload()
    second = _new_agent(n, {first})
    base = faults._used(n)
    n.wait_for(lambda: faults._used(n) > base + (2 << 20), timeout=60,
               what="run 2's batch landing")
    _link(current, mesh_c)  # what the respawned worker's agent reads
    os.kill(second, signal.SIGKILL)
    cut = faults._digest(n)
    assert n.version() == version, "run 2's FULL batch committed before the kill"
    assert keys_a <= cut.keys()  # nothing of run 1 deleted before COMMIT
    assert len([k for k in cut if k.startswith("/")]) - len(keys_a) > 1000  # B half-written

    third = _new_agent(n, {first, second})
    n.wait_for(lambda: _ready_in(n, third), timeout=60, what="run 3 ready")
    actual = faults._digest(n)
    assert actual == expected, faults._diff(actual, expected)
    assert n.version() != version
    faults._no_crash(n, killed={second})


def test_first_batch_refused_leaves_nothing_then_a_small_config_lands(tmp_path,
                                                                      make_nginx) -> None:
    """A first (FULL) batch the dict cannot hold is undone key by key, in slices: not one
    object is left behind to crowd out the next config, which then lands exactly."""
    big = faults._mesh(tmp_path, "big", 3000)
    small = faults._mesh(tmp_path, "small", 3, rename="tiny-")
    expected = _expected(tmp_path, make_nginx, small, dict_size="1m")
    current = tmp_path / "current"
    _link(current, big)
    n = _nginx(make_nginx, current, dict_size="1m")
    status = n.wait_for(lambda: (s := n.status())["consumer"]["batches_failed"] >= 1 and s,
                        timeout=60, what="the first batch refused")
    assert "no memory" in status["consumer"]["last_error"]
    assert not status["library"]["agent"]["ready"]
    left = [k for k in faults._digest(n) if k.startswith("/")]
    assert left == []  # rolled back whole (it left 134 objects before the undo fix)
    assert status["consumer"]["max_tick_us"] < 50_000  # the undo ran in slices

    _link(current, small)
    old = {_agent_pid(n)}
    n.reload()
    pid = _new_agent(n, old)
    n.wait_for(lambda: _ready_in(n, pid), timeout=30, what="the small config ready")
    actual = faults._digest(n)
    assert actual == expected, faults._diff(actual, expected)
    faults._no_crash(n)


@pytest.mark.parametrize("mode", WRITERS, ids=lambda m: m.__name__.lower())
def test_twenty_kills_of_the_agents_worker_under_churn_converge_exactly(tmp_path, make_nginx,
                                                                         mode) -> None:
    mesh = faults._mesh(tmp_path, "churn", 300)
    n = mode.start(make_nginx, tmp_path, mesh)
    n.wait_for(lambda: _ready(mode, n), timeout=30, what="first ready")
    pid = mode.pid(n)
    killed: set[int] = set()
    with service_churn(mesh):
        for _ in range(20):
            # Kill as soon as the new agent has applied a batch (not only when idle).
            n.wait_for(lambda p=pid: mode.pid(n) == p
                       and (_agent_of(mode, n).get("sink") or {}).get("batches_applied"),
                       timeout=30, what="the agent applied a batch")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            pid = _new_pid(mode, n, killed)
    # The churn has stopped: the mesh folder is the final config.
    n.wait_for(lambda: _ready(mode, n, pid), timeout=30, what="ready after the churn")
    expected = _expected(tmp_path, make_nginx, mesh)
    actual = n.wait_for(lambda: (d := faults._digest(n)) == expected and d, timeout=15,
                        what="the dict equal to a fresh run's") or faults._digest(n)
    assert actual == expected, faults._diff(actual, expected)
    faults._no_crash(n, killed=killed)


@pytest.mark.parametrize("mode", WRITERS, ids=lambda m: m.__name__.lower())
def test_hundred_reloads_then_quit_within_two_seconds(tmp_path, make_nginx, mode) -> None:
    """Reloads 0.1 s apart under churn: every old worker exits (none hangs on the wakeup
    socket or its writer), the last agent converges, and nginx -s quit takes at most 2 s."""
    mesh = faults._mesh(tmp_path, "reloads", 50)
    n = mode.start(make_nginx, tmp_path, mesh)
    n.wait_for(lambda: _ready(mode, n), timeout=30, what="first ready")
    with service_churn(mesh):
        for _ in range(100):
            n.reload()
            time.sleep(0.1)  # the fault itself: reloads 0.1 s apart
    n.wait_for(lambda: len(n.worker_pids()) == 2, timeout=10,
               what="every old worker gone (2 workers left)")
    pid = n.wait_for(lambda: (p := mode.pid(n)) in n.worker_pids() and p, timeout=10,
                     what="the agent in a live worker")
    n.wait_for(lambda: _ready(mode, n, pid), timeout=30, what="the last agent ready")
    expected_keys = {k for k in _expected(tmp_path, make_nginx, mesh) if k.startswith("/")}
    assert {k for k in faults._digest(n) if k.startswith("/")} == expected_keys
    assert n.quit() <= 2
    faults._no_crash(n)


@pytest.mark.parametrize("mode", WRITERS, ids=lambda m: m.__name__.lower())
def test_status_with_thousands_of_rejected_resources_never_evicts_version(
        tmp_path, make_nginx, mode) -> None:
    mesh = foundation._mesh(tmp_path)
    bad = {"resources": [{
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": f"bad-{i}-" + "x" * 60, "type": "STATIC",  # Envoy refuses weight 0 too
        "load_assignment": {"cluster_name": f"bad-{i}", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": 80}}},
             "load_balancing_weight": 0}]}]}}
        for i in range(8000)]}
    foundation._write_yaml_atomic(mesh / "bad.yaml", bad)
    n = mode.start(make_nginx, tmp_path, mesh)
    agent = n.wait_for(lambda: (a := _agent_of(mode, n))["rejected_count"] >= 8000 and a,
                       timeout=60, what="8,000 rejections in status")
    assert agent["rejected_counts"]["cds"] == 8000
    assert len(agent["rejected"]["cds"]) == 50  # listed: the first 50
    assert len(n.dump("xds-config-version")["amesh:status"]) < 64 * 1024
    assert n.version() is not None
    assert n.wait_for(lambda: _ready(mode, n), what="ready")  # the good ones all landed
    assert foundation.REVIEWS_V1 in {o.get("name") for o in n.objects().values()}


@pytest.mark.parametrize("mode", WRITERS, ids=lambda m: m.__name__.lower())
def test_object_that_can_never_fit_is_rejected_alone(tmp_path, make_nginx, mode) -> None:
    """An upstream of 20,000 endpoints (~1 MB of JSON) in a 1m dict: its cluster is
    rejected with the reason in status; every other object lands, no batch is refused."""
    mesh = foundation._mesh(tmp_path)
    huge = {"resources": [{
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "huge", "type": "STATIC",
        "load_assignment": {"cluster_name": "huge", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": f"127.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}",
                "port_value": 8080}}}} for j in range(20000)]}]}}]}
    foundation._write_yaml_atomic(mesh / "huge.yaml", huge)
    n = mode.start(make_nginx, tmp_path, mesh, dict_size="1m")
    agent = n.wait_for(lambda: _ready(mode, n), timeout=30, what="ready")
    reason = agent["rejected"]["cds"]["huge"]
    assert "bytes" in reason and "max_object_bytes" in reason, reason
    assert mode.refused(n) == 0
    names = {o.get("name") for o in n.objects().values()}
    assert foundation.REVIEWS_V1 in names and "huge" not in names


@pytest.mark.parametrize("mode", WRITERS, ids=lambda m: m.__name__.lower())
def test_a_source_path_that_does_not_exist_is_not_ready(tmp_path, make_nginx, mode) -> None:
    n = mode.start(make_nginx, tmp_path, tmp_path / "nowhere")
    agent = n.wait_for(lambda: (a := _agent_of(mode, n))["first_sync_done"] and a,
                       timeout=15, what="the agent past its first sync")
    assert agent["ready"] is False and agent["synced"] is False
    assert "does not exist" in agent["not_ready_because"]
    assert str(tmp_path / "nowhere") in agent["not_ready_because"]


def test_a_dict_too_small_then_enlarged_by_a_reload_lands_everything(tmp_path,
                                                                     make_nginx) -> None:
    mesh = faults._mesh(tmp_path, "big", 3000)
    expected = _expected(tmp_path, make_nginx, mesh)
    n = make_nginx(init_worker=_init_worker(mesh), user=USER, dict_size="1m",
                   extra_locations=faults.LOCATIONS).start()
    n.wait_for(lambda: n.status()["consumer"]["batches_failed"] >= 1, timeout=60,
               what="the batch refused by the 1m dict")
    old = {_agent_pid(n)}
    n._conf["dict_size"] = "64m"  # the operator enlarges the dict and reloads
    n.write_conf(init_worker=_init_worker(mesh))
    n.reload()
    pid = _new_agent(n, old)
    n.wait_for(lambda: _ready_in(n, pid), timeout=60, what="ready in the larger dict")
    actual = faults._digest(n)
    assert actual == expected, faults._diff(actual, expected)


def test_status_goes_to_its_own_dict_when_asked(tmp_path, make_nginx) -> None:
    """init_worker{status_dict = ...}: the status stays out of APISIX's version dict."""
    mesh = foundation._mesh(tmp_path)
    n = make_nginx(init_worker=_init_worker(mesh, status_dict="amesh-test"), user=USER)
    n.start()
    status = n.wait_for(lambda: (s := n.dump("amesh-test").get("amesh:status"))
                        and json.loads(s)["library"]["agent"]["ready"] and s,
                        what="ready, in the status dict")
    assert json.loads(status)["consumer"]["batches_applied"] >= 1
    assert "amesh:status" not in n.dump("xds-config-version")
    assert n.version() is not None


REFUSE = r"""
        location = /refuse {
            content_by_lua_block {
                ngx.shared["xds-config-version"]:set("amesh:refused:" .. ngx.var.arg_worker,
                    '{"worker":' .. ngx.var.arg_worker .. ',"count":1,'
                    .. '"refused":[{"key":"/routes/r1","error":"bad uri"}]}')
                ngx.say("ok")
            }
        }
"""


def test_what_apisix_refused_is_in_amesh_status(tmp_path, make_nginx) -> None:
    """amesh's APISIX provider lists the objects it refused per worker; the agent's status
    carries them, so one status shows what APISIX does not serve."""
    mesh = foundation._mesh(tmp_path)
    n = make_nginx(init_worker=_init_worker(mesh), user=USER,
                   extra_locations=faults.LOCATIONS + REFUSE).start()
    n.wait_for(lambda: _ready_in(n), what="ready")
    assert n.status()["apisix_refused"] == []
    n.get("/refuse?worker=1")
    refused = n.wait_for(lambda: n.status()["apisix_refused"], what="the refusal in status")
    assert refused == [{"worker": 1, "count": 1,
                        "refused": [{"key": "/routes/r1", "error": "bad uri"}]}]
