"""The agent's threads: source, report loop, status publication and the periodic tick,
wired to the native queue. The Agent (agent.py) only reacts to what it is handed."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

import orjson

from .agent import Agent
from .config import StartConfig
from .native import ChangeQueue
from .sources import make_source

log = logging.getLogger("amesh.agent")


class _NativeErrorHandler(logging.Handler):
    """ERROR records go to the library (last_error + nginx's error log via stderr)."""

    def __init__(self, queue: ChangeQueue) -> None:
        super().__init__(logging.ERROR)
        self._queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # logging must never take the agent down
            self._queue.log_error(self.format(record))


def _setup_logging(level: str, queue: ChangeQueue) -> None:
    root = logging.getLogger("amesh")
    root.setLevel(level.upper())
    root.propagate = False
    below_error = logging.StreamHandler(sys.stderr)
    below_error.addFilter(lambda r: r.levelno < logging.ERROR)
    below_error.setFormatter(logging.Formatter("amesh: %(name)s: %(message)s"))
    native = _NativeErrorHandler(queue)
    native.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.handlers = [below_error, native]


def _report_loop(agent: Agent, queue: ChangeQueue) -> None:
    while True:
        try:
            reports = queue.wait_reports(250)
            if reports:
                agent.on_reports(reports)
        except Exception:
            log.exception("report loop")
            time.sleep(0.5)


def run_agent(config: StartConfig, queue: ChangeQueue, stop: threading.Event) -> Agent:
    """Start the source and the report thread; tick until `stop` is set (never, embedded)."""
    agent = Agent(config, queue)
    source = make_source(config.source, config.xds, agent, config.limit)
    agent.attach_source(source)
    threading.Thread(target=_report_loop, args=(agent, queue), name="amesh-reports",
                     daemon=True).start()
    source.start()
    published = b""
    interval = min(0.05, config.limit("status_interval"))
    next_status = 0.0
    while not stop.wait(interval):
        try:
            agent.tick()
            now = time.monotonic()
            if now >= next_status:
                next_status = now + config.limit("status_interval")
                status = orjson.dumps(agent.status(), default=str)
                if status != published:
                    queue.set_status(status)
                    published = status
        except Exception:
            log.exception("agent tick")
    source.stop()
    return agent


def run_embedded(config: StartConfig, mode: str) -> None:
    """The agent thread's body inside libamesh.so."""
    from .native import native_queue

    queue = native_queue()
    _setup_logging(config.log_level, queue)
    try:
        log.info("agent starting (mode %s, source %s)", mode, config.source)
        run_agent(config, queue, threading.Event())
    except Exception as exc:  # the thread must report, never take the process down
        log.exception("agent stopped")
        queue.log_error(f"agent stopped: {exc}")
