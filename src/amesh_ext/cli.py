"""`amesh` command: paths for nginx.conf, a demo under a real nginx, offline translation.

  amesh paths                 where the library and the Lua module are installed
  amesh demo [--source URL]   run nginx + amesh on the bundled mesh, print what APISIX loads
  amesh translate URL         translate a file:// source without nginx, print the objects
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .paths import bundled_mesh, install_dir

PACKAGE_DIR = install_dir()
BUNDLED_MESH = bundled_mesh()
NGINX = "/usr/sbin/nginx"
MODULES = "/usr/lib/nginx/modules"

DEMO_CONF = """\
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
daemon off;
master_process on;
worker_processes 2;
pid logs/nginx.pid;
error_log logs/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    lua_package_path "{pkg}/lua/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict xds-config 10m;
    lua_shared_dict xds-config-version 1m;
    init_by_lua_block {{ require("resty.core"); require("amesh").init() }}
    init_worker_by_lua_block {{ require("amesh").init_worker({{ config = [==[{config}]==] }}) }}
    exit_worker_by_lua_block {{ require("amesh").exit_worker() }}
    server {{
        listen 127.0.0.1:{port};
        location = /amesh/status {{ content_by_lua_block {{ ngx.say(require("amesh").status()) }} }}
        location = /amesh/dump {{
            content_by_lua_block {{
                local dict = ngx.shared["xds-config"]
                ngx.say("version\\t", ngx.shared["xds-config-version"]:get("version"))
                for _, k in ipairs(dict:get_keys(0)) do
                    if k:sub(1, 1) == "/" then ngx.say(k, "\\t", dict:get(k)) end
                end
            }}
        }}
    }}
}}
"""


def cmd_paths(_: argparse.Namespace) -> int:
    print(json.dumps({
        "library": str(PACKAGE_DIR / "libamesh.so"),
        "libxds": str(PACKAGE_DIR / "libxds.so"),
        "lua_package_path": f"{PACKAGE_DIR}/lua/?.lua",
        "header": str(PACKAGE_DIR / "include" / "amesh.h"),
        "bundled_mesh": str(BUNDLED_MESH),
    }, indent=2))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read().decode()


def _describe(key: str, obj: dict[str, Any]) -> str:
    if key.startswith("/upstreams/"):
        nodes = ", ".join(f"{n['host']}:{n['port']}*{n['weight']}" for n in obj.get("nodes", []))
        return f"upstream {obj.get('name', obj['id'])}  {obj.get('type', '')}  [{nodes}]"
    plugins = obj.get("plugins", {})
    target = obj.get("upstream_id", "")
    split = plugins.get("traffic-split")
    if split:
        target = " / ".join(f"{u.get('upstream_id', 'self')}*{u.get('weight', 1)}"
                            for rule in split.get("rules", [])
                            for u in rule.get("weighted_upstreams", []))
    hosts = ",".join(obj.get("hosts", [])[:2])
    return (f"route {obj.get('name', obj['id'])}  hosts={hosts}  prio={obj.get('priority', 0)}"
            f"  vars={json.dumps(obj.get('vars', []))}  -> {target or sorted(plugins)}")


def cmd_demo(args: argparse.Namespace) -> int:
    if not os.path.exists(NGINX) or not os.path.exists(f"{MODULES}/ngx_http_lua_module.so"):
        print("amesh demo needs nginx with lua-nginx-module: apt-get install nginx "
              "libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core", file=sys.stderr)
        return 2
    prefix = Path(tempfile.mkdtemp(prefix="amesh-demo-"))
    os.chmod(prefix, 0o755)
    (prefix / "logs").mkdir()
    (prefix / "conf").mkdir()
    port = _free_port()
    config = json.dumps({"source": args.source, "limits": {"file_poll_interval": 0.2}})
    (prefix / "conf" / "nginx.conf").write_text(
        DEMO_CONF.format(modules=MODULES, pkg=PACKAGE_DIR, config=config, port=port))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", "conf/nginx.conf"],
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = json.loads(_fetch(f"{base}/amesh/status"))
                agent = (status.get("library") or {}).get("agent") or {}
                if agent.get("synced") and agent.get("sink", {}).get("batches_applied", 0) > 0:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        lines = _fetch(f"{base}/amesh/dump").splitlines()
        print(f"nginx {NGINX} (prefix {prefix}), amesh source {args.source}\n")
        print("What APISIX loads from ngx.shared['xds-config']:")
        for line in sorted(lines):
            key, _, value = line.partition("\t")
            if key.startswith("/"):
                print(f"  {key}\n      {_describe(key, json.loads(value))}")
            elif key == "version":
                print(f"  xds-config-version: version = {value}")
        print("\nAgent status:")
        print(json.dumps(status, indent=2, sort_keys=True))
        agent = (status.get("library") or {}).get("agent") or {}
        return 0 if agent.get("synced") else 1
    finally:
        os.killpg(proc.pid, signal.SIGQUIT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(prefix, ignore_errors=True)


def cmd_translate(args: argparse.Namespace) -> int:
    from .config import parse_start_config
    from .native import MemoryQueue
    from .runtime import run_agent

    config = parse_start_config(json.dumps({"source": args.source}))
    queue = MemoryQueue()
    stop = threading.Event()
    threading.Timer(args.wait, stop.set).start()
    agent = run_agent(config, queue, stop)
    objects = {k: json.loads(v) for k, v in sorted(queue.data.items()) if k.startswith("/")}
    print(json.dumps({"objects": objects, "status": agent.status()}, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("paths").set_defaults(func=cmd_paths)
    demo = sub.add_parser("demo")
    demo.add_argument("--source", default=f"file://{BUNDLED_MESH}")
    demo.add_argument("--timeout", type=float, default=20)
    demo.add_argument("--keep", action="store_true", help="keep the nginx prefix directory")
    demo.set_defaults(func=cmd_demo)
    trans = sub.add_parser("translate")
    trans.add_argument("source", nargs="?", default=f"file://{BUNDLED_MESH}")
    trans.add_argument("--wait", type=float, default=1.0)
    trans.set_defaults(func=cmd_translate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
