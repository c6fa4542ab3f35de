"""The smoke DAG's model stages through the project's SLURM profile on a real one-node SLURM cluster started on this
machine (scripts/slurm_cluster.sh: Debian's slurmctld, slurmd and munge; needs root)."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
import yaml

from conftest import REPO, SMOKE, assert_same_outputs, copy_workflow, snakemake, stage_output_names, stage_outputs

pytestmark = pytest.mark.slurm
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# the first status check after a second, not the profile's five: the smoke jobs are short
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1")
# every kind of job (a model stage, a compute stage, a table) through SLURM, in 16 of the smoke DAG's 36
# jobs: each job on this 2-CPU node runs alone and starts its own Snakemake, so the whole DAG takes 8 min
SLURM_TARGETS = ("sae_eval/metrics.parquet", "logit_lens/summary.json", "clamping/summary.parquet")


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


def test_the_model_stages_on_slurm_equal_the_local_run(slurm_cluster, smoke_run, tmp_path):
    workdir = copy_workflow(tmp_path / "repo")
    started = time.monotonic()
    result = snakemake(workdir, "--workflow-profile", "profiles/slurm", *FAST_POLLING, *SMOKE, "--",
                       *(f"results/smoke/{name}" for name in SLURM_TARGETS))
    print(f"{len(SLURM_TARGETS)} targets of the smoke DAG through SLURM: {time.monotonic() - started:.0f} s")
    log = result.stdout + result.stderr

    # every job was a SLURM job (submitted by sbatch, logged under its rule's name), none ran here
    planned = set(re.findall(r"^rule (\w+):$", log, re.MULTILINE))
    submitted = set(re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/rule_(\w+)/", log))
    assert {"fetch_model", "cache_activations", "train_sae", "evaluate_sae", "collect_sae_metrics", "logit_lens",
            "polysemanticity", "clamping"} <= planned
    assert submitted == planned, (planned ^ submitted, log[-3000:])
    assert not re.search(r"^localrule ", log, re.MULTILINE)
    # every job ran with the config's resources.threads, not --cores (Snakemake prints "threads:" only above 1)
    threads = yaml.safe_load((REPO / SMOKE[1]).read_text())["resources"]["threads"]
    assert set(re.findall(r"--threads (\d+)", log)) == {str(threads)}, log[-3000:]

    # every output of those jobs as the local run has it: arrays and weights byte for byte, tables and
    # JSON values exactly, run times aside
    results = workdir / "results" / "smoke"
    local = smoke_run / "results" / "smoke"
    names = [name for name in stage_output_names(local) if (results / name).exists()]
    assert {"activations/resid3.npy", "saes/resid3-topk/sae_weights.safetensors", "sae_eval/metrics.parquet",
            "logit_lens/targets.parquet", "polysemanticity/mlp3.units.parquet", "clamping/effects.parquet"} <= set(names)
    assert_same_outputs(stage_outputs(results, names), stage_outputs(local, names))


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
