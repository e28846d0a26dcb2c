"""The agent's side of the C queue (`_amesh_native`, registered by libamesh.so), and an
in-memory stand-in with the same interface for running the agent without the library."""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

BATCH_FULL = 0x1  # AMESH_BATCH_FULL in include/amesh.h


class ChangeQueue(Protocol):
    def push_batch(
        self, batch: int, flags: int, sets: list[tuple[bytes, bytes]], deletes: list[bytes]
    ) -> int: ...

    def wait_reports(self, timeout_ms: int) -> list[tuple[int, int, str]]: ...

    def set_status(self, status_json: bytes) -> None: ...

    def log_error(self, message: str) -> None: ...


def native_queue() -> ChangeQueue:
    """The real queue; only importable inside a process that loaded libamesh.so."""
    import _amesh_native  # type: ignore[import-not-found]

    return _amesh_native  # the module itself has the ChangeQueue functions


class MemoryQueue:
    """A consumer that applies batches to a dict at once (tests, `amesh translate`)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.batches: list[tuple[int, int, list[tuple[bytes, bytes]], list[bytes]]] = []
        self.status: bytes = b"null"
        self.errors: list[str] = []
        self.fail_next: str | None = None  # a reason to refuse the next batch, as a full dict would
        self._reports: deque[tuple[int, int, str]] = deque()
        self._cond = threading.Condition()

    def push_batch(
        self, batch: int, flags: int, sets: list[tuple[bytes, bytes]], deletes: list[bytes]
    ) -> int:
        with self._cond:
            self.batches.append((batch, flags, sets, deletes))
            if self.fail_next is not None:
                self._reports.append((batch, -1, self.fail_next))
                self.fail_next = None
            else:
                set_keys = {k.decode() for k, _ in sets}
                if flags & BATCH_FULL:
                    for key in [k for k in self.data if k.startswith("/") and k not in set_keys]:
                        del self.data[key]
                for key, value in sets:
                    self.data[key.decode()] = value
                for key in deletes:
                    self.data.pop(key.decode(), None)
                self._reports.append((batch, 0, "applied"))
            self._cond.notify_all()
        return 0

    def wait_reports(self, timeout_ms: int) -> list[tuple[int, int, str]]:
        with self._cond:
            if not self._reports:
                self._cond.wait(timeout_ms / 1000)
            out = list(self._reports)
            self._reports.clear()
            return out

    def set_status(self, status_json: bytes) -> None:
        self.status = status_json

    def log_error(self, message: str) -> None:
        self.errors.append(message)
