"""Polysemanticity scores on planted data: units built to respond to one concept, to several, to
everything, to one token, or never, must be scored and ranked accordingly; the identity dictionary
must give what a direct computation on the raw neurons gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechinterp.activations import ActivationCache
from mechinterp.polysemanticity import (IdentityDictionary, ScoringSettings, SparseCodes, accumulate, best_features,
                                        compare, score_site, token_concepts, unit_maxima)

from conftest import write_cache

CONCEPTS = {"fruit": [" apple", " pear", " plum", " fig"], "colour": [" red", " blue", " green", " pink"],
            "motion": [" run", " jump", " swim", " walk"]}
FILLER = [" the", " of", " and", " a", " to", " in", " is", " it"]
WORDS = [w for words in CONCEPTS.values() for w in words] + FILLER
SETTINGS = ScoringSettings(split="all", active_fraction=0.2, min_active=10, min_concept_words=3,
                           concept_unit_min_words=3, exclude_frequent_words=0, top_contexts=4, context_before=3,
                           context_after=2, concept_units=3, bootstrap_samples=100)


def planted_table(n_sequences: int = 200, length: int = 20, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(WORDS), (n_sequences, length)) + 10
    ids[:, 0] = 1  # BOS
    words = np.array(["<s>"] + [""] * 9 + WORDS, dtype=object)
    return pl.DataFrame({
        "sequence": np.repeat(np.arange(n_sequences), length), "position": np.tile(np.arange(length), n_sequences),
        "token_id": ids.flatten(), "token": words[ids.flatten()],
        "source": np.where(np.repeat(np.arange(n_sequences), length) % 2 == 0, "news", "reviews"),
        "label": np.where(np.repeat(np.arange(n_sequences), length) % 4 < 2, "x", "y")})


def lexicons() -> pl.DataFrame:
    rows = [("test", concept, w.strip()) for concept, words in CONCEPTS.items() for w in words]
    rows += [("test", "pair", "apple"), ("test", "pair", "red")]  # two tokens: a word pair, not a concept
    return pl.DataFrame(rows, schema=["lexicon", "category", "term"], orient="row")


def planted_neurons(table: pl.DataFrame, seed: int = 1) -> np.ndarray:
    """Unit 0: the fruit concept. 1: fruit, colour and motion. 2: everything. 3: never fires.
    4: fires on three tokens only. 5: the single token " apple"."""
    rng = np.random.default_rng(seed)
    tokens = table["token"].to_numpy()
    n = len(tokens)
    acts = np.zeros((n, 6), np.float32)
    in_concept = {c: np.isin(tokens, words) for c, words in CONCEPTS.items()}
    acts[:, 0] = in_concept["fruit"] * (1 + 0.1 * rng.random(n))
    acts[:, 1] = (in_concept["fruit"] | in_concept["colour"] | in_concept["motion"]) * (1 + 0.1 * rng.random(n))
    acts[:, 2] = rng.random(n)
    acts[:, 3] = -1.0
    acts[[5, 50, 500], 4] = 2.0
    acts[:, 5] = (tokens == " apple") * (1 + 0.1 * rng.random(n))
    return acts


@pytest.fixture
def planted(tmp_path):
    table = planted_table()
    cache = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", planted_neurons(table).astype(np.float16)))
    rows = np.flatnonzero(table["position"].to_numpy() != 0)
    return table, cache, rows


def test_planted_units_are_ranked_by_how_many_concepts_they_serve(planted):
    table, cache, rows = planted
    units, concepts, _, _ = score_site(cache, table, rows, {"neurons": IdentityDictionary(6)}, {"neurons": "neuron"},
                                 lexicons(), SETTINGS)
    by_unit = {r["unit"]: r for r in units.iter_rows(named=True)}
    assert [by_unit[u]["status"] for u in range(6)] == ["alive", "alive", "alive", "dead", "rare", "alive"]
    for unit in (3, 4):  # never or hardly firing: no score, rather than a perfect one
        assert by_unit[unit]["monosemanticity"] is None and by_unit[unit]["concept_specificity"] is None
    assert by_unit[3]["density_positive"] == 0
    mono = {u: by_unit[u]["monosemanticity"] for u in (0, 1, 2, 5)}
    assert mono[0] > 0.95 and mono[5] > 0.95
    assert mono[0] > mono[1] > mono[2]
    assert mono[1] < 0.4 and mono[2] < 0.1
    assert by_unit[0]["best_concept"] == "test:fruit" and by_unit[0]["concept_specificity"] > 0.95
    assert by_unit[5]["token_focus"] == pytest.approx(1.0) and by_unit[5]["effective_tokens"] == pytest.approx(1.0)
    assert by_unit[1]["effective_tokens"] == pytest.approx(12, rel=0.05)
    assert by_unit[2]["effective_tokens"] == pytest.approx(20, rel=0.05)
    assert "test:pair" not in set(concepts["concept"])  # too few tokens to be a concept
    fruit = concepts.filter(pl.col("concept") == "test:fruit").sort("rank")
    assert fruit["unit"][0] == 0 and fruit["concept_words_active"][0] == 4
    assert 5 not in fruit["unit"]  # one word, " apple": that word's unit, not the concept's
    contexts = by_unit[5]["top_contexts"]
    assert len(contexts) == 4 and all(c["token"] == " apple" and "[[ apple]]" in c["context"] for c in contexts)
    assert all(table["token"][c["row"]] == " apple" for c in contexts)
    assert by_unit[3]["top_contexts"] == []


def reference_scores(acts: np.ndarray, table: pl.DataFrame, rows: np.ndarray, active_fraction: float) -> dict:
    """The scores computed directly on a raw neuron matrix, one unit at a time, with numpy."""
    scored = table[rows]
    token_ids, tokens = scored["token_id"].to_numpy(), scored["token"].to_numpy()
    distinct = np.unique(token_ids)
    concept_rows = {f"test:{c}": np.isin(tokens, words) for c, words in CONCEPTS.items()}
    for column in ("source", "label"):
        for value in scored[column].unique():
            concept_rows[f"{column}:{value}"] = scored[column].to_numpy() == value
    out = {}
    for unit in range(acts.shape[1]):
        a = acts[rows, unit].astype(np.float64)
        active = a >= active_fraction * a.max()
        mass = np.where(active & (a > 0), a, 0.0)
        per_token = np.array([mass[token_ids == t].sum() for t in distinct])
        p = per_token[per_token > 0] / mass.sum()
        entropy = -(p * np.log(p)).sum()
        specificity = {c: (mass[m].sum() / mass.sum() - m.mean()) / (1 - m.mean()) for c, m in concept_rows.items()}
        best = max(specificity, key=specificity.get)
        out[unit] = {"density": (mass > 0).mean(), "effective_tokens": np.exp(entropy),
                     "token_focus": 1 - entropy / np.log(len(distinct)), "best_concept": best,
                     "concept_specificity": specificity[best]}
    return out


def test_identity_dictionary_scores_equal_direct_computation_on_raw_neurons(tmp_path):
    table = planted_table(seed=3)
    rng = np.random.default_rng(4)
    acts = (rng.standard_normal((table.height, 5)) + planted_neurons(table)[:, [0, 1, 2, 5, 0]]).astype(np.float16)
    rows = np.flatnonzero(table["position"].to_numpy() != 0)
    cache = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", acts))
    units, _, _, _ = score_site(cache, table, rows, {"neurons": IdentityDictionary(5)}, {"neurons": "neuron"}, lexicons(),
                          dataclasses.replace(SETTINGS, min_active=1))
    expected = reference_scores(acts.astype(np.float32), table, rows, SETTINGS.active_fraction)
    for row in units.iter_rows(named=True):
        want = expected[row["unit"]]
        assert row["best_concept"] == want["best_concept"]
        for score in ("density", "effective_tokens", "token_focus", "concept_specificity"):
            assert row[score] == pytest.approx(want[score], rel=1e-4, abs=1e-5), (row["unit"], score)


def test_feature_neuron_correlation_is_pearson(planted, tmp_path):
    table, cache, rows = planted
    torch.manual_seed(0)
    weights = torch.randn(6, 7)

    class ReluDictionary(torch.nn.Module):
        n_units = 7

        def encode(self, x):
            return torch.relu(x @ weights)

    dictionaries = {"neurons": IdentityDictionary(6), "features": ReluDictionary()}
    maxima, kept = unit_maxima(dictionaries, cache, rows, chunk=1000)
    token_index = np.unique(table[rows]["token_id"].to_numpy(), return_inverse=True)[1]
    acc = accumulate(dictionaries, cache, rows, token_index, int(token_index.max()) + 1,
                     np.full((len(rows), 2), -1), 0, maxima, 0.2, 3, neurons="neurons", chunk=1000)
    x = cache.rows(rows).numpy().astype(np.float64)
    f = np.maximum(x @ weights.numpy().astype(np.float64), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nan_to_num(np.corrcoef(f.T, x.T)[:7, 7:])  # the dead neuron has no variance: 0
    assert kept.all()
    np.testing.assert_allclose(acc["features"].correlation.numpy(), expected, atol=1e-4)
    top = acc["features"].top_values[:, 2].numpy()
    np.testing.assert_allclose(top, np.sort(f[:, 2])[::-1][:3], rtol=1e-5)
    # the browser's codes: every positive activation, row by row (chunked rows joined in order)
    codes = acc["features"].codes
    assert acc["neurons"].codes is None and codes.indptr[-1] == (f > 0).sum() == len(codes.values)
    dense = np.zeros_like(f)
    for i in range(len(rows)):
        span = slice(codes.indptr[i], codes.indptr[i + 1])
        assert (np.diff(codes.indices[span]) > 0).all()
        dense[i, codes.indices[span]] = codes.values[span]
    np.testing.assert_allclose(dense, f, rtol=1e-5, atol=1e-6)
    codes.save(tmp_path, "features")
    saved = SparseCodes.load(tmp_path, "features")
    np.testing.assert_array_equal(saved.values, codes.values)
    # each neuron's best-matching feature: the largest correlation in its column
    matches = best_features(acc)
    live = expected.max(0) > 0
    np.testing.assert_array_equal(matches["best_feature"].to_numpy()[live], expected.argmax(0)[live])
    assert set(matches["best_feature_sae"]) == {"features"}


def test_outlier_rows_are_left_out(planted):
    table, cache, rows = planted
    maxima, kept = unit_maxima({"neurons": IdentityDictionary(6)}, cache, rows, outlier_threshold=2.5)
    norms = cache.rows(rows).norm(dim=1).numpy()
    np.testing.assert_array_equal(kept, norms <= 2.5)
    assert not kept.all() and kept.any()


def test_comparison_interval_is_seeded_and_brackets_the_planted_difference():
    rng = np.random.default_rng(0)
    units = pl.DataFrame({
        "dictionary": ["neurons"] * 400 + ["sae"] * 600 + ["sae"] * 5, "status": ["alive"] * 1000 + ["dead"] * 5,
        **{score: np.r_[rng.normal(0.3, 0.1, 400), rng.normal(0.6, 0.1, 600), [np.nan] * 5]
           for score in ("monosemanticity", "concept_specificity", "token_focus", "effective_tokens", "density",
                         "monosemanticity_positive", "effective_tokens_positive", "density_positive")}})
    first, again = compare(units, 500, seed=1), compare(units, 500, seed=1)
    assert first.equals(again)
    row = first.filter(pl.col("score") == "monosemanticity").row(0, named=True)
    assert row["ci_low"] < 0.3 < row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.05
    assert row["n_features"] == 600 and row["n_dead_features"] == 5


def test_frequent_words_belong_to_no_concept_and_variants_share_a_word():
    lexicon = pl.DataFrame({"lexicon": "t", "category": "fruit", "term": ["apple", "pear", "plum", "the"]})
    tokens = [" apple", "Apple", " pear", " plum", " the"]
    names, members, word = token_concepts(tokens, np.array([5, 1, 2, 2, 100]), lexicon, 3, exclude_frequent=1)
    assert names == ["t:fruit"] and members[:, 0].tolist() == [1, 1, 1, 1, 0]
    assert word[0] == word[1] and len(set(word.tolist())) == 4
    assert token_concepts(tokens, np.array([5, 1, 2, 2, 100]), lexicon, 4, exclude_frequent=1)[0] == []


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**16))
def test_entropy_scores_equal_their_definitions(n_tokens, n_units, seed):
    from mechinterp.polysemanticity import entropy_scores

    rng = np.random.default_rng(seed)
    mass = rng.exponential(size=(n_tokens, n_units)) * (rng.random((n_tokens, n_units)) < 0.6)
    mass[:, 0] = 0  # a unit with no mass
    effective, focus = entropy_scores(torch.from_numpy(mass).float())
    for unit in range(n_units):
        total = mass[:, unit].sum()
        if total == 0:
            assert effective[unit].isnan() and (n_tokens == 1 or focus[unit].isnan())
            continue
        p = mass[:, unit][mass[:, unit] > 0] / total
        entropy = -(p * np.log(p)).sum()
        assert effective[unit] == pytest.approx(np.exp(entropy), rel=1e-4)
        assert 1 <= effective[unit] <= (mass[:, unit] > 0).sum() + 1e-3  # between one token and every token it fires on
        expected_focus = 1.0 if n_tokens == 1 else min(1.0, max(0.0, 1 - entropy / np.log(n_tokens)))
        assert focus[unit] == pytest.approx(expected_focus, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**16))
def test_specificity_is_zero_for_a_unit_that_ignores_its_concept_and_one_for_a_unit_on_it_alone(n_concepts, n_units, seed):
    from mechinterp.polysemanticity import concept_specificity

    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.uniform(0.05, 0.6, n_concepts)).float()
    total = torch.from_numpy(rng.uniform(1, 10, n_units)).float()
    # each unit's mass on each concept is that concept's base rate of its total: it ignores the concept
    ignoring = base[:, None] * total[None, :]
    best, share, specificity = concept_specificity(ignoring, total, base)
    assert torch.allclose(specificity, torch.zeros(n_units), atol=1e-5)
    assert torch.allclose(share, base[best], atol=1e-5)
    focused = torch.zeros(n_concepts, n_units)
    target = torch.from_numpy(rng.integers(0, n_concepts, n_units))
    focused[target, torch.arange(n_units)] = total  # all its mass on one concept
    best, share, specificity = concept_specificity(focused, total, base)
    assert torch.equal(best, target) and torch.allclose(share, torch.ones(n_units))
    assert torch.allclose(specificity, torch.ones(n_units), atol=1e-5)
    half = focused * 0.5 + ignoring * 0.5  # halfway: the specificity is linear in the share
    expected = ((0.5 + 0.5 * base[target]) - base[target]) / (1 - base[target])
    assert torch.allclose(concept_specificity(half, total, base)[2], expected.clamp_max(1), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.floats(-2, 2), st.integers(0, 2**16))
def test_bootstrap_median_difference_brackets_the_difference_and_is_seeded(n_features, n_neurons, shift, seed):
    from mechinterp.polysemanticity import bootstrap_median_difference

    rng = np.random.default_rng(seed)
    features, neurons = rng.normal(shift, 1, n_features), rng.normal(0, 1, n_neurons)
    features[0] = np.nan  # NaNs are left out
    diff, low, high = bootstrap_median_difference(features, neurons, 200, seed)
    assert diff == pytest.approx(np.median(features[1:]) - np.median(neurons))
    assert low <= high and min(features[1:]) - max(neurons) <= low and high <= max(features[1:]) - min(neurons)
    assert (diff, low, high) == bootstrap_median_difference(features, neurons, 200, seed)
    assert all(np.isnan(bootstrap_median_difference(np.array([np.nan]), neurons, 10, 0)))
