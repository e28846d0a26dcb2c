"""Envoy RouteConfiguration -> APISIX routes (route-selection.md §4 "Recommended shape").

- One APISIX route per Envoy route and host selector (hosts.py); every route of a virtual
  host has uri "/*" so that all share one radixtree key, and the Envoy path matcher is in
  `vars`.
- `priority` reproduces Envoy's first-match order: within a selector, route i of N gets
  base + N - i and the selector's closing route (a 404, which stops APISIX from falling
  through to a less specific host, pitfall 1) gets base. Selectors with hosts live in their
  own host sub-routers, so their base is 0; host-less selectors share one tree, so `*` gets
  base 0 and each `X*` selector a band above it, longer prefixes higher (Envoy's order).
- The listener port is kept as `[port_match_var, "==", "<port>"]` on every route.
- Every proxied route carries proxy-rewrite: APISIX then forwards nginx's normalised path
  (dot segments resolved, unreserved escapes decoded), as Istio's Envoy does
  (normalize_path); without the plugin it forwards the client's raw path.
- A route to a cluster the agent does not hold answers 503, as Envoy's; weighted entries
  to one name the route configuration's `no_cluster` upstream (actions.Targets).
"""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Targets, route_action
from .headers import HeaderLevel, fold, request_headers, response_headers
from .hosts import HostSelector, check_domains, host_selectors
from .ids import NameCounter, scoped_id
from .matchers import translate_match
from .model import Clusters, InvalidResource, Skips, Translation
from .options import TranslateOptions
from .plugins import (
    CORS_FILTER,
    FAULT_FILTER,
    abort,
    cors,
    fault_injection,
    per_filter,
    proxy_mirror,
)
from .redirect import redirect

_NAME_MAX = 256


# A raw path that Envoy (normalize_path, merge_slashes off, escaped slashes kept) forwards
# unchanged but nginx's $uri would not: `//`, or an escape of a reserved character (`%2F`,
# `%3F`, ...). Escapes of unreserved ones (ALPHA DIGIT - . _ ~) Envoy decodes, as nginx does.
RAW_PATH_KEPT = (r"^[^?]*(//|%(?![46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee]))")


def _normalised_path() -> dict:
    """proxy-rewrite that forwards the path as nginx normalised it (any proxy-rewrite makes
    APISIX forward uri_safe_encode($uri) instead of the raw path), except for raw paths that
    Envoy keeps and $uri would alter (RAW_PATH_KEPT): those go raw, the plugin filtered out."""
    return {"regex_uri": ["^/", "/"],
            "_meta": {"filter": [["real_request_uri", "!", "~~", RAW_PATH_KEPT]]}}


@dataclass
class _Body:
    key: str  # route part of the id
    name: str
    obj: dict  # methods, vars, upstream_id, plugins, timeout ...


@dataclass
class _Group:
    vh_key: str
    vh_name: str
    selector: HostSelector
    bodies: list[_Body]


def _own_levels(m, request: bool, kind: str) -> list[HeaderLevel]:
    """[m's header mutations as a level], or [] when it has none (most routes, virtual hosts
    and route configs: fold() needs no level for them)."""
    if request:
        add, remove = m.request_headers_to_add, m.request_headers_to_remove
    else:
        add, remove = m.response_headers_to_add, m.response_headers_to_remove
    if not add and not remove:
        return []
    return [HeaderLevel(list(add), list(remove), f"{kind} {m.name!r}" if kind else
                        "route config")]


@dataclass
class _Inherited:
    """What the routes of one virtual host take from it and its route config, looked up
    once per virtual host: most routes override none of it."""

    filter_configs: list  # the non-empty typed_per_filter_config maps: vh, route config
    retry: object | None  # the virtual host's RetryPolicy
    mirrors: object  # request mirror policies: the virtual host's, else the route config's
    cors: object | None  # the virtual host's (legacy) CorsPolicy
    request_levels: list[HeaderLevel]  # header mutations of the vh, then the route config
    response_levels: list[HeaderLevel]
    most_specific_wins: bool  # rc.most_specific_header_mutations_wins


def _present(msg) -> set[str]:
    """Names of the fields set in msg. One call: probing a dozen mostly unset fields of a
    virtual host or route config one by one costs several times more."""
    return {f.name for f, _ in msg.ListFields()}


_HEADER_FIELDS = {True: frozenset(("request_headers_to_add", "request_headers_to_remove")),
                  False: frozenset(("response_headers_to_add", "response_headers_to_remove"))}


def _levels_of(m, present: set[str], request: bool, kind: str) -> list[HeaderLevel]:
    return [] if _HEADER_FIELDS[request].isdisjoint(present) else _own_levels(m, request, kind)


def _inherited(rc, rc_fields: set[str], vh, vh_fields: set[str]) -> _Inherited:
    """_Inherited of vh; *_fields: _present() of each."""
    mirrors = "request_mirror_policies"
    return _Inherited(
        filter_configs=[m.typed_per_filter_config for m, fields in ((vh, vh_fields),
                                                                    (rc, rc_fields))
                        if "typed_per_filter_config" in fields],
        retry=vh.retry_policy if "retry_policy" in vh_fields else None,
        mirrors=(vh.request_mirror_policies if mirrors in vh_fields else
                 rc.request_mirror_policies if mirrors in rc_fields else ()),
        cors=vh.cors if "cors" in vh_fields else None,
        request_levels=(_levels_of(vh, vh_fields, True, "virtual host")
                        + _levels_of(rc, rc_fields, True, "")),
        response_levels=(_levels_of(vh, vh_fields, False, "virtual host")
                         + _levels_of(rc, rc_fields, False, "")),
        most_specific_wins=rc.most_specific_header_mutations_wins,
    )


def _header_levels(route, inh: _Inherited, request: bool) -> list[HeaderLevel]:
    """The levels that mutate headers, in evaluation order (route, vh, route config;
    reversed under most_specific_header_mutations_wins)."""
    levels = _own_levels(route, request, "route") + (
        inh.request_levels if request else inh.response_levels)
    return levels[::-1] if inh.most_specific_wins else levels


def _direct_response(rc, dr, where: str, skips: Skips) -> dict:
    body: str | None = None
    if dr.HasField("body"):
        kind = dr.body.WhichOneof("specifier")
        if kind == "inline_string":
            body = dr.body.inline_string
        elif kind == "inline_bytes":
            body = dr.body.inline_bytes.decode("utf-8", "replace")
        else:
            skips.add("direct_response_body", f"body from {kind} is not supported", where)
        limit = (rc.max_direct_response_body_size_bytes.value
                 if rc.HasField("max_direct_response_body_size_bytes") else 4096)
        if body is not None and len(body.encode()) > limit:
            raise InvalidResource(f"{where}: direct_response body exceeds {limit} bytes")
    if dr.HasField("body_format"):
        skips.add("direct_response_body", "body_format is not supported", where)
    status = dr.status
    if not 100 <= status < 600:
        raise InvalidResource(f"{where}: direct_response status {status} invalid")
    if status < 200:
        skips.add("direct_response_status", f"APISIX cannot answer {status}; 200 sent", where)
        status = 200
    return abort(status, body)


def _route_body(rc, inh: _Inherited, route, key: str, name: str, where: str,
                skips: Skips, options: TranslateOptions, targets: Targets) -> _Body | None:
    m = translate_match(route.match, where, skips)
    if m is None or m.never:
        return None
    obj: dict = {}
    if m.methods:
        obj["methods"] = m.methods
    obj["vars"] = m.vars
    plugins: dict = obj.setdefault("plugins", {})
    action = route.WhichOneof("action")
    own_filters = route.typed_per_filter_config
    filter_configs = [own_filters, *inh.filter_configs] if own_filters else inh.filter_configs
    fault = per_filter(filter_configs, FAULT_FILTER, where, skips)
    fault_conf = fault_injection(fault, where, skips) if fault is not None else None
    legacy_cors = None
    if action == "route":
        ra = route.route
        retry = ra.retry_policy if ra.HasField("retry_policy") else inh.retry
        status = route_action(ra, route.match, retry, obj, where, skips, options, targets)
        if status is not None:
            obj.pop("upstream_id", None)
            plugins.clear()
            plugins["fault-injection"] = abort(status, "")
        else:
            mirrors = ra.request_mirror_policies or inh.mirrors
            if mirrors and (mirror := proxy_mirror(mirrors, where, skips, targets.clusters)):
                plugins["proxy-mirror"] = mirror
            levels = _header_levels(route, inh, True)
            if levels and (req := request_headers(fold(levels, skips,
                                                       "request_header_mutation"))):
                plugins.setdefault("proxy-rewrite", {})["headers"] = req
            plugins.setdefault("proxy-rewrite", _normalised_path())
            if options.enable_websocket:
                obj["enable_websocket"] = True
            if fault_conf:
                if "fault-injection" in plugins:
                    skips.add("fault_injection", "fault config on a cluster_header route "
                              "is not supported", where)
                else:
                    plugins["fault-injection"] = fault_conf
        legacy_cors = ra.cors if ra.HasField("cors") else None
    elif action == "redirect":
        conf = redirect(route.redirect, route.match, where, skips)
        if conf is None:
            plugins["fault-injection"] = abort(503, "")  # keep the route's place in order
        else:
            plugins["redirect"] = conf
            if fault_conf:
                plugins["fault-injection"] = fault_conf
    elif action == "direct_response":
        fi = _direct_response(rc, route.direct_response, where, skips)
        if fault_conf and "delay" in fault_conf:
            fi["delay"] = fault_conf["delay"]
        if fault_conf and "abort" in fault_conf:
            skips.add("fault_injection", "fault abort on a direct_response route is ignored",
                      where)
        plugins["fault-injection"] = fi
    else:
        skips.add("route_action", f"{action or 'no'} action cannot be expressed; route "
                  "dropped", where)
        return None
    cors_policy = per_filter(filter_configs, CORS_FILTER, where, skips)
    if cors_policy is None:
        cors_policy = legacy_cors if legacy_cors is not None else inh.cors
    if cors_policy is not None and (conf := cors(cors_policy, where, skips)):
        plugins["cors"] = conf
    levels = _header_levels(route, inh, False)
    if levels and (resp := response_headers(fold(levels, skips, "response_header_mutation"),
                                            skips, where)):
        plugins["response-rewrite"] = {"headers": resp}
    if not plugins:
        del obj["plugins"]
    return _Body(key, name, obj)


def _vhost_skips(vh, fields: set[str], skips: Skips) -> None:
    where = f"virtual host {vh.name!r}"
    if "require_tls" in fields:
        skips.add("require_tls", "TLS requirement is not enforced", where)
    if "rate_limits" in fields:
        skips.add("rate_limits", "Envoy rate limit actions are not supported", where)
    if "hedge_policy" in fields:
        skips.add("hedge_policy", "request hedging is not supported", where)
    if "matcher" in fields:
        skips.add("virtual_host_matcher", "the generic matcher tree is not supported", where)


def _rc_skips(rc, fields: set[str], skips: Skips) -> None:
    if "vhds" in fields:
        skips.add("vhds", "on-demand virtual hosts are not supported")
    if "cluster_specifier_plugins" in fields:
        skips.add("cluster_specifier_plugins", "cluster specifier plugins are not supported")
    if "internal_only_headers" in fields:
        skips.add("internal_only_headers", "internal-only headers are not stripped")
    if "vhost_header" in fields:
        skips.add("vhost_header", f"virtual hosts chosen by {rc.vhost_header!r}: APISIX uses "
                  "the Host header")


def _clone(value):
    """A copy of a JSON-like value that shares no dict or list with it: what copy.deepcopy
    gives here, at a fraction of its cost."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _bases(groups: list[_Group]) -> list[int]:
    """Priority base per group: 0 with hosts; bands for host-less ones (`*` lowest)."""
    bases = [0] * len(groups)
    hostless = [i for i, g in enumerate(groups) if g.selector.band is not None]
    if not hostless:
        return bases

    def rank(i: int) -> tuple:
        band = groups[i].selector.band
        return (0, 0, "") if band == ("any",) else (1, band[1], band[2])

    acc = 0
    for i in sorted(hostless, key=rank):
        bases[i] = acc
        acc += len(groups[i].bodies) + 1
    return bases


def translate_route_configuration(route_config, listener_port: int | None,
                                  options: TranslateOptions,
                                  clusters: Clusters | None = None) -> Translation:
    """APISIX routes for one RouteConfiguration, keys under route_key_prefix(name), plus
    its `no_cluster` upstream when a weighted entry names an absent cluster. `clusters`:
    what the agent holds (None: every cluster exists)."""
    rc = route_config
    rc_name = rc.name
    clusters = clusters if clusters is not None else Clusters()
    targets = Targets.of(rc_name, clusters)
    where = f"RouteConfiguration {rc_name!r}"
    check_domains(rc, where)
    skips = Skips(where)
    rc_fields = _present(rc)
    _rc_skips(rc, rc_fields, skips)
    port_vars: list[list] = []
    if options.port_match_var and listener_port is not None:
        port_vars.append([options.port_match_var, "==", str(listener_port)])
    groups: list[_Group] = []
    vh_keys = NameCounter()
    for vi, vh in enumerate(rc.virtual_hosts):
        vh_name = vh.name
        vh_key = vh_keys.key(vh_name, vi)
        vh_fields = _present(vh)
        _vhost_skips(vh, vh_fields, skips)
        inh = _inherited(rc, rc_fields, vh, vh_fields)
        name_head = f"{rc_name}/{vh_name}/"
        where_head = f"{where} virtual host {vh_name!r} route "
        route_keys = NameCounter()
        bodies: list[_Body] = []
        for ri, route in enumerate(vh.routes):
            rname = route.name
            body = _route_body(rc, inh, route, route_keys.key(rname, ri),
                               (name_head + (rname or "#"))[:_NAME_MAX],
                               f"{where_head}{rname or ri!r}", skips, options, targets)
            if body is not None:
                bodies.append(body)
        for k, sel in enumerate(host_selectors(vh, rc.ignore_port_in_host_matching, skips)):
            # Each selector emits its own objects: no nested dict shared between keys.
            groups.append(_Group(vh_key, vh_name, sel, [
                _Body(b.key, b.name, _clone(b.obj)) for b in bodies] if k else bodies))
    out = Translation(skipped=skips.items, cluster_deps=dict(clusters.deps))
    if targets.no_cluster_used:
        out.objects["/upstreams/" + targets.no_cluster_id] = targets.no_cluster_upstream()
    for group, base in zip(groups, _bases(groups), strict=True):
        sel = group.selector
        head = port_vars + sel.vars
        n = len(group.bodies)
        for j, body in enumerate(group.bodies):
            _emit(out, rc_name, group.vh_key, body.key + sel.tag, body.name, head, sel,
                  base + n - j, body.obj)
        closer = {"plugins": {"fault-injection": abort(404, "")}}
        _emit(out, rc_name, group.vh_key, "_x" + sel.tag, f"{rc_name}/{group.vh_name}/404",
              head, sel, base, closer)
    return out


def _emit(out: Translation, rc_name: str, vh_key: str, route_key: str, name: str,
          head: list[list], sel: HostSelector, priority: int, body: dict) -> None:
    rid = scoped_id(rc_name, vh_key, route_key)
    obj: dict = {"id": rid, "name": name[:_NAME_MAX], "uri": "/*", "priority": priority}
    if sel.hosts:
        obj["hosts"] = list(sel.hosts)
    for k, v in body.items():
        if k != "vars":
            obj[k] = v
    vars_ = head + body.get("vars", [])
    if vars_:
        obj["vars"] = vars_
    out.objects["/routes/" + rid] = obj

