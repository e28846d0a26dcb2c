"""Property tests of the subscription rules, without a network: whatever sequence of CDS
states arrives, the EDS subscription equals what the held clusters name, removals follow,
and no EDS request ever goes out with an empty list unless it deliberately unsubscribes."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryResponse,
    DiscoveryResponse,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource as DeltaResource
from hypothesis import given, settings
from hypothesis import strategies as st

from amesh_ext.xds.delta import DeltaProtocol
from amesh_ext.xds.sotw import SotwProtocol
from amesh_ext.xds.subscriptions import Subscriptions
from xds_server import CLUSTER, ENDPOINTS, LISTENER, FakeHandler, cluster, pack

NAMES = ["a", "b", "c", "d"]
# a CDS state: name -> EDS service name ("" = own name) or None for a STATIC cluster
states = st.lists(
    st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["", "svc-x", "svc-y", None])),
    min_size=1,
    max_size=8,
)


def wanted(state: dict[str, str | None]) -> set[str]:
    return {svc or name for name, svc in state.items() if svc is not None}


@settings(max_examples=150, deadline=None, database=None)
@given(states)
def test_sotw_eds_follows_cds(seq: list[dict[str, str | None]]) -> None:
    handler = FakeHandler()
    subs = Subscriptions(handler)
    proto = SotwProtocol(subs)
    first = proto.initial_requests(Node(id="n"))
    assert [r.type_url for r in first] == [CLUSTER, LISTENER]  # no EDS/RDS yet: no names
    eds_ever = False
    for i, state in enumerate(seq):
        resp = DiscoveryResponse(
            type_url=CLUSTER,
            version_info=f"v{i}",
            nonce=f"n{i}",
            resources=[pack(cluster(n, s)) for n, s in sorted(state.items())],
        )
        out = proto.on_response(resp)
        assert out[0].type_url == CLUSTER and out[0].response_nonce == f"n{i}"
        assert out[0].version_info == f"v{i}" and not out[0].HasField("error_detail")
        for req in out[1:]:
            assert req.type_url == ENDPOINTS
            assert set(req.resource_names) == wanted(state)
            assert req.resource_names or eds_ever  # empty only to end a real subscription
            eds_ever = eds_ever or bool(req.resource_names)
        assert handler.names(CLUSTER) == set(state)
        assert subs.states[ENDPOINTS].names == wanted(state)


@settings(max_examples=150, deadline=None, database=None)
@given(states)
def test_delta_eds_follows_cds(seq: list[dict[str, str | None]]) -> None:
    handler = FakeHandler()
    subs = Subscriptions(handler)
    proto = DeltaProtocol(subs)
    proto.initial_requests(Node(id="n"))
    server_view: set[str] = set()  # what the server believes we subscribe to
    previous: dict[str, str | None] = {}
    for i, state in enumerate(seq):
        changed = {n: s for n, s in state.items() if previous.get(n, "missing") != s}
        resp = DeltaDiscoveryResponse(
            type_url=CLUSTER,
            system_version_info=f"v{i}",
            nonce=f"n{i}",
            resources=[
                DeltaResource(name=n, version=f"{i}", resource=pack(cluster(n, s)))
                for n, s in sorted(changed.items())
            ],
            removed_resources=sorted(set(previous) - set(state)),
        )
        out = proto.on_response(resp)
        assert out[0].response_nonce == f"n{i}" and not out[0].HasField("error_detail")
        for req in out[1:]:
            assert req.type_url == ENDPOINTS and req.response_nonce == ""
            if not server_view:  # a first request: names, never the empty wildcard form
                assert req.resource_names_subscribe
            server_view |= set(req.resource_names_subscribe)
            server_view -= set(req.resource_names_unsubscribe)
        assert server_view == wanted(state)
        assert handler.names(CLUSTER) == set(state)
        previous = dict(state)
