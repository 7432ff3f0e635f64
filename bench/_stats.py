"""Summaries of repeated figures: median with min..max, percentiles, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import attrs


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of *values* (``fraction`` from 0 to 1).

    Args:
        values: The samples; need not be sorted.
        fraction: 0.5 for the median, 0.99 for p99.

    Raises:
        ValueError: If there are no samples.
    """
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[rank - 1])


@attrs.frozen
class Summary:
    """One figure measured several times."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarize repeated measurements.

        Raises:
            ValueError: If there are none.
        """
        if not values:
            raise ValueError("no measurements to summarize")
        return cls(
            float(statistics.median(values)), float(min(values)), float(max(values)), len(values)
        )

    def scaled(self, factor: float) -> Summary:
        """The same summary in another unit."""
        return Summary(self.median * factor, self.low * factor, self.high * factor, self.count)

    def show(self, unit: str = "", digits: int = 2) -> str:
        """``median (min..max) unit``, e.g. ``4.1 (3.9..4.6) µs``."""
        text = f"{_num(self.median, digits)} ({_num(self.low, digits)}..{_num(self.high, digits)})"
        return f"{text} {unit}".rstrip()


def _num(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) < 1:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def ratio(value: float, floor: float) -> float:
    """``value / floor``, infinite when the floor is zero or negative."""
    return value / floor if floor > 0 else math.inf
