"""Envoy per-route features -> APISIX plugin configs: fault-injection, cors, proxy-mirror,
redirect, and fault-injection aborts for direct responses and closing 404s."""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyMsg

from .durations import fraction, seconds, whole_percent
from .model import Clusters, InvalidResource, Skips
from .regex import full_match, pcre_literal
from .templates import literal

FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
_CORS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
# APISIX's proxy-mirror sample_ratio minimum.
_MIN_SAMPLE = 0.00001
# gRPC status codes travel in a 200 response (trailers-only); fault-injection sets headers.
_GRPC_CONTENT_TYPE = "application/grpc"
_FAULT_ABORT_BODY = "fault filter abort"  # Envoy's fault filter (abort) response body


def abort(status: int, body: str | None = None) -> dict:
    """fault-injection config answering `status` always (no percentage = 100% in APISIX)."""
    conf: dict = {"http_status": status}
    if body is not None:
        conf["body"] = literal(body)
    return {"abort": conf}


def _unwrap(any_msg: AnyMsg, where: str, skips: Skips, name: str):
    """The typed config of a typed_per_filter_config entry (FilterConfig unwrapped), None
    when disabled or unknown."""
    if any_msg.type_url == _FILTER_CONFIG:
        from envoy.config.route.v3.route_components_pb2 import FilterConfig

        fc = FilterConfig()
        any_msg.Unpack(fc)
        if fc.disabled:
            return None
        any_msg = fc.config
    if name == FAULT_FILTER and any_msg.type_url == _FAULT_TYPE:
        from envoy.extensions.filters.http.fault.v3.fault_pb2 import HTTPFault

        msg = HTTPFault()
    elif name == CORS_FILTER and any_msg.type_url == _CORS_TYPE:
        from envoy.extensions.filters.http.cors.v3.cors_pb2 import CorsPolicy

        msg = CorsPolicy()
    else:
        skips.add("per_filter_config", f"{name}: config type {any_msg.type_url!r} unknown",
                  where)
        return None
    if not any_msg.Unpack(msg):
        raise InvalidResource(f"{where}: cannot decode {name} per-filter config")
    return msg


def per_filter(configs: list, name: str, where: str, skips: Skips):
    """The most specific typed_per_filter_config for filter `name` (route first, then
    virtual host, then route config), decoded."""
    for cfg in configs:
        if name in cfg:
            return _unwrap(cfg[name], where, skips, name)
    return None


def fault_injection(fault, where: str, skips: Skips) -> dict | None:
    """fault-injection config of an HTTPFault; None if it never fires. Envoy's unset
    percentage is 0% (never); APISIX's unset is 100%, and it samples in whole percent:
    the fraction is rounded half up (a Skip notes any rounding)."""
    conf: dict = {}
    unsupported = [f for f in ("max_active_faults", "response_rate_limit") if fault.HasField(f)]
    if fault.upstream_cluster:
        unsupported.append("upstream_cluster")
    if unsupported:
        skips.add("fault_injection", f"fault {', '.join(unsupported)} not supported; ignored",
                  where)
    if len(fault.headers) or len(fault.downstream_nodes):
        skips.add("fault_injection", "fault header/downstream_nodes conditions are not "
                  "supported: the fault applies to every request of the route", where)

    def percent(p) -> int | None:
        ratio = fraction(p)
        pct = whole_percent(ratio)
        if abs(pct - ratio * 100) > 1e-9:
            skips.add("fault_percentage_rounded",
                      f"{ratio * 100:g}% sampled as {pct}% (APISIX samples whole percents)",
                      where)
        return pct or None

    if fault.HasField("delay"):
        d = fault.delay
        if d.WhichOneof("fault_delay_secifier") == "fixed_delay":
            pct = percent(d.percentage)
            if pct:
                conf["delay"] = {"duration": seconds(d.fixed_delay), "percentage": pct}
        else:
            skips.add("fault_delay", "header-controlled delay is not supported", where)
    if fault.HasField("abort"):
        a = fault.abort
        kind = a.WhichOneof("error_type")
        pct = percent(a.percentage)
        if pct and kind == "http_status":
            if not 200 <= a.http_status < 600:
                raise InvalidResource(f"{where}: fault abort status {a.http_status} invalid")
            # Envoy's local reply body for a fault abort; without one APISIX sends nginx's
            # error page for the status.
            conf["abort"] = {"http_status": a.http_status, "percentage": pct,
                             "body": _FAULT_ABORT_BODY}
        elif pct and kind == "grpc_status":
            conf["abort"] = {"http_status": 200, "percentage": pct, "body": "",
                             "headers": {"grpc-status": str(a.grpc_status),
                                         "content-type": _GRPC_CONTENT_TYPE}}
        elif pct:
            skips.add("fault_abort", f"{kind or 'unset'} abort is not supported", where)
    return conf or None


def _origin_regex(sm, where: str) -> str:
    """One origin matcher as PCRE. APISIX joins the list with `|`, so flags are scoped
    (`(?i:...)`): a bare `(?i)` would leak into the following alternatives."""
    kind = sm.WhichOneof("match_pattern")
    if kind == "safe_regex":
        return full_match(sm.safe_regex.regex, where)
    if kind == "exact":
        rx = f"^{pcre_literal(sm.exact)}\\z"
    elif kind == "prefix":
        rx = f"^{pcre_literal(sm.prefix)}"
    elif kind == "suffix":
        rx = f"{pcre_literal(sm.suffix)}\\z"
    elif kind == "contains":
        rx = pcre_literal(sm.contains)
    else:
        raise InvalidResource(f"{where}: unsupported CORS origin matcher {kind}")
    return f"(?i:{rx})" if sm.ignore_case else rx


def cors(policy, where: str, skips: Skips) -> dict | None:
    """APISIX cors config of an Envoy CorsPolicy; None when it allows no origin or is
    disabled. APISIX answers every OPTIONS request itself (Envoy only matching
    preflights), and without credentials allows all methods/headers when Envoy names none."""
    if policy.HasField("filter_enabled") and fraction(policy.filter_enabled.default_value) == 0:
        return None
    if policy.HasField("filter_enabled") and fraction(policy.filter_enabled.default_value) < 1:
        skips.add("cors", "CORS enabled for a fraction of requests: enabled for all", where)
    origins = [_origin_regex(sm, where) for sm in policy.allow_origin_string_match]
    if not origins:
        return None
    creds = policy.HasField("allow_credentials") and policy.allow_credentials.value
    conf: dict = {"allow_origins_by_regex": sorted(set(origins), key=origins.index)}
    # With credentials APISIX refuses '*' anywhere; allow_origins is not consulted when
    # allow_origins_by_regex is set, so "null" only satisfies that check.
    conf["allow_methods"] = policy.allow_methods or (
        "GET,HEAD,POST,PUT,DELETE,PATCH,OPTIONS" if creds else "*")
    conf["allow_headers"] = policy.allow_headers or ("" if creds else "*")
    if creds:
        conf["allow_credential"] = True
        conf["allow_origins"] = "null"
    if policy.expose_headers:
        conf["expose_headers"] = policy.expose_headers
    if policy.max_age:
        try:
            conf["max_age"] = int(policy.max_age)
        except ValueError:
            raise InvalidResource(f"{where}: CORS max_age {policy.max_age!r}") from None
    if policy.HasField("shadow_enabled"):
        skips.add("cors", "shadow_enabled is not supported", where)
    return conf


def proxy_mirror(policies, where: str, skips: Skips, clusters: Clusters) -> dict | None:
    """proxy-mirror config of the first request mirror policy. Envoy sends the copy to an
    endpoint of the mirror cluster; APISIX mirrors to one address, so the copy goes to one
    node of that cluster (upstreams.mirror_node), with the request's Host (Istio sets
    disable_shadow_host_suffix_append; APISIX cannot append Envoy's `-shadow`). A cluster
    without endpoints (or unknown) gets no copy, as in Envoy."""
    if not policies:
        return None
    if len(policies) > 1:
        skips.add("request_mirror", f"{len(policies)} mirror policies: only the first is kept",
                  where)
    p = policies[0]
    ratio = fraction(p.runtime_fraction.default_value) if p.HasField("runtime_fraction") else 1.0
    if ratio <= 0:
        return None
    if not p.cluster:
        skips.add("request_mirror", f"mirror cluster named by header {p.cluster_header!r} "
                  "is not supported", where)
        return None
    host = clusters.mirror_node(p.cluster)
    if host is None:
        return None
    if not p.disable_shadow_host_suffix_append:
        skips.add("request_mirror", "the copy's Host keeps the request's: APISIX cannot "
                  "append Envoy's -shadow suffix", where)
    if ratio < _MIN_SAMPLE:
        skips.add("request_mirror", f"sample ratio {ratio:g} raised to {_MIN_SAMPLE}", where)
        ratio = _MIN_SAMPLE
    return {"host": host, "sample_ratio": round(ratio, 5)}
