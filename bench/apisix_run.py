"""Real Apache APISIX fed by amesh, for benchmarks and runners that need APISIX itself.

`ApisixRun` renders bench/apisix/nginx.conf.tpl and config.yaml.tpl into a private nginx
prefix and starts APISIX (nginx master + workers) with either config provider:
`provider="stock"` (APISIX's own config_xds and radixtree_host_uri) or `provider="amesh"`
(amesh's lua/apisix/core/config_xds.lua and radixtree_host_uri_incremental, put in front of
APISIX's tree as apisix.extra_lua_path does). amesh's libxds.so is the writer in both.

Needs an APISIX installation: APISIX_HOME (a tree holding apisix/init.lua and its Lua
dependencies, e.g. the one ../shared/apisix/setup.sh assembles) and, on Debian's nginx with
more than one worker, the kit's multi-worker shim (APISIX_KIT, default /work/shared/apisix).
Missing either fails with a message saying so.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib import stop_nginx

from amesh_ext.paths import install_dir

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "apisix"
NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apisix_home() -> Path:
    home = os.environ.get("APISIX_HOME")
    if not home or not (Path(home) / "apisix" / "init.lua").exists():
        raise SystemExit(
            "APISIX_HOME must name an APISIX tree (apisix/init.lua and its deps): e.g. "
            "APISIX_HOME=/root/.cache/amesh/apisix, assembled by ../shared/apisix/setup.sh")
    return Path(home)


def amesh_lua_root() -> Path:
    """Where amesh's APISIX-side Lua is installed (AMESH_LUA_ROOT overrides, e.g. lua/)."""
    return Path(os.environ.get("AMESH_LUA_ROOT") or install_dir() / "lua")


class ApisixRun:
    def __init__(self, prefix: Path, provider: str, config: dict[str, Any], *,
                 workers: int = 2, dict_size: str = "64m", log_level: str = "warn",
                 writer: str = "libxds") -> None:
        """writer "libxds": amesh's library writes the dicts (from `config`); "none": the
        caller does, through the control endpoint /write."""
        assert provider in ("stock", "amesh")
        self.prefix = prefix
        self.provider = provider
        self.work = apisix_home()
        self.port = free_port()
        self.control = free_port()
        self.backend_a = free_port()
        self.backend_b = free_port()
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

        for d in ("logs", "conf", "xds"):
            (prefix / d).mkdir(parents=True, exist_ok=True)
        xds = prefix / "xds"
        lib = xds / "libxds.so"
        if not lib.exists():
            lib.symlink_to(install_dir() / "libxds.so")
        (xds / "amesh.json").write_text(json.dumps(config))

        extra = ""
        if workers > 1:
            kit = Path(os.environ.get("APISIX_KIT", "/work/shared/apisix"))
            shim = kit / "shim_multiworker"
            if not shim.exists():
                raise SystemExit(f"{shim} is missing: Debian's nginx needs the APISIX kit's "
                                 "multi-worker shim for more than one worker (APISIX_KIT)")
            extra += f"{shim}/?.lua;"
        lua_root = ""
        router = "radixtree_host_uri"
        if provider == "amesh":
            lua_root = f"{amesh_lua_root()}/?.lua;"
            if not (amesh_lua_root() / "apisix" / "core" / "config_xds.lua").exists():
                raise SystemExit(f"{amesh_lua_root()} has no apisix/core/config_xds.lua: "
                                 "pip install amesh (or set AMESH_LUA_ROOT)")
            extra = lua_root + extra
            router = "radixtree_host_uri_incremental"
        subst = {
            "@WORK@": str(self.work), "@PREFIX@": str(prefix), "@XDS_DIR@": str(xds),
            # reuseport (APISIX's default, enable_reuseport): new connections spread over workers
            "@LISTEN_LINES@": f"listen 127.0.0.1:{self.port} default_server reuseport;",
            "@WORKERS@": str(workers), "@EXTRA_LUA_PATH@": extra,
            "@CONTROL@": str(self.control), "@DICT_SIZE@": dict_size,
            "@BACKEND_A@": f"127.0.0.1:{self.backend_a}",
            "@BACKEND_B@": f"127.0.0.1:{self.backend_b}", "@LOG_LEVEL@": log_level,
            "@ROUTER@": router, "@WRITER@": writer,
        }
        conf = (TEMPLATES / "nginx.conf.tpl").read_text()
        yaml = (TEMPLATES / "config.yaml.tpl").read_text().replace("@EXTRA_LUA_PATH@", lua_root)
        for k, v in subst.items():
            conf = conf.replace(k, v)
            yaml = yaml.replace(k, v)
        (prefix / "conf" / "nginx.conf").write_text(conf)
        (prefix / "conf" / "config.yaml").write_text(yaml)
        shutil.copy(self.work / "conf" / "mime.types", prefix / "conf" / "mime.types")

    # -- process --------------------------------------------------------------------------
    def start(self) -> ApisixRun:
        (self.prefix / "logs" / "error.log").write_text("")
        args = [NGINX, "-p", f"{self.prefix}/", "-c", "conf/nginx.conf"]
        subprocess.run([*args, "-t", "-q"], check=True)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_nginx(self.proc, 10)
        self.proc = None

    def __enter__(self) -> ApisixRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return sorted(int(p) for p in out.split())

    def error_log(self) -> str:
        return (self.prefix / "logs" / "error.log").read_text(errors="replace")

    # -- requests -------------------------------------------------------------------------
    def get(self, host: str, path: str = "/", port: int | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, int]:
        """One request on a new connection: (status, body, answering worker's pid)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": host, "Connection": "close",
                                               **(headers or {})})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            return resp.status, body, int(resp.getheader("X-Pid") or 0)
        finally:
            conn.close()

    def ctl(self, path: str, body: Any = None) -> Any:
        """GET a control endpoint, or POST `body` (JSON) to it; the answer, decoded."""
        conn = http.client.HTTPConnection("127.0.0.1", self.control, timeout=60)
        try:
            if body is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=json.dumps(body),
                             headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"control {path}: {resp.status} {text[:300]}")
        return json.loads(text) if text.strip()[:1] in "{[" else text.strip()


class DictWriter:
    """The runner as the dicts' writer (ApisixRun(writer="none")): batches laid out as
    docs/dict-protocol.md says (index pre-images, sets, deletes, post-images, change-log
    entry and head, then one version bump), stored through the control endpoint /write."""

    def __init__(self, run: ApisixRun, name: str = "runner") -> None:
        self.run = run
        self.log_run = f"{name}{os.getpid():x}{time.time_ns():x}"
        self.seq = 0
        self.keys: set[str] = set()
        self.version = 1

    def batch(self, sets: dict[str, Any], deletes: list[str] | tuple[str, ...] = ()) -> None:
        from amesh_ext.protocol import (
            KEY_LOG_HEAD,
            bucket_of,
            index_key,
            index_value,
            log_entry,
            log_slot_key,
        )
        data = "xds-config"
        ops: list[list[Any]] = []
        touched = sorted({bucket_of(k) for k in [*sets, *deletes]})
        after = (self.keys | set(sets)) - set(deletes)
        for b in touched:
            ops.append([data, index_key(b), index_value(
                k for k in self.keys | after if bucket_of(k) == b).decode()])
        ops += [[data, k, json.dumps(v)] for k, v in sets.items()]
        ops += [[data, k, None] for k in deletes]
        for b in touched:
            ops.append([data, index_key(b),
                        index_value(k for k in after if bucket_of(k) == b).decode()])
        self.keys = after
        self.seq += 1
        ops.append([data, log_slot_key(self.seq),
                    log_entry(self.log_run, self.seq, [*sets, *deletes]).decode()])
        ops.append([data, KEY_LOG_HEAD, f"{self.log_run}:{self.seq}"])
        self.version += 1
        ops.append(["xds-config-version", "version", f"{self.version:013d}"])
        assert self.run.ctl("/write", ops) == "ok"


def thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (its event loop), from /proc."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
