"""Seed-to-seed spread: the stochastic stages (SAE initialisation and batch order, bootstrap resamples,
the clamping prompts) rerun with other seeds on the same inputs (`snakemake --cores all replicates`),
and what moved between them.

- `spread.parquet`: per metric table, row and numeric column, the number of seeds, the mean, the
  standard deviation, min and max over seeds. The audit reads it to set each metric's tolerance.
- `claims.parquet`: per claim, its verdict, value and verdict margin in each seed, whether the
  verdict is `stable` (the same in every seed), and its smallest margin. The audit checks a robust
  claim's verdict (stable, its margin clear of the seeds' spread) and a fragile claim's statistic.

Example (two seeds' tables, as `manifest.metric_rows` gives them):

>>> tables = {0: {"sae_eval/metrics.parquet": [{"sae": "a", "fvu": 0.25, "n_dead": 3}]},
...           1: {"sae_eval/metrics.parquet": [{"sae": "a", "fvu": 0.75, "n_dead": 5}]}}
>>> spread(tables).select("row", "column", "n_seeds", "mean", "sd", "integer").rows()
[('["a"]', 'fvu', 2, 0.5, 0.3535533905932738, False), ('["a"]', 'n_dead', 2, 4.0, 1.4142135623730951, True)]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.manifest import CLAIMS_TABLE, METRIC_TABLES, is_metric_value, metric_rows

log = logging.getLogger(__name__)
# the tables a replicate recomputes; the logit lens reads only the shared inputs
REPLICATED_TABLES = [name for name in METRIC_TABLES if not name.startswith("logit_lens/")]


def row_id(table: str, row: dict[str, Any]) -> str:
    """A metric row's identity within its table: its key columns' values as a JSON list."""
    return json.dumps([row[k] for k in METRIC_TABLES[table]])


def spread(tables_by_seed: dict[int, dict[str, list[dict[str, Any]]]]) -> pl.DataFrame:
    """One row per (table, row, column) of every numeric metric: n_seeds (the seeds with a number),
    n_nan (the seeds with NaN, e.g. a clamping effect at a KL the unit never reached), mean, sd (ddof 1;
    NaN with under two numbers), min, max, and `integer` (a count in every seed)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for tables in tables_by_seed.values():
        for table, rows in tables.items():
            for row in rows:
                for column, value in row.items():
                    if column not in METRIC_TABLES[table] and is_metric_value(value):
                        values.setdefault((table, row_id(table, row), column), []).append(value)
    records = []
    for (table, row, column), seen in sorted(values.items()):
        numbers = np.asarray([v for v in seen if not math.isnan(v)], dtype=float)
        records.append({"table": table, "row": row, "column": column, "n_seeds": len(numbers),
                        "n_nan": len(seen) - len(numbers),
                        "mean": float(numbers.mean()) if len(numbers) else math.nan,
                        # about the first value: numpy's std of equal values is not always 0 (the mean
                        # of n copies can round one ulp away), and an sd of 2e-15 is not a seed effect
                        "sd": float((numbers - numbers[0]).std(ddof=1)) if len(numbers) > 1 else math.nan,
                        "min": float(numbers.min()) if len(numbers) else math.nan,
                        "max": float(numbers.max()) if len(numbers) else math.nan,
                        "integer": all(isinstance(v, int) for v in seen)})
    return pl.DataFrame(records, schema={"table": pl.Utf8, "row": pl.Utf8, "column": pl.Utf8, "n_seeds": pl.Int64,
                                         "n_nan": pl.Int64, "mean": pl.Float64, "sd": pl.Float64, "min": pl.Float64, "max": pl.Float64,
                                         "integer": pl.Boolean})


def verdict_margin(row: dict[str, Any]) -> float:
    """How far a claim's interval is from changing its verdict: the distance from the bound to the nearer
    end of an interval that excludes it, or of either end to the bound when the interval straddles it;
    for a claim without an interval, its value's distance from the bound.

    >>> verdict_margin({"value": 0.5, "ci_low": 0.2, "ci_high": 0.8, "bound": 0.0})
    0.2
    >>> verdict_margin({"value": 0.1, "ci_low": -0.1, "ci_high": 0.3, "bound": 0.0})
    0.1
    """
    low, high, bound = row.get("ci_low"), row.get("ci_high"), row["bound"]
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return abs(row["value"] - bound)
    if low > bound:
        return low - bound
    if high < bound:
        return bound - high
    return min(bound - low, high - bound)


def claim_stability(claims_by_seed: dict[int, pl.DataFrame]) -> pl.DataFrame:
    """Per claim: the seeds that have it, its verdict, value and verdict margin (`verdict_margin`) in
    each (lists in seed order), `stable` (every seed has it, with one verdict), `margin` (the smallest
    margin over the seeds: the audit calls a stable claim robust when this exceeds a multiple of the
    value's seed spread) and `counts` (e.g. "holds 4, inconclusive 1")."""
    seeds = sorted(claims_by_seed)
    found: dict[str, dict[str, list]] = {}
    for seed in seeds:
        for row in claims_by_seed[seed].iter_rows(named=True):
            entry = found.setdefault(row["claim"], {"seeds": [], "verdicts": [], "values": [], "margins": []})
            entry["seeds"].append(seed)
            entry["verdicts"].append(row["verdict"])
            entry["values"].append(row["value"])
            entry["margins"].append(verdict_margin(row))
    rows = []
    for name, entry in found.items():
        counts = Counter(entry["verdicts"]).most_common()
        rows.append({"claim": name, **entry, "stable": len(counts) == 1 and len(entry["seeds"]) == len(seeds),
                     "margin": min(entry["margins"]), "counts": ", ".join(f"{verdict} {n}" for verdict, n in counts)})
    return pl.DataFrame(rows, schema={"claim": pl.Utf8, "seeds": pl.List(pl.Int64), "verdicts": pl.List(pl.Utf8),
                                      "values": pl.List(pl.Float64), "margins": pl.List(pl.Float64),
                                      "stable": pl.Boolean, "margin": pl.Float64, "counts": pl.Utf8})


def replicate_tables(run_dir: Path, replicate_dirs: dict[int, str]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every seed's replicated metric tables, read from results/<run>/<replicate dir>."""
    tables = {}
    for seed, sub in replicate_dirs.items():
        found = metric_rows(run_dir / sub, REPLICATED_TABLES)
        missing = sorted(set(REPLICATED_TABLES) - set(found))
        if missing:
            raise UserError(f"seed {seed}: {', '.join(missing)} missing under {run_dir / sub}; "
                            "run `snakemake --cores all replicates` to make every replicate.")
        tables[seed] = found
    return tables


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `replicates`: `python -m mechinterp.replicates --help`."""
    parser = argparse.ArgumentParser(description="Seed-to-seed spread of every metric and each claim's verdicts.")
    parser.add_argument("--run-dir", required=True, help="results/<run>")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--dirs", nargs="+", required=True, help="each seed's folder under --run-dir ('' for the main run)")
    parser.add_argument("--spread", required=True)
    parser.add_argument("--claims", required=True)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    tables = replicate_tables(run_dir, dict(zip(args.seeds, args.dirs, strict=True)))
    metrics = spread(tables)
    claims = claim_stability({s: pl.DataFrame(t[CLAIMS_TABLE]) for s, t in tables.items()})
    write_parquet(metrics, args.spread)
    write_parquet(claims, args.claims)
    unstable = claims.filter(~pl.col("stable"))
    log.info("%d metrics over seeds %s; %d of %d claims stable", metrics.height, args.seeds,
             claims.height - unstable.height, claims.height)
    for row in unstable.iter_rows(named=True):
        log.info("unstable: %s (%s)", row["claim"], row["counts"])


if __name__ == "__main__":
    run_stage(main)
