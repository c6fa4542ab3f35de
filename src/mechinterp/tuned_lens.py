"""The tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator in front of
the final norm at every layer but the last, trained to make each layer's decoded distribution match
the model's own output. Where the logit lens misreads a layer because its basis has drifted from the
output's, the tuned lens still reads it; where both agree, the logit lens was a fair reading.

Layers are numbered as in the logit lens (0 = the embedding, the last = what the model decodes).
Positions are of three kinds, kept apart in training and evaluation: `bos` (position 0), `sink` (an
attention sink: a residual far larger than the rest of its window at that layer, see
`position_kinds`) and `other`. Translators train on `other` positions only: BOS and sinks carry
massive residuals whose decoded distribution is nothing like the rest, and would dominate the loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.config import window_count
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, write_json, write_parquet
from mechinterp.logit_lens import (
    LensSettings,
    decode,
    lens_inputs,
    residual_stream,
    run_logit_lens,
)
from mechinterp.tokens import split_sequences

log = logging.getLogger(__name__)
KINDS = ("bos", "sink", "other")  # position kinds; position_kinds returns indices into this
BOS, SINK, OTHER = range(len(KINDS))
LENSES = ("logit", "tuned")
N_BOOTSTRAP = 1000  # resamples of the held-out windows for each confidence interval


@dataclass(frozen=True)
class TunedLensSettings:
    """The config's `tuned_lens` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    train_tokens: int
    """train-split tokens the translators see (whole windows: rounded down to a multiple of the context)"""
    batch_sequences: int
    """windows per forward pass; each batch is one Adam step for every layer's translator"""
    lr: float
    """Adam learning rate of the translators"""
    eval_sequences: int
    """held-out windows on which both lenses' KL to the model's output is compared"""
    sink_norm_ratio: float
    """a non-BOS position whose residual norm at a layer exceeds this x its window's median norm at that
    layer counts as an attention sink there"""


class Translators(torch.nn.Module):
    """One affine translator per lens layer but the last: layer l's residual h [..., d_model] becomes
    h + h @ weight[l] + bias[l], with weight [n_layers, d_model, d_model] and bias [n_layers, d_model].
    The last lens layer (`n_layers`, the residual the model decodes) passes unchanged. Both start at
    zero, so the untrained tuned lens is exactly the logit lens.

    >>> translators = Translators(n_layers=2, d_model=4)
    >>> resid = torch.randn(3, 5, 4)  # [n_layers + 1, n_pos, d_model]
    >>> torch.equal(translators(resid), resid)
    True
    >>> with torch.no_grad():
    ...     _ = translators.bias[0].fill_(1.0)
    >>> torch.equal(translators(resid)[0], resid[0] + 1), torch.equal(translators(resid)[2], resid[2])
    (True, True)
    """

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    def translate(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Lens layer `layer`'s residuals [..., d_model], translated (the last layer as it is)."""
        if layer == self.n_layers:
            return resid
        return resid + resid @ self.weight[layer] + self.bias[layer]

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Stacked residuals [n_layers + 1, ..., d_model] -> translated residuals of the same shape."""
        if resid.shape[0] != self.n_layers + 1:
            raise ValueError(f"expected {self.n_layers + 1} stacked layers, got {resid.shape[0]}")
        return torch.stack([self.translate(layer, r) for layer, r in enumerate(resid)])

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Translators:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        n_layers, d_model = tensors["bias"].shape
        translators = cls(n_layers, d_model)
        translators.load_state_dict(tensors)
        return translators.to(device)


def position_kinds(resid: torch.Tensor, sink_norm_ratio: float) -> torch.Tensor:
    """The kind of every position at every layer, [n_layers + 1, batch, n_pos] indices into KINDS, for
    residuals [n_layers + 1, batch, n_pos, d_model]: BOS at position 0; a sink where the norm exceeds
    `sink_norm_ratio` x the (lower) median norm over the window's positions at that layer; else other.
    The median is per window so a position's kind does not depend on what it is batched with."""
    norms = resid.norm(dim=-1)
    median = norms.median(dim=-1, keepdim=True).values
    kinds = torch.where(norms > sink_norm_ratio * median, SINK, OTHER)
    kinds[..., 0] = BOS
    return kinds


def kl_to_final(final_log_probs: torch.Tensor, lens_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) in nats for each row of log-probabilities [..., vocab] -> [...]."""
    return (final_log_probs.exp() * (final_log_probs - lens_log_probs)).sum(-1)


def sample_windows(windows: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """`n_windows` rows of `windows` [n, n_pos] (all if fewer) in a seeded random order, as int64."""
    return np.asarray(windows[np.random.default_rng(seed).permutation(len(windows))[:n_windows]], dtype=np.int64)


def train_translators(bridge, windows: np.ndarray, settings: TunedLensSettings) -> tuple[Translators, pl.DataFrame]:
    """Train one translator per layer on train-split windows [n_windows, n_pos] (in the order given):
    per batch of `batch_sequences` windows, one forward pass, then for every layer one Adam step on
    KL(model output || tuned lens at that layer), the mean over the batch's `other` positions at that
    layer. The layers' losses share no parameters, so one step of the stacked parameters after every
    layer's backward pass is each layer's own step. Returns the translators and the training table
    (layer, step, loss: the loss before the step)."""
    translators = Translators(bridge.cfg.n_layers, bridge.cfg.d_model).to(bridge.cfg.device)
    params = list(translators.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    rows = []
    starts = range(0, len(windows), settings.batch_sequences)
    for step, start in enumerate(tqdm(starts, desc="tuned lens", unit="batch")):
        logits, resid = residual_stream(bridge, torch.from_numpy(windows[start : start + settings.batch_sequences]))
        final = logits.float().log_softmax(-1)
        kinds = position_kinds(resid, settings.sink_norm_ratio)
        optimizer.zero_grad(set_to_none=True)
        for layer in range(translators.n_layers):
            keep = kinds[layer] == OTHER
            if not keep.any():  # a batch of very short windows can be all BOS and sinks: nothing to learn from
                continue
            loss = kl_to_final(final[keep], decode(bridge, translators.translate(layer, resid[layer][keep]))).mean()
            # only the translators' gradients: the model's weights need none (and the unembedding's is costly)
            loss.backward(inputs=params)
            rows.append({"layer": layer, "step": step, "loss": loss.item()})
        optimizer.step()
    return translators, pl.DataFrame(rows, schema={"layer": pl.Int64, "step": pl.Int64, "loss": pl.Float64})


def loss_ends(training: pl.DataFrame) -> pl.DataFrame:
    """Per layer, the mean training loss over the first and over the last eighth of the steps (at least
    one step each: single steps are noisy, one batch is a few windows)."""
    n = max(1, training["step"].n_unique() // 8)
    return training.sort("step").group_by("layer", maintain_order=True).agg(
        first_loss=pl.col("loss").head(n).mean(), final_loss=pl.col("loss").tail(n).mean()).sort("layer")


def window_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token-weighted means sum(sums) / sum(counts) over the last axis (windows) and their 95% percentile
    bootstrap interval, resampling whole windows (tokens of one window are not independent). NaN where
    no token counts, and an interval of NaN where fewer than two windows have tokens."""
    picks = np.random.default_rng(seed).integers(0, sums.shape[-1], size=(n_boot, sums.shape[-1]))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (a kind no window has) stay NaN
        mean = sums.sum(-1) / counts.sum(-1)
        boot = sums[..., picks].sum(-1) / counts[..., picks].sum(-1)
        low, high = np.nanpercentile(boot, [2.5, 97.5], axis=-1)
    enough = (counts > 0).sum(-1) >= 2
    return mean, np.where(enough, low, np.nan), np.where(enough, high, np.nan)


@torch.no_grad()
def heldout_kl(bridge, translators: Translators, windows: np.ndarray, batch_sequences: int, sink_norm_ratio: float,
               n_boot: int = N_BOOTSTRAP, seed: int = 0) -> pl.DataFrame:
    """KL(model output || lens) on held-out windows [n_windows, n_pos], per layer, lens (`logit`,
    `tuned`) and position kind: n_tokens, n_windows (windows with such positions), mean_kl (over
    tokens) and ci_low, ci_high (95% percentile bootstrap over windows, see window_means)."""
    n_lens_layers = translators.n_layers + 1
    sums = np.zeros((len(LENSES), n_lens_layers, len(KINDS), len(windows)))
    counts = np.zeros((n_lens_layers, len(KINDS), len(windows)))
    for start in tqdm(range(0, len(windows), batch_sequences), desc="held-out KL", unit="batch"):
        batch = slice(start, start + batch_sequences)
        logits, resid = residual_stream(bridge, torch.from_numpy(windows[batch]))
        final = logits.float().log_softmax(-1)
        kinds = torch.nn.functional.one_hot(position_kinds(resid, sink_norm_ratio), len(KINDS)).double()
        counts[:, :, batch] = kinds.sum(2).permute(0, 2, 1).cpu().numpy()
        for layer in range(n_lens_layers):
            for i, h in enumerate((resid[layer], translators.translate(layer, resid[layer]))):
                kl = kl_to_final(final, decode(bridge, h)).double()
                sums[i, layer, :, batch] = torch.einsum("bp,bpk->kb", kl, kinds[layer]).cpu().numpy()
    mean, low, high = window_means(sums, np.broadcast_to(counts, sums.shape), n_boot, seed)
    rows = [{"layer": layer, "lens": lens, "position_kind": kind, "n_tokens": int(counts[layer, k].sum()),
             "n_windows": int((counts[layer, k] > 0).sum()), "mean_kl": float(mean[i, layer, k]),
             "ci_low": float(low[i, layer, k]), "ci_high": float(high[i, layer, k])}
            for i, lens in enumerate(LENSES) for layer in range(n_lens_layers) for k, kind in enumerate(KINDS)]
    return pl.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `tuned_lens`: `python -m mechinterp.tuned_lens --help`."""
    parser = argparse.ArgumentParser(
        description="Train a tuned lens, compare it with the logit lens on held-out text, decode the prompts.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--settings", required=True, help="the config's `tuned_lens` section as JSON")
    parser.add_argument("--lens-settings", required=True, help="the config's `logit_lens` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    settings = TunedLensSettings(**json.loads(args.settings))
    lens_settings = LensSettings(**json.loads(args.lens_settings))
    start = time.perf_counter()
    bridge = load_model(args.model, args.device)
    windows = np.load(args.tokens, mmap_mode="r")
    table = pl.read_parquet(args.table, columns=["sequence", "split"])
    train, heldout = (windows[split_sequences(table, split)] for split in ("train", "heldout"))
    n_train = window_count(settings.train_tokens, windows.shape[1])
    if len(train) < n_train:
        log.warning("tuned_lens.train_tokens = %d asks for %d windows but the train split has %d: training on those",
                    settings.train_tokens, n_train, len(train))
    if len(heldout) < settings.eval_sequences:
        raise UserError(f"tuned_lens.eval_sequences = {settings.eval_sequences} but the heldout split has "
                        f"{len(heldout)} windows; lower tuned_lens.eval_sequences or raise tokens.heldout_tokens.")
    train = sample_windows(train, n_train, args.seed)
    train_start = time.perf_counter()
    translators, training = train_translators(bridge, train, settings)
    train_seconds = time.perf_counter() - train_start
    eval_windows = sample_windows(heldout, settings.eval_sequences, args.seed)
    kl = heldout_kl(bridge, translators, eval_windows, settings.batch_sequences, settings.sink_norm_ratio,
                    seed=args.seed)
    inputs = lens_inputs(bridge.tokenizer, lens_settings, heldout, windows.shape[1], args.seed)
    result = run_logit_lens(bridge, inputs, lens_settings.top_k, translator=translators)
    out = Path(args.out_dir)
    for name in ("positions", "targets", "first_layer"):
        write_parquet(result[name], out / f"{name}.parquet")
    write_parquet(kl, out / "heldout_kl.parquet")
    write_parquet(training, out / "training.parquet")
    translators.save(out / "translators.safetensors")
    ends = loss_ends(training)
    summary = {"train_windows": len(train), "train_tokens": int(train.size), "steps": training["step"].n_unique(),
               "first_loss": ends["first_loss"].to_list(),
               "final_loss": ends["final_loss"].to_list(), "max_final_abs_diff": result["max_final_abs_diff"],
               "n_inputs": len(inputs), "train_seconds": train_seconds, "seconds": time.perf_counter() - start,
               "device": str(bridge.cfg.device)}
    write_json(summary, out / "summary.json")
    for row in ends.iter_rows(named=True):
        log.info("layer %d: training loss %.4f -> %.4f", row["layer"], row["first_loss"], row["final_loss"])
    log.info("tuned lens: %s", {k: v for k, v in summary.items() if not k.endswith("_loss")})


if __name__ == "__main__":
    run_stage(main)
