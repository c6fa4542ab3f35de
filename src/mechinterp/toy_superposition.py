"""Superposition in the toy model of Elhage et al. 2022 ("Toy Models of Superposition"), and an SAE
that recovers the toy's planted features.

n sparse features x (each 0 with probability S, else uniform on [0, 1]) pass through m < n dimensions,
h = W x, and come back as x' = ReLU(W^T h + b); the loss weighs feature i's error by its importance
I_i. Dense features (S = 0) get the m most important dimensions to themselves; sparse ones are packed
into the m dimensions in superposition, more of them the sparser they are. Many models (one per
sparsity and importance) train at once as a batch of independent instances.

The SAE reads the hidden layer of the main model at `sae_sparsity` (the instance `features.parquet`
describes, with its feature distribution). A planted feature counts as recovered when the latent matched
to it one to one (a latent shared by two features recovers one of them: the one that writes most along
it) has a decoder cosine above chance: the 95th percentile of a uniformly random direction's best cosine
against the same decoder rows.

>>> settings = ToySettings(n_features=5, n_hidden=2, importance_decay=0.9, sparsities=[0.0, 0.9],
...                        phase_grid=3, steps=200, batch_size=256, lr=0.01, sae_d_sae=5, sae_k=1,
...                        sae_steps=50, sae_sparsity=0.9)
>>> W, b, loss = train_toy_models(settings.n_features, settings.n_hidden, torch.tensor([0.0, 0.9]),
...                               torch.ones(2, 5), settings, seed=0)
>>> W.shape, b.shape, loss.shape
(torch.Size([2, 2, 5]), torch.Size([2, 5]), torch.Size([2]))
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import TopKSAE
from mechinterp.saes.topk import TopKSettings

log = logging.getLogger(__name__)
REPRESENTED_NORM = 0.5  # a feature with ||W_i|| above this is represented (the paper's figures use the same cut)
SUPERPOSED_INTERFERENCE = 0.1  # ... and in superposition when sum_j (W_i_hat . W_j)^2 over j != i exceeds this
PHASE_RESTARTS = 3  # trainings per cell of the phase diagram, the best kept
CHANCE_QUANTILE = 0.95  # a feature is recovered above chance when its cosine beats this share of random directions
CHANCE_SAMPLES = 20_000  # random directions drawn for the chance distribution


@dataclass(frozen=True)
class ToySettings:
    """The config's `toy` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    n_features: int
    """features of the main toy model (n)"""
    n_hidden: int
    """its hidden dimensions (m < n)"""
    importance_decay: float
    """feature i's importance is importance_decay ** i"""
    sparsities: list[float]
    """feature sparsities S (probability a feature is zero) of the main models, one model each"""
    phase_grid: int
    """points per axis of the phase diagram (sparsity x relative importance, two features in one dimension)"""
    steps: int
    """Adam steps of every toy model"""
    batch_size: int
    """samples per step"""
    lr: float
    """Adam learning rate (halved linearly to zero over the second half of training)"""
    sae_d_sae: int
    """latents of the SAE trained on the hidden layer of the sparsest main model"""
    sae_k: int
    """its active latents per sample (TopK)"""
    sae_steps: int
    """its training steps"""
    sae_sparsity: float
    """the feature sparsity of the main model whose hidden layer the SAE reads (one of `sparsities`)"""

    def __post_init__(self) -> None:
        if self.sae_sparsity not in self.sparsities:
            raise UserError(f"toy.sae_sparsity = {self.sae_sparsity} is not one of toy.sparsities {self.sparsities}: "
                            "the SAE reads one of the main models (the one toy/features.parquet describes); "
                            "add it to toy.sparsities or pick one of them.")


def sample_features(sparsity: torch.Tensor, batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """x [instances, batch, n]: each feature 0 with probability sparsity[instance], else uniform on [0, 1]."""
    values = torch.rand(len(sparsity), batch, n, generator=generator)
    return values * (torch.rand(len(sparsity), batch, n, generator=generator) >= sparsity[:, None, None])


def reconstruct(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ReLU(W^T W x + b) for each instance: W [I, m, n], b [I, n], x [I, batch, n] -> [I, batch, n].
    Broadcast products, not bmm: the matrices are far too small for a matrix kernel to pay."""
    h = (x[:, :, None, :] * W[:, None, :, :]).sum(-1)  # [I, batch, m]
    return torch.relu((h[..., None] * W[:, None, :, :]).sum(-2) + b[:, None, :])


def weighted_error(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Each instance's loss [I]: sum_i I_i (x_i - x'_i)^2, averaged over the batch."""
    return (importance[:, None, :] * (x - reconstruct(W, b, x)).pow(2)).sum(-1).mean(1)


def train_toy_models(n: int, m: int, sparsity: torch.Tensor, importance: torch.Tensor, settings: ToySettings,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train one toy model per instance: sparsity [I], importance [I, n] -> W [I, m, n], b [I, n], and
    each one's final loss [I] on a fresh sample."""
    generator = torch.Generator().manual_seed(seed)
    W = (torch.randn(len(sparsity), m, n, generator=generator) * (2 / (m + n)) ** 0.5).requires_grad_()
    b = torch.zeros(len(sparsity), n, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=settings.lr)
    for step in range(settings.steps):
        x = sample_features(sparsity, settings.batch_size, n, generator)
        loss = weighted_error(W, b, x, importance).sum()  # instances are independent
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        optimizer.param_groups[0]["lr"] = settings.lr * min(1.0, 2 * (1 - (step + 1) / settings.steps))
    with torch.no_grad():
        final = weighted_error(W, b, sample_features(sparsity, 4 * settings.batch_size, n, generator), importance)
    return W.detach(), b.detach(), final


def feature_geometry(W: torch.Tensor) -> dict[str, np.ndarray]:
    """Per feature of one model W [m, n]: its norm, its interference sum_j!=i (W_i_hat . W_j)^2, and
    whether it is represented and in superposition."""
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-9)
    interference = (unit.T @ W).pow(2).sum(1) - (unit * W).sum(0).pow(2)
    represented = norms > REPRESENTED_NORM
    return {"norm": norms.numpy(), "interference": interference.numpy(), "represented": represented.numpy(),
            "superposed": (represented & (interference > SUPERPOSED_INTERFERENCE)).numpy()}


def main_models(settings: ToySettings, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, torch.Tensor]:
    """The n-feature models, one per sparsity: per-feature geometry [sparsity, feature, ...], and every
    model's W^T W [sparsity, i, j]. Returns (features, gram, W [S, m, n])."""
    n, m = settings.n_features, settings.n_hidden
    sparsity = torch.tensor(settings.sparsities, dtype=torch.float32)
    importance = (settings.importance_decay ** torch.arange(n, dtype=torch.float32)).expand(len(sparsity), n)
    W, _, _ = train_toy_models(n, m, sparsity, importance.contiguous(), settings, seed)
    features, gram = [], []
    for s, weights in zip(settings.sparsities, W, strict=True):
        geometry = feature_geometry(weights)
        features.append(pl.DataFrame({"sparsity": s, "feature": np.arange(n), "importance": importance[0].numpy(),
                                      **geometry}))
        wtw = (weights.T @ weights).numpy()
        gram.append(pl.DataFrame({"sparsity": s, "i": np.repeat(np.arange(n), n), "j": np.tile(np.arange(n), n),
                                  "value": wtw.reshape(-1)}))
    return pl.concat(features), pl.concat(gram), W


def phase_diagram(settings: ToySettings, seed: int) -> pl.DataFrame:
    """Two features in one dimension (n = 2, m = 1) over a grid of sparsity and the second feature's
    importance relative to the first's: which is represented, and whether both are (superposition).
    Each cell keeps the best of `PHASE_RESTARTS` trainings (lowest loss): a single one can stop in a
    worse local minimum, which would blur the phase boundaries."""
    grid = settings.phase_grid
    density = torch.logspace(0, -2, grid)  # 1 - S from 1 (dense) to 0.01
    relative = torch.logspace(-1, 1, grid)  # importance of feature 2 / feature 1
    d, r = (a.reshape(-1).repeat(PHASE_RESTARTS) for a in torch.meshgrid(density, relative, indexing="ij"))
    importance = torch.stack([torch.ones(len(d)), r], dim=1)
    W, _, loss = train_toy_models(2, 1, 1 - d, importance, settings, seed)
    best = loss.view(PHASE_RESTARTS, -1).argmin(0) * grid * grid + torch.arange(grid * grid)
    W, d, r = W[best, 0, :], d[best], r[best]
    norms = W.abs()  # [cells, 2]: with m = 1, a feature's norm is |W_1i|
    represented = norms > REPRESENTED_NORM
    both = represented.all(1)
    phase = np.where(both, "superposition", np.where(represented[:, 1], "feature 2 alone",
                                                     np.where(represented[:, 0], "feature 1 alone", "neither")))
    return pl.DataFrame({"sparsity": (1 - d).numpy(), "relative_importance": r.numpy(), "norm_1": norms[:, 0].numpy(),
                         "norm_2": norms[:, 1].numpy(), "antipodal": (both & (W[:, 0] * W[:, 1] < 0)).numpy(),
                         "phase": phase})


def train_toy_sae(W: torch.Tensor, sparsity: float, settings: ToySettings, seed: int) -> TopKSAE:
    """A TopK SAE trained on the hidden layer h = W x [*, m] of the toy model W [m, n], its features x
    drawn as the toy model's were (each 0 with probability `sparsity`, else uniform on [0, 1])."""
    n, m = W.shape[1], W.shape[0]
    generator = torch.Generator().manual_seed(seed)
    sparsities = torch.tensor([sparsity])
    sae = TopKSAE(m, TopKSettings(d_sae=settings.sae_d_sae, k=settings.sae_k, auxk_coefficient=1 / 32,
                                  auxk_k=settings.sae_k))
    sae.initialise(sample_features(sparsities, 4096, n, generator)[0] @ W.T, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    for _ in range(settings.sae_steps):
        h = sample_features(sparsities, settings.batch_size, n, generator)[0] @ W.T
        metrics = sae.training_step(h, since_fired > 10 * settings.batch_size, progress=0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_step()
        since_fired += settings.batch_size
        since_fired[metrics["active"]] = 0
    return sae


def chance_cosines(decoder: torch.Tensor, n_samples: int, rng: np.random.Generator) -> torch.Tensor:
    """The best cosine of each of `n_samples` uniformly random directions against the rows of `decoder`
    [d_sae, m] (unit norm): the null distribution of a feature's best cosine when its direction has
    nothing to do with the decoder. [n_samples]. Signed, as the features' cosines are: a TopK latent
    is never negative, so a row along -W_i cannot write feature i. Drawn by numpy's generator: torch's,
    seeded alike, would redraw the SAE's initial decoder."""
    directions = torch.from_numpy(rng.standard_normal((n_samples, decoder.shape[1]), dtype=np.float32))
    directions /= directions.norm(dim=1, keepdim=True)
    return (directions @ decoder.T).max(1).values


def one_to_one_matches(scores: torch.Tensor) -> np.ndarray:
    """Greedy one-to-one matching of features to latents by a score [d_sae, n]: the highest pair first,
    then the highest among the latents and features still free, so a latent aligned with two features
    is matched to one of them. Returns each feature's latent [n] (-1: none left)."""
    d_sae, n = scores.shape
    latent = np.full(n, -1)
    free_latents, free_features = np.ones(d_sae, bool), np.ones(n, bool)
    for flat in np.argsort(-scores.numpy(), axis=None, kind="stable"):
        j, i = divmod(int(flat), n)
        if free_latents[j] and free_features[i]:
            latent[i] = j
            free_latents[j] = free_features[i] = False
    return latent


def recovery_table(decoder: torch.Tensor, W: torch.Tensor, seed: int) -> pl.DataFrame:
    """How a dictionary's unit-norm rows `decoder` [d_sae, m] recover the planted features of the toy
    model W [m, n]: per feature, its best row and cosine, the row matched to it one to one and that
    cosine, and whether it is recovered (matched cosine above `chance_threshold`, the `CHANCE_QUANTILE`
    of random directions' best cosines against the same rows; `chance_median` beside it). Rows are
    matched by the feature's component along them, W_i . d_j: a row aligned with a represented feature
    and with the tiny W_i of an unrepresented one (often parallel to it) goes to the represented one."""
    cosines = decoder @ (W / W.norm(dim=0).clamp_min(1e-9))  # [d_sae, n]
    best = cosines.max(0)
    matched_latent = one_to_one_matches(decoder @ W)
    matched_cosine = np.where(matched_latent >= 0, cosines.numpy()[matched_latent, np.arange(W.shape[1])], np.nan)
    chance = chance_cosines(decoder, CHANCE_SAMPLES, np.random.default_rng(seed))
    threshold = float(chance.quantile(CHANCE_QUANTILE))
    geometry = feature_geometry(W)
    return pl.DataFrame({"feature": np.arange(W.shape[1]), "norm": geometry["norm"],
                         "represented": geometry["represented"], "best_latent": best.indices.numpy(),
                         "best_cosine": best.values.numpy(), "matched_latent": matched_latent,
                         "matched_cosine": matched_cosine, "recovered": np.nan_to_num(matched_cosine, nan=-1) > threshold,
                         "chance_median": float(chance.median()), "chance_threshold": threshold})


def sae_recovery(W: torch.Tensor, sparsity: float, settings: ToySettings, seed: int) -> pl.DataFrame:
    """A TopK SAE trained on the hidden layer of the toy model W [m, n] at `sparsity`, scored by
    `recovery_table`: one row per planted feature."""
    decoder = train_toy_sae(W, sparsity, settings, seed).W_dec.detach()  # unit rows
    return recovery_table(decoder, W, seed).select(pl.lit(sparsity).alias("sparsity"), pl.all())


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `toy_superposition`: `python -m mechinterp.toy_superposition --help`."""
    parser = argparse.ArgumentParser(description="Train the toy models of superposition and an SAE on one.")
    parser.add_argument("--settings", required=True, help="the config's `toy` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ToySettings(**json.loads(args.settings))
    out = Path(args.out_dir)
    start = time.perf_counter()
    features, gram, W = main_models(settings, args.seed)
    log.info("main models (%d features in %d dimensions, %d sparsities) in %.1f s", settings.n_features,
             settings.n_hidden, len(settings.sparsities), time.perf_counter() - start)
    phase = phase_diagram(settings, args.seed)
    log.info("phase diagram (%d models) at %.1f s", len(phase), time.perf_counter() - start)
    recovery = sae_recovery(W[settings.sparsities.index(settings.sae_sparsity)], settings.sae_sparsity, settings,
                            args.seed)
    represented = recovery.filter(pl.col("represented"))
    log.info("SAE on the hidden layer: %d of %d represented features recovered above chance (cosine > %.3f), %d of %d "
             "unrepresented, at %.1f s", represented["recovered"].sum(), represented.height,
             recovery["chance_threshold"][0], recovery["recovered"].sum() - represented["recovered"].sum(),
             recovery.height - represented.height, time.perf_counter() - start)
    for name, frame in {"features": features, "gram": gram, "phase": phase, "sae_recovery": recovery}.items():
        write_parquet(frame, out / f"{name}.parquet")


if __name__ == "__main__":
    run_stage(main)
