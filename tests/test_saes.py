"""SAE architectures: hand-written sparse gradients against autograd, the SAELens on-disk format,
and recovery of planted sparse structure."""

import json

import pytest
import torch

from conftest import relu_sae, topk_sae
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
