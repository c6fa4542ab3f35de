"""Held-out quality of an SAE against the distinct tokens it trains on, at fixed compute.

Each SAE sees the same number of training tokens (the default config's `sae.training_tokens`), drawn
from the first D distinct tokens of the train split (D = 128k: 4.7 epochs; 300k: 2; 600k: 1), with the
default config's settings otherwise. The train split is tokenized once for the largest D: windows are
packed in a seeded document order, so its first D tokens are the train split a run with
tokens.train_tokens = D makes, and every held-out window is that run's too. For each SAE: the held-out
FVU (every held-out token, as evaluate_sae), the CE increase and KL with their bootstrap intervals
(sae_eval's held-out windows), the late drop of its held-out training curve and its still_improving
flag, and its training time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_training_tokens.py \\
        --model results/default/model --documents results/default/corpus/documents.parquet

The model and corpus are those of a fetched run of the default config (the smoke config fetches the
same ones). Caches and token files go to --work (kept, so a rerun with other sites or D reuses them
when the largest D is the same); the table to --out (results/benchmarks/training_tokens.parquet)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mechinterp import activations, tokens
from mechinterp.activations import ActivationCache
from mechinterp.config import load_default_config, sae_specs, window_count
from mechinterp.evaluate_sae import EvalSettings, evaluate
from mechinterp.files import write_parquet
from mechinterp.model import load_model
from mechinterp.sites import Site
from mechinterp.tokens import split_rows
from mechinterp.train_sae import SaeSpec, heldout_sample, select_rows, train_sae

log = logging.getLogger("bench_training_tokens")


def prepare(model: str, documents: str, work: Path, sites: list[Site], max_distinct: int, config: dict,
            threads: int) -> tuple[Path, Path]:
    """Tokens and table with `max_distinct` train tokens (the default config's held-out split), and
    every site's cache, under `work`; made once, reused when present."""
    work.mkdir(parents=True, exist_ok=True)
    token_file, table_file = work / "tokens.npy", work / "token_table.parquet"
    settings = {**config["tokens"], "train_tokens": max_distinct}
    stamp = work / "tokens_settings.json"
    if not (token_file.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings):
        tokens.main(["--model", model, "--documents", documents, "--settings", json.dumps(settings),
                     "--seed", str(config["seed"]), "--tokens", str(token_file), "--table", str(table_file)])
        stamp.write_text(json.dumps(settings))
        for old in work.glob("*.npy"):
            if old != token_file:
                old.unlink()
    missing = [s for s in sites if not (work / f"{s.id}.npy").is_file() or not (work / f"{s.id}.json").is_file()]
    if missing:
        started = time.perf_counter()
        activations.main(["--model", model, "--tokens", str(token_file), "--table", str(table_file),
                          "--sites", *[s.id for s in missing], "--settings", json.dumps(config["activations"]),
                          "--device", "cpu", "--threads", str(threads), "--out-dir", str(work)])
        log.info("cached %s in %.0f s", [s.id for s in missing], time.perf_counter() - started)
    return token_file, table_file


def first_train_rows(table: pl.DataFrame, distinct: int, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows and positions of the train split's first window_count(distinct) windows: the train
    split of a run with tokens.train_tokens = distinct."""
    rows, positions = split_rows(table, "train")
    n = window_count(distinct, context_length) * context_length
    return rows[:n], positions[:n]


def run(model: str, documents: str, work: Path, site_ids: list[str], distinct: list[int], training_tokens: int,
        threads: int, seed: int) -> pl.DataFrame:
    """One row per site (an SAE site of the default config) and distinct-token count."""
    config = load_default_config()
    specs = {entry.site.id: entry for entry in sae_specs(config).values()}
    sites = [Site.parse(s) for s in site_ids]
    if unknown := [s.id for s in sites if s.id not in specs]:
        raise SystemExit(f"--sites {unknown}: not SAE sites of the default config ({list(specs)})")
    token_file, table_file = prepare(model, documents, work, sites, max(distinct), config, threads)
    table = pl.read_parquet(table_file)
    windows = np.load(token_file, mmap_mode="r")
    bridge = load_model(model, "cpu")
    eval_settings = EvalSettings(**config["sae_eval"])
    heldout_rows, heldout_positions = split_rows(table, "heldout")
    out = []
    for site in sites:
        flat = {**specs[site.id].settings, "training_tokens": training_tokens}
        spec = SaeSpec.from_config(flat)
        cache = ActivationCache.open(work / f"{site.id}.npy", table_file)
        norms = np.concatenate([c.norm(dim=1).numpy() for _, c in cache.chunks(heldout_rows)])
        for d in distinct:
            rows, positions = first_train_rows(table, d, config["tokens"]["context_length"])
            selection = select_rows(cache, rows, positions, spec.training.outlier_norm_ratio)
            heldout = heldout_sample(heldout_rows, heldout_positions, norms, selection.outlier_threshold,
                                     spec.training.heldout_eval_tokens)
            sae, training_log, summary = train_sae(cache, selection, spec, seed, heldout=heldout)
            row, _ = evaluate(bridge, sae, f"{site.id}-{spec.architecture}", cache, table, windows,
                              {**summary, "spec": flat}, eval_settings, seed)
            out.append({"site": site.id, "distinct_tokens": len(selection.rows), "distinct_tokens_asked": d,
                        "training_tokens": spec.training.training_tokens,
                        "epochs": spec.training.training_tokens / len(selection.rows),
                        **{k: row[k] for k in ("fvu", "ce_increase", "ce_increase_ci_low", "ce_increase_ci_high",
                                               "kl_sae", "kl_sae_ci_low", "kl_sae_ci_high", "ce_recovered",
                                               "dead_fraction", "dense_fraction", "n_loss_tokens")},
                        "curve_heldout_fvu": summary["heldout_fvu"], "last_batch_fvu": float(training_log["fvu"][-1]),
                        "late_fvu_drop": summary["late_fvu_drop"], "still_improving": summary["still_improving"],
                        "train_seconds": summary["train_seconds"]})
            log.info("%s", out[-1])
    return pl.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a fetched model folder of the default config")
    parser.add_argument("--documents", required=True, help="its fetched corpus (corpus/documents.parquet)")
    parser.add_argument("--work", default="/tmp/bench_training_tokens", help="tokens and caches (kept)")
    parser.add_argument("--sites", nargs="+", default=["mlp10", "resid10"])
    parser.add_argument("--distinct", nargs="+", type=int, default=[128_000, 300_000, 600_000])
    parser.add_argument("--training-tokens", type=int, default=None,
                        help="tokens each SAE sees (default: the default config's sae.training_tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks/training_tokens.parquet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    training_tokens = args.training_tokens or load_default_config()["sae"]["training_tokens"]
    result = run(args.model, args.documents, Path(args.work), args.sites, sorted(args.distinct), training_tokens,
                 args.threads, args.seed)
    write_parquet(result, args.out)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=4):
        print(result.select("site", "distinct_tokens", "epochs", "fvu", "ce_increase", "ce_increase_ci_low",
                            "ce_increase_ci_high", "kl_sae", "late_fvu_drop", "still_improving", "dead_fraction",
                            "train_seconds"))


if __name__ == "__main__":
    main()
