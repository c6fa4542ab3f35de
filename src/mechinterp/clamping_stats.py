"""The clamping stage's statistics, on its effects table: per unit, per concept against each
baseline, and across concepts (the verdict). Pure functions of tables; the clamping stage calls them.

Effects table: one row per (concept, site, unit_kind, selection, strength, prompt) with at least
`relative_effect` (change in log-probability of the concept's tokens minus that of frequency-matched
control tokens, nats) and `kl` (KL from the clean next-token distribution, nats).

Every interval is a 95% percentile bootstrap over prompts (the same resampled prompts for every unit,
so differences between units are paired), or over concepts for the cross-concept statistics.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

UNIT_KEYS = ["concept", "site", "unit_kind", "selection", "unit"]
FEATURE_SELECTIONS = ("input", "output")
BASELINES = (("neuron", "output"), ("correlated_neuron", ""), ("diffmean", ""), ("random", ""))
COMPARED_KL = 0.1  # the damage at which features and baselines are compared


def kl_column(level: float, direction: str = "up") -> str:
    return f"effect_{direction}_at_kl_{level:g}" if direction == "down" else f"effect_at_kl_{level:g}"


def effects_at_kl(kl: np.ndarray, effect: np.ndarray, level: float) -> np.ndarray:
    """For each column of curves kl, effect [n_points, n_curves]: the effect at KL = `level`,
    interpolated linearly in log KL along the points sorted by KL, the unclamped model (KL 0,
    effect 0) included; NaN where `level` is beyond the largest KL of the curve."""
    kl = np.concatenate([np.zeros((1, kl.shape[1])), kl])
    effect = np.concatenate([np.zeros((1, effect.shape[1])), effect])
    order = np.argsort(kl, axis=0, kind="stable")
    log_kl = np.log(np.maximum(np.take_along_axis(kl, order, 0), 1e-12))
    effect = np.take_along_axis(effect, order, 0)
    target = np.log(level)
    below = np.clip((log_kl <= target).sum(0) - 1, 0, len(log_kl) - 2)
    x0, x1 = (np.take_along_axis(log_kl, (below + i)[None], 0)[0] for i in (0, 1))
    y0, y1 = (np.take_along_axis(effect, (below + i)[None], 0)[0] for i in (0, 1))
    # two points at the same KL (the level itself, or the 1e-12 floor) leave no segment: take the later one
    fraction = np.divide(target - x0, x1 - x0, out=np.ones_like(x0), where=x1 > x0)
    at = y0 + (y1 - y0) * np.clip(fraction, 0, 1)
    return np.where(log_kl[-1] >= target, at, np.nan)


def effect_at_kl(kl: np.ndarray, effect: np.ndarray, level: float) -> float:
    """The effect at KL = `level` along one curve of points kl, effect [n_points] (see effects_at_kl).

    >>> effect_at_kl(np.array([0.01, 0.1, 1.0]), np.array([0.0, 0.5, 2.0]), 0.1)
    0.5
    """
    return float(effects_at_kl(kl[:, None], effect[:, None], level)[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation through polars (average ranks for ties); NaN when either is constant."""
    return pl.DataFrame({"x": x, "y": y}).select(pl.corr("x", "y", method="spearman")).item()


def prompt_resamples(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of prompt indices [n_boot, n_prompts], shared by every unit (paired)."""
    return np.random.default_rng(seed).integers(0, n_prompts, (n_boot, n_prompts))


def unit_curves(effects: pl.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per unit (UNIT_KEYS): strengths [S], relative effects [S, P] and KL [S, P] (prompts in order)."""
    curves = {}
    ordered = effects.sort([*UNIT_KEYS, "strength", "prompt"])
    for key, group in ordered.group_by(UNIT_KEYS, maintain_order=True):
        strengths = np.unique(group["strength"].to_numpy())
        shape = (len(strengths), -1)
        curves[key] = (strengths, group["relative_effect"].to_numpy().reshape(shape),
                       group["kl"].to_numpy().reshape(shape))
    return curves


def directional(strengths: np.ndarray, effect: np.ndarray, kl: np.ndarray, level: float, direction: str) -> np.ndarray:
    """The effect at KL `level` when raising (strengths > 0) or lowering (strengths < 0) the unit, for
    curves effect, kl [S] or [S, n_curves]."""
    chosen = strengths > 0 if direction == "up" else strengths < 0
    columns = effect.ndim == 1
    effect, kl = (effect[:, None], kl[:, None]) if columns else (effect, kl)
    at = effects_at_kl(kl[chosen], effect[chosen], level)
    return float(at[0]) if columns else at


def bootstrap_at_kl(strengths: np.ndarray, effect: np.ndarray, kl: np.ndarray, level: float, direction: str,
                    resamples: np.ndarray) -> np.ndarray:
    """The directional effect at KL `level` under each prompt resample [n_boot], from the unit's
    effects and KL per strength and prompt [S, P]."""
    return directional(strengths, effect[:, resamples].mean(-1), kl[:, resamples].mean(-1), level, direction)


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite samples; NaNs when fewer than half are finite."""
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0 or 2 * len(finite) < len(samples):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def summarise(effects: pl.DataFrame, levels: list[float], n_boot: int, seed: int
              ) -> tuple[pl.DataFrame, dict[tuple, dict[float, np.ndarray]]]:
    """One row per unit: Spearman of the mean relative effect with strength (all strengths, and the
    raising and lowering halves), the effect at each KL level raising the unit (with its bootstrap
    CI over prompts) and lowering it, the largest KL and effects. Also returns each unit's bootstrap
    samples of the raising effect at each level, for paired comparisons."""
    curves = unit_curves(effects)
    n_prompts = next(iter(curves.values()))[1].shape[1]
    resamples = prompt_resamples(n_prompts, n_boot, seed)
    rows, samples = [], {}
    for key, (strengths, effect, kl) in curves.items():
        mean_effect, mean_kl = effect.mean(1), kl.mean(1)
        row = dict(zip(UNIT_KEYS, key, strict=True))
        row["spearman_relative"] = spearman(strengths, mean_effect)
        row["spearman_up"] = spearman(strengths[strengths >= 0], mean_effect[strengths >= 0])
        row["spearman_down"] = spearman(strengths[strengths <= 0], mean_effect[strengths <= 0])
        samples[key] = {}
        for level in levels:
            up = directional(strengths, mean_effect, mean_kl, level, "up")
            boot = bootstrap_at_kl(strengths, effect, kl, level, "up", resamples)
            samples[key][level] = boot
            low, high = percentile_ci(boot)
            row.update({kl_column(level): up, f"{kl_column(level)}_ci_low": low, f"{kl_column(level)}_ci_high": high})
            down_boot = bootstrap_at_kl(strengths, effect, kl, level, "down", resamples)
            low, high = percentile_ci(down_boot)
            row.update({kl_column(level, "down"): directional(strengths, mean_effect, mean_kl, level, "down"),
                        f"{kl_column(level, 'down')}_ci_low": low, f"{kl_column(level, 'down')}_ci_high": high})
        row.update(max_kl=float(mean_kl.max()), max_relative_effect=float(mean_effect.max()),
                   min_relative_effect=float(mean_effect.min()), n_prompts=n_prompts)
        rows.append(row)
    return pl.DataFrame(rows), samples


def compare_to_baselines(summary: pl.DataFrame, samples: dict[tuple, dict[float, np.ndarray]], level: float
                         ) -> pl.DataFrame:
    """Per concept and site, each feature (input- and output-selected) against each baseline at equal
    damage: the difference of their raising effects at KL `level` and its paired bootstrap CI over
    prompts; `beats` when the CI lies above zero."""
    column = kl_column(level)
    rows = []
    index = {tuple(r[k] for k in UNIT_KEYS): r for r in summary.iter_rows(named=True)}
    by_concept: dict[tuple[str, str], dict[tuple[str, str], tuple]] = {}
    for key in index:
        concept, site, kind, selection, _ = key
        by_concept.setdefault((concept, site), {})[(kind, selection)] = key
    for (concept, site), units in sorted(by_concept.items()):
        for selection in FEATURE_SELECTIONS:
            feature = units.get(("feature", selection))
            if feature is None:
                continue
            for baseline_kind, baseline_selection in BASELINES:
                baseline = units.get((baseline_kind, baseline_selection))
                if baseline is None:
                    continue
                diff = index[feature][column] - index[baseline][column]
                low, high = percentile_ci(samples[feature][level] - samples[baseline][level])
                rows.append({"concept": concept, "site": site, "feature_selection": selection, "feature": feature[4],
                             "baseline": baseline_kind, "baseline_unit": baseline[4], "kl": level,
                             "feature_effect": index[feature][column], "baseline_effect": index[baseline][column],
                             "difference": diff, "ci_low": low, "ci_high": high,
                             "beats": bool(low > 0) if not math.isnan(low) else None})
    return pl.DataFrame(rows, schema_overrides={"beats": pl.Boolean, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                                "difference": pl.Float64})


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


def sign_flip_p_value(differences: np.ndarray, n_flips: int, seed: int) -> float:
    """Two-sided paired test of mean(differences) = 0 by random sign flips (exact when 2^n <= n_flips)."""
    n = len(differences)
    if n == 0:
        return float("nan")
    observed = abs(differences.mean())
    if 2**n <= n_flips:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(n_flips, n))
    flipped = np.abs((signs * differences).mean(1))
    return float((flipped >= observed - 1e-12).mean())


def verdict(summary: pl.DataFrame, comparisons: pl.DataFrame, monotone_threshold: float, n_boot: int, seed: int
            ) -> pl.DataFrame:
    """Across the concepts of each site, for each feature selection: the share of concepts the feature
    moves monotonically (Spearman over strengths >= `monotone_threshold`), up (raising effect at KL 0.1
    with CI above 0) and down (lowering effect with CI below 0), with Wilson CIs; and against each
    baseline, the share of concepts where the feature beats it, the mean difference at equal KL with
    a bootstrap CI over concepts, and a sign-flip test of that mean."""
    rows = []
    up, down = kl_column(COMPARED_KL), kl_column(COMPARED_KL, "down")
    for (site, selection), group in summary.filter(pl.col("unit_kind") == "feature").group_by(
            "site", "selection", maintain_order=True):
        n = group.height  # group_by makes no empty group
        shares = {"monotone": int((group["spearman_relative"].fill_nan(None).fill_null(-2) >= monotone_threshold).sum()),
                  "raises_concept": int((group[f"{up}_ci_low"].fill_nan(None).fill_null(-1) > 0).sum()),
                  "lowers_concept": int((group[f"{down}_ci_high"].fill_nan(None).fill_null(1) < 0).sum())}
        for statistic, count in shares.items():
            low, high = wilson_interval(count, n)
            rows.append({"site": site, "feature_selection": selection, "statistic": statistic, "baseline": "",
                         "n_concepts": n, "value": count / n, "ci_low": low, "ci_high": high,
                         "p_value": None})
        for baseline, _ in BASELINES:
            pairs = comparisons.filter((pl.col("site") == site) & (pl.col("feature_selection") == selection)
                                       & (pl.col("baseline") == baseline))
            measured = pairs.filter(pl.col("difference").is_not_nan() & pl.col("difference").is_not_null())
            diffs = measured["difference"].to_numpy()
            beats = int(measured["beats"].fill_null(False).sum())
            low, high = wilson_interval(beats, len(diffs))
            rows.append({"site": site, "feature_selection": selection, "statistic": "beats", "baseline": baseline,
                         "n_concepts": len(diffs), "value": beats / len(diffs) if len(diffs) else float("nan"),
                         "ci_low": low, "ci_high": high, "p_value": None})
            means = np.random.default_rng(seed).choice(diffs, (n_boot, len(diffs))).mean(1) if len(diffs) else diffs
            low, high = percentile_ci(means) if len(diffs) else (float("nan"), float("nan"))
            rows.append({"site": site, "feature_selection": selection, "statistic": "mean_difference",
                         "baseline": baseline, "n_concepts": len(diffs),
                         "value": float(diffs.mean()) if len(diffs) else float("nan"), "ci_low": low, "ci_high": high,
                         "p_value": sign_flip_p_value(diffs, 10_000, seed)})
    return pl.DataFrame(rows, schema_overrides={"p_value": pl.Float64, "value": pl.Float64, "ci_low": pl.Float64,
                                                "ci_high": pl.Float64})


def mean_effects(effects: pl.DataFrame) -> pl.DataFrame:
    """Mean effects over prompts, one row per unit (UNIT_KEYS) and strength, sorted by those keys:
    the means of concept_logprob_change, control_logprob_change, relative_effect and kl."""
    return (effects.group_by(*UNIT_KEYS, "strength")
            .agg(pl.col("concept_logprob_change", "control_logprob_change", "relative_effect", "kl").mean())
            .sort(*UNIT_KEYS, "strength"))


def continuation_table(continuations: pl.DataFrame) -> pl.DataFrame:
    """The continuations side by side: one row per (concept, selection, prompt_text, strength), sorted by
    those, with the greedy and sampled texts and the perplexity of each under the clean model."""
    keys = ["concept", "selection", "prompt_text", "strength"]
    return (continuations.pivot(on="mode", index=keys, values=["continuation", "perplexity"])
            .rename({"continuation_greedy": "greedy", "continuation_sampled": "sampled"})
            .select(*keys, "greedy", "sampled", "perplexity_greedy", "perplexity_sampled")
            .sort(keys))


def grid_concepts(summary: pl.DataFrame, site: str, n_sampled: int) -> list[str]:
    """The concepts of the effect grids at one site: the named ones (the study's suspicion example first),
    then the `n_sampled` sampled concepts whose input feature moves its concept most at KL 0.1."""
    at_site = summary.filter(pl.col("site") == site)
    named = at_site.filter(pl.col("named"))["concept"].unique(maintain_order=True).to_list()
    named.sort(key=lambda c: (not c.startswith("list:"), c))
    strongest = (at_site.filter(~pl.col("named") & (pl.col("unit_kind") == "feature") & (pl.col("selection") == "input"))
                 .sort(kl_column(COMPARED_KL), descending=True, nulls_last=True)["concept"].to_list())
    return named + strongest[:n_sampled]


def unit_label(unit_kind: str, selection: str) -> str:
    """How a unit is named in the figures: `feature (input)`, `neuron (output)`, `diffmean`, ..."""
    return f"{unit_kind} ({selection})" if selection else unit_kind
