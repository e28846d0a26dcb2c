"""A Python ADS control plane for tests: SotW and Delta, istiod-like, with fault injection.

It answers like istiod does (pilot/pkg/xds ads.go / delta.go): an empty nonce is a fresh
subscription answered in full, a stale nonce is ignored, an ACK or NACK gets no answer, a
name change gets the requested resources, an empty EDS/RDS list unsubscribes. Tests set
resources per type, `push()` them, read `requests` / `sent` / `streams`, and inject faults.

Also here: `FakeHandler` (a ResourceHandler that records and can reject) and builders for
the four resource types.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.endpoint.v3.endpoint_components_pb2 import (
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
    Rds,
)
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource as DeltaResource
from google.protobuf.any_pb2 import Any as AnyMsg
from google.protobuf.message import Message

from amesh_ext.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    TYPE_ORDER,
    Resource,
    message_class,
    name_of,
)

WILDCARD = frozenset({CLUSTER, LISTENER})
WAIT = 5.0  # seconds any test waits for something that should happen at once

# -- resource builders ------------------------------------------------------------------


def cluster(name: str, eds: str | None = "", *, stat: str = "") -> Cluster:
    """An EDS cluster (eds='' = named by its own name, eds='x' = service_name x);
    eds=None = a STATIC cluster that needs no EDS."""
    c = Cluster(name=name, alt_stat_name=stat)
    if eds is None:
        c.type = Cluster.STATIC
    else:
        c.type = Cluster.EDS
        c.eds_cluster_config.service_name = eds
    return c


def endpoints(name: str, *ips: str, port: int = 80) -> ClusterLoadAssignment:
    lbs = [
        LbEndpoint(
            endpoint=Endpoint(
                address=Address(socket_address=SocketAddress(address=ip, port_value=port))
            )
        )
        for ip in ips
    ]
    return ClusterLoadAssignment(
        cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=lbs)]
    )


def _hcm_chain(route: str) -> FilterChain:
    hcm = HttpConnectionManager(stat_prefix=route, rds=Rds(route_config_name=route))
    typed = AnyMsg()
    typed.Pack(hcm)
    return FilterChain(
        filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=typed)]
    )


def listener(name: str, *routes: str, default_route: str | None = None) -> Listener:
    lst = Listener(name=name, filter_chains=[_hcm_chain(r) for r in routes])
    if default_route:
        lst.default_filter_chain.CopyFrom(_hcm_chain(default_route))
    return lst


def route(name: str, *domains: str) -> RouteConfiguration:
    return RouteConfiguration(
        name=name, virtual_hosts=[VirtualHost(name=name, domains=list(domains) or ["*"])]
    )


def pack(msg: Message, type_url: str | None = None) -> AnyMsg:
    any_msg = AnyMsg()
    any_msg.Pack(msg)
    if type_url is not None:
        any_msg.type_url = type_url
    return any_msg


def eventually(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll a condition nobody signals (a client's status), in tiny steps."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- the fake handler --------------------------------------------------------------------


@dataclass
class Applied:
    type_url: str
    upserts: dict[str, Resource]
    removed: list[str]


class FakeHandler:
    """Records every apply(); `reject[name] = reason` makes it refuse that resource."""

    def __init__(self) -> None:
        self.calls: list[Applied] = []
        self.state: dict[str, dict[str, Resource]] = {t: {} for t in TYPE_ORDER}
        self.reject: dict[str, str] = {}
        self.noted: dict[str, str] = {}  # what the client refused before apply()
        self._cond = threading.Condition()

    def apply(self, type_url: str, upserts: Any, removed: Any) -> dict[str, str]:
        with self._cond:
            self.calls.append(Applied(type_url, {r.name: r for r in upserts}, list(removed)))
            reasons = {}
            for res in upserts:
                if res.name in self.reject:
                    reasons[res.name] = self.reject[res.name]
                else:
                    res.message()  # the client decoded it already; this must not fail
                    self.state[type_url][res.name] = res
            for name in removed:
                self.state[type_url].pop(name, None)
            self._cond.notify_all()
            return reasons

    def note_rejected(self, type_url: str, rejected: dict[str, str]) -> None:
        with self._cond:
            self.noted.update(rejected)

    def names(self, type_url: str) -> set[str]:
        with self._cond:
            return set(self.state[type_url])

    def removed(self, type_url: str | None = None) -> list[str]:
        with self._cond:
            return [n for c in self.calls if type_url in (None, c.type_url) for n in c.removed]

    def wait(self, pred: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    def wait_names(self, type_url: str, names: Iterable[str], timeout: float = WAIT) -> bool:
        want = set(names)
        return self.wait(lambda: set(self.state[type_url]) == want, timeout)


# -- records -----------------------------------------------------------------------------


@dataclass
class Request:
    """A request the server received (SotW and Delta fields side by side)."""

    protocol: str
    stream: int
    type_url: str
    nonce: str
    version: str = ""
    names: list[str] = field(default_factory=list)  # SotW resource_names / Delta subscribe
    unsubscribe: list[str] = field(default_factory=list)
    initial_versions: dict[str, str] = field(default_factory=dict)
    error: Any = None  # google.rpc.Status or None
    node: Any = None
    at: float = 0.0

    @property
    def is_nack(self) -> bool:
        return self.error is not None


@dataclass
class Sent:
    protocol: str
    stream: int
    type_url: str
    nonce: str
    version: str
    names: list[str]
    removed: list[str]


@dataclass
class StreamInfo:
    id: int
    protocol: str
    metadata: dict[str, str]
    opened_at: float
    out: queue.Queue = field(default_factory=queue.Queue, repr=False)
    subs: dict[str, Any] = field(default_factory=dict, repr=False)  # type_url -> _Sub
    active: bool = True


@dataclass
class _Sub:
    wildcard: bool
    names: set[str]
    nonce: str = ""
    known: dict[str, str] = field(default_factory=dict)  # Delta: what the client holds


_END = object()


@dataclass
class _Abort:
    code: grpc.StatusCode
    details: str


# -- the server --------------------------------------------------------------------------


class XdsTestServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, tls: tuple[bytes, bytes] | None = None, port: int = 0) -> None:
        self._tls = tls  # (private key PEM, certificate chain PEM)
        self.port = port  # 0 = any free port
        self._lock = threading.Condition()
        self._resources: dict[str, dict[str, Message]] = {t: {} for t in TYPE_ORDER}
        self._counter = itertools.count(1)
        self._ids = itertools.count(1)
        self.version = "2026-01-01T00:00:00Z/0"
        self.requests: list[Request] = []
        self.sent: list[Sent] = []
        self.streams: list[StreamInfo] = []
        # faults
        self.delta_unimplemented = False
        self.response_delay = 0.0
        self._fail: list[tuple[grpc.StatusCode, str]] = []
        self._server: grpc.Server | None = None

    # lifecycle

    def start(self) -> XdsTestServer:
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        if self._tls:
            creds = grpc.ssl_server_credentials([self._tls])
            self.port = self._server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        else:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()
        return self

    def stop(self) -> None:
        self.drop_streams(None)
        if self._server is not None:
            self._server.stop(0).wait(2)

    def __enter__(self) -> XdsTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{'grpcs' if self._tls else 'grpc'}://127.0.0.1:{self.port}"

    # state

    def set_resources(self, type_url: str, msgs: Iterable[Message]) -> None:
        """Replace the whole set of one type (not pushed until push())."""
        with self._lock:
            self._resources[type_url] = {name_of(type_url, m): m for m in msgs}
            self._bump()

    def update(self, type_url: str, *msgs: Message) -> None:
        with self._lock:
            self._resources[type_url].update({name_of(type_url, m): m for m in msgs})
            self._bump()

    def remove(self, type_url: str, *names: str) -> None:
        with self._lock:
            for name in names:
                self._resources[type_url].pop(name, None)
            self._bump()

    def push(
        self, type_url: str | None = None, names: Iterable[str] | None = None, full: bool = False
    ) -> None:
        """Push to every open stream, like istiod after a config change. `names` limits a
        push to some resources (istiod's incremental EDS). Delta streams get what changed
        against what the client holds, or everything with `full`."""
        only = set(names) if names is not None else None
        with self._lock:
            for st in self._active():
                for t in TYPE_ORDER if type_url is None else (type_url,):
                    sub = st.subs.get(t)
                    if sub is None or not (sub.wildcard or sub.names):
                        continue
                    resp = (
                        self._sotw_response(st, t, sub, only)
                        if st.protocol == "sotw"
                        else self._delta_response(st, t, sub, only=only, full=full)
                    )
                    if resp is not None:
                        st.out.put(resp)

    def push_raw(self, type_url: str, items: list[Any], removed: Iterable[str] = ()) -> None:
        """Send hand-made resources (Any for SotW streams, Delta Resource for Delta ones)."""
        with self._lock:
            self._bump()
            for st in self._active():
                nonce = self._nonce()
                sub = st.subs.get(type_url)
                if sub is not None:
                    sub.nonce = nonce
                if st.protocol == "sotw":
                    sotw = [i for i in items if isinstance(i, AnyMsg)]
                    resp: Any = DiscoveryResponse(
                        type_url=type_url, version_info=self.version, nonce=nonce, resources=sotw
                    )
                else:
                    delta = [i for i in items if isinstance(i, DeltaResource)]
                    resp = DeltaDiscoveryResponse(
                        type_url=type_url,
                        system_version_info=self.version,
                        nonce=nonce,
                        resources=delta,
                        removed_resources=list(removed),
                    )
                st.out.put(resp)

    # faults

    def fail_next(self, code: grpc.StatusCode, count: int = 1, details: str = "injected") -> None:
        """The next `count` streams are refused with `code` as soon as they open."""
        with self._lock:
            self._fail.extend([(code, details)] * count)

    def drop_streams(
        self, code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE, details: str = "dropped"
    ) -> None:
        """End every open stream (code None = a clean end of stream)."""
        with self._lock:
            for st in self._active():
                st.active = False
                st.out.put(_END if code is None else _Abort(code, details))

    # records

    def wait_for(self, pred: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._lock:
            return self._lock.wait_for(pred, timeout)

    def requests_of(self, type_url: str, stream: int | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.type_url == type_url and stream in (None, r.stream)
            ]

    def sent_of(self, type_url: str, stream: int | None = None) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.type_url == type_url and stream in (None, s.stream)]

    def reply_to(self, sent: Sent) -> Request | None:
        """The client's ACK/NACK for one response (matched by nonce)."""
        with self._lock:
            return next(
                (
                    r
                    for r in self.requests
                    if r.stream == sent.stream
                    and r.type_url == sent.type_url
                    and r.nonce == sent.nonce
                ),
                None,
            )

    def wait_reply(self, sent: Sent, timeout: float = WAIT) -> Request:
        assert self.wait_for(lambda: self.reply_to(sent) is not None, timeout), sent
        reply = self.reply_to(sent)
        assert reply is not None
        return reply

    def settled(self, timeout: float = WAIT) -> bool:
        """Every response sent so far on an open stream has been ACKed or NACKed."""

        def done() -> bool:
            open_ids = {st.id for st in self._active()}
            replied = {(r.stream, r.type_url, r.nonce) for r in self.requests}
            return all(
                (s.stream, s.type_url, s.nonce) in replied
                for s in self.sent
                if s.stream in open_ids
            )

        return self.wait_for(done, timeout)

    def last_stream(self) -> StreamInfo:
        with self._lock:
            return self.streams[-1]

    # the two RPCs

    def StreamAggregatedResources(
        self, request_iterator: Iterator[DiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DiscoveryResponse]:
        yield from self._serve("sotw", request_iterator, context)

    def DeltaAggregatedResources(
        self, request_iterator: Iterator[DeltaDiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DeltaDiscoveryResponse]:
        yield from self._serve("delta", request_iterator, context)

    def _serve(self, protocol: str, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        with self._lock:
            st = StreamInfo(
                next(self._ids), protocol, dict(context.invocation_metadata()), time.monotonic()
            )
            self.streams.append(st)
            fail = self._fail.pop(0) if self._fail else None
            if protocol == "delta" and self.delta_unimplemented:
                fail = (grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not supported here")
            if fail:
                st.active = False
            self._lock.notify_all()
        if fail:
            context.abort(*fail)

        def ended() -> None:  # the RPC is over, however it ended
            with self._lock:
                st.active = False
                self._lock.notify_all()
            st.out.put(_END)  # never leave the writer blocked

        if not context.add_callback(ended):
            ended()
        threading.Thread(target=self._read, args=(st, requests), daemon=True).start()
        while True:
            item = st.out.get()
            if item is _END:
                break
            if isinstance(item, _Abort):
                context.abort(item.code, item.details)
            if self.response_delay:
                time.sleep(self.response_delay)
            with self._lock:
                delta = protocol == "delta"
                version = item.system_version_info if delta else item.version_info
                removed = list(item.removed_resources) if delta else []
                self.sent.append(
                    Sent(protocol, st.id, item.type_url, item.nonce, version, _names(item), removed)
                )
                self._lock.notify_all()
            yield item
        ended()

    def _read(self, st: StreamInfo, requests: Iterator[Any]) -> None:
        try:
            for req in requests:
                with self._lock:
                    self.requests.append(_record(st, req))
                    resp = (
                        self._on_sotw(st, req) if st.protocol == "sotw" else self._on_delta(st, req)
                    )
                    if resp is not None:
                        st.out.put(resp)
                    self._lock.notify_all()
        except Exception:  # the client went away: the RPC's own teardown ends the writer
            pass

    # istiod's answer rules

    def _on_sotw(self, st: StreamInfo, req: DiscoveryRequest) -> Any:
        if req.HasField("error_detail"):
            return None  # NACK: logged by istiod, nothing resent
        t, names = req.type_url, set(req.resource_names)
        sub = st.subs.get(t)
        if sub is None or not req.response_nonce:
            sub = st.subs[t] = _Sub(t in WILDCARD and not names, names)
            return self._sotw_response(st, t, sub) if sub.wildcard or names else None
        if req.response_nonce != sub.nonce or names == sub.names:
            return None  # stale nonce, or an ACK
        sub.names = names
        return self._sotw_response(st, t, sub) if sub.wildcard or names else None

    def _on_delta(self, st: StreamInfo, req: DeltaDiscoveryRequest) -> Any:
        if req.HasField("error_detail"):
            return None
        t = req.type_url
        subscribe = set(req.resource_names_subscribe) - {"*"}
        sub = st.subs.get(t)
        if sub is None:
            known = dict(req.initial_resource_versions)
            wildcard = not req.resource_names_subscribe or "*" in req.resource_names_subscribe
            sub = st.subs[t] = _Sub(wildcard, subscribe | (set() if wildcard else set(known)))
            sub.known = known
            return self._delta_response(st, t, sub, full=True)
        if req.response_nonce:
            return None  # ACK
        added = subscribe - sub.names
        sub.names = (sub.names | subscribe) - set(req.resource_names_unsubscribe)
        for name in req.resource_names_unsubscribe:
            sub.known.pop(name, None)
        return self._delta_response(st, t, sub, only=added) if added else None

    def _sotw_response(
        self, st: StreamInfo, t: str, sub: _Sub, only: set[str] | None = None
    ) -> DiscoveryResponse:
        msgs = [
            m
            for n, m in sorted(self._resources[t].items())
            if (sub.wildcard or n in sub.names) and (only is None or n in only)
        ]
        sub.nonce = self._nonce()
        return DiscoveryResponse(
            type_url=t,
            version_info=self.version,
            nonce=sub.nonce,
            resources=[pack(m) for m in msgs],
        )

    def _delta_response(
        self,
        st: StreamInfo,
        t: str,
        sub: _Sub,
        only: set[str] | None = None,
        full: bool = False,
    ) -> DeltaDiscoveryResponse | None:
        """What changed against what the client holds (all of it with `full`: like istiod, a
        first request is answered in full whatever the client said it had)."""
        current = {
            n: m
            for n, m in self._resources[t].items()
            if (sub.wildcard or n in sub.names) and (only is None or n in only)
        }
        changed = []
        for name, msg in sorted(current.items()):
            version = _version(msg)
            if full or sub.known.get(name) != version:
                changed.append(DeltaResource(name=name, version=version, resource=pack(msg)))
                sub.known[name] = version
        scope = sub.known if only is None else {n: v for n, v in sub.known.items() if n in only}
        removed = sorted(n for n in scope if n not in current)
        for name in removed:
            sub.known.pop(name, None)
        if not changed and not removed and not full:
            return None
        sub.nonce = self._nonce()
        return DeltaDiscoveryResponse(
            type_url=t,
            system_version_info=self.version,
            nonce=sub.nonce,
            resources=changed,
            removed_resources=removed,
        )

    # helpers

    def _active(self) -> list[StreamInfo]:
        return [s for s in self.streams if s.active]

    def _bump(self) -> None:
        self.version = f"2026-01-01T00:00:00Z/{next(self._counter)}"

    def _nonce(self) -> str:
        return f"n{next(self._counter)}"


def _version(msg: Message) -> str:
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()[:12]


def _names(resp: Any) -> list[str]:
    if isinstance(resp, DeltaDiscoveryResponse):
        return [r.name for r in resp.resources]
    out = []
    for item in resp.resources:
        try:
            msg = message_class(resp.type_url)()
            msg.ParseFromString(item.value)
            out.append(name_of(resp.type_url, msg))
        except Exception:
            out.append("?")
    return out


def _record(st: StreamInfo, req: Any) -> Request:
    node = req.node if req.HasField("node") else None
    err = req.error_detail if req.HasField("error_detail") else None
    if isinstance(req, DiscoveryRequest):
        return Request(
            "sotw", st.id, req.type_url, req.response_nonce, req.version_info,
            list(req.resource_names), error=err, node=node, at=time.monotonic(),
        )
    return Request(
        "delta", st.id, req.type_url, req.response_nonce,
        names=list(req.resource_names_subscribe),
        unsubscribe=list(req.resource_names_unsubscribe),
        initial_versions=dict(req.initial_resource_versions),
        error=err, node=node, at=time.monotonic(),
    )


__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "LISTENER",
    "NODE",
    "ROUTES",
    "FakeHandler",
    "XdsTestServer",
    "cluster",
    "endpoints",
    "eventually",
    "listener",
    "mesh",
    "pack",
    "route",
    "source",
]


# -- wiring a client to the server -------------------------------------------------------

NODE = {"pod_name": "web-0", "namespace": "shop", "ip": "10.1.2.3"}


def mesh(srv: XdsTestServer) -> None:
    """A small Istio-like mesh: two EDS clusters (one via service_name), one STATIC one,
    one listener whose HCMs use RDS in a filter chain and in the default chain."""
    srv.set_resources(CLUSTER, [cluster("c1"), cluster("c2", "svc2"), cluster("static", None)])
    srv.set_resources(ENDPOINTS, [endpoints("c1", "10.0.0.1"), endpoints("svc2", "10.0.0.2")])
    srv.set_resources(LISTENER, [listener("l1", "r1", default_route="r2")])
    srv.set_resources(ROUTES, [route("r1", "a.example"), route("r2", "b.example")])


def source(
    address: str,
    handler: FakeHandler,
    protocol: str = "delta",
    rand: Callable[[], float] | None = None,
    **xds: Any,
) -> Any:
    """A started AdsSource with quick backoff; the caller stops it."""
    from amesh_ext.sources.ads import AdsConfig, AdsSource

    conf = {
        "address": address,
        "protocol": protocol,
        "node": NODE,
        "backoff": {"base_seconds": 0.05, "max_seconds": 0.4},
        **xds,
    }
    src = AdsSource(AdsConfig.from_mapping(conf, env={}), handler, rand=rand)
    src.start()
    return src
