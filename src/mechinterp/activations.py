"""Cache a model's activations: one forward pass per batch of windows serves every requested
(site, layer), stopping after the deepest layer needed.

Each site goes to its own `.npy` file [n_tokens, width] in float16 or bfloat16, rows in the order of
the token table, written batch by batch with plain file writes (memory stays flat however many
tokens there are), plus a JSON header written last. Readers memory-map the array and check the
header against the token table, so a cache that is incomplete or from other tokens is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from mechinterp.errors import UserError, rebuild_hint, run_stage
from mechinterp.files import atomic_path, sha256_file, write_json
from mechinterp.sites import Site, check_layers

log = logging.getLogger(__name__)

# bfloat16 has no numpy dtype: its raw 16 bits are stored as uint16 and reinterpreted on read.
STORAGE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


@dataclass(frozen=True)
class CacheSettings:
    """The config's `activations` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    dtype: str
    """storage type of the cache: float16 or bfloat16"""
    batch_sequences: int
    """windows per forward pass"""


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float16":
        stored = acts.to(torch.float16)
        if not torch.isfinite(stored).all():
            raise UserError("activations overflow float16 (|x| > 65504); set activations.dtype: bfloat16.")
        return stored.numpy()
    return acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_storage(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """float32 tensor from stored rows."""
    if dtype == "float16":
        return torch.from_numpy(rows.astype(np.float32))
    return torch.from_numpy(rows.view(np.int16).copy()).view(torch.bfloat16).float()


def header_path(array_path: str | Path) -> Path:
    return Path(array_path).with_suffix(".json")


@dataclass
class ActivationCache:
    """A memory-mapped activation array and its header."""

    path: Path
    header: dict[str, Any]
    array: np.ndarray

    @classmethod
    def open(cls, path: str | Path, token_table: str | Path | None = None) -> ActivationCache:
        """Open a cache, refusing one without a header, of the wrong shape, or made from other tokens."""
        path = Path(path)
        if not header_path(path).is_file() or not path.is_file():
            raise UserError(f"activation cache {path} is incomplete (array or header {header_path(path).name} "
                            f"missing). {rebuild_hint(path, header_path(path))}")
        header = json.loads(header_path(path).read_text())
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise UserError(f"activation cache {path} cannot be read ({err}). {rebuild_hint(path)}") from err
        if list(array.shape) != header["shape"] or array.dtype != STORAGE[header["dtype"]]:
            raise UserError(f"activation cache {path} has shape {list(array.shape)} / {array.dtype} but its header "
                            f"says {header['shape']} / {header['dtype']}: truncated or corrupt. {rebuild_hint(path)}")
        if token_table is not None and sha256_file(token_table) != header["token_table_sha256"]:
            raise UserError(f"activation cache {path} was made from another token table than {token_table} "
                            f"(sha256 differs). {rebuild_hint(path)}")
        cache = cls(path, header, array)
        cache.rows(slice(0, 4096))  # fail early on a corrupt cache; every later read is checked too
        return cache

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def site(self) -> Site:
        return Site.parse(self.header["site"])

    def rows(self, index: np.ndarray | slice) -> torch.Tensor:
        """Rows as float32; sorted index arrays read fastest. Refuses NaN or infinite values."""
        rows = from_storage(np.asarray(self.array[index]), self.dtype)
        if not torch.isfinite(rows).all():
            raise UserError(f"activation cache {self.path} holds NaN or infinite values (set activations.dtype: "
                            f"bfloat16 if float16 overflowed). {rebuild_hint(self.path)}")
        return rows

    def chunks(self, rows: np.ndarray, chunk: int = 8192) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            yield part, self.rows(part)


def _write_npy_header(handle, shape: tuple[int, int], dtype: np.dtype) -> None:
    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})


@contextmanager
def _open_all(paths: dict[Site, Path]) -> Iterator[dict[Site, BinaryIO]]:
    """Open every output under a temporary name; all are renamed into place only if the block succeeds."""
    with ExitStack() as stack:
        handles = {}
        for site, path in paths.items():
            tmp = stack.enter_context(atomic_path(path))
            handles[site] = stack.enter_context(open(tmp, "wb"))
        yield handles


@torch.no_grad()
def cache_activations(bridge, tokens: np.ndarray, sites: list[Site], out_paths: dict[Site, Path], dtype: str,
                      batch_sequences: int, provenance: dict[str, str]) -> dict[str, float]:
    """Run the model over all windows in `tokens` once, writing each site's activations to its path.
    Returns timing figures. `provenance` (model and token-table hashes) goes into every header."""
    check_layers(bridge.cfg.n_layers, sites, "sae.sites")
    n_seq, ctx = tokens.shape
    stop_at_layer = max(site.layer for site in sites) + 1
    captured: dict[Site, torch.Tensor] = {}

    def capture(site: Site):
        def hook(acts: torch.Tensor, hook) -> None:
            captured[site] = acts

        return hook

    hooks = [(site.hook_name, capture(site)) for site in sites]
    with _open_all({s: out_paths[s] for s in sites}) as handles:
        for site, handle in handles.items():
            _write_npy_header(handle, (n_seq * ctx, site.width(bridge.cfg)), STORAGE[dtype])
        forward_s = 0.0
        for start in tqdm(range(0, n_seq, batch_sequences), desc="caching activations", unit="batch"):
            batch = torch.from_numpy(np.asarray(tokens[start : start + batch_sequences], dtype=np.int64))
            t0 = time.perf_counter()
            bridge.run_with_hooks(batch.to(bridge.cfg.device), fwd_hooks=hooks, stop_at_layer=stop_at_layer)
            forward_s += time.perf_counter() - t0
            for site, handle in handles.items():
                acts = captured.pop(site).reshape(-1, site.width(bridge.cfg)).float().cpu()
                handle.write(to_storage(acts, dtype).tobytes())
    for site in sites:
        write_json({"site": site.id, "hook": site.hook_name,
                    "shape": [n_seq * ctx, site.width(bridge.cfg)], "dtype": dtype,
                    "context_length": ctx, **provenance}, header_path(out_paths[site]))
    return {"forward_s": forward_s, "tokens": n_seq * ctx, "stop_at_layer": stop_at_layer}


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `cache_activations`: `python -m mechinterp.activations --help`."""
    parser = argparse.ArgumentParser(description="One forward pass per batch; every site to its own array.")
    parser.add_argument("--model", required=True, help="the fetched model folder")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--sites", nargs="+", required=True, help="site ids such as resid12 mlp12")
    parser.add_argument("--settings", required=True, help="the config's `activations` section as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    settings = CacheSettings(**json.loads(args.settings))
    bridge = load_model(args.model, args.device)
    sites = sorted({Site.parse(site_id) for site_id in args.sites})
    tokens = np.load(args.tokens, mmap_mode="r")
    source = json.loads((Path(args.model) / "SOURCE.json").read_text())
    provenance = {"model_sha256": source["files_sha256"].get("model.safetensors", ""),
                  "token_table_sha256": sha256_file(args.table), "tokens_sha256": sha256_file(args.tokens)}
    out = Path(args.out_dir)
    start = time.perf_counter()
    timing = cache_activations(bridge, tokens, sites, {s: out / f"{s.id}.npy" for s in sites}, settings.dtype,
                               settings.batch_sequences, provenance)
    seconds = time.perf_counter() - start
    log.info("cached %d tokens at %s in %.1f s (%.0f tokens/s; forward passes %.1f s)", timing["tokens"],
             [s.id for s in sites], seconds, timing["tokens"] / seconds, timing["forward_s"])


if __name__ == "__main__":
    run_stage(main)
