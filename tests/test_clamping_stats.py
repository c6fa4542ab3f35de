"""The clamping statistics on planted effects tables with known answers: means, Spearman, the effect at
equal damage and its CI, paired comparisons, the cross-concept verdict, and the tables' schemas."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from mechinterp.clamping_stats import (COMPARED_KL, compare_to_baselines, continuation_table, effect_at_kl,
                                       grid_concepts, mean_effects, sign_flip_p_value, summarise, verdict,
                                       wilson_interval)

STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
UNITS = [("feature", "input", 11), ("feature", "output", 12), ("neuron", "output", 3), ("correlated_neuron", "", 4),
         ("diffmean", "", 0), ("random", "", 99)]


def planted_effects(gains: dict[str, float], n_prompts: int = 12, noise: float = 0.05, seed: int = 0,
                    concepts=("emo:joy", "geo:city", "list:suspicion")) -> pl.DataFrame:
    """Every unit's relative effect is gain x strength (plus noise); KL grows as 0.05 x strength^2, the
    same for every unit, so at equal KL the unit with the larger gain moves its concept more."""
    rng = np.random.default_rng(seed)
    rows = []
    for concept in concepts:
        for kind, selection, unit in UNITS:
            gain = gains.get(kind, 0.0)
            for strength in STRENGTHS:
                for prompt in range(n_prompts):
                    effect = gain * strength + rng.normal(0, noise)
                    rows.append({"concept": concept, "site": "mlp3", "layer": 3, "unit_kind": kind,
                                 "selection": selection, "unit": unit, "strength": strength, "prompt": prompt,
                                 "concept_logprob_change": effect, "control_logprob_change": 0.0,
                                 "relative_effect": effect, "kl": 0.05 * strength**2 + abs(rng.normal(0, 1e-3))})
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)  # order must not matter


def test_effect_at_kl_interpolates_in_log_kl_from_the_clean_model():
    assert effect_at_kl(np.array([0.01, 0.1, 1.0]), np.array([0.0, 0.5, 2.0]), 0.1) == pytest.approx(0.5)
    assert effect_at_kl(np.array([0.01, 1.0]), np.array([0.0, 2.0]), 0.1) == pytest.approx(1.0)
    assert math.isnan(effect_at_kl(np.array([0.01, 0.05]), np.array([0.0, 2.0]), 0.1))  # beyond the damage measured
    # below the first strength the curve runs from the unclamped model (KL 0, effect 0)
    assert 0 < effect_at_kl(np.array([0.2, 1.0]), np.array([1.0, 2.0]), 0.1) < 1.0


def test_mean_effects_equal_direct_means_over_prompts():
    effects = planted_effects({"feature": 0.3})
    means = mean_effects(effects)
    row = means.filter((pl.col("concept") == "emo:joy") & (pl.col("unit") == 11) & (pl.col("strength") == 2.0))
    direct = effects.filter((pl.col("concept") == "emo:joy") & (pl.col("unit") == 11) & (pl.col("strength") == 2.0))
    assert row["relative_effect"][0] == pytest.approx(direct["relative_effect"].mean(), abs=1e-12)
    assert means.height == 3 * len(UNITS) * len(STRENGTHS)


def test_summary_has_the_schema_and_finds_the_planted_gains():
    effects = planted_effects({"feature": 0.4, "neuron": 0.1, "diffmean": -0.2})
    summary, samples = summarise(effects, [0.03, 0.1, 0.3], n_boot=200, seed=0)
    for column in ("concept", "site", "unit_kind", "selection", "unit", "spearman_relative", "effect_at_kl_0.1",
                   "effect_at_kl_0.1_ci_low", "effect_at_kl_0.1_ci_high", "effect_at_kl_0.03", "effect_at_kl_0.3",
                   "effect_down_at_kl_0.1", "max_kl"):
        assert column in summary.columns, column
    assert summary.height == 3 * len(UNITS)
    feature = summary.filter((pl.col("unit_kind") == "feature") & (pl.col("selection") == "input")).row(0, named=True)
    # KL 0.1 lies halfway in log KL between strengths 1 (KL 0.05, effect 0.4) and 2 (KL 0.2, effect 0.8)
    assert feature["effect_at_kl_0.1"] == pytest.approx(0.6, abs=0.03)
    assert feature["effect_at_kl_0.1_ci_low"] < feature["effect_at_kl_0.1"] < feature["effect_at_kl_0.1_ci_high"]
    assert feature["effect_down_at_kl_0.1"] == pytest.approx(-0.6, abs=0.03)
    assert feature["spearman_relative"] == pytest.approx(1.0)
    diffmean = summary.filter(pl.col("unit_kind") == "diffmean").row(0, named=True)
    assert diffmean["spearman_relative"] == pytest.approx(-1.0)
    random = summary.filter(pl.col("unit_kind") == "random").row(0, named=True)
    assert abs(random["spearman_relative"]) < 0.9 and abs(random["effect_at_kl_0.1"]) < 0.05
    assert all(len(s[0.1]) == 200 for s in samples.values())


def test_comparisons_and_verdict_say_the_feature_beats_weaker_baselines():
    effects = planted_effects({"feature": 0.4, "neuron": 0.1, "correlated_neuron": 0.1, "diffmean": 0.1},
                              concepts=[f"c{i}" for i in range(8)])
    summary, samples = summarise(effects, [COMPARED_KL], n_boot=200, seed=0)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    assert set(comparisons["baseline"]) == {"neuron", "correlated_neuron", "diffmean", "random"}
    assert comparisons.height == 8 * 2 * 4 and comparisons["beats"].all()
    assert (comparisons["ci_low"] <= comparisons["difference"]).all()
    table = verdict(summary.with_columns(named=pl.lit(False)), comparisons, 0.9, n_boot=200, seed=0)
    for column in ("site", "feature_selection", "statistic", "baseline", "n_concepts", "value", "ci_low", "ci_high",
                   "p_value"):
        assert column in table.columns
    beats = table.filter((pl.col("statistic") == "beats") & (pl.col("feature_selection") == "input"))
    assert beats["value"].to_list() == [1.0] * 4 and (beats["n_concepts"] == 8).all()
    monotone = table.filter(pl.col("statistic") == "monotone")
    assert monotone["value"].to_list() == [1.0, 1.0]
    mean_diff = table.filter((pl.col("statistic") == "mean_difference") & (pl.col("baseline") == "random"))
    assert (mean_diff["ci_low"] > 0).all()
    assert mean_diff["p_value"].to_list() == pytest.approx([2 / 2**8] * 2)  # exact: only all-positive signs match


def test_a_feature_no_better_than_the_null_does_not_beat_it():
    effects = planted_effects({"feature": 0.0}, concepts=[f"c{i}" for i in range(6)], noise=0.3)
    summary, samples = summarise(effects, [COMPARED_KL], n_boot=200, seed=1)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    against_random = comparisons.filter(pl.col("baseline") == "random")
    assert against_random["beats"].fill_null(False).sum() <= 1
    table = verdict(summary.with_columns(named=pl.lit(False)), comparisons, 0.9, n_boot=200, seed=1)
    row = table.filter((pl.col("statistic") == "mean_difference") & (pl.col("baseline") == "random")
                       & (pl.col("feature_selection") == "input")).row(0, named=True)
    assert row["ci_low"] < 0 < row["ci_high"] and row["p_value"] > 0.05


def test_wilson_interval_and_the_exact_sign_flip_test():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert sign_flip_p_value(np.array([1.0, 2.0, 3.0]), 10_000, 0) == pytest.approx(2 / 8)
    assert sign_flip_p_value(np.array([1.0, -1.0]), 10_000, 0) == 1.0


def test_continuation_table_and_grid_concepts():
    rows = [{"concept": c, "selection": "input", "prompt_text": "The", "mode": m, "strength": s,
             "continuation": f"{c}/{m}/{s:g}", "perplexity": 2.0 + s}
            for c in ("a:x", "list:s") for m in ("greedy", "sampled") for s in (1.0, -1.0)]
    table = continuation_table(pl.DataFrame(rows))
    assert table.columns == ["concept", "selection", "prompt_text", "strength", "greedy", "sampled",
                             "perplexity_greedy", "perplexity_sampled"]
    assert table.row(0, named=True) == {"concept": "a:x", "selection": "input", "prompt_text": "The", "strength": -1.0,
                                        "greedy": "a:x/greedy/-1", "sampled": "a:x/sampled/-1",
                                        "perplexity_greedy": 1.0, "perplexity_sampled": 1.0}
    effects = planted_effects({"feature": 0.4}, concepts=["z:named", "list:suspicion", "b:weak", "c:strong"])
    summary, _ = summarise(effects, [COMPARED_KL], n_boot=100, seed=0)
    summary = summary.with_columns(named=pl.col("concept").is_in(["z:named", "list:suspicion"]),
                                   **{"effect_at_kl_0.1": pl.when(pl.col("concept") == "c:strong").then(1.0)
                                      .otherwise(pl.col("effect_at_kl_0.1"))})
    assert grid_concepts(summary, "mlp3", 1) == ["list:suspicion", "z:named", "c:strong"]


def test_batched_interpolation_equals_numpy_interp_curve_by_curve():
    from mechinterp.clamping_stats import effects_at_kl

    rng = np.random.default_rng(3)
    kl, effect = rng.gamma(1.0, 0.1, (5, 200)), rng.normal(size=(5, 200))
    batched = effects_at_kl(kl, effect, 0.1)
    for column in range(200):
        points = np.concatenate([[0.0], kl[:, column]])
        values = np.concatenate([[0.0], effect[:, column]])
        order = np.argsort(points, kind="stable")
        log_kl = np.log(np.maximum(points[order], 1e-12))
        expected = np.interp(np.log(0.1), log_kl, values[order]) if log_kl[-1] >= np.log(0.1) else np.nan
        assert batched[column] == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_comparison_and_verdict_tables_have_exactly_their_columns_and_values():
    effects = planted_effects({"feature": 0.4, "neuron": 0.1, "correlated_neuron": 0.1, "diffmean": 0.1},
                              concepts=[f"c{i}" for i in range(5)])
    summary, samples = summarise(effects, [COMPARED_KL], n_boot=100, seed=0)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    assert comparisons.schema == {"concept": pl.Utf8, "site": pl.Utf8, "feature_selection": pl.Utf8, "feature": pl.Int64,
                                  "baseline": pl.Utf8, "baseline_unit": pl.Int64, "kl": pl.Float64,
                                  "feature_effect": pl.Float64, "baseline_effect": pl.Float64,
                                  "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                  "beats": pl.Boolean}
    at_kl = {(r["concept"], r["unit_kind"], r["selection"]): r for r in summary.iter_rows(named=True)}
    units = {kind: unit for kind, _, unit in UNITS}
    for row in comparisons.iter_rows(named=True):
        feature = at_kl[(row["concept"], "feature", row["feature_selection"])]
        baseline = at_kl[(row["concept"], row["baseline"], "")] if row["baseline"] != "neuron" else at_kl[
            (row["concept"], "neuron", "output")]
        column = f"effect_at_kl_{COMPARED_KL}"
        assert (row["feature_effect"], row["baseline_effect"]) == (feature[column], baseline[column])
        assert row["difference"] == pytest.approx(feature[column] - baseline[column])
        assert row["baseline_unit"] == units[row["baseline"]] and row["kl"] == COMPARED_KL
        assert row["ci_low"] <= row["ci_high"] and row["beats"] == (row["ci_low"] > 0)
    table = verdict(summary.with_columns(named=pl.lit(False)), comparisons, 0.9, n_boot=100, seed=0)
    assert table.columns == ["site", "feature_selection", "statistic", "baseline", "n_concepts", "value", "ci_low",
                             "ci_high", "p_value"]
    for row in table.filter(pl.col("statistic") == "mean_difference").iter_rows(named=True):
        diffs = comparisons.filter((pl.col("feature_selection") == row["feature_selection"])
                                   & (pl.col("baseline") == row["baseline"]))["difference"].to_numpy()
        assert row["value"] == pytest.approx(diffs.mean()) and row["n_concepts"] == 5 and row["site"] == "mlp3"
        assert min(diffs) <= row["ci_low"] <= row["value"] <= row["ci_high"] <= max(diffs)
        assert row["p_value"] == pytest.approx(2 / 2**5)  # exact: 5 concepts, every difference positive
    for row in table.filter(pl.col("statistic") != "mean_difference").iter_rows(named=True):
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(round(row["value"] * row["n_concepts"]),
                                                                                row["n_concepts"]))


def test_percentile_interval_and_the_random_sign_flip_test():
    from mechinterp.clamping_stats import percentile_ci

    samples = np.arange(1001, dtype=float)
    assert percentile_ci(samples) == pytest.approx((25.0, 975.0))
    assert percentile_ci(np.array([np.nan, 1.0, np.inf, 3.0])) == pytest.approx(tuple(np.percentile([1.0, 3.0], [2.5, 97.5])))
    diffs = np.random.default_rng(0).normal(0.3, 1, 20)  # 2^20 sign patterns: sampled, seeded
    p = sign_flip_p_value(diffs, 2000, 5)
    assert p == sign_flip_p_value(diffs, 2000, 5) and p != sign_flip_p_value(diffs, 2000, 6)
    t = diffs.mean() / (diffs.std(ddof=1) / len(diffs) ** 0.5)  # the normal approximation of the same test
    assert p == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), abs=0.05)
    assert sign_flip_p_value(np.zeros(20), 2000, 0) == 1.0 and math.isnan(sign_flip_p_value(np.array([]), 100, 0))


def test_the_lowering_half_has_its_own_spearman():
    """spearman_down ranks only strengths <= 0: a unit whose effect is gain x strength is perfectly monotone
    there too, rising for a positive gain and falling for a negative one."""
    effects = planted_effects({"feature": 0.4, "diffmean": -0.2}, n_prompts=4)
    summary, _ = summarise(effects, [COMPARED_KL], n_boot=20, seed=0)
    feature = summary.filter((pl.col("unit_kind") == "feature") & (pl.col("selection") == "input")).row(0, named=True)
    diffmean = summary.filter(pl.col("unit_kind") == "diffmean").row(0, named=True)
    assert feature["spearman_down"] == pytest.approx(1.0) and feature["spearman_up"] == pytest.approx(1.0)
    assert diffmean["spearman_down"] == pytest.approx(-1.0)


def test_comparisons_beyond_the_damage_measured_keep_a_boolean_beats_column():
    """At a KL no unit reaches every effect is NaN and no comparison can be decided: `beats` is all null yet
    stays Boolean, so tables of every run concatenate."""
    effects = planted_effects({"feature": 0.4}, n_prompts=4, concepts=("c0", "c1"))
    summary, samples = summarise(effects, [5.0], n_boot=20, seed=0)  # the largest KL planted is 0.8
    comparisons = compare_to_baselines(summary, samples, 5.0)
    assert comparisons.height == 2 * 2 * 4 and comparisons["beats"].null_count() == comparisons.height
    assert comparisons.schema["beats"] == pl.Boolean and comparisons.schema["difference"] == pl.Float64


def feature_summary(up_ci_low: list[float | None], down_ci_high: list[float | None]) -> pl.DataFrame:
    """A hand-made summary of input-selected features at one site, one row per concept, with just the
    columns the verdict reads."""
    n = len(up_ci_low)
    return pl.DataFrame({"concept": [f"c{i}" for i in range(n)], "site": "mlp3", "unit_kind": "feature",
                         "selection": "input", "spearman_relative": [0.95] * n,
                         "effect_at_kl_0.1_ci_low": up_ci_low, "effect_down_at_kl_0.1_ci_high": down_ci_high},
                        schema_overrides={"effect_at_kl_0.1_ci_low": pl.Float64,
                                          "effect_down_at_kl_0.1_ci_high": pl.Float64})


def hand_comparisons(differences: dict[str, list[float]]) -> pl.DataFrame:
    """Comparison rows of input-selected features at mlp3 against the named baselines."""
    rows = [{"site": "mlp3", "feature_selection": "input", "baseline": baseline, "difference": d, "beats": d > 0}
            for baseline, ds in differences.items() for d in ds]
    return pl.DataFrame(rows)


def test_a_concept_raises_or_lowers_only_when_its_interval_excludes_zero():
    """An interval touching zero does not count: raising needs ci_low > 0, lowering ci_high < 0; an
    undefined interval counts as neither."""
    summary = feature_summary([0.0, 0.2, -0.1, float("nan")], [0.0, -0.2, 0.1, None])
    table = verdict(summary, hand_comparisons({"random": [0.1, 0.2, 0.3, 0.4]}), 0.9, n_boot=50, seed=0)
    value = dict(table.filter(pl.col("baseline") == "").select("statistic", "value").iter_rows())
    assert value == {"monotone": 1.0, "raises_concept": 0.25, "lowers_concept": 0.25}


def test_a_baseline_with_no_comparison_gives_nan_rows():
    """A baseline no concept was compared with: zero concepts, NaN share, mean, interval and p-value."""
    summary = feature_summary([0.1, 0.2], [-0.1, -0.2])
    table = verdict(summary, hand_comparisons({"neuron": [0.1, 0.2]}), 0.9, n_boot=50, seed=0)
    for statistic in ("beats", "mean_difference"):
        row = table.filter((pl.col("baseline") == "random") & (pl.col("statistic") == statistic)).row(0, named=True)
        assert row["n_concepts"] == 0 and math.isnan(row["value"]), statistic
        assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"]), statistic
    mean = table.filter((pl.col("baseline") == "random") & (pl.col("statistic") == "mean_difference"))
    assert math.isnan(mean["p_value"].item())
    assert table.filter((pl.col("baseline") == "neuron") & (pl.col("statistic") == "beats"))["value"].item() == 1.0


def test_the_sampled_sign_flip_test_of_the_verdict_is_seeded():
    """Over 16 concepts (2^16 sign patterns, more than are drawn) the p-values are sampled, from the
    verdict's seed: the same seed gives the same p-values, run after run."""
    rng = np.random.default_rng(4)
    differences = {baseline: rng.normal(0.1, 1.0, 16).tolist()
                   for baseline in ("neuron", "correlated_neuron", "diffmean", "random")}
    summary, comparisons = feature_summary([0.1] * 16, [-0.1] * 16), hand_comparisons(differences)
    p_values = [verdict(summary, comparisons, 0.9, n_boot=50, seed=3).filter(
        pl.col("statistic") == "mean_difference")["p_value"].to_list() for _ in range(2)]
    assert p_values[0] == p_values[1]
    assert all(0.0 < p < 1.0 for p in p_values[0])


def test_a_unit_without_a_selection_is_named_by_its_kind_alone():
    """Figure labels: `feature (input)` for a selected unit, `diffmean` for one without a selection."""
    from mechinterp.clamping_stats import unit_label

    assert unit_label("feature", "input") == "feature (input)" and unit_label("diffmean", "") == "diffmean"


def test_points_repeated_at_the_level_give_their_effect_silently():
    """Two points at exactly the level's KL leave no segment to interpolate along: the effect there is
    theirs, with no 0/0 (no NaN, no RuntimeWarning flooding the stage's log)."""
    import warnings

    from mechinterp.clamping_stats import effects_at_kl

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at = effects_at_kl(np.array([[0.1], [0.1]]), np.array([[0.5], [0.5]]), 0.1)
    assert at.tolist() == [0.5]


def test_an_interval_needs_at_least_half_the_samples_finite():
    from mechinterp.clamping_stats import percentile_ci

    assert all(math.isnan(v) for v in percentile_ci(np.array([1.0, 2.0, np.nan, np.nan, np.nan])))  # 2 of 5
    assert percentile_ci(np.array([1.0, 3.0, np.nan, np.nan])) == (1.05, 2.95)  # 2 of 4: half
    assert percentile_ci(np.array([1.0, 2.0, 3.0, np.nan, np.nan])) == (1.05, 2.95)  # 3 of 5
    assert all(math.isnan(v) for v in percentile_ci(np.array([np.nan, np.nan])))


def test_many_points_tied_at_the_level_give_the_last_one_in_input_order():
    """Points at the same KL keep their input order (a stable sort): the effect at that KL is the later
    point's. Over 16+ points numpy's default sort is not stable, so this needs the stable one."""
    from mechinterp.clamping_stats import effects_at_kl

    for n_points in range(16, 41):
        kl = np.array([COMPARED_KL if i % 2 == 0 else 1.0 for i in range(n_points)])
        effect = np.arange(n_points, dtype=float)  # each point's effect is its input position
        last_at_level = max(i for i in range(n_points) if kl[i] == COMPARED_KL)
        at = effects_at_kl(kl[:, None], effect[:, None], COMPARED_KL)
        assert at.tolist() == [float(last_at_level)], n_points


def test_a_spearman_exactly_at_the_threshold_counts_as_monotone():
    """The monotone share counts Spearman >= the threshold: a concept right at it is monotone."""
    summary = feature_summary([0.1, 0.2], [-0.1, -0.2])  # every Spearman is 0.95
    table = verdict(summary, hand_comparisons({"random": [0.1, 0.2]}), 0.95, n_boot=20, seed=0)
    assert table.filter(pl.col("statistic") == "monotone")["value"].item() == 1.0


def test_the_verdicts_sampled_p_value_is_the_sign_flip_test_with_ten_thousand_flips():
    """Over 16 concepts the verdict's p-value is sign_flip_p_value(differences, 10_000, seed)."""
    rng = np.random.default_rng(7)
    differences = rng.normal(0.1, 1.0, 16)
    summary = feature_summary([0.1] * 16, [-0.1] * 16)
    table = verdict(summary, hand_comparisons({"random": differences.tolist()}), 0.9, n_boot=20, seed=5)
    p_value = table.filter((pl.col("baseline") == "random") & (pl.col("statistic") == "mean_difference"))["p_value"]
    assert p_value.item() == sign_flip_p_value(differences, 10_000, 5)


def test_the_mean_difference_interval_is_over_concept_means_and_leaves_out_unmeasured_concepts():
    """The bootstrap resamples concepts and takes each resample's mean: over 16 concepts spread from -1
    to 1 its interval is much narrower than the spread of the differences themselves (a standard error
    about a quarter of their standard deviation). A concept measured as NaN (its damage never reached
    the compared KL) or not at all is left out: the value is the mean of the other 16."""
    differences = np.linspace(-1.0, 1.0, 16) + 0.05
    summary = feature_summary([0.1] * 18, [-0.1] * 18)
    unmeasured = pl.DataFrame({"site": "mlp3", "feature_selection": "input", "baseline": "random",
                               "difference": [float("nan"), None], "beats": [None, None]},
                              schema_overrides={"difference": pl.Float64, "beats": pl.Boolean})
    comparisons = pl.concat([hand_comparisons({"random": differences.tolist()}), unmeasured])
    table = verdict(summary, comparisons, 0.9, n_boot=400, seed=0)
    assert table.equals(verdict(summary, comparisons, 0.9, n_boot=400, seed=0))  # the bootstrap is seeded
    row = table.filter((pl.col("baseline") == "random") & (pl.col("statistic") == "mean_difference")).row(
        0, named=True)
    assert row["n_concepts"] == 16 and row["value"] == pytest.approx(differences.mean())
    assert row["ci_low"] < row["value"] < row["ci_high"]
    assert row["ci_high"] - row["ci_low"] < 0.5 * (np.percentile(differences, 97.5) - np.percentile(differences, 2.5))


def test_the_verdict_lists_sites_in_the_order_the_summary_gives_them():
    """Forty sites (enough for polars's grouping to scramble an order it is not asked to keep): the verdict's
    rows follow the summary's site order, so the table and its figure are the same on every run."""
    sites = [f"site{i}" for i in np.random.default_rng(0).permutation(40)]
    summary = pl.concat([feature_summary([0.1], [-0.1]).with_columns(site=pl.lit(site)) for site in sites])
    table = verdict(summary, hand_comparisons({"random": [0.1]}), 0.9, n_boot=20, seed=0)
    assert table["site"].unique(maintain_order=True).to_list() == sites


def test_a_concept_without_an_effect_at_the_compared_kl_is_sampled_last():
    """A sampled concept whose effect at KL 0.1 is undefined (null: the damage never reached) comes after
    every concept with an effect, whatever the descending order would do with nulls."""
    summary = pl.DataFrame({"concept": ["a:none", "b:weak", "c:strong"], "site": "mlp3", "named": False,
                            "unit_kind": "feature", "selection": "input", "effect_at_kl_0.1": [None, 0.1, 0.9]},
                           schema_overrides={"effect_at_kl_0.1": pl.Float64})
    assert grid_concepts(summary, "mlp3", 3) == ["c:strong", "b:weak", "a:none"]


def test_strength_zero_is_not_part_of_the_lowering_half():
    """Lowering uses strengths < 0 only: a point at strength 0 (here with a made-up large effect) is not
    on the lowering curve, which runs from the clean model (KL 0, effect 0) to strength -1."""
    from mechinterp.clamping_stats import directional

    strengths, kl, effect = np.array([-1.0, 0.0, 1.0]), np.array([0.2, 0.1, 0.2]), np.array([-1.0, 5.0, 1.0])
    # by hand: log-KL interpolation between the floor 1e-12 (effect 0) and KL 0.2 (effect -1)
    expected = -(math.log(0.1) - math.log(1e-12)) / (math.log(0.2) - math.log(1e-12))
    assert directional(strengths, effect, kl, COMPARED_KL, "down") == pytest.approx(expected)
