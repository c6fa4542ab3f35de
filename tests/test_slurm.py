"""The smoke DAG through the project's SLURM profile on a real one-node SLURM cluster started on this
machine (scripts/slurm_cluster.sh: Debian's slurmctld, slurmd and munge; needs root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMOKE, copy_workflow, snakemake

pytestmark = pytest.mark.slurm
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# the first status check after a second, not the profile's five: the smoke jobs are short
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1")
# outputs that record how fast a stage ran: compared without those fields
SPEED_FIELD = re.compile(r"seconds|per_s$")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("starting a SLURM cluster needs root (CI runs this test)")
    folder = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(folder)], check=True)
    print(f"SLURM cluster started in {time.monotonic() - started:.1f} s")
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(folder)], check=True)


def without_speed(value):
    """A JSON value with every timing field dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_speed(v) for k, v in value.items() if not SPEED_FIELD.search(k)}
    if isinstance(value, list):
        return [without_speed(v) for v in value]
    return value


def result_files(run: Path) -> dict[str, str]:
    """sha256 of every result file of a run (from its manifest) that does not depend on when or how
    fast it ran: not the logs, benchmarks or rendered figures (their timestamps and timings)."""
    files = json.loads((run / "MANIFEST.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items()
            if not name.startswith(("logs/", "benchmarks/", "figures/"))}


def test_smoke_dag_on_slurm_equals_the_local_run(slurm_cluster, smoke_run, tmp_path):
    workdir = copy_workflow(tmp_path / "repo")
    started = time.monotonic()
    result = snakemake(workdir, "--workflow-profile", "profiles/slurm", *FAST_POLLING, *SMOKE)
    print(f"smoke DAG through SLURM: {time.monotonic() - started:.0f} s")
    log = result.stdout + result.stderr

    # every job with a command was a SLURM job (submitted by sbatch, logged under its rule's name)
    planned = set(re.findall(r"^rule (\w+):$", log, re.MULTILINE))
    submitted = set(re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/rule_(\w+)/", log))
    local = set(re.findall(r"^localrule (\w+):$", log, re.MULTILINE))
    assert planned and submitted == planned, (planned ^ submitted, log[-3000:])
    assert local == {"all"}  # the target rule has no command
    assert "threads: 2" in log and "--threads 2" in log  # the config's resources.threads, not --cores

    mine, theirs = workdir / "results" / "smoke", smoke_run / "results" / "smoke"
    hashes, local_hashes = result_files(mine), result_files(theirs)
    assert hashes.keys() == local_hashes.keys()
    timed = {name for name in hashes if name.endswith("summary.json") or name.endswith("cfg.json")}
    differing = {name for name in hashes.keys() - timed if hashes[name] != local_hashes[name]}
    assert not differing, sorted(differing)
    for name in timed:
        assert without_speed(json.loads((mine / name).read_text())) == \
            without_speed(json.loads((theirs / name).read_text())), name


def test_a_job_no_node_can_hold_fails_at_once(slurm_cluster, tmp_path):
    workdir = copy_workflow(tmp_path / "repo")
    overlay = tmp_path / "greedy.yaml"
    overlay.write_text(yaml.safe_dump({"resources": {"threads": 64}}))
    # a job left pending would hang the run: the timeout turns that into a failure
    result = snakemake(workdir, "--workflow-profile", "profiles/slurm", *FAST_POLLING,
                       "--configfile", "config/smoke.yaml", str(overlay), check=False, timeout=600)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "could never start on this cluster" in log
    assert re.search(r"rule cache_activations asks for 64 CPUs \(config resources.threads\), but the largest node "
                     r"of partition debug has \d+: lower config resources.threads", log), log[-3000:]
    assert "has been submitted with SLURM jobid" not in log
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout
    assert queue.strip() == ""
