"""The Node an Istio sidecar presents to istiod, built the way pilot-agent builds it.

istiod reads only the first request's Node. It parses `id` as
`sidecar~<ip>~<pod>.<ns>~<ns>.svc.<domain>` (four parts, a valid IP) and unmarshals
`metadata` into its NodeMetadata, so string fields must be strings and INSTANCE_IPS is a
comma-separated string. pilot-agent fills identity from POD_NAME / POD_NAMESPACE /
INSTANCE_IP and copies every ISTIO_META_<KEY> env var into metadata (ISTIO_METAJSON_<KEY>
holds JSON); explicit configuration wins over the environment here.

Locality: istiod orders a DestinationRule's failover endpoints into priorities relative to
the proxy's locality, which it takes from its registry or, failing that, from Node.locality.
pilot-agent sets Node.locality from the `istio-locality` label (`region.zone.subzone`), else
from the platform; here an explicit `locality` ("region/zone/subzone" or a mapping with
region, zone, sub_zone) comes first, then that label.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3.base_pb2 import Node

META_PREFIX = "ISTIO_META_"
METAJSON_PREFIX = "ISTIO_METAJSON_"
INTERCEPTION_MODES = ("NONE", "REDIRECT", "TPROXY")
USER_AGENT = "amesh"

# Config key -> (metadata key, extra env var pilot-agent also honours).
_STRING_FIELDS = {
    "cluster_id": ("CLUSTER_ID", None),
    "istio_version": ("ISTIO_VERSION", "ISTIO_VERSION"),
    "mesh_id": ("MESH_ID", None),
    "service_account": ("SERVICE_ACCOUNT", "SERVICE_ACCOUNT"),
    "workload_name": ("WORKLOAD_NAME", None),
    "interception_mode": ("INTERCEPTION_MODE", None),
}
FIELDS = frozenset(
    {"id", "pod_name", "namespace", "ip", "instance_ips", "metadata", "labels", "dns_domain",
     "locality"}
    | set(_STRING_FIELDS)
)
LOCALITY_LABEL = "istio-locality"  # Istio's model.LocalityLabel
LOCALITY_KEYS = ("region", "zone", "sub_zone")


@dataclass(frozen=True)
class NodeIdentity:
    id: str
    namespace: str
    ip: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    locality: Mapping[str, str] = field(default_factory=dict)  # region, zone, sub_zone

    def to_proto(self) -> Node:
        node = Node(id=self.id, user_agent_name=USER_AGENT)
        node.metadata.update(dict(self.metadata))
        for key, value in self.locality.items():
            setattr(node.locality, key, value)
        return node


def _locality(value: Any, where: str) -> dict[str, str]:
    """{region, zone, sub_zone} (empty parts left out) from "r/z/s" or a mapping."""
    if isinstance(value, str):
        parts = value.split("/")
        if len(parts) > 3:
            raise ValueError(f"{where}: expected region/zone/subzone, got {value!r}")
        value = dict(zip(LOCALITY_KEYS, parts, strict=False))
    if not isinstance(value, Mapping) or not set(value) <= set(LOCALITY_KEYS) or not all(
            isinstance(v, str) for v in value.values()):
        raise ValueError(f"{where}: a 'region/zone/subzone' string or a mapping of "
                         f"{list(LOCALITY_KEYS)} to strings, got {value!r}")
    return {k: v for k, v in value.items() if v}


def sidecar_id(ip: str, pod_name: str, namespace: str, dns_domain: str = "cluster.local") -> str:
    return f"sidecar~{ip}~{pod_name}.{namespace}~{namespace}.svc.{dns_domain}"


def identity_from(
    conf: Mapping[str, Any], env: Mapping[str, str], where: str = "node"
) -> NodeIdentity:
    """Validate a node config section (with environment fallback); ValueError names the field."""
    unknown = set(conf) - FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    env_meta = _env_metadata(env, where)

    def text(key: str, *fallbacks: str | None) -> str | None:
        value = conf.get(key)
        if value is None:
            value = next((f for f in fallbacks if f), None)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}.{key}: must be a non-empty string, got {value!r}")
        return value

    node_id = text("id")
    id_ip = id_pod = id_ns = None
    if node_id is not None:
        id_ip, id_pod, id_ns = _parse_id(node_id, f"{where}.id")
    namespace = text("namespace", id_ns, env.get("POD_NAMESPACE"))
    ip = text("ip", id_ip, env.get("INSTANCE_IP"))
    pod_name = text("pod_name", id_pod, env.get("POD_NAME"))
    domain = text("dns_domain") or "cluster.local"
    for key, value in (("namespace", namespace), ("ip", ip), ("pod_name", pod_name)):
        if value is None:
            env_name = {"namespace": "POD_NAMESPACE", "ip": "INSTANCE_IP", "pod_name": "POD_NAME"}
            raise ValueError(f"{where}.{key}: required (or {env_name[key]} in the environment)")
    assert namespace and ip and pod_name
    _check_ip(ip, f"{where}.ip")
    if node_id is None:
        node_id = sidecar_id(ip, pod_name, namespace, domain)

    extra = conf.get("metadata", {})
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"{where}.metadata: must be a mapping with string keys")
    metadata: dict[str, Any] = {**env_meta, **extra}

    labels = conf.get("labels", metadata.get("LABELS", {}))
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError(f"{where}.labels: must map strings to strings, got {labels!r}")

    ips = conf.get("instance_ips")
    if ips is None:
        meta_ips = metadata.get("INSTANCE_IPS")
        ips = meta_ips.split(",") if isinstance(meta_ips, str) and meta_ips else [ip]
    if not isinstance(ips, list) or not ips:
        raise ValueError(f"{where}.instance_ips: must be a non-empty list of IPs")
    for i, one in enumerate(ips):
        _check_ip(one, f"{where}.instance_ips[{i}]")

    metadata.update(NAMESPACE=namespace, LABELS=dict(labels), INSTANCE_IPS=",".join(ips))
    if "locality" in conf:
        locality = _locality(conf["locality"], f"{where}.locality")
    elif LOCALITY_LABEL in labels:
        # The label cannot hold '/': pilot-agent reads '.' as the separator.
        locality = _locality(labels[LOCALITY_LABEL].replace(".", "/"),
                             f"{where}.labels[{LOCALITY_LABEL!r}]")
    else:
        locality = {}
    defaults = {"cluster_id": "Kubernetes", "interception_mode": "NONE"}
    for key, (meta_key, env_key) in _STRING_FIELDS.items():
        meta_value = metadata.get(meta_key)
        value = text(
            key,
            meta_value if isinstance(meta_value, str) else None,
            env.get(env_key) if env_key else None,
            defaults.get(key),
        )
        if value is not None:
            metadata[meta_key] = value
    if metadata["INTERCEPTION_MODE"] not in INTERCEPTION_MODES:
        raise ValueError(
            f"{where}.interception_mode: one of {INTERCEPTION_MODES}, "
            f"got {metadata['INTERCEPTION_MODE']!r}"
        )
    try:
        Node().metadata.update(metadata)  # a protobuf Struct holds only JSON values
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.metadata: not JSON-representable: {exc}") from exc
    return NodeIdentity(node_id, namespace, ip, metadata, locality)


def _env_metadata(env: Mapping[str, str], where: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith(METAJSON_PREFIX) and len(name) > len(METAJSON_PREFIX):
            try:
                meta[name[len(METAJSON_PREFIX) :]] = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"{where}: environment {name} is not JSON: {exc}") from exc
        elif name.startswith(META_PREFIX) and len(name) > len(META_PREFIX):
            meta[name[len(META_PREFIX) :]] = value
    return meta


def _parse_id(node_id: str, where: str) -> tuple[str, str | None, str | None]:
    parts = node_id.split("~")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"{where}: expected type~ip~pod.namespace~domain, got {node_id!r}")
    _check_ip(parts[1], where)
    pod, _, ns = parts[2].partition(".")
    return parts[1], pod or None, ns or parts[3].partition(".")[0] or None


def _check_ip(value: Any, where: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{where}: not an IP address: {value!r}") from None
