"""Benchmark the clamping stage's forward passes on a finished run (default: results/default).

For one batch of held-out prompts (clamping.measure_prompts x prompt_tokens) and G units of the headline
SAE, in one run on this machine:
- bare: a plain forward of every clamped row's whole prompt (what clamping every row from scratch costs),
- cached: the clean prefix's key-value cache reused, one token per row, no clamp,
- clamped: the same with the units clamped at the last position (what the stage runs).
Reports rows per second and prompt tokens per second of each, the clamped step's speed-up over the bare
forward, and its overhead over the cached step, with the CPU model. Writes results/benchmarks/clamping.json.

    .venv/bin/python benchmarks/bench_clamping.py [--run results/default] [--units 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from mechinterp.clamping import ClampedNextToken, boundary_prompts, load_parts, sae_units
    from mechinterp.config import validate_config
    from mechinterp.model import vocabulary_strings
    from mechinterp.saes import load_sae
    from mechinterp.sites import Site
    from mechinterp.tokens import split_sequences

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = validate_config(yaml.safe_load((REPO / "config" / "default.yaml").read_text()),
                             REPO / "workflow" / "schemas" / "config.schema.yaml")
    settings = config["clamping"]
    parts, tokenizer = load_parts(args.run / "model", "cpu")
    sae_dir = args.run / "saes" / settings["sae"]
    sae = load_sae(sae_dir)[0]
    site = Site.parse(json.loads((sae_dir / "training_summary.json").read_text())["site"])
    table = pl.read_parquet(args.run / "tokens" / "token_table.parquet", columns=["sequence", "split"])
    windows = np.load(args.run / "tokens" / "tokens.npy", mmap_mode="r")
    vocabulary = vocabulary_strings(tokenizer)
    word_start = np.array([t.startswith(" ") and t[1:2].isalpha() for t in vocabulary])
    prompts = torch.from_numpy(boundary_prompts(windows[split_sequences(table, "heldout")], word_start,
                                                settings["measure_prompts"], settings["prompt_tokens"], 0))
    step = ClampedNextToken(parts, prompts, site, sae, settings["batch_rows"])
    n_units = min(args.units, step.batch_units)  # one batch of the stage
    units = sae_units(sae, torch.arange(n_units), torch.ones(n_units))
    values = torch.full((n_units,), 2.0)
    rows = n_units * len(prompts)
    full = prompts.repeat_interleave(n_units, 0)

    with torch.no_grad():
        bare = best_of(args.repeats, lambda: parts.model(full).logits[:, -1].float().log_softmax(-1))
        cached = best_of(args.repeats, lambda: step._step(repeated_prefix(step, n_units), full[:, -1:], None))
        clamped = best_of(args.repeats, lambda: next(iter(step.batches(units, values))))
    tokens = rows * prompts.shape[1]
    report = {"cpu": cpu_model(), "threads": 2, "site": site.id, "rows": rows, "prompt_tokens": prompts.shape[1],
              "bare_forward_s": bare, "cached_step_s": cached, "clamped_step_s": clamped,
              "bare_rows_per_s": rows / bare, "clamped_rows_per_s": rows / clamped,
              "bare_prompt_tokens_per_s": tokens / bare, "clamped_prompt_tokens_per_s": tokens / clamped,
              "clamped_speedup_over_bare": bare / clamped, "clamp_overhead_over_cached": clamped / cached}
    out = REPO / "results" / "benchmarks" / "clamping.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def repeated_prefix(step, n_units: int):
    """The clean prefix's cache for n_units rows per prompt, as each batch of the stage makes it."""
    import copy

    cache = copy.deepcopy(step.prefix)
    cache.batch_repeat_interleave(n_units)
    return cache


if __name__ == "__main__":
    main()
