"""Service churn for fault tests and the soak: a thread that adds, changes and removes
services (one STATIC cluster per file) in a file:// mesh folder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def churn_cluster(slot: int, generation: int) -> dict:
    return {"@type": CLUSTER, "name": f"churn-{slot}", "type": "STATIC",
            "load_assignment": {"cluster_name": f"churn-{slot}", "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.9", "port_value": 80 + generation % 7}}}}]}]}}


def _write_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


def churn_step(mesh: Path, i: int, slots: int) -> None:
    """Step i: slot i % slots appears (or changes its endpoint), or goes away."""
    path = mesh / f"churn-{i % slots}.yaml"
    if path.exists() and (i // slots) % 2:
        path.unlink()
    else:
        _write_atomic(path, {"resources": [churn_cluster(i % slots, i)]})


@contextmanager
def service_churn(mesh: Path, every: float = 0.03, slots: int = 40) -> Iterator[list[int]]:
    """Churn in a thread until the block ends; yields [steps done so far]."""
    stop = threading.Event()
    steps = [0]

    def run() -> None:
        while not stop.is_set():
            steps[0] += 1
            churn_step(mesh, steps[0], slots)
            stop.wait(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield steps
    finally:
        stop.set()
        thread.join()
