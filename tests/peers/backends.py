"""Backends that name themselves: one small HTTP server per endpoint address/port.

Each answers any request with JSON: its own address (`backend`), the method, path and Host
it received and every request header (repeated ones in order), and sets two fixed response
headers (``RESPONSE_HEADERS``) so a proxy's response-header mutations can be observed.
The TCP proxy test speaks HTTP through the tunnel to the same kind of server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESPONSE_HEADERS = {"x-resp-set": "backend", "x-resp-remove": "backend"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the proxy reuses connections

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.server.hits.append((self.server.name, self.path,  # type: ignore[attr-defined]
                                 self.headers.get("host")))
        body = json.dumps({
            "backend": self.server.name,  # type: ignore[attr-defined]
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("host"),
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in RESPONSE_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


class Backends:
    """Servers on ``(address, port)`` pairs; ``stop()`` (or the context manager) closes all."""

    def __init__(self, addresses: Iterable[tuple[str, int]]) -> None:
        self.addresses = sorted(set(addresses))
        self._servers: list[ThreadingHTTPServer] = []
        # (backend, path, Host) of every request served, in arrival order: mirrored copies
        # are seen only here.
        self.hits: list[tuple[str, str, str | None]] = []

    def start(self) -> Backends:
        try:
            for host, port in self.addresses:
                server = ThreadingHTTPServer((host, port), _Handler)
                server.daemon_threads = True
                server.name = f"{host}:{port}"  # type: ignore[attr-defined]
                server.hits = self.hits  # type: ignore[attr-defined]
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                 name=f"backend-{host}:{port}", daemon=True).start()
                self._servers.append(server)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> Backends:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
