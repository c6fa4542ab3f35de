"""The study's claims on small hand-made tables: each verdict follows from its interval and bound, a
failing SAE is flagged (in the table and the log), and every claim family is present."""

from __future__ import annotations

import logging

import polars as pl
import pytest

from mechinterp.claims import ClaimsSettings, by_interval, study_claims

BOUNDS = ClaimsSettings(fvu_max=0.5, ce_recovered_min=0.7, dead_fraction_max=0.1, dense_fraction_max=0.05)


def lens_tables(rising: bool) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    rows = []
    for prompt in ("a", "b", "c"):
        for layer in range(6):
            rows.append({"prompt_id": prompt, "origin": "prompt", "target": " x", "layer": layer,
                         "log_prob": float(layer if rising else -layer)})
    rows += [{"prompt_id": "corpus_0", "origin": "corpus", "target": " y", "layer": layer, "log_prob": float(-layer)}
             for layer in range(6)]
    first = pl.DataFrame({"prompt_id": ["a", "b", "c", "corpus_0"], "origin": ["prompt"] * 3 + ["corpus"],
                          "target": [" x"] * 3 + [" y"], "first_layer_in_top_k": [3, None, 5, None]},
                         schema_overrides={"first_layer_in_top_k": pl.Int64})
    return {"max_final_abs_diff": 2e-5}, pl.DataFrame(rows), first


def tables(rising: bool = True):
    summary, targets, first = lens_tables(rising)
    metrics = pl.DataFrame({"sae": ["good", "dense"], "fvu": [0.2, 1.3], "ce_recovered": [0.95, 0.3],
                            "dead_fraction": [0.0, 0.0], "dense_fraction": [0.0, 1.0]})
    comparison = pl.DataFrame({"site": ["s1", "s2"], "sae": ["good", "dense"], "score": "monosemanticity",
                               "difference": [0.3, -0.1], "ci_low": [0.2, -0.3], "ci_high": [0.4, 0.1]})
    verdict = pl.DataFrame({"site": "mlp3", "feature_selection": ["input", "output", "output"],
                            "statistic": ["mean_difference", "mean_difference", "monotone"],
                            "baseline": ["random", "random", ""], "n_concepts": 8, "value": [0.01, 0.2, 0.9],
                            "ci_low": [-0.1, 0.1, 0.6], "ci_high": [0.1, 0.3, 0.98], "p_value": [0.6, 0.01, None]})
    return summary, targets, first, metrics, comparison, verdict


def test_verdicts_follow_the_interval_and_the_bound():
    assert by_interval(0.1, 0.3, 0.0) == "holds"
    assert by_interval(-0.3, -0.1, 0.0) == "fails"
    assert by_interval(-0.1, 0.1, 0.0) == "inconclusive"
    assert by_interval(float("nan"), 0.1, 0.0) == "inconclusive"


def test_every_claim_family_with_its_verdict(caplog):
    with caplog.at_level(logging.WARNING):
        claims = study_claims(*tables(), headline_site="mlp3", bounds=BOUNDS)
    verdict = dict(zip(claims["claim"], claims["verdict"], strict=True))
    assert verdict["logit_lens.final_layer_is_output"] == "holds"
    assert verdict["logit_lens.targets_rise_with_depth"] == "inconclusive"  # 3 of 3 rising: Wilson [0.44, 1]
    assert verdict["logit_lens.enters.a:x"] == "holds" and verdict["logit_lens.enters.b:x"] == "fails"
    assert not any(c.startswith("logit_lens.enters.corpus") for c in verdict)
    assert [verdict[f"sae.good.{m}"] for m in ("fvu", "ce_recovered", "dead_fraction", "dense_fraction")] == ["holds"] * 4
    assert verdict["sae.dense.fvu"] == verdict["sae.dense.dense_fraction"] == verdict["sae.dense.ce_recovered"] == "fails"
    assert "SAE dense fails its quality bound: fvu = 1.3" in caplog.text and "sae.good" not in caplog.text
    assert verdict["polysemanticity.good"] == "holds" and verdict["polysemanticity.dense"] == "inconclusive"
    assert verdict["clamping.mlp3.output_feature_beats_random"] == "holds"
    assert verdict["clamping.mlp3.input_feature_beats_random"] == "inconclusive"
    assert verdict["clamping.mlp3.output_feature_monotone"] == "holds"
    assert set(claims.columns) == {"claim", "statement", "statistic", "value", "ci_low", "ci_high", "bound", "verdict",
                                   "n_concepts"}
    by_name = dict(claims.select("claim", "n_concepts").iter_rows())
    assert by_name["clamping.mlp3.output_feature_beats_random"] == 8 and by_name["sae.good.fvu"] is None


def test_falling_targets_fail_the_depth_claim():
    summary, targets, first, metrics, comparison, verdict = tables(rising=False)
    more = pl.concat([targets.with_columns(pl.lit(f"p{i}").alias("prompt_id")) for i in range(4)])
    claims = study_claims(summary, more, first, metrics, comparison, verdict, "mlp3", BOUNDS)
    row = claims.filter(pl.col("claim") == "logit_lens.targets_rise_with_depth").row(0, named=True)
    assert row["value"] == 0 and row["verdict"] == "fails"
    broken = {"max_final_abs_diff": 0.5}
    claims = study_claims(broken, targets, first, metrics, comparison, verdict, "mlp3", BOUNDS)
    assert claims.filter(pl.col("claim") == "logit_lens.final_layer_is_output")["verdict"].item() == "fails"
    with pytest.raises(pl.exceptions.ColumnNotFoundError):
        study_claims(summary, targets.drop("log_prob"), first, metrics, comparison, verdict, "mlp3", BOUNDS)


def wilson_by_hand(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval, written out here (not the package's)."""
    z, p = 1.959964, successes / n
    centre, spread = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def test_each_claim_carries_its_statistic_interval_and_bound():
    claims = study_claims(*tables(), headline_site="mlp3", bounds=BOUNDS)
    row = {r["claim"]: r for r in claims.iter_rows(named=True)}
    output = row["logit_lens.final_layer_is_output"]
    assert (output["value"], output["bound"], output["ci_low"], output["ci_high"]) == (2e-5, 1e-4, None, None)
    depth = row["logit_lens.targets_rise_with_depth"]
    assert depth["value"] == 1.0 and depth["bound"] == 0.5  # 3 of 3 targets rise
    assert (depth["ci_low"], depth["ci_high"]) == pytest.approx(wilson_by_hand(3, 3), abs=1e-4)
    entered, missing = row["logit_lens.enters.a:x"], row["logit_lens.enters.b:x"]
    assert entered["value"] == 3 and entered["bound"] == 5  # entered at layer 3 of 0..5
    assert missing["value"] != missing["value"] and missing["verdict"] == "fails"  # NaN: never entered
    assert " x" in entered["statement"] and "a" in entered["statement"]
    for sae, fvu, ce in (("good", 0.2, 0.95), ("dense", 1.3, 0.3)):
        assert (row[f"sae.{sae}.fvu"]["value"], row[f"sae.{sae}.fvu"]["bound"]) == (fvu, 0.5)
        assert (row[f"sae.{sae}.ce_recovered"]["value"], row[f"sae.{sae}.ce_recovered"]["bound"]) == (ce, 0.7)
    assert row["sae.dense.dense_fraction"]["bound"] == 0.05 and row["sae.good.dead_fraction"]["bound"] == 0.1
    poly = row["polysemanticity.good"]
    assert (poly["value"], poly["ci_low"], poly["ci_high"], poly["bound"]) == (0.3, 0.2, 0.4, 0.0)
    beats = row["clamping.mlp3.output_feature_beats_random"]
    assert (beats["value"], beats["ci_low"], beats["ci_high"], beats["bound"]) == (0.2, 0.1, 0.3, 0.0)
    monotone = row["clamping.mlp3.output_feature_monotone"]
    assert (monotone["value"], monotone["ci_low"], monotone["ci_high"], monotone["bound"]) == (0.9, 0.6, 0.98, 0.5)
    assert not any(c.startswith("clamping.s1") for c in row)  # only the headline site's clamping claims


def test_a_single_target_is_a_share_of_one():
    summary, targets, first, metrics, comparison, verdict = tables()
    one = targets.filter(pl.col("prompt_id").is_in(["a", "corpus_0"]))
    claims = study_claims(summary, one, first, metrics, comparison, verdict, "mlp3", BOUNDS)
    depth = claims.filter(pl.col("claim") == "logit_lens.targets_rise_with_depth").row(0, named=True)
    assert depth["value"] == 1.0 and (depth["ci_low"], depth["ci_high"]) == pytest.approx(wilson_by_hand(1, 1), abs=1e-4)


def test_the_bounds_are_inclusive_and_a_bound_breach_is_a_failure():
    summary, targets, first, _, comparison, verdict = tables()
    at_bounds = pl.DataFrame({"sae": ["edge", "over"], "fvu": [0.5, 0.5001], "ce_recovered": [0.7, 0.6999],
                              "dead_fraction": [0.1, 0.1001], "dense_fraction": [0.05, 0.0501]})
    claims = study_claims(summary, targets, first, at_bounds, comparison, verdict, "mlp3", BOUNDS)
    verdict_of = dict(zip(claims["claim"], claims["verdict"], strict=True))
    for metric in ("fvu", "ce_recovered", "dead_fraction", "dense_fraction"):
        assert verdict_of[f"sae.edge.{metric}"] == "holds" and verdict_of[f"sae.over.{metric}"] == "fails", metric
    at_tolerance = study_claims({"max_final_abs_diff": 1e-4}, targets, first, at_bounds, comparison, verdict, "mlp3",
                                BOUNDS)
    assert at_tolerance.filter(pl.col("claim") == "logit_lens.final_layer_is_output")["verdict"].item() == "holds"
    assert by_interval(0.0, 0.3, 0.0) == "inconclusive" and by_interval(-0.3, 0.0, 0.0) == "inconclusive"
    assert by_interval(None, 0.3, 0.0) == "inconclusive"


def test_an_interval_with_either_end_missing_is_inconclusive():
    """An interval lacking either end (None or NaN) gives no verdict, even when the other end clears the bound."""
    for low, high in ((0.1, float("nan")), (float("nan"), -0.1), (0.1, None), (None, -0.1)):
        assert by_interval(low, high, 0.0) == "inconclusive", (low, high)


def test_each_claim_family_names_its_statement_and_statistic():
    """The statement and statistic columns say what each claim tests, in words a reader can check."""
    claims = study_claims(*tables(), headline_site="mlp3", bounds=BOUNDS)
    row = {r["claim"]: r for r in claims.iter_rows(named=True)}
    assert row["sae.good.fvu"]["statement"] == "good: fvu at most 0.5"
    assert row["sae.dense.ce_recovered"]["statement"] == "dense: ce_recovered at least 0.7"
    assert row["sae.good.fvu"]["statistic"] == "fvu"
    assert row["logit_lens.enters.a:x"]["statistic"] == "first layer in the top k"
    assert row["polysemanticity.good"]["statistic"] == "median(features) - median(neurons), monosemanticity"
    assert row["polysemanticity.good"]["statement"] == "good's features are more monosemantic than the units of s1"
    assert claims["statement"].null_count() == 0 and claims["statistic"].null_count() == 0


def test_without_clamping_claims_the_concept_count_is_still_an_integer_column():
    """No clamping verdict at the headline site: n_concepts is all null but keeps its integer type, so the
    claims tables of every run share one schema."""
    summary, targets, first, metrics, comparison, verdict = tables()
    claims = study_claims(summary, targets, first, metrics, comparison, verdict, "elsewhere", BOUNDS)
    assert not any(name.startswith("clamping.") for name in claims["claim"])
    assert claims.schema["n_concepts"] == pl.Int64 and claims["n_concepts"].null_count() == claims.height


def test_each_target_of_a_prompt_is_its_own_depth_trend():
    """The depth claim ranks each (prompt, target) on its own: a prompt whose second target falls counts
    as one rising and one falling target, not as one pooled (flat) trend."""
    summary, targets, first, metrics, comparison, verdict = tables()
    falling = pl.DataFrame([{"prompt_id": "a", "origin": "prompt", "target": " z", "layer": layer,
                             "log_prob": float(-layer)} for layer in range(6)])
    claims = study_claims(summary, pl.concat([targets, falling]), first, metrics, comparison, verdict, "mlp3", BOUNDS)
    depth = claims.filter(pl.col("claim") == "logit_lens.targets_rise_with_depth").row(0, named=True)
    assert depth["value"] == 0.75  # 3 of the 4 (prompt, target) pairs rise
    assert (depth["ci_low"], depth["ci_high"]) == pytest.approx(wilson_by_hand(3, 4), abs=1e-4)
