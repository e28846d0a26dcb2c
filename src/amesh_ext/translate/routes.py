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
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .actions import route_action
from .headers import HeaderLevel, fold, request_headers, response_headers
from .hosts import HostSelector, check_domains, host_selectors
from .ids import NameCounter, scoped_id
from .matchers import translate_match
from .model import InvalidResource, Skips, Translation
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


_HEADER_FIELDS = {True: ("request_headers_to_add", "request_headers_to_remove"),
                  False: ("response_headers_to_add", "response_headers_to_remove")}


def _header_levels(rc, vh, route, request: bool) -> list[HeaderLevel]:
    """The levels that mutate headers, in evaluation order. Levels without mutations are
    left out (they change nothing in fold()): most routes have none, and this runs for
    every route of every push."""
    add_field, remove_field = _HEADER_FIELDS[request]
    levels = []
    for m, kind in ((route, "route"), (vh, "virtual host"), (rc, "")):
        add, remove = getattr(m, add_field), getattr(m, remove_field)
        if add or remove:
            where = f"{kind} {m.name!r}" if kind else "route config"
            levels.append(HeaderLevel(list(add), list(remove), where))
    return levels[::-1] if rc.most_specific_header_mutations_wins else levels


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


def _route_body(rc, vh, route, key: str, where: str, skips: Skips,
                options: TranslateOptions) -> _Body | None:
    m = translate_match(route.match, where, skips)
    if m is None or m.never:
        return None
    obj: dict = {}
    if m.methods:
        obj["methods"] = m.methods
    obj["vars"] = m.vars
    plugins: dict = obj.setdefault("plugins", {})
    action = route.WhichOneof("action")
    filter_configs = [route.typed_per_filter_config, vh.typed_per_filter_config,
                      rc.typed_per_filter_config]
    fault = per_filter(filter_configs, FAULT_FILTER, where, skips)
    fault_conf = fault_injection(fault, where, skips) if fault is not None else None
    legacy_cors = None
    if action == "route":
        ra = route.route
        retry = ra.retry_policy if ra.HasField("retry_policy") else (
            vh.retry_policy if vh.HasField("retry_policy") else None)
        status = route_action(ra, route.match, retry, obj, where, skips, options)
        if status is not None:
            obj.pop("upstream_id", None)
            plugins.clear()
            plugins["fault-injection"] = abort(status, "")
        else:
            mirror = proxy_mirror(list(ra.request_mirror_policies) or list(
                vh.request_mirror_policies) or list(rc.request_mirror_policies), where, skips)
            if mirror:
                plugins["proxy-mirror"] = mirror
            req = request_headers(fold(_header_levels(rc, vh, route, True), skips,
                                       "request_header_mutation"))
            if req:
                plugins.setdefault("proxy-rewrite", {})["headers"] = req
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
        cors_policy = legacy_cors if legacy_cors is not None else (
            vh.cors if vh.HasField("cors") else None)
    if cors_policy is not None and (conf := cors(cors_policy, where, skips)):
        plugins["cors"] = conf
    resp = response_headers(fold(_header_levels(rc, vh, route, False), skips,
                                 "response_header_mutation"), skips, where)
    if resp:
        plugins["response-rewrite"] = {"headers": resp}
    if not plugins:
        del obj["plugins"]
    return _Body(key, f"{rc.name}/{vh.name}/{route.name or '#'}"[:_NAME_MAX], obj)


def _vhost_skips(vh, skips: Skips) -> None:
    where = f"virtual host {vh.name!r}"
    if vh.require_tls:
        skips.add("require_tls", "TLS requirement is not enforced", where)
    if len(vh.rate_limits):
        skips.add("rate_limits", "Envoy rate limit actions are not supported", where)
    if vh.HasField("hedge_policy"):
        skips.add("hedge_policy", "request hedging is not supported", where)
    if vh.HasField("matcher"):
        skips.add("virtual_host_matcher", "the generic matcher tree is not supported", where)


def _rc_skips(rc, skips: Skips) -> None:
    if rc.HasField("vhds"):
        skips.add("vhds", "on-demand virtual hosts are not supported")
    if len(rc.cluster_specifier_plugins):
        skips.add("cluster_specifier_plugins", "cluster specifier plugins are not supported")
    if len(rc.internal_only_headers):
        skips.add("internal_only_headers", "internal-only headers are not stripped")
    if rc.vhost_header:
        skips.add("vhost_header", f"virtual hosts chosen by {rc.vhost_header!r}: APISIX uses "
                  "the Host header")


def _bases(groups: list[_Group]) -> list[int]:
    """Priority base per group: 0 with hosts; bands for host-less ones (`*` lowest)."""
    bases = [0] * len(groups)
    hostless = [i for i, g in enumerate(groups) if g.selector.band is not None]

    def rank(i: int) -> tuple:
        band = groups[i].selector.band
        return (0, 0, "") if band == ("any",) else (1, band[1], band[2])

    acc = 0
    for i in sorted(hostless, key=rank):
        bases[i] = acc
        acc += len(groups[i].bodies) + 1
    return bases


def translate_route_configuration(route_config, listener_port: int | None,
                                  options: TranslateOptions) -> Translation:
    """APISIX routes for one RouteConfiguration, keys under route_key_prefix(name)."""
    rc = route_config
    where = f"RouteConfiguration {rc.name!r}"
    check_domains(rc, where)
    skips = Skips(where)
    _rc_skips(rc, skips)
    port_vars: list[list] = []
    if options.port_match_var and listener_port is not None:
        port_vars.append([options.port_match_var, "==", str(listener_port)])
    groups: list[_Group] = []
    vh_keys = NameCounter()
    for vi, vh in enumerate(rc.virtual_hosts):
        vh_key = vh_keys.key(vh.name, vi)
        _vhost_skips(vh, skips)
        route_keys = NameCounter()
        bodies: list[_Body] = []
        for ri, route in enumerate(vh.routes):
            rwhere = f"{where} virtual host {vh.name!r} route {route.name or ri!r}"
            body = _route_body(rc, vh, route, route_keys.key(route.name, ri), rwhere, skips,
                               options)
            if body is not None:
                bodies.append(body)
        for k, sel in enumerate(host_selectors(vh, rc.ignore_port_in_host_matching, skips)):
            # Each selector emits its own objects: no nested dict shared between keys.
            groups.append(_Group(vh_key, vh.name, sel, copy.deepcopy(bodies) if k else bodies))
    out = Translation(skipped=skips.items)
    for group, base in zip(groups, _bases(groups), strict=True):
        sel = group.selector
        head = port_vars + sel.vars
        n = len(group.bodies)
        for j, body in enumerate(group.bodies):
            _emit(out, rc.name, group.vh_key, body.key + sel.tag, body.name, head, sel,
                  base + n - j, body.obj)
        closer = {"plugins": {"fault-injection": abort(404, "")}}
        _emit(out, rc.name, group.vh_key, "_x" + sel.tag, f"{rc.name}/{group.vh_name}/404",
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

