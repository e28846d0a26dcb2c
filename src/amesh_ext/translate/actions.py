"""Envoy RouteAction -> the APISIX route's upstream_id, traffic-split, proxy-rewrite path and
host, and timeout."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .durations import seconds
from .ids import scoped_id, upstream_id
from .model import Clusters, InvalidResource, Skips
from .options import TranslateOptions
from .redirect import backrefs, prefix_pattern
from .regex import re2_to_pcre

# traffic-split's weighted_upstreams maxItems.
_MAX_SPLIT = 20
# nginx's `error` covers connection failures and resets; these retry_on values need no more.
_RETRY_ON_NGINX = frozenset(("connect-failure", "refused-stream", "reset"))
# proxy-rewrite's `host` pattern.
_PROXY_HOST = re.compile(r"[0-9a-zA-Z.-]+(:\d{1,5})?")
# A positive duration rounded to APISIX's precision must stay > 0.
_MIN_TIMEOUT = 0.001


@dataclass
class Targets:
    """The clusters routes may name, for one route configuration. A weighted entry whose
    cluster is absent must still be drawn with its weight and answer 503 (Envoy's
    cluster_not_found_response_code); traffic-split needs an existing upstream for that
    (an unknown upstream_id makes it answer 500 for every draw), so such entries name the
    route configuration's own `no_cluster` upstream, which has no nodes (APISIX: 503)."""

    clusters: Clusters
    no_cluster_id: str
    no_cluster_used: bool = False

    @classmethod
    def of(cls, route_config_name: str, clusters: Clusters) -> Targets:
        # `_n` is no escape (not hex) and `_.` never occurs in an escaped cluster name:
        # this id collides with no cluster's upstream.
        return cls(clusters, scoped_id(route_config_name, "_n"))

    def no_cluster_upstream(self) -> dict:
        return {"id": self.no_cluster_id, "name": "amesh: cluster not found (503)",
                "type": "roundrobin", "nodes": []}


def _cluster_target(action, route: dict, where: str, skips: Skips,
                    options: TranslateOptions, targets: Targets) -> int | None:
    """Set upstream_id / traffic-split; else the status the route must answer."""
    kind = action.WhichOneof("cluster_specifier")
    plugins = route.setdefault("plugins", {})
    exists = targets.clusters.exists
    if kind == "cluster":
        if not exists(action.cluster):
            return 503  # Envoy: cluster_not_found_response_code
        route["upstream_id"] = upstream_id(action.cluster)
        return None
    if kind == "weighted_clusters":
        wc = action.weighted_clusters
        entries = []
        for cw in wc.clusters:
            if cw.cluster_header:
                skips.add("weighted_cluster_header", "cluster_header in a weighted cluster "
                          "cannot be expressed; entry dropped", where)
                continue
            if len(cw.request_headers_to_add) or len(cw.request_headers_to_remove) or len(
                    cw.response_headers_to_add) or len(cw.response_headers_to_remove) or (
                    cw.host_rewrite_literal) or len(cw.typed_per_filter_config):
                skips.add("weighted_cluster_options", f"per-cluster headers, host rewrite "
                          f"and filter configs of {cw.name!r} are not supported", where)
            weight = cw.weight.value if cw.HasField("weight") else 0
            if weight > 0:
                uid = upstream_id(cw.name) if exists(cw.name) else targets.no_cluster_id
                entries.append({"upstream_id": uid, "weight": weight})
        if not wc.clusters:
            raise InvalidResource(f"{where}: weighted_clusters without clusters")
        if not entries:
            raise InvalidResource(f"{where}: weighted_clusters weights sum to 0")
        if wc.header_name or (wc.HasField("use_hash_policy") and wc.use_hash_policy.value):
            skips.add("weighted_cluster_selection", "header/hash-driven cluster choice: "
                      "APISIX splits by weighted round-robin", where)
        if len(entries) > _MAX_SPLIT:
            skips.add("weighted_clusters", f"{len(entries)} clusters: APISIX keeps "
                      f"{_MAX_SPLIT}", where)
            entries = entries[:_MAX_SPLIT]
        if all(e["upstream_id"] == targets.no_cluster_id for e in entries):
            return 503
        if any(e["upstream_id"] == targets.no_cluster_id for e in entries):
            targets.no_cluster_used = True
        route["upstream_id"] = entries[0]["upstream_id"]
        if len(entries) > 1:
            # A rule without `match` always applies (never emit `match: []`).
            plugins["traffic-split"] = {"rules": [{"weighted_upstreams": entries}]}
        return None
    if kind == "cluster_header":
        header = action.cluster_header
        var = "http_" + header.lower().replace("-", "_")
        candidates = options.cluster_header_clusters
        if not candidates:
            skips.add("cluster_header", f"cluster named by header {header!r}: no candidate "
                      "clusters configured (TranslateOptions.cluster_header_clusters); the "
                      "route answers 404 like Envoy for an unknown cluster", where)
            return 404
        # A candidate the agent does not hold is unknown to Envoy too: 404 (proto doc).
        present = [name for name in candidates if exists(name)]
        if not present:
            return 404
        rules = [{"match": [{"vars": [[var, "==", name]]}],
                  "weighted_upstreams": [{"upstream_id": upstream_id(name), "weight": 1}]}
                 for name in present]
        plugins["traffic-split"] = {"rules": rules}
        # No rule matched: the header names no known cluster, Envoy answers 404.
        plugins["fault-injection"] = {"abort": {
            "http_status": 404, "vars": [[[var, "!", "in", present]]]}}
        route["upstream_id"] = upstream_id(present[0])
        return None
    skips.add("cluster_specifier", f"{kind or 'no cluster specifier'} cannot be expressed; "
              "the route answers 503", where)
    return 503


def _timeout(action, retry, options: TranslateOptions) -> dict:
    """Route `timeout`. Envoy's `timeout` is a total deadline (0 = none); nginx's send/read
    timeouts are per operation, so the deadline (or the per-try timeout, or the idle timeout,
    whichever is shortest) becomes send/read. connect comes from options, as the route's
    timeout replaces the upstream's connect_timeout in APISIX."""
    total = seconds(action.timeout) if action.HasField("timeout") else (
        options.default_route_timeout)
    rw = total or options.infinite_timeout
    if retry is not None and 0 < (per_try := seconds(retry.per_try_timeout)) < rw:
        rw = per_try
    if action.HasField("idle_timeout") and 0 < (idle := seconds(action.idle_timeout)) < rw:
        rw = idle
    rw = max(rw, _MIN_TIMEOUT)
    return {"connect": max(min(options.route_connect_timeout, rw), _MIN_TIMEOUT),
            "send": rw, "read": rw}


def _retries(retry, where: str, skips: Skips, options: TranslateOptions) -> None:
    """Retries are per upstream in APISIX (`retries`, from options) and nginx retries on
    `error timeout` only: report what differs."""
    if retry is None:
        return
    attempts = retry.num_retries.value if retry.HasField("num_retries") else 1
    if options.upstream_retries is not None and attempts != options.upstream_retries:
        skips.add("retry_policy_num_retries", f"{attempts} retries wanted; APISIX upstreams "
                  f"retry {options.upstream_retries} times", where)
    conditions = {c.strip() for c in retry.retry_on.split(",") if c.strip()}
    if "retriable-status-codes" in conditions and not len(retry.retriable_status_codes):
        conditions.discard("retriable-status-codes")  # no codes listed: retries nothing
    other = sorted(conditions - _RETRY_ON_NGINX)
    if other:
        skips.add("retry_on", f"retry_on {','.join(other)} not expressible (nginx retries "
                  "on connection errors and timeouts)", where)


def _rewrite(action, match, route: dict, where: str, skips: Skips) -> None:
    """proxy-rewrite uri / regex_uri / host."""
    conf: dict = {}
    if action.prefix_rewrite:
        pattern, repl = prefix_pattern(match, action.prefix_rewrite, where, skips)
        if pattern is not None:
            conf["regex_uri"] = [pattern, repl]
    elif action.HasField("regex_rewrite"):
        rx = action.regex_rewrite.pattern.regex
        pattern = re2_to_pcre(rx, where)
        if not rx.startswith(("^", "\\A")):
            skips.add("regex_rewrite_first_match", "APISIX replaces the first match only, "
                      "Envoy all of them", where)
        conf["regex_uri"] = [pattern, backrefs(action.regex_rewrite.substitution)]
    elif action.HasField("path_rewrite_policy"):
        skips.add("path_rewrite_policy", "path template rewrites are not supported", where)
    host_kind = action.WhichOneof("host_rewrite_specifier")
    if host_kind == "host_rewrite_literal":
        if _PROXY_HOST.fullmatch(action.host_rewrite_literal):
            conf["host"] = action.host_rewrite_literal
        else:
            skips.add("host_rewrite", f"host {action.host_rewrite_literal!r} is not a valid "
                      "proxy-rewrite host", where)
    elif host_kind == "auto_host_rewrite":
        if action.auto_host_rewrite.value:
            skips.add("auto_host_rewrite", "APISIX's equivalent (pass_host: node) is set per "
                      "upstream, not per route; the request host is kept", where)
    elif host_kind is not None:
        skips.add("host_rewrite", f"{host_kind} is not supported", where)
    if conf:
        route.setdefault("plugins", {}).setdefault("proxy-rewrite", {}).update(conf)


def route_action(action, match, retry, route: dict, where: str, skips: Skips,
                 options: TranslateOptions, targets: Targets) -> int | None:
    """Fill `route` from a RouteAction; else the status the route must answer."""
    status = _cluster_target(action, route, where, skips, options, targets)
    if status is not None:
        return status
    route["timeout"] = _timeout(action, retry, options)
    _retries(retry, where, skips, options)
    _rewrite(action, match, route, where, skips)
    if action.HasField("max_stream_duration"):
        msd = action.max_stream_duration
        if msd.HasField("max_stream_duration") and seconds(msd.max_stream_duration) > 0:
            skips.add("max_stream_duration", "stream duration limits are not supported", where)
    return None
