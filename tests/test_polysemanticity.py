"""Polysemanticity scores on planted data: units built to respond to one concept, to several, to
everything, to one token, or never, must be scored and ranked accordingly; the identity dictionary
must give what a direct computation on the raw neurons gives; the tables the polysemanticity notebook plots
(its example units, each context token's concept, unit counts) on hand-built tables with known answers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechinterp.activations import ActivationCache
from mechinterp.polysemanticity import (COMPARED_SCORES, IdentityDictionary, ScoringSettings, SparseCodes, accumulate,
                                        best_features, compare, score_site, token_concepts, unit_maxima)

from conftest import topk_sae, write_cache

CONCEPTS = {"fruit": [" apple", " pear", " plum", " fig"], "colour": [" red", " blue", " green", " pink"],
            "motion": [" run", " jump", " swim", " walk"]}
FILLER = [" the", " of", " and", " a", " to", " in", " is", " it"]
WORDS = [w for words in CONCEPTS.values() for w in words] + FILLER
SETTINGS = ScoringSettings(split="all", active_fraction=0.2, min_active=10, min_concept_words=3,
                           concept_unit_min_words=3, exclude_frequent_words=0, top_contexts=4, context_before=3,
                           context_after=2, concept_units=3, bootstrap_samples=100, controls=True,
                           matched_bin_min_units=3)


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


def concept_memberships(scored: pl.DataFrame) -> dict[str, np.ndarray]:
    """Each planted concept's rows, by its words and by each document source and label, as boolean masks."""
    tokens = scored["token"].to_numpy()
    rows = {f"test:{c}": np.isin(tokens, words) for c, words in CONCEPTS.items()}
    for column in ("source", "label"):
        for value in scored[column].unique():
            rows[f"{column}:{value}"] = scored[column].to_numpy() == value
    return rows


def reference_scores(acts: np.ndarray, table: pl.DataFrame, rows: np.ndarray, active_fraction: float) -> dict:
    """The scores computed directly on a raw neuron matrix, one unit at a time, with numpy."""
    scored = table[rows]
    token_ids = scored["token_id"].to_numpy()
    distinct = np.unique(token_ids)
    concept_rows = concept_memberships(scored)
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
                     np.full((len(rows), 2), -1), 0, maxima, 0.2, 3, np.arange(len(rows)), neurons="neurons",
                     chunk=1000)
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
        "unit_kind": ["neuron"] * 400 + ["feature"] * 605, "n_active": rng.integers(10, 1000, 1005),
        **{score: np.r_[rng.normal(0.3, 0.1, 400), rng.normal(0.6, 0.1, 600), [np.nan] * 5]
           for score in COMPARED_SCORES}})
    first, again = compare(units, 500, seed=1, min_bin_units=3), compare(units, 500, seed=1, min_bin_units=3)
    assert first.equals(again)
    assert set(first["baseline"]) == {"neurons"} and set(first["score"]) == {*COMPARED_SCORES, "monosemanticity_matched"}
    row = first.filter(pl.col("score") == "monosemanticity").row(0, named=True)
    assert row["ci_low"] < 0.3 < row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.05
    mono = units["monosemanticity"].to_numpy()
    assert row["difference"] == pytest.approx(np.median(mono[400:1000]) - np.median(mono[:400]))
    assert row["median_features"] - row["median_neurons"] == pytest.approx(row["difference"])
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


# ---------------------------------------------------------------------------------------------------
# Boundaries and the full score_site path with an SAE beside the neurons
# ---------------------------------------------------------------------------------------------------

class ReluFeatures(torch.nn.Module):
    """A stand-in SAE: ReLU of a fixed random projection of the site's activations."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights
        self.n_units = weights.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weights)


def test_a_unit_active_on_exactly_min_active_tokens_is_alive_and_counts_them(planted):
    """`rare` means fewer than min_active active tokens: unit 4 fires on two scored tokens (its third
    planted row is a BOS), so it is alive at min_active = 2 and rare at 3, and n_active says 2."""
    table, cache, rows = planted
    planted_rows = np.array([5, 50, 500])
    n_fired = int(np.isin(planted_rows, rows).sum())
    assert n_fired == 2
    by_min_active = {}
    for min_active in (n_fired, n_fired + 1):
        units, _, _, _ = score_site(cache, table, rows, {"neurons": IdentityDictionary(6)}, {"neurons": "neuron"},
                                    lexicons(), dataclasses.replace(SETTINGS, min_active=min_active))
        by_min_active[min_active] = units.row(4, named=True)
    assert by_min_active[2]["status"] == "alive" and by_min_active[3]["status"] == "rare"
    assert by_min_active[2]["n_active"] == by_min_active[3]["n_active"] == 2
    assert by_min_active[2]["monosemanticity"] is not None and by_min_active[3]["monosemanticity"] is None


def test_score_site_leaves_out_outliers_and_matches_each_neuron_to_its_most_correlated_feature(planted):
    """With an SAE beside the neurons: rows above the outlier threshold are not scored, every SAE
    feature names its most correlated neuron (numpy Pearson on the kept rows), the SAE's positive
    activations come back as codes, and each neuron names its best feature."""
    table, cache, rows = planted
    weights = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    dictionaries = {"neurons": IdentityDictionary(6), "relu": ReluFeatures(weights)}
    threshold = 2.0
    units, concepts, scored_rows, codes = score_site(cache, table, rows, dictionaries,
                                                     {"neurons": "neuron", "relu": "feature"}, lexicons(),
                                                     SETTINGS, outlier_threshold=threshold)
    x = cache.rows(rows).numpy().astype(np.float64)
    kept = np.linalg.norm(x, axis=1) <= threshold
    assert 0 < kept.sum() < len(rows)
    np.testing.assert_array_equal(scored_rows, rows[kept])
    assert set(units["n_scored_tokens"]) == {int(kept.sum())}
    x = x[kept]
    f = np.maximum(x @ weights.numpy().astype(np.float64), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nan_to_num(np.corrcoef(f.T, x.T)[:5, 5:])  # [features, neurons]; the dead neuron: 0
    features = units.filter(pl.col("dictionary") == "relu").sort("unit")
    assert features["unit_kind"].unique().to_list() == ["feature"]
    varying = f.std(0) > 0
    assert varying.any()
    np.testing.assert_array_equal(features["best_neuron"].to_numpy()[varying], r.argmax(1)[varying])
    np.testing.assert_allclose(features["best_neuron_correlation"].to_numpy()[varying], r.max(1)[varying], atol=1e-4)
    assert list(codes) == ["relu"] and codes["relu"].indptr[-1] == (f > 0).sum()
    neurons = units.filter(pl.col("dictionary") == "neurons").sort("unit")
    live = r.max(0) > 0
    np.testing.assert_array_equal(neurons["best_feature"].to_numpy()[live], r.argmax(0)[live])
    assert set(concepts["dictionary"]) <= {"neurons", "relu"}
    assert {"concept", "rank", "unit", "share", "base_rate", "specificity", "concept_words_active"} <= set(
        concepts.columns)


def concept_specificities(acts: np.ndarray, table: pl.DataFrame, rows: np.ndarray, active_fraction: float
                          ) -> dict[tuple[int, str], tuple[float, float]]:
    """(unit, concept) -> (share, specificity) on the active-view mass, one unit at a time."""
    scored = table[rows]
    concept_rows = concept_memberships(scored)
    out = {}
    for unit in range(acts.shape[1]):
        a = acts[rows, unit].astype(np.float64)
        mass = np.where((a >= active_fraction * a.max()) & (a > 0), a, 0.0)
        for concept, member in concept_rows.items():
            share = mass[member].sum() / mass.sum()
            out[unit, concept] = share, (share - member.mean()) / (1 - member.mean())
    return out


def test_concept_ranking_uses_the_active_view_of_each_unit(tmp_path):
    """The concept table ranks units by their specificity on active-view mass (at least
    active_fraction of the maximum), not on every positive activation: on noisy neurons the two
    differ, and each listed (unit, concept) matches the direct computation, best first."""
    table = planted_table(seed=3)
    rng = np.random.default_rng(4)
    acts = (rng.standard_normal((table.height, 5)) + planted_neurons(table)[:, [0, 1, 2, 5, 0]]).astype(np.float16)
    rows = np.flatnonzero(table["position"].to_numpy() != 0)
    cache = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", acts))
    _, concepts, _, _ = score_site(cache, table, rows, {"neurons": IdentityDictionary(5)}, {"neurons": "neuron"},
                                   lexicons(), dataclasses.replace(SETTINGS, min_active=1, concept_units=5,
                                                                   concept_unit_min_words=1))
    expected = concept_specificities(acts.astype(np.float32), table, rows, SETTINGS.active_fraction)
    assert set(concepts["concept"]) == {"test:fruit", "test:colour", "test:motion", "source:news", "source:reviews",
                                        "label:x", "label:y"}
    for row in concepts.iter_rows(named=True):
        share, specificity = expected[row["unit"], row["concept"]]
        assert row["share"] == pytest.approx(share, rel=1e-4, abs=1e-5)
        assert row["specificity"] == pytest.approx(specificity, rel=1e-4, abs=1e-5), (row["unit"], row["concept"])
    for (concept,), ranked in concepts.group_by("concept"):
        assert ranked.sort("rank")["specificity"].is_sorted(descending=True), concept


def test_top_contexts_mark_the_token_within_its_own_sequence_window():
    """A context is up to `before` tokens before and `after` tokens after its row, never crossing into
    another sequence, with the row's token marked [[like this]]; contexts stop at the first
    non-positive activation."""
    from mechinterp.polysemanticity import top_contexts

    table = pl.DataFrame({"sequence": [0, 0, 0, 0, 0, 1, 1, 1], "position": [0, 1, 2, 3, 4, 0, 1, 2],
                          "token": ["<s>", " A", " B", " C", " D", "<s>", " E", " F"],
                          "source": ["news"] * 5 + ["wiki"] * 3, "label": ["x"] * 8})
    rows = np.array([1, 2, 3, 4, 6, 7])
    # one unit; top entries point into `rows`: table rows 3, 4, 1, then a zero activation
    top_rows = torch.tensor([[2], [3], [0], [5]])
    top_values = torch.tensor([[3.0], [2.0], [1.0], [0.0]])
    (contexts,) = top_contexts(top_rows, top_values, rows, table, before=2, after=1)
    assert [c["context"] for c in contexts] == [" A B[[ C]] D", " B C[[ D]]", "<s>[[ A]] B"]
    assert [(c["row"], c["token"], c["activation"], c["source"]) for c in contexts] == [
        (3, " C", 3.0, "news"), (4, " D", 2.0, "news"), (1, " A", 1.0, "news")]
    (across,) = top_contexts(torch.tensor([[4]]), torch.tensor([[1.0]]), rows, table, before=5, after=5)
    assert across[0]["context"] == "<s>[[ E]] F" and across[0]["source"] == "wiki"


def test_sparse_codes_load_memory_maps_what_save_wrote(tmp_path):
    """The browser opens every SAE's codes: `load` maps the files rather than reading them whole."""
    codes = SparseCodes.from_dense(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
    codes.save(tmp_path, "sae")
    loaded = SparseCodes.load(tmp_path, "sae")
    assert all(isinstance(getattr(loaded, part), np.memmap) for part in SparseCodes.FILES)
    assert loaded.indptr.tolist() == [0, 1, 3, 3] and loaded.indices.tolist() == [1, 0, 2]
    assert loaded.values.tolist() == [2.0, 1.0, 3.0]


# ---------------------------------------------------------------------------------------------------
# The stage's setup and checks: dictionaries of a site, refusing a dictionary with no alive unit
# ---------------------------------------------------------------------------------------------------

def saved_sae(folder: Path, d_in: int, d_sae: int, outlier_threshold: float) -> Path:
    """A TopK SAE saved as train_sae leaves it: SAELens files and a training summary."""
    sae = topk_sae(d_in, d_sae, k=2)
    sae.save(folder, metadata={})
    (folder / "training_summary.json").write_text(json.dumps({"outlier_threshold": outlier_threshold}))
    return folder


def test_site_dictionaries_are_the_neurons_and_each_sae_with_the_lowest_outlier_threshold(tmp_path):
    """An MLP site's own units are "neurons" of kind neuron, each SAE is a dictionary of features, and
    the outlier threshold is the lowest of the SAEs' (none: every row is kept)."""
    from mechinterp.polysemanticity import site_dictionaries

    mlp = ActivationCache.open(write_cache(tmp_path / "mlp1.npy", np.zeros((4, 6), np.float16), site="mlp1"))
    folders = [str(saved_sae(tmp_path / name, 6, d_sae, t)) for name, d_sae, t in (("a", 8, 9.5), ("b", 12, 4.0))]
    dictionaries, unit_kinds, threshold = site_dictionaries(mlp, ["sae-a", "sae-b"], folders)
    assert list(dictionaries) == ["neurons", "sae-a", "sae-b"]
    assert [d.n_units for d in dictionaries.values()] == [6, 8, 12]
    assert isinstance(dictionaries["neurons"], IdentityDictionary)
    assert unit_kinds == {"neurons": "neuron", "sae-a": "feature", "sae-b": "feature"}
    assert threshold == 4.0
    resid = ActivationCache.open(write_cache(tmp_path / "resid1.npy", np.zeros((4, 5), np.float16), site="resid1"))
    dictionaries, unit_kinds, threshold = site_dictionaries(resid, [], [])
    assert list(dictionaries) == ["neurons"] and dictionaries["neurons"].n_units == 5
    assert unit_kinds == {"neurons": "residual_dim"} and threshold == float("inf")
    with pytest.raises(ValueError):  # an SAE id without its folder is a wiring slip, not a smaller site
        site_dictionaries(mlp, ["sae-a", "sae-b"], folders[:1])


def status_table(statuses: dict[str, list[str]]) -> pl.DataFrame:
    """A units table with only what check_alive_units reads: each dictionary's unit statuses."""
    return pl.DataFrame({"dictionary": [d for d, s in statuses.items() for _ in s],
                         "status": [x for s in statuses.values() for x in s], "n_scored_tokens": 100})


def test_check_alive_units_refuses_no_alive_unit_and_warns_below_half(caplog):
    """A dictionary with no alive unit stops the stage, naming the setting to change; fewer than half
    alive is only a warning, and half or more says nothing."""
    from mechinterp.errors import UserError
    from mechinterp.polysemanticity import check_alive_units

    with caplog.at_level("WARNING", logger="mechinterp.polysemanticity"):
        check_alive_units(status_table({"neurons": ["alive", "alive", "rare", "dead"],
                                        "sae": ["alive", "alive", "alive", "dead"]}), min_active=10)
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="mechinterp.polysemanticity"):
        check_alive_units(status_table({"neurons": ["alive", "alive"], "sae": ["alive", "rare", "rare", "dead"]}),
                          min_active=10)
    assert len(caplog.records) == 1 and "1 of the 4 units of sae" in caplog.records[0].getMessage()
    with pytest.raises(UserError, match="0 of the 2 units of sae .*polysemanticity.min_active"):
        check_alive_units(status_table({"neurons": ["alive"], "sae": ["rare", "dead"]}), min_active=10)


# ---------------------------------------------------------------------------------------------------
# The polysemanticity notebook's tables and choices
# ---------------------------------------------------------------------------------------------------

def notebook_units(rows: list[tuple]) -> pl.DataFrame:
    """A units table with the columns the notebook's choices read."""
    return pl.DataFrame(rows, schema={"site": pl.Utf8, "site_kind": pl.Utf8, "layer": pl.Int64, "dictionary": pl.Utf8,
                                      "unit_kind": pl.Utf8, "unit": pl.Int64, "status": pl.Utf8,
                                      "n_active": pl.Int64, "monosemanticity": pl.Float64}, orient="row")


@pytest.fixture()
def site_units() -> pl.DataFrame:
    """Three sites. mlp2: alive neurons 1 and 3 tie at 0.20 (1 first on index), 0 at 0.70; alive topk
    features 1 (0.30), 2 and 5 (0.90, 2 first on index), 4 (1.00); a control scores 0.50 and is no
    SAE. mlp1 has neurons but no SAE, so it shows no card. resid2 has a lower layer than mlp2."""
    return notebook_units([
        ("mlp2", "mlp", 2, "neurons", "neuron", 0, "alive", 200, 0.70),
        ("mlp2", "mlp", 2, "neurons", "neuron", 3, "alive", 200, 0.20),
        ("mlp2", "mlp", 2, "neurons", "neuron", 1, "alive", 200, 0.20),
        ("mlp2", "mlp", 2, "neurons", "neuron", 2, "rare", 3, 0.05),
        ("mlp2", "mlp", 2, "neurons", "neuron", 4, "dead", 0, None),
        ("mlp1", "mlp", 1, "neurons", "neuron", 0, "alive", 200, 0.50),
        ("resid2", "resid", 0, "neurons", "residual_dim", 0, "alive", 800, 0.01),
        ("resid2", "resid", 0, "neurons", "residual_dim", 1, "alive", 800, 0.30),
        ("mlp2", "mlp", 2, "topk", "feature", 2, "alive", 70, 0.90),
        ("mlp2", "mlp", 2, "topk", "feature", 5, "alive", 90, 0.90),
        ("mlp2", "mlp", 2, "topk", "feature", 4, "alive", 8, 1.00),
        ("mlp2", "mlp", 2, "topk", "feature", 1, "alive", 400, 0.30),
        ("mlp2", "mlp", 2, "topk", "feature", 0, "dead", 0, 1.00),  # a dead feature is never the example
        ("mlp2", "mlp", 2, "topk", "feature", 3, "rare", 60, 0.99),
        ("mlp2", "mlp", 2, "control:random_init:topk", "control", 0, "alive", 50, 0.50),  # sorts before topk
        ("resid2", "resid", 0, "resid2-relu", "feature", 0, "alive", 800, 0.98),
        ("resid2", "resid", 0, "resid2-relu", "feature", 1, "alive", 800, 0.40),
    ])


def test_example_cards_are_the_median_neuron_and_feature_of_the_first_mlp_site_with_both(site_units):
    """The lower median by monosemanticity (ties: unit index) of the alive neurons and of the alive
    features of the first MLP site with both, whatever the table order; controls are not features."""
    from mechinterp.polysemanticity import example_units

    for order in (site_units, site_units.reverse(), site_units.sample(fraction=1.0, shuffle=True, seed=5)):
        neuron, feature = example_units(order)
        assert (neuron["site"], neuron["dictionary"], neuron["unit"]) == ("mlp2", "neurons", 3)
        assert (feature["site"], feature["dictionary"], feature["unit"]) == ("mlp2", "topk", 2)
        assert set(neuron) == set(site_units.columns) == set(feature)  # whole rows come back


def test_example_cards_fall_back_to_a_residual_site_and_say_when_no_site_has_both(site_units):
    from mechinterp.polysemanticity import example_units

    neuron, feature = example_units(site_units.filter(pl.col("site") == "resid2"))
    assert (neuron["unit_kind"], neuron["unit"]) == ("residual_dim", 0)
    assert (feature["dictionary"], feature["unit"]) == ("resid2-relu", 1)
    with pytest.raises(ValueError, match="no site has both"):
        example_units(site_units.filter(pl.col("unit_kind") != "feature"))


def test_token_concept_label_is_the_smallest_category_listing_the_term_else_the_document_source():
    """Each term's concept is its smallest category (ties: lexicon, then category name); a context's
    token is stripped and lower-cased before the look-up, and unlisted tokens name their source."""
    from mechinterp.polysemanticity import context_concepts, token_concept_labels

    lexicons_table = pl.DataFrame({
        "lexicon": ["geo", "geo", "geo", "geo", "emo", "emo", "emo", "zz", "aa", "aa", "ab"],
        "category": ["city", "city", "city", "city", "joy", "joy", "calm", "big", "big", "big", "big"],
        "term": ["paris", "rome", "oslo", "lima", "paris", "glee", "rome", "oslo", "oslo", "lima", "lima"],
    })
    # sizes: geo:city 4, emo:joy 2, emo:calm 1, zz:big 1, aa:big 2, ab:big 1. Pooled over lexicons "big"
    # would have 4 rows, so the lexicon matters for a category's size.
    labels = token_concept_labels(lexicons_table)
    assert labels.columns == ["term", "concept"]
    assert dict(labels.iter_rows()) == {"paris": "emo:joy", "rome": "emo:calm", "oslo": "zz:big", "lima": "ab:big",
                                        "glee": "emo:joy"}
    contexts = [{"token": " Rome", "source": "wiki"}, {"token": "OSLO\n", "source": None},
                {"token": " Glee ", "source": "news"}, {"token": " Berlin", "source": "news"}]
    assert context_concepts(contexts, labels) == ["emo:calm", "zz:big", "emo:joy", "source:news (no lexicon)"]
    assert context_concepts([], labels) == []


def test_unit_status_counts_fill_missing_statuses_with_zero_and_compared_units_keep_the_alive_ones(site_units):
    """Counts per (site, dictionary), sorted, with 0 where a dictionary has no unit of a status; the
    compared units are the alive neurons and features of one site and SAE, typed by unit kind or SAE."""
    from mechinterp.polysemanticity import compared_units, unit_status_counts

    counts = unit_status_counts(site_units.sample(fraction=1.0, shuffle=True, seed=2))
    assert counts.columns == ["site", "dictionary", "alive", "rare", "dead"]
    assert counts.rows() == [("mlp1", "neurons", 1, 0, 0), ("mlp2", "control:random_init:topk", 1, 0, 0),
                             ("mlp2", "neurons", 3, 1, 1), ("mlp2", "topk", 4, 1, 1),
                             ("resid2", "neurons", 2, 0, 0), ("resid2", "resid2-relu", 2, 0, 0)]
    assert unit_status_counts(site_units.filter(pl.col("status") == "alive")).columns == ["site", "dictionary", "alive"]
    compared = compared_units(site_units, "mlp2", "topk")
    assert compared.columns == site_units.columns + ["unit_type"]
    assert sorted(compared.select("unit_type", "unit").rows()) == sorted(
        [("neuron", 0), ("neuron", 1), ("neuron", 3), ("topk", 1), ("topk", 2), ("topk", 4), ("topk", 5)])
    resid = compared_units(site_units, "resid2", "resid2-relu")
    assert sorted(resid.select("unit_type", "unit").rows()) == sorted(
        [("residual_dim", 0), ("residual_dim", 1), ("resid2-relu", 0), ("resid2-relu", 1)])


def test_compare_counts_the_dead_neurons_of_the_site():
    """n_dead_neurons counts the neurons whose status is dead (not the features', not the rare ones)."""
    scores = {score: [0.5] * 9 for score in COMPARED_SCORES}
    units = pl.DataFrame({"dictionary": ["neurons"] * 6 + ["sae"] * 3, "unit_kind": ["neuron"] * 6 + ["feature"] * 3,
                          "status": ["alive", "dead", "dead", "rare", "dead", "alive", "alive", "dead", "alive"],
                          "n_active": [20] * 9, **scores})
    row = compare(units, 20, seed=0, min_bin_units=1).row(0, named=True)
    assert (row["n_dead_neurons"], row["n_dead_features"]) == (3, 1)


def test_a_row_without_a_source_or_label_has_index_minus_one_there():
    """row_concepts: each row's concept index for its source and its label, -1 where it has none."""
    from mechinterp.polysemanticity import row_concepts

    names, index = row_concepts(["wiki", None, ""], [None, "spam", "spam"])
    assert names == ["label:spam", "source:wiki"]
    assert index.dtype == np.int64 and index.tolist() == [[1, -1], [-1, 0], [-1, 0]]


def test_specificity_never_exceeds_one_when_the_concept_mass_rounds_above_the_total():
    """A unit's concept mass summed in another order can round a little above its total mass: the
    specificity is still capped at exactly 1 (the whole mass on the concept)."""
    from mechinterp.polysemanticity import concept_specificity

    total = torch.tensor([1.0, 2.0])
    concept_mass = torch.tensor([[1.0 + 1e-3, 0.5], [0.0, 2.0 * (1 + 1e-3)]])
    _, _, specificity = concept_specificity(concept_mass, total, torch.tensor([0.2, 0.3]))
    assert specificity.tolist() == [1.0, 1.0]


def test_write_codes_saves_the_scored_rows_as_int64_and_each_saes_codes(tmp_path):
    """The codes folder holds rows.npy (the rows scored, in order, as int64) and each SAE's SparseCodes."""
    from mechinterp.polysemanticity import write_codes

    codes = SparseCodes.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    write_codes(np.array([7, 3], dtype=np.int32), {"sae": codes}, tmp_path / "codes")
    rows = np.load(tmp_path / "codes" / "rows.npy")
    assert rows.dtype == np.int64 and rows.tolist() == [7, 3]
    assert SparseCodes.load(tmp_path / "codes", "sae").values.tolist() == [2.0, 1.0]


# ---------------------------------------------------------------------------------------------------
# The null matched on activity, the activity-matched comparison and the controls (issue 27)
# ---------------------------------------------------------------------------------------------------

def random_token_table(n_sequences: int = 400, length: int = 50, vocabulary: int = 200, seed: int = 0) -> pl.DataFrame:
    """Uniformly random tokens " w0" ... from a vocabulary, BOS first, two sources and two labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocabulary, (n_sequences, length)) + 10
    ids[:, 0] = 1
    names = np.array(["<s>"] + [""] * 9 + [f" w{i}" for i in range(vocabulary)], dtype=object)
    sequence = np.repeat(np.arange(n_sequences), length)
    return pl.DataFrame({"sequence": sequence, "position": np.tile(np.arange(length), n_sequences),
                         "token_id": ids.flatten(), "token": names[ids.flatten()],
                         "source": np.where(sequence % 2 == 0, "news", "reviews"),
                         "label": np.where(sequence % 4 < 2, "x", "y")})


def random_word_lexicons(vocabulary: int = 200) -> pl.DataFrame:
    """Ten categories of ten words each, so the best-of-many-concepts bias is there to be matched."""
    return pl.DataFrame({"lexicon": "t", "category": [f"c{i // 10}" for i in range(100)],
                         "term": [f"w{i}" for i in range(100)]})


def test_units_on_random_tokens_score_at_their_null_and_a_one_token_unit_far_above_it(tmp_path):
    """40 units each fire on 10 (or 40) random tokens: monosemanticity far above 0 (token focus rewards
    few active tokens), but their excess over the activity-matched null is 0 on average. A unit on every
    occurrence of one token (about 100) has a large excess. The null keeps each unit's active count."""
    table = random_token_table()
    rows = np.flatnonzero(table["position"].to_numpy() != 0)
    rng = np.random.default_rng(1)
    acts = np.zeros((table.height, 81), np.float32)
    for unit in range(80):
        fired = rng.choice(rows, 10 if unit < 40 else 40, replace=False)
        acts[fired, unit] = 1 + rng.random(len(fired))
    one_token = table["token"].to_numpy() == " w7"
    acts[:, 80] = one_token * (1 + rng.random(table.height))
    cache = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", acts.astype(np.float16)))
    excess = []
    for seed in range(3):
        units, _, _, _ = score_site(cache, table, rows, {"neurons": IdentityDictionary(81)}, {"neurons": "neuron"},
                                    random_word_lexicons(), SETTINGS, seed=seed)
        assert (units["status"] == "alive").all()
        excess.append(units["monosemanticity_excess"].to_numpy())
        assert units["monosemanticity"][:40].median() > 0.4  # the density effect the null removes
        focus_excess = units["token_focus"].to_numpy() - units["token_focus_null"].to_numpy()
        np.testing.assert_allclose(units["token_focus_excess"].to_numpy(), focus_excess)
    excess = np.array(excess)
    for few in (slice(0, 40), slice(40, 80)):
        assert abs(excess[:, few].mean()) < 0.03
    assert excess[:, 80].min() > 0.5
    assert units["n_active"][80] == int(one_token[rows].sum()) > 50


def test_the_null_keeps_each_units_values_and_threshold_and_is_the_score_when_nothing_moves(planted):
    """With the identity permutation the null view is the active view: null scores equal the scores and
    every excess is 0. With a permutation every unit keeps its total active mass and active count."""
    from mechinterp.polysemanticity import row_concepts

    table, cache, rows = planted
    dictionaries = {"neurons": IdentityDictionary(6)}
    maxima, _ = unit_maxima(dictionaries, cache, rows)
    scored = table[rows]
    token_index = np.unique(scored["token_id"].to_numpy(), return_inverse=True)[1]
    names, row_index = row_concepts(scored["source"].to_list(), scored["label"].to_list())
    for identity, order in ((True, np.arange(len(rows))), (False, np.random.default_rng(0).permutation(len(rows)))):
        acc = accumulate(dictionaries, cache, rows, token_index, int(token_index.max()) + 1, row_index, len(names),
                         maxima, 0.2, 3, order)["neurons"]
        torch.testing.assert_close(acc.token_mass["null"].sum(0), acc.token_mass["active"].sum(0))
        torch.testing.assert_close(acc.row_concept_mass["null"].sum(0), acc.row_concept_mass["active"].sum(0))
        assert torch.equal(acc.token_mass["null"], acc.token_mass["active"]) == identity
    units, _, _, _ = score_site(cache, table, rows, dictionaries, {"neurons": "neuron"}, lexicons(), SETTINGS)
    alive = units.filter(pl.col("status") == "alive")
    assert alive["monosemanticity_null"].is_not_null().all() and alive["concept_specificity_null"].is_not_null().all()
    assert units.filter(pl.col("status") != "alive")["monosemanticity_excess"].is_null().all()


def test_matched_difference_is_zero_for_one_distribution_at_different_activity_and_finds_a_planted_shift():
    """Scores that depend on activity only (falling with log2 n_active): features fire on few tokens,
    neurons on many, so the raw median difference is large; within bins of activity it is 0, with a CI
    around 0. A shift of +0.2 planted in every feature is found, with a CI around it."""
    from mechinterp.polysemanticity import bootstrap_median_difference, matched_difference

    rng = np.random.default_rng(0)
    active_f = np.round(2 ** rng.uniform(3, 9, 3000)).astype(int)
    active_n = np.round(2 ** rng.uniform(6, 12, 1000)).astype(int)

    def score(active: np.ndarray) -> np.ndarray:
        return 1 - np.log2(active) / 12 + rng.normal(0, 0.05, len(active))

    features, neurons = score(active_f), score(active_n)
    raw = bootstrap_median_difference(features, neurons, 200, seed=0)
    assert raw[1] > 0.15
    matched = matched_difference(features, active_f, neurons, active_n, 5, 200, seed=0)
    assert matched["ci_low"] < 0 < matched["ci_high"] and matched["ci_high"] - matched["ci_low"] < 0.05
    assert abs(matched["difference"]) < 0.02 and matched["n_bins"] == 3  # bins 6, 7 and 8 hold both groups
    shifted = matched_difference(features + 0.2, active_f, neurons, active_n, 5, 200, seed=0)
    assert shifted["ci_low"] < 0.2 < shifted["ci_high"]
    assert shifted["difference"] == pytest.approx(matched["difference"] + 0.2)
    none = matched_difference(features, np.full(3000, 4), neurons, np.full(1000, 4000), 5, 200, seed=0)
    assert none["n_bins"] == 0 and np.isnan(none["difference"])


def test_compare_sets_each_sae_and_control_against_the_neurons_and_each_sae_against_each_control():
    rng = np.random.default_rng(0)
    kinds = {"neurons": "neuron", "sae": "feature", "control:random_init:sae": "control", "control:pca": "control"}
    units = pl.DataFrame({"dictionary": [d for d in kinds for _ in range(50)],
                          "unit_kind": [k for k in kinds.values() for _ in range(50)], "status": "alive",
                          "n_active": rng.integers(10, 100, 200),
                          **{score: rng.random(200) for score in COMPARED_SCORES}})
    comparison = compare(units, 50, seed=0, min_bin_units=3)
    pairs = set(comparison.select("sae", "baseline").iter_rows())
    assert pairs == {("sae", "neurons"), ("control:pca", "neurons"), ("control:random_init:sae", "neurons"),
                     ("sae", "control:pca"), ("sae", "control:random_init:sae")}
    assert comparison.select("sae", "baseline", "score").is_unique().all()
    against_control = comparison.filter(pl.col("baseline") == "control:pca")
    assert set(against_control["score"]) == {"monosemanticity_excess"}
    assert set(comparison.filter(pl.col("sae") == "control:pca")["score"]) == {"monosemanticity_excess",
                                                                              "monosemanticity_matched"}
    row = against_control.filter(pl.col("score") == "monosemanticity_excess").row(0, named=True)
    at = units.filter(pl.col("dictionary") == "sae")["monosemanticity_excess"].median()
    assert row["median_features"] == pytest.approx(at)


def saved_site_saes(tmp_path: Path, d_in: int) -> dict[str, torch.nn.Module]:
    """A trained-looking TopK SAE (k 3) and a ReLU SAE, with random weights."""
    from conftest import relu_sae

    generator = torch.Generator().manual_seed(3)
    saes = {"topk": topk_sae(d_in, 32, k=3), "relu": relu_sae(d_in, 64)}
    with torch.no_grad():
        for sae in saes.values():
            sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=generator))
            sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=generator) - 6)
    return saes


def test_controls_are_random_topk_codes_untrained_saes_negated_units_and_other_bases(tmp_path):
    """The random-directions code has k active per row (the TopK SAE's k; the ReLU SAE's mean L0) over
    unit-norm random directions, uncentred; the untrained copy is the SAE as training initialises it
    (same seed); the negated units are -x; at a residual site the principal axes of the scored rows
    (decorrelated, by decreasing variance) and a random rotation, each also negated."""
    from mechinterp.polysemanticity import LinearDictionary, control_dictionaries
    from mechinterp.saes.base import geometric_median

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 8)) * np.linspace(3, 0.5, 8) + 2).astype(np.float16)
    cache = ActivationCache.open(write_cache(tmp_path / "resid0.npy", x))
    rows = np.arange(600)
    saes = saved_site_saes(tmp_path, 8)
    controls = control_dictionaries(cache, rows, saes, outlier_threshold=float("inf"), seed=5, sample_size=600)
    assert set(controls) == {f"control:{name}" for name in (
        "neurons_negative", "random_directions:topk", "random_init:topk", "random_directions:relu", "random_init:relu",
        "pca", "pca_negative", "rotation", "rotation_negative")}
    data = cache.rows(rows)
    relu_l0 = round(float((saes["relu"].encode(data) > 0).sum(1).float().mean()))
    assert 3 < relu_l0 < 20
    for sae_id, k in (("topk", 3), ("relu", relu_l0)):
        directions = controls[f"control:random_directions:{sae_id}"]
        a = directions.encode(data)
        assert a.shape == (600, saes[sae_id].d_sae) and ((a > 0).sum(1) == k).all()
        torch.testing.assert_close(directions.W_dec.norm(dim=1), torch.ones(saes[sae_id].d_sae))
        torch.testing.assert_close(directions.W_enc, directions.W_dec.T)
        assert (directions.b_dec == 0).all() and (directions.b_enc == 0).all()
        untrained = controls[f"control:random_init:{sae_id}"]
        assert type(untrained) is type(saes[sae_id]) and untrained.settings == saes[sae_id].settings
        fresh = type(saes[sae_id])(8, saes[sae_id].settings)
        fresh.initialise(data, torch.Generator().manual_seed(5))
        torch.testing.assert_close(untrained.W_dec, fresh.W_dec)
        torch.testing.assert_close(untrained.b_dec, geometric_median(data))
    torch.testing.assert_close(controls["control:neurons_negative"].encode(data), -data)
    pca = controls["control:pca"]
    assert isinstance(pca, LinearDictionary)
    projected = pca.encode(data).double()
    covariance = np.cov(projected.numpy().T)
    variances = np.diag(covariance)
    assert (np.diff(variances) < 0).all()
    np.testing.assert_allclose(covariance - np.diag(variances), 0, atol=1e-3 * variances.max())
    np.testing.assert_allclose(projected.mean(0).numpy(), 0, atol=1e-3)
    rotation = controls["control:rotation"].basis
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(8), atol=1e-5, rtol=0)
    for name in ("pca", "rotation"):
        torch.testing.assert_close(controls[f"control:{name}_negative"].encode(data),
                                   -controls[f"control:{name}"].encode(data))
    mlp = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", x, site="mlp0"))
    assert set(control_dictionaries(mlp, rows, {}, float("inf"), seed=5)) == {"control:neurons_negative"}


def test_negated_neurons_score_as_the_positive_side_of_the_negated_activations(planted, tmp_path):
    """The neurons_negative control gives exactly the scores the neurons of -x get (same rows, seed)."""
    table, cache, rows = planted
    acts = planted_neurons(table) - 0.5
    cache = ActivationCache.open(write_cache(tmp_path / "mlp0.npy", acts.astype(np.float16)))
    negated = ActivationCache.open(write_cache(tmp_path / "mlp1.npy", (-acts).astype(np.float16)))
    units, concepts, _, codes = score_site(
        cache, table, rows, {"neurons": IdentityDictionary(6), "control:neurons_negative": IdentityDictionary(6, True)},
        {"neurons": "neuron", "control:neurons_negative": "control"}, lexicons(), SETTINGS, seed=3)
    reference, _, _, _ = score_site(negated, table, rows, {"neurons": IdentityDictionary(6)}, {"neurons": "neuron"},
                                    lexicons(), SETTINGS, seed=3)
    control = units.filter(pl.col("dictionary") == "control:neurons_negative")
    assert (control["unit_kind"] == "control").all() and control["top_contexts"].is_null().all()
    assert set(concepts["dictionary"]) == {"neurons"} and codes == {}  # a control is only scored
    assert (control["status"] == "alive").sum() >= 3
    for column in ("status", "n_active", "best_concept"):
        assert control[column].to_list() == reference[column].to_list(), column
    for column in ("max_activation", "density", "token_focus", "concept_specificity", "monosemanticity",
                   "monosemanticity_null", "monosemanticity_excess"):
        assert control[column].to_list() == pytest.approx(reference[column].to_list(), nan_ok=True), column


def test_polysemanticity_claims_use_the_matched_difference_and_the_excess_over_each_control():
    from mechinterp.claims import polysemanticity_claims

    def row(sae, baseline, score, difference, low, high):
        return {"site": "mlp1", "sae": sae, "baseline": baseline, "score": score, "difference": difference,
                "ci_low": low, "ci_high": high, "n_bins": 3 if score == "monosemanticity_matched" else None}

    comparison = pl.DataFrame([
        row("mlp1-topk", "neurons", "monosemanticity", 0.3, 0.2, 0.4),  # the raw difference: no claim
        row("mlp1-topk", "neurons", "monosemanticity_matched", 0.05, -0.01, 0.1),
        row("mlp1-topk", "control:random_init:mlp1-topk", "monosemanticity_excess", 0.2, 0.1, 0.3),
        row("mlp1-topk", "control:random_init:mlp1-topk", "monosemanticity", 0.5, 0.4, 0.6),
        row("mlp1-topk", "control:random_directions:mlp1-topk", "monosemanticity_excess", -0.2, -0.3, -0.1),
        row("control:pca", "neurons", "monosemanticity_matched", 0.5, 0.4, 0.6),  # a control makes no claim
    ])
    claims = {c["claim"]: c for c in polysemanticity_claims(comparison)}
    assert {name: c["verdict"] for name, c in claims.items()} == {
        "polysemanticity.mlp1-topk.beyond_activity": "inconclusive",
        "polysemanticity.mlp1-topk.beats_random_init": "holds",
        "polysemanticity.mlp1-topk.beats_random_directions": "fails"}
    matched = claims["polysemanticity.mlp1-topk.beyond_activity"]
    assert (matched["value"], matched["ci_low"], matched["ci_high"], matched["bound"]) == (0.05, -0.01, 0.1, 0.0)
    assert "within log2 bins of active tokens (3 bins" in matched["statement"]
    assert claims["polysemanticity.mlp1-topk.beats_random_init"]["value"] == 0.2


def test_activity_curves_give_median_score_and_null_per_log2_bin():
    from mechinterp.polysemanticity import activity_curves

    units = pl.DataFrame({"site": "s", "dictionary": ["neurons"] * 4 + ["sae"] * 2, "unit_kind": "x",
                          "status": ["alive"] * 5 + ["rare"], "n_active": [8, 15, 16, 100, 9, 3],
                          "monosemanticity": [0.1, 0.3, 0.5, 0.9, 0.7, 1.0],
                          "monosemanticity_null": [0.0, 0.2, 0.4, 0.8, 0.1, 1.0]})
    curves = activity_curves(units, "s")
    columns = ("dictionary", "bin", "n_units", "monosemanticity", "monosemanticity_null", "n_active")
    assert curves.select(columns).rows() == [
        ("neurons", 3, 2, pytest.approx(0.2), pytest.approx(0.1), 8.0), ("neurons", 4, 1, 0.5, 0.4, 16.0),
        ("neurons", 6, 1, 0.9, 0.8, 64.0), ("sae", 3, 1, 0.7, 0.1, 8.0)]
