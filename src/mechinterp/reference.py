"""Make a reference from a finished run: `python -m mechinterp.reference results/<run> --out reference/<run>`.

The run must be complete (`snakemake --cores all`, then `snakemake --cores all replicates`). The folder
gets the run's MANIFEST.json (config, code version, machine: CPU, device, packages; every file's
sha256; the metric tables and claims) and its replicates' spread (`replicates/spread.parquet`,
`replicates/claims.parquet`), which set the audit's tolerances. The folder is replaced whole, or not
at all; a folder that holds anything else (a run, say) is never replaced unless `--replace` asks for it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import polars as pl

from mechinterp.audit import REFERENCE_CLAIMS, REFERENCE_MANIFEST, REFERENCE_SPREAD, load_manifest
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path
from mechinterp.manifest import CLAIMS_TABLE

log = logging.getLogger(__name__)


def check_replicates_match(manifest: dict, claims: pl.DataFrame, run_dir: Path) -> None:
    """The replicates' record of the main seed must be the run's own claims: else one of them is stale."""
    seed = manifest["config"]["seed"]
    recorded = {row["claim"]: (row["verdicts"][row["seeds"].index(seed)] if seed in row["seeds"] else None)
                for row in claims.iter_rows(named=True)}
    run = {row["claim"]: row["verdict"] for row in manifest["metrics"].get(CLAIMS_TABLE, [])}
    if recorded != run:
        differing = sorted(k for k in set(recorded) | set(run) if recorded.get(k) != run.get(k))
        raise UserError(f"{run_dir}/{REFERENCE_CLAIMS} does not match the run's claims for seed {seed} "
                        f"({', '.join(differing[:5])}): the replicates or the manifest are stale. Rerun "
                        f"`snakemake --cores all replicates` and `snakemake --cores all` for this config.")


REFERENCE_FILES = (REFERENCE_MANIFEST, REFERENCE_SPREAD, REFERENCE_CLAIMS)


def check_out(run_dir: Path, out: Path, replace: bool) -> None:
    """`out` may be replaced only if it is apart from the run and is absent or a reference (nothing but
    REFERENCE_FILES), unless `replace`: a tool deletes only what it made."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents or run in target.parents:
        raise UserError(f"--out {out} overlaps the run {run_dir}: making the reference would replace the run's files. "
                        f"Write it elsewhere, e.g. --out reference/{run.name}.")
    if not target.exists() or replace:
        return
    if not target.is_dir():
        raise UserError(f"--out {out} is a file, not a reference folder: choose another path, or pass --replace "
                        f"to replace it.")
    found = {str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir()}
    foreign = sorted(found - set(REFERENCE_FILES))
    if foreign:
        raise UserError(f"--out {out} exists and is not a reference (it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): it would be replaced whole. Choose another folder, "
                        f"or pass --replace to replace it.")


def make_reference(run_dir: Path, out: Path, replace: bool = False) -> dict:
    """Copy a finished run's manifest and replicates' spread into the reference folder `out` (check_out)."""
    check_out(run_dir, out, replace)
    manifest = load_manifest(run_dir / REFERENCE_MANIFEST, "the run's")
    missing = [name for name in (REFERENCE_SPREAD, REFERENCE_CLAIMS) if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir} has no {' or '.join(missing)}: run `snakemake --cores all replicates` "
                        f"with this run's config first (the seed-to-seed spread sets the audit's tolerances).")
    check_replicates_match(manifest, pl.read_parquet(run_dir / REFERENCE_CLAIMS), run_dir)
    if manifest["code"].get("dirty"):
        log.warning("the run was made from a checkout with uncommitted changes (commit %s)", manifest["code"]["commit"])
    with atomic_path(out) as tmp:
        (tmp / "replicates").mkdir(parents=True)
        for name in REFERENCE_FILES:
            shutil.copyfile(run_dir / name, tmp / name)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m mechinterp.reference --help`."""
    parser = argparse.ArgumentParser(description="Make a reference folder from a finished run and its replicates.")
    parser.add_argument("run_dir", type=Path, help="the finished run, e.g. results/default")
    parser.add_argument("--out", type=Path, required=True, help="the reference folder, e.g. reference/default")
    parser.add_argument("--replace", action="store_true",
                        help="replace --out even if it holds more than a reference's files")
    args = parser.parse_args(argv)
    manifest = make_reference(args.run_dir, args.out, args.replace)
    env = manifest["environment"]
    log.info("reference %s: run %r, commit %s, %s (%s, %d threads), seeds %s", args.out, manifest["config"]["run"],
             manifest["code"]["commit"], env.get("cpu"), env["device"], env["threads"],
             pl.read_parquet(args.out / REFERENCE_CLAIMS)["seeds"][0].to_list())


if __name__ == "__main__":
    run_stage(main)
