"""The study's claims assembled from every stage's table: each verdict follows from its interval and
bound, every family is present, every claim that has a null or control names it, and the entry point
reads the files the rule passes. Each family's own statistics are tested with its stage (test_logit_lens,
test_tuned_lens, test_train_sae, test_polysemanticity, test_crosscoder, test_toy_superposition)."""

from __future__ import annotations

import json
import logging

import polars as pl
import pytest

from mechinterp.claims import ClaimsSettings, StudyTables, by_interval, clamping_claims, main, study_claims

BOUNDS = ClaimsSettings(fvu_max=0.5, ce_increase_max=0.1, kl_max=0.1, dead_fraction_max=0.1, dense_fraction_max=0.05)


def study_tables() -> StudyTables:
    """One small table per stage, shaped as the stages write them."""
    first_layer = pl.DataFrame({
        "prompt_id": ["a", "a", "b", "corpus_0"], "origin": ["prompt", "prompt", "prompt", "corpus"],
        "target": [" x", " y", " z", " w"], "rise_percentile": [0.9, 0.8, 0.95, 0.1],
        "top_rise_percentile": [0.7, 0.7, 0.6, 0.5], "ranked_at_output": [True, True, False, True],
        "entry": ["before_last", "at_last", "never", "before_last"]})
    kl_rows = []
    for lens in ("logit", "bias_only", "constant"):
        kl_rows += [{"position_kind": "other", "lens": lens, "layer": layer, "excess_over_tuned": 1.0,
                     "excess_ci_low": 0.5, "excess_ci_high": 1.5} for layer in range(3)]
        kl_rows.append({"position_kind": "other", "lens": lens, "layer": None, "excess_over_tuned": 1.0,
                        "excess_ci_low": 0.5, "excess_ci_high": 1.5})
    sae_metrics = pl.DataFrame({
        "sae": ["good", "dense"], "ce_increase": [0.05, 0.3], "ce_increase_ci_low": [0.03, 0.2],
        "ce_increase_ci_high": [0.07, 0.4], "kl_sae": [0.04, 0.3], "kl_sae_ci_low": [0.02, 0.05],
        "kl_sae_ci_high": [0.06, 0.5], "n_loss_windows": [16, 16], "fvu": [0.2, 1.3], "dead_fraction": [0.0, 0.0],
        "dense_fraction": [0.0, 1.0]})
    comparison = pl.DataFrame({
        "site": "s1", "sae": "good", "baseline": ["neurons", "control:random_init:good",
                                                  "control:random_directions:good", "neurons"],
        "score": ["monosemanticity_matched", "monosemanticity_excess", "monosemanticity_excess", "monosemanticity"],
        "difference": [0.1, 0.2, -0.1, 0.3], "ci_low": [0.05, 0.1, -0.2, 0.2], "ci_high": [0.15, 0.3, 0.0, 0.4],
        "n_bins": [7, None, None, None]})
    # the clamping verdict: mean differences with Bonferroni (family) intervals over the site's 3 tests; a placebo
    # family's row, which no claim reads
    verdict = pl.DataFrame({"site": "mlp3", "feature_selection": ["input", "output", "output", "output", "output"],
                            "concepts": ["real", "real", "real", "real", "placebo"],
                            "statistic": ["mean_difference", "mean_difference", "effect_beyond_placebo", "monotone",
                                          "mean_difference"],
                            "baseline": ["random", "random", "placebo", "", "random"], "n_concepts": [8, 8, 8, 8, 4],
                            "value": [0.01, 0.2, 0.15, 0.9, 0.3], "ci_low": [-0.1, 0.1, 0.02, 0.6, 0.2],
                            "ci_high": [0.1, 0.3, 0.3, 0.98, 0.4], "family_ci_low": [-0.2, 0.05, -0.01, None, 0.1],
                            "family_ci_high": [0.2, 0.35, 0.32, None, 0.5], "p_value": [0.6, 0.01, 0.03, None, 0.01],
                            "p_holm": [0.6, 0.03, 0.06, None, 0.02]})
    crosscoder = pl.DataFrame({
        "kind": ["crosscoder", "crosscoder", "sae"], "fvu": [0.3, 0.4, 0.2], "dead_fraction": [0.01, 0.01, 0.0],
        "dense_fraction": [0.0, 0.0, 0.0], "n_loss_windows": [16, 16, 16], "ce_increase": [0.2, 0.3, 0.1],
        "ce_increase_ci_low": [0.15, 0.2, 0.05], "ce_increase_ci_high": [0.25, 0.4, 0.15], "kl": [0.2, 0.3, 0.1],
        "kl_ci_low": [0.15, 0.2, 0.05], "kl_ci_high": [0.25, 0.4, 0.15]})
    match_rates = pl.DataFrame({
        "site": "s1", "dictionary": ["crosscoder", "second seed", "random directions"], "match_cosine": 0.7,
        "n_units": [1000, 1000, 1000], "n_matched": [100, 400, 0], "match_rate": [0.1, 0.4, 0.0]})
    toy = pl.DataFrame({"represented": [True] * 10 + [False] * 10, "recovered": [True] * 9 + [False] * 11})
    return StudyTables({"max_final_abs_diff": 2e-5, "random_rise_share": 0.9}, first_layer, pl.DataFrame(kl_rows),
                       sae_metrics, comparison, verdict, crosscoder, match_rates, toy)


def test_verdicts_follow_the_interval_and_the_bound():
    assert by_interval(0.1, 0.3, 0.0) == "holds"
    assert by_interval(-0.3, -0.1, 0.0) == "fails"
    assert by_interval(-0.1, 0.1, 0.0) == "inconclusive"
    assert by_interval(float("nan"), 0.1, 0.0) == "inconclusive"
    assert by_interval(0.0, 0.3, 0.0) == "inconclusive" and by_interval(-0.3, 0.0, 0.0) == "inconclusive"
    for low, high in ((0.1, float("nan")), (float("nan"), -0.1), (0.1, None), (None, -0.1)):
        assert by_interval(low, high, 0.0) == "inconclusive", (low, high)


def test_every_claim_family_with_its_verdict(caplog):
    with caplog.at_level(logging.WARNING):
        claims = study_claims(study_tables(), headline_site="mlp3", bounds=BOUNDS)
    verdict = dict(zip(claims["claim"], claims["verdict"], strict=True))
    families = {name.split(".")[0] for name in verdict}
    assert families == {"logit_lens", "tuned_lens", "sae", "polysemanticity", "clamping", "crosscoder", "toy"}
    assert verdict["logit_lens.final_layer_is_output"] == "holds"
    assert verdict["tuned_lens.beats_constant"] == "holds"
    assert verdict["sae.good.ce_increase"] == "holds" and verdict["sae.dense.ce_increase"] == "fails"
    assert verdict["sae.dense.kl_sae"] == "inconclusive"  # [0.05, 0.5] spans the bound 0.1
    assert "SAE dense fails its quality bound: fvu = 1.3" in caplog.text
    assert verdict["polysemanticity.good.beyond_activity"] == "holds"
    assert verdict["polysemanticity.good.beats_random_init"] == "holds"
    assert verdict["polysemanticity.good.beats_random_directions"] == "inconclusive"
    assert verdict["clamping.mlp3.output_feature_beats_random"] == "holds"
    assert verdict["clamping.mlp3.input_feature_beats_random"] == "inconclusive"
    assert verdict["clamping.mlp3.output_feature_beyond_placebo"] == "inconclusive"  # its family interval spans 0
    assert verdict["clamping.mlp3.output_feature_monotone"] == "holds"
    assert verdict["crosscoder.s1_matches_beyond_second_seed"] == "fails"  # 10% against a second seed's 40%
    assert verdict["toy.sae_recovers_represented_features"] == "holds"
    assert not any("cross-layer" in s for s in claims["statement"])  # the crosscoder cannot show that
    assert set(claims.columns) == {"claim", "statement", "statistic", "value", "ci_low", "ci_high", "bound", "verdict",
                                   "n_concepts", "against"}


def test_every_comparative_claim_names_its_null_or_control():
    """A claim is against a null or a control unless it is a tolerance (the lens at the last layer) or a
    quality bar (an SAE's bounds); those, and only those, leave `against` empty."""
    claims = study_claims(study_tables(), headline_site="mlp3", bounds=BOUNDS)
    bars = claims.filter(pl.col("against").is_null())["claim"].to_list()
    assert all(c == "logit_lens.final_layer_is_output" or c.startswith(("sae.", "crosscoder.")) for c in bars), bars
    assert not any(c.endswith("matches_beyond_second_seed") for c in bars)
    against = dict(claims.select("claim", "against").iter_rows())
    assert against["logit_lens.targets_rise_beyond_random"] == "random vocabulary tokens of the same prompt"
    assert against["polysemanticity.good.beats_random_init"] == "the same SAE untrained"
    assert against["clamping.mlp3.output_feature_beats_random"] == ("the mean of the random features of the pool, clamped "
                                                                    "for the same concept, at equal KL")
    assert against["clamping.mlp3.output_feature_beyond_placebo"].startswith("placebo concepts")


def test_only_the_headline_sites_clamping_claims_with_their_concept_count():
    tables = study_tables()
    rows = {r["claim"]: r for r in clamping_claims(tables.clamping_verdict, "mlp3")}
    assert len(rows) == 4  # 3 tests of the real concepts and 1 monotone share; no placebo family row
    beats = rows["clamping.mlp3.output_feature_beats_random"]  # judged by its family (Bonferroni) interval
    assert (beats["value"], beats["ci_low"], beats["ci_high"], beats["bound"], beats["n_concepts"]) == (
        0.2, 0.05, 0.35, 0.0, 8)
    assert "Holm p = 0.03" in beats["statement"] and "Bonferroni" in beats["statistic"]
    monotone = rows["clamping.mlp3.output_feature_monotone"]
    assert (monotone["value"], monotone["bound"]) == (0.9, 0.5)
    assert clamping_claims(tables.clamping_verdict, "elsewhere") == []
    claims = study_claims(tables, "elsewhere", BOUNDS)
    assert claims.schema["n_concepts"] == pl.Int64 and claims["n_concepts"].null_count() == claims.height


def test_the_entry_point_reads_each_table_the_rule_passes(tmp_path):
    tables = study_tables()
    args = []
    for name in StudyTables.__dataclass_fields__:
        value = getattr(tables, name)
        if isinstance(value, dict):
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(value))
        else:
            path = tmp_path / f"{name}.parquet"
            value.write_parquet(path)
        args += [f"--{name.replace('_', '-')}", str(path)]
    settings = {"fvu_max": 0.5, "ce_increase_max": 0.1, "kl_max": 0.1, "dead_fraction_max": 0.1,
                "dense_fraction_max": 0.05}
    main([*args, "--headline-site", "mlp3", "--settings", json.dumps(settings), "--out", str(tmp_path / "c.parquet")])
    written = pl.read_parquet(tmp_path / "c.parquet")
    expected = study_claims(tables, "mlp3", BOUNDS)
    assert written.equals(expected)
    with pytest.raises(SystemExit):  # a table the rule forgot: argparse names it
        main([*args[:-2], "--headline-site", "mlp3", "--settings", json.dumps(settings), "--out", "x"])
