"""A run's manifest, and the audit of a run against a reference manifest.

The manifest (`results/<run>/MANIFEST.json`) records what a run is: the sha256 of every result
file, the resolved config, the code version (git commit, dirty or not), Python and package
versions, device and threads, seeds, each job's wall time and peak memory (Snakemake's
`benchmark:` files), and the headline metric tables.

The audit compares two manifests: inputs and models exactly (sha256 of the downloads, the model
folder, the corpus and the tokens), metrics within the config's tolerances; everything else is
listed as information. It passes only when nothing is outside tolerance.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from mechinterp.errors import UserError
from mechinterp.files import sha256_file

PACKAGES = ("torch", "transformer-lens", "transformers", "safetensors", "numpy", "polars", "datasets", "seaborn",
            "papermill", "snakemake", "mechinterp")
EXACT_PREFIXES = ("downloads/", "model/", "corpus/", "tokens/")  # inputs and models: identical or the audit fails
UNCOMPARED_PREFIXES = ("logs/", "benchmarks/")  # differ on every run by nature; hashed, never compared
# The metric tables a manifest carries, with the columns that identify a row.
METRIC_TABLES = {
    "logit_lens/first_layer.parquet": ["prompt_id", "target"],
    "sae_eval/metrics.parquet": ["sae"],
    "polysemanticity/comparison.parquet": ["site", "sae", "score"],
    "clamping/summary.parquet": ["concept", "unit_kind", "unit"],
}
NOT_HASHED = ("MANIFEST.json", "audit.txt")
TIMING_SUFFIXES = ("seconds", "_per_s")  # run times are recorded under `jobs`, not audited as metrics


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and dirtiness of the workflow's checkout; nulls outside a git repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment(threads: int) -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "packages": versions, "device": device, "cpu_count": os.cpu_count(), "threads": threads}


def read_benchmarks(paths: list[Path], benchmark_dir: Path) -> dict[str, dict[str, float]]:
    """Wall time and peak memory of each job, from Snakemake's benchmark TSV files."""
    jobs = {}
    for path in sorted(paths):
        row = pl.read_csv(path, separator="\t").row(0, named=True)
        name = str(path.relative_to(benchmark_dir).with_suffix(""))
        jobs[name] = {"wall_s": float(row["s"]), "max_rss_mib": _number(row["max_rss"])}
    return jobs


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "-" where the platform could not measure it


def hash_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name = path.relative_to(run_dir).as_posix()
        if name in NOT_HASHED or ".partial-" in name:
            continue
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def metric_rows(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    tables = {}
    for name in METRIC_TABLES:
        if (run_dir / name).is_file():
            frame = pl.read_parquet(run_dir / name)
            tables[name] = frame.select([c for c in frame.columns if c in METRIC_TABLES[name] or (
                frame[c].dtype.is_numeric() and not c.endswith(TIMING_SUFFIXES))]).to_dicts()
    return tables


def build_manifest(run_dir: Path, config: dict[str, Any], repo: Path, benchmarks: list[Path], threads: int
                   ) -> dict[str, Any]:
    return {"run": config["run"], "config": config, "code": git_state(repo), "environment": environment(threads),
            "seeds": {"seed": config["seed"]}, "jobs": read_benchmarks(benchmarks, run_dir / "benchmarks"),
            "files": hash_files(run_dir), "metrics": metric_rows(run_dir)}


@dataclass
class AuditResult:
    matches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def report(self) -> str:
        lines = [f"AUDIT {'PASSED' if self.passed else 'FAILED'}: {len(self.matches)} match, "
                 f"{len(self.failures)} outside tolerance, {len(self.notes)} informational differences"]
        lines += [f"FAIL   {line}" for line in self.failures]
        lines += [f"NOTE   {line}" for line in self.notes]
        lines += [f"OK     {line}" for line in self.matches]
        return "\n".join(lines) + "\n"


def tolerance_for(tolerances: dict[str, Any], table: str, column: str) -> tuple[float, float]:
    """(relative, absolute) tolerance of a metric column: the table's entry for the column, else the
    table's default, else the global default."""
    per_table = tolerances.get("tables", {}).get(table, {})
    chosen = per_table.get(column, per_table.get("default", tolerances["default"]))
    return float(chosen["rel"]), float(chosen["abs"])


def _close(value: Any, reference: Any, rel: float, absolute: float) -> bool:
    if isinstance(reference, float) and math.isnan(reference):
        return isinstance(value, float) and math.isnan(value)
    if value is None or reference is None:
        return value is reference
    return abs(value - reference) <= max(absolute, rel * abs(reference))


def audit(manifest: dict[str, Any], reference: dict[str, Any], tolerances: dict[str, Any]) -> AuditResult:
    """Compare a run's manifest with a reference manifest."""
    result = AuditResult()
    for name, ref in sorted(reference["files"].items()):
        if name.startswith(UNCOMPARED_PREFIXES):
            continue
        mine = manifest["files"].get(name)
        exact = name.startswith(EXACT_PREFIXES)
        if mine is None:
            (result.failures if exact else result.notes).append(f"{name}: missing from this run")
        elif mine["sha256"] == ref["sha256"]:
            if exact:
                result.matches.append(f"{name}: sha256 identical")
        elif exact:
            result.failures.append(f"{name}: sha256 {mine['sha256'][:12]} differs from the reference {ref['sha256'][:12]}")
        else:
            result.notes.append(f"{name}: sha256 differs (checked through its metrics, if any)")
    for table, key in METRIC_TABLES.items():
        ref_rows = reference.get("metrics", {}).get(table)
        if ref_rows is None:
            continue
        mine = {tuple(row[k] for k in key): row for row in manifest.get("metrics", {}).get(table, [])}
        for ref_row in ref_rows:
            row_id = tuple(ref_row[k] for k in key)
            label = f"{table} [{', '.join(map(str, row_id))}]"
            if row_id not in mine:
                result.failures.append(f"{label}: row missing from this run")
                continue
            for column, ref_value in ref_row.items():
                if column in key or not isinstance(ref_value, int | float) or isinstance(ref_value, bool):
                    continue
                rel, absolute = tolerance_for(tolerances, table, column)
                value = mine[row_id].get(column)
                line = f"{label} {column}: {value!r} vs reference {ref_value!r} (tolerance rel {rel:g}, abs {absolute:g})"
                (result.matches if _close(value, ref_value, rel, absolute) else result.failures).append(line)
    for key in ("seeds",):
        if manifest.get(key) != reference.get(key):
            result.notes.append(f"{key}: {manifest.get(key)} vs reference {reference.get(key)}")
    for name, version in reference["environment"]["packages"].items():
        if manifest["environment"]["packages"].get(name) != version:
            result.notes.append(f"package {name}: {manifest['environment']['packages'].get(name)} vs reference {version}")
    if manifest["environment"]["device"] != reference["environment"]["device"]:
        result.notes.append(f"device: {manifest['environment']['device']} vs reference {reference['environment']['device']}")
    return result


def load_manifest(path: str | Path, role: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role} manifest {path} does not exist; build it with `snakemake {path}` "
                        "(or name another reference in audit.reference).")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{role} manifest {path} is not valid JSON ({err}); rebuild it.") from err
    for key in ("files", "metrics", "environment"):
        if key not in manifest:
            raise UserError(f"{role} manifest {path} has no {key!r} section; it is not a MANIFEST.json of this workflow.")
    return manifest
