"""Protobuf Duration / FractionalPercent arithmetic, keeping fractions of a second."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

# envoy.type.v3.FractionalPercent.DenominatorType: HUNDRED, TEN_THOUSAND, MILLION.
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def seconds(d: Duration) -> float:
    """A Duration in seconds, exact to the microsecond (nanoseconds are rounded)."""
    nanos = d.nanos
    if not nanos:
        return float(d.seconds)  # whole seconds (Istio's usual): nothing to round
    return round(d.seconds + nanos / 1e9, 6)


def fraction(percent) -> float:  # envoy.type.v3.FractionalPercent
    """A FractionalPercent as a ratio in [0, 1]; an unset numerator is 0, capped at 100%."""
    den = _DENOMINATORS.get(percent.denominator, 100)
    return min(percent.numerator / den, 1.0)


def whole_percent(ratio: float) -> int:
    """APISIX's integer percentage (0..100): rounded half up, so 0.5% samples as 1%."""
    return min(100, int(ratio * 100 + 0.5))
