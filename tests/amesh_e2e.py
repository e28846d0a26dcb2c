"""amesh under the real istiod: its start config as an Istio sidecar, the dict read back by
Envoy names (cluster -> upstream nodes, virtual host -> routes, weighted split), syncz checks
and edits of the bookinfo corpus. Shared by tests/test_e2e_istiod.py and bench/.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from amesh_ext.translate import upstream_id
from peers.istiod import BOOKINFO_DIR, ISTIO_VERSION, Istiod, wait_for

NAMESPACE = "default"
PORT = 9080
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.default.svc.cluster.local"
# nginx workers drop to nobody when the tests run as root (the agent runs in worker 0).
NGINX_USER = "nobody nogroup" if os.geteuid() == 0 else None
# istiod's TLS port presents a certificate for this name (issued by its own CA).
ISTIOD_SAN = "istiod.istio-system.svc"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def outbound(host: str, subset: str = "", port: int = PORT) -> str:
    """istiod's outbound cluster name."""
    return f"outbound|{port}|{subset}|{host}"


def start_config(
    address: str,
    protocol: str,
    pod: str = "amesh-0",
    ip: str = "127.0.0.5",
    **xds: Any,
) -> dict[str, Any]:
    """amesh's start config for a sidecar ``pod.default`` (INTERCEPTION_MODE NONE, as the
    Envoy peer) at ``address`` (``grpc://`` or ``grpcs://host:port``)."""
    node = {
        "pod_name": pod,
        "namespace": NAMESPACE,
        "ip": ip,
        "istio_version": ISTIO_VERSION,
        "interception_mode": "NONE",
    }
    # Short backoff: istiod restarts in well under a second here.
    backoff = {"base_seconds": 0.1, "max_seconds": 1.0}
    return {
        "source": address,
        "xds": {"protocol": protocol, "node": node, "backoff": backoff, **xds},
    }


# --------------------------------------------------------------------------- the dict


class DictView:
    """The APISIX objects of one dict snapshot, looked up by Envoy names."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.upstreams = {
            o["name"]: o for k, o in objects.items() if k.startswith("/upstreams/")
        }
        self._upstream_names = {o["id"]: name for name, o in self.upstreams.items()}
        self.routes = [o for k, o in objects.items() if k.startswith("/routes/")]

    def hosts(self, cluster: str) -> list[str] | None:
        """Sorted node addresses of the cluster's upstream; None when it is absent."""
        up = self.upstreams.get(cluster)
        return None if up is None else sorted(n["host"] for n in up["nodes"])

    def vhost(self, host: str) -> dict[str, dict]:
        """Routes serving ``host``, by the last part of their name (the Istio route name,
        ``default`` or ``404``)."""
        return {
            r["name"].rsplit("/", 1)[1]: r for r in self.routes if host in r.get("hosts", ())
        }

    def target(self, route: dict) -> str | None:
        """The cluster a route sends to (its plain upstream)."""
        return self._upstream_names.get(route.get("upstream_id"))

    def split(self, route: dict) -> dict[str, int]:
        """Cluster -> weight of a route's traffic-split ({} when it has none)."""
        rules = route.get("plugins", {}).get("traffic-split", {}).get("rules", [])
        return {
            self._upstream_names.get(w.get("upstream_id"), "?"): w["weight"]
            for rule in rules
            for w in rule.get("weighted_upstreams", [])
        }

    def duplicate_names(self) -> list[str]:
        """Envoy names with more than one APISIX object of a kind (none expected)."""
        seen: dict[str, int] = {}
        for key, obj in self.objects.items():
            kind = key.split("/")[1]
            seen[f"{kind}:{obj.get('name')}"] = seen.get(f"{kind}:{obj.get('name')}", 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)


def view(nginx: Any) -> DictView:
    return DictView(nginx.objects())


def wait_view(nginx: Any, predicate: Any, what: str, timeout: float = 20.0) -> DictView:
    """Until ``predicate(DictView)`` holds for the dict of ``nginx`` (tests.nginx.Nginx)."""

    def check() -> DictView | None:
        v = view(nginx)
        return v if predicate(v) else None

    return nginx.wait_for(check, timeout, what)


def upstream_key(cluster: str) -> str:
    return "/upstreams/" + upstream_id(cluster)


# --------------------------------------------------------------------------- istiod


def sync_types(entry: dict | None) -> dict[str, dict]:
    """syncz per-type records (sent/acked nonce, lastError) of one proxy."""
    return (entry or {}).get("resources") or {}


def acked_all(entry: dict | None, types: int = 4) -> bool:
    """Every type (CDS, EDS, LDS, RDS) sent, ACKed at the nonce sent (istioctl's SYNCED, not
    STALE) and without an error."""
    records = sync_types(entry)
    return len(records) >= types and all(
        r.get("sent") and r.get("sent") == r.get("acked") and not r.get("lastError")
        for r in records.values()
    )


def wait_acked(istiod: Istiod, proxy: str, timeout: float = 20.0) -> dict:
    return wait_for(
        lambda: (e := istiod.sync_status(proxy)) and acked_all(e) and e,
        timeout,
        f"istiod syncz: {proxy} ACKed every type",
    )


# --------------------------------------------------------------------------- corpus edits


def corpus(name: str) -> list[dict]:
    """The documents of a bookinfo corpus file (fresh copies, to edit)."""
    return [d for d in yaml.safe_load_all((BOOKINFO_DIR / name).read_text()) if d]


def named(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def reviews_weights(v1: int, v2: int) -> list[dict]:
    """virtual-services.yaml with the reviews split set to v1/v2."""
    docs = corpus("virtual-services.yaml")
    weighted = named(docs, "VirtualService", "reviews")["spec"]["http"][1]
    weighted["route"][0]["weight"], weighted["route"][1]["weight"] = v1, v2
    return docs


def workloads(moves: dict[str, str]) -> list[dict]:
    """workloads.yaml with WorkloadEntry name -> new address."""
    docs = corpus("workloads.yaml")
    for name, address in moves.items():
        named(docs, "WorkloadEntry", name)["spec"]["address"] = address
    return docs


def new_service(name: str, vip: str, address: str) -> list[dict]:
    """A ServiceEntry (STATIC, VIP) and one WorkloadEntry for it, shaped like the corpus'."""
    docs = corpus("services.yaml")
    se = copy.deepcopy(named(docs, "ServiceEntry", "details"))
    se["metadata"]["name"] = name
    se["spec"].update(
        hosts=[f"{name}.{NAMESPACE}.svc.cluster.local"],
        addresses=[vip],
        workloadSelector={"labels": {"app": name}},
    )
    we = copy.deepcopy(named(corpus("workloads.yaml"), "WorkloadEntry", "details-v1"))
    we["metadata"]["name"] = f"{name}-v1"
    we["spec"].update(address=address, labels={"app": name, "version": "v1"})
    we["spec"]["serviceAccount"] = f"bookinfo-{name}"
    return [se, we]


def write_token(path: Path, value: str) -> Path:
    """A service-account token file as kubelet writes it (atomic replace, world-readable so
    nginx's nobody worker can read it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)
    return path
