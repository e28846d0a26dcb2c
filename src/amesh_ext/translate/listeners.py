"""Envoy Listener -> the route configs its HTTP connection managers use (with the port
their routes must keep) and APISIX stream routes for its TCP proxy filter chains.

The port of a filter chain is its `filter_chain_match.destination_port` when set (Istio's
virtualInbound), else the listener's. Stream routes match on `server_port` only: with
iptables REDIRECT the original destination address is not visible to APISIX, so a listener
on a VIP (`<vip>_<port>`) is matched by port (two TCP services on one port collide; the
agent sees both stream routes).
"""

from __future__ import annotations

from ..references import HCM_TYPE
from .ids import NameCounter, scoped_id, upstream_id
from .model import Clusters, InvalidResource, ListenerTranslation, Skips
from .options import TranslateOptions
from .routes import translate_route_configuration

_HCM = "envoy.filters.network.http_connection_manager"
_TCP = "envoy.filters.network.tcp_proxy"
_TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
# HTTP filters whose per-route effect the route translation carries.
_HTTP_FILTERS_DONE = frozenset((
    "envoy.filters.http.router", "envoy.filters.http.fault", "envoy.filters.http.cors",
    "envoy.filters.http.grpc_stats"))
_MATCH_FIELDS = ("prefix_ranges", "server_names", "source_prefix_ranges",
                 "direct_source_prefix_ranges", "source_ports", "application_protocols")


def _decode(flt, where: str):
    url = flt.typed_config.type_url
    if flt.name == _HCM or url == HCM_TYPE:
        from envoy.extensions.filters.network.http_connection_manager.v3 import (
            http_connection_manager_pb2 as hcm_pb2,
        )

        msg = hcm_pb2.HttpConnectionManager()
    elif flt.name == _TCP or url == _TCP_TYPE:
        from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

        msg = TcpProxy()
    else:
        return None
    if url and not flt.typed_config.Unpack(msg):
        raise InvalidResource(f"{where}: cannot decode filter {flt.name!r} ({url})")
    return msg


def _listener_port(listener) -> int | None:
    if listener.address.WhichOneof("address") != "socket_address":
        return None
    sa = listener.address.socket_address
    return sa.port_value if sa.WhichOneof("port_specifier") == "port_value" else None


def _tcp_cluster(tcp, where: str, skips: Skips) -> str | None:
    kind = tcp.WhichOneof("cluster_specifier")
    if kind == "cluster":
        return tcp.cluster
    if kind == "weighted_clusters":
        clusters = [c for c in tcp.weighted_clusters.clusters if c.weight > 0]
        if not clusters:
            raise InvalidResource(f"{where}: tcp_proxy weighted clusters weigh 0")
        best = max(clusters, key=lambda c: c.weight)  # max() keeps the first of equals
        if len(clusters) > 1:
            skips.add("tcp_weighted_clusters", f"stream routes cannot split; all traffic to "
                      f"{best.name!r}", where)
        return best.name
    raise InvalidResource(f"{where}: tcp_proxy without a cluster")


def translate_listener(listener, options: TranslateOptions,
                       clusters: Clusters | None = None) -> ListenerTranslation:
    """Stream routes and inline route configs of a listener; `clusters`: what the agent
    holds (None: every cluster exists)."""
    if not listener.name:
        raise InvalidResource("Listener without a name")
    clusters = clusters if clusters is not None else Clusters()
    where = f"Listener {listener.name!r}"
    skips = Skips(where)
    out = ListenerTranslation()
    port = _listener_port(listener)
    chains = [(c, False) for c in listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append((listener.default_filter_chain, True))
    keys = NameCounter()
    for ci, (chain, is_default) in enumerate(chains):
        cwhere = f"{where} filter chain {chain.name or ci!r}"
        ckey = "_x" if is_default else keys.key(chain.name, ci)
        fcm = chain.filter_chain_match
        cport = fcm.destination_port.value if fcm.HasField("destination_port") else port
        conditions = [f for f in _MATCH_FIELDS if len(getattr(fcm, f))]
        if fcm.transport_protocol:
            conditions.append("transport_protocol")
        if conditions:
            skips.add("filter_chain_match", f"{', '.join(conditions)} not matched: chains "
                      "are told apart by port only", cwhere)
        if chain.HasField("transport_socket"):
            skips.add("downstream_tls", "TLS termination on the listener is not translated",
                      cwhere)
        for flt in chain.filters:
            msg = _decode(flt, cwhere)
            if msg is None:
                skips.add("network_filter", f"network filter {flt.name!r} is not supported",
                          cwhere)
                continue
            if flt.name == _TCP or msg.DESCRIPTOR.name == "TcpProxy":
                cluster = _tcp_cluster(msg, cwhere, skips)
                if cport is None or not 0 < cport < 65536:
                    skips.add("tcp_proxy", "no port to match the stream route on", cwhere)
                    continue
                if not clusters.exists(cluster):
                    continue  # Envoy closes the connection; no stream route does the same
                sid = scoped_id(listener.name, ckey)
                out.translation.objects["/stream_routes/" + sid] = {
                    "id": sid, "server_port": cport, "upstream_id": upstream_id(cluster)}
                continue
            _hcm(msg, cport, out, cwhere, skips, options, clusters)
    out.translation.skipped[:0] = skips.items
    out.translation.cluster_deps.update(clusters.deps)
    return out


def _hcm(hcm, port: int | None, out: ListenerTranslation, cwhere: str, skips: Skips,
         options: TranslateOptions, clusters: Clusters) -> None:
    kind = hcm.WhichOneof("route_specifier")
    if kind == "rds":
        out.route_config_ports[hcm.rds.route_config_name] = port
    elif kind == "route_config":
        out.route_config_ports[hcm.route_config.name] = port
        out.translation.merge(translate_route_configuration(hcm.route_config, port, options,
                                                            clusters))
    else:
        skips.add("scoped_routes", f"{kind or 'no'} route specifier is not supported", cwhere)
    for hf in hcm.http_filters:
        if hf.name not in _HTTP_FILTERS_DONE and not hf.disabled:
            skips.add("http_filter", f"HTTP filter {hf.name!r} is not translated", cwhere)
