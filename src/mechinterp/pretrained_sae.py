"""Load a pretrained SAE instead of training one, converted on load to the folder `train_sae` writes
(SAELens format, plus the row selection the later stages read), so every later stage treats it alike.

Two formats, each from a local path or from a Hugging Face repo at a pinned revision:
- `saelens`: a SAELens folder (`cfg.json` + `sae_weights.safetensors`) of architecture standard
  (relu), topk or jumprelu;
- `gemma_scope`: Gemma Scope's `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold; a JumpReLU SAE).
Weights load only from safetensors or from an `.npz` without pickles. An SAE that does not subtract
b_dec from its input (Gemma Scope, `apply_b_dec_to_input: false`) is rewritten to one that does, with
the same latents: b_enc' = b_enc + b_dec W_enc.

>>> W_enc, b_enc, b_dec = torch.randn(4, 6), torch.randn(6), torch.randn(4)
>>> x = torch.randn(3, 4)
>>> torch.allclose(x @ W_enc + b_enc, (x - b_dec) @ W_enc + input_bias_folded(W_enc, b_enc, b_dec), atol=1e-5)
True
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, sha256_file, write_json, write_parquet
from mechinterp.saes import ARCHITECTURES, SparseAutoencoder
from mechinterp.saes.base import CONFIG_FILE, WEIGHTS_FILE, non_finite
from mechinterp.tokens import split_rows
from mechinterp.train_sae import TRAINING_LOG_SCHEMA, saelens_metadata, select_rows

log = logging.getLogger(__name__)
GEMMA_SCOPE_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


@dataclass(frozen=True)
class PretrainedSettings:
    """An entry's `pretrained` setting (schema: workflow/schemas/config.schema.yaml)."""

    format: str
    """saelens (a folder) or gemma_scope (a params.npz file)"""
    path: str | None
    """the local folder or file; or, with `hub`, the folder or file inside the repo"""
    hub: dict[str, Any] | None
    """{repo_id, revision}: the Hugging Face repo the path is in, at a pinned revision"""


def input_bias_folded(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The encoder bias that gives the same pre-activations when b_dec is subtracted from the input
    first: x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)."""
    return b_enc + b_dec @ W_enc


def fetch_pretrained(settings: PretrainedSettings, key: str) -> Path:
    """The local file or folder of a pretrained SAE: the path itself, or its copy in the Hugging Face
    cache (downloaded unless HF_HUB_OFFLINE=1, then only read from the cache)."""
    if not settings.path:
        raise UserError(f"{key}.path is not set: name the SAE's folder (saelens) or params.npz (gemma_scope).")
    if not settings.hub:
        path = Path(settings.path).expanduser()
        if not path.exists():
            raise UserError(f"{key}.path {str(path)!r} does not exist. Fix the path, or set {key}.hub to read it "
                            "from a Hugging Face repo.")
        return path
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, revision = settings.hub.get("repo_id"), settings.hub.get("revision")
    if not repo_id or not revision:
        raise UserError(f"{key}.hub needs repo_id and revision (a commit hash, so the run is reproducible).")
    not_cached = UserError(f"{key}: {settings.path!r} of {repo_id} at revision {revision} is not in the local "
                           f"Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE="
                           f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}). Fix: run where the hub is reachable, or "
                           "download it first with `hf download`.")
    try:
        if settings.format == "gemma_scope":
            return Path(hf_hub_download(repo_id, settings.path, revision=revision))
        folder = settings.path.strip("/")
        files = [f"{folder}/{CONFIG_FILE}", f"{folder}/{WEIGHTS_FILE}"]
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise not_cached from err
    except HfHubHTTPError as err:
        raise UserError(f"{key}: {repo_id} at revision {revision} said {err}. Check the repo id, the revision, "
                        "the path and your access token (gated repos need their licence accepted).") from err
    if not all((snapshot / name).is_file() for name in files):  # offline, a snapshot is whatever the cache holds
        raise not_cached
    return snapshot / folder


def from_arrays(architecture: str, arrays: dict[str, torch.Tensor], settings: dict[str, Any],
                subtracts_b_dec: bool, where: str) -> SparseAutoencoder:
    """An SAE of this workflow's `architecture` from its weight arrays (float32, on the CPU).
    `settings` fill the architecture's settings that the source does not record."""
    cls = ARCHITECTURES[architecture]
    d_sae, d_in = arrays["W_dec"].shape
    sae = cls(d_in, cls.Settings(**{f.name: settings[f.name] for f in fields(cls.Settings) if f.name != "d_sae"},
                                 d_sae=d_sae))
    arrays = {name: a.to(torch.float32) for name, a in arrays.items()}
    bad = non_finite(arrays)
    if bad:
        raise UserError(f"{where}: the SAE's {', '.join(bad)} hold NaN or infinite values; it cannot be scored. "
                        "Check the file, or name another SAE.")
    if not subtracts_b_dec:
        arrays["b_enc"] = input_bias_folded(arrays["W_enc"], arrays["b_enc"], arrays["b_dec"])
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    found = {name: tuple(a.shape) for name, a in arrays.items()}
    if found != expected:
        raise UserError(f"{where}: weights {found} do not make a {architecture} SAE (it needs {expected}).")
    sae.load_state_dict(arrays)
    return sae.eval()


def read_saelens(folder: Path, settings: dict[str, Any], where: str) -> SparseAutoencoder:
    """A SAELens folder of a known architecture."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{where}: {folder} is not a SAELens folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: {folder / CONFIG_FILE} is not valid JSON ({err}); fix the file or name another "
                        "SAE.") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {folder / CONFIG_FILE} is not a JSON object; it is not a SAELens config.")
    by_saelens_name = {cls.saelens_architecture: name for name, cls in ARCHITECTURES.items()}
    architecture = by_saelens_name.get(cfg.get("architecture"))
    if architecture is None:
        raise UserError(f"{where}: SAE architecture {cfg.get('architecture')!r} is not one of {sorted(by_saelens_name)}.")
    if cfg.get("normalize_activations", "none") != "none":
        raise UserError(f"{where}: the SAE normalises its inputs ({cfg['normalize_activations']!r}); only SAEs on raw "
                        "activations (normalize_activations: none) can be loaded.")
    try:
        arrays = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{where}: {folder / WEIGHTS_FILE} does not load ({err}).") from err
    return from_arrays(architecture, arrays, {**settings, **cfg}, cfg.get("apply_b_dec_to_input", True), where)


def read_gemma_scope(path: Path, settings: dict[str, Any], where: str) -> SparseAutoencoder:
    """Gemma Scope's params.npz: a JumpReLU SAE whose encoder reads x itself (not x - b_dec)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted(set(GEMMA_SCOPE_ARRAYS) - set(npz.files))
            if missing:
                raise UserError(f"{where}: {path} has no arrays {missing}; Gemma Scope's params.npz holds "
                                f"{list(GEMMA_SCOPE_ARRAYS)}.")
            arrays = {name: torch.from_numpy(np.array(npz[name])) for name in GEMMA_SCOPE_ARRAYS}
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: {path} is not a readable .npz without pickles ({err}).") from err
    return from_arrays("jumprelu", arrays, settings, subtracts_b_dec=False, where=where)


READERS = {"saelens": read_saelens, "gemma_scope": read_gemma_scope}


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `load_sae`: `python -m mechinterp.pretrained_sae --help`."""
    parser = argparse.ArgumentParser(description="Load a pretrained SAE for one cached site, in SAELens's format.")
    parser.add_argument("--cache", required=True, help="the site's activation cache (.npy)")
    parser.add_argument("--table", required=True, help="the token table")
    parser.add_argument("--spec", required=True, help="this SAE's resolved settings as JSON (config.sae_specs)")
    parser.add_argument("--where", required=True, help="the config key of the entry, for messages")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--dataset", required=True, help="what the activations came from, for cfg.json")
    parser.add_argument("--out", required=True, help="the SAE folder")
    args = parser.parse_args(argv)
    flat = json.loads(args.spec)
    settings = PretrainedSettings(**flat["pretrained"])
    where = f"{args.where}.pretrained"
    source = fetch_pretrained(settings, where)
    sae = READERS[settings.format](source, flat, where)
    if sae.architecture != flat["architecture"]:
        raise UserError(f"{where}: the SAE is {sae.architecture}, but the entry says architecture: "
                        f"{flat['architecture']}; set architecture: {sae.architecture} (it names the SAE's id).")
    cache = ActivationCache.open(args.cache, args.table)
    header = cache.header
    if sae.d_in != header["shape"][1]:
        raise UserError(f"{where}: the SAE reads {sae.d_in} dimensions but site {header['site']} has "
                        f"{header['shape'][1]}: it was trained on another site or model.")
    # the rows a trained SAE would have seen: its attention-sink threshold is what later stages read
    rows, positions = split_rows(pl.read_parquet(args.table, columns=["split", "position"]), "train")
    selection = select_rows(cache, rows, positions, flat["outlier_norm_ratio"])
    files = [source] if source.is_file() else [source / CONFIG_FILE, source / WEIGHTS_FILE]
    origin = {"format": settings.format, "path": settings.path, "hub": settings.hub,
              "sha256": {p.name: sha256_file(p) for p in files}}
    # a loaded SAE has no training: its spec says so, and its speed is not a number
    summary = {"scale": 1.0, "total_steps": 0, "train_seconds": float("nan"), "tokens_per_s": float("nan"),
               "n_train_rows": len(selection.rows), "n_excluded_bos": selection.n_bos,
               "n_excluded_outliers": selection.n_outliers, "median_norm": selection.median_norm,
               "outlier_threshold": selection.outlier_threshold, "pretrained": origin}
    spec = {**flat, "training_tokens": 0}
    with atomic_path(args.out) as tmp:
        sae.save(tmp, saelens_metadata(header, args.model_name, args.dataset),
                 extra={"mechinterp": {**spec, **summary}})
        write_parquet(pl.DataFrame(schema=TRAINING_LOG_SCHEMA), tmp / "training_log.parquet")
        write_json({**summary, "site": header["site"], "spec": spec, "seed": None}, tmp / "training_summary.json")
    log.info("loaded %s SAE (%d latents) from %s into %s", sae.architecture, sae.d_sae, source, args.out)


if __name__ == "__main__":
    run_stage(main)
