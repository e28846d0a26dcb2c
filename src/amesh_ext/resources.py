"""The xDS vocabulary shared by every layer: type URLs, resource records, decoding.

A `Resource` carries the serialized bytes it arrived as; the agent compares bytes to
decide what changed, so an unchanged resource in a state-of-the-world push costs a
byte comparison, not a decode and a translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Envoy's push order; also the order in which a source should apply a full snapshot.
TYPE_ORDER = (CLUSTER, ENDPOINTS, LISTENER, ROUTES)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINTS: "eds", LISTENER: "lds", ROUTES: "rds"}


class ResourceError(ValueError):
    """A resource that cannot be decoded or understood; rejected alone, with this reason.
    `type_url` and `name` are set when known, so its last good version can be kept."""

    def __init__(self, message: str, type_url: str = "", name: str = "") -> None:
        super().__init__(message)
        self.type_url = type_url
        self.name = name


# Typed configs inside the four resource types. Importing them registers them in the
# protobuf descriptor pool, which JSON parsing and Any unpacking need.
_EXTENSION_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2",
    "envoy.extensions.transport_sockets.tcp_stats.v3.tcp_stats_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
    "envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2",
    "envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2",
    "envoy.extensions.filters.network.wasm.v3.wasm_pb2",
    "envoy.extensions.filters.http.wasm.v3.wasm_pb2",
    "envoy.extensions.filters.http.grpc_stats.v3.config_pb2",
    "envoy.extensions.filters.http.grpc_web.v3.grpc_web_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.network.connection_limit.v3.connection_limit_pb2",
    "envoy.extensions.load_balancing_policies.round_robin.v3.round_robin_pb2",
    "envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2",
    "envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2",
    "envoy.extensions.load_balancing_policies.maglev.v3.maglev_pb2",
    "envoy.extensions.load_balancing_policies.random.v3.random_pb2",
    "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.client_side_weighted_round_robin_pb2",
    "udpa.type.v1.typed_struct_pb2",
    "xds.type.v3.typed_struct_pb2",
    "google.protobuf.struct_pb2",
    "google.protobuf.wrappers_pb2",
)
_extensions_loaded = False


def load_extensions() -> None:
    """Register the typed configs Istio puts inside resources (once; modules that this
    xds-protos lacks are passed over)."""
    global _extensions_loaded
    if _extensions_loaded:
        return
    import contextlib
    import importlib

    for module in _EXTENSION_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    _extensions_loaded = True


def message_class(type_url: str) -> type[Message]:
    """The generated class for one of the four types amesh consumes."""
    load_extensions()
    # Imported lazily: the envoy packages are heavy and only the agent thread needs them.
    if type_url == CLUSTER:
        from envoy.config.cluster.v3.cluster_pb2 import Cluster

        return Cluster
    if type_url == ENDPOINTS:
        from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

        return ClusterLoadAssignment
    if type_url == LISTENER:
        from envoy.config.listener.v3.listener_pb2 import Listener

        return Listener
    if type_url == ROUTES:
        from envoy.config.route.v3.route_pb2 import RouteConfiguration

        return RouteConfiguration
    raise ResourceError(f"unsupported resource type {type_url!r}")


def name_of(type_url: str, message: Message) -> str:
    """The xDS name of a resource (ClusterLoadAssignment is named by cluster_name)."""
    return message.cluster_name if type_url == ENDPOINTS else message.name  # type: ignore[attr-defined]


@dataclass(eq=False, slots=True)
class Resource:
    """One named xDS resource as received; `raw` is its serialized protobuf."""

    type_url: str
    name: str
    raw: bytes
    version: str = ""
    _decoded: Message | None = field(default=None, repr=False)

    @classmethod
    def from_message(cls, type_url: str, message: Message, version: str = "") -> Resource:
        raw = message.SerializeToString(deterministic=True)
        return cls(type_url, name_of(type_url, message), raw, version, message)

    def release(self) -> None:
        """Drop the decoded message (the bytes stay): decoded protos cost several times their
        wire size, and the agent only needs them while it translates."""
        self._decoded = None

    def message(self) -> Message:
        """The decoded message (decoded on first use, kept until release())."""
        if self._decoded is None:
            msg = message_class(self.type_url)()
            try:
                msg.ParseFromString(self.raw)
            except DecodeError as exc:
                raise ResourceError(f"cannot decode {self.type_url} {self.name!r}: {exc}") from exc
            self._decoded = msg
        return self._decoded


def parse_json_resource(obj: Any, where: str) -> Resource:
    """A resource from Envoy's JSON/YAML form, typed by its `@type` field."""
    if not isinstance(obj, dict):
        raise ResourceError(f"{where}: a resource must be a mapping, got {type(obj).__name__}")
    type_url = obj.get("@type")
    if not isinstance(type_url, str):
        raise ResourceError(f"{where}: resource has no '@type'")
    cls = message_class(type_url)
    body = {k: v for k, v in obj.items() if k != "@type"}
    msg = cls()
    try:
        json_format.ParseDict(body, msg, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        name = body.get("cluster_name" if type_url == ENDPOINTS else "name")
        raise ResourceError(
            f"{where}: invalid {type_url.rsplit('.', 1)[-1]} {name!r}: {exc}",
            type_url, name if isinstance(name, str) else "",
        ) from exc
    name = name_of(type_url, msg)
    if not name:
        raise ResourceError(f"{where}: {type_url.rsplit('.', 1)[-1]} has no name")
    return Resource.from_message(type_url, msg)
