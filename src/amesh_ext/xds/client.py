"""One ADS connection to istiod: channel, stream, ordered writer, reconnect and fallback.

Runs on one daemon thread that reads responses and applies them; every request goes
through one queue feeding the stream's request iterator, so sends are ordered and never
concurrent. On any stream end it reconnects with full-jitter exponential backoff and
re-subscribes from the held state; nothing is removed because of a disconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub

from ..handler import ResourceHandler
from .backoff import Backoff
from .credentials import (
    TlsSettings,
    TokenFile,
    call_metadata,
    channel_credentials,
    channel_options,
)
from .delta import DeltaProtocol
from .sotw import SotwProtocol
from .subscriptions import Subscriptions

log = logging.getLogger("amesh.xds")

PROTOCOLS = {"delta": DeltaProtocol, "sotw": SotwProtocol}
STABLE_SECONDS = 30.0  # a stream that lived this long resets the backoff
STOP_JOIN_SECONDS = 0.9
_CLOSE = object()  # ends a request iterator


def _drain(requests: queue.SimpleQueue) -> Iterator[Any]:
    """The stream's only writer: gRPC's consumer thread pulls requests in queue order."""
    while True:
        item = requests.get()
        if item is _CLOSE:
            return
        yield item


class XdsClient:
    def __init__(
        self,
        *,
        target: str,
        handler: ResourceHandler,
        node: Node,
        protocol: str = "delta",
        tls: TlsSettings | None = None,
        keepalive_seconds: float = 30.0,
        max_receive_bytes: int = 0,
        backoff: Backoff | None = None,
        label: str | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        self.target = target
        self.label = label or target
        self.node = node
        self.protocol = protocol
        self.tls = tls
        self.subs = Subscriptions(handler)
        self._token = TokenFile(tls.token_file) if tls and tls.token_file else None
        self._options = channel_options(
            keepalive_seconds, max_receive_bytes, tls.server_name if tls else None
        )
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _call against stop() racing a new stream
        self._call: Any = None
        self._thread: threading.Thread | None = None
        self.state = "idle"
        self.streams = 0  # attempts
        self.connections = 0  # streams the server answered
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._responded = False  # the last stream got at least one response

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="amesh-xds", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_JOIN_SECONDS) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)  # bounded: a handler stuck in apply() is not waited for
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "server": self.label,
            "protocol": self.protocol,
            "connected_since": self.connected_since,
            "reconnects": max(self.streams - 1, 0),
            "connections": self.connections,
            "backoff_seconds": round(self._backoff.last_delay, 3),
            "backoff_attempts": self._backoff.attempts,
            "last_error": self.last_error,
            "types": self.subs.status(),
        }

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                retry_now = self._stream_once()
            except Exception as exc:  # a bug in here must not end config delivery for good
                log.exception("xds stream to %s failed unexpectedly", self.label)
                self.last_error, retry_now = repr(exc), False
            self.connected_since = None
            if self._stop.is_set():
                break
            if retry_now:
                continue
            delay = self._backoff.next_delay()
            self.state = "backoff"
            # One line per connect and per disconnect; a failed attempt says so, not "disconnected".
            log.info(
                "xds %s %s (%s); retrying in %.2fs",
                "disconnected from" if self._responded else "cannot connect to",
                self.label, self.last_error, delay,
            )
            self._stop.wait(delay)
        self.state = "stopped"

    def _stream_once(self) -> bool:
        """One stream from open to end. True = reconnect at once (protocol fallback)."""
        self.state = "connecting"
        self.streams += 1
        self._responded = False
        proto = PROTOCOLS[self.protocol](self.subs)
        self.subs.new_stream()
        try:
            metadata = call_metadata(self._token)
            channel = self._channel()
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot prepare the connection: {exc}"
            return False
        requests: queue.SimpleQueue = queue.SimpleQueue()
        started = time.monotonic()
        responded = False
        try:
            stub = AggregatedDiscoveryServiceStub(channel)
            with self._lock:
                if self._stop.is_set():
                    return False
                self._call = proto.open(stub, _drain(requests), metadata)
            for req in proto.initial_requests(self.node):
                requests.put(req)
            for resp in self._call:
                if not responded:
                    responded = self._responded = True
                    self.connections += 1
                    self._backoff.reset()  # the server is answering: the next drop starts over
                    self.state, self.connected_since = "connected", time.time()
                    log.info("xds connected to %s (%s)", self.label, proto.name)
                for req in proto.on_response(resp):
                    requests.put(req)
            self.last_error = "stream closed by the server"
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return False  # our own cancel: not an error worth reporting
            code: Callable[[], grpc.StatusCode] | None = getattr(exc, "code", None)
            status = code() if code else grpc.StatusCode.UNKNOWN
            details = getattr(exc, "details", lambda: "")()
            self.last_error = f"{status.name}: {details}"
            unimplemented = status == grpc.StatusCode.UNIMPLEMENTED
            if unimplemented and self.protocol == "delta" and not responded:
                log.info("xds %s has no Delta ADS; using state-of-the-world", self.label)
                self.protocol = "sotw"
                return True
        finally:
            requests.put(_CLOSE)
            with self._lock:
                self._call = None
            channel.close()
        if time.monotonic() - started >= STABLE_SECONDS:
            self._backoff.reset()
        return False

    def _channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target, options=self._options)
        return grpc.secure_channel(self.target, channel_credentials(self.tls), self._options)
