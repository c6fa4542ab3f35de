"""The clamping stage's statistics, on its effects table: per unit, per concept against each
baseline, and across concepts (the verdict). Pure functions of tables; the clamping stage calls them.

Effects table: one row per (concept, site, unit_kind, selection, unit, strength, prompt) with at least
`relative_effect` (change in log-probability of the concept's tokens minus that of frequency-matched
control tokens, nats) and `kl` (KL from the clean next-token distribution, nats). Each unit has its own
strengths, chosen so that its measured KL brackets every level (see clamping.bracketing_strengths).

- **Effect at a KL level**: interpolated linearly in log KL between the two measured points of the
  raising (strength > 0) or lowering (strength < 0) half that bracket the level; NaN when no two do
  (the level is below the smallest KL measured or above the largest): never extrapolated, never read
  off the clean model.
- **Per unit**: a 95% percentile bootstrap over prompts, the same resampled prompts for every unit,
  so differences between units at the same site are paired.
- **Across concepts** (the verdict): a hierarchical bootstrap, concepts resampled within each prompt
  resample (all concepts share the prompts), with a two-sided bootstrap p-value; the claims of a family
  (a site's real concepts) are corrected for multiplicity: Holm's adjusted p-values, and Bonferroni
  intervals (level 1 - 0.05 / m) from which the claims' verdicts are read.
- **Placebo concepts** (random word sets frequency-matched to real ones) go through the same selection
  and measurement: every cross-concept statistic is also computed over them, its null.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from mechinterp.intervals import percentile_ci, prompt_resamples, wilson_interval

UNIT_KEYS = ["concept", "site", "unit_kind", "selection", "unit"]
FEATURE_SELECTIONS = ("input", "output")
SAME_SELECTION = "same"  # a baseline chosen for the feature it is compared with (its correlated neuron)
POOL, POOL_MEAN, BEST_OF_POOL = "pool", "pool_mean", "best_of_pool"  # the random features' selections
# (baseline, its unit_kind, its selection)
BASELINES = (("neuron", "neuron", "output"), ("correlated_neuron", "correlated_neuron", SAME_SELECTION),
             ("diffmean", "diffmean", ""), ("random", "random", POOL_MEAN), ("best_random", "random", BEST_OF_POOL))
COMPARED_KL = 0.1  # the damage at which features and baselines are compared
FAMILY_ALPHA = 0.05  # the family-wise error rate of a site's clamping claims
CONCEPT_DRAWS = 10  # concept resamples per prompt resample in the hierarchical bootstrap


def kl_column(level: float, direction: str = "up") -> str:
    return f"effect_{direction}_at_kl_{level:g}" if direction == "down" else f"effect_at_kl_{level:g}"


def effects_at_kl(kl: np.ndarray, effect: np.ndarray, level: float) -> np.ndarray:
    """For each column of curves kl, effect [n_points, n_curves]: the effect at KL = `level`,
    interpolated linearly in log KL between the two measured points (sorted by KL) that bracket it;
    NaN where `level` is below the smallest KL of the curve or above the largest (not bracketed)."""
    order = np.argsort(kl, axis=0, kind="stable")
    log_kl = np.log(np.maximum(np.take_along_axis(kl, order, 0), 1e-12))
    effect = np.take_along_axis(effect, order, 0)
    target = np.log(level)
    bracketed = (log_kl[0] <= target) & (target <= log_kl[-1])
    if len(log_kl) == 1:
        return np.where(bracketed, effect[0], np.nan)
    below = np.clip((log_kl <= target).sum(0) - 1, 0, len(log_kl) - 2)
    x0, x1 = (np.take_along_axis(log_kl, (below + i)[None], 0)[0] for i in (0, 1))
    y0, y1 = (np.take_along_axis(effect, (below + i)[None], 0)[0] for i in (0, 1))
    # two points at the same KL (the level itself) leave no segment: take the later one
    fraction = np.divide(target - x0, x1 - x0, out=np.ones_like(x0), where=x1 > x0)
    at = y0 + (y1 - y0) * np.clip(fraction, 0, 1)
    return np.where(bracketed, at, np.nan)


def effect_at_kl(kl: np.ndarray, effect: np.ndarray, level: float) -> float:
    """The effect at KL = `level` along one curve of points kl, effect [n_points] (see effects_at_kl).

    >>> effect_at_kl(np.array([0.01, 0.1, 1.0]), np.array([0.0, 0.5, 2.0]), 0.1)
    0.5
    """
    return float(effects_at_kl(kl[:, None], effect[:, None], level)[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation through polars (average ranks for ties); NaN when either is constant."""
    return pl.DataFrame({"x": x, "y": y}).select(pl.corr("x", "y", method="spearman")).item()


def unit_curves(effects: pl.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per unit (UNIT_KEYS): strengths [S], relative effects [S, P] and KL [S, P] (prompts in order); a
    strength measured twice (an aimed strength at the probe's, or two capped at the largest) counts once."""
    curves = {}
    ordered = (effects.group_by(*UNIT_KEYS, "strength", "prompt").agg(pl.col("relative_effect", "kl").mean())
               .sort([*UNIT_KEYS, "strength", "prompt"]))
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


Samples = dict[tuple, dict[tuple[float, str], np.ndarray]]  # unit key -> (level, direction) -> [n_boot]


def summarise(effects: pl.DataFrame, levels: list[float], n_boot: int, seed: int) -> tuple[pl.DataFrame, Samples]:
    """One row per unit: Spearman of the mean relative effect with strength (all strengths, and the
    raising and lowering halves), the effect at each KL level raising the unit (with its bootstrap
    CI over prompts) and lowering it, the largest KL and effects. Also returns each unit's bootstrap
    samples of both effects at each level, for paired comparisons."""
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
            for direction in ("up", "down"):
                boot = bootstrap_at_kl(strengths, effect, kl, level, direction, resamples)
                samples[key][(level, direction)] = boot
                low, high = percentile_ci(boot)
                column = kl_column(level, direction)
                row.update({column: directional(strengths, mean_effect, mean_kl, level, direction),
                            f"{column}_ci_low": low, f"{column}_ci_high": high})
        row.update(max_kl=float(mean_kl.max()), max_relative_effect=float(mean_effect.max()),
                   min_relative_effect=float(mean_effect.min()), n_prompts=n_prompts)
        rows.append(row)
    return pl.DataFrame(rows), samples


def nan_mean(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean of the finite values along `axis`; NaN where there is none (and no RuntimeWarning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis)
    total = np.where(finite, values, 0.0).sum(axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def pool_summary(summary: pl.DataFrame, samples: Samples, levels: list[float]) -> tuple[pl.DataFrame, Samples]:
    """Each concept's pool of random features (selection `pool`) as two baseline rows: `pool_mean`,
    the pool's mean effect at each level (NaN members left out) with the bootstrap of that mean, its
    other numeric columns averaged; and `best_of_pool`, the member with the best output score for the
    concept, the output selection's own control. The members' rows leave the summary (their curves
    stay in the effects table); their samples stay for the new rows' comparisons."""
    members = summary.filter(pl.col("selection") == POOL)
    rows = []
    numeric = [c for c, t in members.schema.items() if t.is_numeric() and c not in UNIT_KEYS]
    for (concept, site), group in members.group_by("concept", "site", maintain_order=True):
        keys = [tuple(r[k] for k in UNIT_KEYS) for r in group.iter_rows(named=True)]
        mean = group.select(pl.col(numeric).fill_nan(None).mean()).row(0, named=True)
        mean.update({c: group[c][0] for c in group.columns if c not in numeric and c not in UNIT_KEYS})
        mean_key = (concept, site, "random", POOL_MEAN, -1)
        mean.update(dict(zip(UNIT_KEYS, mean_key, strict=True)))
        samples[mean_key] = {}
        for level in levels:
            for direction in ("up", "down"):
                column = kl_column(level, direction)
                boot = nan_mean(np.stack([samples[k][(level, direction)] for k in keys]), 0)
                samples[mean_key][(level, direction)] = boot
                mean[column] = float(nan_mean(group[column].fill_null(np.nan).to_numpy(), 0))
                mean[f"{column}_ci_low"], mean[f"{column}_ci_high"] = percentile_ci(boot)
        best = group.sort("output_score", descending=True, nulls_last=True).row(0, named=True)
        best_key = (concept, site, "random", BEST_OF_POOL, best["unit"])
        samples[best_key] = samples[tuple(best[k] for k in UNIT_KEYS)]
        rows += [mean, {**best, "selection": BEST_OF_POOL}]
    pooled = pl.DataFrame(rows, schema=summary.schema) if rows else summary.clear()
    return pl.concat([summary.filter(pl.col("selection") != POOL), pooled]), samples


def baseline_key(units: dict[tuple[str, str], tuple], selection: str, kind: str, baseline_selection: str
                 ) -> tuple | None:
    """The unit key of a baseline among a concept's units {(unit_kind, selection): key}, for the
    feature of `selection` (SAME_SELECTION: the baseline chosen for that feature)."""
    return units.get((kind, selection if baseline_selection == SAME_SELECTION else baseline_selection))


def compare_to_baselines(summary: pl.DataFrame, samples: Samples, level: float) -> pl.DataFrame:
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
            for name, kind, baseline_selection in BASELINES:
                baseline = baseline_key(units, selection, kind, baseline_selection)
                if baseline is None:
                    continue
                diff = index[feature][column] - index[baseline][column]
                low, high = percentile_ci(samples[feature][(level, "up")] - samples[baseline][(level, "up")])
                rows.append({"concept": concept, "site": site, "feature_selection": selection, "feature": feature[4],
                             "baseline": name, "baseline_unit": baseline[4], "kl": level,
                             "feature_effect": index[feature][column], "baseline_effect": index[baseline][column],
                             "difference": diff, "ci_low": low, "ci_high": high,
                             "beats": bool(low > 0) if not math.isnan(low) else None})
    return pl.DataFrame(rows, schema_overrides={"beats": pl.Boolean, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                                "difference": pl.Float64, "feature_effect": pl.Float64,
                                                "baseline_effect": pl.Float64})


def hierarchical_means(per_concept: np.ndarray, rng: np.random.Generator, draws: int = CONCEPT_DRAWS) -> np.ndarray:
    """Bootstrap means over concepts and prompts: `per_concept` [n_concepts, n_boot] holds each concept's
    statistic under the shared prompt resamples; each prompt resample gets `draws` resamples of the
    concepts. Returns [n_boot * draws] means (NaN entries left out of each mean)."""
    n_concepts, n_boot = per_concept.shape
    picks = rng.integers(0, n_concepts, (n_boot, draws, n_concepts))
    return nan_mean(per_concept.T[np.arange(n_boot)[:, None, None], picks], 2).ravel()


def bootstrap_p_value(means: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a mean = 0: twice the smaller share of finite means on either side
    of zero, (count + 1) / (n + 1) so it is never 0; NaN without a finite mean."""
    finite = means[np.isfinite(means)]
    if len(finite) == 0:
        return float("nan")
    tail = min((finite <= 0).sum(), (finite >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (len(finite) + 1)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = round(running, 12)
    return adjusted


def concept_groups(summary: pl.DataFrame) -> list[tuple[str, list[str]]]:
    """The real concepts and the placebo concepts of a site's summary, each in order of first appearance."""
    groups = []
    for name, placebo in (("real", False), ("placebo", True)):
        concepts = summary.filter(pl.col("placebo") == placebo)["concept"].unique(maintain_order=True).to_list()
        if concepts:
            groups.append((name, concepts))
    return groups


def verdict(summary: pl.DataFrame, comparisons: pl.DataFrame, samples: Samples, monotone_threshold: float,
            seed: int) -> pl.DataFrame:
    """Across the concepts of each site, for each feature selection, over the real concepts and over the
    placebo concepts apart (`concepts`): the share of concepts the feature moves monotonically (Spearman
    over strengths >= `monotone_threshold`), up (raising effect at KL 0.1 with CI above 0) and down
    (lowering effect with CI below 0), with Wilson intervals; the mean effect at KL 0.1 (`effect`); and
    against each baseline the mean difference at equal KL. Means carry a hierarchical bootstrap interval
    (concepts and prompts) and p-value; with placebo concepts, `effect_beyond_placebo` is the real
    concepts' mean effect minus the placebos'. Within each family (site, concepts) the tests (the mean
    differences and the effect beyond placebo) get Holm-adjusted p-values (`p_holm`) and Bonferroni
    intervals at level 1 - FAMILY_ALPHA / m (`family_ci_low`, `family_ci_high`)."""
    rng = np.random.default_rng(seed)
    up, down = kl_column(COMPARED_KL), kl_column(COMPARED_KL, "down")
    rows, boots = [], []
    features = summary.filter(pl.col("unit_kind") == "feature")
    for site in summary["site"].unique(maintain_order=True).to_list():
        at_site = features.filter(pl.col("site") == site)
        groups = concept_groups(at_site)
        for selection in FEATURE_SELECTIONS:
            chosen = at_site.filter(pl.col("selection") == selection)
            if chosen.height == 0:
                continue
            feature_boot = {}
            for group, concepts in groups:
                part = chosen.filter(pl.col("concept").is_in(concepts))
                n = part.height
                base = {"site": site, "feature_selection": selection, "concepts": group, "n_concepts": n,
                        "family_ci_low": None, "family_ci_high": None, "p_value": None, "p_holm": None}
                shares = {"monotone": int((part["spearman_relative"].fill_nan(None).fill_null(-2)
                                           >= monotone_threshold).sum()),
                          "raises_concept": int((part[f"{up}_ci_low"].fill_nan(None).fill_null(-1) > 0).sum()),
                          "lowers_concept": int((part[f"{down}_ci_high"].fill_nan(None).fill_null(1) < 0).sum())}
                for statistic, count in shares.items():
                    low, high = wilson_interval(count, n)
                    rows.append({**base, "statistic": statistic, "baseline": "", "value": count / n,
                                 "ci_low": low, "ci_high": high})
                    boots.append(None)
                keys = [tuple(r[k] for k in UNIT_KEYS) for r in part.iter_rows(named=True)]
                per_concept = np.stack([samples[k][(COMPARED_KL, "up")] for k in keys])
                feature_boot[group] = per_concept
                rows.append({**base, "statistic": "effect", "baseline": "", "n_concepts": int(part[up].is_not_nan().sum()),
                             "value": float(nan_mean(part[up].fill_null(np.nan).to_numpy(), 0))})
                boots.append(hierarchical_means(per_concept, rng))
                pairs = comparisons.filter((pl.col("site") == site) & (pl.col("feature_selection") == selection)
                                           & pl.col("concept").is_in(concepts))
                for name, _, _ in BASELINES:
                    measured = pairs.filter((pl.col("baseline") == name) & pl.col("difference").is_not_nan()
                                            & pl.col("difference").is_not_null())
                    per_concept = np.stack([differences(samples, r) for r in measured.iter_rows(named=True)]
                                           ) if measured.height else np.full((0, 0), np.nan)
                    rows.append({**base, "statistic": "mean_difference", "baseline": name,
                                 "n_concepts": measured.height,
                                 "value": float(measured["difference"].mean()) if measured.height else float("nan")})
                    boots.append(hierarchical_means(per_concept, rng) if measured.height else np.array([np.nan]))
            if len(feature_boot) == 2:
                real, placebo = (feature_boot[g] for g in ("real", "placebo"))
                value = [r["value"] for r in rows if r["site"] == site and r["feature_selection"] == selection
                         and r["statistic"] == "effect"]
                rows.append({"site": site, "feature_selection": selection, "concepts": "real", "statistic":
                             "effect_beyond_placebo", "baseline": "placebo", "n_concepts": len(real),
                             "value": value[0] - value[1]})
                boots.append(hierarchical_means(real, rng) - hierarchical_means(placebo, rng))
    for row, boot in zip(rows, boots, strict=True):
        if boot is not None:
            row["ci_low"], row["ci_high"] = percentile_ci(boot)
            row["p_value"] = bootstrap_p_value(boot)
    tested = {"mean_difference", "effect_beyond_placebo"}
    families: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        if row["statistic"] in tested and not math.isnan(row["p_value"]):
            families.setdefault((row["site"], row["concepts"]), []).append(i)
    for members in families.values():
        for i, adjusted in zip(members, holm([rows[i]["p_value"] for i in members]), strict=True):
            rows[i]["p_holm"] = adjusted
            finite = boots[i][np.isfinite(boots[i])]
            tail = 100 * FAMILY_ALPHA / len(members) / 2
            rows[i]["family_ci_low"], rows[i]["family_ci_high"] = (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
    columns = ["site", "feature_selection", "concepts", "statistic", "baseline", "n_concepts", "value", "ci_low",
               "ci_high", "family_ci_low", "family_ci_high", "p_value", "p_holm"]
    return pl.DataFrame([{c: row.get(c) for c in columns} for row in rows],
                        schema={"site": pl.Utf8, "feature_selection": pl.Utf8, "concepts": pl.Utf8,
                                "statistic": pl.Utf8, "baseline": pl.Utf8, "n_concepts": pl.Int64,
                                **{c: pl.Float64 for c in columns[6:]}})


def differences(samples: Samples, comparison: dict) -> np.ndarray:
    """The bootstrap samples [n_boot] of one comparison row's difference at its KL (raising)."""
    level = comparison["kl"]
    feature = (comparison["concept"], comparison["site"], "feature", comparison["feature_selection"],
               comparison["feature"])
    kind, selection = next((k, s) for name, k, s in BASELINES if name == comparison["baseline"])
    selection = comparison["feature_selection"] if selection == SAME_SELECTION else selection
    baseline = (comparison["concept"], comparison["site"], kind, selection, comparison["baseline_unit"])
    return samples[feature][(level, "up")] - samples[baseline][(level, "up")]


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
    strongest = (at_site.filter(~pl.col("named") & ~pl.col("placebo") & (pl.col("unit_kind") == "feature")
                                & (pl.col("selection") == "input"))
                 .sort(kl_column(COMPARED_KL), descending=True, nulls_last=True)["concept"].to_list())
    return named + strongest[:n_sampled]


def bracketed_shares(summary: pl.DataFrame, levels: list[float]) -> pl.DataFrame:
    """Per site, unit (kind and selection) and KL level: the share of a summary's units whose measured
    KL brackets the level (the effect there is a number, not NaN), raising and lowering."""
    rows = []
    for (site, kind, selection), group in summary.group_by("site", "unit_kind", "selection", maintain_order=True):
        for level in levels:
            for direction in ("up", "down"):
                measured = group[kl_column(level, direction)].fill_null(np.nan).is_not_nan()
                rows.append({"site": site, "unit": unit_label(kind, selection), "kl": level, "direction": direction,
                             "n_units": group.height, "bracketed": float(measured.mean())})
    return pl.DataFrame(rows)


def unit_label(unit_kind: str, selection: str) -> str:
    """How a unit is named in the figures: `feature (input)`, `neuron (output)`, `diffmean`, ..."""
    return f"{unit_kind} ({selection})" if selection else unit_kind
