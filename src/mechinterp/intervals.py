"""Confidence intervals every stage's statistics share: percentile bootstrap intervals and their
resamples, Wilson intervals of a share and Newcombe's of a difference of shares. Pure functions of
arrays and counts."""

from __future__ import annotations

import math

import numpy as np


def prompt_resamples(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of prompt indices [n_boot, n_prompts], shared by every unit (paired)."""
    return np.random.default_rng(seed).integers(0, n_prompts, (n_boot, n_prompts))


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite samples; NaNs when fewer than half are finite."""
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0 or 2 * len(finite) < len(samples):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a share."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.959964, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def share_difference_interval(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """95% interval of the difference of two independent shares, a - b: Newcombe's hybrid score
    interval (his method 10, 1998), built from each share's Wilson interval. NaN when either n is 0."""
    if n_a == 0 or n_b == 0:
        return float("nan"), float("nan")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    (low_a, high_a), (low_b, high_b) = wilson_interval(successes_a, n_a), wilson_interval(successes_b, n_b)
    difference = p_a - p_b
    return (difference - math.hypot(p_a - low_a, high_b - p_b), difference + math.hypot(high_a - p_a, p_b - low_b))
