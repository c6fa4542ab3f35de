"""Train one sparse autoencoder on one site's cached activations.

Streams batches from the memory-mapped cache in a seeded order that is a pure function of the step,
so a run resumed from a checkpoint continues exactly as if it had not stopped. BOS and attention-sink
tokens (norm far above the median) are left out: they would set the normalisation and dominate the
loss while the SAE learns little else. Activations are scaled to a mean squared norm of d_in; the
scale is folded into the saved weights."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError
from mechinterp.files import atomic_path
from mechinterp.saes import ARCHITECTURES, SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class RowSelection:
    """Which cache rows an SAE sees, and what was left out."""

    rows: np.ndarray  # eligible rows, sorted
    n_bos: int
    n_outliers: int
    median_norm: float
    outlier_threshold: float  # raw norm above which a token counts as an attention-sink outlier


def select_rows(cache: ActivationCache, candidates: np.ndarray, positions: np.ndarray,
                outlier_norm_ratio: float) -> RowSelection:
    """Drop BOS (position 0) and tokens whose norm exceeds `outlier_norm_ratio` x the median norm.
    One pass over the rows."""
    not_bos = candidates[positions != 0]
    norms = np.concatenate([chunk.norm(dim=1).numpy() for _, chunk in cache.chunks(not_bos)]) if len(not_bos) else np.zeros(0)
    median = float(np.median(norms)) if len(norms) else 0.0
    threshold = outlier_norm_ratio * median
    keep = norms <= threshold
    return RowSelection(not_bos[keep], len(candidates) - len(not_bos), int((~keep).sum()), median, threshold)


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(rows: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The rows of training step `step`: each epoch is a seeded permutation; sorted for fast reads."""
    steps_per_epoch = len(rows) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = _epoch_order(len(rows), seed, epoch)
    return np.sort(rows[order[index * batch_size : (index + 1) * batch_size]])


def lr_multiplier(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of steps."""
    warmup, decay_start = max(1, int(warmup_fraction * total)), int((1 - decay_fraction) * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def build_sae(d_in: int, settings: dict[str, Any]) -> SparseAutoencoder:
    if settings["architecture"] not in ARCHITECTURES:
        raise UserError(f"sae.architecture {settings['architecture']!r} is not one of {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[settings["architecture"]].from_settings(d_in, settings)


def fingerprint(settings: dict[str, Any], seed: int, cache: ActivationCache, selection: RowSelection) -> str:
    """What a checkpoint must match to be resumed: settings, seed, data."""
    blob = json.dumps({"settings": settings, "seed": seed, "header": cache.header, "rows": len(selection.rows)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_sae(cache: ActivationCache, selection: RowSelection, settings: dict[str, Any], seed: int,
              checkpoint: Path | None = None, stop_after_step: int | None = None, device: str = "cpu"
              ) -> tuple[SparseAutoencoder, pl.DataFrame, dict[str, Any]]:
    """Train an SAE on `selection.rows` of `cache` on `device`. Returns the SAE (on the CPU, reading raw
    activations), the training log and a summary. `stop_after_step` ends early, as a crash would,
    after writing a checkpoint."""
    d_in, batch_size = cache.header["shape"][1], settings["batch_size"]
    if len(selection.rows) < batch_size:
        raise UserError(f"only {len(selection.rows)} training tokens for {cache.header['site']} but "
                        f"sae.batch_size is {batch_size}; lower the batch size or raise tokens.train_tokens.")
    total_steps = max(1, settings["training_tokens"] // batch_size)
    torch.manual_seed(seed)
    sae = build_sae(d_in, settings).to(device)
    sample = cache.rows(batch_rows(selection.rows, min(batch_size, 16384), seed, 0)).to(device)
    scale = float(np.sqrt(d_in / sample.pow(2).sum(1).mean().item()))
    sae.initialise(sample * scale, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings["lr"], betas=(0.9, 0.999), fused=True)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    rows_log: list[dict[str, float]] = []
    start_step, key = 0, fingerprint(settings, seed, cache, selection)

    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["fingerprint"] == key:
            sae.load_state_dict(state["sae"])
            optimizer.load_state_dict(state["optimizer"])
            since_fired, rows_log, start_step, scale = state["since_fired"].to(device), state["log"], state["step"], state["scale"]
            log.info("resuming %s from step %d of %d", cache.header["site"], start_step, total_steps)
        else:
            log.info("checkpoint %s is from other settings or data; starting afresh", checkpoint)

    started = time.perf_counter()
    for step in tqdm(range(start_step, total_steps), desc=f"train {settings['architecture']} SAE", unit="step",
                     initial=start_step, total=total_steps):
        x = cache.rows(batch_rows(selection.rows, batch_size, seed, step)).to(device) * scale
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * lr_multiplier(step, total_steps, settings["warmup_fraction"], settings["decay_fraction"])
        metrics = sae.training_step(x, since_fired >= settings["dead_after_tokens"], progress=step / total_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_step()
        since_fired += batch_size
        since_fired[metrics["active"]] = 0
        if step % settings["log_every"] == 0 or step == total_steps - 1:
            rows_log.append({"step": step, "tokens": (step + 1) * batch_size, "lr": optimizer.param_groups[0]["lr"],
                             "mse": float(metrics["mse"]), "fvu": float(metrics["mse"] / metrics["variance"]),
                             "l0": float(metrics["l0"]), "auxk": float(metrics.get("auxk", 0.0)),
                             "l1": float(metrics.get("l1", 0.0)),
                             "dead_fraction": float((since_fired >= settings["dead_after_tokens"]).float().mean())})
        done = step + 1
        if checkpoint is not None and (done % settings["checkpoint_every"] == 0 or done == stop_after_step):
            _save_checkpoint(checkpoint, {"fingerprint": key, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
                                          "since_fired": since_fired, "log": rows_log, "step": done, "scale": scale})
        if done == stop_after_step:
            break
    seconds = time.perf_counter() - started
    steps_run = (min(total_steps, stop_after_step or total_steps)) - start_step
    sae.fold_scale(scale)
    sae.cpu()
    summary = {"scale": scale, "total_steps": total_steps, "train_seconds": seconds,
               "tokens_per_s": steps_run * batch_size / seconds if seconds else float("nan"),
               "n_train_rows": len(selection.rows), "n_excluded_bos": selection.n_bos,
               "n_excluded_outliers": selection.n_outliers, "median_norm": selection.median_norm,
               "outlier_threshold": selection.outlier_threshold}
    return sae, pl.DataFrame(rows_log), summary


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)

