"""The toy model of superposition: dense features with as many dimensions as features learn none;
sparse ones share fewer dimensions; an SAE on the hidden layer of the model the feature table describes
finds its represented features above chance, and only those; a latent shared by two features recovers
one; the chance line is a random direction's best cosine."""

import dataclasses
import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from mechinterp.claims import toy_claims
from mechinterp.errors import UserError
from mechinterp.toy_superposition import (ToySettings, chance_cosines, feature_geometry, main, main_models,
                                          one_to_one_matches, phase_diagram, recovery_table, sae_recovery,
                                          train_toy_models)

SETTINGS = ToySettings(n_features=20, n_hidden=5, importance_decay=0.7, sparsities=[0.0, 0.99], phase_grid=3,
                       steps=1000, batch_size=512, lr=0.01, sae_d_sae=20, sae_k=2, sae_steps=800, sae_sparsity=0.99)


def geometry(n: int, m: int, sparsity: float, decay: float = 0.7) -> dict[str, np.ndarray]:
    importance = (decay ** torch.arange(n, dtype=torch.float32))[None]
    W = train_toy_models(n, m, torch.tensor([sparsity]), importance, SETTINGS, seed=0)[0][0]
    return feature_geometry(W)


def test_dense_features_with_a_dimension_each_are_not_superposed():
    g = geometry(6, 6, 0.0)
    assert g["represented"].all() and not g["superposed"].any()
    np.testing.assert_allclose(g["norm"], 1.0, atol=0.1)


def test_dense_features_in_fewer_dimensions_keep_the_most_important():
    g = geometry(20, 5, 0.0)
    assert list(np.flatnonzero(g["represented"])) == [0, 1, 2, 3, 4] and not g["superposed"].any()


def test_very_sparse_features_are_packed_in_superposition():
    g = geometry(20, 5, 0.99)
    assert g["represented"].sum() >= 8  # more features than the 5 dimensions
    assert g["superposed"].sum() >= 8


def test_the_phase_diagram_runs_from_the_important_feature_alone_to_superposition():
    phase = phase_diagram(dataclasses.replace(SETTINGS, phase_grid=3), seed=0)
    dense = phase.filter(phase["sparsity"] == 0.0).sort("relative_importance")["phase"].to_list()
    assert (dense[0], dense[-1]) == ("feature 1 alone", "feature 2 alone")  # importance 0.1 and 10 (1 is a tie)
    sparsest = phase.filter(phase["sparsity"] == phase["sparsity"].max()).sort("relative_importance")
    assert sparsest["phase"][1] == "superposition"  # equally important and sparse: both, antipodally
    assert sparsest.filter(sparsest["phase"] == "superposition")["antipodal"].all()


def test_the_representation_and_superposition_cuts():
    # columns: a unit feature, one of norm 0.55 (represented) and one of 0.45 (not); the last overlaps the
    # first by 0.33 or 0.30, an interference of 0.109 (superposed) or 0.090 (not) on the first
    for overlap, superposed in ((0.33, True), (0.30, False)):
        W = torch.tensor([[1.0, 0.0, 0.0, overlap], [0.0, 0.55, 0.0, 0.0], [0.0, 0.0, 0.45, 0.0]])
        g = feature_geometry(W)
        assert g["represented"].tolist() == [True, True, False, False]
        np.testing.assert_allclose(g["interference"], [overlap**2, 0.0, 0.0, 1.0], atol=1e-6)
        assert g["superposed"].tolist() == [superposed, False, False, False]


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(("m", "expected"), [(3, 0.9), (2, math.cos(0.05 * math.pi))])
def test_the_chance_threshold_is_a_random_directions_95th_percentile(m, expected):
    # one row: the cosine of a uniform direction with it is uniform on [-1, 1] in 3 dimensions
    # (Archimedes), cos(uniform angle) in 2, so its 95th percentile is 0.9 and cos(pi / 20)
    row = torch.eye(m)[:1]
    recovery = recovery_table(row, torch.eye(m), seed=0)
    assert recovery["chance_threshold"][0] == pytest.approx(expected, abs=0.01)
    assert recovery["chance_median"][0] == pytest.approx(0.0, abs=0.02)
    # more rows, a higher chance: the 20 rows in 5 dimensions have a median near 0.78
    rows = unit_rows(torch.randn(20, 5, generator=torch.Generator().manual_seed(0)))
    sampled = chance_cosines(rows, 20_000, np.random.default_rng(1))
    assert 0.7 < float(sampled.median()) < 0.85


def test_a_decoder_with_the_planted_directions_recovers_them_and_a_random_one_scores_at_chance():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(5, 12, generator=generator)
    planted = torch.cat([unit_rows(W.T), unit_rows(torch.randn(8, 5, generator=generator))])[torch.randperm(20)]
    recovery = recovery_table(planted, W, seed=0)
    assert recovery["recovered"].all() and recovery["matched_cosine"].min() > 0.999
    # random features against a random decoder: 5% beat the 95th percentile of chance, fewer once matched
    features = torch.randn(5, 4000, generator=generator)
    at_chance = recovery_table(unit_rows(torch.randn(20, 5, generator=generator)), features, seed=1)
    assert (at_chance["best_cosine"] > at_chance["chance_threshold"]).mean() == pytest.approx(0.05, abs=0.015)
    assert at_chance["recovered"].sum() <= 20


def test_a_latent_shared_by_two_features_recovers_one():
    features = unit_rows(torch.tensor([[1.0, 0.1, 0, 0, 0], [1.0, -0.1, 0, 0, 0], [0, 0, 1.0, 0, 0]])).T
    decoder = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 0, 1.0], [0, 0, 0, -1.0, 0]])
    recovery = recovery_table(decoder, features, seed=0)
    assert recovery["best_latent"].to_list() == [0, 0, 1]  # both of the first two features are closest to latent 0
    assert recovery["recovered"].to_list() in ([True, False, True], [False, True, True])
    assert one_to_one_matches(torch.tensor([[0.9, 0.8], [0.7, 0.1]])).tolist() == [0, 1]
    assert one_to_one_matches(torch.tensor([[0.9, 0.8, 0.5]])).tolist() == [0, -1, -1]  # more features than latents
    # a weak feature (norm 0.1) exactly along the latent a strong one is near: the latent goes to the strong one
    weak = torch.cat([features[:, :1], 0.1 * unit_rows(torch.tensor([[1.0, 0, 0, 0, 0]])).T, features[:, 2:]], 1)
    recovery = recovery_table(decoder, weak, seed=0)
    assert recovery["matched_latent"][0] == 0 and recovery["recovered"].to_list() == [True, False, True]
    assert recovery["best_cosine"][1] == pytest.approx(1.0) and recovery["matched_cosine"][1] < 0.5


def test_an_sae_on_the_hidden_layer_recovers_the_represented_features_only():
    _, _, W = main_models(SETTINGS, seed=0)
    recovery = sae_recovery(W[1], 0.99, SETTINGS, seed=0)
    represented = recovery.filter(recovery["represented"])
    assert represented.height >= 8
    assert represented["recovered"].all() and represented["matched_cosine"].median() > 0.95
    assert not recovery.filter(~recovery["represented"])["recovered"].any()
    claims = {row["claim"]: row for row in toy_claims(recovery)}
    assert claims["toy.sae_recovers_represented_features"]["verdict"] == "holds"
    assert claims["toy.recovery_beyond_unrepresented"]["verdict"] == "holds"


def test_the_sae_reads_the_model_the_feature_table_describes(tmp_path):
    settings = dataclasses.replace(SETTINGS, n_features=6, n_hidden=2, sparsities=[0.0, 0.9], phase_grid=2, steps=200,
                                   sae_d_sae=6, sae_steps=50, sae_sparsity=0.9)
    main(["--settings", json.dumps(dataclasses.asdict(settings)), "--seed", "3", "--threads", "1",
          "--out-dir", str(tmp_path)])
    features = pl.read_parquet(tmp_path / "features.parquet").filter(pl.col("sparsity") == 0.9)
    recovery = pl.read_parquet(tmp_path / "sae_recovery.parquet")
    assert recovery["sparsity"].unique().to_list() == [0.9]
    np.testing.assert_array_equal(recovery["norm"].to_numpy(), features["norm"].to_numpy())
    with pytest.raises(UserError, match="sae_sparsity"):
        dataclasses.replace(settings, sae_sparsity=0.5)


def recovery_rows(represented: list[bool], recovered: list[bool]) -> pl.DataFrame:
    return pl.DataFrame({"feature": range(len(represented)), "represented": represented, "recovered": recovered})


def test_toy_claims_compare_represented_features_with_chance_and_with_unrepresented_ones():
    claims = {row["claim"]: row for row in toy_claims(recovery_rows([True] * 10 + [False] * 10,
                                                                    [True] * 9 + [False] * 11))}
    share = claims["toy.sae_recovers_represented_features"]
    assert share["value"] == pytest.approx(0.9) and share["bound"] == pytest.approx(0.05)
    assert share["ci_low"] > 0.5 and share["verdict"] == "holds"
    difference = claims["toy.recovery_beyond_unrepresented"]
    assert difference["value"] == pytest.approx(0.9) and difference["bound"] == 0.0 and difference["verdict"] == "holds"
    # at chance: one represented feature in 20 recovered, as many unrepresented
    claims = {row["claim"]: row for row in toy_claims(recovery_rows([True] * 20 + [False] * 20,
                                                                    ([True] + [False] * 19) * 2))}
    assert claims["toy.sae_recovers_represented_features"]["verdict"] == "inconclusive"
    assert claims["toy.recovery_beyond_unrepresented"]["verdict"] == "inconclusive"
    assert claims["toy.recovery_beyond_unrepresented"]["value"] == pytest.approx(0.0)
    # the unrepresented recovered, the represented not: the difference fails
    claims = {row["claim"]: row for row in toy_claims(recovery_rows([True] * 10 + [False] * 10,
                                                                    [False] * 10 + [True] * 10))}
    assert claims["toy.recovery_beyond_unrepresented"]["verdict"] == "fails"
