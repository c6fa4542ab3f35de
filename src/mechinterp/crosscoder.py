"""An acausal crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing"): one dictionary of latents read from several sites at once (per-site encoders, summed) and
written back to every site (per-site decoders), with TopK sparsity. This module trains it (rule
`train_crosscoder`); `evaluate_crosscoder` compares it with the per-site SAEs and `crosscoder_latents`
analyses its latents.

With the sites' activations side by side, x = [x_1, ..., x_L], the summed encoders
sum_l (x_l - b_dec^l) W_enc^l + b_enc are one product (x - b_dec) W_enc, and the per-site decoders are
blocks of columns of W_dec: the crosscoder *is* a TopK SAE on the stacked activations. So it is trained
by `train_sae`'s loop on a `StackedCache` (with its held-out training curve and `still_improving` flag)
and saved in SAELens's format (a TopK SAE of width sum_l d_l, its sites recorded in cfg.json). Each site
is scaled to the first site's mean squared norm before stacking (Lindsey et al. normalise every layer),
so the deepest layer, whose norms are largest, does not own the loss; the scales are folded into the
saved weights, which read raw activations.

Every active latent writes to every site, so the crosscoder's L0 at each site is its k: it is compared
with per-site SAEs of the same k (equal L0 per site; config.crosscoder_plan): over n sites it has a
1/n share of their summed L0.

What it can show, and what not: residual-stream snapshots a few layers apart share most of their
content by construction (each is the running sum of the ones before), and an acausal crosscoder
reconstructs each site from all of them, so latents that span the sites are expected of any residual
stream and are no evidence of features computed across layers (cross-layer superposition). Here it is
held to the SAEs' quality bounds, and its latents' match rate to the per-site SAEs' features is set
against that of a second seed of a per-site SAE; a causal test of cross-layer features (transcoders)
is another study's."""

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

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, rebuild_hint, run_stage
from mechinterp.files import atomic_path, write_json, write_parquet
from mechinterp.saes import TopKSAE, load_sae
from mechinterp.sites import Site
from mechinterp.tokens import split_rows
from mechinterp.train_sae import SaeSpec, heldout_sample, saelens_metadata, select_rows, train_sae

log = logging.getLogger(__name__)


@dataclass
class StackedCache:
    """Several sites' activation caches (of the same tokens) read as one, each site's rows multiplied by
    its scale and set side by side: rows [n, sum of widths]. Reads like an `ActivationCache`.

    >>> import numpy as np, tempfile, json, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name, width in (("resid1", 3), ("resid2", 2)):
    ...     np.save(folder / f"{name}.npy", np.ones((4, width), np.float16))
    ...     (folder / f"{name}.json").write_text(json.dumps({"site": name, "shape": [4, width], "dtype": "float16",
    ...                                                       "hook": name, "context_length": 2}))
    >>> caches = [ActivationCache.open(folder / f"{n}.npy") for n in ("resid1", "resid2")]
    >>> StackedCache(caches, [1.0, 2.0]).rows(slice(0, 2)).tolist()
    [[1.0, 1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 2.0, 2.0]]
    """

    caches: list[ActivationCache]
    scales: list[float]

    @property
    def widths(self) -> list[int]:
        return [cache.header["shape"][1] for cache in self.caches]

    @property
    def header(self) -> dict[str, Any]:
        """What `train_sae` reads of a cache header (site, shape, context length), for all sites."""
        headers = [cache.header for cache in self.caches]
        return {**headers[0], "site": "+".join(h["site"] for h in headers), "hook": ",".join(h["hook"] for h in headers),
                "shape": [headers[0]["shape"][0], sum(self.widths)], "site_scales": self.scales}

    def rows(self, index: np.ndarray | slice) -> torch.Tensor:
        # a scale of exactly 1 is not applied, so a one-site stack reads exactly as its cache
        parts = [cache.rows(index) if scale == 1.0 else cache.rows(index).mul_(scale)
                 for cache, scale in zip(self.caches, self.scales, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    chunks = ActivationCache.chunks


def site_scales(caches: list[ActivationCache], rows: np.ndarray, sample: int = 16384) -> list[float]:
    """Per site, the factor that gives it the first site's mean squared norm over (at most `sample` of)
    `rows`; the first site's is exactly 1."""
    picked = rows[np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(np.int64)]
    mean_sq = [float(cache.rows(picked).pow(2).sum(1).mean()) for cache in caches]
    return [1.0] + [float(np.sqrt(mean_sq[0] / m)) for m in mean_sq[1:]]


@torch.no_grad()
def fold_site_scales(sae: TopKSAE, widths: list[int], scales: list[float]) -> None:
    """Turn a crosscoder trained on scaled sites (u_l = s_l x_l) into one on raw activations x: the
    latents are unchanged, each site's reconstruction comes out divided by s_l."""
    start = 0
    for width, scale in zip(widths, scales, strict=True):
        block = slice(start, start + width)
        sae.W_enc[block] *= scale
        sae.W_dec[:, block] /= scale
        sae.b_dec[block] /= scale
        start += width


@dataclass(frozen=True)
class Layout:
    """Which sites a crosscoder reads, their widths and the scales it was trained with (cfg.json)."""

    sites: list[Site]
    widths: list[int]
    scales: list[float]

    @property
    def site_id(self) -> str:
        """The sites' ids joined, e.g. resid4+resid10+resid16: the crosscoder's site in tables."""
        return "+".join(site.id for site in self.sites)

    def blocks(self) -> list[slice]:
        """Each site's columns of the stacked activations."""
        ends = np.cumsum([0, *self.widths])
        return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.id for s in self.sites], "widths": self.widths, "site_scales": self.scales}


def load_crosscoder(folder: str | Path) -> tuple[TopKSAE, Layout]:
    """A crosscoder saved by `train`: the TopK SAE on the stacked raw activations, and its layout."""
    sae, cfg = load_sae(folder)
    recorded = cfg.get("mechinterp", {}).get("crosscoder")
    if not isinstance(sae, TopKSAE) or recorded is None:
        raise UserError(f"{folder} is an SAE, not a crosscoder (its cfg.json records no crosscoder sites). "
                        f"{rebuild_hint(Path(folder))}")
    return sae, Layout([Site.parse(s) for s in recorded["sites"]], recorded["widths"], recorded["site_scales"])


def heldout_rows(stacked: StackedCache, table: pl.DataFrame, blocks: list[slice], thresholds: list[float]) -> np.ndarray:
    """Held-out rows without BOS and without tokens that any site's SAE leaves out as an attention-sink
    outlier (norm above its training threshold): the tokens every comparison here is made on."""
    rows, positions = split_rows(table, "heldout")
    rows = rows[positions != 0]
    keep = []
    for part, x in stacked.chunks(rows):
        ok = torch.ones(len(part), dtype=torch.bool)
        for block, threshold in zip(blocks, thresholds, strict=True):
            ok &= x[:, block].norm(dim=1) <= threshold
        keep.append(ok.numpy())
    return rows[np.concatenate(keep)] if keep else rows


def open_stacked(caches: list[str], table: str) -> StackedCache:
    """The sites' caches (checked against the token table) as one, unscaled: raw activations."""
    opened = [ActivationCache.open(path, table) for path in caches]
    return StackedCache(opened, [1.0] * len(opened))


def site_thresholds(sae_folders: list[str]) -> list[float]:
    """Each site's own SAE's attention-sink threshold (its training summary): the per-site SAEs' token
    selection, which every comparison with them keeps."""
    return [json.loads((Path(f) / "training_summary.json").read_text())["outlier_threshold"] for f in sae_folders]


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `train_crosscoder`: `python -m mechinterp.crosscoder --help`."""
    parser = argparse.ArgumentParser(description="Train a crosscoder on the stacked caches of several sites.")
    parser.add_argument("--caches", nargs="+", required=True, help="each site's activation cache, in order")
    parser.add_argument("--table", required=True, help="the token table")
    parser.add_argument("--spec", required=True, help="its TopK and training settings as JSON (config.crosscoder_plan)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--checkpoint", required=True, help="resumed from when it matches; deleted on success")
    parser.add_argument("--device", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--dataset", required=True, help="what the activations came from, for cfg.json")
    parser.add_argument("--out", required=True, help="the crosscoder folder")
    args = parser.parse_args(argv)
    from mechinterp.model import resolve_device

    torch.set_num_threads(args.threads)
    flat = json.loads(args.spec)
    spec = SaeSpec.from_config(flat)
    table = pl.read_parquet(args.table, columns=["split", "position"])
    rows, positions = split_rows(table, "train")
    raw = open_stacked(args.caches, args.table)
    scales = site_scales(raw.caches, rows[positions != 0])
    stacked = StackedCache(raw.caches, scales)
    log.info("sites %s, widths %s, scales %s", [c.header["site"] for c in raw.caches], stacked.widths, scales)
    selection = select_rows(stacked, rows, positions, spec.training.outlier_norm_ratio)
    eval_rows, eval_positions = split_rows(table, "heldout")  # the training curve's held-out FVU
    norms = np.concatenate([x.norm(dim=1).numpy() for _, x in stacked.chunks(eval_rows)])
    heldout = heldout_sample(eval_rows, eval_positions, norms, selection.outlier_threshold,
                             spec.training.heldout_eval_tokens)
    sae, training_log, summary = train_sae(stacked, selection, spec, args.seed, Path(args.checkpoint),
                                           device=resolve_device(args.device), heldout=heldout)
    fold_site_scales(sae, stacked.widths, scales)
    layout = Layout([Site.parse(c.header["site"]) for c in raw.caches], stacked.widths, scales)
    header = stacked.header
    with atomic_path(args.out) as tmp:
        sae.save(tmp, saelens_metadata(header, args.model_name, args.dataset),
                 extra={"mechinterp": {**flat, **summary, "seed": args.seed, "crosscoder": layout.to_dict()}})
        write_parquet(training_log, tmp / "training_log.parquet")
        write_json({**summary, "site": header["site"], "spec": flat, "seed": args.seed, **layout.to_dict()},
                   tmp / "training_summary.json")
    Path(args.checkpoint).unlink(missing_ok=True)
    last = training_log.row(-1, named=True)
    log.info("trained crosscoder: %d steps at %.0f tokens/s; last batch FVU %.3f, held-out FVU %.3f, L0 %.1f, dead "
             "%.1f%%; still improving: %s", summary["total_steps"], summary["tokens_per_s"], last["fvu"],
             last["heldout_fvu"], last["l0"], 100 * last["dead_fraction"], summary["still_improving"])


if __name__ == "__main__":
    run_stage(main)
