"""Stock APISIX 3.18 vs amesh's incremental config provider and router, fed by amesh.

For each size and each provider (stock `config_xds` + `radixtree_host_uri`; amesh's
`config_xds` + `radixtree_host_uri_incremental`), in one run: a Python ADS server
(tests/xds_server.py, Delta) serves the synthetic mesh of bench/synthetic_mesh.py plus a
probe service whose endpoints and route weights the bench flips between two local
backends (answering "A" and "B"); real APISIX (2 workers) runs amesh's libxds.so as its
writer. Measured:

- full load: nginx start -> the probe service answers through APISIX;
- one endpoint change (EDS push of one cluster) -> every worker routes by it, p50 / p99;
- one route change (RDS push: the probe route's weights flip) -> every worker routes by it;
- freeze: the largest lag of a 5 ms timer in any worker during a change;
- CPU per change per worker: /proc CPU of the workers' event-loop threads over the change,
  less the idle timers' and the probe requests' own cost (calibrated before);
- dict bytes per service: capacity - free_space() of xds-config, over the services.

Needs APISIX_HOME (see bench/apisix_run.py). Writes bench/results/apisix_incremental.json
(stamped with the git SHA) and .png, and prints a table.

    APISIX_HOME=/root/.cache/amesh/apisix /opt/amesh/venv/bin/python \
        bench/bench_apisix_incremental.py --sizes 1000,3000,10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from apisix_run import ApisixRun, apisix_home, thread_cpu_s  # noqa: E402
from benchlib import work_dir, write_results  # noqa: E402
from synthetic_mesh import T, cluster, cluster_names, endpoints, listener, virtual_host  # noqa: E402

from amesh_ext.resources import (  # noqa: E402
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    parse_json_resource,
)
from xds_server import XdsTestServer  # noqa: E402

NODE = {"pod_name": "amesh-0", "namespace": "ns", "ip": "127.0.0.1"}
PROBE_HOST = "probe.ns.svc.cluster.local"
PROBE_A = "outbound|80||probe-a.ns.svc.cluster.local"
PROBE_B = "outbound|80||probe-b.ns.svc.cluster.local"


def msg(obj: dict[str, Any]) -> Any:
    return parse_json_resource(obj, "bench").message()


def probe_endpoints(name: str, port: int) -> dict[str, Any]:
    return {"@type": f"{T}.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]}


def route_config(n: int, weight_a: int) -> dict[str, Any]:
    probe = {"name": f"{PROBE_HOST}:80", "domains": [PROBE_HOST],
             "routes": [{"name": "probe", "match": {"prefix": "/"}, "route": {
                 "timeout": "0s", "weighted_clusters": {"clusters": [
                     {"name": PROBE_A, "weight": weight_a},
                     {"name": PROBE_B, "weight": 100 - weight_a}]}}}]}
    return {"@type": f"{T}.route.v3.RouteConfiguration", "name": "80",
            "ignore_port_in_host_matching": True,
            "virtual_hosts": [virtual_host(i) for i in range(n)] + [probe]}


class Mesh:
    """The ADS server and the probe's state."""

    def __init__(self, n: int) -> None:
        self.n = n
        names = cluster_names(n)
        self.srv = XdsTestServer().start()
        self.srv.set_resources(CLUSTER, [msg(cluster(x)) for x, _ in names]
                               + [msg(cluster(PROBE_A)), msg(cluster(PROBE_B))])
        self.eps = [msg(endpoints(x, i)) for x, i in names]
        self.srv.set_resources(LISTENER, [msg(listener())])
        self.weight_a = 100
        # both route configurations built before anything is timed
        self.routes = {w: msg(route_config(n, w)) for w in (100, 0)}
        self.probe_eps = {}
        self.srv.set_resources(ROUTES, [self.routes[self.weight_a]])

    def set_backends(self, a: int, b: int) -> None:
        self.ports = {"A": a, "B": b}
        self.probe_a_on = "A"
        self.probe_eps = {k: msg(probe_endpoints(PROBE_A, p)) for k, p in self.ports.items()}
        self.srv.set_resources(ENDPOINTS, [*self.eps, msg(probe_endpoints(PROBE_A, a)),
                                           msg(probe_endpoints(PROBE_B, b))])

    def flip_endpoint(self) -> str:
        """probe-a's endpoint moves to the other backend; returns the body now expected."""
        self.probe_a_on = "B" if self.probe_a_on == "A" else "A"
        self.srv.update(ENDPOINTS, self.probe_eps[self.probe_a_on])
        self.srv.push(ENDPOINTS, names=[PROBE_A])
        return self.expected()

    def flip_route(self) -> str:
        self.weight_a = 0 if self.weight_a == 100 else 100
        self.srv.update(ROUTES, self.routes[self.weight_a])
        self.srv.push(ROUTES)
        return self.expected()

    def expected(self) -> str:
        # weight_a 100: probe-a's backend; 0: probe-b's ("B")
        return self.probe_a_on if self.weight_a == 100 else "B"

    def stop(self) -> None:
        self.srv.stop()


def wait_all_workers(run: ApisixRun, pids: list[int], body: str, timeout: float,
                     since: float, pause: float = 0.001) -> tuple[dict[int, float], dict[int, int]]:
    """Probe until every worker answered `body`; when each first did (s after `since`, a
    wall-clock time), and the requests each got."""
    seen: dict[int, float] = {}
    count = {p: 0 for p in pids}
    deadline = since + timeout
    while len(seen) < len(pids):
        if time.time() > deadline:
            raise RuntimeError(f"workers {sorted(set(pids) - set(seen))} never answered "
                               f"{body!r} within {timeout} s")
        try:
            status, got, pid = run.get(PROBE_HOST)
        except OSError:
            time.sleep(0.01)
            continue
        now = time.time()
        count[pid] = count.get(pid, 0) + 1
        if status == 200 and got == body and pid not in seen:
            seen[pid] = now - since
        time.sleep(pause)
    return seen, count


def cpu(pids: list[int]) -> dict[int, float]:
    return {p: thread_cpu_s(p) for p in pids}


def calibrate(run: ApisixRun, pids: list[int], body: str) -> tuple[float, float]:
    """(CPU s per probe request, idle CPU s per second) of a worker's event loop, and the
    largest timer lag while only the probe runs (the freeze measurement's noise floor)."""
    c0, t0 = cpu(pids), time.monotonic()
    time.sleep(1.0)
    idle = sum(cpu(pids)[p] - c0[p] for p in pids) / len(pids) / (time.monotonic() - t0)
    run.ctl("/lag?reset=1")
    c0, t0 = cpu(pids), time.monotonic()
    n = 300
    for _ in range(n):
        run.get(PROBE_HOST)
    spent = sum(cpu(pids)[p] - c0[p] for p in pids) - idle * len(pids) * (time.monotonic() - t0)
    lags = [v for k, v in run.ctl("/lag").items() if ":" not in k]
    return max(spent / n, 0.0), idle, max(lags) if lags else 0.0


def one_change(run: ApisixRun, pids: list[int], flip: Any, timeout: float,
               calib: tuple[float, float, float], settle: float,
               agent: int) -> dict[str, Any]:
    per_req, idle, _ = calib
    run.ctl("/lag?reset=1")
    time.sleep(0.02)        # every worker's 5 ms timer took the reset
    c0 = cpu(pids)
    pc0 = run.ctl("/lag")
    t0 = time.time()
    body = flip()
    seen, count = wait_all_workers(run, pids, body, timeout, t0)
    time.sleep(settle)      # work a provider does after routing flipped (stock: other objects)
    window = time.time() - t0
    c1 = cpu(pids)
    lag = run.ctl("/lag")
    bumps = [v for k, v in lag.items() if k.startswith("bump:") and v >= t0]
    lags = [v for k, v in lag.items() if ":" not in k]
    plain = [v for k, v in lag.items() if ":" not in k and int(k) != agent]
    # amesh's provider + router: their own CPU and longest slice, on the event-loop clock
    own = [v - pc0.get(k, 0) for k, v in lag.items() if k.startswith("pcpu:")]
    slices = [v for k, v in lag.items() if k.startswith("pslice:")]
    cpu_s = [max(c1[p] - c0[p] - count.get(p, 0) * per_req - idle * window, 0.0) for p in pids]
    done = max(seen.values())
    return {"latency_s": done, "freeze_s": max(lags) if lags else None, "cpu_s": max(cpu_s),
            "plain_freeze_s": max(plain) if plain else None,
            "own_cpu_s": max(own) if own else None, "own_slice_s": max(slices) if slices else None,
            # from the writer's version bump (as the workers' 5 ms timers saw it) to routing
            "from_bump_s": done - (min(bumps) - t0) if bumps else None}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_one(n: int, provider: str, work: Path, changes: int, dict_size: str) -> dict[str, Any]:
    mesh = Mesh(n)
    run = None
    try:
        run = ApisixRun(work / f"{provider}-{n}", provider, {
            "source": mesh.srv.address,
            "xds": {"protocol": "delta", "node": NODE},
            "translate": {"port_match_var": None}}, dict_size=dict_size)
        mesh.set_backends(run.backend_a, run.backend_b)
        run.start()
        started = time.time()
        pids = run.worker_pids()
        while len(pids) < run.workers:      # the master forks once APISIX's init ran
            if time.time() - started > 60:
                raise RuntimeError(f"nginx started {len(pids)} workers of {run.workers}")
            time.sleep(0.02)
            pids = run.worker_pids()
        seen, _ = wait_all_workers(run, pids, "A", 120, started, pause=0.005)
        row: dict[str, Any] = {"services": n, "provider": provider,
                               "full_load_s": round(min(seen.values()), 3),
                               "full_load_all_workers_s": round(max(seen.values()), 3)}
        # from the writer's last version bump (the first whole config) to serving
        bumps = [v for k, v in run.ctl("/lag").items() if k.startswith("bump:")]
        if bumps:
            row["full_load_from_bump_s"] = round(min(seen.values()) - (min(bumps) - started), 3)
        # Debian's nginx has no privileged agent: the kit runs amesh's agent in worker 0,
        # whose event loop then shares its process with the agent's threads
        agent = max(pids, key=lambda p: len(os.listdir(f"/proc/{p}/task")))
        d = run.ctl("/dict")
        row["dict_bytes_per_service"] = round((d["capacity"] - d["free"]) / n)
        row["dict_keys"] = d["keys"]
        time.sleep(1.5 if provider == "stock" else 0.3)    # let the load settle
        calib = calibrate(run, pids, "A")
        row["probe_cpu_ms"] = round(calib[0] * 1000, 3)
        row["idle_freeze_max_ms"] = round(calib[2] * 1000, 1)
        timeout = 120.0
        settle = 0.5 if provider == "stock" else 0.05
        kinds = {"endpoint": mesh.flip_endpoint, "route": mesh.flip_route}
        for kind, flip in kinds.items():
            if kind == "route" and mesh.probe_a_on != "A":
                # the weights flip between probe-a and probe-b: probe-a must answer "A"
                wait_all_workers(run, pids, mesh.flip_endpoint(), timeout, time.time())
                time.sleep(settle)
            results = [one_change(run, pids, flip, timeout, calib, settle, agent)
                       for _ in range(changes)]
            lat = [r["latency_s"] for r in results]
            row[f"{kind}_p50_ms"] = round(statistics.median(lat) * 1000, 1)
            row[f"{kind}_p99_ms"] = round(pct(lat, 0.99) * 1000, 1)
            fb = [r["from_bump_s"] for r in results if r["from_bump_s"] is not None]
            if fb:
                row[f"{kind}_from_bump_p50_ms"] = round(statistics.median(fb) * 1000, 1)
                row[f"{kind}_from_bump_p99_ms"] = round(pct(fb, 0.99) * 1000, 1)
            row[f"{kind}_freeze_max_ms"] = round(max(r["freeze_s"] or 0 for r in results) * 1000,
                                                 1)
            row[f"{kind}_freeze_plain_max_ms"] = round(
                max(r["plain_freeze_s"] or 0 for r in results) * 1000, 1)
            row[f"{kind}_cpu_ms"] = round(statistics.median(r["cpu_s"] for r in results) * 1000,
                                          2)
            own = [r["own_cpu_s"] for r in results if r["own_cpu_s"] is not None]
            if own:
                row[f"{kind}_own_cpu_ms"] = round(statistics.median(own) * 1000, 3)
                row[f"{kind}_own_slice_max_ms"] = round(
                    max(r["own_slice_s"] or 0 for r in results) * 1000, 3)
        refused = run.ctl("/refused")
        row["refused_reports"] = len(refused)
        if provider == "amesh":
            row["provider_stats"] = run.ctl("/provider_stats")
            row["router_stats"] = run.ctl("/router_stats")
        return row
    finally:
        if run is not None:
            run.stop()
        mesh.stop()


def git_sha() -> str:
    out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "lua",
                            "bench"], capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


COLUMNS = [
    ("services", "services"), ("provider", "provider"), ("full_load_s", "start→serving s"),
    ("full_load_from_bump_s", "whole config in dict→serving s"),
    ("endpoint_p50_ms", "endpoint p50 ms"), ("endpoint_p99_ms", "endpoint p99 ms"),
    ("endpoint_from_bump_p99_ms", "endpoint from bump p99 ms"),
    ("endpoint_freeze_max_ms", "endpoint freeze ms"),
    ("endpoint_freeze_plain_max_ms", "endpoint freeze (worker without agent) ms"),
    ("endpoint_cpu_ms", "endpoint CPU ms"),
    ("endpoint_own_cpu_ms", "endpoint provider CPU ms"),
    ("endpoint_own_slice_max_ms", "endpoint longest slice ms"),
    ("route_p50_ms", "route p50 ms"), ("route_p99_ms", "route p99 ms"),
    ("route_from_bump_p99_ms", "route from bump p99 ms"),
    ("route_freeze_max_ms", "route freeze ms"),
    ("route_freeze_plain_max_ms", "route freeze (worker without agent) ms"),
    ("route_cpu_ms", "route CPU ms"),
    ("route_own_cpu_ms", "route provider+router CPU ms"),
    ("route_own_slice_max_ms", "route longest slice ms"),
    ("idle_freeze_max_ms", "idle lag ms"), ("dict_bytes_per_service", "dict B/service"),
]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def chart(rows: list[dict[str, Any]], path: Path, sha: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (key, title, extra series: (key, label) drawn dashed for amesh)
    panels = [("endpoint_p99_ms", "endpoint change → all workers, p99 (ms)",
               ("endpoint_from_bump_p99_ms", "amesh, from the dict's version bump")),
              ("endpoint_freeze_plain_max_ms", "freeze during an endpoint change, max (ms)",
               ("endpoint_own_slice_max_ms", "amesh, longest provider/router slice")),
              ("endpoint_cpu_ms", "CPU per endpoint change per worker (ms)",
               ("endpoint_own_cpu_ms", "amesh, provider+router (thread clock)")),
              ("route_p99_ms", "route change → all workers, p99 (ms)",
               ("route_from_bump_p99_ms", "amesh, from the dict's version bump")),
              ("full_load_s", "nginx start → serving (s)", None),
              ("dict_bytes_per_service", "dict bytes per service", None)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title, extra) in zip(axes.flat, panels, strict=True):
        series = [("stock", key, "o-", "stock"), ("amesh", key, "s-", "amesh")]
        if extra:
            series.append(("amesh", extra[0], "s--", extra[1]))
        for provider, k, style, label in series:
            pts = [(r["services"], r[k]) for r in rows if r["provider"] == provider
                   and r.get(k)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        if key not in ("dict_bytes_per_service",):
            ax.set_yscale("log")
        ax.set_xlabel("services")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"APISIX 3.18, 2 workers: stock config_xds vs amesh's incremental provider "
                 f"({sha})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--providers", default="stock,amesh")
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--stock-changes", type=int, default=5,
                        help="changes per kind for stock APISIX (seconds each at 10k)")
    parser.add_argument("--dict-size", default="64m")
    parser.add_argument("--out", default=str(HERE / "results" / "apisix_incremental.json"))
    parser.add_argument("--chart-only", action="store_true",
                        help="redraw the table and chart of --out, measure nothing")
    args = parser.parse_args()
    if args.chart_only:
        doc = json.loads(Path(args.out).read_text())
        print(table(doc["rows"]))
        chart(doc["rows"], Path(args.out).with_suffix(".png"), doc.get("git_sha", ""))
        return 0
    apisix_home()
    sha = git_sha()
    work = work_dir("amesh-apisix-inc-")
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        for provider in args.providers.split(","):
            changes = args.stock_changes if provider == "stock" else args.changes
            row = run_one(n, provider, work, changes, args.dict_size)
            print(row, flush=True)
            rows.append(row)
            write_results(out, rows, git_sha=sha, workers=2, dict_size=args.dict_size,
                          apisix_home=str(apisix_home()), partial=True)
    print(table(rows))
    write_results(out, rows, git_sha=sha, workers=2, dict_size=args.dict_size,
                  apisix_home=str(apisix_home()))
    try:
        chart(rows, out.with_suffix(".png"), sha)
    except ImportError:
        print("matplotlib is missing: /opt/amesh/venv/bin/pip install matplotlib (no chart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
