"""How many concepts do the clamping claims need? A power calculation on the seed spread the replicates measure
(default: results/default, after `snakemake --cores all replicates`).

For each test of the headline site's family (each feature selection against each baseline, and beyond the
placebo concepts) it reads, from every seed's clamping/verdict.parquet: the statistic, its hierarchical 95%
interval (so its standard error within one draw, SE = width / 3.92) and the family's size m. Over the seeds it
takes the statistic's standard deviation (the spread of SAE draws and prompt samples). It reports:

- the minimum detectable effect (MDE) at 80% power, two-sided at the Bonferroni level 0.05 / m:
  (z(1 - 0.025 / m) + z(0.8)) x SE, with the SE at the default's concept count and scaled as 1 / sqrt(n);
- the concepts needed for an MDE of 0.05 and 0.03 nats, and their measurement time from the stage's log
  (seconds per concept at the headline site);
- whether a verdict can flip between draws: |mean statistic - bound| against 2 seed standard deviations.

Writes results/benchmarks/clamping_power.json.

    .venv/bin/python benchmarks/clamping_power.py [--run results/default]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import NormalDist

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
TESTED = ("mean_difference", "effect_beyond_placebo")


def seed_dirs(run: Path) -> dict[int, Path]:
    seeds = {json.loads((run / "MANIFEST.json").read_text())["config"]["seed"]: run}
    for folder in sorted((run / "replicates").glob("seed*")):
        seeds[int(folder.name.removeprefix("seed"))] = folder
    return seeds


def seconds_per_concept(log: Path, site: str) -> float:
    """The headline site's choice and measurement time over its concept count, from the stage's log."""
    text = log.read_text(errors="replace")
    chosen = re.search(rf"{site}: \d+ units \(\d+ distinct\) chosen for (\d+) concepts in ([\d.]+) s", text)
    measured = re.search(rf"{site}: \d+ clamped rows in ([\d.]+) s", text)
    return (float(chosen.group(2)) + float(measured.group(1))) / int(chosen.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--power", type=float, default=0.8)
    args = parser.parse_args()
    from mechinterp.config import load_default_config

    site = load_default_config()["clamping"]["sae"].split("-")[0]
    frames = []
    for seed, folder in seed_dirs(args.run).items():
        verdict = pl.read_parquet(folder / "clamping" / "verdict.parquet")
        frames.append(verdict.filter((pl.col("site") == site) & (pl.col("concepts") == "real")
                                     & pl.col("statistic").is_in(TESTED)).with_columns(seed=pl.lit(seed)))
    tests = pl.concat(frames)
    m = tests.filter(pl.col("seed") == tests["seed"].min()).height
    z = NormalDist().inv_cdf(1 - 0.025 / m) + NormalDist().inv_cdf(args.power)
    per_concept = seconds_per_concept(args.run / "logs" / "clamping.log", site)
    rows = []
    for (selection, statistic, baseline), group in tests.group_by("feature_selection", "statistic", "baseline",
                                                                  maintain_order=True):
        se = float(((group["ci_high"] - group["ci_low"]) / 3.92).mean())
        n = int(group["n_concepts"].max())
        values = group["value"].to_numpy()
        seed_sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        mde = z * se
        needed = {f"concepts_for_mde_{target:g}": int(np.ceil(n * (mde / target) ** 2)) for target in (0.05, 0.03)}
        rows.append({"feature_selection": selection, "statistic": statistic, "baseline": baseline, "n_concepts": n,
                     "seeds": len(values), "mean": float(values.mean()), "seed_sd": seed_sd, "se_within_draw": se,
                     "mde": mde, **needed,
                     "verdicts": ", ".join(f"{v:+.3f}" for v in values),
                     "clear_of_bound_by_2_seed_sd": bool(abs(values.mean()) > 2 * seed_sd)})
    table = pl.DataFrame(rows)
    with pl.Config(tbl_rows=-1, tbl_width_chars=250, tbl_cols=-1):
        print(f"site {site}; family of m = {m} tests; z = {z:.2f} (80% power at 0.05 / m); "
              f"{per_concept:.1f} s per concept measured")
        print(table)
    out = REPO / "results" / "benchmarks" / "clamping_power.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "site": site, "family_size": m, "z": z,
                               "seconds_per_concept": per_concept, "tests": table.to_dicts()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
