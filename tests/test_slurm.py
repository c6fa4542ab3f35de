"""The smoke DAG through the project's SLURM profile on a real one-node SLURM cluster started on this
machine (scripts/slurm_cluster.sh: Debian's slurmctld, slurmd and munge; needs root)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMOKE, assert_same_outputs, copy_workflow, snakemake, stage_outputs

pytestmark = pytest.mark.slurm
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# the first status check after a second, not the profile's five: the smoke jobs are short
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1")


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

    # arrays and weights byte for byte, tables and JSON values exactly, run times aside
    assert_same_outputs(stage_outputs(workdir / "results" / "smoke"), stage_outputs(smoke_run / "results" / "smoke"))


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
