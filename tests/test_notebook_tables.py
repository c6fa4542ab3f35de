"""The tables and choices the figure notebooks plot, on small hand-built tables with known answers:
the example units of the polysemanticity cards, the concept of each context token, per-strength mean
clamping effects (which `summarise` uses too), the side-by-side continuations, and unit counts."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mechinterp.clamping import continuation_table, mean_effects, summarise
from mechinterp.polysemanticity import (compared_units, context_concepts, example_units, token_concept_labels,
                                        unit_status_counts)

UNIT_COLUMNS = ("site", "site_kind", "dictionary", "unit_kind", "unit", "status", "n_active", "monosemanticity")


def units_table(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"site": pl.Utf8, "site_kind": pl.Utf8, "dictionary": pl.Utf8,
                                      "unit_kind": pl.Utf8, "unit": pl.Int64, "status": pl.Utf8,
                                      "n_active": pl.Int64, "monosemanticity": pl.Float64}, orient="row")


@pytest.fixture()
def planted_units() -> pl.DataFrame:
    return units_table([
        # MLP neurons: unit 4 and unit 2 tie for the lowest score among alive ones; 2 has the lower index.
        ("mlp3", "mlp", "neurons", "neuron", 0, "alive", 300, 0.60),
        ("mlp3", "mlp", "neurons", "neuron", 4, "alive", 300, 0.10),
        ("mlp3", "mlp", "neurons", "neuron", 2, "alive", 300, 0.10),
        ("mlp3", "mlp", "neurons", "neuron", 3, "rare", 5, 0.01),  # not alive: never chosen
        ("mlp3", "mlp", "neurons", "neuron", 1, "dead", 0, None),
        # residual dimensions are less monosemantic still, but an MLP site was scored
        ("resid3", "resid", "neurons", "residual_dim", 0, "alive", 900, 0.0),
        # features of the MLP site: unit 7 is perfect but active on too few tokens; 5 and 6 tie on score,
        # 6 is active on more tokens
        ("mlp3", "mlp", "mlp3-relu", "feature", 5, "alive", 60, 0.95),
        ("mlp3", "mlp", "mlp3-relu", "feature", 6, "alive", 80, 0.95),
        ("mlp3", "mlp", "mlp3-relu", "feature", 7, "alive", 10, 1.00),
        ("mlp3", "mlp", "mlp3-relu", "feature", 8, "alive", 500, 0.20),
        ("mlp3", "mlp", "mlp3-relu", "feature", 9, "dead", 0, None),
        # a cleaner feature of another site is not the neuron's site
        ("resid3", "resid", "resid3-topk", "feature", 0, "alive", 900, 0.99),
    ])


def test_example_neuron_is_the_least_monosemantic_alive_mlp_neuron_and_feature_the_cleanest_of_its_site(
        planted_units):
    neuron, feature = example_units(planted_units)
    assert (neuron["site"], neuron["dictionary"], neuron["unit"]) == ("mlp3", "neurons", 2)
    assert (feature["site"], feature["dictionary"], feature["unit"]) == ("mlp3", "mlp3-relu", 6)
    assert set(UNIT_COLUMNS) <= set(neuron) and set(UNIT_COLUMNS) <= set(feature)
    # the table's order does not matter
    shuffled = planted_units.sample(fraction=1.0, shuffle=True, seed=3)
    assert [u["unit"] for u in example_units(shuffled)] == [2, 6]


def test_example_feature_falls_back_to_rarely_active_features_and_neuron_to_residual_dimensions(planted_units):
    _, feature = example_units(planted_units, min_feature_active=1000)  # no feature is active on 1000 tokens
    assert feature["unit"] == 7
    residual_only = planted_units.filter(pl.col("site") == "resid3")
    neuron, feature = example_units(residual_only)
    assert (neuron["unit_kind"], neuron["unit"]) == ("residual_dim", 0)
    assert (feature["dictionary"], feature["unit"]) == ("resid3-topk", 0)


def test_example_units_say_what_is_missing(planted_units):
    with pytest.raises(ValueError, match="no alive mlp neuron"):
        example_units(planted_units.filter((pl.col("dictionary") != "neurons") | (pl.col("status") != "alive")
                                           | (pl.col("site") != "mlp3")))
    with pytest.raises(ValueError, match="no alive SAE feature at site mlp3"):
        example_units(planted_units.filter(pl.col("dictionary") != "mlp3-relu"))


def test_token_concept_is_the_smallest_category_listing_it_else_the_document_source():
    lexicons = pl.DataFrame({
        "lexicon": ["geo"] * 3 + ["emo"] * 2 + ["zz", "aa"],
        "category": ["city", "city", "city", "place", "place", "one", "one"],
        "term": ["paris", "tokyo", "rome", "paris", "london", "rome", "rome"],
    })
    labels = token_concept_labels(lexicons)
    assert labels.columns == ["term", "concept"]
    assert dict(labels.iter_rows()) == {
        "paris": "emo:place",  # 2 terms beat 3
        "london": "emo:place",
        "tokyo": "geo:city",
        "rome": "aa:one",  # both single-term categories: the lexicon name decides
    }
    contexts = [{"token": " Paris", "source": "wiki"}, {"token": "TOKYO\n", "source": None},
                {"token": " the", "source": "news"}]
    assert context_concepts(contexts, labels) == ["emo:place", "geo:city", "source:news (no lexicon)"]
    assert context_concepts([], labels) == []


def effects_table(seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for concept, kind, unit in [("emo:joy", "feature", 11), ("emo:joy", "neuron", 3), ("geo:city", "feature", 2),
                                ("geo:city", "neuron", 40)]:
        for strength in (-1.0, 0.0, 1.0, 2.0):
            for prompt in range(3):
                concept_change, control_change = rng.normal(strength, 1.0), rng.normal(0.0, 0.5)
                rows.append({"concept": concept, "unit_kind": kind, "unit": unit, "strength": strength,
                             "prompt": prompt, "concept_logprob_change": concept_change,
                             "control_logprob_change": control_change,
                             "relative_effect": concept_change - control_change, "kl": float(rng.gamma(1.0 + strength))})
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)  # the input's order must not matter


def test_mean_effects_equal_direct_means_over_prompts():
    effects = effects_table()
    means = mean_effects(effects)
    keys = ["concept", "unit_kind", "unit", "strength"]
    values = ["concept_logprob_change", "control_logprob_change", "relative_effect", "kl"]
    assert means.columns == keys + values
    expected_keys = sorted(set(effects.select(keys).iter_rows()))
    assert means.select(keys).rows() == expected_keys  # one row per key, sorted
    for row in means.iter_rows(named=True):
        mask = np.ones(effects.height, dtype=bool)
        for key in keys:
            mask &= effects[key].to_numpy() == row[key]
        assert mask.sum() == 3
        for value in values:
            assert row[value] == pytest.approx(np.mean(effects[value].to_numpy()[mask]), rel=1e-12, abs=1e-12)


def test_summarise_is_built_on_the_mean_effects():
    effects = effects_table(seed=1)
    means = mean_effects(effects)
    summary = summarise(effects, equal_kl=0.5)
    assert summary.select("concept", "unit_kind", "unit").rows() == means.select(
        "concept", "unit_kind", "unit").unique(maintain_order=True).rows()
    for row in summary.iter_rows(named=True):
        group = means.filter((pl.col("concept") == row["concept"]) & (pl.col("unit") == row["unit"])
                             & (pl.col("unit_kind") == row["unit_kind"]))
        assert row["max_relative_effect"] == group["relative_effect"].max()
        assert row["max_kl"] == group["kl"].max()


def test_continuation_table_puts_greedy_and_sampled_side_by_side():
    rows = [{"concept": c, "unit_kind": "feature", "unit": 1, "prompt": p, "prompt_text": t, "mode": m, "strength": s,
             "continuation": f"{c}/{t}/{m}/{s:g}"}
            for c in ("geo:city", "emo:joy") for p, t in enumerate(["The", "A"]) for m in ("greedy", "sampled")
            for s in (2.0, -1.0)]
    table = continuation_table(pl.DataFrame(rows))
    assert table.columns == ["concept", "prompt_text", "strength", "greedy", "sampled"]
    assert table.select("concept", "prompt_text", "strength").rows() == sorted(
        (c, t, s) for c in ("geo:city", "emo:joy") for t in ("The", "A") for s in (2.0, -1.0))
    for r in table.iter_rows(named=True):
        assert r["greedy"] == f"{r['concept']}/{r['prompt_text']}/greedy/{r['strength']:g}"
        assert r["sampled"] == f"{r['concept']}/{r['prompt_text']}/sampled/{r['strength']:g}"


def test_unit_status_counts_and_compared_units(planted_units):
    counts = unit_status_counts(planted_units)
    assert counts.columns == ["site", "dictionary", "alive", "rare", "dead"]
    assert counts.rows() == [("mlp3", "mlp3-relu", 4, 0, 1), ("mlp3", "neurons", 3, 1, 1),
                             ("resid3", "neurons", 1, 0, 0), ("resid3", "resid3-topk", 1, 0, 0)]
    compared = compared_units(planted_units, "mlp3", "mlp3-relu")
    assert compared["status"].unique().to_list() == ["alive"] and set(compared["site"]) == {"mlp3"}
    assert sorted(compared.select("unit_type", "unit").rows()) == sorted(
        [("neuron", 0), ("neuron", 2), ("neuron", 4), ("mlp3-relu", 5), ("mlp3-relu", 6), ("mlp3-relu", 7),
         ("mlp3-relu", 8)])
    assert compared.columns == planted_units.columns + ["unit_type"]
