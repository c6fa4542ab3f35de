"""The clamping statistics on planted effects tables with known answers: the effect at equal damage read
only between bracketing points, the random pool's baselines, paired comparisons, the hierarchical
cross-concept verdict with its multiplicity correction and placebo concepts, and the tables' schemas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest

from mechinterp.clamping_stats import (COMPARED_KL, bootstrap_p_value, bracketed_shares, compare_to_baselines,
                                       continuation_table, directional, effect_at_kl, effects_at_kl, grid_concepts,
                                       hierarchical_means, holm, mean_effects, percentile_ci, pool_summary, summarise,
                                       unit_label, verdict, wilson_interval)

STRENGTHS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)
POOL = [("random", "pool", 90 + i) for i in range(4)]
UNITS = [("feature", "input", 11), ("feature", "output", 12), ("neuron", "output", 3),
         ("correlated_neuron", "input", 4), ("correlated_neuron", "output", 5), ("diffmean", "", 0), *POOL]


def planted_effects(gains: dict[str, float], n_prompts: int = 12, noise: float = 0.05, seed: int = 0,
                    concepts=("emo:joy", "geo:city", "list:suspicion"), placebo_gain: float | None = None
                    ) -> pl.DataFrame:
    """Every unit's relative effect is gain x strength (plus noise); KL grows as 0.05 x strength^2, the
    same for every unit, so at equal KL the unit with the larger gain moves its concept more. Gains are
    keyed by unit_kind, or by `kind (selection)` for one selection; a placebo concept's feature has
    `placebo_gain` when given."""
    rng = np.random.default_rng(seed)
    rows = []
    for concept in concepts:
        for kind, selection, unit in UNITS:
            gain = gains.get(f"{kind} ({selection})", gains.get(kind, 0.0))
            if placebo_gain is not None and concept.startswith("placebo:") and kind == "feature":
                gain = placebo_gain
            for strength in STRENGTHS:
                for prompt in range(n_prompts):
                    effect = gain * strength + rng.normal(0, noise)
                    rows.append({"concept": concept, "site": "mlp3", "layer": 3, "unit_kind": kind,
                                 "selection": selection, "unit": unit, "strength": strength, "prompt": prompt,
                                 "concept_logprob_change": effect, "control_logprob_change": 0.0,
                                 "relative_effect": effect, "kl": 0.05 * strength**2 + abs(rng.normal(0, 1e-3))})
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)  # order must not matter


def planted_summary(effects: pl.DataFrame, levels=(COMPARED_KL,), n_boot: int = 200, seed: int = 0,
                    output_scores: dict[int, float] | None = None):
    """summarise, the columns the clamping stage joins from its targets (named, placebo, output_score),
    then pool_summary: what the stage hands the comparisons and the verdict."""
    summary, samples = summarise(effects, list(levels), n_boot=n_boot, seed=seed)
    scores = output_scores or {unit: float(unit) for _, _, unit in POOL}
    summary = summary.with_columns(
        named=pl.col("concept").str.starts_with("list:"), placebo=pl.col("concept").str.starts_with("placebo:"),
        output_score=pl.col("unit").replace_strict(scores, default=None, return_dtype=pl.Float64))
    return pool_summary(summary, samples, list(levels))


# --- the effect at a KL level ---------------------------------------------------------------------

def test_the_effect_at_a_kl_level_is_read_between_the_two_measured_points_that_bracket_it():
    assert effect_at_kl(np.array([0.01, 0.1, 1.0]), np.array([0.0, 0.5, 2.0]), 0.1) == pytest.approx(0.5)
    assert effect_at_kl(np.array([0.01, 1.0]), np.array([0.0, 2.0]), 0.1) == pytest.approx(1.0)  # halfway in log KL
    assert math.isnan(effect_at_kl(np.array([0.01, 0.05]), np.array([0.0, 2.0]), 0.1))  # above the damage measured
    # below the smallest KL measured: NaN, not a line from the clean model (KL 0, effect 0)
    assert math.isnan(effect_at_kl(np.array([0.2, 1.0]), np.array([1.0, 2.0]), 0.1))
    assert effect_at_kl(np.array([0.1]), np.array([0.7]), 0.1) == 0.7  # one point, exactly at the level
    assert math.isnan(effect_at_kl(np.array([0.2]), np.array([0.7]), 0.1))


def test_batched_interpolation_equals_numpy_interp_where_bracketed_and_nan_elsewhere():
    rng = np.random.default_rng(3)
    kl, effect = rng.gamma(1.0, 0.1, (5, 300)), rng.normal(size=(5, 300))
    batched = effects_at_kl(kl, effect, 0.1)
    n_bracketed = 0
    for column in range(300):
        order = np.argsort(kl[:, column], kind="stable")
        log_kl, values = np.log(kl[order, column]), effect[order, column]
        inside = log_kl[0] <= np.log(0.1) <= log_kl[-1]
        n_bracketed += inside
        expected = np.interp(np.log(0.1), log_kl, values) if inside else np.nan
        assert batched[column] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert 50 < n_bracketed < 300  # both cases are exercised


def test_points_repeated_at_the_level_give_their_effect_silently():
    """Two points at exactly the level's KL leave no segment to interpolate along: the effect there is
    theirs, with no 0/0 (no NaN, no RuntimeWarning flooding the stage's log)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at = effects_at_kl(np.array([[0.1], [0.1]]), np.array([[0.5], [0.5]]), 0.1)
    assert at.tolist() == [0.5]


def test_many_points_tied_at_the_level_give_the_last_one_in_input_order():
    """Points at the same KL keep their input order (a stable sort): the effect at that KL is the later
    point's. Over 16+ points numpy's default sort is not stable, so this needs the stable one."""
    for n_points in range(16, 41):
        kl = np.array([COMPARED_KL if i % 2 == 0 else 1.0 for i in range(n_points)])
        effect = np.arange(n_points, dtype=float)
        last_at_level = max(i for i in range(n_points) if kl[i] == COMPARED_KL)
        assert effects_at_kl(kl[:, None], effect[:, None], COMPARED_KL).tolist() == [float(last_at_level)], n_points


def test_strength_zero_is_not_part_of_the_lowering_half():
    """Lowering uses strengths < 0 only: a point at strength 0 (here with a made-up large effect) is not
    on the lowering curve, which runs between strengths -0.5 and -1."""
    strengths = np.array([-1.0, -0.5, 0.0, 1.0])
    kl, effect = np.array([0.2, 0.05, 0.1, 0.2]), np.array([-1.0, -0.4, 5.0, 1.0])
    assert directional(strengths, effect, kl, COMPARED_KL, "down") == pytest.approx(-0.7)  # halfway in log KL
    assert math.isnan(directional(strengths[[0, 2, 3]], effect[[0, 2, 3]], kl[[0, 2, 3]], COMPARED_KL, "down"))


# --- per unit -------------------------------------------------------------------------------------

def test_mean_effects_equal_direct_means_over_prompts():
    effects = planted_effects({"feature": 0.3})
    means = mean_effects(effects)
    pick = (pl.col("concept") == "emo:joy") & (pl.col("unit") == 11) & (pl.col("strength") == 2.0)
    assert means.filter(pick)["relative_effect"][0] == pytest.approx(effects.filter(pick)["relative_effect"].mean(),
                                                                     abs=1e-12)
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
    assert summary.filter(pl.col("unit_kind") == "diffmean")["spearman_relative"][0] == pytest.approx(-1.0)
    assert all(len(s[(level, d)]) == 200 for s in samples.values() for level in (0.03, 0.1, 0.3) for d in ("up", "down"))


def test_a_strength_measured_twice_counts_once():
    """An aimed strength equal to a probe's (or two capped at the largest) is one point of the curve, the
    mean of its rows."""
    effects = planted_effects({"feature": 0.4}, n_prompts=4, concepts=("c0",))
    doubled = pl.concat([effects, effects.filter(pl.col("strength") == 1.0).with_columns(relative_effect=pl.lit(9.0))])
    summary, _ = summarise(doubled, [COMPARED_KL], n_boot=20, seed=0)
    row = summary.filter((pl.col("unit_kind") == "feature") & (pl.col("selection") == "input")).row(0, named=True)
    assert row["max_relative_effect"] == pytest.approx((0.4 + 9.0) / 2, abs=0.1)


# --- the random pool and the comparisons ----------------------------------------------------------

def test_the_pool_becomes_its_mean_and_its_best_member_by_output_score():
    effects = planted_effects({"random": 0.0}, noise=0.3, concepts=("c0", "c1"))
    raw, raw_samples = summarise(effects, [COMPARED_KL], n_boot=100, seed=0)
    raw_samples = {k: dict(v) for k, v in raw_samples.items()}
    summary, samples = planted_summary(effects, n_boot=100, output_scores={90: 0.1, 91: 3.0, 92: -1.0, 93: 0.5})
    assert summary.filter(pl.col("selection") == "pool").height == 0
    for concept in ("c0", "c1"):
        members = raw.filter((pl.col("concept") == concept) & (pl.col("selection") == "pool"))
        mean = summary.filter((pl.col("concept") == concept) & (pl.col("selection") == "pool_mean")).row(0, named=True)
        assert mean["unit"] == -1 and mean["unit_kind"] == "random"
        assert mean["effect_at_kl_0.1"] == pytest.approx(members["effect_at_kl_0.1"].mean())
        boot = np.mean([raw_samples[(concept, "mlp3", "random", "pool", u)][(COMPARED_KL, "up")] for u in range(90, 94)], 0)
        assert samples[(concept, "mlp3", "random", "pool_mean", -1)][(COMPARED_KL, "up")] == pytest.approx(boot)
        assert (mean["effect_at_kl_0.1_ci_low"], mean["effect_at_kl_0.1_ci_high"]) == pytest.approx(percentile_ci(boot))
        best = summary.filter((pl.col("concept") == concept) & (pl.col("selection") == "best_of_pool"))
        assert best["unit"].to_list() == [91] and best["output_score"].to_list() == [3.0]


def test_comparisons_pair_each_feature_with_its_own_baselines():
    effects = planted_effects({"feature": 0.4, "neuron": 0.1, "correlated_neuron (input)": 0.1,
                               "correlated_neuron (output)": -0.3, "diffmean": 0.1},
                              concepts=[f"c{i}" for i in range(5)])
    summary, samples = planted_summary(effects, n_boot=100)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    assert comparisons.schema == {"concept": pl.Utf8, "site": pl.Utf8, "feature_selection": pl.Utf8, "feature": pl.Int64,
                                  "baseline": pl.Utf8, "baseline_unit": pl.Int64, "kl": pl.Float64,
                                  "feature_effect": pl.Float64, "baseline_effect": pl.Float64,
                                  "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                  "beats": pl.Boolean}
    assert comparisons.height == 5 * 2 * 5
    correlated = comparisons.filter(pl.col("baseline") == "correlated_neuron")
    assert dict(correlated.select("feature_selection", "baseline_unit").unique().iter_rows()) == {"input": 4, "output": 5}
    assert set(comparisons.filter(pl.col("baseline") == "random")["baseline_unit"]) == {-1}
    at = {(r["concept"], r["unit_kind"], r["selection"]): r["effect_at_kl_0.1"] for r in summary.iter_rows(named=True)}
    for row in comparisons.iter_rows(named=True):
        assert row["difference"] == pytest.approx(row["feature_effect"] - row["baseline_effect"])
        assert row["feature_effect"] == at[(row["concept"], "feature", row["feature_selection"])]
        assert row["ci_low"] <= row["difference"] <= row["ci_high"] and row["beats"] == (row["ci_low"] > 0)
    assert comparisons["beats"].all()


def test_comparisons_beyond_the_damage_measured_keep_a_boolean_beats_column():
    """At a KL no unit reaches every effect is NaN and no comparison can be decided: `beats` is all null yet
    stays Boolean, so tables of every run concatenate."""
    effects = planted_effects({"feature": 0.4}, n_prompts=4, concepts=("c0", "c1"))
    summary, samples = planted_summary(effects, levels=(5.0,), n_boot=20)  # the largest KL planted is 0.8
    comparisons = compare_to_baselines(summary, samples, 5.0)
    assert comparisons.height == 2 * 2 * 5 and comparisons["beats"].null_count() == comparisons.height
    assert comparisons.schema["beats"] == pl.Boolean and comparisons.schema["difference"] == pl.Float64


# --- the verdict ----------------------------------------------------------------------------------

def planted_verdict(gains: dict[str, float], n_real: int, n_placebo: int = 0, noise: float = 0.05, seed: int = 0,
                    placebo_gain: float | None = None):
    concepts = [f"c{i}" for i in range(n_real)] + [f"placebo:{i:02d}" for i in range(n_placebo)]
    effects = planted_effects(gains, concepts=concepts, noise=noise, seed=seed, placebo_gain=placebo_gain, n_prompts=8)
    summary, samples = planted_summary(effects, n_boot=200, seed=seed)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    return verdict(summary, comparisons, samples, 0.9, seed=seed), comparisons


def test_the_verdict_has_its_columns_and_a_strong_feature_beats_every_baseline_after_correction():
    table, comparisons = planted_verdict({"feature": 0.4, "neuron": 0.1, "correlated_neuron": 0.1, "diffmean": 0.1},
                                         n_real=10, noise=0.2)
    assert table.columns == ["site", "feature_selection", "concepts", "statistic", "baseline", "n_concepts", "value",
                             "ci_low", "ci_high", "family_ci_low", "family_ci_high", "p_value", "p_holm"]
    tests = table.filter(pl.col("statistic") == "mean_difference")
    assert tests.height == 2 * 5 and set(tests["baseline"]) == {"neuron", "correlated_neuron", "diffmean", "random",
                                                                "best_random"}
    for row in tests.iter_rows(named=True):
        pairs = comparisons.filter((pl.col("feature_selection") == row["feature_selection"])
                                   & (pl.col("baseline") == row["baseline"]))
        assert row["value"] == pytest.approx(pairs["difference"].mean()) and row["n_concepts"] == 10
        # the family interval is the wider: Bonferroni over the site's 10 tests
        assert row["family_ci_low"] <= row["ci_low"] < row["value"] < row["ci_high"] <= row["family_ci_high"]
        assert row["family_ci_low"] > 0 and row["p_value"] < 0.01 and row["p_holm"] <= min(1.0, 10 * row["p_value"]) + 1e-9
    shares = table.filter(pl.col("statistic").is_in(["monotone", "raises_concept", "lowers_concept"]))
    assert shares["value"].to_list() == [1.0] * 6 and shares["p_holm"].null_count() == 6
    for row in shares.iter_rows(named=True):
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(10, 10))


def test_a_feature_no_better_than_the_null_beats_nothing_after_correction():
    table, _ = planted_verdict({"feature": 0.0}, n_real=8, noise=0.3, seed=1)
    tests = table.filter(pl.col("statistic") == "mean_difference")
    assert (tests["family_ci_low"] < 0).all() and (tests["p_holm"] > 0.05).all()


def test_placebo_concepts_are_a_family_of_their_own_and_the_null_of_the_effect():
    """Real concepts' features move them (gain 0.4) and placebos' do not: the effect beyond placebo holds;
    with the placebos' features as strong as the real ones it does not."""
    table, _ = planted_verdict({"feature": 0.4}, n_real=8, n_placebo=6, noise=0.2, placebo_gain=0.0)
    assert set(table["concepts"]) == {"real", "placebo"}
    placebo = table.filter((pl.col("concepts") == "placebo") & (pl.col("statistic") == "effect"))
    assert placebo["n_concepts"].to_list() == [6, 6] and (placebo["value"].abs() < 0.1).all()
    beyond = table.filter(pl.col("statistic") == "effect_beyond_placebo")
    assert beyond["concepts"].to_list() == ["real", "real"] and beyond["baseline"].to_list() == ["placebo"] * 2
    real = table.filter((pl.col("concepts") == "real") & (pl.col("statistic") == "effect"))["value"].to_numpy()
    assert beyond["value"].to_numpy() == pytest.approx(real - placebo["value"].to_numpy())
    assert (beyond["family_ci_low"] > 0).all()
    # the real family holds 2 x 5 mean differences and the 2 placebo contrasts; the placebo family its 10
    assert table.filter((pl.col("concepts") == "real") & pl.col("p_holm").is_not_null()).height == 12
    assert table.filter((pl.col("concepts") == "placebo") & pl.col("p_holm").is_not_null()).height == 10
    same, _ = planted_verdict({"feature": 0.4}, n_real=8, n_placebo=6, noise=0.2, placebo_gain=0.4)
    beyond = same.filter(pl.col("statistic") == "effect_beyond_placebo")
    assert ((beyond["family_ci_low"] < 0) & (beyond["family_ci_high"] > 0)).all()


def test_the_verdict_is_seeded_and_lists_sites_in_the_summarys_order():
    effects = pl.concat([planted_effects({"feature": 0.4}, n_prompts=4, concepts=("c0", "c1")).with_columns(
        site=pl.lit(site)) for site in ("site9", "site1", "site5")])
    summary, samples = planted_summary(effects, n_boot=50)
    comparisons = compare_to_baselines(summary, samples, COMPARED_KL)
    first = verdict(summary, comparisons, samples, 0.9, seed=3)
    assert first.equals(verdict(summary, comparisons, samples, 0.9, seed=3))
    assert first["site"].unique(maintain_order=True).to_list() == summary["site"].unique(maintain_order=True).to_list()


def test_holm_adjusts_step_down_and_keeps_nan():
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, float("nan"), 0.001]) == pytest.approx([0.5, float("nan"), 0.002], nan_ok=True)
    assert holm([0.02, 0.011]) == [0.022, 0.022]  # monotone: never below an earlier step


def test_the_hierarchical_bootstrap_resamples_concepts_within_each_prompt_resample():
    rng = np.random.default_rng(0)
    # concepts differ (sd 1) and prompts add nothing: the means' spread is the concept mean's standard error
    per_concept = np.repeat(rng.normal(0, 1, 25)[:, None], 400, 1)
    means = hierarchical_means(per_concept, np.random.default_rng(1), draws=5)
    assert len(means) == 2000 and means.std() == pytest.approx(per_concept[:, 0].std() / 5, rel=0.15)
    # concepts alike and prompt resamples differ: the spread is the prompts'
    per_prompt = np.repeat(rng.normal(0, 0.3, 400)[None], 25, 0)
    assert hierarchical_means(per_prompt, np.random.default_rng(1)).std() == pytest.approx(0.3, rel=0.15)
    with_nan = per_concept.copy()
    with_nan[0] = np.nan  # an unmeasured concept is left out of every mean
    assert np.isfinite(hierarchical_means(with_nan, np.random.default_rng(2))).mean() > 0.99


def test_the_bootstrap_p_value_is_two_sided_and_never_zero():
    assert bootstrap_p_value(np.arange(1.0, 100.0)) == pytest.approx(2 / 100)
    assert bootstrap_p_value(np.linspace(-1, 1, 101)) == 1.0
    assert bootstrap_p_value(np.concatenate([np.full(90, 1.0), np.full(10, -1.0), [np.nan]])) == pytest.approx(22 / 101)
    assert math.isnan(bootstrap_p_value(np.array([np.nan])))


# --- helpers of the figures and intervals ---------------------------------------------------------

def test_bracketed_shares_count_the_units_with_a_number_at_each_level():
    summary = pl.DataFrame({"site": "mlp3", "unit_kind": ["feature"] * 4, "selection": "input",
                            "effect_at_kl_0.1": [0.1, None, float("nan"), 0.3],
                            "effect_down_at_kl_0.1": [0.1, 0.2, 0.3, 0.4]},
                           schema_overrides={"effect_at_kl_0.1": pl.Float64})
    shares = {(r["direction"]): r["bracketed"] for r in bracketed_shares(summary, [0.1]).iter_rows(named=True)}
    assert shares == {"up": 0.5, "down": 1.0}


def test_wilson_and_percentile_intervals():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert percentile_ci(np.arange(1001, dtype=float)) == pytest.approx((25.0, 975.0))
    assert percentile_ci(np.array([1.0, 3.0, np.nan, np.nan])) == (1.05, 2.95)  # half finite: enough
    assert all(math.isnan(v) for v in percentile_ci(np.array([1.0, 2.0, np.nan, np.nan, np.nan])))


def test_continuation_table_and_grid_concepts_leave_placebos_out_of_the_grid():
    rows = [{"concept": c, "selection": "input", "prompt_text": "The", "mode": m, "strength": s,
             "continuation": f"{c}/{m}/{s:g}", "perplexity": 2.0 + s}
            for c in ("a:x", "list:s") for m in ("greedy", "sampled") for s in (1.0, -1.0)]
    table = continuation_table(pl.DataFrame(rows))
    assert table.columns == ["concept", "selection", "prompt_text", "strength", "greedy", "sampled",
                             "perplexity_greedy", "perplexity_sampled"]
    assert table.row(0, named=True) == {"concept": "a:x", "selection": "input", "prompt_text": "The", "strength": -1.0,
                                        "greedy": "a:x/greedy/-1", "sampled": "a:x/sampled/-1",
                                        "perplexity_greedy": 1.0, "perplexity_sampled": 1.0}
    summary = pl.DataFrame({"concept": ["z:named", "list:suspicion", "b:weak", "c:strong", "placebo:00", "a:none"],
                            "site": "mlp3", "named": [True, True, False, False, False, False],
                            "placebo": [False, False, False, False, True, False], "unit_kind": "feature",
                            "selection": "input", "effect_at_kl_0.1": [0.0, 0.0, 0.1, 0.9, 5.0, None]},
                           schema_overrides={"effect_at_kl_0.1": pl.Float64})
    assert grid_concepts(summary, "mlp3", 3) == ["list:suspicion", "z:named", "c:strong", "b:weak", "a:none"]


def test_a_unit_without_a_selection_is_named_by_its_kind_alone():
    assert unit_label("feature", "input") == "feature (input)" and unit_label("diffmean", "") == "diffmean"
