"""The study's claims as named, testable statements, each with its statistic, an interval where the
data give one, the null or control it is measured against (`against`: what a unit, token or lens with
no structure scores), and a verdict: `holds`, `fails` or `inconclusive` (an interval that spans the bound).

- logit lens: the lens at the last layer is the model's output; the prompts' targets gain
  log-probability with depth more than random vocabulary tokens of the same prompt (with the model's
  own top token as the positive control); targets the model ranks at the output enter its top k before
  the last layer;
- tuned lens: closer to the model's output than the logit lens, a bias-only translator and a constant
  distribution (KL differences over held-out windows);
- SAE quality, per SAE, against the bounds of the config's `claims` section: the CE increase and the
  KL with the SAE spliced in (bootstrap intervals over held-out windows), FVU, dead and dense latents;
  a failing SAE is flagged here and in the stage's log;
- polysemanticity, per SAE: features more monosemantic than their site's neurons within matched
  activity, and than an untrained SAE and a TopK code of random directions on the excess over the
  activity-matched null;
- clamping, at the headline site: the selected features beat each baseline at equal damage and move
  real concepts more than placebo concepts (hierarchical bootstrap over concepts and prompts,
  Bonferroni intervals over the site's tests), and move their concept monotonically;
- crosscoder: judged as an SAE, and its latents' match rate against a second seed of a site's SAE;
- toy model: its SAE recovers the represented features above chance and more often than the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mechinterp.intervals import percentile_ci, prompt_resamples, share_difference_interval, wilson_interval
from mechinterp.errors import run_stage
from mechinterp.files import write_parquet
from mechinterp.toy_superposition import CHANCE_QUANTILE

log = logging.getLogger(__name__)
LENS_OUTPUT_TOLERANCE = 1e-4  # max |log p| difference between the lens at the last layer and the model's output
LENS_BOOTSTRAP = 10_000  # resamples of the prompts for the logit lens claims' intervals


@dataclass(frozen=True)
class ClaimsSettings:
    """The config's `claims` section: the bounds an SAE must meet (defaults, and the published SAEs
    they come from, in the schema)."""

    fvu_max: float
    """largest acceptable fraction of variance unexplained on held-out tokens"""
    ce_increase_max: float
    """largest acceptable rise of the next-token cross-entropy (nats/token) with the SAE spliced in"""
    kl_max: float
    """largest acceptable KL(clean || spliced) per token (nats)"""
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
          bound: float, verdict: str, n_concepts: int | None = None, against: str | None = None) -> dict:
    """One claims row; `n_concepts` is the number of concepts a clamping statistic is over; `against`
    names the null or control the statistic is measured against (what a unit, token or lens with no
    structure would score), or None for a bound that is a tolerance or a quality bar."""
    return {"claim": name, "statement": statement, "statistic": statistic, "value": float(value),
            "ci_low": low, "ci_high": high, "bound": float(bound), "verdict": verdict, "n_concepts": n_concepts,
            "against": against}


def mean_percentile_by_prompt(first_layer: pl.DataFrame, column: str, n_boot: int = LENS_BOOTSTRAP
                              ) -> tuple[float, float, float]:
    """Mean of a per-target percentile `column` over targets, and its 95% bootstrap interval resampling
    whole prompts (the targets of one prompt share its random tokens). NaNs when there is no prompt."""
    by_prompt = first_layer.group_by("prompt_id", maintain_order=True).agg(
        total=pl.col(column).sum(), n=pl.col(column).count())
    if by_prompt.height == 0:
        return float("nan"), float("nan"), float("nan")
    total, n = by_prompt["total"].to_numpy(), by_prompt["n"].to_numpy()
    picks = prompt_resamples(len(total), n_boot, seed=0)
    low, high = percentile_ci(total[picks].sum(1) / n[picks].sum(1))
    return float(total.sum() / n.sum()), low, high


def beyond_random_claim(name: str, statement: str, statistic: str, first_layer: pl.DataFrame, column: str) -> dict:
    """A claim that tokens rise with depth more than their prompt's random tokens: the mean percentile
    `column` (bootstrap over prompts) against 0.5, where a random token sits."""
    value, low, high = mean_percentile_by_prompt(first_layer, column)
    return claim(name, statement, statistic, value, low, high, 0.5, by_interval(low, high, 0.5),
                 against="random vocabulary tokens of the same prompt")


def lens_claims(summary: dict, first_layer: pl.DataFrame) -> list[dict]:
    """The logit lens's claims, on the configured prompts' targets (`logit_lens/first_layer.parquet`,
    the corpus windows left out) and the stage's summary (`logit_lens/summary.json`): the last layer is
    the output; the targets' log p rises with depth more than random tokens' (mean percentile of a
    target's Spearman among its prompt's random tokens, against 0.5, the null), with the model's own
    top token as the positive control; targets the model ranks in its top k at the output enter it
    before the last layer (share, Wilson interval, against one half). Targets the model never ranks in
    its top k at the output are left out of that claim (its statement counts them)."""
    rows = [claim("logit_lens.final_layer_is_output", "decoded at the last layer, the lens is the model's output",
                  "max |log p lens - log p model|", summary["max_final_abs_diff"], None, None, LENS_OUTPUT_TOLERANCE,
                  "holds" if summary["max_final_abs_diff"] <= LENS_OUTPUT_TOLERANCE else "fails")]
    prompts = first_layer.filter(pl.col("origin") == "prompt")
    random_rise = summary.get("random_rise_share", float("nan"))
    rows.append(beyond_random_claim(
        "logit_lens.targets_rise_beyond_random",
        f"the prompts' targets gain log-probability with depth more than random tokens do "
        f"({random_rise:.1%} of random tokens rise; {prompts.height} targets)",
        "mean percentile of a target's Spearman(layer, log p) among its prompt's random tokens",
        prompts, "rise_percentile"))
    tops = prompts.unique("prompt_id", keep="first", maintain_order=True)
    rows.append(beyond_random_claim(
        "logit_lens.top_token_rises_beyond_random",
        f"control: the model's own top token at the output gains log-probability with depth more than random "
        f"tokens do ({tops.height} prompts)",
        "mean percentile of the top token's Spearman(layer, log p) among the prompt's random tokens",
        tops, "top_rise_percentile"))
    ranked = prompts.filter(pl.col("ranked_at_output"))
    n_before = ranked.filter(pl.col("entry") == "before_last").height
    low, high = wilson_interval(n_before, ranked.height)
    rows.append(claim("logit_lens.targets_enter_before_output",
                      f"targets the model ranks in its top k at the output enter the top k before the last layer "
                      f"({ranked.height} such targets; {prompts.height - ranked.height} never ranked there, left out)",
                      "share of output-ranked targets in the top k at a layer before the last",
                      n_before / ranked.height if ranked.height else float("nan"), low, high, 0.5,
                      by_interval(low, high, 0.5), against="entry at the last layer, which is the output itself"))
    return rows


def layer_ranges(layers: list[int]) -> str:
    """Layers as ranges: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; 'none' when empty."""
    if not layers:
        return "none"
    runs, start = [], layers[0]
    for previous, layer in zip(layers, [*layers[1:], None]):
        if layer != previous + 1:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = layer
    return ", ".join(runs)


def tuned_lens_claims(heldout_kl: pl.DataFrame) -> list[dict]:
    """The tuned lens against each baseline (`tuned_lens/heldout_kl.parquet`, `other` positions): the
    mean over the layers before the last of KL(output || baseline) - KL(output || tuned lens), with its
    bootstrap interval over held-out windows (the rows with a null layer), against 0; the statement
    names the layers at which the per-layer interval lies above 0 (the tuned lens better) and below 0."""
    other = heldout_kl.filter(pl.col("position_kind") == "other")
    rows = []
    for baseline, name in (("logit", "logit lens"), ("bias_only", "bias-only translator"),
                           ("constant", "constant distribution (the mean output)")):
        part = other.filter(pl.col("lens") == baseline)
        overall = part.filter(pl.col("layer").is_null()).row(0, named=True)
        per_layer = part.filter(pl.col("layer").is_not_null()).sort("layer")
        per_layer = per_layer.filter(pl.col("layer") < per_layer["layer"].max())
        above = per_layer.filter(pl.col("excess_ci_low") > 0)["layer"].to_list()
        below = per_layer.filter(pl.col("excess_ci_high") < 0)["layer"].to_list()
        rows.append(claim(f"tuned_lens.beats_{baseline}",
                          f"the tuned lens is closer to the output than the {name} on held-out text "
                          f"(better at layers {layer_ranges(above)}; worse at layers {layer_ranges(below)}; "
                          f"of {per_layer.height})",
                          f"mean over layers of KL({baseline}) - KL(tuned), nats", overall["excess_over_tuned"],
                          overall["excess_ci_low"], overall["excess_ci_high"], 0.0,
                          by_interval(overall["excess_ci_low"], overall["excess_ci_high"], 0.0), against=name))
    return rows


def sae_claims(metrics: pl.DataFrame, bounds: ClaimsSettings) -> list[dict]:
    """Per SAE (a row of sae_eval/metrics.parquet): its fidelity, the CE increase (nats/token) and the
    KL with the SAE spliced in, held under `bounds` by their bootstrap 95% intervals over held-out
    windows (holds when the whole interval is below the bound, fails when it is above); its FVU, dead
    and dense shares, point values against theirs. Every failed bound is also a warning."""
    rows = []
    for row in metrics.iter_rows(named=True):
        sae = row["sae"]
        for column, key, what in (("ce_increase", "ce_increase_max", "raises the next-token CE by less than"),
                                  ("kl_sae", "kl_max", "has a KL(clean || spliced) below")):
            bound, low, high = getattr(bounds, key), row[f"{column}_ci_low"], row[f"{column}_ci_high"]
            verdict = by_interval(-high, -low, -bound)  # an upper bound: the negated interval above -bound
            if verdict != "holds":
                log.warning("SAE %s %s its bound: %s = %.4g [%.4g, %.4g] nats/token, should be below %g (claims.%s)",
                            sae, "fails" if verdict == "fails" else "does not clearly meet", column, row[column], low,
                            high, bound, key)
            rows.append(claim(f"sae.{sae}.{column}", f"{sae}, spliced in, {what} {bound:g} nats/token "
                              f"({row['n_loss_windows']} held-out windows)", f"{column} (nats/token)", row[column],
                              low, high, bound, verdict))
        for column, key in (("fvu", "fvu_max"), ("dead_fraction", "dead_fraction_max"),
                            ("dense_fraction", "dense_fraction_max")):
            bound = getattr(bounds, key)
            good = row[column] <= bound
            if not good:
                log.warning("SAE %s fails its quality bound: %s = %.4g, should be at most %g (claims.%s)", sae,
                            column, row[column], bound, key)
            rows.append(claim(f"sae.{sae}.{column}", f"{sae}: {column} at most {bound:g}", column, row[column],
                              None, None, bound, "holds" if good else "fails"))
    return rows


POLYSEMANTICITY_CONTROLS = {"random_init": "the same SAE untrained",
                            "random_directions": "a TopK code of random directions"}


def polysemanticity_claims(comparison: pl.DataFrame) -> list[dict]:
    """Per SAE of the polysemanticity comparison table: its features are more monosemantic than the
    units of their site beyond what their activity explains (the activity-matched difference,
    `polysemanticity.matched_difference`), and than each untrained control of it on the excess over
    the activity-matched null. Each against 0, by its bootstrap interval."""
    rows = []
    saes = comparison.filter((pl.col("baseline") == "neurons") & ~pl.col("sae").str.starts_with("control:"))
    for row in saes.filter(pl.col("score") == "monosemanticity_matched").iter_rows(named=True):
        sae, site = row["sae"], row["site"]
        rows.append(claim(f"polysemanticity.{sae}.beyond_activity",
                          f"{sae}'s features are more monosemantic than the units of {site} beyond what their activity "
                          f"explains: medians compared within log2 bins of active tokens ({row['n_bins']} bins that "
                          "both groups fill)",
                          "median(features) - median(neurons) within bins of active tokens, weighted mean over bins, "
                          "monosemanticity", row["difference"], row["ci_low"], row["ci_high"], 0.0,
                          by_interval(row["ci_low"], row["ci_high"], 0.0),
                          against=f"the units of {site} with as many active tokens"))
        for control, described in POLYSEMANTICITY_CONTROLS.items():
            against = comparison.filter((pl.col("sae") == sae) & (pl.col("baseline") == f"control:{control}:{sae}")
                                        & (pl.col("score") == "monosemanticity_excess"))
            for c in against.iter_rows(named=True):
                rows.append(claim(f"polysemanticity.{sae}.beats_{control}",
                                  f"{sae}'s features are more monosemantic than {described} at {site}, beyond the "
                                  "score of the same activations on random tokens",
                                  "median(features) - median(control), monosemanticity minus its activity-matched null",
                                  c["difference"], c["ci_low"], c["ci_high"], 0.0,
                                  by_interval(c["ci_low"], c["ci_high"], 0.0), against=described))
    return rows


BASELINE_DESCRIPTIONS = {
    "neuron": "the neuron with the best output score",
    "correlated_neuron": "the selected feature's best-correlated neuron",
    "diffmean": "the difference-of-means vector",
    "random": "the mean of the random features of the pool",
    "best_random": "the random feature of the pool with the best output score (the selection's own effect)",
}


def clamping_claims(verdict: pl.DataFrame, site: str) -> list[dict]:
    """The clamping claims at the headline site, over its real concepts (clamping/verdict.parquet): each
    feature selection against each baseline at equal KL, and beyond the placebo concepts, each by its
    Bonferroni interval over the site's tests (a hierarchical bootstrap over concepts and prompts); and
    the share of concepts moved monotonically against one half."""
    rows = []
    at_site = verdict.filter((pl.col("site") == site) & (pl.col("concepts") == "real"))
    # every test is a claim, one no concept could measure too (NaN, inconclusive): the same claims in every run
    tests = at_site.filter(pl.col("statistic").is_in(["mean_difference", "effect_beyond_placebo"]))
    family = (f"Bonferroni 95% interval over the site's {tests['p_holm'].is_not_null().sum()} tests, concepts and "
              "prompts resampled")
    for row in tests.iter_rows(named=True):
        selection, baseline = row["feature_selection"], row["baseline"]
        if row["statistic"] == "mean_difference":
            name = f"clamping.{site}.{selection}_feature_beats_{baseline}"
            statement = (f"the {selection}-selected feature at {site} moves its concept more than "
                         f"{BASELINE_DESCRIPTIONS[baseline]} at KL 0.1 ({row['n_concepts']} concepts; Holm p = "
                         f"{row['p_holm'] if row['p_holm'] is None else format(row['p_holm'], '.3g')})")
            statistic, against = (f"mean difference of relative effects (nats); {family}",
                                  f"{BASELINE_DESCRIPTIONS[baseline]}, clamped for the same concept, at equal KL")
        else:
            name = f"clamping.{site}.{selection}_feature_beyond_placebo"
            statement = (f"the {selection}-selected feature at {site} moves real concepts more than placebo concepts "
                         f"at KL 0.1 ({row['n_concepts']} concepts; Holm p = "
                         f"{row['p_holm'] if row['p_holm'] is None else format(row['p_holm'], '.3g')})")
            statistic, against = (f"mean relative effect, real minus placebo concepts (nats); {family}",
                                  "placebo concepts: random frequency-matched word sets, selected and measured alike")
        rows.append(claim(name, statement, statistic, row["value"], row["family_ci_low"], row["family_ci_high"], 0.0,
                          by_interval(row["family_ci_low"], row["family_ci_high"], 0.0), row["n_concepts"],
                          against=against))
    for row in at_site.filter(pl.col("statistic") == "monotone").iter_rows(named=True):
        rows.append(claim(f"clamping.{site}.{row['feature_selection']}_feature_monotone",
                          f"the {row['feature_selection']}-selected feature at {site} moves most concepts "
                          f"monotonically ({row['n_concepts']} concepts)", "share of concepts with Spearman >= threshold", row["value"],
                          row["ci_low"], row["ci_high"], 0.5, by_interval(row["ci_low"], row["ci_high"], 0.5),
                          row["n_concepts"], against="one half of the concepts"))
    return rows


def crosscoder_claims(metrics: pl.DataFrame, match_rates: pl.DataFrame, bounds: ClaimsSettings) -> list[dict]:
    """The crosscoder judged as an SAE, and its latents' match rate against a second seed's. From
    crosscoder/metrics.parquet, its rows (one per site) at their worst site, through `sae_claims` under the
    same bounds: the largest FVU, and the CE increase and KL by their largest value and interval ends
    (a bound holds when it holds at every site and fails when it fails at one), with its dead and dense
    shares. From crosscoder/match_rates.parquet, at the site whose SAE was trained again with another
    seed: the crosscoder's live latents' match rate to that SAE's features minus the second seed's
    features' rate (Newcombe interval), against 0. Cross-site latents are expected of residual snapshots
    (module crosscoder), so no claim is made about cross-layer features."""

    own = metrics.filter(pl.col("kind") == "crosscoder")
    worst = {"sae": "crosscoder (its worst site)", "fvu": own["fvu"].max(), "dead_fraction": own["dead_fraction"][0],
             "dense_fraction": own["dense_fraction"][0], "n_loss_windows": own["n_loss_windows"].min()}
    for column, source in (("ce_increase", "ce_increase"), ("kl_sae", "kl")):
        worst |= {column: own[source].max(), f"{column}_ci_low": own[f"{source}_ci_low"].max(),
                  f"{column}_ci_high": own[f"{source}_ci_high"].max()}
    rows = [{**row, "claim": "crosscoder." + row["claim"].rsplit(".", 1)[1]}
            for row in sae_claims(pl.DataFrame([worst]), bounds)]
    second = match_rates.filter(pl.col("dictionary") == "second seed").row(0, named=True)
    at_site = match_rates.filter(pl.col("site") == second["site"])
    crosscoder, chance = (at_site.filter(pl.col("dictionary") == d).row(0, named=True)
                          for d in ("crosscoder", "random directions"))
    low, high = share_difference_interval(crosscoder["n_matched"], crosscoder["n_units"], second["n_matched"],
                                          second["n_units"])
    rows.append(claim(f"crosscoder.{second['site']}_matches_beyond_second_seed",
                      f"the crosscoder's live latents match features of {second['site']}'s SAE (decoder cosine >= "
                      f"{second['match_cosine']:g}) more often than a second seed of that SAE does: "
                      f"{crosscoder['n_matched']} of {crosscoder['n_units']} against {second['n_matched']} of "
                      f"{second['n_units']} (random directions: {chance['match_rate']:.3f})",
                      "match rate (crosscoder) - match rate (second seed)",
                      crosscoder["match_rate"] - second["match_rate"], low, high, 0.0, by_interval(low, high, 0.0),
                      against=f"a second seed of {second['site']}'s SAE"))
    return rows


def toy_claims(recovery: pl.DataFrame) -> list[dict]:
    """The toy model's SAE (toy/sae_recovery.parquet: one row per planted feature, `recovered` when its
    one-to-one matched latent beats the chance threshold): the share of represented features recovered
    (Wilson interval) against the share a random direction reaches (1 - CHANCE_QUANTILE), and that
    share minus the share of unrepresented features recovered (Newcombe interval) against 0."""
    represented, unrepresented = (recovery.filter(pl.col("represented") == kind) for kind in (True, False))
    n_rep, hit_rep = represented.height, int(represented["recovered"].sum())
    n_un, hit_un = unrepresented.height, int(unrepresented["recovered"].sum())
    share_rep, share_un = hit_rep / n_rep if n_rep else float("nan"), hit_un / n_un if n_un else float("nan")
    chance = round(1 - CHANCE_QUANTILE, 12)  # 0.05, not 0.050000000000000044
    low, high = wilson_interval(hit_rep, n_rep)
    diff_low, diff_high = share_difference_interval(hit_rep, n_rep, hit_un, n_un)
    return [claim("toy.sae_recovers_represented_features",
                  f"an SAE on the toy's hidden layer recovers its represented features above chance ({hit_rep} of "
                  f"{n_rep}; a random direction beats the chance threshold with probability {chance:g})",
                  "share of represented features whose matched latent beats chance", share_rep, low, high, chance,
                  by_interval(low, high, chance), against="a random direction's best cosine to the decoder rows"),
            claim("toy.recovery_beyond_unrepresented",
                  f"it recovers the represented features more often than the unrepresented ones ({hit_rep} of {n_rep} "
                  f"against {hit_un} of {n_un})", "share recovered (represented) - share recovered (unrepresented)",
                  share_rep - share_un, diff_low, diff_high, 0.0, by_interval(diff_low, diff_high, 0.0),
                  against="the toy's unrepresented features")]


@dataclass(frozen=True)
class StudyTables:
    """What the claims are read from: each field a stage's output under results/<run>/ (its path in
    brackets), and the argument `--<field>` of this stage's entry point."""

    lens_summary: dict
    """the logit lens's summary (logit_lens/summary.json)"""
    first_layer: pl.DataFrame
    """each target's entry layer and depth trend against random tokens (logit_lens/first_layer.parquet)"""
    tuned_lens_kl: pl.DataFrame
    """held-out KL per lens and layer (tuned_lens/heldout_kl.parquet)"""
    sae_metrics: pl.DataFrame
    """one row per SAE (sae_eval/metrics.parquet)"""
    comparison: pl.DataFrame
    """features against neurons and controls (polysemanticity/comparison.parquet)"""
    clamping_verdict: pl.DataFrame
    """cross-concept statistics per site (clamping/verdict.parquet)"""
    crosscoder_metrics: pl.DataFrame
    """the crosscoder and the per-site SAEs, site by site (crosscoder/metrics.parquet)"""
    crosscoder_match_rates: pl.DataFrame
    """match rates to a site's SAE features (crosscoder/match_rates.parquet)"""
    toy_recovery: pl.DataFrame
    """each planted feature of the toy model and its matched latent (toy/sae_recovery.parquet)"""

    @classmethod
    def read(cls, paths: dict[str, str]) -> StudyTables:
        """Each field from its file: JSON for the summary, Parquet for the tables."""
        return cls(**{name: json.loads(Path(path).read_text()) if path.endswith(".json") else pl.read_parquet(path)
                      for name, path in paths.items()})


def study_claims(tables: StudyTables, headline_site: str, bounds: ClaimsSettings) -> pl.DataFrame:
    """Every claim of the study, one row each: claim, statement, statistic, value, ci_low, ci_high,
    bound, verdict, n_concepts (clamping claims only), against (the null or control; null for a
    tolerance or a quality bound)."""
    rows = [*lens_claims(tables.lens_summary, tables.first_layer), *tuned_lens_claims(tables.tuned_lens_kl),
            *sae_claims(tables.sae_metrics, bounds), *polysemanticity_claims(tables.comparison),
            *clamping_claims(tables.clamping_verdict, headline_site),
            *crosscoder_claims(tables.crosscoder_metrics, tables.crosscoder_match_rates, bounds),
            *toy_claims(tables.toy_recovery)]
    return pl.DataFrame(rows, schema_overrides={"ci_low": pl.Float64, "ci_high": pl.Float64, "n_concepts": pl.Int64,
                                               "against": pl.Utf8})


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `claims`: `python -m mechinterp.claims --help`."""
    parser = argparse.ArgumentParser(description="The study's claims with their statistics and verdicts.")
    fields = list(StudyTables.__dataclass_fields__)
    for name in fields:
        parser.add_argument(f"--{name.replace('_', '-')}", required=True)
    parser.add_argument("--headline-site", required=True, help="the site of clamping.sae")
    parser.add_argument("--settings", required=True, help="the config's `claims` section as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    tables = StudyTables.read({name: getattr(args, name) for name in fields})
    claims = study_claims(tables, args.headline_site, ClaimsSettings(**json.loads(args.settings)))
    write_parquet(claims, args.out)
    for verdict, n in claims.group_by("verdict").len().sort("verdict").iter_rows():
        log.info("%d claims %s", n, verdict)


if __name__ == "__main__":
    run_stage(main)
