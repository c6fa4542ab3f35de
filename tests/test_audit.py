"""The audit: inputs and models must match exactly, metrics within tolerance, the rest is reported;
the command's exit status says which."""

from __future__ import annotations

import copy
import json

import pytest

from mechinterp.audit import audit, load_manifest, tolerance_for
from mechinterp.audit import main as audit_main
from mechinterp.errors import UserError, exit_status
from mechinterp.manifest import build_manifest

TOLERANCES = {"default": {"rel": 0.05, "abs": 0.001},
              "tables": {"sae_eval/metrics.parquet": {"default": {"rel": 0.0, "abs": 0.01},
                                                      "l0": {"rel": 0.0, "abs": 0.5}}}}


def manifest() -> dict:
    return {"files": {"model/model.safetensors": {"sha256": "a" * 64}, "saes/x/sae_weights.safetensors": {"sha256": "b" * 64},
                      "figures/x.png": {"sha256": "c" * 64}, "logs/clamping.log": {"sha256": "f" * 64}},
            "metrics": {"sae_eval/metrics.parquet": [{"sae": "resid1-topk", "fvu": 0.2, "l0": 32.0, "dead_fraction": 0.0}],
                        "clamping/summary.parquet": [{"concept": "c", "site": "mlp3", "unit_kind": "feature",
                                                      "selection": "input", "unit": 3,
                                                      "spearman_relative": float("nan")}]},
            "environment": {"packages": {"torch": "2.13.0"}, "device": "cpu"}, "seeds": {"seed": 0}}


def test_identical_manifests_pass():
    result = audit(manifest(), manifest(), TOLERANCES)
    assert result.passed and not result.notes
    assert any("model/model.safetensors: sha256 identical" in m for m in result.matches)


def test_metric_outside_tolerance_and_changed_model_fail_other_files_are_notes():
    run = copy.deepcopy(manifest())
    run["metrics"]["sae_eval/metrics.parquet"][0].update(fvu=0.205, l0=32.4)  # within tolerance
    run["files"]["saes/x/sae_weights.safetensors"]["sha256"] = "d" * 64  # another machine's training: a note
    run["files"]["logs/clamping.log"]["sha256"] = "0" * 64  # logs always differ: not compared
    result = audit(run, manifest(), TOLERANCES)
    assert result.passed and len(result.notes) == 1
    run["metrics"]["sae_eval/metrics.parquet"][0]["fvu"] = 0.22
    run["files"]["model/model.safetensors"]["sha256"] = "e" * 64
    run["environment"]["device"] = "NVIDIA H100"
    result = audit(run, manifest(), TOLERANCES)
    assert not result.passed
    assert any(f.startswith("model/model.safetensors: sha256") for f in result.failures)
    assert any("sae_eval/metrics.parquet [resid1-topk] fvu: 0.22 vs reference 0.2" in f for f in result.failures)
    assert "device: NVIDIA H100 vs reference cpu" in result.notes
    assert result.report().startswith("AUDIT FAILED: ")


def test_missing_rows_fail_and_nan_matches_nan():
    run = copy.deepcopy(manifest())
    run["metrics"]["sae_eval/metrics.parquet"] = []
    result = audit(run, manifest(), TOLERANCES)
    assert result.failures == ["sae_eval/metrics.parquet [resid1-topk]: row missing from this run"]


def test_tolerance_lookup_order():
    assert tolerance_for(TOLERANCES, "sae_eval/metrics.parquet", "l0") == (0.0, 0.5)
    assert tolerance_for(TOLERANCES, "sae_eval/metrics.parquet", "fvu") == (0.0, 0.01)
    assert tolerance_for(TOLERANCES, "clamping/summary.parquet", "x") == (0.05, 0.001)


def test_manifest_records_files_config_and_jobs(tmp_path):
    run = tmp_path / "results" / "r"
    (run / "benchmarks" / "train_sae").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "model" / "weights.bin").write_bytes(b"weights")
    (run / "benchmarks" / "train_sae" / "resid1-topk.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "12.5\t0:00:12\t800.5\t900\t700\t750\t1\t2\t150\t20\n")
    out = build_manifest(run, {"run": "r", "seed": 3}, tmp_path, [run / "benchmarks/train_sae/resid1-topk.tsv"], 2)
    assert out["files"]["model/weights.bin"]["bytes"] == 7
    assert out["jobs"] == {"train_sae/resid1-topk": {"wall_s": 12.5, "max_rss_mib": 800.5}}
    assert out["seeds"] == {"seed": 3} and out["environment"]["threads"] == 2
    assert out["code"] == {"commit": None, "dirty": None}


def test_audit_command_exit_status(tmp_path, capsys):
    ref, run = tmp_path / "ref.json", tmp_path / "run.json"
    ref.write_text(json.dumps(manifest()))
    run.write_text(json.dumps(manifest()))
    args = ["--manifest", str(run), "--reference", str(ref), "--settings", json.dumps({"reference": str(ref), "tolerances": TOLERANCES})]
    assert exit_status(audit_main, args) == 0
    changed = manifest()
    changed["metrics"]["sae_eval/metrics.parquet"][0]["fvu"] = 0.5
    run.write_text(json.dumps(changed))
    assert exit_status(audit_main, args) == 1
    assert "FAIL   sae_eval/metrics.parquet" in capsys.readouterr().out
    run.write_text("{not json")
    assert exit_status(audit_main, args) == 2
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "none.json", "the reference")
