"""Envoy Cluster (+ ClusterLoadAssignment) -> one APISIX upstream.

Decisions (documented for the agent):
- An EDS cluster whose endpoints have not arrived gets `nodes: []`: the upstream exists, so
  routes resolve their upstream_id, and requests fail (APISIX 502/503) as Envoy answers 503
  "no healthy upstream". The agent re-translates when the assignment arrives.
- ORIGINAL_DST (Istio's PassthroughCluster) has no endpoints to list: `nodes: []` plus a Skip.
- Priorities: Envoy tries priority 0 first, APISIX the highest: node priority = -p.
  Envoy spills load gradually (overprovisioning 1.4); APISIX moves on only when all
  nodes of a priority have failed.
- Weights: endpoint weight (default 1); with locality-weighted LB, locality weight x
  endpoint weight normalised by the locality's endpoint weight sum, made integral.
- UNHEALTHY, DRAINING and TIMEOUT endpoints are left out; UNKNOWN, HEALTHY, DEGRADED kept.
- Per-endpoint transport sockets (Istio auto-mTLS `transport_socket_matches`): APISIX has
  one scheme per upstream, so the socket serving most weight wins and other nodes are
  dropped (Skip).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from google.protobuf import json_format

from .durations import seconds
from .ids import upstream_id
from .model import HashPolicy, InvalidResource, Skips, Translation
from .options import TranslateOptions

_HOST = re.compile(r"\*?[0-9a-zA-Z\-._\[\]:]+")
_SKIPPED_HEALTH = frozenset((2, 3, 4))  # UNHEALTHY, DRAINING, TIMEOUT
# envoy.config.cluster.v3.Cluster.DiscoveryType
_STATIC, _STRICT_DNS, _LOGICAL_DNS, _EDS, _ORIGINAL_DST = range(5)
_LB = {0: "roundrobin", 1: "least_conn", 2: "chash", 3: "roundrobin", 5: "chash"}
_LB_POLICY_TYPES = (("least_request", "least_conn"), ("round_robin", "roundrobin"),
                    ("ring_hash", "chash"), ("maglev", "chash"), ("random", "roundrobin"))
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_RAW_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
_TSM_KEY = "envoy.transport_socket_match"
_UNLIMITED = 2**32 - 1
_FALLBACK_HASH = HashPolicy("vars", "remote_addr")
_MAX_WEIGHT = 1_000_000  # keep integral locality weights readable; rescale beyond this


def _socket_kind(ts, where: str, skips: Skips):
    """'plain' or an UpstreamTlsContext for a TransportSocket; None if unsupported."""
    if ts is None or (not ts.name and not ts.HasField("typed_config")):
        return "plain"
    url = ts.typed_config.type_url
    if url == _TLS_TYPE or (not url and ts.name == "envoy.transport_sockets.tls"):
        from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import UpstreamTlsContext

        ctx = UpstreamTlsContext()
        if url and not ts.typed_config.Unpack(ctx):
            raise InvalidResource(f"{where}: cannot decode UpstreamTlsContext")
        return ctx
    if url == _RAW_TYPE or ts.name in ("envoy.transport_sockets.raw_buffer", "raw_buffer"):
        return "plain"
    skips.add("transport_socket", f"transport socket {ts.name or url!r} is not supported; "
              "plain TCP used")
    return "plain"


def _struct_contains(have: dict, want: dict) -> bool:
    return all(k in have and have[k] == v for k, v in want.items())


def _socket_index(matches: list[dict], lb_ep, locality) -> int:
    """Index of the transport_socket_matches entry (`matches`: their criteria) serving an
    endpoint, -1: the cluster's default socket."""
    if not matches:
        return -1
    meta: dict = {}
    for src in (locality.metadata, lb_ep.metadata):
        if _TSM_KEY in src.filter_metadata:
            meta.update(json_format.MessageToDict(src.filter_metadata[_TSM_KEY]))
    for i, want in enumerate(matches):
        if _struct_contains(meta, want):
            return i
    return -1


def _node_host(sa, where: str, skips: Skips) -> str | None:
    addr = sa.address
    if ":" in addr and not addr.startswith("["):
        addr = f"[{addr}]"  # APISIX wants IPv6 literals bracketed
    if not _HOST.fullmatch(addr):
        skips.add("endpoint_address", f"address {sa.address!r} is not a valid APISIX host",
                  where)
        return None
    return addr


def _locality_weights(group: list[tuple[int, list[tuple[str, int, int]]]]) -> list[tuple]:
    """[(locality weight, [(host, port, endpoint weight)])] -> [(host, port, weight)] so
    that P(node) = lw/sum(lw) * ew/sum(ew in locality), with integer weights."""
    sums = [sum(w for _, _, w in eps) for _, eps in group]
    lcm = 1
    for s in sums:
        lcm = lcm * s // math.gcd(lcm, s)
    exact = [(h, p, Fraction(lw * w * lcm, s)) for (lw, eps), s in zip(group, sums, strict=True)
             for h, p, w in eps]
    g = 0
    for _, _, w in exact:
        g = math.gcd(g, int(w))
    ints = [(h, p, int(w) // (g or 1)) for h, p, w in exact]
    top = max((w for _, _, w in ints), default=0)
    if top > _MAX_WEIGHT:
        # Exactness would need huge integers: round to a fine grid instead.
        ints = [(h, p, max(1, round(w * _MAX_WEIGHT / top))) for h, p, w in ints]
    return ints


def _nodes(cluster, la, where: str, skips: Skips) -> tuple[list[dict], int | None]:
    """Nodes of a load assignment (None: none), and the transport socket index they use."""
    if la is None:
        return [], None
    # Cheap presence checks first: this runs for every endpoint update of every cluster.
    locality_weighted = cluster.HasField("common_lb_config") and (
        cluster.common_lb_config.HasField("locality_weighted_lb_config"))
    tsm = cluster.transport_socket_matches
    matches = [json_format.MessageToDict(t.match) for t in tsm] if tsm else []
    if la.named_endpoints:
        skips.add("named_endpoints", "named endpoints (LEDS) are not supported", where)
    # priority -> [(locality weight, [(host, port, weight)])], socket index per node (only
    # kept with transport_socket_matches: else every node uses the cluster's socket, -1)
    by_prio: dict[int, list] = {}
    socket_weight: dict[int, int] = {}
    node_socket: dict[tuple[str, int, int], int] = {}
    for loc in la.endpoints:
        if loc.WhichOneof("lb_config") is not None and (
                loc.HasField("leds_cluster_locality_config")
                or loc.load_balancer_endpoints.lb_endpoints):
            skips.add("locality_lb_config", "LEDS localities are not supported", where)
        lw = loc.load_balancing_weight.value if loc.HasField("load_balancing_weight") else 0
        if locality_weighted and lw == 0:
            continue  # Envoy sends no traffic to a locality without weight
        prio = loc.priority
        eps: list[tuple[str, int, int]] = []
        for lb_ep in loc.lb_endpoints:
            if lb_ep.health_status in _SKIPPED_HEALTH:
                continue
            if lb_ep.WhichOneof("host_identifier") != "endpoint":
                skips.add("endpoint_name", "named endpoint references are not supported",
                          where)
                continue
            address = lb_ep.endpoint.address
            kind = address.WhichOneof("address")
            if kind != "socket_address":
                skips.add("endpoint_address", f"{kind} addresses are not supported", where)
                continue
            sa = address.socket_address
            port = sa.port_value
            if not 0 < port < 65536 or sa.WhichOneof("port_specifier") != "port_value":
                skips.add("endpoint_address", f"endpoint {sa.address!r} has no usable port",
                          where)
                continue
            host = _node_host(sa, where, skips)
            if host is None:
                continue
            w = lb_ep.load_balancing_weight.value if lb_ep.HasField(
                "load_balancing_weight") else 1
            if w == 0:
                raise InvalidResource(f"{where}: endpoint {sa.address!r} has weight 0")
            sock = _socket_index(matches, lb_ep, loc) if matches else -1
            socket_weight[sock] = socket_weight.get(sock, 0) + w
            if matches:
                node_socket[(host, port, prio)] = sock
            eps.append((host, port, w))
        if eps:
            by_prio.setdefault(prio, []).append((lw, eps))
    if not socket_weight:
        return [], None
    if len(socket_weight) == 1:
        (chosen,) = socket_weight  # one socket for all (always without socket matches)
    else:
        chosen = max(sorted(socket_weight), key=lambda s: socket_weight[s])
    dropped = 0
    nodes: list[dict] = []
    for prio in sorted(by_prio):
        group = by_prio[prio]
        if locality_weighted:
            flat = _locality_weights(group)
        else:
            flat = [ep for _, eps in group for ep in eps]
        merged: dict[tuple[str, int], int] = {}
        for host, port, w in flat:
            if matches and node_socket[(host, port, prio)] != chosen:
                dropped += 1
                continue
            merged[(host, port)] = merged.get((host, port), 0) + w
        for (host, port), w in merged.items():
            node = {"host": host, "port": port, "weight": w}
            if prio:
                node["priority"] = -prio
            nodes.append(node)
    if dropped:
        skips.add("transport_socket_matches", f"{dropped} endpoint(s) need another transport "
                  "socket than the upstream's; left out", where)
    return nodes, chosen


def _lb_type(cluster, where: str, skips: Skips) -> str:
    if cluster.HasField("load_balancing_policy"):
        for pol in cluster.load_balancing_policy.policies:
            url = pol.typed_extension_config.typed_config.type_url
            for needle, lb in _LB_POLICY_TYPES:
                if needle in url:
                    return lb
        skips.add("lb_policy", "load_balancing_policy has no supported policy; roundrobin",
                  where)
        return "roundrobin"
    lb = _LB.get(cluster.lb_policy)
    if lb is None:
        skips.add("lb_policy", f"lb_policy {cluster.lb_policy} is not supported; roundrobin",
                  where)
        return "roundrobin"
    return lb


def _is_http2(cluster) -> bool:
    if cluster.HasField("http2_protocol_options"):
        return True
    opts = cluster.typed_extension_protocol_options.get(_HTTP_OPTIONS)
    if opts is None:
        return False
    from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions

    hpo = HttpProtocolOptions()
    if not opts.Unpack(hpo):
        return False
    kind = hpo.WhichOneof("upstream_protocol_options")
    if kind == "explicit_http_config":
        return hpo.explicit_http_config.WhichOneof("protocol_config") == "http2_protocol_options"
    return False


def _tls(up: dict, ctx, where: str, skips: Skips, options: TranslateOptions) -> None:
    """Client certificate and the TLS settings APISIX cannot apply per upstream."""
    common = ctx.common_tls_context
    sds = [s.name for s in common.tls_certificate_sds_secret_configs]
    gaps: list[str] = []
    if "default" in sds:  # Istio's workload certificate (ISTIO_MUTUAL)
        if options.istio_client_cert_id:
            up["tls"] = {"client_cert_id": options.istio_client_cert_id}
        elif options.istio_client_cert_pem and options.istio_client_key_pem:
            up["tls"] = {"client_cert": options.istio_client_cert_pem,
                         "client_key": options.istio_client_key_pem}
        else:
            # Envoy holds the cluster's connections until its SDS secret arrives and then
            # fails them (503); an upstream without the certificate would reach the server
            # and be refused at the handshake (502), one naming an SSL object that is not
            # there fails too (502). No nodes: 503 until the certificate is loaded.
            up["nodes"] = []
            skips.add("upstream_client_cert", "ISTIO_MUTUAL: the workload certificate is not "
                      "loaded (TranslateOptions.istio_client_cert_id or the PEM options); "
                      "requests answer 503 until it is", where)
    elif sds:
        skips.add("upstream_client_cert", f"client certificate from SDS {sds!r} is not "
                  "supported", where)
    elif len(common.tls_certificates):
        cert = common.tls_certificates[0]
        if cert.certificate_chain.inline_string and cert.private_key.inline_string:
            up["tls"] = {"client_cert": cert.certificate_chain.inline_string,
                         "client_key": cert.private_key.inline_string}
        else:
            skips.add("upstream_client_cert", "client certificate files are not supported",
                      where)
    if common.WhichOneof("validation_context_type"):
        gaps.append("server certificate verification")
    if ctx.sni:
        gaps.append(f"SNI {ctx.sni!r}")
    if len(common.alpn_protocols):
        gaps.append(f"ALPN {list(common.alpn_protocols)}")
    if gaps:
        skips.add("upstream_tls_context", "APISIX upstreams cannot set " + ", ".join(gaps),
                  where)


def _checks(od, where: str, skips: Skips) -> dict | None:
    """checks.passive from outlier detection. APISIX only re-admits a node through active
    checks, so a TCP probe every base_ejection_time plays Envoy's ejection timer."""
    def val(field: str, default: int) -> int:
        return getattr(od, field).value if od.HasField(field) else default

    if val("consecutive_5xx", 5) and val("enforcing_consecutive_5xx", 100):
        statuses, failures = list(range(500, 600)), val("consecutive_5xx", 5)
    elif val("consecutive_gateway_failure", 5) and val("enforcing_consecutive_gateway_failure",
                                                       0):
        statuses, failures = [502, 503, 504], val("consecutive_gateway_failure", 5)
    else:
        statuses, failures = [], 0
    if val("enforcing_success_rate", 100) or val("enforcing_failure_percentage", 0):
        skips.add("outlier_detection", "success-rate / failure-percentage ejection is not "
                  "supported", where)
    if not failures:
        return None
    if val("max_ejection_percent", 10) < 100:
        skips.add("outlier_detection", f"max_ejection_percent {val('max_ejection_percent', 10)}"
                  ": APISIX may mark every node unhealthy", where)
    failures = min(max(failures, 1), 254)
    eject = seconds(od.base_ejection_time) if od.HasField("base_ejection_time") else 30.0
    interval = max(1, round(eject))
    return {
        "active": {"type": "tcp", "healthy": {"interval": interval, "successes": 1},
                   "unhealthy": {"interval": interval, "tcp_failures": 2, "timeouts": 3}},
        "passive": {"type": "http", "unhealthy": {
            "http_statuses": statuses, "http_failures": failures, "tcp_failures": failures,
            "timeouts": failures}},
    }


def _circuit_breakers(cluster, where: str, skips: Skips) -> None:
    if not cluster.HasField("circuit_breakers"):
        return
    limited = []
    for th in cluster.circuit_breakers.thresholds:
        for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            if th.HasField(field) and getattr(th, field).value < _UNLIMITED:
                limited.append(f"{field}={getattr(th, field).value}")
    if limited:
        skips.add("circuit_breakers", "APISIX has no per-upstream connection/request limits: "
                  + ", ".join(sorted(set(limited))), where)


def _inbound_local(name: str, options: TranslateOptions):
    """A load assignment with the local workload for Istio's `inbound|<port>|...` cluster."""
    parts = name.split("|")
    if options.inbound_original_dst_host is None or len(parts) != 4 or parts[0] != "inbound":
        return None
    if not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
        return None
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    la = ClusterLoadAssignment(cluster_name=name)
    sa = la.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address = options.inbound_original_dst_host
    sa.port_value = int(parts[1])
    return la


_MIRROR_SCHEMES = {"https": "https", "grpc": "grpc", "grpcs": "grpcs"}


def mirror_node(upstream: dict) -> str | None:
    """Where a mirror copy of a request to this upstream goes (`scheme://host:port`), None
    when it has no node: APISIX mirrors to one address, Envoy to the cluster's endpoints,
    so the copy goes to the first node of the priority Envoy uses first."""
    nodes = [n for n in upstream.get("nodes") or () if n.get("weight", 1) > 0]
    if not nodes:
        return None
    top = max(n.get("priority", 0) for n in nodes)
    node = next(n for n in nodes if n.get("priority", 0) == top)
    scheme = _MIRROR_SCHEMES.get(upstream.get("scheme", "http"), "http")
    return f"{scheme}://{node['host']}:{node['port']}"


def translate_cluster(cluster, assignment, hash_policy: HashPolicy | None,
                      options: TranslateOptions) -> Translation:
    """The APISIX upstream of one cluster, key '/upstreams/<upstream_id(cluster.name)>'."""
    if not cluster.name:
        raise InvalidResource("Cluster without a name")
    where = f"Cluster {cluster.name!r}"
    skips = Skips(where)
    uid = upstream_id(cluster.name)
    up: dict = {"id": uid, "name": cluster.name[:256]}
    kind = cluster.WhichOneof("cluster_discovery_type")
    dtype = cluster.type if kind == "type" else None
    if kind is None:
        dtype = _STATIC  # Envoy's default discovery type
    if dtype == _EDS:
        la = assignment
    elif dtype in (_STATIC, _STRICT_DNS, _LOGICAL_DNS):
        la = cluster.load_assignment if cluster.HasField("load_assignment") else None
    elif dtype == _ORIGINAL_DST and (local := _inbound_local(cluster.name, options)):
        la = local
    else:
        la = None
        what = "ORIGINAL_DST (original destination)" if dtype == _ORIGINAL_DST else (
            f"cluster type {cluster.cluster_type.name!r}" if kind == "cluster_type" else
            f"discovery type {dtype}")
        skips.add("cluster_discovery_type", f"{what} cannot be expressed: no nodes", where)
    nodes, sock = _nodes(cluster, la, where, skips)
    up["nodes"] = nodes
    # ORIGINAL_DST requires CLUSTER_PROVIDED: nothing to report there.
    lb = "roundrobin" if dtype == _ORIGINAL_DST else _lb_type(cluster, where, skips)
    up["type"] = lb
    if lb == "chash":
        hp = hash_policy or _FALLBACK_HASH
        up["hash_on"] = hp.hash_on
        up["key"] = hp.key
    if sock is None:
        sock = -1  # no endpoints yet: the cluster's own socket
    ts = cluster.transport_socket_matches[sock].transport_socket if sock >= 0 else (
        cluster.transport_socket if cluster.HasField("transport_socket") else None)
    tls = _socket_kind(ts, where, skips)
    http2 = _is_http2(cluster)
    if http2 and not options.http2_as_grpc:
        skips.add("upstream_http2", "HTTP/2 upstream proxied as HTTP/1.1", where)
        http2 = False
    if tls == "plain":
        up["scheme"] = "grpc" if http2 else "http"
    else:
        up["scheme"] = "grpcs" if http2 else "https"
        _tls(up, tls, where, skips, options)
    ct = seconds(cluster.connect_timeout) if cluster.HasField("connect_timeout") else 5.0
    up["timeout"] = {"connect": max(ct, 0.001), "send": options.upstream_idle_timeout,
                     "read": options.upstream_idle_timeout}
    if options.upstream_retries is not None:
        up["retries"] = options.upstream_retries
    if cluster.HasField("outlier_detection"):
        checks = _checks(cluster.outlier_detection, where, skips)
        if checks:
            up["checks"] = checks
    _circuit_breakers(cluster, where, skips)
    return Translation({"/upstreams/" + uid: up}, skips.items)
