"""Soak: amesh's Lua consumer in Debian's nginx (2 workers) under service churn (a service
added, changed or removed every 50 ms) with a reload every 2 minutes, for --minutes.
Every 10 s it samples the agent worker's RSS, threads and open fds, the batches applied and
refused, and the longest drain call. At the end the churn stops and the dict must equal, key
by key, what a fresh agent on the final mesh writes.

  /opt/amesh/venv/bin/python bench/soak.py [--minutes 30] [--services 300]

Prints a table, writes bench/results/soak.json (git SHA stamped) and bench/results/soak.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from benchlib import rss_mb, work_dir, write_results  # noqa: E402
from synthetic_mesh import write_mesh  # noqa: E402

import test_faults  # noqa: E402
import test_writer_faults as faults  # noqa: E402
from churn import service_churn  # noqa: E402
from nginx import Nginx  # noqa: E402


def git_sha() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                          text=True).stdout.strip()


def sample(n: Nginx, t0: float, steps: int) -> dict:
    status = n.status()
    pid = status["agent_process"]
    proc = Path(f"/proc/{pid}")
    consumer = status["consumer"]
    return {"t": round(time.monotonic() - t0, 1), "agent_pid": pid, "rss_mb": rss_mb(pid),
            "threads": len(list((proc / "task").iterdir())),
            "fds": len(list((proc / "fd").iterdir())),
            "workers": len(n.worker_pids()), "churn_steps": steps,
            "batches_applied": consumer["batches_applied"],
            "batches_failed": consumer["batches_failed"],
            "max_tick_ms": round(consumer["max_tick_us"] / 1000, 2)}


class _Factory:
    """make_nginx for the test helpers, outside pytest."""

    def __init__(self, work: Path) -> None:
        self.work, self.started = work, []

    def __call__(self, **kwargs) -> Nginx:
        n = Nginx(self.work / f"nginx{len(self.started)}", **kwargs)
        self.started.append(n)
        return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--services", type=int, default=300)
    ap.add_argument("--every", type=float, default=10, help="seconds between samples")
    args = ap.parse_args()
    work = work_dir("amesh-soak-")
    mesh = write_mesh(work / "mesh", args.services)
    os.chmod(mesh, 0o755)
    make = _Factory(work)
    n = test_faults._nginx(make, mesh)
    rows: list[dict] = []
    try:
        n.wait_for(lambda: test_faults._ready_in(n), timeout=60, what="ready")
        t0 = time.monotonic()
        next_reload = 120.0
        with service_churn(mesh, every=0.05) as steps:
            while (elapsed := time.monotonic() - t0) < args.minutes * 60:
                if elapsed >= next_reload:
                    n.reload()
                    next_reload += 120
                time.sleep(args.every)
                row = n.wait_for(lambda: sample(n, t0, steps[0]), what="a status sample")
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        pid = test_faults._agent_pid(n)
        n.wait_for(lambda: test_faults._ready_in(n, pid), timeout=60, what="ready after churn")
        expected = test_faults._expected(work, make, mesh)
        actual = n.wait_for(lambda: (d := faults._digest(n)) == expected and d, timeout=30,
                            what="the dict equal to a fresh run's") or faults._digest(n)
        diff = faults._diff(actual, expected)
        converged = actual == expected
    finally:
        for started in make.started:
            started.stop()
    first, last = rows[0], rows[-1]
    summary = {
        "minutes": args.minutes, "services": args.services, "samples": len(rows),
        "churn_steps": last["churn_steps"], "reloads": int(args.minutes * 60 // 120),
        "rss_mb_first_last_max": [first["rss_mb"], last["rss_mb"], max(r["rss_mb"] for r in rows)],
        "threads_first_last_max": [first["threads"], last["threads"],
                                   max(r["threads"] for r in rows)],
        "fds_first_last_max": [first["fds"], last["fds"], max(r["fds"] for r in rows)],
        "batches_failed": last["batches_failed"],
        "max_tick_ms": max(r["max_tick_ms"] for r in rows),
        "converged_key_by_key": converged, "diff": diff,
    }
    print("\n| minutes | churn steps | reloads | RSS first/last/max MB | threads first/last/max"
          " | fds first/last/max | refused batches | longest drain | dict == fresh run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.minutes:g} | {summary['churn_steps']} | {summary['reloads']} | "
          f"{'/'.join(map(str, summary['rss_mb_first_last_max']))} | "
          f"{'/'.join(map(str, summary['threads_first_last_max']))} | "
          f"{'/'.join(map(str, summary['fds_first_last_max']))} | "
          f"{summary['batches_failed']} | {summary['max_tick_ms']} ms | {converged} |")
    results = HERE / "results"
    write_results(results / "soak.json", rows, summary=summary, git_sha=git_sha())
    chart(rows, results / "soak.png")
    if not converged:
        sys.exit(f"the dict did not converge: {diff}")


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, key, label in zip(axes, ("rss_mb", "threads", "fds"),
                              ("agent worker RSS (MB)", "threads", "open fds"), strict=True):
        ax.plot(t, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes (reload every 2 min, churn every 50 ms)")
    fig.suptitle("amesh soak: Lua consumer under service churn")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
