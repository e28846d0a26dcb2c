"""ADS over real gRPC on loopback, in both wire protocols: ACK/NACK, subscriptions that follow
CDS/LDS, incremental EDS, per-resource rejection, large responses, Node, status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.discovery.v3.discovery_pb2 import Resource as DeltaResource
from google.rpc import code_pb2

from amesh_ext.resources import TYPE_ORDER
from xds_server import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    FakeHandler,
    XdsTestServer,
    cluster,
    endpoints,
    listener,
    pack,
    route,
    source,
)

PROTOCOLS = ["delta", "sotw"]


@pytest.fixture(params=PROTOCOLS)
def client(request: Any, srv: XdsTestServer, handler: FakeHandler) -> Iterator[Any]:
    src = source(srv.address, handler, request.param)
    assert handler.wait_names(ROUTES, {"r1", "r2"}), handler.calls
    assert srv.settled()
    yield src
    src.stop()


def synced(srv: XdsTestServer, type_url: str, after: int = 0) -> Any:
    """The last response of a type (beyond the first `after` ones) and the client's reply."""
    assert srv.wait_for(lambda: len(srv.sent_of(type_url)) > after)
    sent = srv.sent_of(type_url)[-1]
    return sent, srv.wait_reply(sent)


def test_initial_sync_and_acks(client: Any, srv: XdsTestServer, handler: FakeHandler) -> None:
    assert handler.names(CLUSTER) == {"c1", "c2", "static"}
    assert handler.names(ENDPOINTS) == {"c1", "svc2"}
    assert handler.names(LISTENER) == {"l1"}
    for type_url in TYPE_ORDER:
        for sent in srv.sent_of(type_url):
            reply = srv.wait_reply(sent)
            assert not reply.is_nack
            if sent.protocol == "sotw":
                assert reply.version == sent.version  # ACK echoes the accepted version
    status = client.status()
    assert status["state"] == "connected" and status["server"] == srv.address
    assert status["protocol"] in PROTOCOLS and status["connected_since"] is not None
    assert status["reconnects"] == 0 and status["last_error"] is None
    for short in ("cds", "eds", "lds", "rds"):
        t = status["types"][short]
        assert t["version"] == srv.version and t["acks"] >= 1 and t["nacks"] == 0
        assert t["last_push"] is not None and t["nonce"]
    assert status["types"]["eds"]["subscribed"] == 2 and status["types"]["cds"]["resources"] == 3


def test_subscription_requests(client: Any, srv: XdsTestServer) -> None:
    eds = srv.requests_of(ENDPOINTS)
    rds = srv.requests_of(ROUTES)
    # the first EDS/RDS requests name exactly what the clusters and listeners reference
    assert eds[0].names == ["c1", "svc2"] and eds[0].nonce == ""
    assert rds[0].names == ["r1", "r2"]
    for req in srv.requests_of(CLUSTER) + srv.requests_of(LISTENER):
        assert req.names == []  # wildcard
    # order of the first requests: CDS, then LDS; EDS after the CDS answer
    first = [r.type_url for r in srv.requests if r.stream == 1]
    assert first[:2] == [CLUSTER, LISTENER]
    assert first.index(ENDPOINTS) > first.index(CLUSTER)


def test_node_on_first_request_only(client: Any, srv: XdsTestServer) -> None:
    reqs = [r for r in srv.requests if r.stream == 1]
    assert reqs[0].node is not None
    assert all(r.node is None for r in reqs[1:])
    node = reqs[0].node
    assert node.id == "sidecar~10.1.2.3~web-0.shop~shop.svc.cluster.local"
    meta = node.metadata
    assert meta["NAMESPACE"] == "shop" and meta["INTERCEPTION_MODE"] == "NONE"
    assert meta["INSTANCE_IPS"] == "10.1.2.3" and meta["CLUSTER_ID"] == "Kubernetes"


def test_eds_follows_cds(client: Any, srv: XdsTestServer, handler: FakeHandler) -> None:
    protocol = client.status()["protocol"]
    srv.update(CLUSTER, cluster("c3", "svc3"))
    srv.update(ENDPOINTS, endpoints("svc3", "10.0.0.3"))
    srv.push(CLUSTER)
    assert handler.wait_names(ENDPOINTS, {"c1", "svc2", "svc3"})
    if protocol == "delta":  # a subscription change goes alone, without a nonce
        change = [r for r in srv.requests_of(ENDPOINTS) if not r.nonce][-1]
        assert change.names == ["svc3"] and change.unsubscribe == []
    else:
        assert srv.requests_of(ENDPOINTS)[-1].names == ["c1", "svc2", "svc3"]

    srv.remove(CLUSTER, "c1")
    srv.push(CLUSTER)
    assert handler.wait_names(CLUSTER, {"c2", "c3", "static"})
    assert handler.wait_names(ENDPOINTS, {"svc2", "svc3"})  # unsubscribed => removed
    assert "c1" in handler.removed(ENDPOINTS) and "c1" in handler.removed(CLUSTER)
    assert srv.wait_for(lambda: _eds_names(srv, protocol) == {"svc2", "svc3"})
    assert client.status()["types"]["eds"]["subscribed"] == 2


def _eds_names(srv: XdsTestServer, protocol: str) -> set[str]:
    reqs = [r for r in srv.requests_of(ENDPOINTS) if not r.nonce or protocol == "sotw"]
    if protocol == "sotw":
        return set(reqs[-1].names)
    names: set[str] = set()
    for r in reqs:
        names = (names | set(r.names)) - set(r.unsubscribe)
    return names


def test_rds_follows_lds(client: Any, srv: XdsTestServer, handler: FakeHandler) -> None:
    srv.set_resources(LISTENER, [listener("l1", "r1"), listener("l2", "r3")])
    srv.update(ROUTES, route("r3"))
    srv.push(LISTENER)
    assert handler.wait_names(ROUTES, {"r1", "r3"})
    assert "r2" in handler.removed(ROUTES)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_eds_request_without_eds_clusters(protocol: str, handler: FakeHandler) -> None:
    with XdsTestServer() as srv:
        srv.set_resources(CLUSTER, [cluster("s1", None)])
        srv.set_resources(LISTENER, [listener("tcp")])  # no HCM, no RDS
        src = source(srv.address, handler, protocol)
        try:
            assert handler.wait_names(CLUSTER, {"s1"}) and handler.wait_names(LISTENER, {"tcp"})
            synced(srv, LISTENER)
            # a new stream of the same client re-subscribes: still nothing for EDS/RDS
            srv.drop_streams()
            assert srv.wait_for(lambda: len(srv.streams) == 2 and bool(srv.sent_of(LISTENER, 2)))
            synced(srv, LISTENER)
            assert srv.requests_of(ENDPOINTS) == [] and srv.requests_of(ROUTES) == []
        finally:
            src.stop()


def test_all_eds_clusters_gone_is_a_deliberate_unsubscribe(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    protocol = client.status()["protocol"]
    before = len(srv.requests_of(ENDPOINTS))
    n = len(srv.sent_of(CLUSTER))
    srv.set_resources(CLUSTER, [cluster("static", None)])
    srv.push(CLUSTER)
    assert handler.wait_names(ENDPOINTS, set())
    assert srv.wait_for(lambda: len(srv.requests_of(ENDPOINTS)) > before)
    synced(srv, CLUSTER, n)
    change = srv.requests_of(ENDPOINTS)[before:]
    assert len(change) == 1
    if protocol == "sotw":
        assert change[0].names == []  # sent once, on purpose: istiod reads it as unsubscribe
    else:
        assert change[0].names == [] and sorted(change[0].unsubscribe) == ["c1", "svc2"]
    # a cluster coming back subscribes again
    srv.update(CLUSTER, cluster("c1"))
    srv.push(CLUSTER)
    assert handler.wait_names(ENDPOINTS, {"c1"})


def test_incremental_eds_merges(client: Any, srv: XdsTestServer, handler: FakeHandler) -> None:
    calls = len(handler.calls)
    srv.update(ENDPOINTS, endpoints("c1", "10.0.0.1", "10.0.0.9"))
    n = len(srv.sent_of(ENDPOINTS))
    srv.push(ENDPOINTS, names=["c1"])  # istiod's incremental EDS: only the changed one
    assert handler.wait(lambda: len(handler.calls) > calls)
    assert handler.names(ENDPOINTS) == {"c1", "svc2"}  # svc2 untouched
    applied = handler.calls[-1]
    assert list(applied.upserts) == ["c1"] and applied.removed == []
    _, reply = synced(srv, ENDPOINTS, n)
    assert not reply.is_nack


def test_unchanged_push_is_not_reapplied(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    calls = len(handler.calls)
    counts = {t: len(srv.sent_of(t)) for t in TYPE_ORDER}
    srv.push(full=True)  # same content, fresh nonces
    for type_url in TYPE_ORDER:
        synced(srv, type_url, counts[type_url])
    assert handler.calls[calls:] == []


def test_bad_resources_nacked_good_ones_applied(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    protocol = client.status()["protocol"]
    version_before = client.status()["types"]["cds"]["version"]
    good = cluster("c9", None)
    wrong_type = pack(route("sneaky"))
    garbage = pack(cluster("g"))
    garbage.value = b"\xff\xff\xff"
    if protocol == "sotw":
        items: list[Any] = [pack(c) for c in (cluster("c1"), cluster("c2", "svc2"), good)]
        items += [wrong_type, garbage]
    else:
        items = [
            DeltaResource(name="c9", version="1", resource=pack(good)),
            DeltaResource(name="sneaky", version="1", resource=wrong_type),
            DeltaResource(name="g", version="1", resource=garbage),
            DeltaResource(name="liar", version="1", resource=pack(cluster("other"))),
        ]
    n = len(srv.sent_of(CLUSTER))
    srv.push_raw(CLUSTER, items)
    _, reply = synced(srv, CLUSTER, n)
    assert reply.is_nack and reply.error.code == code_pb2.INVALID_ARGUMENT
    assert handler.wait(lambda: "c9" in handler.names(CLUSTER))
    msg = reply.error.message
    if protocol == "sotw":
        assert reply.version == version_before  # the last accepted version stays
        assert "resources[3]" in msg and "resources[4]" in msg and "cannot decode" in msg
        # an unreadable resource might be an existing one: nothing is removed on its account
        assert "static" in handler.names(CLUSTER)
    else:
        assert "sneaky" in msg and "g: cannot decode" in msg and "liar" in msg
    status = client.status()["types"]["cds"]
    assert status["nacks"] == 1 and status["version"] == version_before
    assert status["last_nack"] == msg
    # the next good push is ACKed again
    srv.push(CLUSTER, full=True)
    _, reply = synced(srv, CLUSTER, n + 1)
    assert not reply.is_nack


def test_handler_rejection_is_nacked(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    handler.reject["c2"] = "upstream c2: unsupported lb policy"
    srv.update(CLUSTER, cluster("c2", "svc2", stat="changed"), cluster("c4", None))
    n = len(srv.sent_of(CLUSTER))
    srv.push(CLUSTER)
    _, reply = synced(srv, CLUSTER, n)
    assert reply.is_nack
    assert reply.error.message == "1 resource(s) rejected: c2: upstream c2: unsupported lb policy"
    assert handler.wait(lambda: "c4" in handler.names(CLUSTER))
    # c2 keeps its last good version, so its EDS subscription stays
    assert handler.names(ENDPOINTS) == {"c1", "svc2"}
    assert client.status()["types"]["cds"]["resources"] == 4

    del handler.reject["c2"]
    srv.update(CLUSTER, cluster("c2", "svc2", stat="fixed"))
    srv.push(CLUSTER)
    _, reply = synced(srv, CLUSTER, n + 1)
    assert not reply.is_nack
    assert handler.state[CLUSTER]["c2"].message().alt_stat_name == "fixed"


def test_revert_to_last_good_reaches_the_handler(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    """After a NACK the server goes back to the version we hold (istiod does when the bad
    config is removed): the bytes are unchanged, yet the handler must hear of them to drop
    its rejection."""
    handler.reject["c2"] = "bad"
    srv.update(CLUSTER, cluster("c2", "svc2", stat="bad"))
    n = len(srv.sent_of(CLUSTER))
    srv.push(CLUSTER)
    assert synced(srv, CLUSTER, n)[1].is_nack
    assert client.status()["types"]["cds"]["rejected"] == 1
    del handler.reject["c2"]
    calls = len(handler.calls)
    srv.update(CLUSTER, cluster("c2", "svc2"))  # the original bytes
    srv.push(CLUSTER)
    assert not synced(srv, CLUSTER, n + 1)[1].is_nack
    assert any("c2" in c.upserts for c in handler.calls[calls:])
    assert client.status()["types"]["cds"]["rejected"] == 0
    # Once accepted, the same bytes again are a no-op for the handler.
    calls = len(handler.calls)
    srv.push(CLUSTER, full=True)
    assert not synced(srv, CLUSTER, n + 2)[1].is_nack
    assert not any("c2" in c.upserts for c in handler.calls[calls:])


def test_handler_exception_nacks_and_keeps_stream(
    client: Any, srv: XdsTestServer, handler: FakeHandler
) -> None:
    def boom(*args: Any) -> dict[str, str]:
        raise RuntimeError("kaput")

    original = handler.apply
    handler.apply = boom  # type: ignore[method-assign]
    srv.update(LISTENER, listener("l9"))
    n = len(srv.sent_of(LISTENER))
    srv.push(LISTENER)
    _, reply = synced(srv, LISTENER, n)
    assert reply.is_nack and "handler failed" in reply.error.message
    handler.apply = original  # type: ignore[method-assign]
    srv.push(LISTENER, full=True)  # istiod resends only on change; force it
    assert handler.wait_names(LISTENER, {"l1", "l9"})
    assert len(srv.streams) == 1


def test_cds_removal_in_full_state(client: Any, srv: XdsTestServer, handler: FakeHandler) -> None:
    srv.set_resources(CLUSTER, [cluster("c1")])
    srv.push(CLUSTER)
    assert handler.wait_names(CLUSTER, {"c1"})
    assert sorted(handler.removed(CLUSTER)) == ["c2", "static"]
    assert handler.wait_names(ENDPOINTS, {"c1"})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_large_response(protocol: str, handler: FakeHandler) -> None:
    # 1,200 clusters of ~4 KB each: about 5 MB in one CDS response (gRPC's default is 4 MiB)
    clusters = [cluster(f"outbound|80||svc-{i}.ns", None, stat="x" * 4000) for i in range(1200)]
    with XdsTestServer() as srv:
        srv.set_resources(CLUSTER, clusters)
        src = source(srv.address, handler, protocol)
        try:
            assert handler.wait(lambda: len(handler.names(CLUSTER)) == 1200, timeout=20)
            _, reply = synced(srv, CLUSTER)
            assert not reply.is_nack
            assert sum(len(r.raw) for r in handler.state[CLUSTER].values()) > 4 << 20
        finally:
            src.stop()
