"""The audit of a run against a reference: compares two manifests (mechinterp.manifest). Inputs and
models exactly (sha256 of the downloads, the model folder, the corpus and the tokens), metrics
within the config's tolerances; everything else is listed as information. It passes only when
nothing is outside tolerance."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path
from mechinterp.manifest import METRIC_TABLES

EXACT_PREFIXES = ("downloads/", "model/", "corpus/", "tokens/")  # inputs and models: identical or the audit fails
UNCOMPARED_PREFIXES = ("logs/", "benchmarks/")  # differ on every run by nature; hashed, never compared


@dataclass(frozen=True)
class AuditSettings:
    """The config's `audit` section (defaults: workflow/schemas/config.schema.yaml)."""

    reference: str | None
    """path of the reference MANIFEST.json (relative to the repository root); None for none"""
    tolerances: dict[str, Any]
    """`default` {rel, abs}, and per table a `default` and per-column {rel, abs}"""


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
    if manifest.get("seeds") != reference.get("seeds"):
        result.notes.append(f"seeds: {manifest.get('seeds')} vs reference {reference.get('seeds')}")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of rule `audit`: `python -m mechinterp.audit --help`. Exit status 1 when anything is
    outside tolerance."""
    parser = argparse.ArgumentParser(description="Compare a run's manifest with a reference; exit 1 when outside tolerance.")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--settings", required=True, help="the config's `audit` section as JSON")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    result = audit(load_manifest(args.manifest, "this run's"), load_manifest(args.reference, "the reference"),
                   AuditSettings(**json.loads(args.settings)).tolerances)
    sys.stdout.write(result.report())
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    run_stage(main)
