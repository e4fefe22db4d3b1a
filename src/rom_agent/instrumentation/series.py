"""Counters and histograms for the hot path: plain numbers in dicts, exposed by a collector.

prometheus-client's `Counter` and `Histogram` are made for threads: every `inc` takes a lock,
every `observe` checks its labels, walks the buckets in Python and takes a lock per bucket and
one for the sum. The service updates its series from one event loop, so none of that is
needed; here an increment is a dict update and an observation one `bisect` (in C) and two
additions. prometheus-client still does what it is good at: the registry, the exposition
format and the text parser (`SeriesCollector` turns these into its metric families at scrape
time). See docs/decisions.md, "Metrics on the hot path".

Not thread-safe by design: update them from the event loop only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class CounterSeries:
    """One counter family: a value per label set (`name_total` in the exposition)."""

    __slots__ = ("documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def seed(self, *labels: str) -> None:
        """Create the series at zero, so it is exposed before its first increment."""
        self.values.setdefault(labels, 0.0)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class HistogramCell:
    """The buckets and the sum of one label set. `counts[i]` holds the observations whose
    first upper bound at or above them is `bounds[i]` (the last slot is `+Inf`)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class HistogramSeries:
    """One histogram family with fixed upper bounds (`le` is inclusive, as Prometheus says)."""

    __slots__ = ("bounds", "cells", "documentation", "labelnames", "name")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.cells: dict[Labels, HistogramCell] = {}

    def cell(self, *labels: str) -> HistogramCell:
        """The cell of one label set (created empty the first time)."""
        cell = self.cells.get(labels)
        if cell is None:
            cell = self.cells[labels] = HistogramCell(self.bounds)
        return cell

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(_le(b) for b in self.bounds), "+Inf"]
        for labels, cell in self.cells.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for edge, count in zip(edges, cell.counts, strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(labels, buckets, cell.total)
        return family


Series = CounterSeries | HistogramSeries


class SeriesCollector(Collector):
    """Exposes a fixed list of series through a prometheus-client registry."""

    def __init__(self, series: Sequence[Series]) -> None:
        self._series = tuple(series)

    def collect(self) -> Iterator[Metric]:
        for one in self._series:
            yield one.family()


def _le(bound: float) -> str:
    """An upper bound as prometheus-client writes it (`1.0`, `0.005`, `+Inf`)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # untyped upstream
    return text
