"""Evaluate a crosscoder against the per-site SAEs of the same sites, site by site, on their held-out
tokens: FVU of its reconstruction of each site, and the model's loss and KL with that reconstruction
spliced in (the other sites clean), beside each per-site SAE's own metrics (evaluate_sae). Tokens the
site's SAE leaves out (BOS, attention sinks above its threshold) are left out here too."""

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
from mechinterp.evaluate_sae import EvalSettings, splice_hook
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
                   batch_sequences: int) -> list[dict[str, float]]:
    """Per site: cross-entropy with the crosscoder's reconstruction of that site spliced in (the other
    sites, and BOS and outlier positions, clean) and KL(clean || spliced) per token. The crosscoder reads
    every site's clean activation, so each batch runs once clean and once per site spliced."""
    hooks = [site.hook_name for site in layout.sites]
    totals = [{"ce_crosscoder": 0.0, "kl": 0.0} for _ in hooks]
    ce_clean, n_predictions = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_sequences), desc="spliced loss", unit="batch"):
        tokens = torch.from_numpy(np.asarray(windows[start : start + batch_sequences], dtype=np.int64)).to(bridge.cfg.device)
        targets = tokens[:, 1:]
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        clean = logits[:, :-1].float().log_softmax(-1)
        ce_clean -= float(clean.gather(-1, targets[..., None]).sum())
        stacked = torch.cat([cache[h].reshape(-1, cache[h].shape[-1]).float() for h in hooks], 1)
        recon = sae(stacked)
        for i, (hook, block) in enumerate(zip(hooks, layout.blocks(), strict=True)):
            site_recon = recon[:, block]
            edit = splice_hook(lambda _flat, r=site_recon: r, thresholds[i])
            spliced = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, edit)])[:, :-1].float().log_softmax(-1)
            totals[i]["ce_crosscoder"] -= float(spliced.gather(-1, targets[..., None]).sum())
            totals[i]["kl"] += float((clean.exp() * (clean - spliced)).sum())
        n_predictions += targets.numel()
    return [{"ce_clean": ce_clean / n_predictions, **{k: v / n_predictions for k, v in t.items()},
             "n_loss_tokens": n_predictions} for t in totals]


def comparison_table(layout: Layout, sae: TopKSAE, recon: list[dict[str, float]], losses: list[dict[str, float]],
                     density: np.ndarray, site_saes: list[str], sae_metrics: pl.DataFrame,
                     training_tokens: int) -> pl.DataFrame:
    """One row per site and dictionary: the crosscoder's metrics at that site beside those of the site's
    own SAE (from the evaluate_sae stage, on the same held-out windows and splice positions). CE loss
    recovered uses that stage's zero-ablation loss of the site."""
    rows = []
    dead = float((density == 0).mean())
    for i, (site, sae_id) in enumerate(zip(layout.sites, site_saes, strict=True)):
        own = sae_metrics.filter(pl.col("sae") == sae_id).row(0, named=True)
        ce = losses[i]["ce_crosscoder"]
        rows.append({"site": site.id, "layer": site.layer, "width": layout.widths[i], "dictionary": "crosscoder",
                     "kind": "crosscoder",
                     "fvu": recon[i]["fvu"], "ce_loss": ce, "ce_clean": losses[i]["ce_clean"],
                     "ce_zero": own["ce_zero"], "ce_recovered": (own["ce_zero"] - ce) / (own["ce_zero"] - own["ce_clean"]),
                     "kl": losses[i]["kl"], "dead_fraction": dead, "d_sae": sae.d_sae, "k": sae.k,
                     "l0": float(density.sum()), "training_tokens": training_tokens})
        rows.append({"site": site.id, "layer": site.layer, "width": layout.widths[i], "dictionary": sae_id,
                     "kind": "per-site SAE",
                     "fvu": own["fvu"], "ce_loss": own["ce_sae"], "ce_clean": own["ce_clean"], "ce_zero": own["ce_zero"],
                     "ce_recovered": own["ce_recovered"], "kl": own["kl_sae"], "dead_fraction": own["dead_fraction"],
                     "d_sae": own["d_sae"], "k": own["k"], "l0": own["l0"], "training_tokens": own["training_tokens"]})
    return pl.DataFrame(rows, schema_overrides={"k": pl.Int64})


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
    losses = spliced_losses(bridge, sae, layout, windows[heldout], thresholds, settings.batch_sequences)
    recon, density = reconstruction_by_site(sae.cpu(), layout, stacked, rows)
    training_tokens = json.loads((Path(args.crosscoder) / "training_summary.json").read_text())["spec"]["training_tokens"]
    metrics = comparison_table(layout, sae, recon, losses, density, args.sae_ids, pl.read_parquet(args.sae_metrics),
                               training_tokens)
    write_parquet(metrics, args.out)
    write_parquet(pl.DataFrame({"latent": np.arange(sae.d_sae), "density": density}), args.density_out)
    for row in metrics.iter_rows(named=True):
        log.info("%s %s: FVU %.3f, CE recovered %.3f, KL %.4f", row["site"], row["dictionary"], row["fvu"],
                 row["ce_recovered"], row["kl"])


if __name__ == "__main__":
    run_stage(main)
