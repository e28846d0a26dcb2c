"""State-of-the-world ADS (StreamAggregatedResources) over the shared subscription state.

CDS/LDS responses are the full set of that type (absent = removed); EDS/RDS responses
carry only some resources (istiod pushes just the changed ones), so they merge per
resource and their removals come from our own unsubscribes. A request echoes the last
accepted version and the response's nonce; an empty nonce opens a fresh subscription.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from ..resources import TYPE_ORDER
from .subscriptions import Batch, Subscriptions, TypeState, log


class SotwProtocol:
    name = "sotw"

    def __init__(self, subs: Subscriptions) -> None:
        self.subs = subs

    def open(self, stub: Any, requests: Iterator[DiscoveryRequest], metadata: list) -> Any:
        return stub.StreamAggregatedResources(requests, metadata=metadata)

    def initial_requests(self, node: Node) -> list[DiscoveryRequest]:
        out = []
        for type_url in TYPE_ORDER:
            st = self.subs.states[type_url]
            if st.wildcard or st.names:  # never an empty EDS/RDS list on a fresh stream
                out.append(self._request(st))
        out[0].node.CopyFrom(node)  # only the first request of a stream carries the Node
        return out

    def on_response(self, resp: DiscoveryResponse) -> list[DiscoveryRequest]:
        st = self.subs.states.get(resp.type_url)
        if st is None:
            log.debug("xds ignoring a response of unrequested type %s", resp.type_url)
            return []
        st.nonce = resp.nonce
        st.last_push = time.time()
        batch = Batch(st, resp.version_info)
        for i, item in enumerate(resp.resources):
            batch.add(item, f"resources[{i}]")
        # A full-state type loses what is absent, unless an unreadable resource might be it.
        removed = st.held.keys() - batch.seen if st.wildcard and not batch.anonymous else ()
        rejected = self.subs.commit(batch, removed)
        out = [self._request(st, self.subs.conclude(st, resp.version_info, rejected))]
        change = self.subs.follow(st.type_url)
        if change is not None:
            child = change[0]
            # Empty names after a subscription existed is a deliberate unsubscribe-all
            # (istiod reads it so); before any subscription there is nothing to say.
            if child.names or child.requested:
                out.append(self._request(child))
        return out

    @staticmethod
    def _request(st: TypeState, error: Any = None) -> DiscoveryRequest:
        st.requested = True
        req = DiscoveryRequest(
            type_url=st.type_url,
            version_info=st.version,
            response_nonce=st.nonce,
            resource_names=() if st.wildcard else sorted(st.names),
        )
        if error is not None:
            req.error_detail.CopyFrom(error)
        return req
