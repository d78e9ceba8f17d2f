"""The statistics behind the Fashion-MNIST report's verdicts: mean ± std over seeds, the study's one criterion
(a difference counts when it is more than 2 spreads), and a least-squares slope per doubling of K. Numbers in,
numbers and verdicts out; report.py puts them into words."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def margin(a: list[float], b: list[float]) -> tuple[float, float]:
    """How far a's mean is above b's, and the larger of the two standard deviations to judge it by."""
    return statistics.mean(a) - statistics.mean(b), max(statistics.stdev(a), statistics.stdev(b))


def beyond(diff: float, spread: float) -> bool:
    """The criterion every verdict uses: `diff` is more than 2 spreads above zero (a spread is a std over seeds
    or the standard error of a slope)."""
    return diff > 2 * spread


def past_zero(values: list[float], sign: int) -> bool:
    """Whether the mean of `values` is past zero in the direction of `sign` (+1 or -1) by more than 2 std."""
    return beyond(sign * statistics.mean(values), statistics.stdev(values))


def log2_slope(points: list[tuple[int, float]]):
    """Least-squares slope of y per doubling of K over (K, y) points, with its standard error and the number of
    points; None before 3 values of K."""
    if len({k for k, _ in points}) < 3:
        return None
    x, y = [math.log2(k) for k, _ in points], [v for _, v in points]
    slope, intercept = statistics.linear_regression(x, y)
    residual = sum((yi - intercept - slope * xi) ** 2 for xi, yi in zip(x, y)) / (len(x) - 2)
    return slope, math.sqrt(residual / sum((xi - statistics.mean(x)) ** 2 for xi in x)), len(points)


def trend(slope: float, se: float) -> int:
    """-1 if the slope falls by more than 2 standard errors, +1 if it rises by more, else 0."""
    if not beyond(abs(slope), se):
        return 0
    return -1 if slope < 0 else 1


def relative_size(a: float, b: float) -> str:
    """How slope `a` compares with slope `b`: "opposite" (not the same sign), "smaller" (under half of b),
    "larger" (over twice b) or "similar"."""
    if a * b <= 0:
        return "opposite"
    if abs(a) < abs(b) / 2:
        return "smaller"
    if abs(a) > 2 * abs(b):
        return "larger"
    return "similar"
