"""SAE training and evaluation: recovery of planted sparse structure, exact resume from a
checkpoint, and the spliced-loss metrics with an SAE that is exactly the identity."""

import json

import numpy as np
import pytest
import torch

from conftest import relu_sae
from mechinterp.activations import ActivationCache, header_path
from mechinterp.sites import Site
from mechinterp.errors import UserError
from mechinterp.evaluate_sae import loss_metrics, quality_flags, reconstruction_metrics, warn_of_flags
from mechinterp.train_sae import SaeSpec, batch_rows, lr_multiplier, select_rows, train_sae

SETTINGS = {"architecture": "topk", "d_sae": 128, "k": 3, "l1_coefficient": 1.0, "lr": 3e-3, "batch_size": 512,
            "training_tokens": 512 * 400, "warmup_fraction": 0.02, "decay_fraction": 0.2, "auxk_coefficient": 1 / 32,
            "auxk_k": 16, "dead_after_tokens": 20_000, "outlier_norm_ratio": 10, "log_every": 10,
            "checkpoint_every": 1000, "l1_warmup_fraction": 0.02}


def planted_cache(tmp_path, n=40_000, d_in=32, n_atoms=64, active=3, seed=0):
    """Activations that are sparse sums of known unit directions, stored as a float16 cache."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d_in))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_atoms))
    for row in range(n):
        codes[row, rng.choice(n_atoms, size=active, replace=False)] = rng.uniform(1, 3, size=active)
    path = tmp_path / "resid0.npy"
    np.save(path, (codes @ atoms).astype(np.float16))
    header_path(path).write_text(json.dumps({"shape": [n, d_in], "dtype": "float16", "site": "resid0",
                                             "token_table_sha256": "0" * 64}))
    cache = ActivationCache.open(path)
    return cache, atoms, select_rows(cache, np.arange(n), np.ones(n, int), outlier_norm_ratio=10)


def test_topk_sae_recovers_planted_directions(tmp_path):
    cache, atoms, selection = planted_cache(tmp_path)
    sae, log, summary = train_sae(cache, selection, SaeSpec.from_config(SETTINGS), seed=0)
    decoder = sae.W_dec.detach().numpy().copy()
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    best_cosine = (atoms @ decoder.T).max(axis=1)
    assert np.mean(best_cosine >= 0.9) >= 0.9, np.sort(best_cosine)[:10]
    assert log["fvu"][-1] < 0.1 and log["fvu"][-1] < log["fvu"][0]
    metrics, density = reconstruction_metrics(sae, cache, selection.rows[-5000:])
    assert metrics["fvu"] < 0.1 and metrics["l0"] <= 3 and metrics["n_excluded_outliers"] == 0
    quiet, _ = reconstruction_metrics(sae, cache, selection.rows[-5000:], outlier_threshold=np.sqrt(12.0))
    assert 0 < quiet["n_excluded_outliers"] < 5000 and quiet["n_eval_tokens"] == 5000 - quiet["n_excluded_outliers"]
    assert density.shape == (128,) and summary["n_excluded_bos"] == 0


def test_resuming_from_a_checkpoint_gives_the_same_sae(tmp_path):
    cache, _, selection = planted_cache(tmp_path, n=8000)
    settings = {**SETTINGS, "training_tokens": 512 * 40, "checkpoint_every": 7, "dead_after_tokens": 2048}
    straight, straight_log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=1)
    checkpoint = tmp_path / "ckpt.pt"
    train_sae(cache, selection, SaeSpec.from_config(settings), seed=1, checkpoint=checkpoint, stop_after_step=23)
    assert checkpoint.is_file()
    resumed, resumed_log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=1, checkpoint=checkpoint)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert straight_log.equals(resumed_log)
    # a checkpoint from other settings is not resumed
    other, _, _ = train_sae(cache, selection, SaeSpec.from_config({**settings, "lr": 1e-3}), seed=1, checkpoint=checkpoint)
    assert not torch.equal(other.W_dec, straight.W_dec)


def test_too_few_training_tokens_is_a_clear_error(tmp_path):
    cache, _, selection = planted_cache(tmp_path, n=300)
    with pytest.raises(UserError, match=r"only 300 training tokens .* sae\.batch_size is 512"):
        train_sae(cache, selection, SaeSpec.from_config(SETTINGS), seed=0)


def test_outliers_and_bos_are_left_out(tmp_path):
    cache, _, _ = planted_cache(tmp_path, n=1000)
    positions = np.tile(np.arange(10), 100)
    loud = cache.array.copy()
    loud[[3, 33]] *= 1000
    np.save(cache.path, loud)
    cache = ActivationCache.open(cache.path)
    selection = select_rows(cache, np.arange(1000), positions, outlier_norm_ratio=10)
    assert selection.n_bos == 100 and selection.n_outliers == 2
    assert 3 not in selection.rows and 0 not in selection.rows and len(selection.rows) == 898


def test_batches_are_a_seeded_function_of_the_step():
    rows = np.arange(100, 1100)
    first = [batch_rows(rows, 64, seed=3, step=s) for s in range(15)]
    assert all(np.array_equal(a, batch_rows(rows, 64, seed=3, step=s)) for s, a in enumerate(first))
    assert len(np.unique(np.concatenate(first))) == 15 * 64  # one epoch: no row twice
    assert not np.array_equal(first[0], batch_rows(rows, 64, seed=4, step=0))


def test_lr_schedule_warms_up_and_decays():
    values = [lr_multiplier(s, 100, 0.1, 0.2) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[50] == 1.0
    assert values[80] == 1.0 and values[99] == pytest.approx(0.05) and values == sorted(values[:10]) + values[10:]


def identity_sae(d: int):
    """relu(x) - relu(-x) = x: an SAE whose reconstruction is exactly its input."""
    sae = relu_sae(d, 2 * d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.mark.parametrize("site", [Site("resid", 0), Site("mlp", 1)])
def test_splicing_an_identity_sae_leaves_the_loss_unchanged(tiny_bridge, site):
    width = site.width(tiny_bridge.cfg)
    windows = np.random.default_rng(0).integers(2, 300, size=(4, 16))
    metrics = loss_metrics(tiny_bridge, identity_sae(width), site, windows, outlier_threshold=1e9, batch_sequences=3)
    assert abs(metrics["ce_sae"] - metrics["ce_clean"]) < 1e-5
    assert abs(metrics["kl_sae"]) < 1e-5
    assert metrics["ce_zero"] != pytest.approx(metrics["ce_clean"], abs=1e-4)  # ablating the site does matter
    assert metrics["ce_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_degenerate_saes_are_flagged_with_a_warning_that_names_the_fix(tmp_path, caplog):
    cache, _, _ = planted_cache(tmp_path, n=4000)
    d_in = cache.header["shape"][1]
    identity = relu_sae(d_in, 2 * d_in)  # [x, -x] through a ReLU and back: exact, but every latent fires often
    blind = relu_sae(d_in, 2 * d_in)  # every latent always on, the decoder rows summed: far from x
    with torch.no_grad():
        eye = torch.eye(d_in)
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
        blind.b_enc.fill_(1.0)
        blind.W_dec.copy_(torch.cat([eye, eye], 0))
    rows = np.arange(4000)
    exact, _ = reconstruction_metrics(identity, cache, rows)
    wrong, _ = reconstruction_metrics(blind, cache, rows)
    assert exact["fvu"] < 1e-3 and exact["dense_fraction"] > 0.5 and quality_flags(exact) == ["mostly_dense"]
    assert wrong["fvu"] > 1 and quality_flags(wrong) == ["fvu_above_1", "mostly_dense"]
    caplog.set_level("WARNING")
    warn_of_flags("resid0-relu", {**wrong, "d_sae": 2 * d_in}, quality_flags(wrong))
    assert "resid0-relu: FVU" in caplog.text and "sae.training_tokens" in caplog.text and "l1_coefficient" in caplog.text
    trained = {**exact, "dense_fraction": 0.01}
    assert quality_flags(trained) == []
