"""How often would the audit fail a faithful rerun? Measured on a run's replicates (default: results/default,
after `snakemake --cores all replicates`).

Each seed in turn plays the rerun and each other seed the reference, with the spread computed from the
remaining seeds only (so the rerun is not part of its own tolerance). For several `spread_multiple`
values it counts the claims and metrics that would fail. A well-calibrated audit fails none of these
pairs at the configured multiple; the count at smaller multiples shows the margin. Writes
results/benchmarks/audit_calibration.json.

    .venv/bin/python benchmarks/audit_calibration.py [--run results/default] [--multiples 2 3 4 6 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import polars as pl

from mechinterp.audit import AuditResult, AuditSettings, Reference, Tolerances, audit_claims, audit_metrics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2, 3, 4, 6, 8])
    args = parser.parse_args()
    tables = replicate_tables(args.run, seed_dirs(args.run))
    section = load_default_config()["audit"]
    rows = []
    for rerun, reference in itertools.permutations(sorted(tables), 2):
        others = {s: t for s, t in tables.items() if s != rerun}
        ref = Reference({"metrics": tables[reference]}, spread(others),
                        claim_stability({s: pl.DataFrame(t[CLAIMS_TABLE]) for s, t in others.items()}))
        for multiple in args.multiples:
            settings = AuditSettings(**{**section, "spread_multiple": multiple})
            result = AuditResult()
            tolerances = Tolerances(ref.spread, settings)
            audit_claims({"metrics": tables[rerun]}, ref, tolerances, result)
            audit_metrics({"metrics": tables[rerun]}, ref.manifest, tolerances, result)
            rows.append({"rerun": rerun, "reference": reference, "spread_multiple": multiple,
                         "claims_failed": result.counts["claims"][1] - result.counts["claims"][0],
                         "metrics_failed": result.counts["metrics"][1] - result.counts["metrics"][0],
                         "metrics": result.counts["metrics"][1], "claims": result.counts["claims"][1],
                         "reported_outside": result.reported[1] - result.reported[0], "reported": result.reported[1],
                         "failures": result.failures[:5]})
    frame = pl.DataFrame(rows)
    summary = (frame.group_by("spread_multiple").agg(
        pairs=pl.len(), pairs_failing=(pl.col("claims_failed") + pl.col("metrics_failed") > 0).sum(),
        claims_failed=pl.col("claims_failed").sum(), metrics_failed=pl.col("metrics_failed").sum(),
        metrics_per_pair=pl.col("metrics").first(), claims_per_pair=pl.col("claims").first(),
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
