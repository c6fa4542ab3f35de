"""SAE architectures: hand-written sparse gradients against autograd, the SAELens on-disk format,
and recovery of planted sparse structure."""

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import relu_sae, topk_sae
from mechinterp.errors import UserError
from mechinterp.saes import TopKSAE, load_sae
from mechinterp.saes.base import geometric_median
from mechinterp.saes.topk import top_k


def dense_topk_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The TopK objective written plainly with autograd, as the reference for the sparse step."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.clamp_min(0))
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).sum(1).mean()
    if dead.any():
        target = (x - x_hat).detach()
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(min(sae.settings.auxk_k, int(dead.sum())), dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.clamp_min(0))
        scale = (target - target.mean(0)).pow(2).sum(1).mean()
        loss = loss + sae.settings.auxk_coefficient * (z_aux @ sae.W_dec - target).pow(2).sum(1).mean() / scale
    return loss


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_sparse_gradients_match_autograd(with_dead):
    torch.manual_seed(0)
    d_in, d_sae = 24, 96
    sae = topk_sae(d_in, d_sae, k=4, auxk_k=8)
    x = torch.randn(64, d_in) * 3
    sae.initialise(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_()
    dead = torch.zeros(d_sae, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    metrics = sae.training_step(x, dead, progress=0.5)
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_topk_loss(sae, x, dead).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-4), name
    assert metrics["l0"] <= 4 and (metrics["auxk"] > 0) == with_dead


def random_sae(make, d_in: int, d_sae: int, seed: int):
    """An SAE with every parameter random, b_dec and b_enc included (a zero bias hides sign slips)."""
    sae = make(d_in, d_sae)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return sae


sae_shapes = st.tuples(st.integers(1, 6), st.integers(2, 12), st.integers(8, 40), st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(sae_shapes, st.integers(1, 6))
def test_topk_encode_and_decode_equal_the_formula(shape, k):
    n, d_in, d_sae, seed = shape
    sae = random_sae(lambda d, m: topk_sae(d, m, k=min(k, d_sae)), d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # Gao et al.: z = ReLU(TopK(W_enc (x - b_dec) + b_enc))
    vals, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros(n, d_sae).scatter(1, idx, vals.clamp_min(0))
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), z, atol=1e-5)
        assert torch.allclose(sae(x), z @ sae.W_dec + sae.b_dec, atol=1e-4)
        sparse_vals, sparse_idx = sae.encode_sparse(x)
        assert torch.allclose(torch.zeros(n, d_sae).scatter(1, sparse_idx, sparse_vals), z, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(sae_shapes, st.booleans())
def test_topk_sparse_gradients_match_autograd_with_unused_latents(shape, with_dead):
    """Few rows, many latents: most latents are chosen by no row (the sparse products must still
    give every latent its gradient, zero included). Two rows at least: the auxiliary loss divides by
    the residual's variance over rows."""
    n, d_in, d_sae, seed = shape
    n = max(n, 2)
    sae = random_sae(lambda d, m: topk_sae(d, m, k=2, auxk_k=3), d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    if with_dead:
        dead[1::2] = True
    sae.training_step(x, dead, progress=0.5)
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_topk_loss(sae, x, dead).backward()
    for name, p in sae.named_parameters():
        assert sparse_grads[name].shape == p.shape and torch.allclose(sparse_grads[name], p.grad, atol=1e-4, rtol=1e-3), name


@settings(max_examples=20, deadline=None)
@given(sae_shapes)
def test_relu_and_jumprelu_encode_equal_the_formula(shape):
    from mechinterp.saes.jumprelu import JumpReluSAE, JumpReluSettings

    n, d_in, d_sae, seed = shape
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    relu = random_sae(lambda d, m: relu_sae(d, m), d_in, d_sae, seed)
    pre = (x - relu.b_dec) @ relu.W_enc + relu.b_enc
    with torch.no_grad():
        assert torch.allclose(relu.encode(x), pre.clamp_min(0), atol=1e-5)
        assert torch.allclose(relu(x), pre.clamp_min(0) @ relu.W_dec + relu.b_dec, atol=1e-4)
        jump = random_sae(lambda d, m: JumpReluSAE(d, JumpReluSettings(d_sae=m)), d_in, d_sae, seed)
        pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc
        assert torch.allclose(jump.encode(x), torch.where(pre > jump.threshold, pre, 0.0), atol=1e-5)
    with pytest.raises(UserError, match="loaded .* not trained by this workflow"):
        jump.training_step(x, torch.zeros(d_sae, dtype=torch.bool), 0.5)


@pytest.mark.parametrize("m, k", [(4608, 32), (1152, 32), (96, 4), (97, 5), (64, 64 - 1)])
def test_grouped_top_k_is_torch_topk(m, k):
    torch.manual_seed(m)
    pre = torch.randn(300, m)
    pre[:10] = torch.randint(0, 4, (10, m)).float()  # rows full of ties: the values still agree
    vals, idx = top_k(pre, k)
    expected = pre.topk(k, dim=1)
    assert torch.equal(vals.sort(1).values, expected.values.sort(1).values)
    assert torch.equal(pre.gather(1, idx), vals)  # each index points at its value
    assert torch.equal(idx[10:].sort(1).values, expected.indices[10:].sort(1).values)


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 3) * 0.1 + 5, torch.full((20, 3), 1e4)])
    assert (geometric_median(points) - 5).abs().max() < 0.2
    assert (points.mean(0) - 5).abs().max() > 100


@pytest.mark.parametrize("make", [lambda: topk_sae(16, 64, k=32), lambda: relu_sae(16, 64)])
def test_saved_sae_round_trips_in_saelens_format(make, tmp_path):
    torch.manual_seed(0)
    sae = make()
    cls = type(sae)
    x = torch.randn(32, 16) * 2 + 1
    sae.initialise(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
    scaled_out = sae(x * 0.5)
    sae.fold_scale(0.5)  # trained on x * 0.5; saved for raw x
    sae.save(tmp_path / "sae", {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == cls.saelens_architecture
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    loaded, _ = load_sae(tmp_path / "sae")
    assert torch.allclose(loaded(x), scaled_out / 0.5, atol=1e-5)
    assert torch.equal(loaded.encode(x) > 0, sae.encode(x) > 0)


@settings(max_examples=25, deadline=None)
@given(sae_shapes, st.floats(0.0, 1.0), st.sampled_from([0.0, 0.25]), st.floats(0.1, 5.0))
def test_relu_training_step_is_mse_plus_the_ramped_decoder_weighted_l1(shape, progress, warmup, l1_coefficient):
    """Anthropic's 2023 objective, written here: ||x_hat - x||^2 + lambda * ramp * sum_j z_j ||W_dec[j]||,
    the ramp rising linearly over the first `l1_warmup_fraction` of training."""
    n, d_in, d_sae, seed = shape
    sae = random_sae(lambda d, m: relu_sae(d, m, l1_coefficient=l1_coefficient, l1_warmup_fraction=warmup),
                     d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    metrics = sae.training_step(x, torch.zeros(d_sae, dtype=torch.bool), progress)
    step_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    mse = ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean()
    l1 = (z * sae.W_dec.norm(dim=1)).sum(1).mean()
    ramp = min(1.0, progress / warmup) if warmup else 1.0
    (mse + l1_coefficient * ramp * l1).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(step_grads[name], p.grad, atol=1e-4, rtol=1e-4), name
    assert set(metrics) == {"mse", "l1", "l0", "active"}
    assert metrics["mse"] == pytest.approx(float(mse), rel=1e-5) and metrics["l1"] == pytest.approx(float(l1), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float((z > 0).sum(1).float().mean()))
    assert torch.equal(metrics["active"], (z > 0).any(0))


def test_saved_cfg_json_carries_the_fields_saelens_reads(tmp_path):
    sae = topk_sae(8, 16, k=3)
    sae.save(tmp_path / "sae", metadata={"hook_name": "blocks.0.hook_resid_post"})
    text = (tmp_path / "sae" / "cfg.json").read_text()
    cfg = json.loads(text)
    assert {key: cfg[key] for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                      "normalize_activations", "reshape_activations", "k")} == {
        "architecture": "topk", "d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "k": 3}
    assert cfg["metadata"] == {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                               "hook_name": "blocks.0.hook_resid_post"}
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"  # stable bytes: the audit hashes this file
    sae.save(tmp_path / "sae", metadata={})  # an existing folder is written over
    with pytest.raises(UserError, match="is not a saved SAE"):
        load_sae(tmp_path / "nothing")


def test_geometric_median_is_the_minimiser_of_summed_distances():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(geometric_median(points), torch.tensor([0.5, 0.5]), atol=1e-4)
    three = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0 ** 0.5]])  # equilateral: the centre
    assert torch.allclose(geometric_median(three, iterations=200), three.mean(0), atol=1e-4)


def test_saved_cfg_json_has_no_keys_but_saelens_s_settings_and_metadata(tmp_path):
    sae = topk_sae(8, 16, k=3, auxk_k=4)
    sae.save(tmp_path / "runs" / "resid0" / "sae", metadata={"model_name": "tiny"})  # parents made as needed
    cfg = json.loads((tmp_path / "runs" / "resid0" / "sae" / "cfg.json").read_text())
    assert set(cfg) == {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                        "normalize_activations", "reshape_activations", "k", "auxk_k", "auxk_coefficient",
                        "rescale_acts_by_decoder_norm", "metadata"}
    loaded, read_back = load_sae(tmp_path / "runs" / "resid0" / "sae")
    assert (loaded.d_in, loaded.d_sae, loaded.k, read_back["auxk_k"]) == (8, 16, 3, 4)


def test_broken_sae_folders_are_refused_with_a_message_naming_the_file_and_the_fix(tmp_path):
    import re

    sae = relu_sae(4, 8)
    folder = tmp_path / "sae"
    sae.save(folder, metadata={})
    fix = re.escape(f"rm -r {folder}")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 12)  # truncated
    with pytest.raises(UserError, match=r"sae_weights\.safetensors does not load \(.*\)\. .*" + fix + "$"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()  # cfg.json alone
    with pytest.raises(UserError, match=r"is not a saved SAE \(needs cfg\.json and sae_weights\.safetensors\)"):
        load_sae(folder)
    sae.save(folder, metadata={})
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cfg\.json is not valid JSON \(.*\)\. .*" + fix + "$"):
        load_sae(folder)
    sae.save(folder, metadata={})
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UserError, match=r"SAE architecture 'gated' is not one of \['jumprelu', 'standard', 'topk'\]"):
        load_sae(folder)
    # issue 30: NaN weights passed every stage with NaN scores and a claim that "holds"
    sae.save(folder, metadata={})
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_dec"][2, 1] = float("nan")
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(UserError, match=r"sae_weights\.safetensors: W_dec hold NaN or infinite values\. .*" + fix + "$"):
        load_sae(folder)
    with torch.no_grad():
        sae.b_enc[0] = float("inf")
    shutil.rmtree(folder)
    with pytest.raises(UserError, match=r"the trained SAE's b_enc hold NaN or infinite values: training diverged, "
                                        r"and nothing was saved\. Lower its learning rate \(sae\.lr"):
        sae.save(folder, metadata={})


def test_the_saelens_metadata_hooks_the_cached_site():
    """cfg.json's metadata, as SAELens reads it to hook an SAE into the model: the cached site's hook and
    context length, the model and dataset named, BOS prepended and kept."""
    from mechinterp.train_sae import saelens_metadata

    header = {"hook": "blocks.3.hook_resid_post", "context_length": 128, "site": "resid3"}
    assert saelens_metadata(header, "SmolLM2-135M", "wikitext") == {
        "model_name": "SmolLM2-135M", "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None,
        "prepend_bos": True, "context_size": 128, "dataset_path": "wikitext", "exclude_special_tokens": False,
        "model_class_name": "TransformerBridge"}


def test_geometric_median_defaults_to_thirty_weiszfeld_steps_from_the_centroid():
    """Checked against the iteration written as a float64 loop, on a triangle with a 121 degree angle at
    the origin: there the median is the vertex itself and Weiszfeld creeps towards it, moving ~5e-4 a
    step, so the start and the number of steps both show. At scale 1e-3 the clamp (1e-6) stays inert."""
    import math

    import numpy as np

    def weiszfeld(points: np.ndarray, steps: int) -> np.ndarray:
        estimate = points.mean(0)
        for _ in range(steps):
            weights = np.array([1 / max(float(np.linalg.norm(p - estimate)), 1e-6) for p in points])
            estimate = (weights[:, None] * points).sum(0) / weights.sum()
        return estimate

    angle = math.radians(121)
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [math.cos(angle), math.sin(angle)]])
    for scale in (1.0, 1e-3):
        median = geometric_median(torch.tensor(triangle * scale, dtype=torch.float32)).double().numpy()
        assert np.allclose(median, weiszfeld(triangle * scale, 30), atol=2e-6 * scale)
        assert not np.allclose(median, weiszfeld(triangle * scale, 31), atol=5e-5 * scale)
    assert torch.allclose(geometric_median(torch.tensor(triangle), iterations=0), torch.tensor(triangle).mean(0))


def test_jumprelu_threshold_is_strict_and_never_trained():
    """z = pre where pre > threshold, so a pre-activation exactly at its threshold gives 0 (Gemma Scope's
    Heaviside step H(0) = 0); the threshold is saved with the weights but frozen."""
    from mechinterp.saes.jumprelu import JumpReluSAE, JumpReluSettings

    sae = JumpReluSAE(3, JumpReluSettings(d_sae=4))
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([0.5, 0.5, 0.25, 1.0]))  # W_enc = 0: pre = b_enc for every input
        sae.threshold.copy_(torch.tensor([0.5, 0.25, 0.5, 0.0]))
    assert torch.equal(sae.encode(torch.randn(2, 3)), torch.tensor([[0.0, 0.5, 0.0, 1.0]] * 2))
    assert not sae.threshold.requires_grad and "threshold" in sae.state_dict()
    assert all(p.requires_grad for name, p in sae.named_parameters() if name != "threshold")
