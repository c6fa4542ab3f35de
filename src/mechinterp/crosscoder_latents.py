"""The crosscoder's latents, one row each: how its decoder norm spreads over the sites, which sites
drive it (each site's input to the encoder mean-ablated in turn: a recent critique, arXiv 2605.09438,
finds most latents driven by one or two layers even when their decoders spread), and which feature of
each site's own SAE its decoder matches (a latent matching features at several sites merges what the
per-site SAEs split); and its polysemanticity, scored by the polysemanticity stage's code on the stacked
sites.

A match rate means little alone: two SAEs of one site trained with different seeds share only part of
their features. So the share of live latents that match a per-site SAE feature is set against the same
share for a second seed of that site's SAE (the first replicate seed's) and for random directions
(chance), in `match_rates`."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mechinterp.intervals import wilson_interval
from mechinterp.crosscoder import Layout, heldout_rows, load_crosscoder, open_stacked, site_thresholds
from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import SparseAutoencoder, TopKSAE, load_sae

log = logging.getLogger(__name__)
RANDOM_DIRECTIONS = 2048  # random directions per site for the chance match rate


@torch.no_grad()
def decoder_shares(sae: TopKSAE, layout: Layout) -> torch.Tensor:
    """Each latent's decoder norm per site, in the scaled space it was trained in, as shares of its
    total: [d_sae, n_sites], rows summing to 1."""
    norms = torch.stack([sae.W_dec[:, block].norm(dim=1) * scale
                         for block, scale in zip(layout.blocks(), layout.scales, strict=True)], 1)
    return norms / norms.sum(1, keepdim=True).clamp_min(1e-12)


def effective_sites(shares: torch.Tensor) -> torch.Tensor:
    """The number of sites a latent's decoder spreads over, 1 / sum(share^2): from 1 (one site) to the
    number of sites (evenly spread). [d_sae, n_sites] -> [d_sae]."""
    return 1.0 / shares.pow(2).sum(1)


def initial_effective_sites(widths: list[int]) -> float:
    """The decoder spread of a latent at initialisation: a random direction's squared norm falls on each
    site in proportion to its width, so its shares are sqrt(w_l) / sum sqrt(w) (equal widths: every site).
    Trained latents that stay near it have not been sorted into sites."""
    roots = np.sqrt(np.asarray(widths, dtype=np.float64))
    return float(roots.sum() ** 2 / np.sum(widths))


@torch.no_grad()
def site_drives(sae: TopKSAE, layout: Layout, x: torch.Tensor, min_active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each site drives each latent: replace one site's input to the encoder by its mean over
    `x` [n, d_stacked] (the other sites clean), encode again (TopK included), and take the share of the
    latent's activation, summed over the tokens where it is active, that is lost. Returns drives
    [d_sae, n_sites] in [0, 1] (NaN for latents active on fewer than `min_active` tokens) and each
    latent's active-token count [d_sae]."""
    clean = sae.encode(x)
    active = clean > 0
    counts = active.sum(0)
    total = clean.sum(0)
    drives = []
    for block in layout.blocks():
        ablated = x.clone()
        ablated[:, block] = x[:, block].mean(0)
        kept = torch.minimum(sae.encode(ablated), clean).mul_(active).sum(0)  # activation left where it was active
        drives.append(1 - kept / total.clamp_min(1e-12))
    drives = torch.stack(drives, 1).clamp_(0, 1)
    drives[counts < min_active] = float("nan")
    return drives, counts


@torch.no_grad()
def best_matches(decoder_block: torch.Tensor, site_decoder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each crosscoder latent's decoder block at one site [d_sae, d], the per-site SAE feature
    whose decoder row [d_site_sae, d] is most aligned: (cosine [d_sae], feature index [d_sae])."""
    a = decoder_block / decoder_block.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = site_decoder / site_decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).max(1)


@dataclass(frozen=True)
class CrosscoderSettings:
    """The config's `crosscoder` section (defaults and ranges: workflow/schemas/config.schema.yaml). Its
    first four keys shape the crosscoder itself and are resolved against `sae` by config.crosscoder_plan;
    this stage reads the rest."""

    sites: list[str] | None
    """site ids it reads, each with an SAE in sae.sites (None: every resid site of sae.sites)"""
    d_sae: int | None
    """latents (None: sites x sae.d_sae, the per-site SAEs' total)"""
    k: int | None
    """active latents per token (None: sae.k, the per-site SAEs' L0 at each site)"""
    training_tokens: int
    """tokens seen in training"""
    analysis_tokens: int
    """held-out tokens encoded for the site ablations (each site ablated in turn)"""
    min_active: int
    """latents active on fewer of those tokens get no drive"""
    drive_threshold: float
    """a site drives a latent if ablating it alone removes at least this share of its activation"""
    match_cosine: float
    """a latent merges a per-site SAE feature if their decoders at that site have at least this cosine"""


def match_rate_row(site: str, dictionary: str, cosines: np.ndarray, match_cosine: float) -> dict[str, Any]:
    """The match rate of one dictionary's units at a site from their best cosines [n_units] to the
    site's SAE features: n_units, n_matched (cosine >= match_cosine), match_rate with its Wilson
    interval, and the median best cosine."""
    n, matched = len(cosines), int((cosines >= match_cosine).sum())
    low, high = wilson_interval(matched, n)
    return {"site": site, "dictionary": dictionary, "match_cosine": match_cosine, "n_units": n, "n_matched": matched,
            "match_rate": matched / n if n else float("nan"), "ci_low": low, "ci_high": high,
            "median_cosine": float(np.median(cosines)) if n else float("nan")}


@torch.no_grad()
def live_decoder_rows(sae: SparseAutoencoder, layout: Layout, site: str, x: torch.Tensor, min_active: int) -> torch.Tensor:
    """The decoder rows [n_live, d] of a per-site SAE of `site` whose latents are active on at least
    `min_active` of the tokens x [n, d_stacked] (stacked sites in `layout`; the SAE reads its site's block):
    live as the crosscoder's latents are counted."""
    block = layout.blocks()[[s.id for s in layout.sites].index(site)]
    return sae.W_dec.detach()[(sae.encode(x[:, block]) > 0).sum(0) >= min_active]


@torch.no_grad()
def match_rates(latents: pl.DataFrame, site_decoders: dict[str, torch.Tensor], seed_site: str,
                seed_decoder: torch.Tensor, settings: CrosscoderSettings, rng: np.random.Generator) -> pl.DataFrame:
    """How often units match a feature of a site's own SAE (best decoder cosine >= match_cosine), per
    site: the crosscoder's live latents (active on at least min_active analysis tokens; latent_table's
    cosines), `RANDOM_DIRECTIONS` random directions (chance), and at `seed_site` the live features
    `seed_decoder` [n_live, d] of a second seed of that site's SAE (the baseline: how often retraining
    the same SAE finds the same features). One row per site and dictionary (match_rate_row)."""
    live = latents.filter(pl.col("n_active") >= settings.min_active)
    rows = []
    for site, reference in site_decoders.items():
        rows.append(match_rate_row(site, "crosscoder", live[f"cosine_{site}"].to_numpy(), settings.match_cosine))
        if site == seed_site:
            rows.append(match_rate_row(site, "second seed", best_matches(seed_decoder, reference)[0].numpy(),
                                       settings.match_cosine))
        # numpy's generator: torch's, seeded alike, would redraw the SAEs' initial decoders
        random = torch.from_numpy(rng.standard_normal((RANDOM_DIRECTIONS, reference.shape[1]), dtype=np.float32))
        rows.append(match_rate_row(site, "random directions", best_matches(random, reference)[0].numpy(),
                                   settings.match_cosine))
    return pl.DataFrame(rows)


@torch.no_grad()
def latent_table(sae: TopKSAE, layout: Layout, x: torch.Tensor, site_decoders: dict[str, torch.Tensor],
                 settings: CrosscoderSettings) -> pl.DataFrame:
    """One row per latent: decoder-norm share per site and its effective number of sites, each site's
    drive (ablation) and the number of driving sites, and per site the best-aligned feature of that
    site's SAE with its cosine, and the number of sites where it matches one (a merged feature)."""
    shares = decoder_shares(sae, layout)
    drives, counts = site_drives(sae, layout, x, settings.min_active)
    columns: dict[str, Any] = {"latent": np.arange(sae.d_sae), "n_active": counts.numpy(),
                               "effective_sites": effective_sites(shares).numpy()}
    driving = (drives >= settings.drive_threshold).sum(1).float()
    driving[drives.isnan().any(1)] = float("nan")
    columns["driving_sites"] = driving.numpy()
    matched = torch.zeros(sae.d_sae)
    for i, (site, block) in enumerate(zip(layout.sites, layout.blocks(), strict=True)):
        cosine, feature = best_matches(sae.W_dec[:, block], site_decoders[site.id])
        columns[f"share_{site.id}"] = shares[:, i].numpy()
        columns[f"drive_{site.id}"] = drives[:, i].numpy()
        columns[f"match_{site.id}"] = feature.numpy()
        columns[f"cosine_{site.id}"] = cosine.numpy()
        matched += cosine >= settings.match_cosine
    columns["matched_sites"] = matched.numpy().astype(np.int64)
    return pl.DataFrame(columns).with_columns(pl.col(pl.Float32).cast(pl.Float64).fill_nan(None)).with_columns(
        pl.col("driving_sites").cast(pl.Int64))


def example_latents(latents: pl.DataFrame, units: pl.DataFrame, n: int = 2) -> pl.DataFrame:
    """The `n` most cross-site latents to show: scored alive, with drives, matching per-site SAE features
    at the most sites, then spreading most; their structure row joined with their polysemanticity row."""
    scored = units.filter((pl.col("dictionary") == "crosscoder") & (pl.col("status") == "alive")).select(
        pl.col("unit").alias("latent"), "monosemanticity", "best_concept", "top_contexts")
    return (latents.filter(pl.col("driving_sites").is_not_null()).join(scored, on="latent")
            .sort(["matched_sites", "effective_sites"], descending=True).head(n))


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `crosscoder_latents`: `python -m mechinterp.crosscoder_latents --help`."""
    parser = argparse.ArgumentParser(description="Cross-site structure and polysemanticity of every crosscoder latent.")
    parser.add_argument("--crosscoder", required=True, help="the crosscoder folder")
    parser.add_argument("--saes", nargs="+", required=True, help="each site's own SAE folder, in site order")
    parser.add_argument("--seed-sae", required=True,
                        help="one of those sites' SAE trained again with another seed: the match-rate baseline")
    parser.add_argument("--caches", nargs="+", required=True, help="each site's activation cache, in order")
    parser.add_argument("--table", required=True)
    parser.add_argument("--lexicons", required=True)
    parser.add_argument("--settings", required=True, help="the config's `crosscoder` section as JSON")
    parser.add_argument("--polysemanticity", required=True, help="the config's `polysemanticity` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True, help="output: one row per latent")
    parser.add_argument("--match-rates", required=True, help="output: match rates against the second seed and chance")
    parser.add_argument("--units", required=True, help="output: polysemanticity scores of every latent and dimension")
    parser.add_argument("--codes", required=True, help="output folder: the scored rows and the latents' SparseCodes")
    args = parser.parse_args(argv)
    from mechinterp.polysemanticity import IdentityDictionary, ScoringSettings, score_site, write_codes

    torch.set_num_threads(args.threads)
    sae, layout = load_crosscoder(args.crosscoder)
    settings = CrosscoderSettings(**json.loads(args.settings))
    stacked = open_stacked(args.caches, args.table)
    table = pl.read_parquet(args.table)
    rows = heldout_rows(stacked, table, layout.blocks(), site_thresholds(args.saes))
    if len(rows) < settings.min_active:
        raise UserError(f"only {len(rows)} held-out tokens to analyse the crosscoder on; raise tokens.heldout_tokens.")
    sample = rows[np.sort(np.random.default_rng(args.seed).choice(len(rows), min(settings.analysis_tokens, len(rows)),
                                                                  replace=False))]
    site_decoders = {site.id: load_sae(folder)[0].W_dec.detach()
                     for site, folder in zip(layout.sites, args.saes, strict=True)}
    x = stacked.rows(sample)
    structure = latent_table(sae, layout, x, site_decoders, settings)
    seed_site = json.loads((Path(args.seed_sae) / "training_summary.json").read_text())["site"]
    seed_rows = live_decoder_rows(load_sae(args.seed_sae)[0], layout, seed_site, x, settings.min_active)
    rates = match_rates(structure, site_decoders, seed_site, seed_rows, settings, np.random.default_rng(args.seed))
    scoring = ScoringSettings(**json.loads(args.polysemanticity))
    # the stacked sites' own dimensions are scored beside the latents, as a site's neurons are beside its
    # SAE's features: the browser compares each latent with its best-correlated dimension
    dictionaries = {"neurons": IdentityDictionary(sum(layout.widths)), "crosscoder": sae}
    kinds = {site.kind for site in layout.sites}
    unit_kinds = {"neurons": {"mlp": "neuron", "resid": "residual_dim"}[kinds.pop()] if len(kinds) == 1 else "dimension",
                  "crosscoder": "feature"}
    units, _, scored_rows, codes = score_site(stacked, table, rows, dictionaries, unit_kinds,
                                              pl.read_parquet(args.lexicons), scoring)
    write_parquet(structure, args.out)
    write_parquet(rates, args.match_rates)
    kinds = {site.kind for site in layout.sites}
    site_columns = [pl.lit(layout.site_id).alias("site"), pl.lit(kinds.pop() if len(kinds) == 1 else "stacked")
                    .alias("site_kind"), pl.lit(None, dtype=pl.Int64).alias("layer")]  # as polysemanticity's units
    write_parquet(units.select(*site_columns, pl.all()), args.units)
    write_codes(scored_rows, codes, args.codes)
    alive = structure.filter(pl.col("driving_sites").is_not_null())
    log.info("%d latents with drives; median effective sites %.2f; driving sites %s; matched sites %s", alive.height,
             float(structure["effective_sites"].median()), alive["driving_sites"].value_counts(sort=True).rows(),
             structure["matched_sites"].value_counts(sort=True).rows())
    for row in rates.iter_rows(named=True):
        log.info("%s, %s: %d of %d live units match a feature of the site's SAE (%.3f [%.3f, %.3f]), median cosine %.3f",
                 row["site"], row["dictionary"], row["n_matched"], row["n_units"], row["match_rate"], row["ci_low"],
                 row["ci_high"], row["median_cosine"])


if __name__ == "__main__":
    run_stage(main)
