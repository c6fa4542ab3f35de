"""Evaluate a trained SAE on held-out tokens: reconstruction (MSE, FVU, L0, dead and dense latents,
per-latent density) from the activation cache, and the model's loss with the SAE spliced in at its
site against the clean model and against zero ablation.

The same tokens are left out as in training (BOS and attention-sink outliers, by the training
threshold): they are excluded from FVU and keep their clean activation when the SAE is spliced in
(and when the site is zero-ablated), and the metrics table says how many there were."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import SparseAutoencoder, load_sae
from mechinterp.sites import Site
from mechinterp.tokens import split_rows, split_sequences

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense
MOSTLY_DENSE = 0.5  # an SAE with more dense latents than this share is flagged: its features mean little


def quality_flags(metrics: dict[str, float]) -> list[str]:
    """Gross failures to see before any other number of an SAE: `fvu_above_1` (its reconstruction is
    worse than the mean activation) and `mostly_dense` (more than half its latents dense, as a ReLU SAE
    trained too briefly on a small model comes out). The claims stage holds SAEs to finer bounds."""
    return [flag for flag, failed in (("fvu_above_1", metrics["fvu"] > 1),
                                      ("mostly_dense", metrics["dense_fraction"] > MOSTLY_DENSE)) if failed]


def warn_of_flags(sae_id: str, metrics: dict[str, float], flags: list[str]) -> None:
    """A warning in the stage's log for each quality flag, with what to change."""
    if "fvu_above_1" in flags:
        log.warning("%s: FVU %.3f > 1, worse than reconstructing every token as the mean activation; train on more "
                    "tokens (sae.training_tokens) or lower the learning rate (sae.lr)", sae_id, metrics["fvu"])
    if "mostly_dense" in flags:
        log.warning("%s: %.0f%% of its latents are dense (active on more than %.0f%% of tokens; mean L0 %.0f of %d); "
                    "train longer (sae.training_tokens), or raise the sparsity (l1_coefficient, or a smaller k)",
                    sae_id, 100 * metrics["dense_fraction"], 100 * DENSE_THRESHOLD, metrics["l0"], metrics["d_sae"])


@dataclass(frozen=True)
class EvalSettings:
    """The config's `sae_eval` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    sequences: int
    """held-out windows for the spliced-loss metrics"""
    batch_sequences: int
    """windows per forward pass"""


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, cache: ActivationCache, rows: np.ndarray,
                           outlier_threshold: float = float("inf"), chunk: int = 4096) -> tuple[dict[str, float], np.ndarray]:
    """One streaming pass over `rows`: tokens with norm above `outlier_threshold` are counted and
    left out; on the rest, MSE, FVU = SSE / total variance, mean L0 and each latent's density.
    Runs on the SAE's device."""
    device = sae.W_enc.device
    n, n_outliers, sse, l0, sum_sq = 0, 0, 0.0, 0.0, 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fires = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    for _, x in tqdm(cache.chunks(rows, chunk), desc="reconstruction", unit="chunk", total=-(-len(rows) // chunk)):
        x = x.to(device)
        kept = x.norm(dim=1) <= outlier_threshold
        n_outliers += int((~kept).sum())
        x = x[kept]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += float((x_hat - x).double().pow(2).sum())
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        active = z > 0
        l0 += float(active.sum())
        fires += active.sum(0)
        n += len(x)
    variance = sum_sq - float(sum_x.pow(2).sum()) / n
    density = (fires.double() / n).cpu().numpy()
    return {"n_eval_tokens": n, "n_excluded_outliers": n_outliers, "mse": sse / n, "fvu": sse / variance,
            "l0": l0 / n, "dead_fraction": float((density == 0).mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).mean())}, density


def splice_hook(edit: Callable[[torch.Tensor], torch.Tensor], outlier_threshold: float):
    """A hook that replaces the site's activation by `edit(activation)` at every position except BOS
    and norm outliers, which keep their clean value."""

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:
        flat = acts.reshape(-1, acts.shape[-1]).float()
        keep = flat.norm(dim=1) > outlier_threshold
        keep.view(acts.shape[:-1])[:, 0] = True
        edited = torch.where(keep[:, None], flat, edit(flat))
        return edited.reshape(acts.shape).to(acts.dtype)

    return hook


@torch.no_grad()
def loss_metrics(bridge, sae: SparseAutoencoder, site: Site, windows: np.ndarray, outlier_threshold: float,
                 batch_sequences: int) -> dict[str, float]:
    """Next-token cross-entropy (nats/token) clean, with the SAE spliced in, and with the site
    zero-ablated; CE loss recovered; and KL(clean || spliced) per token. The SAE must sit on the
    model's device."""
    spliced = [(site.hook_name, splice_hook(sae, outlier_threshold))]
    zeroed = [(site.hook_name, splice_hook(torch.zeros_like, outlier_threshold))]
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0}
    n_predictions = 0
    for start in tqdm(range(0, len(windows), batch_sequences), desc="spliced loss", unit="batch"):
        tokens = torch.from_numpy(np.asarray(windows[start : start + batch_sequences], dtype=np.int64)).to(bridge.cfg.device)
        targets = tokens[:, 1:]
        clean = bridge(tokens)[:, :-1].float().log_softmax(-1)
        with_sae = bridge.run_with_hooks(tokens, fwd_hooks=spliced)[:, :-1].float().log_softmax(-1)
        zero = bridge.run_with_hooks(tokens, fwd_hooks=zeroed)[:, :-1].float().log_softmax(-1)
        for name, lp in (("ce_clean", clean), ("ce_sae", with_sae), ("ce_zero", zero)):
            totals[name] -= float(lp.gather(-1, targets[..., None]).sum())
        totals["kl_sae"] += float((clean.exp() * (clean - with_sae)).sum())
        n_predictions += targets.numel()
    out = {name: value / n_predictions for name, value in totals.items()}
    out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["ce_increase"] = out["ce_sae"] - out["ce_clean"]
    out["n_loss_tokens"] = n_predictions
    return out


def evaluate(bridge, sae: SparseAutoencoder, sae_id: str, cache: ActivationCache, table: pl.DataFrame,
             windows: np.ndarray, trained: dict[str, Any], settings: EvalSettings) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics row of one SAE on the held-out split (reconstruction from the cache, loss with the SAE
    spliced into `bridge`) and each latent's density [d_sae]. `trained` is the SAE's training summary;
    `windows` the token windows [n_windows, context_length]."""
    site = cache.site
    heldout = split_sequences(table, "heldout")
    if len(heldout) < settings.sequences:
        raise UserError(f"sae_eval.sequences = {settings.sequences} but the heldout split has {len(heldout)} windows "
                        "(the corpus ran short: see the tokenize log); lower sae_eval.sequences or add documents.")
    # The model's forward passes come first. After the reconstruction pass, the process's first forward
    # gave cross-entropies that differed in the sixth digit in 2 of 5 runs of the same command; run
    # first, they were identical in 8 of 8 (on the Xeon; the lazily chosen CPU kernel behind it is not
    # pinned down).
    losses = loss_metrics(bridge, sae, site, windows[heldout[: settings.sequences]], trained["outlier_threshold"],
                          settings.batch_sequences)
    rows, positions = split_rows(table, "heldout")
    metrics, density = reconstruction_metrics(sae, cache, rows[positions != 0], trained["outlier_threshold"])
    row = {"sae": sae_id, "site": site.kind, "layer": site.layer, "architecture": trained["spec"]["architecture"],
           "d_in": sae.d_in, "d_sae": sae.d_sae, "k": getattr(sae, "k", None), **metrics, **losses,
           "n_excluded_bos": int((positions == 0).sum()), "outlier_threshold": trained["outlier_threshold"],
           "train_seconds": trained["train_seconds"], "train_tokens_per_s": trained["tokens_per_s"],
           "training_tokens": trained["spec"]["training_tokens"],
           "excluded": "BOS and tokens with norm > outlier_norm_ratio x median: left out of FVU, kept clean when spliced"}
    row["quality_flags"] = quality_flags(row)
    warn_of_flags(sae_id, row, row["quality_flags"])
    return row, density


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `evaluate_sae`: `python -m mechinterp.evaluate_sae --help`."""
    parser = argparse.ArgumentParser(description="Reconstruction and spliced-loss metrics on held-out tokens.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--sae", required=True, help="the SAE folder")
    parser.add_argument("--sae-id", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--settings", required=True, help="the config's `sae_eval` section as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--density-out", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    sae = load_sae(args.sae)[0]
    trained = json.loads((Path(args.sae) / "training_summary.json").read_text())
    cache = ActivationCache.open(args.cache, args.table)
    bridge = load_model(args.model, args.device)
    sae.to(bridge.cfg.device)
    row, density = evaluate(bridge, sae, args.sae_id, cache, pl.read_parquet(args.table), np.load(args.tokens, mmap_mode="r"),
                            trained, EvalSettings(**json.loads(args.settings)))
    write_parquet(pl.DataFrame([row], schema_overrides={"quality_flags": pl.List(pl.Utf8)}), args.out)
    write_parquet(pl.DataFrame({"sae": args.sae_id, "latent": np.arange(sae.d_sae), "density": density}),
                  args.density_out)
    log.info("%s: %s", args.sae_id, {k: v for k, v in row.items() if isinstance(v, float)})


if __name__ == "__main__":
    run_stage(main)
