"""Envoy route hash_policy -> APISIX chash (`hash_on` + `key`), which lives on the upstream.

One policy maps directly (header, cookie, `remote_addr`, `arg_<q>`); several become
`vars_combinations` (`$http_a$cookie_b`), hashing their concatenation where Envoy combines
the hashes of the present ones; a `terminal` policy ends the list, as it usually would.
"""

from __future__ import annotations

import re

from .model import HashPolicy

# APISIX upstream_hash_header_schema and the arg_ part of upstream_hash_vars_schema.
_NAME = re.compile(r"[a-zA-Z0-9_-]+")


def _one(policy) -> tuple[str, str, str] | None:
    """(hash_on, key, `$var` form) of one HashPolicy, None if APISIX has no equivalent."""
    kind = policy.WhichOneof("policy_specifier")
    if kind == "header":
        name = policy.header.header_name.lower()
        if name == ":authority" or name == "host":
            return "vars", "host", "$host"
        if _NAME.fullmatch(name) and not policy.header.HasField("regex_rewrite"):
            return "header", name, "$http_" + name.replace("-", "_")
    elif kind == "cookie":
        name = policy.cookie.name
        if _NAME.fullmatch(name):
            return "cookie", name, "$cookie_" + name
    elif kind == "connection_properties":
        if policy.connection_properties.source_ip:
            return "vars", "remote_addr", "$remote_addr"
    elif kind == "query_parameter":
        name = policy.query_parameter.name
        if _NAME.fullmatch(name):
            return "vars", "arg_" + name, "$arg_" + name
    return None


def hash_policy(policies) -> HashPolicy | None:
    """The APISIX chash equivalent of a route's hash_policy list (None if none maps)."""
    parts: list[tuple[str, str, str]] = []
    for policy in policies:
        one = _one(policy)
        if one is not None and one not in parts:
            parts.append(one)
        if policy.terminal and one is not None:
            break
    if not parts:
        return None
    if len(parts) == 1:
        return HashPolicy(parts[0][0], parts[0][1])
    return HashPolicy("vars_combinations", "".join(p[2] for p in parts))


def action_clusters(action) -> list[str]:
    """The cluster names a RouteAction may send to."""
    kind = action.WhichOneof("cluster_specifier")
    if kind == "cluster":
        return [action.cluster]
    if kind == "weighted_clusters":
        return [cw.name for cw in action.weighted_clusters.clusters if cw.name]
    return []


def route_hash_policies(route_config) -> dict[str, HashPolicy]:
    """Cluster name -> the hash policy of the first route (in virtual host, route order)
    that targets it with one; Envoy keeps hash_policy on routes, APISIX on upstreams, and
    the agent joins them. Conflicting policies for one cluster: the first wins."""
    out: dict[str, HashPolicy] = {}
    for vh in route_config.virtual_hosts:
        for route in vh.routes:
            if route.WhichOneof("action") != "route" or not len(route.route.hash_policy):
                continue
            hp = hash_policy(route.route.hash_policy)
            if hp is None:
                continue
            for name in action_clusters(route.route):
                out.setdefault(name, hp)
    return out
