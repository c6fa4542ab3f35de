"""The smoke DAG locally and through the SLURM profile on a one-node cluster started on this machine.

    .venv/bin/python benchmarks/bench_slurm.py      (root: it starts the cluster with scripts/slurm_cluster.sh)

Times the cluster's start, then the whole smoke DAG in two fresh copies of the checkout (the pinned wheels
copied in, so neither downloads): once with `--cores 2`, once through `profiles/slurm` (first status
check after 1 s), one after the other on the same machine. Writes results/benchmarks/slurm.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


def timed_snakemake(workdir: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", *args, "--configfile", "config/smoke.yaml"], cwd=workdir,
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    from mechinterp.manifest import cpu_model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster.sh"), "start", str(tmp / "cluster")], check=True)
        cluster_start = time.perf_counter() - start
        try:
            report = {"cpu": cpu_model(), "cluster_start_s": cluster_start}
            for name, args in (("local", ("--cores", "2")),
                               ("slurm", ("--workflow-profile", "profiles/slurm",
                                          "--slurm-init-seconds-before-status-checks", "1"))):
                workdir = fresh_copy(tmp / name)
                wheels = REPO / "results" / "smoke" / "downloads"
                if wheels.is_dir():
                    shutil.copytree(wheels, workdir / "results" / "smoke" / "downloads")
                report[f"smoke_dag_{name}_s"] = timed_snakemake(workdir, *args)
            report["slurm_over_local"] = report["smoke_dag_slurm_s"] / report["smoke_dag_local_s"]
        finally:
            subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster.sh"), "stop", str(tmp / "cluster")], check=True)
    out = REPO / "results" / "benchmarks" / "slurm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
