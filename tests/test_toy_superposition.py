"""The toy model of superposition: dense features with as many dimensions as features learn none;
sparse ones share fewer dimensions; an SAE on the hidden layer finds the planted features."""

import dataclasses

import numpy as np
import torch

from mechinterp.toy_superposition import ToySettings, feature_geometry, phase_diagram, sae_recovery, train_toy_models

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


def test_an_sae_on_the_hidden_layer_recovers_the_represented_features():
    recovery = sae_recovery(SETTINGS, seed=0)
    represented = recovery.filter(recovery["represented"])
    assert represented.height >= 8
    assert represented["best_cosine"].median() > 0.95
