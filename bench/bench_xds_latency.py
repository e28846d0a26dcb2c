"""Config latency under the real istiod: amesh (its dict in a real nginx) against upstream
Envoy, both subscribed to the same istiod in the same run, for 100 one-endpoint changes and
100 new services.

  /opt/amesh/venv/bin/python bench/bench_xds_latency.py [--changes 100] [--protocols delta,sotw]

Per change, three instants on the same wall clock:
- rename: the Istio YAML file renamed into istiod's config dir (the change is made);
- push: istiod's own record of its first send of that change to the proxy (syncz `sentTime`,
  taken just after gRPC accepted the message);
- visible: amesh's dict holds the new objects (read in nginx), or Envoy's admin shows them
  (`/clusters` hosts and, for a new service, the virtual host in `/config_dump`).
"rename -> visible" includes istiod's file debounce (250 ms) and push debounce
(PILOT_DEBOUNCE_AFTER, 100 ms); "push -> visible" is the client's own share. Both are polled
every 2 ms, so each figure carries up to ~2 ms of polling delay, the same for both clients.
Prints a table and writes bench/results/xds_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from benchlib import work_dir  # noqa: E402

from amesh_e2e import (  # noqa: E402
    NGINX_USER,
    REVIEWS,
    acked_all,
    new_service,
    outbound,
    start_config,
    upstream_key,
    wait_acked,
    workloads,
)
from nginx import AMESH_INIT_WORKER, Nginx, lua_long_string  # noqa: E402
from peers.envoy import EnvoyPeer  # noqa: E402
from peers.istiod import (  # noqa: E402
    BOOKINFO_DIR,
    DEFAULT_ENV,
    Istiod,
    copy_corpus,
    ensure_istiod_binary,
    wait_for,
)

POLL_S = 0.002
TIMEOUT_S = 20.0
ENVOY_ADS = {"sotw": "GRPC", "delta": "DELTA_GRPC"}

# Reads in nginx: `key` must hold `needle`; any key under `prefix` must hold `needle2`.
# One cheap request per poll (a full dict dump per poll would load the agent's worker).
FIND = """
        location = /bench/find {
            content_by_lua_block {
                local dict = ngx.shared["xds-config"]
                local a = ngx.req.get_uri_args()
                local ok = true
                if a.key then
                    local v = dict:get(a.key)
                    ok = v ~= nil and v:find(a.needle, 1, true) ~= nil
                end
                if ok and a.prefix then
                    ok = false
                    for _, k in ipairs(dict:get_keys(0)) do
                        if k:sub(1, #a.prefix) == a.prefix then
                            local v = dict:get(k)
                            if v and v:find(a.needle2, 1, true) then ok = true break end
                        end
                    end
                end
                ngx.print(ok and "1" or "0")
            }
        }
"""


def sent_times(istiod: Istiod, proxy: str) -> dict[str, float]:
    """type URL -> istiod's last send time to ``proxy`` (epoch seconds)."""
    entry = istiod.sync_status(proxy) or {}
    return {
        t: _rfc3339(r["sentTime"])
        for t, r in (entry.get("resources") or {}).items()
        if r.get("sentTime")
    }


def _rfc3339(text: str) -> float:
    """Go's RFC3339Nano (``2026-11-26T15:11:36.747850014Z``) to epoch seconds."""
    whole, _, frac = text.rstrip("Z").partition(".")
    base = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def poll(check: Callable[[], bool], what: str) -> float:
    """Wall-clock time at which ``check`` first held."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not visible after {TIMEOUT_S:.0f}s")
        time.sleep(POLL_S)


class Clients:
    """amesh (nginx) and Envoy on one istiod; ``change()`` times one config change."""

    def __init__(self, istiod: Istiod, nginx: Nginx, envoy: EnvoyPeer, amesh_proxy: str) -> None:
        self.istiod, self.nginx, self.envoy = istiod, nginx, envoy
        self.proxies = {"amesh": amesh_proxy, "envoy": envoy.proxy_id}
        self.pool = ThreadPoolExecutor(2)

    def amesh_has(self, **query: str) -> bool:
        return self.nginx.get("/bench/find?" + urllib.parse.urlencode(query)) == "1"

    def envoy_has(self, cluster_host: str, vhost: str | None = None) -> bool:
        if cluster_host not in self.envoy.admin_get("/clusters").decode():
            return False
        if vhost is None:
            return True
        routes = self.envoy.admin_get("/config_dump?resource=dynamic_route_configs")
        return f'"{vhost}"'.encode() in routes

    def change(
        self, apply: Callable[[], None], amesh: Callable[[], bool], envoy: Callable[[], bool]
    ) -> dict[str, float]:
        before = {c: sent_times(self.istiod, p) for c, p in self.proxies.items()}
        apply()
        renamed = time.time()
        seen = {
            "amesh": self.pool.submit(poll, amesh, "amesh"),
            "envoy": self.pool.submit(poll, envoy, "envoy"),
        }
        visible = {c: f.result() for c, f in seen.items()}
        row = {"istiod_ms": None}
        pushes = []
        for client, proxy in self.proxies.items():
            # Settled (every type ACKed) before the next change, and istiod's send times read.
            entry = wait_for(
                lambda p=proxy: (e := self.istiod.sync_status(p)) and acked_all(e) and e,
                TIMEOUT_S,
                f"{client} ACKs",
            )
            after = sent_times(self.istiod, proxy)
            changed = [t for t, s in after.items() if s != before[client].get(t)]
            if not changed or not entry:
                raise RuntimeError(f"istiod recorded no push to {client}")
            push = min(after[t] for t in changed)
            pushes.append(push)
            row[f"{client}_total_ms"] = (visible[client] - renamed) * 1000
            row[f"{client}_push_ms"] = (visible[client] - push) * 1000
        row["istiod_ms"] = (min(pushes) - renamed) * 1000
        return row


def endpoint_moves(c: Clients, n: int) -> list[dict[str, float]]:
    """reviews-v3's WorkloadEntry moves: istiod pushes EDS for the reviews clusters only."""
    cluster = outbound(REVIEWS, "v3")
    rows = []
    for i in range(n):
        address = f"127.0.1.{i % 200 + 1}"
        rows.append(
            c.change(
                lambda a=address: c.istiod.write_config(
                    "workloads.yaml", workloads({"reviews-v3": a})
                ),
                lambda a=address: c.amesh_has(key=upstream_key(cluster), needle=f'"host":"{a}"'),
                lambda a=address: c.envoy_has(f"{cluster}::{a}:9080::"),
            )
        )
    return rows


def new_services(c: Clients, n: int) -> list[dict[str, float]]:
    """A ServiceEntry + WorkloadEntry file per service: CDS, EDS, LDS/RDS pushes."""
    rows = []
    for i in range(n):
        name, address = f"svc-{i}", f"127.0.2.{i % 200 + 1}"
        host = f"{name}.default.svc.cluster.local"
        cluster = outbound(host)
        vip = f"240.240.{1 + i // 200}.{i % 200 + 1}"
        rows.append(
            c.change(
                lambda name=name, vip=vip, address=address: c.istiod.write_config(
                    f"{name}.yaml", new_service(name, vip, address)
                ),
                lambda cluster=cluster, address=address, host=host: c.amesh_has(
                    key=upstream_key(cluster),
                    needle=f'"host":"{address}"',
                    prefix="/routes/",
                    needle2=f'"{host}"',
                ),
                lambda cluster=cluster, address=address, host=host: c.envoy_has(
                    f"{cluster}::{address}:9080::", f"{host}"
                ),
            )
        )
    return rows


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = {
            "p50": round(percentile(values, 50), 1),
            "p99": round(percentile(values, 99), 1),
            "max": round(max(values), 1),
        }
    return out


def table(results: dict[str, dict]) -> str:
    lines = [
        f"{'change':<14} {'interval':<22} {'amesh p50':>10} {'p99':>8} {'envoy p50':>10} "
        f"{'p99':>8} {'ratio p50':>10} {'p99':>6}"
    ]
    for scenario, s in results.items():
        for i, (label, part) in enumerate(
            (("rename -> visible", "total_ms"), ("istiod push -> visible", "push_ms"))
        ):
            a, e = s[f"amesh_{part}"], s[f"envoy_{part}"]
            head = scenario if i == 0 else ""
            lines.append(
                f"{head:<14} {label:<22} {a['p50']:>8.1f}ms {a['p99']:>6.1f}ms "
                f"{e['p50']:>8.1f}ms {e['p99']:>6.1f}ms {_ratio(a['p50'], e['p50']):>10} "
                f"{_ratio(a['p99'], e['p99']):>6}"
            )
        ist = s["istiod_ms"]
        lines.append(
            f"{'':<14} {'istiod: rename -> push':<22} {ist['p50']:>8.1f}ms {ist['p99']:>6.1f}ms"
        )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def run(protocol: str, changes: int, work: Path) -> dict[str, list[dict[str, float]]]:
    """One istiod, amesh and Envoy (both on ``protocol``); both scenarios."""
    istiod = Istiod(work / "istiod", binary=ensure_istiod_binary())
    nginx = envoy = None
    try:
        istiod.start(copy_corpus(BOOKINFO_DIR, work / "config"))
        config = start_config(f"grpc://{istiod.xds_address}", protocol, pod="amesh-bench")
        # amesh's own drain interval (5 ms), not the tests' faster one.
        init_worker = AMESH_INIT_WORKER.replace("interval = 0.002,", "").format(
            config=lua_long_string(json.dumps(config))
        )
        nginx = Nginx(
            work / "nginx", user=NGINX_USER, init_worker=init_worker, extra_locations=FIND
        ).start()
        envoy = EnvoyPeer(
            work / "envoy", istiod.xds_address, ads_type=ENVOY_ADS[protocol],
            pod="envoy-bench", node_ip="127.0.0.6", log_level="warning",
        ).start()
        for proxy in ("amesh-bench.default", envoy.proxy_id):
            wait_acked(istiod, proxy, timeout=60)
        clients = Clients(istiod, nginx, envoy, "amesh-bench.default")
        try:
            return {
                "endpoint move": endpoint_moves(clients, changes),
                "new service": new_services(clients, changes),
            }
        finally:
            clients.pool.shutdown()
    finally:
        for peer in (envoy, nginx, istiod):
            if peer is not None:
                peer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100, help="changes per scenario")
    parser.add_argument("--protocols", default="delta,sotw", help="ADS flavours, both clients")
    parser.add_argument("--out", default=str(HERE / "results" / "xds_latency.json"))
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    if not set(protocols) <= set(ENVOY_ADS):
        parser.error(f"--protocols: from {sorted(ENVOY_ADS)}")

    work = work_dir("amesh-bench-xds-")
    results, samples = {}, {}
    try:
        for protocol in protocols:
            started = time.monotonic()
            samples[protocol] = run(protocol, args.changes, work / protocol)
            results[protocol] = {n: summarize(rows) for n, rows in samples[protocol].items()}
            print(f"\n{protocol} ADS (amesh and Envoy), {args.changes} changes per row, "
                  f"{time.monotonic() - started:.0f}s")
            print(table(results[protocol]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "machine": os.uname().nodename,
        "cpus": os.cpu_count(),
        "when": time.time(),
        "changes": args.changes,
        "poll_ms": POLL_S * 1000,
        "istiod_env": {k: DEFAULT_ENV[k] for k in ("PILOT_DEBOUNCE_AFTER", "PILOT_DEBOUNCE_MAX")},
        "notes": "istiod's file watcher debounces 250 ms before its own push debounce; "
        "push = istiod's syncz sentTime of the first type it sent for the change; "
        "visible = amesh's dict (5 ms drain timer) / Envoy's admin /clusters and /config_dump",
        "results": results,
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
