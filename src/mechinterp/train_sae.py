"""Train one sparse autoencoder on one site's cached activations.

Streams batches from the memory-mapped cache in a seeded order that is a pure function of the step,
so a run resumed from a checkpoint continues exactly as if it had not stopped. BOS and attention-sink
tokens (norm far above the median) are left out: they would set the normalisation and dominate the
loss while the SAE learns little else. Activations are scaled to a mean squared norm of d_in; the
scale is folded into the saved weights.

At every row of the training log the SAE is also measured on a fixed sample of held-out tokens (its
FVU there: no gradient, no random number drawn, so the trained weights are those of a run without
it), and an SAE whose held-out FVU still falls over the last tenth of training is flagged
`still_improving`: more training tokens would have given a better SAE."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, write_json, write_parquet
from mechinterp.saes import ARCHITECTURES, SparseAutoencoder
from mechinterp.tokens import split_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """How an SAE is trained: keys of the config's `sae` section (defaults in the schema)."""

    lr: float
    """Adam learning rate (after warm-up, before decay)"""
    batch_size: int
    """tokens per step"""
    training_tokens: int
    """tokens seen in training (epochs over the train split as needed)"""
    warmup_fraction: float
    """share of steps over which the learning rate rises linearly from zero"""
    decay_fraction: float
    """share of steps at the end over which the learning rate falls linearly to zero"""
    dead_after_tokens: int
    """a latent silent this long counts as dead (aux-k loss, dead fraction)"""
    outlier_norm_ratio: float
    """tokens with norm above this x the median (attention sinks) are left out"""
    log_every: int
    """steps between rows of the training log"""
    checkpoint_every: int
    """steps between checkpoints (a killed run resumes from the last one)"""
    heldout_eval_tokens: int
    """held-out tokens (a fixed sample) on which the FVU is measured at every row of the training log"""
    still_improving_drop: float
    """an SAE whose FVU fell by more than this share over the last tenth of training is `still_improving`"""


# one row per `log_every` steps (the figures' training curves); `fvu` is on the step's batch, `heldout_fvu`
# on the fixed held-out sample (NaN when there is none)
TRAINING_LOG_SCHEMA = {"step": pl.Int64, "tokens": pl.Int64, "lr": pl.Float64, "mse": pl.Float64, "fvu": pl.Float64,
                       "heldout_fvu": pl.Float64, "l0": pl.Float64, "auxk": pl.Float64, "l1": pl.Float64,
                       "dead_fraction": pl.Float64}
LATE_FRACTION = 0.1  # the end of training over which `still_improving` looks for a falling FVU


def _pick(cls: type, flat: dict[str, Any]) -> Any:
    return cls(**{f.name: flat[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class SaeSpec:
    """One SAE to train: its architecture, the architecture's settings and the training settings."""

    architecture: str
    sae: Any  # the architecture's Settings dataclass, e.g. TopKSettings
    training: TrainingSettings

    @classmethod
    def from_config(cls, flat: dict[str, Any]) -> SaeSpec:
        """From one resolved entry of the config's SAEs (config.sae_specs): `sae` settings merged with the
        site entry's overrides."""
        architecture = ARCHITECTURES[flat["architecture"]]
        return cls(flat["architecture"], _pick(architecture.Settings, flat), _pick(TrainingSettings, flat))

    def build(self, d_in: int) -> SparseAutoencoder:
        """A fresh (all-zero) SAE of this architecture for inputs of width `d_in`."""
        return ARCHITECTURES[self.architecture](d_in, self.sae)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **asdict(self.sae), **asdict(self.training)}


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


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Total variance of a batch [n, d] (sum over dimensions): the denominator of the FVU."""
    return x.sub(x.mean(0)).pow(2).sum(1).mean()


def heldout_sample(rows: np.ndarray, positions: np.ndarray, norms: np.ndarray, outlier_threshold: float,
                   n: int) -> np.ndarray:
    """The fixed held-out rows of the training curve: of `rows` (with their window positions and norms,
    each [n_rows]), BOS and tokens above the training's outlier threshold left out as in training, `n`
    rows evenly spaced over the rest (every held-out window contributes; no random number is drawn)."""
    eligible = rows[(positions != 0) & (norms <= outlier_threshold)]
    if len(eligible) <= n:
        return eligible
    return eligible[np.linspace(0, len(eligible) - 1, n).round().astype(np.int64)]


@torch.no_grad()
def sample_fvu(sae: SparseAutoencoder, x: torch.Tensor, variance: torch.Tensor) -> float:
    """FVU of `sae` on the sample x [n, d_in] of total variance `variance` (batch_variance(x))."""
    return float((sae(x) - x).pow(2).sum(1).mean() / variance)


def late_drop(steps: np.ndarray, curve: np.ndarray, total_steps: int) -> float:
    """Relative fall of a training curve (FVU at logged `steps`) over the last LATE_FRACTION of
    `total_steps`: (c(start) - c(end)) / c(start), c linearly interpolated between logged steps, start =
    (1 - LATE_FRACTION) x the last step. Positive while the curve still falls; NaN with fewer than
    two finite points."""
    finite = np.isfinite(curve)
    steps, curve = steps[finite], curve[finite]
    if len(steps) < 2:
        return float("nan")
    start = float(np.interp((1 - LATE_FRACTION) * (total_steps - 1), steps, curve))
    return (start - float(curve[-1])) / start


def still_improving(training_log: pl.DataFrame, total_steps: int, threshold: float) -> tuple[bool, float]:
    """Whether the SAE was still improving when training stopped: the late drop (late_drop) of its
    held-out FVU, or of its batch FVU when the log has no held-out FVU, above `threshold`. Returns the
    flag and the drop."""
    curve = training_log["heldout_fvu"].to_numpy()
    if not np.isfinite(curve).any():
        curve = training_log["fvu"].to_numpy()
    drop = late_drop(training_log["step"].to_numpy(), curve, total_steps)
    return bool(drop > threshold), drop


def lr_multiplier(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of steps."""
    warmup, decay_start = max(1, int(warmup_fraction * total)), int((1 - decay_fraction) * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def fingerprint(spec: SaeSpec, seed: int, cache: ActivationCache, selection: RowSelection) -> str:
    """What a checkpoint must match to be resumed: settings, seed, data."""
    blob = json.dumps({"settings": spec.to_dict(), "seed": seed, "header": cache.header, "rows": len(selection.rows)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_sae(cache: ActivationCache, selection: RowSelection, spec: SaeSpec, seed: int,
              checkpoint: Path | None = None, stop_after_step: int | None = None, device: str = "cpu",
              heldout: np.ndarray | None = None) -> tuple[SparseAutoencoder, pl.DataFrame, dict[str, Any]]:
    """Train an SAE on `selection.rows` of `cache` on `device`. Returns the SAE (on the CPU, reading raw
    activations), the training log and a summary. `stop_after_step` ends early, as a crash would,
    after writing a checkpoint. `heldout` (rows of `cache`, e.g. heldout_sample) is measured at every
    log row; without it the log's `heldout_fvu` is NaN and `still_improving` reads the batch FVU."""
    training = spec.training
    d_in, batch_size = cache.header["shape"][1], training.batch_size
    if len(selection.rows) < batch_size:
        raise UserError(f"only {len(selection.rows)} training tokens for {cache.header['site']} but "
                        f"sae.batch_size is {batch_size}; lower the batch size or raise tokens.train_tokens.")
    total_steps = max(1, training.training_tokens // batch_size)
    torch.manual_seed(seed)
    sae = spec.build(d_in).to(device)
    sample = cache.rows(batch_rows(selection.rows, min(batch_size, 16384), seed, 0)).to(device)
    scale = float(np.sqrt(d_in / sample.pow(2).sum(1).mean().item()))
    sae.initialise(sample * scale, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(sae.parameters(), lr=training.lr, betas=(0.9, 0.999), fused=True)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    rows_log: list[dict[str, float]] = []
    start_step, key = 0, fingerprint(spec, seed, cache, selection)

    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        if state["fingerprint"] == key:
            sae.load_state_dict(state["sae"])
            optimizer.load_state_dict(state["optimizer"])
            since_fired, rows_log, start_step, scale = state["since_fired"].to(device), state["log"], state["step"], state["scale"]
            log.info("resuming %s from step %d of %d", cache.header["site"], start_step, total_steps)
        else:
            log.info("checkpoint %s is from other settings or data; starting afresh", checkpoint)
    if heldout is not None and len(heldout):
        x_heldout = cache.rows(heldout).to(device) * scale
        heldout_variance = batch_variance(x_heldout)

    started = time.perf_counter()
    for step in tqdm(range(start_step, total_steps), desc=f"train {spec.architecture} SAE", unit="step",
                     initial=start_step, total=total_steps):
        x = cache.rows(batch_rows(selection.rows, batch_size, seed, step)).to(device) * scale
        for group in optimizer.param_groups:
            group["lr"] = training.lr * lr_multiplier(step, total_steps, training.warmup_fraction, training.decay_fraction)
        metrics = sae.training_step(x, since_fired >= training.dead_after_tokens, progress=step / total_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_step()
        since_fired += batch_size
        since_fired[metrics["active"]] = 0
        if step % training.log_every == 0 or step == total_steps - 1:
            rows_log.append({"step": step, "tokens": (step + 1) * batch_size, "lr": optimizer.param_groups[0]["lr"],
                             "mse": float(metrics["mse"]), "fvu": float(metrics["mse"] / batch_variance(x)),
                             "heldout_fvu": sample_fvu(sae, x_heldout, heldout_variance)
                             if heldout is not None and len(heldout) else float("nan"),
                             "l0": float(metrics["l0"]), "auxk": float(metrics.get("auxk", 0.0)),
                             "l1": float(metrics.get("l1", 0.0)),
                             "dead_fraction": float((since_fired >= training.dead_after_tokens).float().mean())})
        done = step + 1
        if checkpoint is not None and (done % training.checkpoint_every == 0 or done == stop_after_step):
            _save_checkpoint(checkpoint, {"fingerprint": key, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
                                          "since_fired": since_fired, "log": rows_log, "step": done, "scale": scale})
        if done == stop_after_step:
            break
    seconds = time.perf_counter() - started
    steps_run = (min(total_steps, stop_after_step or total_steps)) - start_step
    sae.fold_scale(scale)
    sae.cpu()
    training_log = pl.DataFrame(rows_log, schema=TRAINING_LOG_SCHEMA)
    improving, drop = still_improving(training_log, total_steps, training.still_improving_drop)
    summary = {"scale": scale, "total_steps": total_steps, "train_seconds": seconds,
               "tokens_per_s": steps_run * batch_size / seconds if seconds else float("nan"),
               "n_train_rows": len(selection.rows), "n_excluded_bos": selection.n_bos,
               "n_excluded_outliers": selection.n_outliers, "median_norm": selection.median_norm,
               "outlier_threshold": selection.outlier_threshold, "n_heldout_rows": 0 if heldout is None else len(heldout),
               "heldout_fvu": float(training_log["heldout_fvu"][-1]) if len(training_log) else float("nan"),
               "late_fvu_drop": drop, "still_improving": improving}
    return sae, training_log, summary


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state, or None when there is none or it does not load (empty, truncated, a pickle of
    objects, not this stage's): such a file is discarded with a warning naming it, and training starts afresh.
    Loaded with weights_only=True always: a checkpoint is never unpickled as code."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        if isinstance(state, dict) and "fingerprint" in state:
            return state
        problem = "it is not a checkpoint of this stage"
    except Exception as err:  # noqa: BLE001 - any file that does not load is discarded alike
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
    log.warning("checkpoint %s does not load (%s); deleting it and starting afresh", path, problem)
    path.unlink()
    return None


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def saelens_metadata(header: dict[str, Any], model_name: str, dataset: str) -> dict[str, Any]:
    """cfg.json's `metadata` for an SAE of the cached site `header` describes (what SAELens reads to hook
    it into the model), for every SAE folder this workflow writes: trained, loaded or a crosscoder."""
    return {"model_name": model_name, "hook_name": header["hook"], "hook_head_index": None, "prepend_bos": True,
            "context_size": header["context_length"], "dataset_path": dataset, "exclude_special_tokens": False,
            "model_class_name": "TransformerBridge"}


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `train_sae`: `python -m mechinterp.train_sae --help`."""
    parser = argparse.ArgumentParser(description="Train one SAE on one cached site; save it in SAELens's format.")
    parser.add_argument("--cache", required=True, help="the site's activation cache (.npy)")
    parser.add_argument("--table", required=True, help="the token table")
    parser.add_argument("--spec", required=True, help="this SAE's resolved settings as JSON (config.sae_specs)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--checkpoint", required=True, help="resumed from when it matches; deleted on success")
    parser.add_argument("--device", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--dataset", required=True, help="what the activations came from, for cfg.json")
    parser.add_argument("--out", required=True, help="the SAE folder")
    args = parser.parse_args(argv)
    from mechinterp.model import resolve_device

    torch.set_num_threads(args.threads)
    flat = json.loads(args.spec)
    spec = SaeSpec.from_config(flat)
    cache = ActivationCache.open(args.cache, args.table)
    table = pl.read_parquet(args.table, columns=["split", "position"])
    rows, positions = split_rows(table, "train")
    selection = select_rows(cache, rows, positions, spec.training.outlier_norm_ratio)
    log.info("training rows: %d (left out: %d BOS, %d norm outliers above %.1f = %.0f x median %.1f)",
             len(selection.rows), selection.n_bos, selection.n_outliers, selection.outlier_threshold,
             spec.training.outlier_norm_ratio, selection.median_norm)
    heldout_rows, heldout_positions = split_rows(table, "heldout")
    norms = np.concatenate([chunk.norm(dim=1).numpy() for _, chunk in cache.chunks(heldout_rows)]) if len(heldout_rows) \
        else np.zeros(0)
    heldout = heldout_sample(heldout_rows, heldout_positions, norms, selection.outlier_threshold,
                             spec.training.heldout_eval_tokens)
    checkpoint = Path(args.checkpoint)
    sae, training_log, summary = train_sae(cache, selection, spec, args.seed, checkpoint,
                                           device=resolve_device(args.device), heldout=heldout)
    header = cache.header
    with atomic_path(args.out) as tmp:
        sae.save(tmp, saelens_metadata(header, args.model_name, args.dataset),
                 extra={"mechinterp": {**flat, **summary, "seed": args.seed}})
        write_parquet(training_log, tmp / "training_log.parquet")
        write_json({**summary, "site": header["site"], "spec": flat, "seed": args.seed}, tmp / "training_summary.json")
    checkpoint.unlink(missing_ok=True)
    last = training_log.row(-1, named=True)
    log.info("trained %s: %d steps at %.0f tokens/s; last batch FVU %.3f, held-out FVU %.3f (%d tokens), L0 %.1f, "
             "dead %.1f%%", args.out, summary["total_steps"], summary["tokens_per_s"], last["fvu"], last["heldout_fvu"],
             len(heldout), last["l0"], 100 * last["dead_fraction"])
    if summary["still_improving"]:
        log.warning("%s: still improving at the end of training (held-out FVU fell %.1f%% over the last %.0f%% of "
                    "steps, above sae.still_improving_drop = %g); more training tokens (sae.training_tokens) "
                    "would give a better SAE", args.out, 100 * summary["late_fvu_drop"], 100 * LATE_FRACTION,
                    spec.training.still_improving_drop)


if __name__ == "__main__":
    run_stage(main)
