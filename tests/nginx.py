"""A private nginx (Debian's, with lua-nginx-module) on a free loopback port, for tests.

Master on, 2 workers. Every worker runs a small watcher timer that records the version it
sees and one decoded read of the dict, so a test can prove that all workers read the data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from amesh_ext.paths import bundled_mesh, install_dir

NGINX = "/usr/sbin/nginx"
MODULES = "/usr/lib/nginx/modules"
PACKAGE_DIR = install_dir()  # the library, lua/ and include/ (site-packages, also when editable)
LIBRARY = PACKAGE_DIR / "libamesh.so"
BUNDLED_MESH = bundled_mesh()


def require_nginx() -> None:
    missing = [p for p in (NGINX, f"{MODULES}/ngx_http_lua_module.so",
                           "/usr/share/lua/5.1/resty/core.lua") if not os.path.exists(p)]
    if missing:
        raise RuntimeError(
            f"nginx with lua-nginx-module is required, missing {missing}: "
            "apt-get install nginx libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core "
            "lua-resty-lrucache luajit2")
    if not LIBRARY.exists():
        raise RuntimeError(f"{LIBRARY} is missing: install amesh first (pip install .)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lua_long_string(text: str) -> str:
    return f"[==[{text}]==]"


CONF = """\
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
daemon off;
master_process on;
worker_processes {workers};
{user}
pid logs/nginx.pid;
error_log logs/error.log info;
{env}
events {{ worker_connections 256; }}

http {{
    access_log off;
    lua_package_path "{lua_path};/usr/share/lua/5.1/?.lua;;";
    lua_package_cpath "{cpath};;";
    lua_shared_dict xds-config {dict_size};
    lua_shared_dict xds-config-version 1m;
    lua_shared_dict amesh-test 1m;

    init_by_lua_block {{
        require("resty.core")
        {init}
    }}
    init_worker_by_lua_block {{
        {init_worker}
        -- Test watcher: what this worker reads from the dicts.
        local seen = ngx.shared["amesh-test"]
        local id = ngx.worker.id()
        ngx.timer.every(0.01, function()
            local v = ngx.shared["xds-config-version"]:get("version")
            if v and v ~= seen:get("version:" .. id) then
                local n = 0
                for _, k in ipairs(ngx.shared["xds-config"]:get_keys(0)) do
                    if k:sub(1, 1) == "/" and ngx.shared["xds-config"]:get(k) then
                        n = n + 1
                    end
                end
                seen:set("keys:" .. id, n)
                seen:set("version:" .. id, v)
            end
        end)
    }}
    {exit_worker}

    server {{
        listen 127.0.0.1:{port};
        location = /status {{ content_by_lua_block {{ ngx.say(require("amesh").status()) }} }}
        location = /dump {{
            content_by_lua_block {{
                local dict = ngx.shared[ngx.var.arg_dict or "xds-config"]
                for _, k in ipairs(dict:get_keys(0)) do
                    local v = dict:get(k)
                    -- one line per key: the key index's values hold newlines
                    if v ~= nil then ngx.say(k, "\\t", (tostring(v):gsub("\\n", "\\\\n"))) end
                end
            }}
        }}
        location = /fill {{
            content_by_lua_block {{
                -- Fill the data dict with filler keys (a test of a full dict).
                local dict = ngx.shared["xds-config"]
                local blob = string.rep("x", 4000)
                local i = 0
                while true do
                    local ok = dict:safe_set("filler:" .. i, blob)
                    if not ok then break end
                    i = i + 1
                end
                ngx.say(i)
            }}
        }}
        location = /unfill {{
            content_by_lua_block {{
                local dict = ngx.shared["xds-config"]
                for _, k in ipairs(dict:get_keys(0)) do
                    if k:sub(1, 7) == "filler:" then dict:delete(k) end
                end
                ngx.say("ok")
            }}
        }}
        location = /seen {{
            content_by_lua_block {{
                local seen = ngx.shared["amesh-test"]
                for _, k in ipairs(seen:get_keys(0)) do ngx.say(k, "\\t", seen:get(k)) end
            }}
        }}
        location = /whoami {{ content_by_lua_block {{ ngx.say(ngx.worker.id()) }} }}
        {extra_locations}
    }}
}}
"""

AMESH_INIT_WORKER = """
        local ok, err = require("amesh").init_worker({{
            config = {config},
            interval = 0.002,
        }})
        if not ok then ngx.log(ngx.ERR, "test: amesh init_worker: ", err) end
"""


class Nginx:
    def __init__(self, prefix: Path, *, config: dict[str, Any] | str | None = None,
                 workers: int = 2, user: str | None = None, env: dict[str, str] | None = None,
                 init: str = 'require("amesh").init()', init_worker: str | None = None,
                 exit_worker: str = 'require("amesh").exit_worker()', dict_size: str = "10m",
                 cpath: str = "", extra_locations: str = "") -> None:
        require_nginx()
        self.prefix = prefix
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        (prefix / "conf").mkdir(exist_ok=True)
        if user:
            # Workers as `user` must traverse the prefix (logs are written by the master).
            for p in [prefix, *prefix.parents]:
                if p == Path("/"):
                    break
                os.chmod(p, os.stat(p).st_mode | 0o711)
        self._conf = {
            "modules": MODULES, "workers": workers, "user": f"user {user};" if user else "",
            "env": "\n".join(f"env {k}={v};" for k, v in (env or {}).items()),
            "lua_path": f"{PACKAGE_DIR}/lua/?.lua", "cpath": cpath, "init": init,
            "exit_worker": f"exit_worker_by_lua_block {{ {exit_worker} }}" if exit_worker else "",
            "port": self.port, "dict_size": dict_size, "extra_locations": extra_locations,
        }
        self.write_conf(config, init_worker)

    def write_conf(self, config: dict[str, Any] | str | None = None,
                   init_worker: str | None = None) -> None:
        """(Re)write nginx.conf, e.g. with another start config before a reload."""
        if init_worker is None:
            cfg = config if isinstance(config, str) else json.dumps(config or {})
            init_worker = AMESH_INIT_WORKER.format(config=lua_long_string(cfg))
        conf = CONF.format(init_worker=init_worker, **self._conf)
        (self.prefix / "conf" / "nginx.conf").write_text(conf)

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def start(self, timeout: float = 10) -> Nginx:
        with open(self.prefix / "logs" / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.prefix), "-c", "conf/nginx.conf"],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited at start: {self.log_text()[-3000:]}")
            try:
                self.get("/whoami", timeout=0.5)
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer within {timeout}s: {self.log_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def quit(self, timeout: float = 10) -> float:
        """Graceful stop; returns how long the master took to exit."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.signal(signal.SIGQUIT)
        self.proc.wait(timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def get(self, path: str, timeout: float = 5, headers: dict[str, str] | None = None) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode()

    def get_status(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            return 200, self.get(path, headers=headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def dump(self, dict_name: str = "xds-config") -> dict[str, str]:
        out = {}
        for line in self.get(f"/dump?dict={dict_name}").splitlines():
            key, _, value = line.partition("\t")
            out[key] = value.replace("\\n", "\n") if key.startswith("amesh:index:") else value
        return out

    def objects(self) -> dict[str, Any]:
        """The APISIX objects in the data dict (keys under "/")."""
        return {k: json.loads(v) for k, v in self.dump().items() if k.startswith("/")}

    def version(self) -> str | None:
        return self.dump("xds-config-version").get("version")

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status"))

    def seen(self) -> dict[str, str]:
        return dict(line.split("\t", 1) for line in self.get("/seen").splitlines())

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def wait_for(self, predicate: Any, timeout: float = 10, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}\n"
                             f"error.log tail:\n{self.log_text()[-3000:]}")


def copy_mesh(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
