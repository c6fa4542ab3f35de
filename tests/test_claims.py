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
