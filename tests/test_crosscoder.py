"""The crosscoder: with one site it is exactly a TopK SAE of the same settings; the site scales fold
into its weights; planted cross-site structure comes out as spread decoders, per-site structure as
single-site latents; site ablations find the sites a latent reads; an identity crosscoder spliced into
a real model leaves its loss unchanged. It is judged as an SAE is (dead share past the bound fails, the
quality flags on its rows), and its match rate is set against a second seed's: an SAE matches itself
always, a random dictionary at chance."""

import dataclasses
import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from conftest import topk_sae
from mechinterp.activations import ActivationCache, header_path
from mechinterp.claims import ClaimsSettings, crosscoder_claims
from mechinterp.crosscoder import Layout, StackedCache, fold_site_scales, heldout_rows, site_scales
from mechinterp.intervals import share_difference_interval
from mechinterp.crosscoder_latents import (CrosscoderSettings, best_matches, decoder_shares, effective_sites,
                                           initial_effective_sites, latent_table, live_decoder_rows, match_rate_row,
                                           match_rates, site_drives)
from mechinterp.evaluate_crosscoder import comparison_table, reconstruction_by_site, site_losses, spliced_losses
from mechinterp.sites import Site
from mechinterp.train_sae import SaeSpec, select_rows, train_sae

SETTINGS = {"architecture": "topk", "d_sae": 48, "k": 2, "lr": 1e-2, "batch_size": 512, "training_tokens": 512 * 300,
            "warmup_fraction": 0.02, "decay_fraction": 0.2, "auxk_coefficient": 1 / 32, "auxk_k": 16,
            "dead_after_tokens": 20_000, "outlier_norm_ratio": 10, "log_every": 10, "checkpoint_every": 1000,
            "heldout_eval_tokens": 1024, "still_improving_drop": 0.01}
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


@pytest.mark.parametrize(("drive_threshold", "driving"), [(0.3, [1, 1, 2]), (0.9, [1, 1, 0])])
@pytest.mark.parametrize(("match_cosine", "matched"), [(0.55, [1, 1, 1]), (0.7, [1, 0, 1]), (0.85, [0, 0, 1])])
def test_latent_table_counts_driving_and_matched_sites_at_the_configured_cuts(drive_threshold, driving, match_cosine,
                                                                               matched):
    layout = Layout([Site("resid", 1), Site("resid", 2)], [2, 2], [1.0, 1.0])
    sae = topk_sae(4, 3, 2)
    with torch.no_grad():  # as above: latent 2 is driven about half by each site (0.50 and 0.52)
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0.5], [0, 0, 0], [0, 1.0, 0.5], [0, 0, 0]]))
        sae.W_dec.copy_(torch.eye(3, 4))
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    # the first site's SAE has one feature at cosine 0.8 with latent 0 and 0.6 with latent 1; the second's is latent 2
    decoders = {"resid1": torch.tensor([[0.8, 0.6]]), "resid2": torch.tensor([[1.0, 0.0]])}
    settings = CrosscoderSettings(sites=None, d_sae=None, k=None, training_tokens=0, analysis_tokens=2000, min_active=10,
                                  drive_threshold=drive_threshold, match_cosine=match_cosine)
    table = latent_table(sae, layout, x, decoders, settings)
    assert table["driving_sites"].to_list() == driving
    assert table["matched_sites"].to_list() == matched
    assert table["cosine_resid1"].to_list() == pytest.approx([0.8, 0.6, 0.0])
    assert table["share_resid1"].to_list() == pytest.approx([1.0, 1.0, 0.0])
    silent = latent_table(sae, layout, x, decoders, dataclasses.replace(settings, min_active=900))
    assert silent["driving_sites"].to_list() == [None, None, driving[2]]  # latents 0 and 1 fire on ~740 tokens


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
        assert site.height == 4 and (site["n_predictions"] == 15).all()
        np.testing.assert_allclose(site["ce_crosscoder"], site["ce_clean"], atol=1e-5)
        assert site["kl"].abs().max() < 1e-5
    broken = identity_crosscoder(sum(widths))
    with torch.no_grad():
        broken.W_dec[:, widths[0]:] = 0.0  # reconstructs the second site as zero: its loss must move, not the first's
    zeroed = spliced_losses(tiny_bridge, broken, layout, windows, [1e9, 1e9], 3)
    assert zeroed[0]["kl"].abs().max() < 1e-5 and (zeroed[1]["kl"] > 1e-3).all()
    np.testing.assert_allclose(zeroed[1]["ce_clean"], losses[1]["ce_clean"], atol=1e-6)


def test_site_losses_are_token_weighted_means_with_bootstrap_intervals():
    per_window = pl.DataFrame({"ce_clean": [2.0, 3.0, 2.5], "ce_crosscoder": [2.1, 3.1, 2.6], "kl": [0.1, 0.3, 0.2],
                               "n_predictions": [10, 10, 20]})
    losses = site_losses(per_window, bootstrap_samples=200, seed=0)
    assert losses["ce_clean"] == pytest.approx(2.5) and losses["ce_crosscoder"] == pytest.approx(2.6)
    # every window raises the CE by 0.1: every resample too
    assert losses["ce_increase"] == losses["ce_increase_ci_low"] == pytest.approx(0.1)
    assert losses["ce_increase_ci_high"] == pytest.approx(0.1)
    assert losses["kl"] == pytest.approx(0.2) and 0.1 <= losses["kl_ci_low"] < 0.2 < losses["kl_ci_high"] <= 0.3
    assert losses["n_loss_tokens"] == 40 and losses["n_loss_windows"] == 3


def test_reconstruction_by_site_measures_each_sites_block():
    layout = Layout([Site("resid", 1), Site("resid", 2)], [3, 2], [1.0, 1.0])
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(0)) + 2.0
    sae = identity_crosscoder(5)
    with torch.no_grad():
        sae.W_dec[:, 3:] = 0.0  # the second site reconstructed as zero: SSE = sum x^2 > its variance
    stacked = StackedCache([FixedCache(x)], [1.0])
    recon, density = reconstruction_by_site(sae, layout, stacked, np.arange(500))
    assert recon[0]["fvu"] == pytest.approx(0.0, abs=1e-6)
    second = x[:, 3:].double()
    assert recon[1]["fvu"] == pytest.approx(float(second.pow(2).sum() / (second - second.mean(0)).pow(2).sum()), rel=1e-4)
    assert density.shape == (10,) and density[:5].sum() + density[5:].sum() == pytest.approx(5.0)


class FixedCache:
    """An in-memory stand-in for ActivationCache: rows of a tensor."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.header = {"shape": list(x.shape), "site": "resid1"}

    def rows(self, index):
        return self.x[torch.as_tensor(index)].clone()

    chunks = ActivationCache.chunks


def test_heldout_rows_keep_the_heldout_split_without_bos_or_outliers():
    table = pl.DataFrame({"split": ["train"] * 4 + ["heldout"] * 4, "position": [0, 1, 2, 3] * 2})
    x = torch.ones(8, 4)
    x[6, 2:] = 50.0  # a second-site outlier at held-out row 6
    stacked = StackedCache([FixedCache(x)], [1.0])
    blocks = [slice(0, 2), slice(2, 4)]
    assert heldout_rows(stacked, table, blocks, [10.0, 10.0]).tolist() == [5, 7]
    assert heldout_rows(stacked, table, blocks, [10.0, 100.0]).tolist() == [5, 6, 7]
    assert heldout_rows(stacked, table, blocks, [1.0, 100.0]).tolist() == []  # norm sqrt(2) > 1 at the first site


SAE_ROW = {"sae": "resid1-topk", "fvu": 0.2, "ce_sae": 3.1, "ce_clean": 3.0, "ce_zero": 9.0, "ce_recovered": 0.98,
           "ce_increase": 0.1, "ce_increase_ci_low": 0.08, "ce_increase_ci_high": 0.12, "kl_sae": 0.12,
           "kl_sae_ci_low": 0.1, "kl_sae_ci_high": 0.14, "n_loss_windows": 16, "dead_fraction": 0.01,
           "dense_fraction": 0.0, "d_sae": 64, "k": 4, "l0": 4.0, "training_tokens": 1000, "still_improving": False,
           "late_fvu_drop": 0.0, "quality_flags": []}
LOSSES = {"ce_crosscoder": 3.2, "ce_clean": 3.0, "ce_increase": 0.2, "ce_increase_ci_low": 0.15,
          "ce_increase_ci_high": 0.25, "kl": 0.2, "kl_ci_low": 0.15, "kl_ci_high": 0.25, "n_loss_windows": 16}
GOOD_LOSSES = {**LOSSES, "ce_crosscoder": 3.05, "ce_increase": 0.05, "ce_increase_ci_low": 0.03,
               "ce_increase_ci_high": 0.07, "kl": 0.05, "kl_ci_low": 0.03, "kl_ci_high": 0.07}


def crosscoder_metrics(density: np.ndarray, fvus=(0.3, 0.4), still_improving=False) -> pl.DataFrame:
    layout = Layout([Site("resid", 1), Site("resid", 2)], [3, 2], [1.0, 1.0])
    sae_metrics = pl.DataFrame([SAE_ROW, {**SAE_ROW, "sae": "resid2-topk"}])
    trained = {"spec": {"training_tokens": 1000}, "still_improving": still_improving, "late_fvu_drop": 0.05}
    return comparison_table(layout, topk_sae(5, len(density), 4), [{"fvu": f} for f in fvus], [LOSSES, GOOD_LOSSES],
                            density, trained, ["resid1-topk", "resid2-topk"], sae_metrics)


def test_the_crosscoders_rows_carry_an_saes_quality_flags_and_l0_per_site():
    density = np.array([0.0] * 10 + [0.04] * 90)  # 10% dead, none dense, L0 3.6
    metrics = crosscoder_metrics(density)
    assert metrics.select("site", "dictionary").rows() == [("resid1", "crosscoder"), ("resid1", "resid1-topk"),
                                                           ("resid2", "crosscoder"), ("resid2", "resid2-topk")]
    own = metrics.filter(pl.col("kind") == "crosscoder")
    assert own["dead_fraction"].to_list() == [0.1, 0.1] and own["dense_fraction"].to_list() == [0.0, 0.0]
    assert own["l0"].to_list() == pytest.approx([3.6, 3.6]) and own["fvu"].to_list() == [0.3, 0.4]
    assert own["quality_flags"].to_list() == [[], []]
    assert metrics.filter(pl.col("kind") == "per-site SAE")["kl"].to_list() == [0.12, 0.12]
    dense = crosscoder_metrics(np.array([0.2] * 60 + [0.01] * 40), fvus=(1.2, 0.4), still_improving=True)
    assert dense.filter(pl.col("kind") == "crosscoder")["quality_flags"].to_list() == [
        ["fvu_above_1", "mostly_dense", "still_improving"], ["mostly_dense", "still_improving"]]


BOUNDS = ClaimsSettings(fvu_max=0.5, ce_increase_max=0.3, kl_max=0.3, dead_fraction_max=0.1, dense_fraction_max=0.05)


def rates(crosscoder: tuple[int, int], second: tuple[int, int]) -> pl.DataFrame:
    return pl.DataFrame([match_rate_row("resid1", "crosscoder", np.r_[np.ones(crosscoder[0]), np.zeros(crosscoder[1] - crosscoder[0])], 0.7),
                         match_rate_row("resid1", "second seed", np.r_[np.ones(second[0]), np.zeros(second[1] - second[0])], 0.7),
                         match_rate_row("resid1", "random directions", np.zeros(100), 0.7),
                         match_rate_row("resid2", "crosscoder", np.ones(10), 0.7),
                         match_rate_row("resid2", "random directions", np.zeros(100), 0.7)])


def test_crosscoder_claims_judge_it_as_an_sae_and_against_a_second_seed():
    metrics = crosscoder_metrics(np.array([0.0] * 111 + [0.04] * 889))  # 11.1% dead, as the issue found
    claims = {row["claim"]: row for row in crosscoder_claims(metrics, rates((300, 1000), (600, 1000)), BOUNDS)}
    assert set(claims) == {"crosscoder.ce_increase", "crosscoder.kl_sae", "crosscoder.fvu", "crosscoder.dead_fraction",
                           "crosscoder.dense_fraction", "crosscoder.resid1_matches_beyond_second_seed"}
    assert claims["crosscoder.dead_fraction"]["value"] == pytest.approx(0.111)
    assert claims["crosscoder.dead_fraction"]["verdict"] == "fails"  # past the 10% bound
    assert claims["crosscoder.fvu"]["value"] == 0.4 and claims["crosscoder.fvu"]["verdict"] == "holds"  # worst site
    assert claims["crosscoder.ce_increase"]["verdict"] == "holds"  # [0.15, 0.25] and [0.03, 0.07] below 0.3
    assert claims["crosscoder.kl_sae"]["value"] == 0.2 and claims["crosscoder.kl_sae"]["ci_high"] == 0.25
    match = claims["crosscoder.resid1_matches_beyond_second_seed"]
    assert match["value"] == pytest.approx(-0.3) and match["ci_high"] < -0.2 and match["verdict"] == "fails"
    assert "300 of 1000 against 600 of 1000" in match["statement"]
    healthy = crosscoder_metrics(np.array([0.0] * 50 + [0.04] * 950))
    claims = {row["claim"]: row for row in crosscoder_claims(healthy, rates((600, 1000), (600, 1000)), BOUNDS)}
    assert claims["crosscoder.dead_fraction"]["verdict"] == "holds"
    assert claims["crosscoder.resid1_matches_beyond_second_seed"]["verdict"] == "inconclusive"
    # one site past the CE bound fails the crosscoder's claim, though the other meets it
    strict = ClaimsSettings(**{**BOUNDS.__dict__, "ce_increase_max": 0.1})
    claims = {row["claim"]: row for row in crosscoder_claims(healthy, rates((600, 1000), (600, 1000)), strict)}
    assert claims["crosscoder.ce_increase"]["verdict"] == "fails"


def test_newcombes_interval_of_a_difference_of_shares():
    # Newcombe (1998), table II, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    low, high = share_difference_interval(56, 70, 48, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    low, high = share_difference_interval(48, 80, 56, 70)  # swapped: the interval mirrors
    assert (low, high) == pytest.approx((-0.3339, -0.0524), abs=5e-4)
    assert all(math.isnan(v) for v in share_difference_interval(1, 0, 1, 2))


def test_an_sae_matches_itself_always_and_a_random_dictionary_at_chance():
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(256, 32, generator=generator)
    decoder /= decoder.norm(dim=1, keepdim=True)
    assert match_rate_row("s", "itself", best_matches(decoder, decoder)[0].numpy(), 0.7)["match_rate"] == 1.0
    random = torch.randn(512, 32, generator=generator)
    assert match_rate_row("s", "random", best_matches(random, decoder)[0].numpy(), 0.7)["match_rate"] == 0.0
    half = torch.cat([decoder[:100] + 0.01 * torch.randn(100, 32, generator=generator), random[:100]])
    row = match_rate_row("s", "half", best_matches(half, decoder)[0].numpy(), 0.7)
    assert (row["n_units"], row["n_matched"], row["match_rate"]) == (200, 100, 0.5)
    assert row["ci_low"] < 0.5 < row["ci_high"]


def test_match_rates_count_live_latents_against_the_second_seed_and_chance():
    reference = torch.eye(16)
    # four latents: two match a feature (cosine 1 and 0.8), one does not (0.5), one is dead (active on 2 tokens)
    latents = pl.DataFrame({"latent": [0, 1, 2, 3], "n_active": [50, 10, 30, 2], "cosine_resid1": [1.0, 0.8, 0.5, 1.0],
                            "cosine_resid2": [0.1, 0.1, 0.9, 0.9]})
    second = reference[:6] * 0.5 + 0.0 * reference[6:12]  # six features of the second seed, all matching
    table = match_rates(latents, {"resid1": reference, "resid2": reference}, "resid1", second, ANALYSIS_LIVE,
                        np.random.default_rng(0))
    assert table.select("site", "dictionary").rows() == [("resid1", "crosscoder"), ("resid1", "second seed"),
                                                         ("resid1", "random directions"), ("resid2", "crosscoder"),
                                                         ("resid2", "random directions")]
    rows = {(r["site"], r["dictionary"]): r for r in table.iter_rows(named=True)}
    assert (rows["resid1", "crosscoder"]["n_units"], rows["resid1", "crosscoder"]["n_matched"]) == (3, 2)
    assert (rows["resid2", "crosscoder"]["n_units"], rows["resid2", "crosscoder"]["n_matched"]) == (3, 1)
    assert (rows["resid1", "second seed"]["n_units"], rows["resid1", "second seed"]["n_matched"]) == (6, 6)
    # a random direction in 16 dimensions has a best cosine with the 16 axes of about 0.5: under the cut
    assert rows["resid1", "random directions"]["match_rate"] < 0.01
    assert 0.3 < rows["resid1", "random directions"]["median_cosine"] < 0.7
    # the second seed's SAE reads its own site's block of the stacked tokens; live: active on >= min_active
    layout = Layout([Site("resid", 1), Site("resid", 2)], [2, 4], [1.0, 1.0])
    sae = topk_sae(4, 3, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0], [0, 0, 0]]))
        sae.W_dec.copy_(torch.arange(12.0).view(3, 4))
    x = torch.zeros(7, 6)
    x[:5, 2], x[5:, 3] = 1.0, 1.0  # the second site's first dimension on 5 tokens, its second on 2
    x[:, 1] = 1.0  # the first site's second dimension on all: read by mistake, it would make latent 1 live
    np.testing.assert_array_equal(live_decoder_rows(sae, layout, "resid2", x, min_active=3), [[0.0, 1, 2, 3]])
    assert live_decoder_rows(sae, layout, "resid2", x, min_active=2).shape == (2, 4)


ANALYSIS_LIVE = CrosscoderSettings(sites=None, d_sae=None, k=None, training_tokens=0, analysis_tokens=4096,
                                   min_active=10, drive_threshold=0.5, match_cosine=0.8)
