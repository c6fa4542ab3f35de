"""How often would the audit fail a faithful rerun, and does it still catch a broken one? Measured on a run's
replicates (default: results/default, after `snakemake --cores all replicates`).

Each seed in turn plays the rerun and each other seed the reference, with the spread and the claims'
robustness computed from the remaining seeds only (so the rerun is not part of its own tolerance). For
several `spread_multiple` values it counts the claims and metrics that would fail (false alarms: a
well-calibrated audit fails none of these pairs at the configured multiple). Each rerun is also audited
with two planted faults, which the audit must fail: a broken headline SAE (FVU 1.3, ten times the CE
increase, its quality claims failing, as with shuffled decoder rows) and swapped polysemanticity scores
(features' and neurons' roles exchanged: every comparison and claim negated). Writes
results/benchmarks/audit_calibration.json.

    .venv/bin/python benchmarks/audit_calibration.py [--run results/default] [--multiples 2 3 4 6 8]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import polars as pl

from mechinterp.audit import (AuditResult, AuditSettings, Reference, Tolerances, audit_claims, audit_metrics,
                              claim_robustness)
from mechinterp.claims import by_interval
from mechinterp.config import load_default_config
from mechinterp.manifest import CLAIMS_TABLE
from mechinterp.replicates import REPLICATED_TABLES, claim_stability, replicate_tables, spread

REPO = Path(__file__).resolve().parents[1]


def seed_dirs(run: Path) -> dict[int, str]:
    """The main run's seed and every replicate folder under it."""
    seeds = {json.loads((run / "MANIFEST.json").read_text())["config"]["seed"]: "."}
    for folder in sorted((run / "replicates").glob("seed*")):
        seeds[int(folder.name.removeprefix("seed"))] = f"replicates/{folder.name}"
    return seeds


def broken_sae(tables: dict, sae: str) -> dict:
    """A run whose SAE `sae` reconstructs nothing: FVU 1.3, ten times the CE increase, its FVU and CE claims failing."""
    broken = copy.deepcopy(tables)
    for row in broken["sae_eval/metrics.parquet"]:
        if row["sae"] == sae:
            row.update(fvu=1.3, ce_increase=10 * row["ce_increase"], ce_increase_ci_low=10 * row["ce_increase_ci_low"],
                       ce_increase_ci_high=10 * row["ce_increase_ci_high"])
    for row in broken[CLAIMS_TABLE]:
        if row["claim"] in (f"sae.{sae}.fvu", f"sae.{sae}.ce_increase"):
            row.update(value=10 * row["value"], ci_low=None if row["ci_low"] is None else 10 * row["ci_low"],
                       ci_high=None if row["ci_high"] is None else 10 * row["ci_high"], verdict="fails")
    return broken


def swapped_scores(tables: dict) -> dict:
    """A run whose polysemanticity scores of features and neurons were exchanged: every comparison negated."""
    swapped = copy.deepcopy(tables)
    for row in swapped["polysemanticity/comparison.parquet"]:
        row.update(difference=-row["difference"], ci_low=-row["ci_high"], ci_high=-row["ci_low"])
    for row in swapped[CLAIMS_TABLE]:
        if row["claim"].startswith("polysemanticity.") and row["ci_low"] is not None:
            row.update(value=2 * row["bound"] - row["value"], ci_low=2 * row["bound"] - row["ci_high"],
                       ci_high=2 * row["bound"] - row["ci_low"])
            row["verdict"] = by_interval(row["ci_low"], row["ci_high"], row["bound"])
    return swapped


def audited(rerun: dict, ref: Reference, settings: AuditSettings) -> AuditResult:
    result = AuditResult()
    tolerances = Tolerances(ref.spread, settings)
    audit_claims({"metrics": rerun}, ref, tolerances, result)
    audit_metrics({"metrics": rerun}, ref.manifest, tolerances, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2, 3, 4, 6, 8])
    args = parser.parse_args()
    tables = replicate_tables(args.run, seed_dirs(args.run))
    section = load_default_config()["audit"]
    headline = load_default_config()["clamping"]["sae"]
    rows = []
    for rerun, reference in itertools.permutations(sorted(tables), 2):
        others = {s: t for s, t in tables.items() if s != rerun}
        ref = Reference({"metrics": tables[reference]}, spread(others),
                        claim_stability({s: pl.DataFrame(t[CLAIMS_TABLE]) for s, t in others.items()}))
        for multiple in args.multiples:
            settings = AuditSettings(**{**section, "spread_multiple": multiple})
            result = audited(tables[rerun], ref, settings)
            caught = [not audited(fault(tables[rerun]), ref, settings).passed
                      for fault in (lambda t: broken_sae(t, headline), swapped_scores)]
            sd = Tolerances(ref.spread, settings).sd
            reference_rows = {r["claim"]: r for r in tables[reference][CLAIMS_TABLE]}
            robust = sum(claim_robustness(r, sd.get((CLAIMS_TABLE, json.dumps([r["claim"]]), "value"), 0.0),
                                          reference_rows[r["claim"]])[0]
                         for r in ref.claims.iter_rows(named=True) if r["claim"] in reference_rows)
            rows.append({"rerun": rerun, "reference": reference, "spread_multiple": multiple,
                         "claims_failed": result.counts["claims"][1] - result.counts["claims"][0],
                         "metrics_failed": result.counts["metrics"][1] - result.counts["metrics"][0],
                         "metrics": result.counts["metrics"][1], "claims": result.counts["claims"][1],
                         "robust_claims": robust, "broken_sae_caught": caught[0], "swapped_scores_caught": caught[1],
                         "reported_outside": result.reported[1] - result.reported[0], "reported": result.reported[1],
                         "failures": result.failures[:5]})
    frame = pl.DataFrame(rows)
    summary = (frame.group_by("spread_multiple").agg(
        pairs=pl.len(), pairs_failing=(pl.col("claims_failed") + pl.col("metrics_failed") > 0).sum(),
        claims_failed=pl.col("claims_failed").sum(), metrics_failed=pl.col("metrics_failed").sum(),
        broken_sae_caught=pl.col("broken_sae_caught").sum(), swapped_scores_caught=pl.col("swapped_scores_caught").sum(),
        metrics_per_pair=pl.col("metrics").first(), claims_per_pair=pl.col("claims").first(),
        robust_claims_per_pair=pl.col("robust_claims").mean(),
        reported_outside_per_pair=pl.col("reported_outside").mean(), reported_per_pair=pl.col("reported").first())
        .sort("spread_multiple"))
    print(f"seeds {sorted(tables)}; tables {REPLICATED_TABLES}; configured spread_multiple {section['spread_multiple']}")
    print(summary)
    worst = frame.filter(pl.col("spread_multiple") == section["spread_multiple"]).sort("metrics_failed").tail(3)
    for row in worst.iter_rows(named=True):
        for line in row["failures"]:
            print(f"  rerun {row['rerun']} vs {row['reference']}: {line}")
    out = REPO / "results" / "benchmarks" / "audit_calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "summary": summary.to_dicts(),
                               "pairs": frame.drop("failures").to_dicts()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
