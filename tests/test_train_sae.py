"""SAE training and evaluation: recovery of planted sparse structure, exact resume from a
checkpoint, the held-out training curve and the still-improving flag, the spliced-loss metrics with
an SAE that is exactly the identity, their bootstrap intervals on a planted CE increase, and the SAE
claims at their bounds."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import relu_sae, topk_sae
from mechinterp.activations import ActivationCache, header_path
from mechinterp.sites import Site
from mechinterp.errors import UserError
from mechinterp.evaluate_sae import (loss_metrics, mean_activation, quality_flags, reconstruction_metrics,
                                     sequence_losses, warn_of_flags)
from mechinterp.train_sae import SaeSpec, batch_rows, lr_multiplier, select_rows, train_sae

SETTINGS = {"architecture": "topk", "d_sae": 128, "k": 3, "l1_coefficient": 1.0, "lr": 3e-3, "batch_size": 512,
            "training_tokens": 512 * 400, "warmup_fraction": 0.02, "decay_fraction": 0.2, "auxk_coefficient": 1 / 32,
            "auxk_k": 16, "dead_after_tokens": 20_000, "outlier_norm_ratio": 10, "log_every": 10,
            "checkpoint_every": 1000, "l1_warmup_fraction": 0.02, "heldout_eval_tokens": 1000,
            "still_improving_drop": 0.01}
NO_FLAGS = {"still_improving": False, "late_fvu_drop": 0.0}  # what a training summary adds to the metrics row


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


def spliced(bridge, sae, site, windows, batch_sequences, mean=None, bootstrap_samples=200, seed=0):
    """loss_metrics of sequence_losses (no outliers), with a zero mean activation unless one is given."""
    mean = torch.zeros(site.width(bridge.cfg)) if mean is None else mean
    per_window = sequence_losses(bridge, sae, site, windows, 1e9, batch_sequences, mean)
    return loss_metrics(per_window, bootstrap_samples, seed)


@pytest.mark.parametrize("site", [Site("resid", 0), Site("mlp", 1)])
def test_splicing_an_identity_sae_leaves_the_loss_unchanged(tiny_bridge, site):
    """A perfect reconstruction: CE increase 0 and KL 0, and so are their intervals."""
    width = site.width(tiny_bridge.cfg)
    windows = np.random.default_rng(0).integers(2, 300, size=(4, 16))
    metrics = spliced(tiny_bridge, identity_sae(width), site, windows, batch_sequences=3)
    for column in ("ce_increase", "ce_increase_ci_low", "ce_increase_ci_high", "kl_sae", "kl_sae_ci_low", "kl_sae_ci_high"):
        assert abs(metrics[column]) < 1e-5, column
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
    exact, wrong = {**exact, **NO_FLAGS}, {**wrong, **NO_FLAGS}
    assert exact["fvu"] < 1e-3 and exact["dense_fraction"] > 0.5 and quality_flags(exact) == ["mostly_dense"]
    assert wrong["fvu"] > 1 and quality_flags(wrong) == ["fvu_above_1", "mostly_dense"]
    caplog.set_level("WARNING")
    warn_of_flags("resid0-relu", {**wrong, "d_sae": 2 * d_in}, quality_flags(wrong))
    assert "resid0-relu: FVU" in caplog.text and "sae.training_tokens" in caplog.text and "l1_coefficient" in caplog.text
    trained = {**exact, "dense_fraction": 0.01}
    assert quality_flags(trained) == []
    unfinished = {**trained, "still_improving": True, "late_fvu_drop": 0.042}
    assert quality_flags(unfinished) == ["still_improving"]
    warn_of_flags("resid0-relu", unfinished, quality_flags(unfinished))
    assert "resid0-relu: still improving when training stopped (held-out FVU fell 4.2%" in caplog.text
    assert quality_flags({**trained, "still_improving": None}) == []  # a loaded SAE has no training curve


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
    """CE clean, with the SAE, zero- and mean-ablated, and the KL, from the bridge's logits here, window
    by window; an SAE that outputs zero recovers nothing (the identity all of it: above), and one that
    halves the activation recovers what its own CE says."""
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

    mean = torch.linspace(-1, 1, width)

    def mean_but_bos(acts, hook):
        out = mean.expand_as(acts).clone()
        out[:, 0] = acts[:, 0]
        return out

    clean, clean_lp = ce()
    zeroed, zero_lp = ce(zero_but_bos)
    mean_ablated, _ = ce(mean_but_bos)
    nothing = relu_sae(width, 4)  # all-zero weights: the reconstruction is 0
    per_window = sequence_losses(tiny_bridge, nothing, site, windows, 1e9, 2, mean)
    by_window = -clean_lp.detach().gather(-1, tokens[:, 1:, None])[..., 0].double().mean(1)
    assert per_window.height == 3 and np.allclose(per_window["ce_clean"].to_numpy(), by_window.numpy(), atol=1e-5)
    assert (per_window["n_predictions"] == 11).all()
    metrics = loss_metrics(per_window, 200, seed=0)
    assert metrics["ce_clean"] == pytest.approx(clean, abs=1e-5) and metrics["ce_zero"] == pytest.approx(zeroed, abs=1e-5)
    assert metrics["ce_mean"] == pytest.approx(mean_ablated, abs=1e-5) and metrics["ce_mean"] != pytest.approx(zeroed, abs=1e-3)
    assert metrics["ce_sae"] == pytest.approx(zeroed, abs=1e-5) and metrics["ce_recovered"] == pytest.approx(0, abs=1e-4)
    assert metrics["ce_recovered_mean"] == pytest.approx((mean_ablated - zeroed) / (mean_ablated - clean), abs=1e-4)
    kl = float((clean_lp.exp() * (clean_lp - zero_lp)).sum(-1).mean())
    assert metrics["kl_sae"] == pytest.approx(kl, rel=1e-4) and metrics["ce_increase"] == pytest.approx(zeroed - clean, abs=1e-5)
    assert metrics["ce_increase_ci_low"] < metrics["ce_increase"] < metrics["ce_increase_ci_high"]
    assert metrics["kl_sae_ci_low"] < metrics["kl_sae"] < metrics["kl_sae_ci_high"]
    assert (metrics["n_loss_tokens"], metrics["n_loss_windows"]) == (3 * 11, 3)
    half = identity_sae(width)
    with torch.no_grad():
        half.W_dec.mul_(0.5)  # x / 2
    halfway = spliced(tiny_bridge, half, site, windows, batch_sequences=3)
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


def test_evaluate_assembles_the_heldout_metrics_row(tiny_bridge, tmp_path, caplog):
    """The metrics row: reconstruction on the held-out rows without BOS, losses on the first held-out
    windows, and the training summary's numbers, each where it belongs; its quality flags are warned
    of under the SAE's id; every held-out window may be used; a TopK SAE's k is in the row."""
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
    caplog.set_level("WARNING", logger="mechinterp.evaluate_sae")
    row, density = evaluate(tiny_bridge, sae, "resid0-relu", cache, table, windows, {**trained, **NO_FLAGS},
                            EvalSettings(sequences=2, batch_sequences=1, bootstrap_samples=100), seed=5)
    heldout_rows = np.flatnonzero((table["split"] == "heldout").to_numpy() & (table["position"] != 0).to_numpy())
    expected, expected_density = reconstruction_metrics(sae, cache, heldout_rows, 20.0)
    mean = mean_activation(cache, heldout_rows, 20.0)  # the loud token left out of the mean too
    quiet = heldout_rows[np.linalg.norm(acts[heldout_rows].astype(np.float64), axis=1) <= 20.0]
    assert len(quiet) == len(heldout_rows) - 1 and np.allclose(mean, acts[quiet].astype(np.float64).mean(0), atol=1e-6)
    losses = loss_metrics(sequence_losses(tiny_bridge, sae, site, windows[[1, 3]], 20.0, 1, mean), 100, seed=5)
    assert {k: row[k] for k in expected} == pytest.approx(expected) and np.array_equal(density, expected_density)
    assert {k: row[k] for k in losses} == pytest.approx(losses, abs=1e-6)
    assert row["n_excluded_outliers"] == 1 and row["n_excluded_bos"] == 3 and row["n_eval_tokens"] == 3 * 11 - 1
    assert (row["sae"], row["site"], row["layer"], row["architecture"]) == ("resid0-relu", "resid", 0, "relu")
    assert (row["d_in"], row["d_sae"], row["k"]) == (width, 2 * width, None)
    assert (row["outlier_threshold"], row["train_seconds"], row["train_tokens_per_s"], row["training_tokens"]) == (
        20.0, 1.5, 99.0, 4096)
    assert row["quality_flags"] == quality_flags(row) == ["mostly_dense"]  # [x, -x]: every latent on half the tokens
    assert (row["still_improving"], row["late_fvu_drop"]) == (False, 0.0)
    assert "resid0-relu: 100% of its latents are dense" in caplog.text
    assert row["excluded"].startswith("BOS and tokens with norm > outlier_norm_ratio x median")
    with pytest.raises(UserError, match=r"sae_eval.sequences = 4 but the heldout split has 3 windows"):
        evaluate(tiny_bridge, sae, "resid0-relu", cache, table, windows, trained,
                 EvalSettings(sequences=4, batch_sequences=1, bootstrap_samples=100), seed=0)
    topk = topk_sae(width, 2 * width, k=3)
    every_window, _ = evaluate(tiny_bridge, topk, "resid0-topk", cache, table, windows,
                               {**trained, "spec": {"architecture": "topk", "training_tokens": 4096}},
                               EvalSettings(sequences=3, batch_sequences=2, bootstrap_samples=100), seed=0)
    assert every_window["still_improving"] is None and np.isnan(every_window["late_fvu_drop"])  # no training curve
    assert every_window["k"] == 3 and every_window["n_loss_tokens"] == 3 * (length - 1)


def test_quality_flags_fire_strictly_above_their_bounds():
    assert quality_flags({"fvu": 1.0, "dense_fraction": 0.5, **NO_FLAGS}) == []  # at the bounds: no flag
    assert quality_flags({"fvu": 1.5, "dense_fraction": 0.51, **NO_FLAGS}) == ["fvu_above_1", "mostly_dense"]


def test_the_spliced_activation_keeps_the_models_dtype():
    """A bfloat16 model gets bfloat16 back from the splice (edited in float32), BOS kept clean."""
    from mechinterp.evaluate_sae import splice_hook

    acts = torch.randn(2, 5, 4).to(torch.bfloat16)
    out = splice_hook(lambda flat: flat * 0, outlier_threshold=1e9)(acts, None)
    assert out.dtype == torch.bfloat16 and torch.equal(out[:, 0], acts[:, 0]) and not out[:, 1:].any()


def test_the_splice_keeps_exactly_the_tokens_above_the_outlier_threshold():
    """A token whose norm equals the threshold is spliced; only norms above it keep their clean value."""
    from mechinterp.evaluate_sae import splice_hook

    acts = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [6.0, 0.0]]])  # BOS, norm 5 (the threshold), norm 6
    out = splice_hook(lambda flat: flat * 0, outlier_threshold=5.0)(acts, None)
    assert out[0].tolist() == [[1.0, 0.0], [0.0, 0.0], [6.0, 0.0]]


def test_the_dense_warning_gives_the_shares_in_percent(caplog):
    caplog.set_level("WARNING", logger="mechinterp.evaluate_sae")
    warn_of_flags("mlp2-relu", {"dense_fraction": 0.6, "l0": 3.4, "d_sae": 8, "fvu": 0.2}, ["mostly_dense"])
    assert "mlp2-relu: 60% of its latents are dense (active on more than 10% of tokens; mean L0 3 of 8)" in caplog.text


def test_selecting_from_only_bos_tokens_leaves_nothing_and_a_zero_median(tmp_path):
    """A split of BOS tokens only (a corpus of one-token windows): nothing to train on, nothing counted
    as an outlier, and the median of no norms is 0 rather than an error."""
    cache, _, _ = planted_cache(tmp_path, n=50)
    selection = select_rows(cache, np.arange(50), np.zeros(50, int), outlier_norm_ratio=10)
    assert len(selection.rows) == 0 and selection.n_bos == 50 and selection.n_outliers == 0
    assert selection.median_norm == 0.0 and selection.outlier_threshold == 0.0


def test_the_outlier_threshold_is_the_ratio_times_the_median_non_bos_norm(tmp_path):
    cache, _, _ = planted_cache(tmp_path, n=400)
    positions = np.tile(np.arange(8), 50)
    selection = select_rows(cache, np.arange(400), positions, outlier_norm_ratio=1.2)
    # the norms straight from the stored float16 array, BOS left out
    norms = np.linalg.norm(cache.array[positions != 0].astype(np.float64), axis=1)
    assert selection.median_norm == pytest.approx(np.median(norms), rel=1e-5)
    assert selection.outlier_threshold == pytest.approx(1.2 * np.median(norms), rel=1e-5)
    assert selection.n_outliers == int((norms > selection.outlier_threshold).sum()) > 0


def test_the_spec_round_trips_through_its_flat_dict():
    """to_dict is the flat config entry again (the keys the architecture and training read), so a
    spec rebuilt from it is the same spec."""
    spec = SaeSpec.from_config(SETTINGS)
    flat = spec.to_dict()
    assert SaeSpec.from_config(flat) == spec
    assert flat == {key: SETTINGS[key] for key in flat} and flat["architecture"] == "topk"
    assert set(SETTINGS) - set(flat) == {"l1_coefficient", "l1_warmup_fraction"}  # ReLU-only keys


def test_the_log_has_a_row_every_log_every_steps_and_one_for_the_last_step(tmp_path):
    cache, _, selection = planted_cache(tmp_path, n=1000)
    settings = {**SETTINGS, "batch_size": 64, "training_tokens": 64 * 8, "log_every": 3}
    _, log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0)
    assert log["step"].to_list() == [0, 3, 6, 7]
    assert log["tokens"].to_list() == [64, 256, 448, 512]


def test_the_log_has_its_schema_and_every_value_and_steps_see_their_share_of_training(tmp_path, monkeypatch):
    """Every step is told the share of training done before it (what the ReLU SAE's L1 warm-up ramps
    on); the log has the declared column types and a value in every column, aux-k included."""
    from mechinterp.saes.topk import TopKSAE
    from mechinterp.train_sae import TRAINING_LOG_SCHEMA

    seen = []
    original = TopKSAE.training_step

    def recording_step(self, x, dead, progress):
        seen.append(progress)
        return original(self, x, dead, progress)

    monkeypatch.setattr(TopKSAE, "training_step", recording_step)
    cache, _, selection = planted_cache(tmp_path, n=1000)
    settings = {**SETTINGS, "batch_size": 64, "training_tokens": 64 * 8, "log_every": 2}
    _, log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0)
    assert seen == [step / 8 for step in range(8)]
    assert log.schema == TRAINING_LOG_SCHEMA and log.null_count().sum_horizontal().item() == 0
    assert (log["l1"] == 0).all()  # a TopK SAE has no L1 term; a ReLU SAE logs its own
    _, relu_log, _ = train_sae(cache, selection, SaeSpec.from_config({**settings, "architecture": "relu"}), seed=0)
    assert (relu_log["l1"] > 0).all()


def test_a_latent_silent_for_exactly_dead_after_tokens_counts_as_dead(tmp_path):
    """Two steps of 16 tokens with k = 1: at most 32 of the 128 latents ever fire, so after the second
    step (32 tokens = dead_after_tokens) at least 96 have been silent that long, and after the first none."""
    cache, _, selection = planted_cache(tmp_path, n=500)
    settings = {**SETTINGS, "k": 1, "batch_size": 16, "training_tokens": 32, "log_every": 1, "dead_after_tokens": 32}
    _, log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0)
    assert log["dead_fraction"][0] == 0.0
    assert 1 - 32 / 128 <= log["dead_fraction"][1] < 1


def test_a_resumed_run_reports_the_selection_and_the_throughput_of_its_own_steps(tmp_path, capsys):
    """The summary of a run resumed at step 23 of 40: tokens/s over the 17 steps it ran, timed within
    the call; the progress bar counts on from the checkpoint's step, in steps."""
    import time

    cache, _, selection = planted_cache(tmp_path, n=8000)
    settings = {**SETTINGS, "training_tokens": 512 * 40, "checkpoint_every": 1000}
    spec = SaeSpec.from_config(settings)
    checkpoint = tmp_path / "ckpt.pt"
    train_sae(cache, selection, spec, seed=1, checkpoint=checkpoint, stop_after_step=23)
    capsys.readouterr()
    before = time.perf_counter()
    _, _, summary = train_sae(cache, selection, spec, seed=1, checkpoint=checkpoint)
    wall = time.perf_counter() - before
    bar = capsys.readouterr().err
    assert set(summary) == {"scale", "total_steps", "train_seconds", "tokens_per_s", "n_train_rows", "n_excluded_bos",
                            "n_excluded_outliers", "median_norm", "outlier_threshold", "n_heldout_rows", "heldout_fvu",
                            "late_fvu_drop", "still_improving"}
    assert (summary["n_train_rows"], summary["n_excluded_bos"], summary["n_excluded_outliers"]) == (
        len(selection.rows), selection.n_bos, selection.n_outliers)
    assert (summary["median_norm"], summary["outlier_threshold"]) == (selection.median_norm, selection.outlier_threshold)
    assert 0 < summary["train_seconds"] <= wall
    assert summary["tokens_per_s"] == pytest.approx(17 * 512 / summary["train_seconds"])
    assert "40/40" in bar and ("step/s" in bar or "s/step" in bar), bar


def test_a_checkpoint_is_resumed_only_by_the_same_seed_and_whatever_the_header_key_order(tmp_path, caplog):
    """The checkpoint's counters of tokens since each latent fired are exact integers; a run with
    another seed starts afresh (it ends as its own uninterrupted run), and one whose cache header
    was rewritten with its keys in another order still resumes."""
    cache, _, selection = planted_cache(tmp_path, n=4000)
    settings = {**SETTINGS, "training_tokens": 512 * 12, "checkpoint_every": 1000, "dead_after_tokens": 2048}
    spec = SaeSpec.from_config(settings)
    checkpoint = tmp_path / "ckpt.pt"
    train_sae(cache, selection, spec, seed=1, checkpoint=checkpoint, stop_after_step=5)
    since_fired = torch.load(checkpoint, weights_only=True)["since_fired"]
    assert since_fired.dtype == torch.int64 and set(since_fired.unique().tolist()) <= {0, 512, 1024, 1536, 2048, 2560}
    other_seed, _, _ = train_sae(cache, selection, spec, seed=2, checkpoint=checkpoint)
    straight, _, _ = train_sae(cache, selection, spec, seed=2)
    assert all(torch.equal(value, straight.state_dict()[name]) for name, value in other_seed.state_dict().items())
    reordered = dict(reversed(list(cache.header.items())))
    header_path(cache.path).write_text(json.dumps(reordered))
    caplog.set_level("INFO", logger="mechinterp.train_sae")
    train_sae(ActivationCache.open(cache.path), selection, spec, seed=1, checkpoint=checkpoint)
    assert "resuming resid0 from step 5 of 12" in caplog.text


def test_a_checkpoint_that_does_not_load_is_discarded_by_name(tmp_path, caplog):
    """Issue 30: an empty checkpoint raised a raw EOFError, a pickled one advised weights_only=False, and every
    rerun failed alike. Each is now deleted with a warning naming it, and training runs as if it was never there."""
    import pickle

    cache, _, selection = planted_cache(tmp_path, n=4000)
    spec = SaeSpec.from_config({**SETTINGS, "training_tokens": 512 * 4, "dead_after_tokens": 1024})
    straight, _, _ = train_sae(cache, selection, spec, seed=0)
    checkpoint = tmp_path / "ckpt.pt"
    caplog.set_level("WARNING", logger="mechinterp.train_sae")
    for content, problem in ((b"", "EOFError"), (pickle.dumps(pickle.Pickler), "UnpicklingError"),
                             (None, "it is not a checkpoint of this stage")):
        if content is None:
            torch.save({"weights": torch.zeros(3)}, checkpoint)
        else:
            checkpoint.write_bytes(content)
        sae, _, _ = train_sae(cache, selection, spec, seed=0, checkpoint=checkpoint)
        assert f"checkpoint {checkpoint} does not load ({problem}" in caplog.text
        assert all(torch.equal(value, straight.state_dict()[name]) for name, value in sae.state_dict().items())
        caplog.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_returns_a_cpu_sae_like_the_cpu_run(tmp_path):
    """On a GPU every tensor of the step (SAE, batch, counters) sits on the device; the SAE comes back on
    the CPU and, from the same seed, close to the CPU run's."""
    cache, _, selection = planted_cache(tmp_path, n=4000)
    settings = {**SETTINGS, "training_tokens": 512 * 6, "dead_after_tokens": 1024}
    on_cpu, cpu_log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0)
    on_gpu, gpu_log, _ = train_sae(cache, selection, SaeSpec.from_config(settings), seed=0, device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert gpu_log["step"].to_list() == cpu_log["step"].to_list()
    assert gpu_log["fvu"][0] == pytest.approx(cpu_log["fvu"][0], rel=1e-3)


def test_the_heldout_curve_leaves_the_weights_as_they_are_and_measures_the_final_sae(tmp_path):
    """Measuring the held-out FVU at every log row draws no random number and touches no weight: the SAE
    and every other column of the log are byte-identical with and without it. The last row's held-out
    FVU is the trained SAE's FVU on those rows."""
    from mechinterp.train_sae import heldout_sample

    cache, _, selection = planted_cache(tmp_path, n=6000)
    settings = {**SETTINGS, "training_tokens": 512 * 30, "log_every": 4, "dead_after_tokens": 2048}
    spec = SaeSpec.from_config(settings)
    train, held = selection.rows[:5000], np.arange(5000, 6000)
    selection.rows = train
    norms = np.linalg.norm(cache.array[held].astype(np.float64), axis=1)
    heldout = heldout_sample(held, np.ones(1000, int), norms, np.inf, 400)
    plain, plain_log, plain_summary = train_sae(cache, selection, spec, seed=3)
    measured, measured_log, summary = train_sae(cache, selection, spec, seed=3, heldout=heldout)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, measured.state_dict()[name]), name
    assert plain_log.drop("heldout_fvu").equals(measured_log.drop("heldout_fvu"))
    assert plain_log["heldout_fvu"].is_nan().all() and measured_log["heldout_fvu"].is_finite().all()
    final, _ = reconstruction_metrics(measured, cache, heldout)
    assert measured_log["heldout_fvu"][-1] == pytest.approx(final["fvu"], rel=1e-3) == summary["heldout_fvu"]
    assert measured_log["heldout_fvu"][-1] < measured_log["heldout_fvu"][0]
    assert summary["n_heldout_rows"] == 400 and plain_summary["n_heldout_rows"] == 0


def test_the_heldout_sample_leaves_out_bos_and_outliers_and_spans_every_window():
    from mechinterp.train_sae import heldout_sample

    rows = np.arange(100, 300)
    positions = np.tile(np.arange(20), 10)
    norms = np.ones(200)
    norms[[5, 25]] = 50.0
    sample = heldout_sample(rows, positions, norms, outlier_threshold=10.0, n=50)
    assert len(sample) == 50 and len(np.unique(sample)) == 50 and np.all(np.diff(sample) > 0)
    assert not set(sample) & ({100 + 20 * w for w in range(10)} | {105, 125})
    assert sample[0] == 101 and sample[-1] == 299  # first and last eligible rows: every window is sampled
    assert len(heldout_sample(rows, positions, norms, 10.0, n=10_000)) == 200 - 10 - 2  # all, when too few


def test_still_improving_is_set_on_a_falling_curve_and_not_on_a_flat_one():
    """A planted curve: FVU 0.1 + exp(-step / 40) over 100 steps drops 11% over the last tenth; one that
    has flattened (converged) drops nothing. Without a held-out FVU the batch FVU is read."""
    import polars as pl

    from mechinterp.train_sae import TRAINING_LOG_SCHEMA, late_drop, still_improving

    steps = np.array([*range(0, 100, 5), 99])

    def curve_log(heldout: np.ndarray, batch: np.ndarray) -> pl.DataFrame:
        zero = np.zeros(len(steps))
        return pl.DataFrame({"step": steps, "tokens": steps + 1, "lr": zero, "mse": zero, "fvu": batch,
                             "heldout_fvu": heldout, "l0": zero, "auxk": zero, "l1": zero, "dead_fraction": zero},
                            schema=TRAINING_LOG_SCHEMA)

    falling = 0.1 + np.exp(-steps / 40)
    flat = 0.1 + np.exp(-np.minimum(steps, 50) / 5)
    improving, drop = still_improving(curve_log(falling, flat), 100, 0.01)
    expected = (np.interp(89.1, steps, falling) - falling[-1]) / np.interp(89.1, steps, falling)
    assert improving and drop == pytest.approx(expected) and 0.1 < drop < 0.12
    assert still_improving(curve_log(flat, falling), 100, 0.01) == (False, 0.0)
    assert still_improving(curve_log(falling, falling), 100, drop + 1e-9)[0] is False  # the threshold is strict
    assert still_improving(curve_log(np.full(len(steps), np.nan), falling), 100, 0.01)[0]  # the batch FVU instead
    assert still_improving(curve_log(np.full(len(steps), np.nan), flat), 100, 0.01)[0] is False
    assert np.isnan(late_drop(np.array([0]), np.array([1.0]), 1))


def test_the_ce_increase_interval_covers_a_planted_increase_and_shrinks_with_more_windows():
    """Windows whose spliced CE is the clean CE plus 0.2 nats plus noise (sd 0.15 per window): the 95%
    interval covers 0.2 in about 95% of 200 planted runs, and is about half as wide with 4x the windows."""
    import polars as pl

    rng = np.random.default_rng(0)

    def planted(n: int) -> dict[str, float]:
        clean = rng.uniform(2, 4, n)
        table = pl.DataFrame({"ce_clean": clean, "ce_sae": clean + 0.2 + rng.normal(0, 0.15, n),
                              "ce_zero": clean + 5, "ce_mean": clean + 1, "kl_sae": rng.exponential(0.3, n),
                              "n_predictions": np.full(n, 127)})
        return loss_metrics(table, 1000, seed=int(rng.integers(1 << 31)))

    runs = [planted(16) for _ in range(200)]
    covered = np.mean([r["ce_increase_ci_low"] <= 0.2 <= r["ce_increase_ci_high"] for r in runs])
    assert 0.88 <= covered <= 0.99, covered
    width = {n: np.median([r["ce_increase_ci_high"] - r["ce_increase_ci_low"] for r in (planted(n) for _ in range(20))])
             for n in (16, 64)}
    assert 0.4 < width[64] / width[16] < 0.6, width
    assert 0.1 < width[16] < 0.2  # about 2 x 1.96 x 0.15 / 4
    kl_runs = [planted(16) for _ in range(50)]
    assert np.mean([r["kl_sae_ci_low"] <= 0.3 <= r["kl_sae_ci_high"] for r in kl_runs]) >= 0.8


def test_the_bootstrap_is_seeded_and_weights_windows_by_their_predictions():
    import polars as pl

    table = pl.DataFrame({"ce_clean": [1.0, 1.0, 1.0], "ce_sae": [1.5, 1.1, 1.3], "ce_zero": [9.0] * 3,
                          "ce_mean": [3.0] * 3, "kl_sae": [0.2, 0.4, 0.3], "n_predictions": [10, 30, 60]})
    first, again, other = loss_metrics(table, 500, 1), loss_metrics(table, 500, 1), loss_metrics(table, 500, 2)
    assert first == again and first != other  # other resamples, other intervals
    assert first["ce_increase"] == pytest.approx((0.5 * 10 + 0.1 * 30 + 0.3 * 60) / 100)
    assert first["kl_sae"] == pytest.approx((0.2 * 10 + 0.4 * 30 + 0.3 * 60) / 100)
    assert 0.1 <= first["ce_increase_ci_low"] <= first["ce_increase"] <= first["ce_increase_ci_high"] <= 0.5
    assert first["n_loss_tokens"] == 100 and first["n_loss_windows"] == 3


def test_sae_claims_at_their_bounds(caplog):
    """The CE increase and KL hold only when the whole interval is below the bound, fail when it is above,
    and are inconclusive across it (touching included); FVU, dead and dense shares hold at their bound."""
    import polars as pl

    from mechinterp.claims import ClaimsSettings, sae_claims

    bounds = ClaimsSettings(fvu_max=0.5, ce_increase_max=0.1, kl_max=0.1, dead_fraction_max=0.1,
                            dense_fraction_max=0.05)
    metrics = pl.DataFrame({
        "sae": ["below", "across", "touching", "above"],
        "ce_increase": [0.05, 0.1, 0.08, 0.3], "ce_increase_ci_low": [0.03, 0.06, 0.06, 0.2],
        "ce_increase_ci_high": [0.0999, 0.14, 0.1, 0.4],
        "kl_sae": [0.04, 0.09, 0.2, 0.11], "kl_sae_ci_low": [0.02, 0.05, 0.15, 0.1001],
        "kl_sae_ci_high": [0.06, 0.12, 0.25, 0.13],
        "fvu": [0.5, 0.5001, 0.2, 0.9], "dead_fraction": [0.1, 0.0, 0.2, 0.0], "dense_fraction": [0.05, 0.0, 0.0, 0.06],
        "n_loss_windows": [16, 16, 16, 16]})
    caplog.set_level("WARNING", logger="mechinterp.claims")
    rows = {r["claim"]: r for r in sae_claims(metrics, bounds)}
    verdict = {name: r["verdict"] for name, r in rows.items()}
    assert [verdict[f"sae.{s}.ce_increase"] for s in metrics["sae"]] == ["holds", "inconclusive", "inconclusive", "fails"]
    assert [verdict[f"sae.{s}.kl_sae"] for s in metrics["sae"]] == ["holds", "inconclusive", "fails", "fails"]
    assert [verdict[f"sae.{s}.fvu"] for s in metrics["sae"]] == ["holds", "fails", "holds", "fails"]
    assert [verdict[f"sae.{s}.dead_fraction"] for s in metrics["sae"]] == ["holds", "holds", "fails", "holds"]
    assert [verdict[f"sae.{s}.dense_fraction"] for s in metrics["sae"]] == ["holds", "holds", "holds", "fails"]
    assert not any(name.endswith("ce_recovered") for name in rows) and len(rows) == 4 * 5
    above = rows["sae.above.ce_increase"]
    assert (above["value"], above["ci_low"], above["ci_high"], above["bound"]) == (0.3, 0.2, 0.4, 0.1)
    assert above["statement"] == "above, spliced in, raises the next-token CE by less than 0.1 nats/token (16 held-out windows)"
    assert "SAE above fails its bound: ce_increase = 0.3 [0.2, 0.4]" in caplog.text
    assert "SAE across does not clearly meet its bound: ce_increase" in caplog.text
    assert "SAE below" not in caplog.text
