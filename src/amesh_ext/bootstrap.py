"""Entry point called by libamesh.so on the thread that called amesh_start().

Kept light: it checks the runtime, validates the config and starts the agent thread;
everything heavy (grpc, the Envoy protos) is imported on that thread, so nginx's thread
is back in its event loop within milliseconds.
"""

from __future__ import annotations

import sys
import threading

from .config import parse_start_config


def start(config_json: str, mode: str, built_version: str, built_home: str) -> None:
    running = sys.version.split()[0]
    if running != built_version:
        raise RuntimeError(f"Python {running} runs, but libamesh was built for {built_version}")
    if sys.prefix != built_home and sys.base_prefix != built_home:
        raise RuntimeError(f"Python at {sys.prefix} runs, but libamesh was built for {built_home}")
    config = parse_start_config(config_json)

    def run() -> None:
        from .runtime import run_embedded

        run_embedded(config, mode)

    threading.Thread(target=run, name="amesh-agent", daemon=True).start()
