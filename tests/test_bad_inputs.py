"""The catalogue of bad inputs at run time, through each stage's command line as the workflow runs
it: each gives exit status 2 and an error naming the problem and the fix, and leaves no output; a
stage killed in the middle leaves nothing under its final name and reruns cleanly. (Config errors
are in test_config.py, download and model-folder errors in test_fetch.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import re
import shutil

import numpy as np
import pytest
import torch

from mechinterp.audit import main as audit_main
from mechinterp.errors import UserError, exit_status
from mechinterp.manifest import verify_artifacts
from mechinterp.polysemanticity import main as polysemanticity_main
from mechinterp.files import sha256_file, write_json

from conftest import topk_sae, write_cache
from test_polysemanticity import lexicons, planted_neurons, planted_table

SPEC = {"split": "all", "active_fraction": 0.2, "min_active": 10, "min_concept_words": 3,
        "exclude_frequent_words": 0, "concept_unit_min_words": 3, "top_contexts": 4, "context_before": 3,
        "context_after": 2, "concept_units": 3, "bootstrap_samples": 100, "controls": True,
        "matched_bin_min_units": 5}


@pytest.fixture
def site(tmp_path):
    """A consistent site: token table, lexicons, cache and an SAE trained (here: initialised) on it."""
    table = planted_table()
    table.write_parquet(tmp_path / "table.parquet")
    lexicons().write_parquet(tmp_path / "lexicons.parquet")
    write_cache(tmp_path / "mlp0.npy", planted_neurons(table).astype(np.float16), site="mlp0",
                token_table_sha256=sha256_file(tmp_path / "table.parquet"))
    sae = topk_sae(6, 12, k=2)
    sae.initialise(torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.Generator().manual_seed(0))
    sae.save(tmp_path / "sae", {"hook_name": "blocks.0.mlp.hook_post"})
    write_json({"outlier_threshold": 1e9, "site": "mlp0"}, tmp_path / "sae" / "training_summary.json")
    return tmp_path


def polysemanticity(site, **override) -> tuple[int, list[str]]:
    args = {"--cache": site / "mlp0.npy", "--table": site / "table.parquet", "--lexicons": site / "lexicons.parquet",
            "--settings": json.dumps(SPEC), "--seed": "0", "--threads": "1", "--units": site / "out" / "units.parquet",
            "--concepts": site / "out" / "concepts.parquet", "--comparison": site / "out" / "comparison.parquet",
            "--codes": site / "out" / "codes", **override}
    argv = ["--saes", str(site / "sae"), "--sae-ids", "mlp0-topk"]
    for key, value in args.items():
        argv += [key, str(value)]
    return exit_status(polysemanticity_main, argv), sorted(p.name for p in (site / "out").glob("*")) if (site / "out").exists() else []


def test_the_consistent_site_scores(site):
    assert polysemanticity(site) == (0, ["codes", "comparison.parquet", "concepts.parquet", "units.parquet"])


def test_no_unit_active_on_min_active_tokens_names_the_key(site, capsys):
    code, outputs = polysemanticity(site, **{"--settings": json.dumps({**SPEC, "min_active": 10**8})})
    assert code == 2 and outputs == []
    assert re.search(r"0 of the \d+ units of \S+ are active on polysemanticity\.min_active = 100000000 of the \d+ "
                     r"tokens scored, so none can be scored; lower polysemanticity\.min_active", capsys.readouterr().err)


def truncate(site):
    path = site / "mlp0.npy"
    path.write_bytes(path.read_bytes()[:-100])


def drop_header(site):
    (site / "mlp0.json").unlink()


def other_table(site):
    table = planted_table(seed=9)
    table.write_parquet(site / "table.parquet")


def nan_values(site):
    array = np.load(site / "mlp0.npy")
    array[7, 1] = np.nan
    np.save(site / "mlp0.npy", array)


def no_sae_weights(site):
    (site / "sae" / "sae_weights.safetensors").unlink()


def truncated_sae_weights(site):
    path = site / "sae" / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:40])


def header_shape(site):
    header = json.loads((site / "mlp0.json").read_text())
    header["shape"] = [header["shape"][0] + 10, header["shape"][1]]
    (site / "mlp0.json").write_text(json.dumps(header))


@pytest.mark.parametrize(("damage", "message"), [
    (truncate, r"mlp0\.npy (cannot be read|.*truncated or corrupt).*\. Fix: delete what is broken .*rm -r \S*mlp0\.npy"),
    (drop_header, r"incomplete \(array or header mlp0\.json missing\)\. Fix: .*rm -r \S*mlp0\.npy \S*mlp0\.json"),
    (other_table, r"made from another token table .*\. Fix: .*rm -r \S*mlp0\.npy"),
    (nan_values, r"holds NaN or infinite values .*Fix: .*rm -r \S*mlp0\.npy"),
    (no_sae_weights, r"is not a saved SAE \(needs cfg\.json and sae_weights\.safetensors\)\. Fix: .*rm -r \S*sae$"),
    (truncated_sae_weights, r"sae_weights\.safetensors does not load \(SafetensorError: .*\)\. Fix: .*rm -r \S*sae$"),
    (header_shape, r"header says \[4010, 6\] / float16: truncated or corrupt"),
])
def test_damaged_inputs_are_refused_with_the_fix(site, capsys, damage, message):
    damage(site)
    code, outputs = polysemanticity(site)
    assert code == 2 and outputs == []
    assert re.search(message, capsys.readouterr().err.strip())


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def cut_to(fraction):
    def cut(path):
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    return cut


def grow(path):
    path.write_bytes(path.read_bytes() + b"\0" * 64)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("broken", "damage", "problem"), [
    ("mlp0.npy", random_bytes, r"mlp0\.npy: not a readable \.npy array"),
    ("mlp0.npy", cut_to(0.5), r"mlp0\.npy: 24\d\d\d bytes, but its header \[4000, 6\] float16 needs 48\d\d\d"),
    ("mlp0.npy", grow, r"needs 48\d\d\d"),
    ("sae/sae_weights.safetensors", cut_to(0.2), r"sae_weights\.safetensors: cannot be read \(SafetensorError"),
    ("sae/cfg.json", lambda p: p.write_text('{"architecture": "topk", "d_in": 6, "d_sae": 99}'), r"does not load as an SAE"),
    ("table.parquet", cut_to(0.9), r"table\.parquet: cannot be read"),
    ("model/model.safetensors", flip_last_byte, r"model\.safetensors: sha256 differs from the one SOURCE\.json recorded"),
    ("lexicons.parquet", lambda p: p.unlink(), r"lexicons\.parquet: missing"),
])
def test_the_manifest_verifies_each_stage_output(site, tiny_model_dir, broken, damage, problem):
    model = shutil.copytree(tiny_model_dir, site / "model")
    write_json({"files_sha256": {"model.safetensors": sha256_file(model / "model.safetensors")}}, model / "SOURCE.json")
    artifacts = [site / name for name in ("mlp0.npy", "mlp0.json", "sae", "table.parquet", "lexicons.parquet", "model")]

    def hashes():
        return {str(p): sha256_file(p) for p in site.rglob("*") if p.is_file()}

    verify_artifacts(artifacts, hashes())  # all sound: no error
    damage(site / broken)
    with pytest.raises(UserError) as error:
        verify_artifacts(artifacts, hashes())
    message = str(error.value)
    assert re.search(problem, message), message
    artifact = next(a for a in artifacts if (site / broken).is_relative_to(a))
    assert message.endswith(f"rm -r {artifact}") and "rerun the same snakemake command" in message


def test_bad_references_are_refused(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"files": {}, "metrics": {}, "environment": {}, "config": {}}))
    for name, text in (("broken", '{"files": '), ("other", json.dumps({"some": "json"}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "MANIFEST.json").write_text(text)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "MANIFEST.json").write_text((tmp_path / "run.json").read_text())
    (tmp_path / "half" / "replicates").mkdir()
    (tmp_path / "half" / "replicates" / "spread.parquet").write_bytes(b"")
    settings = json.dumps({"reference": None, "spread_multiple": 6, "floor": {"rel": 0, "abs": 0}, "count_floor": 1})
    base = ["--manifest", str(tmp_path / "run.json"), "--settings", settings]
    for reference, message in (("absent", "does not exist"), ("broken", "is not valid JSON"),
                               ("other", "has no 'files' section"), ("run.json", "is a file; a reference is a folder"),
                               ("half", "has only one of replicates/spread.parquet and replicates/claims.parquet")):
        assert exit_status(audit_main, [*base, "--reference", str(tmp_path / reference), "--out",
                                        str(tmp_path / "audit.txt")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "audit.txt").exists()


def test_a_stage_killed_midway_leaves_nothing_and_reruns(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_json({"files_sha256": {"model.safetensors": sha256_file(model / "model.safetensors")}}, model / "SOURCE.json")
    tokens = np.random.default_rng(0).integers(3, 300, (300, 32)).astype(np.int32)
    tokens[:, 0] = 1
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "table.parquet").write_bytes(b"a token table")
    out = tmp_path / "activations"
    command = [sys.executable, "-m", "mechinterp.activations", "--model", str(model),
               "--tokens", str(tmp_path / "tokens.npy"), "--table", str(tmp_path / "table.parquet"),
               "--sites", "resid0", "mlp1", "--settings", '{"dtype": "float16", "batch_sequences": 1}',
               "--device", "cpu", "--threads", "1", "--out-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.partial-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # well into writing
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []  # no final output
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["mlp1.json", "mlp1.npy", "resid0.json", "resid0.npy"]
    assert np.load(out / "resid0.npy", mmap_mode="r").shape == (300 * 32, 32)
