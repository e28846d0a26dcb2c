"""The agent alone (no nginx): what an ADS source hands it is protobuf, so this measures
translation and diffing without the file source's JSON parsing.

- full apply: all CDS, EDS, LDS, RDS of N services applied and the first batch queued;
- one endpoint set changed: apply() of one ClusterLoadAssignment to the batch queued
  (p50/p99 over 200 changes), the figure to hold flat as the mesh grows;
- one service added: the CDS re-push (all clusters and one more), its endpoints and the
  RDS re-push (all virtual hosts and one more), as istiod sends them (20 additions).

  /opt/amesh/venv/bin/python bench/bench_agent.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import rss_mb, write_results  # noqa: E402
from synthetic_mesh import (  # noqa: E402
    cluster,
    cluster_name,
    cluster_names,
    endpoints,
    listener,
    virtual_host,
)

from amesh_ext.agent import Agent  # noqa: E402
from amesh_ext.config import parse_start_config  # noqa: E402
from amesh_ext.native import MemoryQueue  # noqa: E402
from amesh_ext.resources import (  # noqa: E402
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    Resource,
    parse_json_resource,
)


class CountingQueue(MemoryQueue):
    """Accepts batches without keeping them (the C queue copies and frees them)."""

    def push_batch(self, batch, flags, changes) -> int:
        self.pushed = len(changes)
        return 0


def as_wire(obj: dict) -> Resource:
    """A Resource as an ADS source delivers it: bytes only, nothing decoded."""
    res = parse_json_resource(obj, "bench")
    return Resource(res.type_url, res.name, res.raw)


def run(n: int) -> dict:
    names = cluster_names(n)
    wire = {
        CLUSTER: [as_wire(cluster(name)) for name, _ in names],
        ENDPOINTS: [as_wire(endpoints(name, i)) for name, i in names],
        LISTENER: [as_wire(listener())],
        ROUTES: [as_wire({"@type": "type.googleapis.com/envoy.config.route.v3."
                                   "RouteConfiguration", "name": "80",
                          "ignore_port_in_host_matching": True,
                          "virtual_hosts": [virtual_host(i) for i in range(n)]})],
    }
    gc.collect()
    agent = Agent(parse_start_config('{"source": "file:///dev/null"}'), CountingQueue())
    t0 = time.perf_counter()
    for type_url, resources in wire.items():
        agent.apply(type_url, resources, [])
    agent._first_sync.done = True  # the first-sync quiet period is a policy, not work
    agent.tick()
    full_s = time.perf_counter() - t0
    changes = [as_wire(endpoints(names[g * 37 % len(names)][0], g, generation=g + 1))
               for g in range(200)]
    times = []
    for res in changes:
        t = time.perf_counter()
        agent.apply(ENDPOINTS, [res], [])
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    # One service added, as istiod pushes it: the whole CDS again (one cluster more), its
    # endpoints, and the whole route configuration again (one virtual host more).
    adds = []
    clusters, vhosts = list(wire[CLUSTER]), [virtual_host(i) for i in range(n)]
    for k in range(20):
        i = n + k
        clusters.append(as_wire(cluster(cluster_name(i))))
        vhosts.append(virtual_host(i))
        cds, eds = list(clusters), as_wire(endpoints(cluster_name(i), i))
        rds = as_wire({"@type": "type.googleapis.com/envoy.config.route.v3."
                                "RouteConfiguration", "name": "80",
                       "ignore_port_in_host_matching": True, "virtual_hosts": vhosts})
        t = time.perf_counter()
        agent.apply(CLUSTER, cds, [])
        agent.apply(ENDPOINTS, [eds], [])
        agent.apply(ROUTES, [rds], [])
        adds.append((time.perf_counter() - t) * 1e3)
    adds.sort()
    return {"services": n, "objects": agent.status()["objects"], "full_apply_s": round(full_s, 3),
            "eds_change_p50_ms": round(times[100], 3), "eds_change_p99_ms": round(times[197], 3),
            "service_add_p50_ms": round(adds[10], 1), "service_add_max_ms": round(adds[-1], 1),
            "rss_mb": rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--out", default=str(HERE / "results" / "agent.json"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        # One process per size: RSS and allocator state are per mesh, not cumulative.
        import subprocess

        out = subprocess.run([sys.executable, __file__, "--one", size], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    cols = list(rows[0])
    print("  ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>18}" for c in cols))
    write_results(args.out, rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run(int(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
