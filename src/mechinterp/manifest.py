"""A run's manifest (`results/<run>/MANIFEST.json`): what a run is. The sha256 of every result
file (each stage output verified first: see `artifact_problems`), the resolved config, the code
version (git commit, dirty or not), Python and package versions and the lock file they were
installed from, device and threads, seeds, each job's wall time and peak memory (Snakemake's
`benchmark:` files), and the headline metric tables. `mechinterp.audit` compares two manifests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mechinterp.errors import UserError, rebuild_hint, run_stage
from mechinterp.files import sha256_file, write_json

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformer-lens", "transformers", "safetensors", "numpy", "polars", "datasets", "seaborn",
            "papermill", "snakemake", "mechinterp")
# Settings that change the last bits of torch's and MKL's kernels: a run made under them emulates another CPU's
# rounding, which the manifest records beside the CPU it ran on.
ROUNDING_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")
# The metric tables a manifest carries, with the columns that identify a row.
METRIC_TABLES = {
    "logit_lens/first_layer.parquet": ["prompt_id", "target"],
    "sae_eval/metrics.parquet": ["sae"],
    "polysemanticity/comparison.parquet": ["site", "sae", "baseline", "score"],
    "clamping/summary.parquet": ["concept", "site", "unit_kind", "selection"],
    "clamping/verdict.parquet": ["site", "feature_selection", "concepts", "statistic", "baseline"],
    "claims.parquet": ["claim"],
}
CLAIMS_TABLE = "claims.parquet"  # its `verdict` is carried too: the audit compares the claims' verdicts
NOT_HASHED = ("MANIFEST.json", "audit.txt")
NOT_HASHED_DIRS = ("replicates/",)  # other seeds' stages: summarised by the replicates stage, not part of the run
TIMING_SUFFIXES = ("seconds", "_per_s")  # run times are recorded under `jobs`, not audited as metrics


def is_metric_value(value: Any) -> bool:
    """Whether a metric row's value is a number the replicates and the audit compare (not a bool or text)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


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
            "cpu": cpu_model(), "rounding": {name: os.environ.get(name) for name in ROUNDING_VARIABLES},
            "packages": versions, "device": device, "cpu_count": os.cpu_count(), "threads": threads}


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC 7763 64-Core Processor"): speed and last-bit results depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        if name in NOT_HASHED or name.startswith(NOT_HASHED_DIRS) or ".partial-" in name:
            continue
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def npy_problem(path: Path) -> str | None:
    """Whether a .npy file's header reads and its size is what the header says."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, _, dtype = readers[version](handle)
            expected = handle.tell() + int(np.prod(shape)) * dtype.itemsize
    except (ValueError, KeyError, OSError) as err:
        return f"not a readable .npy array ({err})"
    size = path.stat().st_size
    return None if size == expected else f"{size} bytes, but its header {list(shape)} {dtype} needs {expected}"


def file_problem(path: Path) -> str | None:
    """What is wrong with one output file by its kind (None if it reads): an array's header must match
    its size; a table's footer, a JSON file, a safetensors header and a wheel must read."""
    try:
        if path.suffix == ".npy":
            return npy_problem(path)
        if path.suffix == ".parquet":
            pl.read_parquet_schema(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="np") as handle:
                handle.keys()
        elif path.suffix == ".whl":
            import zipfile

            zipfile.ZipFile(path).close()
    except Exception as err:  # noqa: BLE001 - any failure to read is the problem reported
        return f"cannot be read ({type(err).__name__}: {err})"
    return None


def artifact_problems(artifact: Path, hashes: dict[str, str] | None = None) -> list[str]:
    """What is wrong with one stage output (a file or a folder): each file by its kind, an SAE folder
    must load, and with `hashes` (sha256 by path, of the files already hashed) a model folder's files
    must have the sha256 its SOURCE.json recorded."""
    from mechinterp.saes import load_sae

    if not artifact.exists():
        return ["missing"]
    files = sorted(p for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else [artifact]
    problems = [f"{p.relative_to(artifact)}: {why}" if artifact.is_dir() else why
                for p in files if (why := file_problem(p)) is not None]
    if problems or not artifact.is_dir():
        return problems
    if (artifact / "cfg.json").is_file():
        try:
            load_sae(artifact)
        except Exception as err:  # noqa: BLE001
            problems.append(f"does not load as an SAE ({type(err).__name__}: {err})")
    if hashes is not None and (artifact / "SOURCE.json").is_file():
        recorded = json.loads((artifact / "SOURCE.json").read_text()).get("files_sha256", {})
        problems += [f"{name}: sha256 differs from the one SOURCE.json recorded at fetch" for name, sha in
                     recorded.items() if hashes.get(str(artifact / name)) != sha]
    return problems


def verify_artifacts(artifacts: list[Path], hashes: dict[str, str]) -> None:
    """Raise UserError naming every broken stage output and the command that rebuilds it."""
    broken = {artifact: problems for artifact in artifacts if (problems := artifact_problems(artifact, hashes))}
    if broken:
        lines = [f"  {artifact}: {'; '.join(problems)}" for artifact, problems in broken.items()]
        raise UserError("broken stage outputs (no manifest written):\n" + "\n".join(lines) + "\n"
                        + rebuild_hint(*broken))


def metric_rows(run_dir: Path, names: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The key and numeric columns of each metric table found in `run_dir` (of `names`, default all),
    and the claims' verdicts."""
    tables = {}
    for name in names or list(METRIC_TABLES):
        if (run_dir / name).is_file():
            frame = pl.read_parquet(run_dir / name)
            kept = [*METRIC_TABLES[name], *(["verdict"] if name == CLAIMS_TABLE else [])]
            tables[name] = frame.select([c for c in frame.columns if c in kept or (
                frame[c].dtype.is_numeric() and not c.endswith(TIMING_SUFFIXES))]).to_dicts()
    return tables


LOCK_FILE = "requirements/cpu.lock"  # the exact versions scripts/setup.sh installs


def build_manifest(run_dir: Path, config: dict[str, Any], repo: Path, benchmarks: list[Path], threads: int,
                   artifacts: list[Path]) -> dict[str, Any]:
    """The manifest of the finished run in `run_dir`, made from the checkout `repo`, once every stage
    output in `artifacts` (paths under `run_dir`) is verified."""
    files = hash_files(run_dir)
    verify_artifacts(artifacts, {str(run_dir / name): entry["sha256"] for name, entry in files.items()})
    software = environment(threads)
    lock = repo / LOCK_FILE
    software["lock"] = {"path": LOCK_FILE, "sha256": sha256_file(lock) if lock.is_file() else None}
    return {"run": config["run"], "config": config, "code": git_state(repo), "environment": software,
            "seeds": {"seed": config["seed"], "data_seed": config["data_seed"]}, "jobs": read_benchmarks(benchmarks, run_dir / "benchmarks"),
            "files": files, "artifacts": sorted(p.relative_to(run_dir).as_posix() for p in artifacts),
            "metrics": metric_rows(run_dir)}



def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `manifest`: `python -m mechinterp.manifest --help`."""
    parser = argparse.ArgumentParser(description="Write a run's MANIFEST.json: file hashes, config, versions, job times.")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="the resolved config as JSON")
    parser.add_argument("--artifacts", nargs="*", default=[], help="every stage output (file or folder), verified")
    parser.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark files of the run's jobs")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    # Jobs run in the workflow's checkout (Snakemake's working directory): its git state is the code version.
    manifest = build_manifest(Path(args.run_dir), json.loads(args.config), Path.cwd(),
                              [Path(p) for p in args.benchmarks], args.threads, [Path(p) for p in args.artifacts])
    write_json(manifest, args.out)
    log.info("manifest of %d files, %d jobs, commit %s%s", len(manifest["files"]), len(manifest["jobs"]),
             manifest["code"]["commit"], " (dirty)" if manifest["code"]["dirty"] else "")


if __name__ == "__main__":
    run_stage(main)
