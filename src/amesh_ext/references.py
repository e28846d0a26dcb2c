"""The references between Envoy resources that both the xDS client and the agent follow:
an EDS cluster reads the ClusterLoadAssignment named by its service_name (else its own
name), and a listener's HttpConnectionManagers read route configurations by name (RDS).
One definition, so that what the client subscribes to and what the agent joins agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from .resources import CLUSTER, LISTENER, ResourceError

HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def eds_name(cluster: Any) -> str | None:
    """The ClusterLoadAssignment an EDS cluster reads; None for inline or DNS endpoints."""
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    if cluster.WhichOneof("cluster_discovery_type") != "type" or cluster.type != Cluster.EDS:
        return None
    return cluster.eds_cluster_config.service_name or cluster.name


def eds_names(cluster: Message) -> frozenset[str]:
    name = eds_name(cluster)
    return frozenset() if name is None else frozenset({name})


def rds_names(listener: Message) -> frozenset[str]:
    """route_config_names of the HCMs (with RDS) in every filter chain and the default one."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    lst: Any = listener
    chains = list(lst.filter_chains)
    if lst.HasField("default_filter_chain"):
        chains.append(lst.default_filter_chain)
    configs = [f.typed_config for chain in chains for f in chain.filters]
    if lst.HasField("api_listener"):
        configs.append(lst.api_listener.api_listener)
    names = set()
    for typed in configs:
        if typed.type_url != HCM_TYPE:
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        try:
            hcm.ParseFromString(typed.value)
        except DecodeError as exc:
            raise ResourceError(f"cannot decode its HttpConnectionManager: {exc}") from exc
        if hcm.HasField("rds"):
            if not hcm.rds.route_config_name:
                raise ResourceError("HttpConnectionManager rds has no route_config_name")
            names.add(hcm.rds.route_config_name)
    return frozenset(names)


REFERENCES: dict[str, Callable[[Message], frozenset[str]]] = {
    CLUSTER: eds_names,
    LISTENER: rds_names,
}
