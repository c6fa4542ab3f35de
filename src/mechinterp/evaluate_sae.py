"""Evaluate a trained SAE on held-out tokens: reconstruction (MSE, FVU, L0, dead and dense latents,
per-latent density) from the activation cache, and the model's loss with the SAE spliced in at its
site against the clean model, zero ablation and mean ablation, per held-out window: the CE increase
(nats/token) and the KL(clean || spliced) with bootstrap 95% intervals over windows, as the field
reports an SAE's fidelity (Gao et al. 2024; Lieberum et al. 2024; SAEBench). CE loss recovered is a
column too, but zero-ablating a residual stream costs so many nats that it stays near 1 for a poor SAE.

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
from mechinterp.intervals import percentile_ci
from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import SparseAutoencoder, load_sae
from mechinterp.sites import Site
from mechinterp.tokens import split_rows, split_sequences

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense
MOSTLY_DENSE = 0.5  # an SAE with more dense latents than this share is flagged: its features mean little


def quality_flags(metrics: dict[str, Any]) -> list[str]:
    """Gross failures to see before any other number of an SAE: `fvu_above_1` (its reconstruction is
    worse than the mean activation), `mostly_dense` (more than half its latents dense, as a ReLU SAE
    trained too briefly on a small model comes out) and `still_improving` (its held-out FVU was still
    falling when training stopped: train_sae's training summary). The claims stage holds SAEs to finer
    bounds."""
    return [flag for flag, failed in (("fvu_above_1", metrics["fvu"] > 1),
                                      ("mostly_dense", metrics["dense_fraction"] > MOSTLY_DENSE),
                                      ("still_improving", metrics["still_improving"] is True)) if failed]


def warn_of_flags(sae_id: str, metrics: dict[str, float], flags: list[str]) -> None:
    """A warning in the stage's log for each quality flag, with what to change."""
    if "fvu_above_1" in flags:
        log.warning("%s: FVU %.3f > 1, worse than reconstructing every token as the mean activation; train on more "
                    "tokens (sae.training_tokens) or lower the learning rate (sae.lr)", sae_id, metrics["fvu"])
    if "mostly_dense" in flags:
        log.warning("%s: %.0f%% of its latents are dense (active on more than %.0f%% of tokens; mean L0 %.0f of %d); "
                    "train longer (sae.training_tokens), or raise the sparsity (l1_coefficient, or a smaller k)",
                    sae_id, 100 * metrics["dense_fraction"], 100 * DENSE_THRESHOLD, metrics["l0"], metrics["d_sae"])
    if "still_improving" in flags:
        log.warning("%s: still improving when training stopped (held-out FVU fell %.1f%% over the last 10%% of its "
                    "steps); train on more tokens (sae.training_tokens, and tokens.train_tokens for more distinct "
                    "ones)", sae_id, 100 * metrics["late_fvu_drop"])


@dataclass(frozen=True)
class EvalSettings:
    """The config's `sae_eval` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    sequences: int
    """held-out windows for the spliced-loss metrics"""
    batch_sequences: int
    """windows per forward pass"""
    bootstrap_samples: int
    """resamples of the held-out windows for the intervals of the CE increase and the KL"""


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
def mean_activation(cache: ActivationCache, rows: np.ndarray, outlier_threshold: float, chunk: int = 8192) -> torch.Tensor:
    """The mean activation [d_in] (float32) over `rows` of the cache, tokens with norm above
    `outlier_threshold` left out: what mean ablation writes at the site."""
    total, n = torch.zeros(cache.header["shape"][1], dtype=torch.float64), 0
    for _, x in cache.chunks(rows, chunk):
        x = x[x.norm(dim=1) <= outlier_threshold].double()
        total += x.sum(0)
        n += len(x)
    return (total / n).float()


LOSS_COLUMNS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae")


@torch.no_grad()
def sequence_losses(bridge, sae: SparseAutoencoder, site: Site, windows: np.ndarray, outlier_threshold: float,
                    batch_sequences: int, mean: torch.Tensor) -> pl.DataFrame:
    """One row per window of `windows` [n_windows, context_length]: its mean next-token cross-entropy
    (nats/token) clean (ce_clean), with the SAE spliced in (ce_sae), with the site zero-ablated (ce_zero)
    and mean-ablated (ce_mean: the activation replaced by `mean` [d_in]), its mean KL(clean || spliced)
    per token (kl_sae), and n_predictions. BOS and norm outliers keep their clean activation in every
    edit. The SAE and `mean` must sit on the model's device."""
    edits = {"ce_sae": sae, "ce_zero": torch.zeros_like, "ce_mean": lambda flat: mean.expand_as(flat)}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in LOSS_COLUMNS}
    for start in tqdm(range(0, len(windows), batch_sequences), desc="spliced loss", unit="batch"):
        tokens = torch.from_numpy(np.asarray(windows[start : start + batch_sequences], dtype=np.int64)).to(bridge.cfg.device)
        targets = tokens[:, 1:, None]
        clean = bridge(tokens)[:, :-1].float().log_softmax(-1)
        parts["ce_clean"].append(-clean.gather(-1, targets)[..., 0].double().mean(1).cpu().numpy())
        for name, edit in edits.items():
            hooks = [(site.hook_name, splice_hook(edit, outlier_threshold))]
            edited = bridge.run_with_hooks(tokens, fwd_hooks=hooks)[:, :-1].float().log_softmax(-1)
            parts[name].append(-edited.gather(-1, targets)[..., 0].double().mean(1).cpu().numpy())
            if name == "ce_sae":
                kl = (clean.exp() * (clean - edited)).sum(-1)
                parts["kl_sae"].append(kl.double().mean(1).cpu().numpy())
    table = pl.DataFrame({name: np.concatenate(values) for name, values in parts.items()})
    return table.with_columns(n_predictions=pl.lit(windows.shape[1] - 1, dtype=pl.Int64))


def bootstrap_mean(values: np.ndarray, weights: np.ndarray, resamples: np.ndarray) -> tuple[float, float, float]:
    """The weighted mean of `values` [n] (weights [n]) and its 95% percentile interval over `resamples`
    [n_boot, n] (indices into values, drawn with replacement)."""
    low, high = percentile_ci((values[resamples] * weights[resamples]).sum(1) / weights[resamples].sum(1))
    return float((values * weights).sum() / weights.sum()), low, high


def loss_metrics(per_window: pl.DataFrame, bootstrap_samples: int, seed: int) -> dict[str, float]:
    """From sequence_losses' table: every loss column's mean over tokens; CE loss recovered against zero
    ablation (ce_recovered) and mean ablation (ce_recovered_mean); the CE increase (ce_sae - ce_clean)
    and the KL (kl_sae), each with its bootstrap 95% interval over the windows (`bootstrap_samples`
    resamples of the windows with replacement, seeded); n_loss_tokens and n_loss_windows."""
    weights = per_window["n_predictions"].to_numpy().astype(np.float64)
    resamples = np.random.default_rng(seed).integers(0, len(weights), size=(bootstrap_samples, len(weights)))
    out = {name: float((per_window[name].to_numpy() * weights).sum() / weights.sum()) for name in LOSS_COLUMNS}
    out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["ce_recovered_mean"] = (out["ce_mean"] - out["ce_sae"]) / (out["ce_mean"] - out["ce_clean"])
    increase = (per_window["ce_sae"] - per_window["ce_clean"]).to_numpy()
    out["ce_increase"], out["ce_increase_ci_low"], out["ce_increase_ci_high"] = bootstrap_mean(increase, weights, resamples)
    _, out["kl_sae_ci_low"], out["kl_sae_ci_high"] = bootstrap_mean(per_window["kl_sae"].to_numpy(), weights, resamples)
    out["n_loss_tokens"] = int(weights.sum())
    out["n_loss_windows"] = len(weights)
    return out


def evaluate(bridge, sae: SparseAutoencoder, sae_id: str, cache: ActivationCache, table: pl.DataFrame,
             windows: np.ndarray, trained: dict[str, Any], settings: EvalSettings, seed: int
             ) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics row of one SAE on the held-out split (reconstruction from the cache, loss with the SAE
    spliced into `bridge`; `seed` draws the bootstrap resamples) and each latent's density [d_sae].
    `trained` is the SAE's training summary; `windows` the token windows [n_windows, context_length]."""
    site = cache.site
    heldout = split_sequences(table, "heldout")
    if len(heldout) < settings.sequences:
        raise UserError(f"sae_eval.sequences = {settings.sequences} but the heldout split has {len(heldout)} windows "
                        "(the corpus ran short: see the tokenize log); lower sae_eval.sequences or add documents.")
    # The model's forward passes come first. After the reconstruction pass, the process's first forward
    # gave cross-entropies that differed in the sixth digit in 2 of 5 runs of the same command; run
    # first, they were identical in 8 of 8 (on the Xeon; the lazily chosen CPU kernel behind it is not
    # pinned down).
    rows, positions = split_rows(table, "heldout")
    mean = mean_activation(cache, rows[positions != 0], trained["outlier_threshold"]).to(bridge.cfg.device)
    per_window = sequence_losses(bridge, sae, site, windows[heldout[: settings.sequences]], trained["outlier_threshold"],
                                 settings.batch_sequences, mean)
    losses = loss_metrics(per_window, settings.bootstrap_samples, seed)
    metrics, density = reconstruction_metrics(sae, cache, rows[positions != 0], trained["outlier_threshold"])
    row = {"sae": sae_id, "site": site.kind, "layer": site.layer, "architecture": trained["spec"]["architecture"],
           "d_in": sae.d_in, "d_sae": sae.d_sae, "k": getattr(sae, "k", None), **metrics, **losses,
           "n_excluded_bos": int((positions == 0).sum()), "outlier_threshold": trained["outlier_threshold"],
           "train_seconds": trained["train_seconds"], "train_tokens_per_s": trained["tokens_per_s"],
           "training_tokens": trained["spec"]["training_tokens"],
           # a loaded SAE has no training curve: neither a late drop nor a flag
           "late_fvu_drop": trained.get("late_fvu_drop", float("nan")), "still_improving": trained.get("still_improving"),
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
    parser.add_argument("--seed", type=int, required=True, help="of the bootstrap resamples")
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
                            trained, EvalSettings(**json.loads(args.settings)), args.seed)
    write_parquet(pl.DataFrame([row], schema_overrides={"quality_flags": pl.List(pl.Utf8), "still_improving": pl.Boolean}),
                  args.out)
    write_parquet(pl.DataFrame({"sae": args.sae_id, "latent": np.arange(sae.d_sae), "density": density}),
                  args.density_out)
    log.info("%s: %s", args.sae_id, {k: v for k, v in row.items() if isinstance(v, float)})


if __name__ == "__main__":
    run_stage(main)
