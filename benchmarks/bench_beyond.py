"""What the stages beyond the study (issue 17: the toy model, the tuned lens, the crosscoder and its browser
folder) add to a finished default run, from Snakemake's benchmark file of each of their jobs.

    .venv/bin/python benchmarks/bench_beyond.py [--run results/default]

Each job's wall time and peak memory, their sum (the bound is 5 minutes on a 2-core machine), the run's whole
DAG from its manifest's job times for comparison, and the CPU. Writes results/benchmarks/beyond.json and prints it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from mechinterp.manifest import cpu_model

REPO = Path(__file__).resolve().parents[1]
JOBS = ["toy_superposition", "figures_toy", "tuned_lens", "figures_tuned_lens", "train_crosscoder",
        "evaluate_crosscoder", "crosscoder_latents", "figures_crosscoder", "browser/crosscoder"]


def job_times(run: Path) -> dict[str, dict[str, float]]:
    """Wall seconds and peak resident MiB of each job of JOBS, from `<run>/benchmarks/<job>.tsv`."""
    out = {}
    for job in JOBS:
        row = pl.read_csv(run / "benchmarks" / f"{job}.tsv", separator="\t").row(-1, named=True)
        out[job] = {"wall_s": round(float(row["s"]), 2), "max_rss_mib": round(float(row["max_rss"]), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "results" / "default"))
    args = parser.parse_args()
    run = Path(args.run)
    jobs = job_times(run)
    result = {"cpu": cpu_model(), "run": str(run), "jobs": jobs,
              "beyond_s": round(sum(j["wall_s"] for j in jobs.values()), 1), "bound_s": 300}
    manifest = run / "MANIFEST.json"
    if manifest.is_file():  # every job of the run (serial sum: jobs of one thread may have overlapped)
        result["all_jobs_s"] = round(sum(j["wall_s"] for j in json.loads(manifest.read_text())["jobs"].values()), 1)
    out = REPO / "results" / "benchmarks" / "beyond.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
