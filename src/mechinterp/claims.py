"""The study's claims as named, testable statements, each with its statistic, an interval where the
data give one, and a verdict: `holds`, `fails` or `inconclusive` (an interval that spans the bound).

- logit lens: the lens at the last layer is the model's output; the configured targets' log-probability
  rises with depth (share of targets whose Spearman correlation of log p with layer is positive, with
  a Wilson interval, against one half); each target enters the top k before the output;
- SAE quality, per SAE, against the bounds of the config's `claims` section (FVU, CE loss recovered,
  dead and dense latents); a failing SAE is flagged here and in the stage's log;
- features more monosemantic than neurons, per site (the bootstrap CI of the median difference);
- clamping, at the headline site: the selected features beat each baseline at equal damage (the
  bootstrap CI over concepts of the mean difference), and move their concept monotonically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mechinterp.clamping_stats import wilson_interval
from mechinterp.errors import run_stage
from mechinterp.files import write_parquet

log = logging.getLogger(__name__)
LENS_OUTPUT_TOLERANCE = 1e-4  # max |log p| difference between the lens at the last layer and the model's output


@dataclass(frozen=True)
class ClaimsSettings:
    """The config's `claims` section: the bounds an SAE must meet (defaults in the schema)."""

    fvu_max: float
    """largest acceptable fraction of variance unexplained on held-out tokens"""
    ce_recovered_min: float
    """smallest acceptable CE loss recovered (against zero ablation)"""
    dead_fraction_max: float
    """largest acceptable share of latents never active on held-out tokens"""
    dense_fraction_max: float
    """largest acceptable share of latents active on more than 10% of tokens"""


def by_interval(low: float, high: float, bound: float) -> str:
    """`holds` when the interval lies above the bound, `fails` below it, `inconclusive` across it."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    return "holds" if low > bound else "fails" if high < bound else "inconclusive"


def claim(name: str, statement: str, statistic: str, value: float, low: float | None, high: float | None,
          bound: float, verdict: str, n_concepts: int | None = None) -> dict:
    """One claims row; `n_concepts` is the number of concepts a clamping statistic is over."""
    return {"claim": name, "statement": statement, "statistic": statistic, "value": float(value),
            "ci_low": low, "ci_high": high, "bound": float(bound), "verdict": verdict, "n_concepts": n_concepts}


def lens_claims(summary: dict, targets: pl.DataFrame, first_layer: pl.DataFrame) -> list[dict]:
    rows = [claim("logit_lens.final_layer_is_output", "decoded at the last layer, the lens is the model's output",
                  "max |log p lens - log p model|", summary["max_final_abs_diff"], None, None, LENS_OUTPUT_TOLERANCE,
                  "holds" if summary["max_final_abs_diff"] <= LENS_OUTPUT_TOLERANCE else "fails")]
    prompts = targets.filter(pl.col("origin") == "prompt")
    rising = (prompts.group_by("prompt_id", "target")
              .agg(pl.corr("layer", "log_prob", method="spearman").alias("rho"))["rho"].fill_nan(0).to_numpy())
    n_up = int((rising > 0).sum())
    low, high = wilson_interval(n_up, len(rising))
    rows.append(claim("logit_lens.targets_rise_with_depth", "the prompts' targets gain log-probability with depth",
                      "share of targets with Spearman(layer, log p) > 0", n_up / max(len(rising), 1), low, high,
                      0.5, by_interval(low, high, 0.5)))
    last_layer = int(targets["layer"].max())
    for row in first_layer.filter(pl.col("origin") == "prompt").iter_rows(named=True):
        entered = row["first_layer_in_top_k"]
        rows.append(claim(f"logit_lens.enters.{row['prompt_id']}:{row['target'].strip()}",
                          f"{row['target']!r} enters the top k of {row['prompt_id']} by the output",
                          "first layer in the top k", float("nan") if entered is None else entered, None, None,
                          last_layer, "fails" if entered is None else "holds"))
    return rows


def sae_claims(metrics: pl.DataFrame, bounds: ClaimsSettings) -> list[dict]:
    rows = []
    checks = (("fvu", "fvu_max", "at most", lambda v, b: v <= b), ("ce_recovered", "ce_recovered_min", "at least",
                                                                  lambda v, b: v >= b),
              ("dead_fraction", "dead_fraction_max", "at most", lambda v, b: v <= b),
              ("dense_fraction", "dense_fraction_max", "at most", lambda v, b: v <= b))
    for row in metrics.iter_rows(named=True):
        for column, key, relation, ok in checks:
            bound = getattr(bounds, key)
            good = ok(row[column], bound)
            if not good:
                log.warning("SAE %s fails its quality bound: %s = %.4g, should be %s %g (claims.%s)", row["sae"],
                            column, row[column], relation, bound, key)
            rows.append(claim(f"sae.{row['sae']}.{column}", f"{row['sae']}: {column} {relation} {bound:g}",
                              column, row[column], None, None, bound, "holds" if good else "fails"))
    return rows


def polysemanticity_claims(comparison: pl.DataFrame) -> list[dict]:
    rows = []
    for row in comparison.filter(pl.col("score") == "monosemanticity").iter_rows(named=True):
        rows.append(claim(f"polysemanticity.{row['sae']}", f"{row['sae']}'s features are more monosemantic than "
                          f"the units of {row['site']}", "median(features) - median(neurons), monosemanticity",
                          row["difference"], row["ci_low"], row["ci_high"], 0.0,
                          by_interval(row["ci_low"], row["ci_high"], 0.0)))
    return rows


def clamping_claims(verdict: pl.DataFrame, site: str) -> list[dict]:
    rows = []
    at_site = verdict.filter(pl.col("site") == site)
    for row in at_site.filter(pl.col("statistic") == "mean_difference").iter_rows(named=True):
        rows.append(claim(f"clamping.{site}.{row['feature_selection']}_feature_beats_{row['baseline']}",
                          f"the {row['feature_selection']}-selected feature at {site} moves its concept more than the "
                          f"{row['baseline']} at KL 0.1 ({row['n_concepts']} concepts)",
                          "mean difference of relative effects (nats)", row["value"], row["ci_low"], row["ci_high"],
                          0.0, by_interval(row["ci_low"], row["ci_high"], 0.0), row["n_concepts"]))
    for row in at_site.filter(pl.col("statistic") == "monotone").iter_rows(named=True):
        rows.append(claim(f"clamping.{site}.{row['feature_selection']}_feature_monotone",
                          f"the {row['feature_selection']}-selected feature at {site} moves most concepts "
                          f"monotonically ({row['n_concepts']} concepts)", "share of concepts with Spearman >= threshold", row["value"],
                          row["ci_low"], row["ci_high"], 0.5, by_interval(row["ci_low"], row["ci_high"], 0.5),
                          row["n_concepts"]))
    return rows


def study_claims(lens_summary: dict, lens_targets: pl.DataFrame, first_layer: pl.DataFrame, sae_metrics: pl.DataFrame,
                 comparison: pl.DataFrame, clamping_verdict: pl.DataFrame, headline_site: str,
                 bounds: ClaimsSettings) -> pl.DataFrame:
    """Every claim of the study, one row each: claim, statement, statistic, value, ci_low, ci_high,
    bound, verdict, n_concepts (clamping claims only)."""
    rows = [*lens_claims(lens_summary, lens_targets, first_layer), *sae_claims(sae_metrics, bounds),
            *polysemanticity_claims(comparison), *clamping_claims(clamping_verdict, headline_site)]
    return pl.DataFrame(rows, schema_overrides={"ci_low": pl.Float64, "ci_high": pl.Float64, "n_concepts": pl.Int64})


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `claims`: `python -m mechinterp.claims --help`."""
    parser = argparse.ArgumentParser(description="The study's claims with their statistics and verdicts.")
    parser.add_argument("--lens-summary", required=True)
    parser.add_argument("--lens-targets", required=True)
    parser.add_argument("--first-layer", required=True)
    parser.add_argument("--sae-metrics", required=True)
    parser.add_argument("--comparison", required=True, help="the polysemanticity comparison table")
    parser.add_argument("--clamping-verdict", required=True)
    parser.add_argument("--headline-site", required=True, help="the site of clamping.sae")
    parser.add_argument("--settings", required=True, help="the config's `claims` section as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    claims = study_claims(json.loads(Path(args.lens_summary).read_text()), pl.read_parquet(args.lens_targets),
                          pl.read_parquet(args.first_layer), pl.read_parquet(args.sae_metrics),
                          pl.read_parquet(args.comparison), pl.read_parquet(args.clamping_verdict), args.headline_site,
                          ClaimsSettings(**json.loads(args.settings)))
    write_parquet(claims, args.out)
    for verdict, n in claims.group_by("verdict").len().sort("verdict").iter_rows():
        log.info("%d claims %s", n, verdict)


if __name__ == "__main__":
    run_stage(main)
