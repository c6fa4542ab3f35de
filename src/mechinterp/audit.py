"""The audit of a run against a reference (`snakemake --cores all audit`, or
`python -m mechinterp.audit --manifest M --reference DIR` for a results folder copied from elsewhere).

A reference is a folder made by `python -m mechinterp.reference`: a run's MANIFEST.json and its
replicates' spread (`replicates/spread.parquet`, `replicates/claims.parquet`). The audit passes when

- the config is the reference's (else it refuses: there is nothing to compare);
- the run beside the manifest is the one it hashed (each file there, of its size) and every stage
  output verifies (an SAE loads, an array's header matches its size);
- the inputs and models are identical (sha256 of the downloads, the model folder, the corpus, the tokens);
- every claim agrees: a robust claim must have the reference's verdict; a fragile one's statistic must
  be within its tolerance. A claim is robust when its verdict was the same in every seed of the
  reference's replicates and, in every seed, its interval stayed farther from changing that verdict
  than a new draw of its statistic would move: the half-width of the 95% prediction interval from the
  n seeds, t(0.975, n - 1) x sqrt(1 + 1/n) x their standard deviation (with four seeds, 3.6 sd). Else
  another seed, or another CPU's rounding, which moves the SAE draw as a seed does, could flip it, and
  only its statistic is a fact about the run;
- every metric is within tolerance: `spread_multiple` seed standard deviations (the larger of the
  row's own and its column's median, so one lucky row of three seeds does not make a tolerance of
  zero), widened for the few seeds it comes from as a t prediction interval is (by t(0.975, n - 1) x
  sqrt(1 + 1/n) / 1.96: 1.82 with four seeds), never less than the `floor` (and `count_floor` for counts).

Some rows are reported beside their tolerance but not audited, because another seed does not measure
the same quantity again: a clamping summary row is one concept's unit, which each SAE chooses anew; a
polysemanticity comparison within matched activity is over the units of the activity bins that hold
enough of both kinds, which change with the SAE draw (225 residual dimensions in one seed, 15 in the
next: its claim, judged as above, is what is audited); a clamping statistic over fewer than
`min_concepts` concepts moves in steps too coarse for the spread of a few seeds (over 2 concepts a
share is 0, 0.5 or 1), and so does a clamping claim over so few concepts. P-values are reported, not
audited: they are functions of a statistic and its interval, which are, and near 1 they saturate.

Everything else (other files' hashes, packages, device, CPU) is listed as information.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl

from mechinterp.errors import UserError, rebuild_hint, run_stage
from mechinterp.files import atomic_path
from mechinterp.manifest import CLAIMS_TABLE, METRIC_TABLES, artifact_problems, is_metric_value
from mechinterp.replicates import row_id

EXACT_PREFIXES = ("downloads/", "model/", "corpus/", "tokens/")  # inputs and models: identical or the audit fails
# The fetch's provenance record (source path, transformers version, settings): the model files it lists
# are compared one by one; the record itself is information.
RECORDS = ("model/SOURCE.json",)
UNCOMPARED_PREFIXES = ("logs/", "benchmarks/")  # differ on every run by nature; hashed, never compared
# config keys a rerun may change and still be audited against the reference: its name, the stochastic
# stages' seed, the device and the jobs' resources (threads change float rounding only), how it is
# audited and replicated, and how its results are browsed (the browser shows numbers the audit compares,
# and makes none). The toy model, the crosscoder and the tuned lens are not free: the claims judge them.
FREE_CONFIG_KEYS = ("run", "seed", "device", "resources", "audit", "replicates", "browser")
REPORTED_COLUMNS = ("p_value", "p_holm")  # functions of audited statistics and intervals
# Student's t(0.975, df) for df = 1..10; beyond, the normal quantile with Fisher's first correction
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
REFERENCE_MANIFEST = "MANIFEST.json"
REFERENCE_SPREAD = "replicates/spread.parquet"
REFERENCE_CLAIMS = "replicates/claims.parquet"


@dataclass(frozen=True)
class AuditSettings:
    """The config's `audit` section (defaults: workflow/schemas/config.schema.yaml)."""

    reference: str | None
    """the reference folder (MANIFEST.json, replicates/), relative to the repository root; None for none"""
    spread_multiple: float
    """a metric's tolerance in seed standard deviations"""
    floor: dict[str, float]
    """the smallest tolerance, {rel, abs}: max(abs, rel * |reference|)"""
    count_floor: float
    """the smallest tolerance of an integer metric"""
    min_concepts: int
    """a clamping verdict row or claim over fewer concepts is reported, not audited"""


@dataclass(frozen=True)
class Reference:
    """A reference folder, loaded: the run's manifest and, when it was made with replicates, the
    seed-to-seed spread of every metric and each claim's verdict per seed."""

    manifest: dict[str, Any]
    spread: pl.DataFrame | None
    claims: pl.DataFrame | None

    @classmethod
    def load(cls, folder: str | Path) -> Reference:
        folder = Path(folder)
        if folder.is_file():
            raise UserError(f"the reference {folder} is a file; a reference is a folder (MANIFEST.json and "
                            "replicates/) made by `python -m mechinterp.reference RUN_DIR --out FOLDER`.")
        manifest = load_manifest(folder / REFERENCE_MANIFEST, "the reference")
        spread_path, claims_path = folder / REFERENCE_SPREAD, folder / REFERENCE_CLAIMS
        if spread_path.is_file() != claims_path.is_file():
            raise UserError(f"the reference {folder} has only one of {REFERENCE_SPREAD} and {REFERENCE_CLAIMS}; "
                            "remake it with `python -m mechinterp.reference`.")
        if not spread_path.is_file():
            return cls(manifest, None, None)
        return cls(manifest, pl.read_parquet(spread_path), pl.read_parquet(claims_path))


class Tolerances:
    """Each metric's tolerance from the reference's seed-to-seed spread (see the module docstring)."""

    def __init__(self, spread: pl.DataFrame | None, settings: AuditSettings):
        self.settings = settings
        self.sd: dict[tuple[str, str, str], float] = {}
        self.n_seeds: dict[tuple[str, str, str], int] = {}
        self.column_sd: dict[tuple[str, str], float] = {}
        self.mixed: set[tuple[str, str, str]] = set()  # NaN in some seeds, a number in others
        if spread is not None:
            self.mixed = {(t, r, c) for t, r, c in spread.filter((pl.col("n_nan") > 0) & (pl.col("n_seeds") > 0))
                          .select("table", "row", "column").iter_rows()}
            known = spread.filter(pl.col("sd").is_not_nan())
            self.sd = {(t, r, c): sd for t, r, c, sd in known.select("table", "row", "column", "sd").iter_rows()}
            self.n_seeds = {(t, r, c): n for t, r, c, n in known.select("table", "row", "column", "n_seeds").iter_rows()}
            self.column_sd = {(t, c): m for t, c, m in known.group_by("table", "column")
                              .agg(pl.col("sd").median()).iter_rows()}

    def nan_or_number(self, table: str, row: str, column: str) -> bool:
        """Whether the replicates gave this metric NaN in some seeds and a number in others: then NaN
        against a number is within what seeds do."""
        return (table, row, column) in self.mixed

    def __call__(self, table: str, row: str, column: str, reference: float, integer: bool) -> tuple[float, str]:
        """(tolerance, how it was set) of one metric."""
        if math.isnan(reference):
            return math.nan, "NaN or a number" if self.nan_or_number(table, row, column) else "NaN only"
        floor = max(self.settings.floor["abs"], self.settings.floor["rel"] * abs(reference),
                    self.settings.count_floor if integer else 0.0)
        sd = max(self.sd.get((table, row, column), 0.0), self.column_sd.get((table, column), 0.0))
        # a standard deviation from a few seeds underestimates: widen it as a t prediction interval does
        n = self.n_seeds.get((table, row, column), 0)
        small_sample = prediction_half_width(1.0, n) / 1.959964 if n >= 2 else 1.0
        spread = self.settings.spread_multiple * sd * small_sample
        how = f"{self.settings.spread_multiple:g} x sd {sd:.3g} x {small_sample:.2f} for {n} seeds"
        return (spread, how) if spread > floor else (floor, "floor")


@dataclass
class AuditResult:
    matches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)  # one line per claim: reference | this run
    counts: dict[str, list[int]] = field(default_factory=lambda: {"inputs": [0, 0], "claims": [0, 0], "metrics": [0, 0]})
    reported: list[int] = field(default_factory=lambda: [0, 0])  # metrics reported, not audited: [within, all]

    @property
    def passed(self) -> bool:
        return not self.failures

    def count(self, kind: str, ok: bool) -> None:
        self.counts[kind][0] += ok
        self.counts[kind][1] += 1

    def report(self) -> str:
        summary = "; ".join(f"{kind} {ok} of {n} agree" for kind, (ok, n) in self.counts.items())
        within, n = self.reported
        lines = [f"AUDIT {'PASSED' if self.passed else 'FAILED'}: {summary}; {len(self.failures)} failures; "
                 f"reported, not audited: {n} metrics, {n - within} of them outside the seeds' spread"]
        lines += [f"FAIL   {line}" for line in self.failures]
        lines += ["", "CLAIMS: reference | this run", *self.claims, ""]
        lines += [f"NOTE   {line}" for line in self.notes]
        lines += [f"OK     {line}" for line in self.matches]
        return "\n".join(lines) + "\n"


def config_differences(mine: Any, reference: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two resolved configs differ."""
    if isinstance(mine, dict) and isinstance(reference, dict):
        return [d for key in sorted(set(mine) | set(reference))
                for d in config_differences(mine.get(key), reference.get(key), f"{prefix}{key}.")]
    return [] if mine == reference else [prefix.rstrip(".")]


def check_same_config(manifest: dict[str, Any], reference: dict[str, Any]) -> None:
    mine = {k: v for k, v in manifest["config"].items() if k not in FREE_CONFIG_KEYS}
    theirs = {k: v for k, v in reference["config"].items() if k not in FREE_CONFIG_KEYS}
    differences = config_differences(mine, theirs)
    if differences:
        shown = ", ".join(differences[:8]) + (f" and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise UserError(f"the reference was made with another config (run {reference['config'].get('run')!r}); "
                        f"they differ at {shown}. Audit a run of the reference's config, or make a reference "
                        "from a run of this config with `python -m mechinterp.reference`.")


def _close(value: Any, reference: Any, tolerance: float, nan_or_number: bool) -> bool:
    """Whether a metric matches: within `tolerance`; NaN only against NaN unless the seeds gave both."""
    if value is None or reference is None:
        return value is reference
    value_nan, reference_nan = math.isnan(value), math.isnan(reference)
    if value_nan or reference_nan:
        return nan_or_number or (value_nan and reference_nan)
    return abs(value - reference) <= tolerance


def audit_files(manifest: dict[str, Any], reference: dict[str, Any], result: AuditResult) -> None:
    for name, ref in sorted(reference["files"].items()):
        if name.startswith(UNCOMPARED_PREFIXES):
            continue
        mine = manifest["files"].get(name)
        exact = name.startswith(EXACT_PREFIXES) and name not in RECORDS
        if exact:
            result.count("inputs", mine is not None and mine["sha256"] == ref["sha256"])
        if mine is None:
            (result.failures if exact else result.notes).append(f"{name}: missing from this run")
        elif mine["sha256"] == ref["sha256"]:
            if exact:
                result.matches.append(f"{name}: sha256 identical")
        elif exact:
            result.failures.append(f"{name}: sha256 {mine['sha256'][:12]} differs from the reference {ref['sha256'][:12]}")
        elif name in RECORDS:
            result.notes.append(f"{name}: differs (a record of the fetch; the model files it lists are compared)")
        else:
            result.notes.append(f"{name}: sha256 differs (checked through its metrics, if any)")


def audit_run_files(manifest: dict[str, Any], run_dir: Path, result: AuditResult) -> None:
    """The run beside the manifest is still the one it describes: every file it hashed is there with
    its recorded size, and every stage output verifies (an SAE loads, an array's header matches its
    size). A manifest copied without its run is noted and compared on its own."""
    files, artifacts = manifest["files"], manifest.get("artifacts", [])
    root = run_dir.resolve()
    # a link inside the run may still point out of it: such a name is a failure, never opened
    escaping = sorted(name for name in {*files, *artifacts} if root not in (run_dir / name).resolve().parents)
    if escaping:
        result.failures += [f"{name}: resolves outside the run {run_dir} (a link out of it); not read" for name in escaping]
        files = {name: entry for name, entry in files.items() if name not in escaping}
        artifacts = [name for name in artifacts if name not in escaping]
    if not any((run_dir / name).is_file() for name in files):
        result.notes.append(f"no file of the run beside the manifest ({run_dir}): only the manifest is compared")
        return
    # logs and benchmarks are left out: the manifest's own log is written after it hashed the run
    changed = {name: "missing" if not (run_dir / name).is_file() else "size differs"
               for name, entry in files.items() if not name.startswith(UNCOMPARED_PREFIXES)
               and (not (run_dir / name).is_file() or (run_dir / name).stat().st_size != entry["bytes"])}
    broken = {name: "; ".join(problems) for name in artifacts if (problems := artifact_problems(run_dir / name))}
    result.failures += [f"{name}: {why} since the manifest was written" for name, why in sorted(changed.items())]
    result.failures += [f"{name}: {why}" for name, why in sorted(broken.items())]
    # what to delete: the stage output a file belongs to (an SAE or model folder), else the file
    owners = {next((a for a in artifacts if name == a or name.startswith(f"{a}/")), name) for name in changed}
    if owners or broken:
        result.failures.append(rebuild_hint(*(run_dir / name for name in sorted(owners | set(broken)))))


def reported_only(table: str, row: dict[str, Any], settings: AuditSettings, column: str | None = None) -> str | None:
    """Why a metric row (or one of its columns) is reported but not audited (see the module docstring), or None."""
    if table == "clamping/summary.parquet":
        return "one concept's unit, chosen anew by each SAE"
    if table == "polysemanticity/comparison.parquet" and row.get("score") == "monosemanticity_matched":
        return "over the units of the matched activity bins, which change with the SAE draw; its claim is audited"
    if column in REPORTED_COLUMNS:
        return "a p-value, a function of the audited statistic and interval"
    n_concepts = row.get("n_concepts")  # of a clamping verdict row or claim
    if n_concepts is not None and n_concepts < settings.min_concepts:
        return f"{n_concepts} concepts, under audit.min_concepts"
    return None


def audit_metrics(manifest: dict[str, Any], reference: dict[str, Any], tolerances: Tolerances,
                  result: AuditResult) -> None:
    for table, key in METRIC_TABLES.items():
        ref_rows = reference.get("metrics", {}).get(table)
        if ref_rows is None or table == CLAIMS_TABLE:
            continue
        mine = {tuple(row[k] for k in key): row for row in manifest.get("metrics", {}).get(table, [])}
        for ref_row in ref_rows:
            row_key = tuple(ref_row[k] for k in key)
            label = f"{table} [{', '.join(map(str, row_key))}]"
            if row_key not in mine:
                result.count("metrics", False)
                result.failures.append(f"{label}: row missing from this run")
                continue
            for column, ref_value in ref_row.items():
                if column in key or not is_metric_value(ref_value):
                    continue
                row = row_id(table, ref_row)
                tolerance, how = tolerances(table, row, column, ref_value, isinstance(ref_value, int))
                value = mine[row_key].get(column)
                ok = _close(value, ref_value, tolerance, tolerances.nan_or_number(table, row, column))
                line = f"{label} {column}: {value!r} vs reference {ref_value!r} (tolerance {tolerance:.3g}, {how})"
                if reason := reported_only(table, ref_row, tolerances.settings, column):
                    result.reported[0] += ok
                    result.reported[1] += 1
                    if not ok:
                        result.notes.append(f"{line}; reported, not audited: {reason}")
                    continue
                result.count("metrics", ok)
                (result.matches if ok else result.failures).append(line)


def _claim_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "missing"
    interval = "" if row.get("ci_low") is None or math.isnan(row["ci_low"]) else \
        f" [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
    return f"{row['verdict']} {row['value']:.4g}{interval}"


def prediction_half_width(sd: float, n: int) -> float:
    """Half-width of the 95% prediction interval of one new draw from n draws with standard deviation sd:
    t(0.975, n - 1) x sqrt(1 + 1/n) x sd; 0 for a statistic the seeds did not move (sd 0 or NaN).

    >>> round(prediction_half_width(1.0, 4), 3)
    3.558
    """
    if n < 2 or not sd > 0:
        return 0.0
    df = n - 1
    t = T_975[df - 1] if df <= len(T_975) else 1.959964 * (1 + 1 / (4 * df))
    return t * math.sqrt(1 + 1 / n) * sd


def half_width(claim: dict[str, Any]) -> float:
    """Half the width of a claims row's interval; 0 without one."""
    low, high = claim.get("ci_low"), claim.get("ci_high")
    return 0.0 if low is None or high is None or math.isnan(low) or math.isnan(high) else (high - low) / 2


def claim_robustness(seeds: dict[str, Any] | None, sd: float, reference: dict[str, Any]) -> tuple[bool, str]:
    """Whether a claim's verdict is audited (robust) or its statistic (fragile), and why, from its row of the
    reference's replicates/claims.parquet (None: the reference has no replicates, every verdict is audited),
    its statistic's standard deviation over the seeds and its `reference` claims row. A statistic the seeds
    did not move (its stage is not rerun by the replicates: the lenses, the crosscoder, the toy model) has no
    measured spread; a retrain elsewhere is taken to move it as much as its own interval's half-width."""
    if seeds is None:
        return True, "no replicates"
    if not seeds["stable"]:
        return False, f"fragile, unstable: {seeds['counts']}"
    replicated = sd > 0
    needed = prediction_half_width(sd, len(seeds["seeds"])) if replicated else half_width(reference)
    moved = "a new draw's" if replicated else "its half-width (not replicated)"
    if seeds["margin"] > needed:
        return True, f"robust: {seeds['counts']}, margin {seeds['margin']:.3g} > {moved} {needed:.3g}"
    return False, f"fragile: {seeds['counts']}, margin {seeds['margin']:.3g} <= {moved} {needed:.3g}"


def audit_claims(manifest: dict[str, Any], reference: Reference, tolerances: Tolerances, result: AuditResult) -> None:
    ref_claims = reference.manifest["metrics"].get(CLAIMS_TABLE, [])
    mine = {row["claim"]: row for row in manifest["metrics"].get(CLAIMS_TABLE, [])}
    stability = ({} if reference.claims is None else
                 {r["claim"]: r for r in reference.claims.select("claim", "seeds", "stable", "margin", "counts")
                  .iter_rows(named=True)})
    for ref in ref_claims:
        name, row = ref["claim"], mine.get(ref["claim"])
        seeds = stability.get(name)
        reason = reported_only(CLAIMS_TABLE, ref, tolerances.settings)
        claim_row = row_id(CLAIMS_TABLE, ref)
        sd = tolerances.sd.get((CLAIMS_TABLE, claim_row, "value"), 0.0)
        robust, basis = claim_robustness(seeds, sd, ref)
        if row is None:
            ok, why = False, "missing from this run"
        elif robust:
            ok = row["verdict"] == ref["verdict"]
            why = f"verdict {'matches' if ok else 'differs'} ({basis})"
        else:
            tolerance, how = tolerances(CLAIMS_TABLE, claim_row, "value", ref["value"], False)
            if not sd > 0 and half_width(ref) > tolerance:  # not replicated: its interval is the spread known
                tolerance, how = half_width(ref), "its half-width (not replicated)"
            ok = _close(row["value"], ref["value"], tolerance, tolerances.nan_or_number(CLAIMS_TABLE, claim_row, "value"))
            why = f"{basis}: statistic {'within' if ok else 'outside'} {tolerance:.3g} ({how})"
        line = f"{name}: {_claim_text(ref)} | {_claim_text(row)}; {why}"
        if reason and row is not None:
            result.claims.append(f"{'OK  ' if ok else 'DIFF'}   {line}; reported, not audited: {reason}")
            continue
        result.count("claims", ok)
        result.claims.append(f"{'OK  ' if ok else 'FAIL'}   {line}")
        if not ok:
            result.failures.append(f"claim {line}")
    for name in sorted(set(mine) - {r["claim"] for r in ref_claims}):
        result.notes.append(f"claim {name}: not in the reference")


def audit(manifest: dict[str, Any], reference: Reference, settings: AuditSettings, run_dir: Path | None = None
          ) -> AuditResult:
    """Compare a run's manifest with a reference (raises UserError when their configs differ); with
    `run_dir`, the folder the manifest describes, check its files first."""
    check_same_config(manifest, reference.manifest)
    result = AuditResult()
    tolerances = Tolerances(reference.spread, settings)
    if reference.spread is None:
        result.notes.append("the reference has no replicates: tolerances are the floor and every claim's verdict "
                            "must match; make it from a run with `snakemake replicates` done")
    if run_dir is not None:
        audit_run_files(manifest, run_dir, result)
    audit_files(manifest, reference.manifest, result)
    audit_claims(manifest, reference, tolerances, result)
    audit_metrics(manifest, reference.manifest, tolerances, result)
    ref = reference.manifest
    if manifest.get("seeds") != ref.get("seeds"):
        result.notes.append(f"seeds: {manifest.get('seeds')} vs reference {ref.get('seeds')}")
    for name, version in ref["environment"]["packages"].items():
        if manifest["environment"]["packages"].get(name) != version:
            result.notes.append(f"package {name}: {manifest['environment']['packages'].get(name)} vs reference {version}")
    for key in ("device", "cpu", "rounding"):
        if manifest["environment"].get(key) != ref["environment"].get(key):
            result.notes.append(f"{key}: {manifest['environment'].get(key)} vs reference {ref['environment'].get(key)}")
    return result


def load_manifest(path: str | Path, role: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role} manifest {path} does not exist; build it with `snakemake {path}` "
                        "(or name another reference in audit.reference).")
    try:
        manifest = json.loads(path.read_text(), parse_int=bounded_int)
    except json.JSONDecodeError as err:
        raise UserError(f"{role} manifest {path} is not valid JSON ({err}); rebuild it.") from err
    except ValueError as err:  # bounded_int's
        raise UserError(f"{role} manifest {path}: {err}; it was edited or is not this workflow's. Rebuild it.") from None
    for key, kind in (("files", dict), ("metrics", dict), ("environment", dict), ("config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"{role} manifest {path} has no {key!r} section (an object); it is not a MANIFEST.json of "
                            "this workflow.")
    if not isinstance(manifest.get("artifacts", []), list):
        raise UserError(f"{role} manifest {path}: 'artifacts' is not a list; it is not a MANIFEST.json of this workflow.")
    for key, names in (("files", manifest["files"]), ("artifacts", manifest.get("artifacts", []))):
        for name in names:
            if not is_run_relative(name):
                raise UserError(f"{role} manifest {path} names {name!r} under {key!r}: a manifest names only paths "
                                "inside its run (relative, no '..'). It was edited or is not this workflow's; "
                                "remake it with `snakemake <run>/MANIFEST.json`.")
    return manifest


def bounded_int(text: str) -> int:
    """An integer of a manifest: a count or a size, which a float compares with (10**400 would overflow)."""
    value = int(text)
    if abs(value) >= 2**63:
        raise ValueError(f"the integer {text[:20]}{'...' if len(text) > 20 else ''} is beyond 64 bits")
    return value


def is_run_relative(name: object) -> bool:
    """Whether a manifest's file name stays inside the run: a relative path without '..' (a manifest comes from
    another machine; what it names is opened and its fix names it for deletion).

    >>> [is_run_relative(n) for n in ("saes/x/cfg.json", "../x", "/etc/passwd", "a/../../b", "", 3)]
    [True, False, False, False, False, False]
    """
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def default_settings() -> dict[str, Any]:
    """The `audit` section of the embedded default config (for auditing a copied results folder)."""
    from mechinterp.config import load_default_config

    return load_default_config()["audit"]


def audit_settings(given: str | None) -> AuditSettings:
    """--settings as JSON laid over the default config's `audit` section (a partial section keeps the rest)."""
    try:
        section = json.loads(given) if given else {}
    except json.JSONDecodeError as err:
        raise UserError(f"--settings is not valid JSON ({err}); give the `audit` section as a JSON object.") from None
    if not isinstance(section, dict):
        raise UserError("--settings is not a JSON object; give the `audit` section, e.g. '{\"spread_multiple\": 4}'.")
    known = {f.name for f in fields(AuditSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UserError(f"--settings: {', '.join(unknown)} is not a setting of the audit (it has {', '.join(sorted(known))}).")
    return AuditSettings(**{**default_settings(), **section})


def main(argv: list[str] | None = None) -> int:
    """Entry point of rule `audit_report`: `python -m mechinterp.audit --help`. Exit status 1 when the
    audit fails (unless --exit-zero), 2 when it cannot be made (another config, a missing reference)."""
    parser = argparse.ArgumentParser(description="Audit a run's MANIFEST.json against a reference folder.")
    parser.add_argument("--manifest", required=True, help="results/<run>/MANIFEST.json of the run (copied or not)")
    parser.add_argument("--reference", required=True, help="the reference folder, e.g. reference/default")
    parser.add_argument("--settings", help="the `audit` section as JSON (default: config/default.yaml's)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--exit-zero", action="store_true",
                        help="exit 0 when the audit fails too (the report says which); 2 still when it cannot be made")
    args = parser.parse_args(argv)
    result = audit(load_manifest(args.manifest, "this run's"), Reference.load(args.reference),
                   audit_settings(args.settings), Path(args.manifest).parent)
    sys.stdout.write(result.report())
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(result.report())
    return 0 if result.passed or args.exit_zero else 1


if __name__ == "__main__":
    run_stage(main)
