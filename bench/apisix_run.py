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
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

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
                 workers: int = 2, dict_size: str = "64m", log_level: str = "warn") -> None:
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
            "@ROUTER@": router,
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
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
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

    def ctl(self, path: str) -> Any:
        status, body, _ = self.get("control", path, port=self.control)
        if status != 200:
            raise RuntimeError(f"control {path}: {status} {body[:200]}")
        return json.loads(body) if body.strip()[:1] in "{[" else body.strip()


def thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (its event loop), from /proc."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
