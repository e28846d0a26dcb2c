"""A hostile control plane, end to end through the agent's real wiring (runtime.run_agent:
the ADS source, the agent, the sink and the protocol's reference writer): streams cut in
the middle of pushes, the server killed and restarted on another config, garbage bytes,
duplicate names, invalid resources among valid ones, key-injection names, a server that
never answers, and (marked long) 100,000 resources in one ~100 MiB response. After each
fault the dict is compared key by key with what a fresh agent on the server's final
config writes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from google.protobuf.any_pb2 import Any as AnyMsg

from amesh_ext.config import parse_start_config
from amesh_ext.native import MemoryQueue
from amesh_ext.protocol import KEY_LOG_PREFIX, invariant_problems, is_data_key
from amesh_ext.runtime import run_agent
from xds_server import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    NODE,
    ROUTES,
    XdsTestServer,
    cluster,
    endpoints,
    eventually,
    listener,
    mesh,
    pack,
    route,
)

PROTOCOLS = ["sotw", "delta"]


class Run:
    """One agent (run_agent on its own thread) and the dict it writes."""

    def __init__(self, address: str, protocol: str, **xds: object) -> None:
        self.queue = MemoryQueue()
        self.config = parse_start_config(json.dumps({
            "source": address if "://" in address else f"grpc://{address}",
            "xds": {"protocol": protocol, "node": NODE,
                    "backoff": {"base_seconds": 0.05, "max_seconds": 0.3}, **xds},
            "limits": {"status_interval": 0.02, "first_sync_max_wait": 1.0}}))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_agent, args=(self.config, self.queue,
                                                               self.stop), daemon=True)
        self.thread.start()

    def status(self) -> dict:
        return json.loads(self.queue.status) or {}

    def ready(self) -> bool:
        return bool(self.status().get("ready"))

    def dict(self) -> dict[str, bytes]:
        """The dict without the change log (its entries name the run)."""
        return {k: v for k, v in self.queue.snapshot().items()
                if not k.startswith(KEY_LOG_PREFIX)}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@contextmanager
def agent(address: str, protocol: str, **xds: object) -> Iterator[Run]:
    run = Run(address, protocol, **xds)
    try:
        yield run
    finally:
        run.close()


def _fresh_dict(srv: XdsTestServer, protocol: str) -> dict[str, bytes]:
    with agent(srv.address, protocol) as fresh:
        assert eventually(fresh.ready), fresh.status().get("not_ready_because")
        return fresh.dict()


def _converged(run: Run, srv: XdsTestServer, protocol: str) -> None:
    expected = _fresh_dict(srv, protocol)
    assert eventually(lambda: run.ready() and run.dict() == expected), {
        "missing": sorted(expected.keys() - run.dict().keys())[:5],
        "left over": sorted(run.dict().keys() - expected.keys())[:5]}
    assert invariant_problems(run.queue.snapshot()) == []


def _raw_cluster_push(srv: XdsTestServer, items: list[tuple[str, AnyMsg]]) -> None:
    """A SotW or Delta response of hand-made CDS resources (Delta name, resource), on every
    open stream."""
    from envoy.service.discovery.v3.discovery_pb2 import Resource as DeltaResource

    delta = [DeltaResource(name=name, version="1", resource=a) for name, a in items]
    srv.push_raw(CLUSTER, [a for _, a in items] + delta)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streams_cut_mid_push_and_a_restarted_server_converge(protocol: str) -> None:
    srv = XdsTestServer().start()
    mesh(srv)
    try:
        with agent(srv.address, protocol) as run:
            assert eventually(run.ready)
            for i in range(20):  # pushes with streams cut in between (and mid-way)
                srv.update(ENDPOINTS, endpoints("c1", f"10.0.1.{i + 1}"))
                srv.update(CLUSTER, cluster(f"extra-{i}", None))
                srv.push()
                if i % 3 == 0:
                    srv.drop_streams()
            # The control plane dies and comes back on the same port with less config.
            port = srv.port
            srv.stop()
            srv = XdsTestServer(port=port).start()
            mesh(srv)
            srv.update(ENDPOINTS, endpoints("c1", "10.0.9.9"))
            _converged(run, srv, protocol)
            hosts = {json.loads(v)["nodes"][0]["host"] for k, v in run.dict().items()
                     if k.startswith("/upstreams/") and json.loads(v).get("nodes")}
            assert "10.0.9.9" in hosts and not any(h.startswith("10.0.1.") for h in hosts)
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_garbage_duplicates_and_invalid_resources_are_rejected_alone(protocol: str) -> None:
    with XdsTestServer() as srv:
        mesh(srv)
        with agent(srv.address, protocol) as run:
            assert eventually(run.ready)
            before = run.dict()
            garbage = AnyMsg(type_url=CLUSTER, value=b"\xff\x00garbage\x12")
            zero = cluster("weight-zero", None)
            lb = zero.load_assignment.endpoints.add().lb_endpoints.add()
            lb.endpoint.address.socket_address.address = "10.0.0.7"
            lb.endpoint.address.socket_address.port_value = 80
            lb.load_balancing_weight.value = 0
            good = pack(cluster("good", None))
            _raw_cluster_push(srv, [("garbage", garbage), ("weight-zero", pack(zero)),
                                    ("good", good), ("good", good)])
            # Each bad one is rejected with its reason; the good one lands, the rest stays.
            rejected = lambda: run.status().get("rejected", {}).get("cds", {})  # noqa: E731
            assert eventually(lambda: "weight-zero" in rejected() and len(rejected()) >= 2)
            assert "weight 0" in rejected()["weight-zero"]
            assert eventually(lambda: any(b'"good"' in v for v in run.dict().values()))
            data = {k: v for k, v in before.items() if is_data_key(k)}
            assert data.items() <= run.dict().items()  # nothing of the last good config lost
            assert invariant_problems(run.queue.snapshot()) == []
            # The server goes back to its config: the dict becomes a fresh agent's.
            if protocol == "delta":
                srv.push_raw(CLUSTER, [], removed=["good"])
            else:
                srv.push(CLUSTER)
            _converged(run, srv, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_key_injection_names_stay_inside_their_keys(protocol: str) -> None:
    names = ["a\n/routes/evil", "../../upstreams/x", "amesh:index:00", "amesh:log:head",
             "version", "x" * 300, "ok|80||svc.ns.svc.cluster.local", "\u00e9/\u2603"]
    with XdsTestServer() as srv:
        mesh(srv)
        srv.set_resources(CLUSTER, [*srv._resources[CLUSTER].values(),
                                    *(cluster(n, None) for n in names)])
        with agent(srv.address, protocol) as run:
            assert eventually(run.ready)
            _converged(run, srv, protocol)
            data = run.queue.snapshot()
            # Every object stays under its own key, and no name became a key of its own.
            objects = {k for k in data if is_data_key(k)}
            assert all(k.count("/") == 2 for k in objects), objects
            assert "/routes/evil" not in data and data.get("version") is None
            assert data["amesh:log:head"].decode().count(":") == 1
            upstreams = [json.loads(v) for k, v in data.items() if k.startswith("/upstreams/")]
            seen = {u["name"] for u in upstreams}
            assert seen >= set(names) - {"x" * 300}
            assert any(n.startswith("x" * 100) for n in seen)  # a long name, shortened


def test_a_server_that_never_answers_leaves_the_agent_not_ready() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (in the kernel), never speaks HTTP/2
    try:
        with agent(f"127.0.0.1:{silent.getsockname()[1]}", "delta") as run:
            # The stream is open (TCP connected) but no response ever comes.
            assert eventually(lambda: run.status().get("source", {}).get("state")
                              not in (None, "idle"))
            status = run.status()
            assert not status["source"]["types"]["cds"]["acks"]
            assert status["ready"] is False and status["first_sync_done"] is False
            assert not [k for k in run.queue.snapshot() if is_data_key(k)]
    finally:
        silent.close()


@pytest.mark.long
@pytest.mark.parametrize("protocol", ["delta"])
def test_a_hundred_thousand_resources_in_one_huge_response(protocol: str) -> None:
    """100,000 clusters (~1 KB each: ~100 MiB of CDS) in one response, then the mesh
    shrinks to three services: the dict ends as a fresh agent's."""
    with XdsTestServer() as srv:
        mesh(srv)
        padding = "p" * 900
        big = [cluster(f"bulk-{i}-{padding}", None) for i in range(100_000)]
        srv.set_resources(CLUSTER, [*srv._resources[CLUSTER].values(), *big])
        with agent(srv.address, protocol) as run:
            assert eventually(lambda: run.status().get("resources", {}).get("cds", 0) > 100_000,
                              timeout=600)
            assert eventually(run.ready, timeout=300)
            mesh(srv)
            srv.set_resources(CLUSTER, [cluster("c1"), cluster("c2", "svc2"),
                                        cluster("static", None)])
            srv.set_resources(LISTENER, [listener("l1", "r1", default_route="r2")])
            srv.set_resources(ROUTES, [route("r1", "a.example"), route("r2", "b.example")])
            srv.push()
            _converged(run, srv, protocol)
