"""The audit: the same config or a refusal, inputs and models exactly, each claim's verdict (an unstable
claim's statistic), each metric within a tolerance set by the reference's seed-to-seed spread; the
replicates' spread and the reference folder it comes in."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl
import pytest

from mechinterp.audit import AuditSettings, Reference, Tolerances, audit, config_differences, load_manifest
from mechinterp.audit import main as audit_main
from mechinterp.errors import UserError, exit_status
from mechinterp.manifest import build_manifest
from mechinterp.reference import make_reference
from mechinterp.replicates import claim_stability, spread

SETTINGS = AuditSettings(reference=None, spread_multiple=4.0, floor={"rel": 0.0, "abs": 0.001}, count_floor=1.0,
                         min_concepts=10)
CONFIG = {"run": "r", "seed": 0, "data_seed": 0, "tokens": {"train_tokens": 1000}, "device": "auto"}


def claim(name: str, value: float, verdict: str) -> dict:
    return {"claim": name, "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "bound": 0.0,
            "verdict": verdict}


def manifest(fvu: float = 0.2, n_dead: int = 2, mono: float = 0.3, beats: float = 0.05, seed: int = 0) -> dict:
    """A run's manifest as mechinterp.manifest writes it, with the metrics that matter here."""
    return {"config": {**CONFIG, "seed": seed},
            "files": {"model/model.safetensors": {"sha256": "a" * 64}, "saes/x/sae_weights.safetensors": {"sha256": "b" * 64},
                      "logs/clamping.log": {"sha256": "f" * 64}},
            "metrics": {"sae_eval/metrics.parquet": [{"sae": "resid1-topk", "fvu": fvu, "n_dead": n_dead}],
                        "clamping/summary.parquet": [{"concept": "c", "site": "mlp3", "unit_kind": "feature",
                                                      "selection": "input", "unit": 3,
                                                      "spearman_relative": float("nan")}],
                        "clamping/verdict.parquet": [{"site": "mlp3", "feature_selection": "output", "concepts": "real", "statistic": "beats",
                                                      "baseline": "random", "value": 0.5, "n_concepts": 32}],
                        "claims.parquet": [claim("sae.resid1-topk.fvu", fvu, "holds" if fvu <= 0.5 else "fails"),
                                           claim("polysemanticity.resid1-topk", mono, "holds" if mono > 0.1 else "fails"),
                                           claim("clamping.beats", beats, "holds" if beats > 0.1 else "inconclusive")]},
            "environment": {"packages": {"torch": "2.13.0"}, "device": "cpu", "cpu": "Intel Xeon"},
            "seeds": {"seed": seed, "data_seed": 0}}


def seed_manifests() -> dict[int, dict]:
    """Three seeds: fvu and dead latents move a little, the clamping claim's verdict flips."""
    return {0: manifest(), 1: manifest(fvu=0.21, n_dead=3, beats=0.12, seed=1),
            2: manifest(fvu=0.19, n_dead=2, beats=0.04, seed=2)}


def reference() -> Reference:
    seeds = seed_manifests()
    return Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}),
                     claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in seeds.items()}))


def test_spread_and_claim_stability():
    ref = reference()
    fvu = ref.spread.filter(pl.col("column") == "fvu", pl.col("table") == "sae_eval/metrics.parquet").row(0, named=True)
    assert fvu["n_seeds"] == 3 and fvu["mean"] == pytest.approx(0.2) and fvu["sd"] == pytest.approx(0.01)
    assert ref.spread.filter(pl.col("column") == "n_dead")["integer"].to_list() == [True]
    nan = ref.spread.filter(pl.col("column") == "spearman_relative").row(0, named=True)
    assert nan["n_seeds"] == 0 and math.isnan(nan["sd"])
    stable = dict(ref.claims.select("claim", "stable").iter_rows())
    assert stable == {"sae.resid1-topk.fvu": True, "polysemanticity.resid1-topk": True, "clamping.beats": False}
    assert ref.claims.filter(pl.col("claim") == "clamping.beats")["counts"].to_list() == ["inconclusive 2, holds 1"]


def test_tolerance_is_multiples_of_the_spread_with_floors():
    tolerances = Tolerances(reference().spread, SETTINGS)
    # 4 sd of the three seeds, widened as a t prediction interval from three seeds is: 4.303 sqrt(4/3) / 1.96
    widened = 4.303 * math.sqrt(4 / 3) / 1.959964
    tolerance, how = tolerances("sae_eval/metrics.parquet", '["resid1-topk"]', "fvu", 0.2, False)
    assert tolerance == pytest.approx(4 * 0.01 * widened) and how == "4 x sd 0.01 x 2.54 for 3 seeds"
    # a count gets at least count_floor; a metric the seeds do not move gets the floor
    n_dead_sd = reference().spread.filter(pl.col("column") == "n_dead")["sd"][0]
    assert tolerances("sae_eval/metrics.parquet", '["resid1-topk"]', "n_dead", 2, True)[0] == pytest.approx(
        max(1.0, 4 * n_dead_sd * widened))
    assert tolerances("logit_lens/first_layer.parquet", '["p", " x"]', "final_prob", 0.5, False) == (0.001, "floor")
    # no replicates: the floor everywhere
    assert Tolerances(None, SETTINGS)("sae_eval/metrics.parquet", '["resid1-topk"]', "fvu", 0.2, False)[0] == 0.001


def test_a_rerun_with_another_seed_passes():
    for seed in (1, 2):
        result = audit(seed_manifests()[seed], reference(), SETTINGS)
        assert result.passed, result.report()
        assert result.counts["claims"] == [3, 3] and result.counts["inputs"] == [1, 1]
        assert "seeds: {'seed': %d, 'data_seed': 0} vs reference {'seed': 0, 'data_seed': 0}" % seed in result.notes
    report = audit(seed_manifests()[1], reference(), SETTINGS).report()
    assert "OK     clamping.beats: inconclusive 0.05 [-0.05, 0.15] | holds 0.12 [0.02, 0.22]; fragile, unstable" in report


def test_a_broken_run_fails_naming_the_claim():
    broken = manifest(fvu=1.3)  # e.g. decoder rows shuffled: nothing reconstructs
    result = audit(broken, reference(), SETTINGS)
    assert not result.passed
    assert any(f.startswith("claim sae.resid1-topk.fvu: holds 0.2 [0.1, 0.3] | fails 1.3") for f in result.failures)
    assert any(f.startswith("sae_eval/metrics.parquet [resid1-topk] fvu: 1.3 vs reference 0.2") for f in result.failures)
    swapped = manifest(mono=-0.3)  # neurons' and features' scores swapped
    failures = audit(swapped, reference(), SETTINGS).failures
    assert [f.split(":")[0] for f in failures] == ["claim polysemanticity.resid1-topk"]
    # an unstable claim is checked by its statistic
    far = manifest(beats=0.5)
    assert any(f.startswith("claim clamping.beats") and "outside" in f for f in audit(far, reference(), SETTINGS).failures)


def test_counts_changed_model_and_missing_rows():
    run = manifest(n_dead=3)  # within the count floor
    run["files"]["saes/x/sae_weights.safetensors"]["sha256"] = "d" * 64  # another machine's training: a note
    run["files"]["logs/clamping.log"]["sha256"] = "0" * 64  # logs always differ: not compared
    run["environment"]["cpu"] = "AMD EPYC"
    result = audit(run, reference(), SETTINGS)
    assert result.passed and "cpu: AMD EPYC vs reference Intel Xeon" in result.notes
    run = manifest(n_dead=9)
    run["files"]["model/model.safetensors"]["sha256"] = "e" * 64
    run["metrics"]["clamping/summary.parquet"] = []
    result = audit(run, reference(), SETTINGS)
    assert any(f.startswith("model/model.safetensors: sha256") for f in result.failures)
    assert any(f.startswith("sae_eval/metrics.parquet [resid1-topk] n_dead: 9 vs reference 2") for f in result.failures)
    assert "clamping/summary.parquet [c, mlp3, feature, input]: row missing from this run" in result.failures
    assert result.report().startswith("AUDIT FAILED: inputs 0 of 1 agree; claims 3 of 3 agree; metrics 3 of 5 agree")


def test_another_config_is_refused():
    assert config_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]
    other = manifest()
    other["config"] = {**CONFIG, "run": "smoke", "tokens": {"train_tokens": 8}}
    with pytest.raises(UserError, match=r"another config \(run 'r'\); they differ at tokens.train_tokens"):
        audit(other, reference(), SETTINGS)
    other["config"] = {**CONFIG, "data_seed": 1}  # other inputs: refused too
    with pytest.raises(UserError, match="data_seed"):
        audit(other, reference(), SETTINGS)
    other["config"] = {**CONFIG, "seed": 7, "browser": {"quantiles": 4}}  # another seed, another browser: audited
    assert audit(other, reference(), SETTINGS).passed


def write_run(run_dir, seeds: dict[int, dict]) -> None:
    """A finished run's folder as `make_reference` reads it: MANIFEST.json and replicates/."""
    (run_dir / "replicates").mkdir(parents=True)
    (run_dir / "MANIFEST.json").write_text(json.dumps({**seeds[0], "code": {"commit": "abc", "dirty": False}}))
    ref = reference()
    ref.spread.write_parquet(run_dir / "replicates" / "spread.parquet")
    ref.claims.write_parquet(run_dir / "replicates" / "claims.parquet")


def test_reference_folder_and_audit_command(tmp_path, capsys):
    run_dir, folder = tmp_path / "results" / "r", tmp_path / "reference" / "r"
    write_run(run_dir, seed_manifests())
    make_reference(run_dir, folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "MANIFEST.json", "replicates/claims.parquet", "replicates/spread.parquet"]
    run = tmp_path / "run.json"
    run.write_text(json.dumps(seed_manifests()[2]))
    args = ["--manifest", str(run), "--reference", str(folder), "--settings", json.dumps(SETTINGS.__dict__)]
    assert exit_status(audit_main, args) == 0
    assert capsys.readouterr().out.startswith("AUDIT PASSED: inputs 1 of 1 agree; claims 3 of 3 agree")
    run.write_text(json.dumps(manifest(fvu=0.9)))
    assert exit_status(audit_main, args) == 1
    assert "FAIL   claim sae.resid1-topk.fvu" in capsys.readouterr().out
    assert exit_status(audit_main, [*args, "--exit-zero", "--out", str(tmp_path / "audit.txt")]) == 0
    assert (tmp_path / "audit.txt").read_text().startswith("AUDIT FAILED")
    assert exit_status(audit_main, ["--manifest", str(run), "--reference", str(folder / "MANIFEST.json")]) == 2
    assert "is a file; a reference is a folder" in capsys.readouterr().err
    run.write_text("{not json")
    assert exit_status(audit_main, args) == 2
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "none.json", "the reference")
    (folder / "replicates" / "claims.parquet").unlink()  # half its replicates
    with pytest.raises(UserError, match=r"has only one of replicates/spread\.parquet and replicates/claims\.parquet; "
                                        r"remake it with `python -m mechinterp\.reference`"):
        Reference.load(folder)


def test_a_section_given_as_a_value_is_one_difference():
    assert config_differences({"sae": {"k": 32}, "run": "a"}, {"sae": 5, "run": "a"}) == ["sae"]
    assert config_differences({"sae": {"k": 32}}, {"sae": {"k": 16, "d_sae": 8}}) == ["sae.d_sae", "sae.k"]


def test_the_report_is_its_lines_ending_in_one_newline():
    report = audit(seed_manifests()[1], reference(), SETTINGS).report()
    assert report.endswith("\n") and not report.endswith("\n\n")
    assert report.splitlines()[0].startswith("AUDIT PASSED")


def test_reference_needs_current_replicates(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "MANIFEST.json").write_text(json.dumps({**manifest(), "code": {"commit": None}}))
    with pytest.raises(UserError, match="snakemake --cores all replicates"):
        make_reference(run_dir, tmp_path / "ref")
    stale = tmp_path / "stale"
    write_run(stale, {0: manifest(mono=-1.0)})  # the run changed after its replicates were made
    with pytest.raises(UserError, match="polysemanticity.resid1-topk.*stale"):
        make_reference(stale, tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


def test_reference_never_replaces_what_it_did_not_make(tmp_path):
    """Issue 30: `--out` at the run itself deleted the run. The run, a folder holding it, a folder inside it
    and a folder of other files are refused, naming the fix; a reference is remade in place; --replace asks."""
    run_dir = tmp_path / "results" / "r"
    write_run(run_dir, seed_manifests())
    (run_dir / "saes").mkdir()
    (run_dir / "saes" / "weights.safetensors").write_bytes(b"weights")
    kept = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (run_dir, tmp_path / "results", tmp_path, run_dir / "reference"):
        with pytest.raises(UserError, match=r"overlaps the run .*Write it elsewhere, e\.g\. --out reference/r"):
            make_reference(run_dir, out)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*notes exists and is not a reference \(it holds todo\.txt\).*--replace"):
        make_reference(run_dir, other)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == sorted([*kept, Path("notes"), Path("notes/todo.txt")])
    folder = tmp_path / "reference" / "r"
    make_reference(run_dir, folder)
    make_reference(run_dir, folder)  # a reference is remade in place
    make_reference(run_dir, other, replace=True)
    assert not (other / "todo.txt").exists() and (other / "MANIFEST.json").is_file()
    with pytest.raises(UserError, match="overlaps the run"):  # asking to replace never reaches the run
        make_reference(run_dir, run_dir, replace=True)


def test_manifest_records_files_config_and_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a run made under another CPU's rounding says so
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    run = tmp_path / "results" / "r"
    (run / "benchmarks" / "train_sae").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "model" / "weights.bin").write_bytes(b"weights")
    (run / "replicates" / "seed1").mkdir(parents=True)
    (run / "replicates" / "seed1" / "x.parquet").write_bytes(b"another seed")
    (run / "benchmarks" / "train_sae" / "resid1-topk.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "12.5\t0:00:12\t800.5\t900\t700\t750\t1\t2\t150\t20\n")
    out = build_manifest(run, {"run": "r", "seed": 3, "data_seed": 0}, tmp_path,
                         [run / "benchmarks/train_sae/resid1-topk.tsv"], 2, [run / "model"])
    assert out["files"]["model/weights.bin"]["bytes"] == 7 and out["artifacts"] == ["model"]
    assert not any(name.startswith("replicates/") for name in out["files"])
    assert out["jobs"] == {"train_sae/resid1-topk": {"wall_s": 12.5, "max_rss_mib": 800.5}}
    assert out["seeds"] == {"seed": 3, "data_seed": 0} and out["environment"]["threads"] == 2
    assert out["environment"]["cpu"] and out["code"] == {"commit": None, "dirty": None}
    assert out["environment"]["rounding"] == {"ATEN_CPU_CAPABILITY": None, "MKL_CBWR": "COMPATIBLE"}


def test_replicates_doctest():
    import doctest

    import mechinterp.replicates

    assert doctest.testmod(mechinterp.replicates).failed == 0



def test_nan_matches_a_number_only_where_the_seeds_gave_both():
    seeds = seed_manifests()
    for seed in (0, 2):
        seeds[seed]["metrics"]["clamping/verdict.parquet"][0]["value"] = float("nan")  # a number in seed 1 only
    ref = Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}), reference().claims)
    assert audit(seeds[1], ref, SETTINGS).passed
    never_nan = Reference(seeds[1], spread({1: seeds[1]["metrics"], 3: seeds[1]["metrics"]}), reference().claims)
    failures = audit(seeds[2], never_nan, SETTINGS).failures
    assert "clamping/verdict.parquet [mlp3, output, real, beats, random] value" in [f.split(":")[0] for f in failures]


def test_per_unit_rows_and_few_concepts_are_reported_not_audited():
    run = manifest()
    run["metrics"]["clamping/summary.parquet"][0]["spearman_relative"] = 0.9  # another SAE chose another unit
    result = audit(run, reference(), SETTINGS)
    assert result.passed and result.reported == [1, 2]
    assert any("spearman_relative: 0.9 vs reference nan" in n and "reported, not audited: one concept's unit" in n
               for n in result.notes)
    assert "reported, not audited: 2 metrics, 1 of them outside the seeds' spread" in result.report().splitlines()[0]
    few = reference()
    few.manifest["metrics"]["clamping/verdict.parquet"][0]["n_concepts"] = 2
    run["metrics"]["clamping/verdict.parquet"][0]["value"] = 1.0
    assert audit(run, few, SETTINGS).passed
    assert not audit(run, reference(), SETTINGS).passed
    few_claims = reference()
    for row in few_claims.manifest["metrics"]["claims.parquet"]:
        row["n_concepts"] = 3 if row["claim"] == "clamping.beats" else None
    flipped = manifest(beats=5.0)  # far outside the seeds, over 3 concepts: reported
    result = audit(flipped, few_claims, SETTINGS)
    assert result.passed and result.counts["claims"] == [2, 2]
    assert any(line.startswith("DIFF   clamping.beats") and "3 concepts, under audit.min_concepts" in line
               for line in result.claims)


def test_the_audit_checks_the_run_beside_its_manifest(tmp_path):
    run = tmp_path / "results" / "r"
    (run / "saes").mkdir(parents=True)
    (run / "corpus.parquet").parent.mkdir(exist_ok=True)
    pl.DataFrame({"text": ["a", "b"]}).write_parquet(run / "corpus.parquet")
    (run / "figure.svg").write_text("<svg/>")
    (run / "logs").mkdir()
    (run / "logs" / "manifest.log").write_text("")
    manifest = build_manifest(run, {"run": "r", "seed": 0, "data_seed": 0}, tmp_path, [], 1, [run / "corpus.parquet"])
    ref = Reference(manifest, None, None)
    assert audit(manifest, ref, SETTINGS, run).passed
    copied = tmp_path / "copied"
    copied.mkdir()
    alone = audit(manifest, ref, SETTINGS, copied)  # a manifest copied without its run: compared on its own
    assert alone.passed and any("only the manifest is compared" in note for note in alone.notes)

    (run / "figure.svg").write_text("<svg></svg>")
    (run / "logs" / "manifest.log").write_text("written after the manifest hashed the run")
    (run / "corpus.parquet").write_bytes((run / "corpus.parquet").read_bytes()[:-20])
    result = audit(manifest, ref, SETTINGS, run)
    assert not result.passed
    assert "figure.svg: size differs since the manifest was written" in result.failures
    assert any(line.startswith("corpus.parquet: cannot be read") for line in result.failures), result.failures
    assert result.failures[-1].endswith(f"rm -r {run / 'corpus.parquet'} {run / 'figure.svg'}")


@pytest.mark.parametrize(("key", "name"), [("files", "../../../../etc/passwd"), ("files", "/etc/passwd"),
                                           ("artifacts", "saes/../../outside"), ("files", "")])
def test_a_manifest_naming_a_path_outside_its_run_is_refused(tmp_path, key, name):
    """Issue 30: a hand-edited manifest made the audit stat and parse files outside the run, and its fix said to
    `rm -r` them. A manifest is untrusted input: every name it holds is inside its run, or it is refused by name."""
    edited = manifest()
    edited["artifacts"] = []
    edited[key] = {**edited[key], name: {"sha256": "a" * 64, "bytes": 1}} if key == "files" else [name]
    path = tmp_path / "MANIFEST.json"
    path.write_text(json.dumps(edited))
    with pytest.raises(UserError, match=rf"names {re.escape(repr(name))} under '{key}': a manifest names only paths "
                                        r"inside its run"):
        load_manifest(path, "the run's")
    path.write_text(json.dumps({**manifest(), "files": ["corpus.parquet"]}))
    with pytest.raises(UserError, match=r"has no 'files' section \(an object\)"):
        load_manifest(path, "the run's")


def test_a_huge_integer_or_a_partial_settings_section_is_no_traceback(tmp_path, capsys):
    """Issue 30: a manifest metric of 10**400 raised OverflowError; `--settings` with one key raised TypeError."""
    path = tmp_path / "MANIFEST.json"
    path.write_text(json.dumps(manifest()).replace('"n_dead": 2', '"n_dead": ' + "1" + "0" * 400))
    with pytest.raises(UserError, match=r"MANIFEST\.json: the integer 10000000000000000000\.\.\. is beyond 64 bits"):
        load_manifest(path, "the run's")
    run_dir, folder = tmp_path / "results" / "r", tmp_path / "reference" / "r"
    write_run(run_dir, seed_manifests())
    make_reference(run_dir, folder)
    run = tmp_path / "run.json"
    run.write_text(json.dumps(seed_manifests()[2]))
    args = ["--manifest", str(run), "--reference", str(folder)]
    assert exit_status(audit_main, [*args, "--settings", '{"spread_multiple": 4.0}']) == 0
    assert capsys.readouterr().out.startswith("AUDIT PASSED")
    assert exit_status(audit_main, [*args, "--settings", '{"spread": 4}']) == 2
    assert "--settings: spread is not a setting of the audit" in capsys.readouterr().err


def test_a_link_out_of_the_run_is_a_failure_never_read(tmp_path):
    run = tmp_path / "results" / "r"
    run.mkdir(parents=True)
    outside = tmp_path / "secret.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(outside)
    pl.DataFrame({"x": [1]}).write_parquet(run / "corpus.parquet")
    manifest = build_manifest(run, {"run": "r", "seed": 0, "data_seed": 0}, tmp_path, [], 1, [run / "corpus.parquet"])
    (run / "corpus.parquet").unlink()
    (run / "corpus.parquet").symlink_to(outside)
    result = audit(manifest, Reference(manifest, None, None), SETTINGS, run)
    assert not result.passed
    assert f"corpus.parquet: resolves outside the run {run} (a link out of it); not read" in result.failures
    assert not any("rm -r" in line and "secret" in line for line in result.failures)


def test_the_model_files_must_match_and_the_fetch_record_is_a_note():
    ref = reference()
    ref.manifest["files"]["model/SOURCE.json"] = {"sha256": "c" * 64}
    mine = seed_manifests()[1]
    mine["files"]["model/SOURCE.json"] = {"sha256": "d" * 64}  # e.g. another transformers version or local path
    result = audit(mine, ref, SETTINGS)
    assert result.passed and result.counts["inputs"] == [1, 1]
    assert any(n.startswith("model/SOURCE.json: differs (a record of the fetch") for n in result.notes)
    mine["files"]["model/model.safetensors"] = {"sha256": "e" * 64}
    assert "model/model.safetensors: sha256 eeeeeeeeeeee differs from the reference aaaaaaaaaaaa" in audit(
        mine, ref, SETTINGS).failures


def test_more_than_eight_config_differences_are_summarised_and_a_few_are_listed_whole():
    """The refusal lists at most eight differing keys, then says how many more; with fewer it ends at the list."""
    many = manifest()
    many["config"] = {**CONFIG, **{f"key{i:02d}": i for i in range(10)}}
    with pytest.raises(UserError, match=r"they differ at key00, key01, .*, key07 and 2 more\. Audit a run"):
        audit(many, reference(), SETTINGS)
    few = manifest()
    few["config"] = {**CONFIG, "data_seed": 1}
    with pytest.raises(UserError, match=r"they differ at data_seed\. Audit a run"):
        audit(few, reference(), SETTINGS)


def test_a_count_gets_the_count_floor_even_without_replicates():
    """With no spread, an integer metric's tolerance is count_floor; a float's is the plain floor."""
    no_spread = Tolerances(None, SETTINGS)
    assert no_spread("sae_eval/metrics.parquet", '["resid1-topk"]', "n_dead", 2, True) == (1.0, "floor")
    assert no_spread("sae_eval/metrics.parquet", '["resid1-topk"]', "n_dead", 2, False) == (0.001, "floor")


def nan_in_two_of_three_seeds() -> dict[int, dict]:
    """Three seeds where the clamping verdict's value and the clamping claim's statistic are NaN in
    seeds 0 and 2 and a number in seed 1 (the claim's verdict flips with it)."""
    seeds = seed_manifests()
    for seed in (0, 2):
        seeds[seed]["metrics"]["clamping/verdict.parquet"][0]["value"] = float("nan")
        seeds[seed]["metrics"]["claims.parquet"][2] = claim("clamping.beats", float("nan"), "inconclusive")
    return seeds


def test_a_nan_reference_is_told_apart_by_whether_the_seeds_gave_numbers_too():
    """A NaN reference has a NaN tolerance, labelled by whether that very row was NaN and a number across seeds."""
    seeds = nan_in_two_of_three_seeds()
    tolerances = Tolerances(spread({s: m["metrics"] for s, m in seeds.items()}), SETTINGS)
    row = '["mlp3", "output", "real", "beats", "random"]'
    tolerance, how = tolerances("clamping/verdict.parquet", row, "value", float("nan"), False)
    assert math.isnan(tolerance) and how == "NaN or a number"
    tolerance, how = tolerances("clamping/verdict.parquet", '["mlp3", "input", "beats", "random"]', "value",
                                float("nan"), False)
    assert math.isnan(tolerance) and how == "NaN only"


def test_an_unstable_claim_with_nan_in_some_seeds_accepts_a_number():
    """A claim whose statistic was NaN in some seeds and a number in another: a number against the NaN
    reference is within what seeds do."""
    seeds = nan_in_two_of_three_seeds()
    ref = Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}),
                    claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in seeds.items()}))
    result = audit(seeds[1], ref, SETTINGS)
    assert result.passed, result.report()
    assert any(line.startswith("OK     clamping.beats: inconclusive nan | holds 0.12 [0.02, 0.22]; fragile, unstable")
               for line in result.claims)


def test_without_replicates_a_claim_is_audited_by_its_verdict_alone():
    """No replicates: each claim's verdict must match, whatever its statistic, and the line says why."""
    ref = Reference(seed_manifests()[0], None, None)
    moved = manifest(beats=0.09)  # the statistic moved well past the floor, the verdict did not
    result = audit(moved, ref, SETTINGS)
    assert result.counts["claims"] == [3, 3]
    assert "OK     clamping.beats: inconclusive 0.05 [-0.05, 0.15] | inconclusive 0.09 [-0.01, 0.19]; " \
           "verdict matches (no replicates)" in result.claims


def test_a_stable_claim_is_audited_by_its_verdict_not_its_statistic():
    """A claim stable across seeds passes on its verdict even when its statistic is far from the reference's."""
    run = manifest()
    run["metrics"]["claims.parquet"][1] = claim("polysemanticity.resid1-topk", 0.9, "holds")  # reference 0.3
    result = audit(run, reference(), SETTINGS)
    assert result.passed, result.report()
    assert any(line.startswith("OK     polysemanticity.resid1-topk") and "verdict matches (robust: holds 3, margin 0.2 > its half-width (not replicated) 0.1)"
               in line for line in result.claims)


def test_a_stable_claim_near_its_bound_is_fragile_and_audited_by_its_statistic():
    """Stable in every seed, but in one seed its interval came closer to the bound than a new draw of its
    statistic would move (the 95% prediction interval from three seeds: 4.97 sd): another seed or CPU could
    flip it, so its verdict is not audited, its statistic is. A run whose verdict flipped with a statistic
    inside the tolerance passes; one whose statistic moved far fails. Seeds that agree closely make the same
    claim robust, and then a flipped verdict fails."""
    seeds = {0: manifest(mono=0.3), 1: manifest(mono=0.25, seed=1), 2: manifest(mono=0.12, seed=2)}
    ref = Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}),
                    claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in seeds.items()}))
    row = ref.claims.filter(pl.col("claim") == "polysemanticity.resid1-topk").row(0, named=True)
    assert row["stable"] and row["margin"] == pytest.approx(0.02)  # seed 2's interval [0.02, 0.22]
    flipped = manifest(mono=0.08)  # its interval [-0.02, 0.18] straddles the bound: inconclusive
    flipped["metrics"]["claims.parquet"][1]["verdict"] = "inconclusive"
    result = audit(flipped, ref, SETTINGS)
    line = next(line for line in result.claims if "polysemanticity.resid1-topk" in line)
    assert result.passed and line.startswith("OK ") and "fragile: holds 3, margin 0.02 <= a new draw's 0.46" in line, line
    assert not audit(manifest(mono=-0.9), ref, SETTINGS).passed
    close = {0: manifest(mono=0.3), 1: manifest(mono=0.31, seed=1), 2: manifest(mono=0.29, seed=2)}
    ref = Reference(close[0], spread({s: m["metrics"] for s, m in close.items()}),
                    claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in close.items()}))
    assert any(f.startswith("claim polysemanticity.resid1-topk") for f in audit(flipped, ref, SETTINGS).failures)


def test_a_new_draws_prediction_interval_widens_with_fewer_seeds():
    from mechinterp.audit import prediction_half_width

    assert prediction_half_width(1.0, 3) == pytest.approx(4.303 * math.sqrt(4 / 3))
    assert prediction_half_width(1.0, 4) == pytest.approx(3.182 * math.sqrt(5 / 4))
    assert prediction_half_width(2.0, 30) == pytest.approx(2 * 1.959964 * (1 + 1 / 116) * math.sqrt(31 / 30))
    assert prediction_half_width(0.0, 4) == 0.0 and prediction_half_width(float("nan"), 4) == 0.0
    assert prediction_half_width(1.0, 1) == 0.0  # one seed: no spread to predict from


def test_a_missing_input_file_fails_and_a_missing_stage_output_is_a_note():
    """An input or model file absent from the run fails the audit; another file absent is only noted."""
    run = seed_manifests()[1]
    del run["files"]["model/model.safetensors"]
    del run["files"]["saes/x/sae_weights.safetensors"]
    result = audit(run, reference(), SETTINGS)
    assert "model/model.safetensors: missing from this run" in result.failures
    assert "saes/x/sae_weights.safetensors: missing from this run" in result.notes
    assert "saes/x/sae_weights.safetensors: missing from this run" not in result.failures
    assert result.counts["inputs"] == [0, 1]


def test_environment_differences_are_noted_and_equal_ones_are_not():
    """Packages, device, CPU, emulated rounding and seeds: a note for each that differs from the reference, none
    for the same."""
    same = audit(seed_manifests()[0], reference(), SETTINGS)
    assert same.passed and not any(note.startswith(("package ", "device", "cpu", "rounding", "seeds"))
                                   for note in same.notes)
    run = seed_manifests()[0]
    run["environment"] = {"packages": {"torch": "2.14.0"}, "device": "cuda", "cpu": "Intel Xeon",
                          "rounding": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": None}}
    notes = audit(run, reference(), SETTINGS).notes
    assert "package torch: 2.14.0 vs reference 2.13.0" in notes and "device: cuda vs reference cpu" in notes
    assert "rounding: {'ATEN_CPU_CAPABILITY': 'default', 'MKL_CBWR': None} vs reference None" in notes
    assert not any(note.startswith(("cpu", "seeds")) for note in notes)


def test_a_file_deleted_since_the_manifest_is_named_missing(tmp_path):
    """A file the manifest hashed that is gone from the run is reported missing, not as a size change."""
    run = tmp_path / "results" / "r"
    run.mkdir(parents=True)
    (run / "figure.svg").write_text("<svg/>")
    (run / "table.csv").write_text("a,b\n")
    written = build_manifest(run, {"run": "r", "seed": 0, "data_seed": 0}, tmp_path, [], 1, [])
    (run / "figure.svg").unlink()
    result = audit(written, Reference(written, None, None), SETTINGS, run)
    assert "figure.svg: missing since the manifest was written" in result.failures
    assert result.failures[-1].endswith(f"rm -r {run / 'figure.svg'}")


def test_equal_values_over_seeds_have_no_spread():
    """A metric the seed does not move (the model's zero-ablated cross-entropy) has sd exactly 0 in every
    seed, whatever its bits: numpy's std of three equal doubles is 2.2e-15 for about a quarter of them
    (the mean rounds one ulp away), which the e2e test once read as process-to-process noise."""
    value = 10.8  # np.array([10.8] * 3).std(ddof=1) == 2.18e-15
    tables = {seed: {"sae_eval/metrics.parquet": [{"sae": "a", "ce_zero": value, "fvu": 0.2 + seed / 100}]}
              for seed in range(3)}
    sd = dict(spread(tables).select("column", "sd").iter_rows())
    assert sd["ce_zero"] == 0.0 and sd["fvu"] == pytest.approx(0.01)


def test_p_values_and_matched_activity_comparisons_are_reported_not_audited():
    """A p-value is a function of an audited statistic and interval; a comparison within matched activity is
    over units that change with the SAE draw (its claim is audited): both are listed, neither fails a run."""
    seeds = seed_manifests()
    for seed, run in seeds.items():
        run["metrics"]["clamping/verdict.parquet"][0]["p_value"] = 0.5 + 0.01 * seed
        run["metrics"]["polysemanticity/comparison.parquet"] = [
            {"site": "mlp3", "sae": "resid1-topk", "baseline": "neurons", "score": "monosemanticity_matched",
             "difference": 0.1 + 0.001 * seed, "n_neurons": 100 + seed}]
    ref = Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}),
                    claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in seeds.items()}))
    run = seeds[1]
    run["metrics"]["clamping/verdict.parquet"][0]["p_value"] = 0.001
    run["metrics"]["polysemanticity/comparison.parquet"][0].update(difference=0.5, n_neurons=15)
    result = audit(run, ref, SETTINGS)
    assert result.passed, result.report()
    assert any(" p_value: 0.001 " in n and "reported, not audited: a p-value" in n for n in result.notes)
    assert any(" n_neurons: 15 " in n and "matched activity bins" in n for n in result.notes)
    run["metrics"]["clamping/verdict.parquet"][0]["value"] = 5.0  # the statistic itself still is audited
    assert not audit(run, ref, SETTINGS).passed


def test_a_claim_the_replicates_do_not_move_is_judged_by_its_own_interval():
    """A claim from a stage the replicates do not rerun has one value in every seed: no measured spread. A retrain
    elsewhere is taken to move it as much as its interval's half-width: clear of its bound by more, its verdict is
    audited; closer, it is fragile and its statistic must stay within that half-width."""
    seeds = seed_manifests()
    for run in seeds.values():  # the same in every seed, 0.05 from its bound, half-width 0.1
        run["metrics"]["claims.parquet"].append(claim("crosscoder.match", 0.15, "holds"))
    ref = Reference(seeds[0], spread({s: m["metrics"] for s, m in seeds.items()}),
                    claim_stability({s: pl.DataFrame(m["metrics"]["claims.parquet"]) for s, m in seeds.items()}))
    near = seeds[1]
    near["metrics"]["claims.parquet"][-1] = claim("crosscoder.match", 0.08, "inconclusive")
    result = audit(near, ref, SETTINGS)
    line = next(line for line in result.claims if "crosscoder.match" in line)
    assert result.passed and "fragile: holds 3, margin 0.05 <= its half-width (not replicated) 0.1" in line, line
    assert "statistic within 0.1 (its half-width (not replicated))" in line
    near["metrics"]["claims.parquet"][-1] = claim("crosscoder.match", 0.3, "holds")
    assert not audit(near, ref, SETTINGS).passed
