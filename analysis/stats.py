"""The report's statistics: a metric over notes (``Stat``: mean and sample std) and paired differences
(``PairedDifference``: ``method - reference`` note by note, with the 95% Student t-interval of the mean).
``paired_runs`` pairs any two sets of runs over their shared keys (notes, or seeds across variants); the
report's rows are paired by ``analysis.rows.paired_differences``, the variants and the sweep directly.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

PAIRED_METRICS: tuple[str, ...] = ("top1", "tail")
ABSENT = "—"  # how a table shows a metric without any value: an absent group, never 0
VARIANT_AT = " @ "  # a row in a variant: "FSA offline @ lr05"
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def is_finite_number(value: object) -> bool:
    """An int or float (never a bool) that is finite: what a metric of results.json may hold besides null."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Stat:
    """A metric over notes: mean, sample std (None with fewer than 2 values), n, the values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def t_critical_95(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal quantile, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass
class PairedDifference:
    """``method - reference`` of one metric, note by note (only notes where both have the metric)."""

    method: str
    reference: str
    metric: str
    per_note: dict[str, float]

    @property
    def n(self) -> int:
        return len(self.per_note)

    @property
    def caption(self) -> str:
        """``method − reference (metric)``; one row in two variants as ``row: variant − variant (metric)``."""
        row, at, variant = self.method.rpartition(VARIANT_AT)
        reference_row, _, reference_variant = self.reference.rpartition(VARIANT_AT)
        if at and row == reference_row:
            return f"{row}: {variant} − {reference_variant} ({self.metric})"
        return f"{self.method} − {self.reference} ({self.metric})"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.per_note.values()) if self.per_note else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% t-interval of the mean difference (needs two or more notes)."""
        if self.n < 2:
            return None
        half = t_critical_95(self.n - 1) * statistics.stdev(self.per_note.values()) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def verdict(self) -> str:
        """One sentence a reader can quote."""
        if self.interval is None:
            return "one note only: no interval; run more seeds (--seeds 0 1 2)"
        low, high = self.interval
        if low > 0:
            return f"higher: the interval excludes 0 (+{low:.2f} to +{high:.2f} points)"
        if high < 0:
            return f"lower: the interval excludes 0 ({low:.2f} to {high:.2f} points)"
        return f"no difference shown: the interval includes 0 at n = {self.n}"

    def as_dict(self) -> dict:
        interval = self.interval
        return {"method": self.method, "reference": self.reference, "metric": self.metric, "n": self.n,
                "per_note": self.per_note, "mean": self.mean,
                "ci95": None if interval is None else list(interval),
                "excludes_zero": None if interval is None else (interval[0] > 0 or interval[1] < 0),
                "verdict": self.verdict()}


def paired_runs(method: str, runs: dict[str, dict], reference: str, reference_runs: dict[str, dict]) -> list[PairedDifference]:
    """``method - reference`` for each ``PAIRED_METRICS`` over the pairing keys (notes, or seeds across
    variants) where both runs have that metric; metrics with no such pair are left out."""
    out = []
    for metric in PAIRED_METRICS:
        per_note = {key: float(runs[key][metric]) - float(reference_runs[key][metric])
                    for key in runs if key in reference_runs
                    and is_finite_number(runs[key].get(metric)) and is_finite_number(reference_runs[key].get(metric))}
        if per_note:
            out.append(PairedDifference(method, reference, metric, per_note))
    return out
