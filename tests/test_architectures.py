"""Models of architectures the workflow was not written for run the smoke DAG with no code change:
tiny randomly initialised GPT-2, GPT-NeoX (Pythia's) and Qwen2 models, saved as Hugging Face folders
with the real tokenizer, through `model.source: local`. GPT-2 runs the whole DAG; the other two run
every stage that reads the model (the notebooks, claims and toy model read only tables). The GPT-NeoX run also loads a pretrained
JumpReLU SAE in Gemma Scope's layout from a prefilled Hugging Face cache, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from conftest import SMOKE, copy_workflow, snakemake

pytestmark = pytest.mark.e2e
# the outputs of every stage that runs the model (and of the stages they need)
MODEL_STAGE_OUTPUTS = ("sae_eval/metrics.parquet", "logit_lens/targets.parquet", "clamping/effects.parquet",
                       "browser/index.html", "crosscoder/metrics.parquet", "tuned_lens/heldout_kl.parquet")
SCOPE_REPO, SCOPE_REVISION, SCOPE_PATH = "tests/tiny-scope", "0123456789abcdef0123456789abcdef01234567", "layer_1/params.npz"


def build_model(architecture: str, tokenizer_folder: Path, folder: Path) -> Path:
    """A two-block model of `architecture` (d_model 64, MLP 256) with the smoke model's tokenizer."""
    import transformers

    common = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    config, model_class = {
        "gpt2": (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=128, **common),
                 transformers.GPT2LMHeadModel),
        "gpt_neox": (transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=256, max_position_embeddings=128, **common),
                     transformers.GPTNeoXForCausalLM),
        "qwen2": (transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                                           **common),
                  transformers.Qwen2ForCausalLM),
    }[architecture]
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_folder / name, folder / name)
    return folder


def write_gemma_scope_sae(cache_file: Path, hub_cache: Path, d_sae: int = 256) -> Path:
    """A JumpReLU SAE in Gemma Scope's params.npz layout for the cached site, placed in a Hugging Face
    cache as the hub would (models--<org>--<name>/snapshots/<revision>/<path>). Random directions, each
    latent's threshold at the 95th percentile of its pre-activation, so about 5% of latents fire."""
    x = torch.from_numpy(np.load(cache_file)[1::7].astype(np.float32))  # not only BOS rows
    generator = torch.Generator().manual_seed(0)
    w_enc = torch.randn(x.shape[1], d_sae, generator=generator) / x.shape[1] ** 0.5
    pre = x @ w_enc
    w_dec = torch.randn(d_sae, x.shape[1], generator=generator)
    arrays = {"W_enc": w_enc, "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True), "b_enc": torch.zeros(d_sae),
              "b_dec": x.mean(0), "threshold": pre.quantile(0.95, dim=0)}
    path = hub_cache / f"models--{SCOPE_REPO.replace('/', '--')}" / "snapshots" / SCOPE_REVISION / SCOPE_PATH
    path.parent.mkdir(parents=True)
    np.savez(path, **{name: a.numpy() for name, a in arrays.items()})
    return path


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox", "qwen2"])
def test_a_new_architecture_runs_the_smoke_dag(architecture, smoke_run, tmp_path, monkeypatch):
    workdir = copy_workflow(tmp_path / "repo")
    run = f"tiny-{architecture}"
    results = workdir / "results" / run
    # the pinned wheels (corpus, lexicons) of the smoke run, so this test needs no network
    shutil.copytree(smoke_run / "results" / "smoke" / "downloads", results / "downloads")
    folder = build_model(architecture, smoke_run / "results" / "smoke" / "model", tmp_path / architecture)
    sites = [{"site": "resid", "layer": 1}, {"site": "mlp", "layer": 1, "architecture": "relu", "d_sae": 1024}]
    overlay = {"run": run, "model": {"name": run, "source": "local", "local": {"path": str(folder)}},
               "sae": {"sites": sites}, "clamping": {"sae": "resid1-topk"}, "crosscoder": {"sites": ["resid1", "mlp1"]},
               # the toy model does not read the model: as small as it runs; the tuned lens on two windows
               # (one to fit the translators, one for their stopping rule)
               "toy": {"sparsities": [0.99], "phase_grid": 2, "steps": 50, "sae_steps": 50},
               "tuned_lens": {"train_tokens": 128},
               # one thread a job, two jobs at a time: a tiny model's job is mostly Python's start-up
               "resources": {"threads": 1}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(overlay))
    with_overlay = ["--cores", "2", "--configfile", SMOKE[1], str(config)]

    if architecture == "gpt_neox":
        snakemake(workdir, *with_overlay, "--", f"results/{run}/activations/resid1.npy")
        hub_cache = tmp_path / "hf-cache"
        write_gemma_scope_sae(results / "activations" / "resid1.npy", hub_cache)
        monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        sites.append({"site": "resid", "layer": 1, "architecture": "jumprelu",
                      "pretrained": {"format": "gemma_scope", "path": SCOPE_PATH,
                                     "hub": {"repo_id": SCOPE_REPO, "revision": SCOPE_REVISION}}})
        config.write_text(yaml.safe_dump(overlay))

    if architecture == "gpt2":  # the whole DAG once, notebooks and manifest included
        snakemake(workdir, *with_overlay)
        manifest = json.loads((results / "MANIFEST.json").read_text())
        assert manifest["config"]["model"]["source"] == "local"
        assert (results / "figures" / "crosscoder.html").is_file()
    else:  # what reads the model: the figures, claims and the toy model read only tables
        snakemake(workdir, *with_overlay, "--", *(f"results/{run}/{name}" for name in MODEL_STAGE_OUTPUTS))
    metrics = pl.read_parquet(results / "sae_eval" / "metrics.parquet")
    expected = {"resid1-topk", "mlp1-relu"} | ({"resid1-jumprelu"} if architecture == "gpt_neox" else set())
    assert set(metrics["sae"]) == expected
    assert metrics["fvu"].is_finite().all()
    n_layers = json.loads((results / "model" / "SOURCE.json").read_text())["n_layers"]
    assert n_layers == 2
    assert pl.read_parquet(results / "logit_lens" / "targets.parquet")["layer"].n_unique() == n_layers + 1
    assert pl.read_parquet(results / "clamping" / "effects.parquet").height > 0
    assert (results / "browser" / "index.html").is_file()
    assert pl.read_parquet(results / "crosscoder" / "metrics.parquet")["dictionary"].to_list() == [
        "crosscoder", "resid1-topk", "crosscoder", "mlp1-relu"]
    assert pl.read_parquet(results / "tuned_lens" / "heldout_kl.parquet")["layer"].drop_nulls().n_unique() == n_layers + 1
    if architecture == "gpt_neox":
        loaded = json.loads((results / "saes" / "resid1-jumprelu" / "training_summary.json").read_text())
        assert loaded["pretrained"]["hub"]["repo_id"] == SCOPE_REPO and loaded["total_steps"] == 0
        assert (results / "benchmarks" / "load_sae" / "resid1-jumprelu.tsv").is_file()  # the job ran
        assert metrics.filter(pl.col("sae") == "resid1-jumprelu")["architecture"].item() == "jumprelu"
