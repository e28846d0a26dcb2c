"""Foundation figures under a real nginx (2 workers): cost of an empty amesh_poll, draining
~1,000 and ~10,000 changes into the dict, the longest single drain call (event-loop stall),
agent start time, time to the first applied batch, RSS of the agent's worker.

  /opt/amesh/venv/bin/python bench/bench_foundation.py [--sizes 500,5000,10000]

Prints a table and writes bench/results/foundation.json.
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
from synthetic_mesh import write_mesh  # noqa: E402

from nginx import LIBRARY, Nginx  # noqa: E402

POLL_BENCH = """
        location = /bench/poll {
            content_by_lua_block {
                local ffi = require("ffi")
                require("amesh.abi")
                local lib = ffi.load("%s")
                local buf = ffi.new("amesh_change_t[?]", 256)
                local n = tonumber(ngx.var.arg_n) or 1000000
                local t0 = os.clock()
                local got = 0
                for _ = 1, n do got = got + lib.amesh_poll(buf, 256) end
                ngx.say((os.clock() - t0) / n * 1e9, " ", got)
            }
        }
""".replace("%s", str(LIBRARY))


def run_size(n_services: int, work: Path) -> dict:
    mesh = write_mesh(work / f"mesh-{n_services}", n_services)
    user = "nobody nogroup" if os.geteuid() == 0 else None
    nginx = Nginx(work / f"nginx-{n_services}", user=user, dict_size="64m",
                  config={"source": f"file://{mesh}", "limits": {"file_poll_interval": 0.2}},
                  extra_locations=POLL_BENCH)
    t0 = time.time()
    nginx.start()
    try:
        status = nginx.wait_for(
            lambda: (s := nginx.status())["consumer"]["batches_applied"] >= 1 and s,
            timeout=120, what="first batch applied")
        consumer = status["consumer"]
        agent = status["library"]["agent"]
        agent_pid = status["agent_process"]
        others = [p for p in nginx.worker_pids() if p != agent_pid]
        poll_ns, got = nginx.get("/bench/poll?n=1000000").split()
        return {
            "services": n_services,
            "objects": agent["objects"],
            "changes_in_batch": consumer["last_batch_changes"],
            "batch_apply_us": round(consumer["last_batch_us"]),
            "max_drain_call_us": round(consumer["max_tick_us"]),
            "agent_start_us": round(consumer["start_us"]),
            "agent_start_to_first_batch_s": round(agent["first_batch_at"] - agent["started_at"], 3),
            "nginx_start_to_applied_s": round(consumer["last_commit_at"] - t0, 3),
            "agent_worker_rss_mb": rss_mb(agent_pid),
            "plain_worker_rss_mb": rss_mb(others[0]) if others else None,
            "empty_poll_ns": round(float(poll_ns), 2),
            "empty_poll_returned": int(got),
        }
    finally:
        nginx.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="500,5000,10000")
    parser.add_argument("--out", default=str(HERE / "results" / "foundation.json"))
    args = parser.parse_args()
    work = work_dir("amesh-bench-")
    rows = [run_size(int(s), work) for s in args.sizes.split(",")]
    cols = list(rows[0])
    print("  ".join(f"{c:>22}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>22}" for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
