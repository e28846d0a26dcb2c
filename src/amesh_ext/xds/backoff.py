"""Exponential backoff with full jitter (the AWS "full jitter" scheme gRPC clients use)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays for successive reconnects: uniform(0, min(max, base * 2**attempt)).

    Full jitter spreads a fleet of sidecars reconnecting to a restarted istiod, which
    throttles new streams. `rand` is injectable so tests can observe the ceilings.
    """

    def __init__(
        self, base: float = 0.5, maximum: float = 30.0, rand: Callable[[], float] | None = None
    ) -> None:
        if base <= 0 or maximum < base:
            raise ValueError(f"backoff needs 0 < base <= max, got base={base} max={maximum}")
        self.base = base
        self.maximum = maximum
        self._rand = rand or random.random
        self.attempts = 0
        self.last_delay = 0.0

    @property
    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power would overflow after ~1000 attempts: cap the exponent.
        return min(self.maximum, self.base * (2 ** min(self.attempts, 62)))

    def next_delay(self) -> float:
        delay = self._rand() * self.ceiling
        self.attempts += 1
        self.last_delay = delay
        return delay

    def reset(self) -> None:
        self.attempts = 0
        self.last_delay = 0.0
