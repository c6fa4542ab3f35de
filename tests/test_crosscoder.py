"""The crosscoder: with one site it is exactly a TopK SAE of the same settings; the site scales fold
into its weights; planted cross-site structure comes out as spread decoders, per-site structure as
single-site latents; site ablations find the sites a latent reads; an identity crosscoder spliced into
a real model leaves its loss unchanged."""

import json

import numpy as np
import pytest
import torch

from conftest import topk_sae
from mechinterp.activations import ActivationCache, header_path
from mechinterp.crosscoder import Layout, StackedCache, fold_site_scales, site_scales
from mechinterp.crosscoder_latents import (CrosscoderSettings, best_matches, decoder_shares, effective_sites,
                                           initial_effective_sites, latent_table, site_drives)
from mechinterp.evaluate_crosscoder import spliced_losses
from mechinterp.sites import Site
from mechinterp.train_sae import SaeSpec, select_rows, train_sae

SETTINGS = {"architecture": "topk", "d_sae": 48, "k": 2, "lr": 1e-2, "batch_size": 512, "training_tokens": 512 * 300,
            "warmup_fraction": 0.02, "decay_fraction": 0.2, "auxk_coefficient": 1 / 32, "auxk_k": 16,
            "dead_after_tokens": 20_000, "outlier_norm_ratio": 10, "log_every": 10, "checkpoint_every": 1000}
ANALYSIS = CrosscoderSettings(sites=None, d_sae=None, k=None, training_tokens=0, analysis_tokens=4096, min_active=20,
                              drive_threshold=0.5, match_cosine=0.9)


def save_cache(path, array: np.ndarray, site: str) -> ActivationCache:
    np.save(path, array.astype(np.float16))
    header_path(path).write_text(json.dumps({"shape": list(array.shape), "dtype": "float16", "site": site,
                                             "hook": Site.parse(site).hook_name, "context_length": 16,
                                             "token_table_sha256": "0" * 64}))
    return ActivationCache.open(path)


def planted_sites(tmp_path, shared: bool, n=8_000, d=16, n_atoms=16, active=2, seed=0):
    """Two sites whose activations are sparse sums of known directions: with `shared`, the same codes
    write to both sites (one feature across layers); otherwise each site has its own codes."""
    rng = np.random.default_rng(seed)

    def codes():
        c = np.zeros((n, n_atoms))
        for row in range(n):
            c[row, rng.choice(n_atoms, size=active, replace=False)] = rng.uniform(1, 3, size=active)
        return c

    first = codes()
    second = first if shared else codes()
    atoms = [rng.normal(size=(n_atoms, d)) for _ in range(2)]
    atoms = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in atoms]
    # the second site is 3x larger, as deeper residual streams are: the site scales must even that out
    caches = [save_cache(tmp_path / "resid1.npy", first @ atoms[0], "resid1"),
              save_cache(tmp_path / "resid2.npy", 3 * second @ atoms[1], "resid2")]
    return caches, atoms


def train_stacked(caches, settings=SETTINGS, seed=0):
    rows = np.arange(caches[0].header["shape"][0])
    scales = site_scales(caches, rows)
    stacked = StackedCache(caches, scales)
    selection = select_rows(stacked, rows, np.ones(len(rows), int), settings["outlier_norm_ratio"])
    sae, _, _ = train_sae(stacked, selection, SaeSpec.from_config(settings), seed=seed)
    fold_site_scales(sae, stacked.widths, scales)
    layout = Layout([Site.parse(c.header["site"]) for c in caches], stacked.widths, scales)
    return sae, layout, StackedCache(caches, [1.0] * len(caches))


def test_a_one_site_crosscoder_is_the_topk_sae_of_the_same_settings(tmp_path):
    caches, _ = planted_sites(tmp_path, shared=False)
    cache = caches[0]
    rows = np.arange(cache.header["shape"][0])
    short = {**SETTINGS, "training_tokens": 512 * 60}
    sae = train_sae(cache, select_rows(cache, rows, np.ones(len(rows), int), 10), SaeSpec.from_config(short), seed=3)[0]
    crosscoder, layout, _ = train_stacked([cache], short, seed=3)
    assert layout.scales == [1.0] and layout.widths == [16]
    for name, weight in sae.state_dict().items():
        assert torch.equal(weight, crosscoder.state_dict()[name]), name


def test_site_scales_fold_into_the_weights():
    torch.manual_seed(0)
    layout = Layout([Site("resid", 1), Site("resid", 2)], [5, 3], [1.0, 0.25])
    sae = topk_sae(8, 32, 4)
    sae.initialise(torch.randn(64, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_()
    raw = torch.randn(50, 8) * torch.tensor([1.0] * 5 + [4.0] * 3)
    scaled = raw * torch.tensor([1.0] * 5 + [0.25] * 3)
    latents_scaled, recon_scaled = sae.encode(scaled), sae(scaled)
    fold_site_scales(sae, layout.widths, layout.scales)
    torch.testing.assert_close(sae.encode(raw), latents_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(raw)[:, 5:] * 0.25, recon_scaled[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(raw)[:, :5], recon_scaled[:, :5], rtol=1e-5, atol=1e-5)
    # decoder shares are measured in the scaled space, where the sites were balanced
    shares = decoder_shares(sae, layout)
    torch.testing.assert_close(shares.sum(1), torch.ones(32))
    assert effective_sites(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist() == [1.0, 2.0]
    # a random decoder spreads over sites by width: equal widths, every site; measured on random rows
    assert initial_effective_sites([64, 64, 64]) == pytest.approx(3.0)
    rows = torch.randn(20_000, 96 + 32)
    shares = torch.stack([rows[:, :96].norm(dim=1), rows[:, 96:].norm(dim=1)], 1)
    measured = effective_sites(shares / shares.sum(1, keepdim=True)).mean()
    assert float(measured) == pytest.approx(initial_effective_sites([96, 32]), abs=0.02)


@pytest.mark.parametrize("shared", [True, False])
def test_planted_cross_site_features_spread_over_sites_and_per_site_ones_do_not(tmp_path, shared):
    caches, atoms = planted_sites(tmp_path, shared=shared)
    # k: the active planted features per token (2 shared by both sites, or 2 at each site)
    sae, layout, raw = train_stacked(caches, {**SETTINGS, "k": 2 if shared else 4})
    x = raw.rows(np.arange(4096))
    decoders = {"resid1": torch.from_numpy(atoms[0]).float(), "resid2": torch.from_numpy(atoms[1]).float()}
    table = latent_table(sae, layout, x, decoders, ANALYSIS)
    alive = table.filter(table["n_active"] >= ANALYSIS.min_active)
    assert alive.height >= 20
    spread = float(alive["effective_sites"].median())
    matched = alive["matched_sites"].to_numpy()
    if shared:  # one latent per planted feature, written to both sites
        assert spread > 1.8 and (matched == 2).mean() > 0.6, (spread, np.bincount(matched))
    else:  # two sites' independent features: each latent writes (and is driven by) one site
        assert spread < 1.2 and (matched == 2).mean() < 0.1, (spread, np.bincount(matched))
        assert (alive["driving_sites"].to_numpy() == 1).mean() > 0.8
        own = np.where(alive["share_resid1"].to_numpy() > 0.5, alive["drive_resid1"].to_numpy(),
                       alive["drive_resid2"].to_numpy())
        assert np.median(own) > 0.9


def test_site_drives_find_the_sites_a_latent_reads():
    layout = Layout([Site("resid", 1), Site("resid", 2)], [2, 2], [1.0, 1.0])
    sae = topk_sae(4, 3, 2)
    with torch.no_grad():  # latent 0 reads site 1, latent 1 site 2, latent 2 both (half each)
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0.5], [0, 0, 0], [0, 1.0, 0.5], [0, 0, 0]]))
        sae.W_dec.copy_(torch.eye(3, 4))
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))  # zero-mean: ablation silences a site
    drives, counts = site_drives(sae, layout, x, min_active=10)
    assert (counts > 500).all()
    assert drives[0].tolist() == pytest.approx([1.0, 0.0], abs=0.05)
    assert drives[1].tolist() == pytest.approx([0.0, 1.0], abs=0.05)
    assert 0.3 < drives[2, 0] < 0.95 and 0.3 < drives[2, 1] < 0.95
    cosine, feature = best_matches(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.eye(2))
    assert feature.tolist() == [1, 0] and cosine.tolist() == pytest.approx([1.0, 2**-0.5])


def identity_crosscoder(width: int):
    """TopK over [x, -x] with k = width keeps |x_i| once per i, and the decoder [I; -I] gives x back."""
    sae = topk_sae(width, 2 * width, width)
    with torch.no_grad():
        eye = torch.eye(width)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_splicing_an_identity_crosscoder_leaves_the_loss_unchanged(tiny_bridge):
    sites = [Site("resid", 0), Site("mlp", 1)]
    widths = [s.width(tiny_bridge.cfg) for s in sites]
    layout = Layout(sites, widths, [1.0, 1.0])
    windows = np.random.default_rng(0).integers(2, 300, size=(4, 16))
    losses = spliced_losses(tiny_bridge, identity_crosscoder(sum(widths)), layout, windows, [1e9, 1e9], 3)
    for site in losses:
        assert site["ce_crosscoder"] == pytest.approx(site["ce_clean"], abs=1e-5)
        assert abs(site["kl"]) < 1e-5 and site["n_loss_tokens"] == 4 * 15
    broken = identity_crosscoder(sum(widths))
    with torch.no_grad():
        broken.W_dec.mul_(0.0)  # reconstructs every site as zero: the loss must move
    zeroed = spliced_losses(tiny_bridge, broken, layout, windows, [1e9, 1e9], 3)
    assert all(site["kl"] > 1e-3 for site in zeroed)
