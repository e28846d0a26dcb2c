"""Incremental ADS (DeltaAggregatedResources) over the shared subscription state.

Each response carries changed resources and removed names; we answer with the nonce
alone (ACK) or with error_detail (NACK). Subscription changes go in separate requests
without a nonce: istiod treats a nonce-bearing request that changes names as an error.
On a new stream, initial_resource_versions tells the server what we still hold so it
can send only what changed and name what was removed while we were away.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
)

from ..resources import TYPE_ORDER
from .subscriptions import Batch, Subscriptions, TypeState, log


class DeltaProtocol:
    name = "delta"

    def __init__(self, subs: Subscriptions) -> None:
        self.subs = subs

    def open(self, stub: Any, requests: Iterator[DeltaDiscoveryRequest], metadata: list) -> Any:
        return stub.DeltaAggregatedResources(requests, metadata=metadata)

    def initial_requests(self, node: Node) -> list[DeltaDiscoveryRequest]:
        out = [
            self._first(st)
            for st in (self.subs.states[t] for t in TYPE_ORDER)
            # A first request without names is a wildcard subscription: only CDS/LDS may.
            if st.wildcard or st.names
        ]
        out[0].node.CopyFrom(node)
        return out

    def on_response(self, resp: DeltaDiscoveryResponse) -> list[DeltaDiscoveryRequest]:
        st = self.subs.states.get(resp.type_url)
        if st is None:
            log.debug("xds ignoring a response of unrequested type %s", resp.type_url)
            return []
        st.nonce = resp.nonce
        st.last_push = time.time()
        batch = Batch(st, resp.system_version_info)
        for item in resp.resources:
            if not item.HasField("resource"):
                batch.reject(item.name, "has no resource body")
                continue
            batch.add(item.resource, item.name, name=item.name, version=item.version)
        removed = set(resp.removed_resources)
        removed.update(r.name for r in resp.removed_resource_names)
        rejected = self.subs.commit(batch, removed)
        ack = DeltaDiscoveryRequest(type_url=st.type_url, response_nonce=resp.nonce)
        error = self.subs.conclude(st, resp.system_version_info, rejected)
        if error is not None:
            ack.error_detail.CopyFrom(error)
        out = [ack]
        change = self.subs.follow(st.type_url)
        if change is not None:
            child, added, removed_names = change
            if not child.requested:
                if added:  # the follower's first request on this stream
                    out.append(self._first(child))
            else:
                out.append(
                    DeltaDiscoveryRequest(
                        type_url=child.type_url,
                        resource_names_subscribe=sorted(added),
                        resource_names_unsubscribe=sorted(removed_names),
                    )
                )
        return out

    @staticmethod
    def _first(st: TypeState) -> DeltaDiscoveryRequest:
        st.requested = True
        req = DeltaDiscoveryRequest(
            type_url=st.type_url,
            resource_names_subscribe=() if st.wildcard else sorted(st.names),
        )
        req.initial_resource_versions.update(st.versions())
        return req
