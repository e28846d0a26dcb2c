"""Stream failures: Delta→SotW fallback, backoff, retries, clean re-subscription, stop()."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import grpc
import pytest

from xds_server import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    FakeHandler,
    XdsTestServer,
    cluster,
    endpoints,
    eventually,
    mesh,
    route,
    source,
)

PROTOCOLS = ["delta", "sotw"]


def synced(handler: FakeHandler) -> bool:
    return handler.wait_names(ROUTES, {"r1", "r2"}) and handler.wait_names(
        ENDPOINTS, {"c1", "svc2"}
    )


def thread_of(src: Any) -> threading.Thread:
    return src._client._thread


def test_delta_unimplemented_falls_back_to_sotw(srv: XdsTestServer, handler: FakeHandler) -> None:
    srv.delta_unimplemented = True
    src = source(srv.address, handler, "delta")
    try:
        assert synced(handler)
        assert [s.protocol for s in srv.streams] == ["delta", "sotw"]
        status = src.status()
        assert status["protocol"] == "sotw" and status["state"] == "connected"
        assert status["backoff_attempts"] == 0  # the fallback was immediate, not a failure
        # and it sticks: a later drop reconnects with SotW again
        srv.drop_streams()
        assert srv.wait_for(lambda: len(srv.streams) == 3)
        assert srv.streams[2].protocol == "sotw"
    finally:
        src.stop()


def test_backoff_grows_then_resets(srv: XdsTestServer, handler: FakeHandler) -> None:
    srv.fail_next(grpc.StatusCode.UNAVAILABLE, 4)
    # rand=1: every delay is its ceiling, 0.05 doubling; unreset, the 5th would be 0.8 s
    backoff = {"base_seconds": 0.05, "max_seconds": 1.6}
    src = source(srv.address, handler, "delta", rand=lambda: 1.0, backoff=backoff)
    try:
        assert synced(handler)
        opened = [s.opened_at for s in srv.streams]
        assert len(opened) == 5
        gaps = [b - a for a, b in itertools.pairwise(opened)]
        # lower bounds only: a loaded machine may add connection time, never remove delay
        for gap, ceiling in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
            assert gap >= ceiling * 0.9, gaps
        assert src.status()["reconnects"] == 4 and src.status()["backoff_attempts"] == 0
        assert src.status()["connections"] == 1  # refused attempts are not connections

        # the stream answered, so the next drop starts again from the base delay
        dropped = time.monotonic()
        srv.drop_streams()
        assert srv.wait_for(lambda: len(srv.streams) == 6)
        assert 0.04 <= srv.streams[5].opened_at - dropped < 0.6
    finally:
        src.stop()


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_refused_streams_are_retried(
    code: grpc.StatusCode, srv: XdsTestServer, handler: FakeHandler
) -> None:
    srv.fail_next(code, 2, "go away")
    src = source(srv.address, handler, "sotw")
    try:
        assert synced(handler)
        assert len(srv.streams) == 3
        status = src.status()
        assert status["last_error"] == f"{code.name}: go away"
        assert status["reconnects"] == 2
    finally:
        src.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_clean_end_of_stream_reconnects(
    protocol: str, srv: XdsTestServer, handler: FakeHandler
) -> None:
    src = source(srv.address, handler, protocol)
    try:
        assert synced(handler)
        srv.drop_streams(None)  # the server returns OK: still a lost subscription
        assert srv.wait_for(lambda: len(srv.streams) == 2 and bool(srv.sent_of(ROUTES, 2)))
        assert src.status()["last_error"] == "stream closed by the server"
    finally:
        src.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reconnect_resubscribes_and_converges(
    protocol: str, srv: XdsTestServer, handler: FakeHandler
) -> None:
    src = source(srv.address, handler, protocol)
    try:
        assert synced(handler)
        assert srv.settled()
        first = {t: srv.sent_of(t)[-1] for t in (CLUSTER, ENDPOINTS, LISTENER, ROUTES)}
        held_versions = {
            t: {n: r.version for n, r in handler.state[t].items()} for t in handler.state
        }
        calls = len(handler.calls)

        srv.fail_next(grpc.StatusCode.UNAVAILABLE, 3)
        srv.drop_streams()
        # the mesh changes while we are away
        srv.remove(CLUSTER, "c1")
        srv.remove(ENDPOINTS, "c1")
        srv.update(CLUSTER, cluster("c5", "svc5"))
        srv.update(ENDPOINTS, endpoints("svc5", "10.0.0.5"))
        srv.update(ROUTES, route("r1", "changed.example"))
        assert srv.wait_for(lambda: len(srv.streams) >= 4)  # three refused attempts
        assert handler.calls[calls:] == []  # nothing removed (or touched) while disconnected
        assert src.status()["state"] in ("backoff", "connecting")
        assert handler.names(CLUSTER) == {"c1", "c2", "static"}

        assert handler.wait_names(CLUSTER, {"c2", "static", "c5"})
        assert handler.wait_names(ENDPOINTS, {"svc2", "svc5"})
        assert handler.wait(
            lambda: handler.state[ROUTES]["r1"].message().virtual_hosts[0].domains
            == ["changed.example"]
        )
        assert "c1" in handler.removed(CLUSTER) and "c1" in handler.removed(ENDPOINTS)

        new = srv.streams[-1].id
        reqs = [r for r in srv.requests if r.stream == new]
        assert reqs[0].node is not None and all(r.node is None for r in reqs[1:])
        initial = {}
        for r in reqs:
            initial.setdefault(r.type_url, r)
        assert list(initial)[:2] == [CLUSTER, ENDPOINTS]  # EDS resubscribed from held CDS
        assert initial[ENDPOINTS].names == ["c1", "svc2"]
        assert initial[ROUTES].names == ["r1", "r2"]
        for type_url, req in initial.items():
            assert req.nonce == ""  # a fresh subscription: the server answers in full
            if protocol == "delta":
                assert req.initial_versions == held_versions[type_url], type_url
            else:
                assert req.version == first[type_url].version
    finally:
        src.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_restart_on_same_port(protocol: str, handler: FakeHandler) -> None:
    srv = XdsTestServer().start()
    mesh(srv)
    src = source(srv.address, handler, protocol)
    try:
        assert synced(handler)
        srv.stop()
        assert eventually(lambda: src.status()["state"] != "connected")
        calls = len(handler.calls)
        srv2 = XdsTestServer(port=srv.port)  # the client keeps dialling the same address
        mesh(srv2)
        srv2.remove(CLUSTER, "static")
        srv2.start()
        try:
            assert handler.wait_names(CLUSTER, {"c1", "c2"}, timeout=10)
            assert [c.removed for c in handler.calls[calls:] if c.type_url == CLUSTER] == [
                ["static"]
            ]
            assert src.status()["state"] == "connected"
        finally:
            srv2.stop()
    finally:
        src.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stop_is_bounded_when_connected(
    protocol: str, srv: XdsTestServer, handler: FakeHandler
) -> None:
    src = source(srv.address, handler, protocol)
    assert synced(handler)
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 1.0
    assert not thread_of(src).is_alive()
    assert src.status()["state"] == "stopped"
    assert srv.wait_for(lambda: not any(s.active for s in srv.streams))


def test_stop_is_bounded_during_backoff(handler: FakeHandler) -> None:
    with XdsTestServer() as srv:
        srv.fail_next(grpc.StatusCode.UNAVAILABLE, 100)
        from amesh_ext.sources.ads import AdsConfig, AdsSource

        conf = AdsConfig.from_mapping(
            {
                "address": srv.address,
                "node": {"pod_name": "p", "namespace": "n", "ip": "10.0.0.1"},
                "backoff": {"base_seconds": 20, "max_seconds": 30},
            },
            env={},
        )
        src = AdsSource(conf, handler, rand=lambda: 1.0)
        src.start()
        assert srv.wait_for(lambda: len(srv.streams) == 1)
        assert eventually(lambda: src.status()["state"] == "backoff")
        assert src.status()["backoff_seconds"] == 20.0
        t0 = time.monotonic()
        src.stop()
        assert time.monotonic() - t0 < 1.0
        assert not thread_of(src).is_alive()


def test_stop_before_connect_and_twice(handler: FakeHandler) -> None:
    # nothing listens on this address: connecting fails, stop() must still be quick
    src = source("grpc://127.0.0.1:1", handler, "delta")
    t0 = time.monotonic()
    src.stop()
    src.stop()
    assert time.monotonic() - t0 < 1.0
    assert handler.calls == []


def test_connection_refused_is_reported(handler: FakeHandler) -> None:
    src = source("grpc://127.0.0.1:1", handler, "sotw")
    try:
        assert eventually(lambda: src.status()["reconnects"] >= 2)
        status = src.status()
        assert status["reconnects"] >= 2 and status["last_error"].startswith("UNAVAILABLE")
        assert status["state"] in ("backoff", "connecting")
    finally:
        src.stop()
