"""Confidence intervals and verdicts from the repetitions.

Every repetition of the interleaved timing runs each contender once, so sample i of one contender
and sample i of another were taken moments apart, under the same machine load. A speed-up's interval
therefore comes from a *paired* bootstrap: resample repetition indices with replacement, take the
ratio of the two medians on each resample, and read the 2.5th and 97.5th percentiles. Between two
runs (``--compare``) the samples are not paired and are resampled independently.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    ratio: float  # the point estimate: median(numerator) / median(denominator)
    low: float
    high: float

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width relative to the ratio: 0.05 means about +-5%."""
        return (self.high - self.low) / (2 * self.ratio) if self.ratio > 0 else float("inf")

    def verdict(self, above: str = "wins", below: str = "loses") -> str:
        """``above`` when the whole interval is above 1.0, ``below`` when it is below, else inconclusive."""
        if self.low > 1.0:
            return above
        if self.high < 1.0:
            return below
        return "inconclusive"


def _quantiles(ratios: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    lo, hi = np.quantile(ratios, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_ratio(numerator: list[float], denominator: list[float], seed: int = 0) -> Interval:
    """Interval of median(numerator) / median(denominator) for samples taken in the same repetitions."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    n = min(len(num), len(den))
    if n == 0:
        raise ValueError("paired_ratio: no samples")
    num, den = num[:n], den[:n]
    point = float(np.median(num) / np.median(den))
    if n < 3:
        return Interval(point, 0.0, float("inf"))  # too few repetitions to say anything
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    ratios = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)
    return Interval(point, *_quantiles(ratios))


def independent_ratio(numerator: list[float], denominator: list[float], seed: int = 0) -> Interval:
    """Interval of median(numerator) / median(denominator) for samples from two separate runs."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    if len(num) == 0 or len(den) == 0:
        raise ValueError("independent_ratio: no samples")
    point = float(np.median(num) / np.median(den))
    if len(num) < 3 or len(den) < 3:
        return Interval(point, 0.0, float("inf"))
    rng = np.random.default_rng(seed)
    a = np.median(num[rng.integers(0, len(num), size=(RESAMPLES, len(num)))], axis=1)
    b = np.median(den[rng.integers(0, len(den), size=(RESAMPLES, len(den)))], axis=1)
    return Interval(point, *_quantiles(a / b))
