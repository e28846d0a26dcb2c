"""The grpc:// config source: Istio's ADS, spoken like an Envoy sidecar (see xds/).

Start-config section "xds" (AdsConfig.from_mapping):

    {
      "address": "grpcs://istiod.istio-system.svc:15012",  # or grpc://host:port (plaintext)
      "protocol": "delta",                                  # or "sotw"
      "node": {"pod_name": ..., "namespace": ..., "ip": ..., "labels": {...}, ...},
      "tls": {"ca_file": ..., "server_name": ..., "token_file": ...},  # grpcs:// only
      "keepalive_seconds": 30, "max_receive_bytes": 0,
      "backoff": {"base_seconds": 0.5, "max_seconds": 30}
    }

Addresses: `grpc://host[:port]` is plaintext (default port 15010, istiod's
unauthenticated port); `grpcs://host[:port]` is TLS (default port 15012). IPv6 hosts go in
brackets. Node fields fall back to pilot-agent's environment (POD_NAME, POD_NAMESPACE,
INSTANCE_IP, ISTIO_META_*, ISTIO_METAJSON_*), read from the mapping given (os.environ).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..xds.backoff import Backoff
from ..xds.client import PROTOCOLS, XdsClient
from ..xds.credentials import KEEPALIVE_MIN_SECONDS, TlsSettings
from ..xds.node import NodeIdentity, identity_from
from .base import ResourceHandler

log = logging.getLogger("amesh.xds")

SCHEMES = {"grpc": 15010, "grpcs": 15012}  # scheme -> istiod's default port
MIN_RECEIVE_BYTES = 64 << 20  # a large mesh's CDS/RDS runs to tens of MB
_TOP = {"address", "protocol", "node", "tls", "keepalive_seconds", "max_receive_bytes", "backoff"}
_TLS = {"ca_file", "server_name", "token_file"}
_BACKOFF = {"base_seconds", "max_seconds"}


@dataclass(frozen=True)
class AdsConfig:
    address: str  # as configured, for status and logs
    target: str  # host:port for gRPC
    node: NodeIdentity
    tls: TlsSettings | None = None  # None = plaintext (grpc://)
    protocol: str = "delta"
    keepalive_seconds: float = 30.0
    max_receive_bytes: int = 0  # 0 = unlimited
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> AdsConfig:
        """Validate the "xds" section; ValueError names the offending field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"xds: must be a mapping, got {type(data).__name__}")
        _no_unknown(data, _TOP, "xds")
        address = data.get("address")
        if not isinstance(address, str):
            raise ValueError("xds.address: required, e.g. grpcs://istiod.istio-system.svc:15012")
        scheme, target = _parse_address(address)

        protocol = data.get("protocol", "delta")
        if protocol not in PROTOCOLS:
            raise ValueError(f"xds.protocol: one of {sorted(PROTOCOLS)}, got {protocol!r}")

        node_conf = data.get("node", {})
        if not isinstance(node_conf, Mapping):
            raise ValueError("xds.node: must be a mapping")
        node = identity_from(node_conf, os.environ if env is None else env, "xds.node")

        tls_conf = data.get("tls")
        tls = None
        if scheme == "grpcs":
            tls_conf = {} if tls_conf is None else tls_conf
            if not isinstance(tls_conf, Mapping):
                raise ValueError("xds.tls: must be a mapping")
            _no_unknown(tls_conf, _TLS, "xds.tls")
            for key in _TLS:
                value = tls_conf.get(key)
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"xds.tls.{key}: must be a non-empty string")
            for key in ("ca_file", "token_file"):
                if tls_conf.get(key) and not os.path.isfile(tls_conf[key]):
                    raise ValueError(f"xds.tls.{key}: no such file {tls_conf[key]!r}")
            tls = TlsSettings(**{k: tls_conf.get(k) for k in _TLS})
        elif tls_conf is not None:
            # A bearer token must never travel in clear text.
            raise ValueError("xds.tls: only for grpcs:// addresses (this one is plaintext)")

        keepalive = _number(data, "keepalive_seconds", 30.0, "xds")
        if keepalive < KEEPALIVE_MIN_SECONDS:
            raise ValueError(
                f"xds.keepalive_seconds: at least {KEEPALIVE_MIN_SECONDS:g} "
                f"(istiod closes connections that ping more often), got {keepalive:g}"
            )
        max_receive = data.get("max_receive_bytes", 0)
        if (
            not isinstance(max_receive, int)
            or isinstance(max_receive, bool)
            or (max_receive != 0 and max_receive < MIN_RECEIVE_BYTES)
        ):
            raise ValueError(
                f"xds.max_receive_bytes: 0 (unlimited) or at least {MIN_RECEIVE_BYTES}, "
                f"got {max_receive!r}"
            )
        backoff = data.get("backoff", {})
        if not isinstance(backoff, Mapping):
            raise ValueError("xds.backoff: must be a mapping")
        _no_unknown(backoff, _BACKOFF, "xds.backoff")
        base = _number(backoff, "base_seconds", 0.5, "xds.backoff")
        maximum = _number(backoff, "max_seconds", 30.0, "xds.backoff")
        if base <= 0 or maximum < base:
            raise ValueError(
                f"xds.backoff: need 0 < base_seconds <= max_seconds, got {base:g} and {maximum:g}"
            )
        return cls(
            address=address,
            target=target,
            node=node,
            tls=tls,
            protocol=protocol,
            keepalive_seconds=keepalive,
            max_receive_bytes=max_receive,
            backoff_base_seconds=base,
            backoff_max_seconds=maximum,
        )


class AdsSource:
    """`Source` over ADS: a daemon thread holding one stream to istiod."""

    def __init__(
        self,
        config: AdsConfig,
        handler: ResourceHandler,
        *,
        rand: Callable[[], float] | None = None,  # the backoff jitter; tests pin it
    ) -> None:
        self.config = config
        self._client = XdsClient(
            target=config.target,
            label=config.address,
            handler=handler,
            node=config.node.to_proto(),
            protocol=config.protocol,
            tls=config.tls,
            keepalive_seconds=config.keepalive_seconds,
            max_receive_bytes=config.max_receive_bytes,
            backoff=Backoff(config.backoff_base_seconds, config.backoff_max_seconds, rand),
        )

    def start(self) -> None:
        log.info("xds source starting: %s as %s", self.config.address, self.config.node.id)
        self._client.start()

    def stop(self) -> None:
        self._client.stop()

    def status(self) -> dict[str, Any]:
        status = self._client.status()
        why = self._client.subs.incomplete_because()
        return {"kind": "ads", "connected": status["state"] == "connected", **status,
                "complete": not why, "incomplete_because": why}


def _parse_address(address: str) -> tuple[str, str]:
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"xds.address: {exc}: {address!r}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"xds.address: scheme must be grpc:// (plaintext) or grpcs:// (TLS), got {address!r}"
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"xds.address: expected {parts.scheme}://host[:port], got {address!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{port or SCHEMES[parts.scheme]}"


def _number(data: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{key}: must be a number, got {value!r}")
    return float(value)


def _no_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
