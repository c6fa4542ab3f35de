"""Evaluate a crosscoder against the per-site SAEs of the same sites, site by site, on their held-out
tokens: FVU of its reconstruction of each site, and the model's loss and KL with that reconstruction
spliced in (the other sites clean; the CE increase and the KL with bootstrap intervals over held-out
windows), beside each per-site SAE's own metrics (evaluate_sae). Its dead and dense shares, quality
flags and L0 at each site (every active latent writes every site) are those an SAE is judged by, so
the claims stage holds it to the same bounds. Tokens the site's SAE leaves out (BOS, attention sinks
above its threshold) are left out here too."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.crosscoder import Layout, StackedCache, heldout_rows, load_crosscoder, open_stacked, site_thresholds
from mechinterp.errors import run_stage
from mechinterp.evaluate_sae import DENSE_THRESHOLD, EvalSettings, bootstrap_mean, quality_flags, splice_hook, warn_of_flags
from mechinterp.files import write_parquet
from mechinterp.saes import TopKSAE
from mechinterp.saes.topk import sparse_decode
from mechinterp.tokens import split_sequences

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruction_by_site(sae: TopKSAE, layout: Layout, stacked: StackedCache, rows: np.ndarray,
                           chunk: int = 4096) -> tuple[list[dict[str, float]], np.ndarray]:
    """FVU per site (SSE over total variance) over `rows`, and each latent's density [d_sae]."""
    n_sites = len(layout.sites)
    sse, sum_sq = np.zeros(n_sites), np.zeros(n_sites)
    sum_x = [torch.zeros(w, dtype=torch.float64) for w in layout.widths]
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    for _, x in tqdm(stacked.chunks(rows, chunk), desc="reconstruction", unit="chunk", total=-(-len(rows) // chunk)):
        vals, idx = sae.encode_sparse(x)  # the k active latents: a dense decode would cost d_sae / k times more
        x_hat = sparse_decode(idx, vals, sae.W_dec) + sae.b_dec
        fires += torch.bincount(idx[vals > 0], minlength=sae.d_sae)
        for i, block in enumerate(layout.blocks()):
            sse[i] += float((x_hat[:, block] - x[:, block]).double().pow(2).sum())
            sum_sq[i] += float(x[:, block].double().pow(2).sum())
            sum_x[i] += x[:, block].double().sum(0)
    n = len(rows)
    density = (fires.double() / n).numpy()
    return [{"fvu": sse[i] / (sum_sq[i] - float(sum_x[i].pow(2).sum()) / n), "mse": sse[i] / n}
            for i in range(n_sites)], density


@torch.no_grad()
def spliced_losses(bridge, sae: TopKSAE, layout: Layout, windows: np.ndarray, thresholds: list[float],
                   batch_sequences: int) -> list[pl.DataFrame]:
    """Per site, one row per window of `windows` [n_windows, context_length]: its mean next-token
    cross-entropy clean (ce_clean) and with the crosscoder's reconstruction of that site spliced in
    (ce_crosscoder; the other sites, and BOS and outlier positions, clean), its mean KL(clean || spliced)
    per token (kl) and n_predictions. The crosscoder reads every site's clean activation, so each batch
    runs once clean and once per site spliced."""
    hooks = [site.hook_name for site in layout.sites]
    parts: list[dict[str, list[np.ndarray]]] = [{"ce_crosscoder": [], "kl": []} for _ in hooks]
    ce_clean = []
    for start in tqdm(range(0, len(windows), batch_sequences), desc="spliced loss", unit="batch"):
        tokens = torch.from_numpy(np.asarray(windows[start : start + batch_sequences], dtype=np.int64)).to(bridge.cfg.device)
        targets = tokens[:, 1:, None]
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        clean = logits[:, :-1].float().log_softmax(-1)
        ce_clean.append(-clean.gather(-1, targets)[..., 0].double().mean(1).cpu().numpy())
        stacked = torch.cat([cache[h].reshape(-1, cache[h].shape[-1]).float() for h in hooks], 1)
        recon = sae(stacked)
        for i, (hook, block) in enumerate(zip(hooks, layout.blocks(), strict=True)):
            site_recon = recon[:, block]
            edit = splice_hook(lambda _flat, r=site_recon: r, thresholds[i])
            spliced = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, edit)])[:, :-1].float().log_softmax(-1)
            parts[i]["ce_crosscoder"].append(-spliced.gather(-1, targets)[..., 0].double().mean(1).cpu().numpy())
            parts[i]["kl"].append((clean.exp() * (clean - spliced)).sum(-1).double().mean(1).cpu().numpy())
    clean_column = np.concatenate(ce_clean)
    return [pl.DataFrame({"ce_clean": clean_column, **{k: np.concatenate(v) for k, v in site_parts.items()},
                          "n_predictions": np.full(len(clean_column), windows.shape[1] - 1, dtype=np.int64)})
            for site_parts in parts]


def site_losses(per_window: pl.DataFrame, bootstrap_samples: int, seed: int) -> dict[str, float]:
    """From one site's table of spliced_losses: the mean losses over tokens, the CE increase
    (ce_crosscoder - ce_clean) and the KL each with its bootstrap 95% interval over the windows (as
    evaluate_sae's, from the same seed), n_loss_tokens and n_loss_windows."""
    weights = per_window["n_predictions"].to_numpy().astype(np.float64)
    resamples = np.random.default_rng(seed).integers(0, len(weights), size=(bootstrap_samples, len(weights)))
    ce_clean, ce = (float((per_window[c].to_numpy() * weights).sum() / weights.sum()) for c in ("ce_clean", "ce_crosscoder"))
    increase = bootstrap_mean((per_window["ce_crosscoder"] - per_window["ce_clean"]).to_numpy(), weights, resamples)
    kl = bootstrap_mean(per_window["kl"].to_numpy(), weights, resamples)
    return {"ce_clean": ce_clean, "ce_crosscoder": ce, "ce_increase": increase[0], "ce_increase_ci_low": increase[1],
            "ce_increase_ci_high": increase[2], "kl": kl[0], "kl_ci_low": kl[1], "kl_ci_high": kl[2],
            "n_loss_tokens": int(weights.sum()), "n_loss_windows": len(weights)}


METRIC_SCHEMA = {"k": pl.Int64, "still_improving": pl.Boolean, "quality_flags": pl.List(pl.Utf8)}


def comparison_table(layout: Layout, sae: TopKSAE, recon: list[dict[str, float]], losses: list[dict[str, float]],
                     density: np.ndarray, trained: dict, site_saes: list[str], sae_metrics: pl.DataFrame
                     ) -> pl.DataFrame:
    """One row per site and dictionary: the crosscoder's metrics at that site beside those of the site's
    own SAE (from the evaluate_sae stage, on the same held-out windows and splice positions). `l0` is the
    latents written to the site per token (every active crosscoder latent writes every site); the
    crosscoder's dead and dense shares are over all its latents, and its quality flags are evaluate_sae's
    on its row at each site. CE loss recovered uses that stage's zero-ablation loss of the site.
    `trained` is the crosscoder's training summary."""
    rows = []
    dead, dense = float((density == 0).mean()), float((density > DENSE_THRESHOLD).mean())
    for i, (site, sae_id) in enumerate(zip(layout.sites, site_saes, strict=True)):
        own = sae_metrics.filter(pl.col("sae") == sae_id).row(0, named=True)
        loss = losses[i]
        row = {"site": site.id, "layer": site.layer, "width": layout.widths[i], "dictionary": "crosscoder",
               "kind": "crosscoder", "fvu": recon[i]["fvu"], "ce_loss": loss["ce_crosscoder"],
               "ce_clean": loss["ce_clean"], "ce_zero": own["ce_zero"],
               "ce_recovered": (own["ce_zero"] - loss["ce_crosscoder"]) / (own["ce_zero"] - own["ce_clean"]),
               **{c: loss[c] for c in ("ce_increase", "ce_increase_ci_low", "ce_increase_ci_high", "kl", "kl_ci_low",
                                       "kl_ci_high", "n_loss_windows")},
               "dead_fraction": dead, "dense_fraction": dense, "d_sae": sae.d_sae, "k": sae.k,
               "l0": float(density.sum()), "training_tokens": trained["spec"]["training_tokens"],
               "still_improving": trained["still_improving"], "late_fvu_drop": trained["late_fvu_drop"]}
        row["quality_flags"] = quality_flags(row)
        rows.append(row)
        rows.append({"site": site.id, "layer": site.layer, "width": layout.widths[i], "dictionary": sae_id,
                     "kind": "per-site SAE", "fvu": own["fvu"], "ce_loss": own["ce_sae"], "ce_clean": own["ce_clean"],
                     "ce_zero": own["ce_zero"], "ce_recovered": own["ce_recovered"],
                     "ce_increase": own["ce_increase"], "ce_increase_ci_low": own["ce_increase_ci_low"],
                     "ce_increase_ci_high": own["ce_increase_ci_high"], "kl": own["kl_sae"],
                     "kl_ci_low": own["kl_sae_ci_low"], "kl_ci_high": own["kl_sae_ci_high"],
                     "n_loss_windows": own["n_loss_windows"], "dead_fraction": own["dead_fraction"],
                     "dense_fraction": own["dense_fraction"], "d_sae": own["d_sae"], "k": own["k"], "l0": own["l0"],
                     "training_tokens": own["training_tokens"], "still_improving": own["still_improving"],
                     "late_fvu_drop": own["late_fvu_drop"], "quality_flags": own["quality_flags"]})
    return pl.DataFrame(rows, schema_overrides=METRIC_SCHEMA)


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `evaluate_crosscoder`: `python -m mechinterp.evaluate_crosscoder --help`."""
    parser = argparse.ArgumentParser(description="FVU, CE loss recovered and KL by site, beside the per-site SAEs.")
    parser.add_argument("--crosscoder", required=True, help="the crosscoder folder")
    parser.add_argument("--saes", nargs="+", required=True, help="each site's own SAE folder, in site order")
    parser.add_argument("--sae-ids", nargs="+", required=True)
    parser.add_argument("--sae-metrics", required=True, help="sae_eval/metrics.parquet")
    parser.add_argument("--caches", nargs="+", required=True, help="each site's activation cache, in order")
    parser.add_argument("--table", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", required=True, help="the config's `sae_eval` section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="of the bootstrap resamples")
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--density-out", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    sae, layout = load_crosscoder(args.crosscoder)
    stacked = open_stacked(args.caches, args.table)
    table = pl.read_parquet(args.table)
    thresholds = site_thresholds(args.saes)
    rows = heldout_rows(stacked, table, layout.blocks(), thresholds)
    settings = EvalSettings(**json.loads(args.settings))
    bridge = load_model(args.model, args.device)
    windows = np.load(args.tokens, mmap_mode="r")
    heldout = split_sequences(table, "heldout")[: settings.sequences]
    sae.to(bridge.cfg.device)
    per_window = spliced_losses(bridge, sae, layout, windows[heldout], thresholds, settings.batch_sequences)
    losses = [site_losses(table, settings.bootstrap_samples, args.seed) for table in per_window]
    recon, density = reconstruction_by_site(sae.cpu(), layout, stacked, rows)
    trained = json.loads((Path(args.crosscoder) / "training_summary.json").read_text())
    metrics = comparison_table(layout, sae, recon, losses, density, trained, args.sae_ids,
                               pl.read_parquet(args.sae_metrics))
    write_parquet(metrics, args.out)
    write_parquet(pl.DataFrame({"latent": np.arange(sae.d_sae), "density": density}), args.density_out)
    for row in metrics.iter_rows(named=True):
        log.info("%s %s: FVU %.3f, CE increase %.3f [%.3f, %.3f], KL %.4f, dead %.1f%%, dense %.1f%%, L0 %.0f, flags %s",
                 row["site"], row["dictionary"], row["fvu"], row["ce_increase"], row["ce_increase_ci_low"],
                 row["ce_increase_ci_high"], row["kl"], 100 * row["dead_fraction"], 100 * row["dense_fraction"],
                 row["l0"], row["quality_flags"])
    for row in metrics.filter(pl.col("kind") == "crosscoder").iter_rows(named=True):
        warn_of_flags(f"crosscoder at {row['site']}", row, row["quality_flags"])


if __name__ == "__main__":
    run_stage(main)
