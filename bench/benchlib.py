"""What every benchmark here needs: RSS of a process, a work directory nginx's `nobody`
workers can traverse, and the results file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def work_dir(prefix: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(work, 0o755)  # nginx's nobody workers traverse it
    return work


def write_results(path: str | Path, rows: list[dict[str, Any]], **extra: Any) -> None:
    doc = {"machine": os.uname().nodename, "when": time.time(), "rows": rows, **extra}
    Path(path).write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")


def stop_nginx(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Graceful quit of an nginx master; after `timeout`, SIGKILL to it (and to its process
    group when it leads one, so no worker outlives it)."""
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            leads = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            leads = False
        if leads:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
