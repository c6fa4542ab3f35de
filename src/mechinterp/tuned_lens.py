"""The tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator in front of
the final norm at every layer but the last, trained to make each layer's decoded distribution match
the model's own output. Where the logit lens misreads a layer because its basis has drifted from the
output's, the tuned lens still reads it; where both agree, the logit lens was a fair reading.

Layers are numbered as in the logit lens (0 = the embedding, the last = what the model decodes).
Positions are of three kinds, kept apart in training and evaluation: `bos` (position 0), `sink` (an
attention sink: a residual far larger than the rest of its window at that layer, see
`position_kinds`) and `other`. Translators train on `other` positions only: BOS and sinks carry
massive residuals whose decoded distribution is nothing like the rest, and would dominate the loss.

Training (`train_translators`) works from a cache of the training windows' residuals at every layer
and of the model's output log-probabilities, so no step reruns the model. Each layer's translator
starts from the least-squares map of its residual onto the output residual's direction (a warm start:
the untrained translator is still the logit lens), then takes Adam steps on KL(output || lens) over
sampled positions until a stopping rule on the KL of validation windows (held out of the training
windows) or a cap on the steps; the parameters of the best validation evaluation are kept. Two
baselines stand beside it: a bias-only translator (h + b, trained the same way) and a constant
distribution (the mean output distribution over the training windows), which reads no residual.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
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
LENSES = ("logit", "tuned", "bias_only", "constant")
TRAINED = ("tuned", "bias_only")  # the lenses with a translator to train: affine and bias-only
N_BOOTSTRAP = 1000  # resamples of the held-out windows for each confidence interval
Positions = Sequence[torch.Tensor] | dict[int, torch.Tensor]  # per layer: position indices (a list, or a dict by layer)
ROWS_PER_PRODUCT = 512  # rows decoded in one unembedding product while training (see train_jointly)
RIDGE = 1e-3  # the warm start's ridge penalty, relative to the mean variance of a residual coordinate


@dataclass(frozen=True)
class TunedLensSettings:
    """The config's `tuned_lens` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    train_tokens: int
    """train-split tokens the translators see (whole windows: rounded down to a multiple of the context)"""
    batch_sequences: int
    """windows per forward pass of the model (caching the training windows, held-out evaluation)"""
    lr: float
    """Adam learning rate of the translators"""
    eval_sequences: int
    """held-out windows on which both lenses' KL to the model's output is compared"""
    sink_norm_ratio: float
    """a non-BOS position whose residual norm at a layer exceeds this x its window's median norm at that
    layer counts as an attention sink there"""
    validation_windows: int
    """training windows held out of the fit, on whose KL the stopping rule decides"""
    batch_tokens: int
    """positions per Adam step of one layer's translator, drawn from the fit windows"""
    eval_every: int
    """Adam steps between two evaluations of the validation KL"""
    patience: int
    """evaluations without an improvement after which a layer's translator stops"""
    min_improvement: float
    """relative drop of the best validation KL that counts as an improvement"""
    max_steps: int
    """cap on the Adam steps of each layer's translator"""


class Translators(torch.nn.Module):
    """One translator per lens layer but the last: layer l's residual h [..., d_model] becomes
    h + h @ weight[l] + bias[l] (affine), or h + bias[l] (`affine=False`: the bias-only baseline, which
    has no weight at all), with weight [n_layers, d_model, d_model] and bias [n_layers, d_model]. The
    last lens layer (`n_layers`, the residual the model decodes) passes unchanged. Both start at zero,
    so the untrained tuned lens is exactly the logit lens.

    >>> translators = Translators(n_layers=2, d_model=4)
    >>> resid = torch.randn(3, 5, 4)  # [n_layers + 1, n_pos, d_model]
    >>> torch.equal(translators(resid), resid)
    True
    >>> with torch.no_grad():
    ...     _ = translators.bias[0].fill_(1.0)
    >>> torch.equal(translators(resid)[0], resid[0] + 1), torch.equal(translators(resid)[2], resid[2])
    (True, True)
    >>> [name for name, _ in Translators(2, 4, affine=False).named_parameters()]
    ['bias']
    """

    def __init__(self, n_layers: int, d_model: int, affine: bool = True) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    def translate(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Lens layer `layer`'s residuals [..., d_model], translated (the last layer as it is)."""
        if layer == self.n_layers:
            return resid
        return translate(resid, None if self.weight is None else self.weight[layer], self.bias[layer])

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
        """Translators saved by `save`: affine when the file holds a weight, bias-only otherwise."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        n_layers, d_model = tensors["bias"].shape
        translators = cls(n_layers, d_model, affine="weight" in tensors)
        translators.load_state_dict(tensors)
        return translators.to(device)


def translate(resid: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One layer's translator on residuals [..., d_model]: resid + resid @ weight + bias (no weight: bias-only)."""
    return resid + bias if weight is None else resid + resid @ weight + bias


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


def kl_to_final(final_log_probs: torch.Tensor, lens_log_probs: torch.Tensor, final_probs: torch.Tensor | None = None
                ) -> torch.Tensor:
    """KL(final || lens) in nats for each row of log-probabilities [..., vocab] -> [...]; `final_probs`, when
    given, is final_log_probs.exp() computed once for many lenses."""
    probs = final_log_probs.exp() if final_probs is None else final_probs
    return (probs * (final_log_probs - lens_log_probs)).sum(-1)


def sample_windows(windows: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """`n_windows` rows of `windows` [n, n_pos] (all if fewer) in a seeded random order, as int64."""
    return np.asarray(windows[np.random.default_rng(seed).permutation(len(windows))[:n_windows]], dtype=np.int64)


@torch.no_grad()
def cache_residuals(bridge, windows: np.ndarray, batch_sequences: int, sink_norm_ratio: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over windows [n_windows, n_pos], in batches: every layer's residual stream
    [n_layers + 1, n_windows, n_pos, d_model] and every position's kind [n_layers + 1, n_windows, n_pos]."""
    resid, kinds = [], []
    for start in tqdm(range(0, len(windows), batch_sequences), desc="cache residuals", unit="batch"):
        _, batch = residual_stream(bridge, torch.from_numpy(windows[start : start + batch_sequences]))
        resid.append(batch)
        kinds.append(position_kinds(batch, sink_norm_ratio))
    return torch.cat(resid, dim=1), torch.cat(kinds, dim=1)


@torch.no_grad()
def output_log_probs(bridge, final_resid: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The model's output log-probabilities [n, vocab] decoded from last-layer residuals [n, d_model]
    (exactly the model's output: see logit_lens.decode), in chunks of positions to bound the memory."""
    return torch.cat([decode(bridge, final_resid[i : i + chunk]) for i in range(0, len(final_resid), chunk)])


def constant_log_probs(final_log_probs: torch.Tensor) -> torch.Tensor:
    """The constant baseline: log of the mean output distribution over positions [n, vocab] -> [vocab]."""
    return final_log_probs.logsumexp(0) - math.log(len(final_log_probs))


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last axis, kept: [..., d] -> [..., 1]."""
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def least_squares_start(resid: torch.Tensor, final_resid: torch.Tensor, affine: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Warm start of one layer's translator from residuals [n, d_model] and the same positions' last-layer
    residuals [n, d_model]: the weight [d, d] (affine) and bias [d] minimising the squared distance of
    the translated residual to the output residual's direction at the residual's own norm (the final
    norm makes only the direction count), with a ridge penalty on the weight. Bias-only: the mean offset."""
    target = final_resid * rms(resid) / rms(final_resid) - resid
    if not affine:
        return None, target.mean(0)
    x_mean, y_mean = resid.mean(0), target.mean(0)
    x, y = resid - x_mean, target - y_mean
    gram = x.T @ x
    penalty = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram + penalty, x.T @ y)
    return weight, y_mean - x_mean @ weight


def stop_rule(history: list[float], patience: int, min_improvement: float) -> bool:
    """Whether training stops after the validation losses `history` (one per evaluation, oldest first):
    when none of the last `patience` evaluations has lowered the best earlier loss by more than a
    fraction `min_improvement` of it (at 0, when none has lowered it at all)."""
    if len(history) <= patience:
        return False
    return min(history[-patience:]) >= (1 - min_improvement) * min(history[:-patience])


def pair_groups(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive groups of items of `sizes` rows, each under `limit` rows unless one item alone is over it.

    >>> pair_groups([3, 3, 3, 5], 6)
    [slice(0, 2, None), slice(2, 3, None), slice(3, 4, None)]
    """
    groups, start, rows = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and rows + size > limit:
            groups.append(slice(start, i))
            start, rows = i, 0
        rows += size
    return groups + [slice(start, len(sizes))] if sizes else groups


def mean_kls(bridge, translated: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean KL(output || lens) of each part: translated residuals [n_i, d_model] against output log-probs
    [n_i, vocab], decoded together (one unembedding product for every part) -> [len(parts)]."""
    kl = kl_to_final(torch.cat(targets), decode(bridge, torch.cat(translated)))
    return torch.stack([part.mean() for part in kl.split([len(t) for t in targets])])


def train_jointly(bridge, resid: torch.Tensor, final: torch.Tensor, fit: list[torch.Tensor],
                  validation: list[torch.Tensor], start: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor]],
                  settings: TunedLensSettings, seed: int
                  ) -> tuple[dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor]], list[dict]]:
    """Train every (layer, lens) translator (`start`: its warm-start weight, bias) on residuals
    [n_layers + 1, n, d_model] against output log-probs [n, vocab], layer l on the positions `fit[l]` (indices
    into n) and stopped on those of `validation[l]`: Adam steps on `batch_tokens` positions sampled per layer
    (from a generator of its own, seeded by `seed` and the layer, so a layer trains the same with or without the
    others), the validation KL evaluated every `eval_every` steps (and after the last), each translator stopping by
    `stop_rule` or at `max_steps`. The translators are independent (each its own loss and parameters); they
    are decoded together, in products of about ROWS_PER_PRODUCT rows, because a narrow unembedding product
    runs at a fraction of a wide one's speed on a CPU. The bias is trained in units of the layer's residual
    RMS, so one learning rate suits every layer's scale. Returns each translator's parameters at its best
    evaluation, and the training rows (layer, lens, step, train_loss: before the step, val_loss: at
    evaluations, stopped_by, kept)."""
    pairs = list(start)
    scale = {layer: float(rms(resid[layer][fit[layer]]).median()) for layer, _ in pairs}
    params, optimizers, best, history, stopped, rows = {}, {}, {}, {}, {}, []
    for pair, (weight, bias) in start.items():
        params[pair] = [torch.nn.Parameter(bias / scale[pair[0]]),
                        *([] if weight is None else [torch.nn.Parameter(weight.clone())])]
        optimizers[pair] = torch.optim.Adam(params[pair], lr=settings.lr)
        history[pair] = []

    def current(pair: tuple[int, str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        unit_bias, *weight = params[pair]
        return (weight[0] if weight else None), unit_bias * scale[pair[0]]

    def translated(pair: tuple[int, str], index: torch.Tensor) -> torch.Tensor:
        return translate(resid[pair[0]][index], *current(pair))

    def losses(group: list[tuple[int, str]], index: Positions) -> torch.Tensor:
        return mean_kls(bridge, [translated(pair, index[pair[0]]) for pair in group],
                        [final[index[pair[0]]] for pair in group])

    def groups(active: list[tuple[int, str]], index: Positions):
        for part in pair_groups([len(index[layer]) for layer, _ in active], ROWS_PER_PRODUCT):
            yield active[part]

    generators = {layer: torch.Generator().manual_seed(int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))
                  for layer in sorted({layer for layer, _ in pairs})}
    for step in tqdm(range(settings.max_steps + 1), desc="tuned lens (every layer)", unit="step"):
        active = [pair for pair in pairs if pair not in stopped]
        if not active:
            break
        evaluate = step % settings.eval_every == 0 or step == settings.max_steps
        picks = {layer: fit[layer][torch.randint(len(fit[layer]), (settings.batch_tokens,), generator=generator)]
                 for layer, generator in generators.items()}
        step_rows = {pair: {"layer": pair[0], "lens": pair[1], "step": step, "train_loss": None, "val_loss": None}
                     for pair in active}
        if evaluate:
            with torch.no_grad():
                for group in groups(active, validation):
                    for pair, loss in zip(group, losses(group, validation).tolist(), strict=True):
                        step_rows[pair]["val_loss"] = loss
                        history[pair].append(loss)
                        if loss <= min(history[pair]):
                            best[pair] = (step, *(None if t is None else t.detach().clone() for t in current(pair)))
                        if stop_rule(history[pair], settings.patience, settings.min_improvement):
                            stopped[pair] = "rule"
        if step == settings.max_steps:
            for pair in active:
                stopped.setdefault(pair, "cap")
        for group in groups([pair for pair in active if pair not in stopped], picks):
            for pair in group:
                optimizers[pair].zero_grad(set_to_none=True)
            group_losses = losses(group, picks)
            # only the translators' gradients: the model's weights need none (and the unembedding's is costly);
            # each translator's loss reaches only its own parameters, so the sum trains each on its own
            group_losses.sum().backward(inputs=[t for pair in group for t in params[pair]])
            for pair, loss in zip(group, group_losses.tolist(), strict=True):
                optimizers[pair].step()
                step_rows[pair]["train_loss"] = loss
        rows += step_rows.values()
    for row in rows:
        pair = (row["layer"], row["lens"])
        row["stopped_by"] = stopped[pair]
        row["kept"] = row["step"] == best[pair][0]
    return {pair: best[pair][1:] for pair in pairs}, rows


def train_translators(bridge, resid: torch.Tensor, kinds: torch.Tensor, n_validation: int,
                      settings: TunedLensSettings, seed: int) -> tuple[dict[str, Translators], torch.Tensor, pl.DataFrame]:
    """Train the affine (`tuned`) and bias-only translators of every layer but the last from cached
    residuals [n_layers + 1, n_windows, n_pos, d_model] and position kinds [n_layers + 1, n_windows, n_pos]
    (cache_residuals): the first `n_validation` windows are the validation split of the stopping rule,
    the rest the fit split. Each layer learns on its `other` positions (see train_jointly). Returns the
    translators by lens, the constant baseline's log-probs [vocab] (the mean output distribution over
    the fit windows' positions after BOS) and the training table (lens, layer, step, train_loss, val_loss,
    stopped_by, kept)."""
    n_layers, (n_windows, n_pos, d_model) = resid.shape[0] - 1, resid.shape[1:]
    flat = resid.reshape(n_layers + 1, n_windows * n_pos, d_model)
    final = output_log_probs(bridge, flat[-1])  # [n_windows * n_pos, vocab]
    constant = constant_log_probs(final.reshape(n_windows, n_pos, -1)[n_validation:, 1:].reshape(-1, final.shape[-1]))
    in_validation = (torch.arange(n_windows) < n_validation).repeat_interleave(n_pos)
    other = kinds.reshape(n_layers + 1, -1) == OTHER
    fit = [torch.nonzero(other[layer] & ~in_validation)[:, 0] for layer in range(n_layers)]
    validation = [torch.nonzero(other[layer] & in_validation)[:, 0] for layer in range(n_layers)]
    start = {(layer, lens): least_squares_start(flat[layer][fit[layer]], flat[-1][fit[layer]], affine=lens == "tuned")
             for layer in range(n_layers) for lens in TRAINED}
    kept, rows = train_jointly(bridge, flat, final, fit, validation, start, settings, seed)
    translators = {lens: Translators(n_layers, d_model, affine=lens == "tuned").to(resid.device) for lens in TRAINED}
    with torch.no_grad():
        for (layer, lens), (weight, bias) in kept.items():
            translators[lens].bias[layer] = bias
            if weight is not None:
                translators[lens].weight[layer] = weight
    table = pl.DataFrame(rows, schema={"layer": pl.Int64, "lens": pl.Utf8, "step": pl.Int64, "train_loss": pl.Float64,
                                       "val_loss": pl.Float64, "stopped_by": pl.Utf8, "kept": pl.Boolean})
    return translators, constant, table.sort("layer", "step", maintain_order=True)


def training_summary(training: pl.DataFrame) -> pl.DataFrame:
    """Per lens and layer: the steps taken, how training stopped (`rule` or `cap`), the validation KL at
    the first evaluation (the warm start) and at the kept one."""
    return training.group_by("lens", "layer").agg(
        steps=pl.col("train_loss").count(), stopped_by=pl.col("stopped_by").first(),
        start_val_loss=pl.col("val_loss").drop_nulls().first(),
        kept_val_loss=pl.col("val_loss").filter(pl.col("kept")).first()).sort("lens", "layer")


def window_bootstrap(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted means sum(sums) / sum(counts) over the last axis (windows) [...], and the same under
    `n_boot` resamples of whole windows [..., n_boot] (tokens of one window are not independent; the
    same resamples for the same seed, so arrays bootstrapped alike are paired). NaN where no token counts."""
    picks = np.random.default_rng(seed).integers(0, sums.shape[-1], size=(n_boot, sums.shape[-1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.sum(-1) / counts.sum(-1), sums[..., picks].sum(-1) / counts[..., picks].sum(-1)


def interval(boot: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval over the last axis of bootstrap samples; NaN where fewer than two windows
    (last axis of `counts`) have tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (a kind no window has) stay NaN
        low, high = np.nanpercentile(boot, [2.5, 97.5], axis=-1)
    enough = (counts > 0).sum(-1) >= 2
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


def window_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token-weighted means over the last axis (windows) and their 95% percentile bootstrap interval,
    resampling whole windows (window_bootstrap). NaN where no token counts, and an interval of NaN where
    fewer than two windows have tokens."""
    mean, boot = window_bootstrap(sums, counts, n_boot, seed)
    return mean, *interval(boot, counts)


@torch.no_grad()
def heldout_kl(bridge, translators: dict[str, Translators], constant: torch.Tensor, windows: np.ndarray,
               batch_sequences: int, sink_norm_ratio: float, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> pl.DataFrame:
    """KL(model output || lens) on held-out windows [n_windows, n_pos], per layer, lens (LENSES: the
    logit lens, the `tuned` and `bias_only` translators, the `constant` log-probs [vocab]) and position
    kind: n_tokens, n_windows (windows with such positions), mean_kl (over tokens), ci_low, ci_high (95%
    percentile bootstrap over windows, see window_means), and excess_over_tuned = mean_kl minus the tuned
    lens's, with its paired interval excess_ci_low, excess_ci_high (the same window resamples). Rows with
    a null layer are the mean over every layer but the last (where every translated lens is the output)."""
    n_lens_layers = next(iter(translators.values())).n_layers + 1
    sums = np.zeros((len(LENSES), n_lens_layers, len(KINDS), len(windows)))
    counts = np.zeros((n_lens_layers, len(KINDS), len(windows)))
    for start in tqdm(range(0, len(windows), batch_sequences), desc="held-out KL", unit="batch"):
        batch = slice(start, start + batch_sequences)
        logits, resid = residual_stream(bridge, torch.from_numpy(windows[batch]))
        final = logits.float().log_softmax(-1)
        final_probs = final.exp()
        kinds = torch.nn.functional.one_hot(position_kinds(resid, sink_norm_ratio), len(KINDS)).double()
        counts[:, :, batch] = kinds.sum(2).permute(0, 2, 1).cpu().numpy()
        for i, lens in enumerate(LENSES):
            for layer in range(n_lens_layers):
                if lens == "constant":
                    decoded = constant.expand_as(final)
                else:
                    h = resid[layer] if lens == "logit" else translators[lens].translate(layer, resid[layer])
                    decoded = decode(bridge, h)
                kl = kl_to_final(final, decoded, final_probs).double()
                sums[i, layer, :, batch] = torch.einsum("bp,bpk->kb", kl, kinds[layer]).cpu().numpy()
    counts = np.broadcast_to(counts, sums.shape)
    mean, boot = window_bootstrap(sums, counts, n_boot, seed)
    excess, excess_boot = mean - mean[LENSES.index("tuned")], boot - boot[LENSES.index("tuned")]
    # the mean over the layers before the last, per resample: one more "layer" at the end of the layer axis
    mean, excess = (np.concatenate([a, a[:, :-1].mean(1, keepdims=True)], 1) for a in (mean, excess))
    boot, excess_boot = (np.concatenate([a, a[:, :-1].mean(1, keepdims=True)], 1) for a in (boot, excess_boot))
    counts = np.concatenate([counts, counts[:, :-1].sum(1, keepdims=True)], 1)
    low, high = interval(boot, counts)
    excess_low, excess_high = interval(excess_boot, counts)
    rows = [{"layer": layer if layer < n_lens_layers else None, "lens": lens, "position_kind": kind,
             "n_tokens": int(counts[i, layer, k].sum()), "n_windows": int((counts[i, layer, k] > 0).sum()),
             "mean_kl": float(mean[i, layer, k]), "ci_low": float(low[i, layer, k]), "ci_high": float(high[i, layer, k]),
             "excess_over_tuned": float(excess[i, layer, k]), "excess_ci_low": float(excess_low[i, layer, k]),
             "excess_ci_high": float(excess_high[i, layer, k])}
            for i, lens in enumerate(LENSES) for layer in range(n_lens_layers + 1) for k, kind in enumerate(KINDS)]
    return pl.DataFrame(rows, schema_overrides={"layer": pl.Int64})


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
    if n_train <= settings.validation_windows:
        raise UserError(f"tuned_lens.train_tokens = {settings.train_tokens} gives {n_train} windows, not more than "
                        f"tuned_lens.validation_windows = {settings.validation_windows}: nothing is left to fit.")
    train = sample_windows(train, n_train, args.seed)
    train_start = time.perf_counter()
    resid, kinds = cache_residuals(bridge, train, settings.batch_sequences, settings.sink_norm_ratio)
    translators, constant, training = train_translators(bridge, resid, kinds, settings.validation_windows, settings,
                                                        args.seed)
    del resid, kinds
    train_seconds = time.perf_counter() - train_start
    eval_windows = sample_windows(heldout, settings.eval_sequences, args.seed)
    kl = heldout_kl(bridge, translators, constant, eval_windows, settings.batch_sequences, settings.sink_norm_ratio,
                    seed=args.seed)
    inputs = lens_inputs(bridge.tokenizer, lens_settings, heldout, windows.shape[1], args.seed)
    result = run_logit_lens(bridge, inputs, lens_settings.top_k, translator=translators["tuned"],
                            random_tokens=lens_settings.random_tokens, seed=args.seed)
    out = Path(args.out_dir)
    for name in ("positions", "targets", "first_layer"):
        write_parquet(result[name], out / f"{name}.parquet")
    write_parquet(kl, out / "heldout_kl.parquet")
    write_parquet(training, out / "training.parquet")
    translators["tuned"].save(out / "translators.safetensors")
    translators["bias_only"].save(out / "bias_translators.safetensors")
    stops = training_summary(training)
    summary = {"train_windows": len(train), "validation_windows": settings.validation_windows,
               "train_tokens": int(train.size),
               **{f"{lens}_{key}": stops.filter(pl.col("lens") == lens)[key].to_list()
                  for lens in TRAINED for key in ("steps", "stopped_by", "start_val_loss", "kept_val_loss")},
               "max_final_abs_diff": result["max_final_abs_diff"], "n_inputs": len(inputs),
               "train_seconds": train_seconds, "seconds": time.perf_counter() - start, "device": str(bridge.cfg.device)}
    write_json(summary, out / "summary.json")
    for row in stops.iter_rows(named=True):
        log.info("%s layer %d: %d steps, stopped by %s; validation KL %.4f -> %.4f", row["lens"], row["layer"],
                 row["steps"], row["stopped_by"], row["start_val_loss"], row["kept_val_loss"])
    log.info("tuned lens: %s", {k: v for k, v in summary.items() if not isinstance(v, list)})


if __name__ == "__main__":
    run_stage(main)
