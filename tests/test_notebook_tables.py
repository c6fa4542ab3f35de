"""The tables and choices the figure notebooks plot, on small hand-built tables with known answers:
the example units of the polysemanticity cards, the concept of each context token, and unit counts
(the clamping notebook's tables are tested in test_clamping_stats.py)."""

from __future__ import annotations

import polars as pl
import pytest

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
