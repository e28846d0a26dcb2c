"""Full apply of a large mesh, amesh against Envoy, fed by the same Python ADS server.

The setting of anchors.md's Envoy figures: a state-of-the-world ADS server in Python
(tests/xds_server.py) serving the synthetic Istio-like mesh of bench/synthetic_mesh.py. Per
client and size: time from the first CDS request the server receives to the client's ACK of
the route configuration (for amesh also to the first batch committed into the dict), and
the RSS of the process that holds the config (Envoy; the nginx worker running amesh).

  /opt/amesh/venv/bin/python bench/bench_scale.py [--sizes 1000,10000]

Prints a table with ratios and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from benchlib import rss_mb, work_dir, write_results  # noqa: E402
from synthetic_mesh import (  # noqa: E402
    T,
    cluster,
    cluster_names,
    endpoints,
    listener,
    virtual_host,
)

from amesh_ext.resources import parse_json_resource  # noqa: E402
from nginx import Nginx  # noqa: E402
from peers.envoy import EnvoyPeer  # noqa: E402
from xds_server import CLUSTER, ENDPOINTS, LISTENER, ROUTES, XdsTestServer  # noqa: E402

NODE = {"pod_name": "amesh-0", "namespace": "ns", "ip": "127.0.0.1"}


def serve(n: int) -> XdsTestServer:
    names = cluster_names(n)

    def msgs(objs: list[dict]) -> list:
        return [parse_json_resource(o, "bench").message() for o in objs]

    srv = XdsTestServer().start()
    srv.set_resources(CLUSTER, msgs([cluster(name) for name, _ in names]))
    srv.set_resources(ENDPOINTS, msgs([endpoints(name, i) for name, i in names]))
    srv.set_resources(LISTENER, msgs([listener()]))
    srv.set_resources(ROUTES, msgs([{"@type": f"{T}.route.v3.RouteConfiguration", "name": "80",
                                     "ignore_port_in_host_matching": True,
                                     "virtual_hosts": [virtual_host(i) for i in range(n)]}]))
    return srv


def acked_routes_at(srv: XdsTestServer) -> float | None:
    """When the client ACKed the route configuration (a non-empty nonce, no error)."""
    acks = [r.at for r in srv.requests_of(ROUTES) if r.nonce and not r.is_nack]
    return min(acks) if acks else None


def run_envoy(n: int, work: Path) -> dict:
    srv = serve(n)
    try:
        peer = EnvoyPeer(work / f"envoy-{n}", f"127.0.0.1:{srv.port}", ads_type="GRPC",
                         log_level="error").start()
        try:
            done = peer.wait_for(lambda: acked_routes_at(srv), 300, "Envoy's RDS ACK")
            start = min(r.at for r in srv.requests_of(CLUSTER))
            return {"client": "envoy", "services": n, "apply_s": round(done - start, 3),
                    "rss_mb": rss_mb(peer.proc.pid)}
        finally:
            peer.stop()
    finally:
        srv.stop()


def run_amesh(n: int, work: Path) -> dict:
    srv = serve(n)
    try:
        user = "nobody nogroup" if os.geteuid() == 0 else None
        nginx = Nginx(work / f"nginx-{n}", user=user, dict_size="64m", config={
            "source": srv.address, "xds": {"protocol": "sotw", "node": NODE}})
        nginx.start()
        try:
            done = nginx.wait_for(lambda: acked_routes_at(srv), 300, "amesh's RDS ACK")
            status = nginx.wait_for(
                lambda: (s := nginx.status())["consumer"]["batches_applied"] >= 1 and s,
                120, "first batch committed")
            start = min(r.at for r in srv.requests_of(CLUSTER))
            # The consumer stamps its commit with the wall clock; the server, monotonic.
            committed = status["consumer"]["last_commit_at"] - time.time() + time.monotonic()
            return {"client": "amesh", "services": n, "apply_s": round(done - start, 3),
                    "dict_s": round(committed - start, 3),
                    "rss_mb": rss_mb(status["agent_process"])}
        finally:
            nginx.stop()
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = parser.parse_args()
    work = work_dir("amesh-scale-")
    rows = []
    print(f"{'services':>9} {'client':>7} {'RDS ACK s':>10} {'in dict s':>10} {'RSS MB':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        pair = [run_envoy(size, work), run_amesh(size, work)]
        for row in pair:
            print(f"{size:>9} {row['client']:>7} {row['apply_s']:>10} "
                  f"{row.get('dict_s', ''):>10} {row['rss_mb']:>8}")
        envoy, amesh = pair
        print(f"{'':>9} {'ratio':>7} {amesh['apply_s'] / envoy['apply_s']:>10.2f} "
              f"{'':>10} {amesh['rss_mb'] / envoy['rss_mb']:>8.2f}")
        rows += pair
    write_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
