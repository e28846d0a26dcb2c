"""Envoy resources in, APISIX objects out: pure functions, no I/O, no global state.

Public API (used by the agent, `amesh_ext.agent`):
- translate_cluster(cluster, assignment, hash_policy, options) -> Translation
- translate_route_configuration(route_config, listener_port, options, clusters) -> Translation
- translate_listener(listener, options, clusters) -> ListenerTranslation
- Clusters(known): the clusters that exist and their mirror nodes (mirror_node(upstream));
  each Translation records the questions it asked in cluster_deps (cluster_answer)
- route_hash_policies(route_config) -> {cluster name: HashPolicy}
- upstream_id(cluster_name), route_key_prefix(route_config_name) (ids.py)
Keys are '/upstreams/<id>', '/routes/<id>', '/stream_routes/<id>'. What APISIX cannot
express is reported as a Skip in the Translation; a resource Envoy would reject raises
InvalidResource.

Modules, one job each: ids (APISIX ids), options, model (result types), durations,
regex (RE2 -> PCRE), templates (`$` and `%CMD%` in values), hosts (virtual host domains),
matchers (RouteMatch), actions (RouteAction), redirect, headers (header mutations),
plugins (fault, cors, mirror), hashing (hash policies), routes (RouteConfiguration),
upstreams (Cluster), listeners (Listener).
"""

from .hashing import route_hash_policies
from .hosts import check_domains as check_route_domains
from .ids import route_key_prefix, stream_route_key_prefix, upstream_id
from .listeners import translate_listener
from .model import (
    Clusters,
    HashPolicy,
    InvalidResource,
    ListenerTranslation,
    Skip,
    Translation,
    cluster_answer,
)
from .options import TranslateOptions, istio_cert_paths
from .routes import translate_route_configuration
from .upstreams import mirror_node, translate_cluster

__all__ = [
    "Clusters",
    "HashPolicy",
    "InvalidResource",
    "ListenerTranslation",
    "Skip",
    "TranslateOptions",
    "Translation",
    "check_route_domains",
    "cluster_answer",
    "istio_cert_paths",
    "mirror_node",
    "route_hash_policies",
    "route_key_prefix",
    "stream_route_key_prefix",
    "translate_cluster",
    "translate_listener",
    "translate_route_configuration",
    "upstream_id",
]
