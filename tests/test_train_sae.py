"""SAE training and evaluation: recovery of planted sparse structure, exact resume from a
checkpoint, and the spliced-loss metrics with an SAE that is exactly the identity."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.5, 3.0))
def test_reconstruction_metrics_equal_a_direct_computation(seed, outlier_ratio):
    import tempfile
    from pathlib import Path

    from conftest import write_cache

    rng = np.random.default_rng(seed)
    acts = (rng.normal(size=(300, 6)) * rng.uniform(0.2, 3, size=(300, 1))).astype(np.float16)
    with tempfile.TemporaryDirectory() as folder:
        write_cache(Path(folder) / "c.npy", acts)
        cache = ActivationCache.open(Path(folder) / "c.npy")
        sae = relu_sae(6, 10)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        rows = np.sort(rng.choice(300, 200, replace=False))
        x = acts[rows].astype(np.float64)
        threshold = outlier_ratio * float(np.median(np.linalg.norm(x, axis=1)))
        metrics, density = reconstruction_metrics(sae, cache, rows, outlier_threshold=threshold, chunk=64)
    kept = np.linalg.norm(x, axis=1) <= threshold
    x = x[kept]
    w = {name: p.detach().double().numpy() for name, p in sae.named_parameters()}
    z = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    error = ((z @ w["W_dec"] + w["b_dec"] - x) ** 2).sum()
    assert metrics["n_eval_tokens"] == kept.sum() and metrics["n_excluded_outliers"] == (~kept).sum()
    assert metrics["mse"] == pytest.approx(error / len(x), rel=1e-4)
    assert metrics["fvu"] == pytest.approx(error / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    assert metrics["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-6)
    assert np.allclose(density, (z > 0).mean(0))
    assert metrics["dead_fraction"] == pytest.approx(((z > 0).sum(0) == 0).mean())
    assert metrics["dense_fraction"] == pytest.approx(((z > 0).mean(0) > 0.1).mean())


def test_spliced_losses_equal_a_direct_computation_and_ce_recovered_spans_zero_to_one(tiny_bridge):
    """CE clean, with the SAE and zero-ablated, and the KL, from the bridge's logits here; an SAE that
    outputs zero recovers nothing (the identity all of it: above), and one that halves the activation
    recovers what its own CE says."""
    import torch.nn.functional as F

    site = Site("resid", 0)
    width = site.width(tiny_bridge.cfg)
    windows = np.random.default_rng(1).integers(2, 300, size=(3, 12))
    tokens = torch.from_numpy(windows)

    def ce(hook=None) -> tuple[float, torch.Tensor]:
        logits = tiny_bridge(tokens) if hook is None else tiny_bridge.run_with_hooks(
            tokens, fwd_hooks=[(site.hook_name, hook)])
        lp = logits[:, :-1].float().log_softmax(-1)
        return float(F.nll_loss(lp.reshape(-1, lp.shape[-1]), tokens[:, 1:].reshape(-1))), lp

    def zero_but_bos(acts, hook):
        out = torch.zeros_like(acts)
        out[:, 0] = acts[:, 0]
        return out

    clean, clean_lp = ce()
    zeroed, zero_lp = ce(zero_but_bos)
    nothing = relu_sae(width, 4)  # all-zero weights: the reconstruction is 0
    metrics = loss_metrics(tiny_bridge, nothing, site, windows, outlier_threshold=1e9, batch_sequences=2)
    assert metrics["ce_clean"] == pytest.approx(clean, abs=1e-5) and metrics["ce_zero"] == pytest.approx(zeroed, abs=1e-5)
    assert metrics["ce_sae"] == pytest.approx(zeroed, abs=1e-5) and metrics["ce_recovered"] == pytest.approx(0, abs=1e-4)
    kl = float((clean_lp.exp() * (clean_lp - zero_lp)).sum(-1).mean())
    assert metrics["kl_sae"] == pytest.approx(kl, rel=1e-4) and metrics["ce_increase"] == pytest.approx(zeroed - clean, abs=1e-5)
    assert metrics["n_loss_tokens"] == 3 * 11
    half = identity_sae(width)
    with torch.no_grad():
        half.W_dec.mul_(0.5)  # x / 2
    halfway = loss_metrics(tiny_bridge, half, site, windows, outlier_threshold=1e9, batch_sequences=3)
    assert halfway["ce_sae"] == pytest.approx(ce(lambda acts, hook: torch.cat([acts[:, :1], acts[:, 1:] / 2], 1))[0],
                                              abs=1e-5)
    assert halfway["ce_recovered"] == pytest.approx((zeroed - halfway["ce_sae"]) / (zeroed - clean), abs=1e-3)


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["topk", "relu"]), st.integers(0, 1000), st.integers(3, 12))
def test_training_log_and_invariants_after_every_step(architecture, seed, steps):
    """Stopped after each step in turn: a TopK SAE's decoder rows are unit norm in the training space
    (1 / scale once the scale is folded in); the log's tokens, learning rate and FVU are what its own
    step says; the dead fraction counts latents silent for dead_after_tokens."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        cache, _, selection = planted_cache(Path(folder), n=2000, seed=seed % 7)
        settings = {**SETTINGS, "architecture": architecture, "batch_size": 128, "training_tokens": 128 * steps,
                    "log_every": 1, "dead_after_tokens": 256, "warmup_fraction": 0.3, "decay_fraction": 0.3}
        spec = SaeSpec.from_config(settings)
        for stop in range(1, steps + 1, max(1, steps // 3)):
            sae, log, summary = train_sae(cache, selection, spec, seed=seed, stop_after_step=stop)
            if architecture == "topk":
                norms = sae.W_dec.detach().norm(dim=1) * summary["scale"]
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), stop
            assert log["step"].to_list() == list(range(stop))
            assert log["tokens"].to_list() == [128 * (s + 1) for s in range(stop)]
            expected_lr = [settings["lr"] * lr_multiplier(s, steps, 0.3, 0.3) for s in range(stop)]
            assert log["lr"].to_list() == pytest.approx(expected_lr)
            assert (log["fvu"] >= 0).all() and (log["mse"] >= 0).all()
            assert log["dead_fraction"][: 256 // 128 - 1].to_list() == [0.0] * (256 // 128 - 1)  # none dead yet
    assert summary["total_steps"] == steps and summary["n_train_rows"] == len(selection.rows)
    first = cache.rows(batch_rows(selection.rows, 128, seed, 0)).double()
    assert summary["scale"] == pytest.approx(float((32 / first.pow(2).sum(1).mean()) ** 0.5), rel=1e-5)


def test_fvu_in_the_log_is_mse_over_the_batch_variance(tmp_path):
    cache, _, selection = planted_cache(tmp_path, n=2000)
    settings = {**SETTINGS, "batch_size": 256, "training_tokens": 256 * 5, "log_every": 1}
    _, log, summary = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0)
    for step, row in enumerate(log.iter_rows(named=True)):
        x = cache.rows(batch_rows(selection.rows, 256, 0, step)).double() * summary["scale"]
        variance = float(((x - x.mean(0)) ** 2).sum(1).mean())
        assert row["fvu"] == pytest.approx(row["mse"] / variance, rel=1e-4)
    assert log["l0"].max() <= settings["k"]


def test_lr_multiplier_edges():
    assert lr_multiplier(0, 10, 0.0, 0.0) == 1.0  # no warm-up: at least one step of it, which is the full rate
    assert [lr_multiplier(s, 10, 0.0, 0.5) for s in range(10)] == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert [lr_multiplier(s, 4, 0.5, 0.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(3, 4, 0.0, 1.0) == pytest.approx(0.25)


def test_evaluate_assembles_the_heldout_metrics_row(tiny_bridge, tmp_path):
    """The metrics row: reconstruction on the held-out rows without BOS, losses on the first held-out
    windows, and the training summary's numbers, each where it belongs."""
    import polars as pl

    from conftest import write_cache
    from mechinterp.evaluate_sae import EvalSettings, evaluate

    site = Site("resid", 0)
    width = site.width(tiny_bridge.cfg)
    n_windows, length = 6, 12
    windows = np.random.default_rng(2).integers(2, 300, size=(n_windows, length))
    table = pl.DataFrame({"sequence": np.repeat(np.arange(n_windows), length), "position": np.tile(np.arange(length), n_windows),
                          "split": np.repeat(["train", "heldout", "train", "heldout", "heldout", "train"], length)})
    acts = np.random.default_rng(3).normal(size=(n_windows * length, width)).astype(np.float16)
    acts[length * 3 + 5] *= 50  # one loud held-out token
    write_cache(tmp_path / "resid0.npy", acts, site="resid0")
    cache = ActivationCache.open(tmp_path / "resid0.npy")
    sae = identity_sae(width)
    with torch.no_grad():
        sae.W_dec.mul_(0.8)
    trained = {"outlier_threshold": 20.0, "train_seconds": 1.5, "tokens_per_s": 99.0,
               "spec": {"architecture": "relu", "training_tokens": 4096}}
    row, density = evaluate(tiny_bridge, sae, "resid0-relu", cache, table, windows, trained,
                            EvalSettings(sequences=2, batch_sequences=1))
    heldout_rows = np.flatnonzero((table["split"] == "heldout").to_numpy() & (table["position"] != 0).to_numpy())
    expected, expected_density = reconstruction_metrics(sae, cache, heldout_rows, 20.0)
    losses = loss_metrics(tiny_bridge, sae, site, windows[[1, 3]], 20.0, batch_sequences=1)
    assert {k: row[k] for k in expected} == pytest.approx(expected) and np.array_equal(density, expected_density)
    assert {k: row[k] for k in losses} == pytest.approx(losses, abs=1e-6)
    assert row["n_excluded_outliers"] == 1 and row["n_excluded_bos"] == 3 and row["n_eval_tokens"] == 3 * 11 - 1
    assert (row["sae"], row["site"], row["layer"], row["architecture"]) == ("resid0-relu", "resid", 0, "relu")
    assert (row["d_in"], row["d_sae"], row["k"]) == (width, 2 * width, None)
    assert (row["outlier_threshold"], row["train_seconds"], row["train_tokens_per_s"], row["training_tokens"]) == (
        20.0, 1.5, 99.0, 4096)
    assert row["quality_flags"] == quality_flags(row)
    with pytest.raises(UserError, match=r"sae_eval.sequences = 4 but the heldout split has 3 windows"):
        evaluate(tiny_bridge, sae, "resid0-relu", cache, table, windows, trained, EvalSettings(sequences=4, batch_sequences=1))
