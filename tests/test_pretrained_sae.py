"""Loading pretrained SAEs: SAELens folders and Gemma Scope's params.npz, from a path or from a
prefilled Hugging Face cache offline, converted to the workflow's SAEs with the same latents."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from mechinterp.config import load_default_config, sae_specs, validate_config
from mechinterp.errors import UserError
from mechinterp.pretrained_sae import PretrainedSettings, fetch_pretrained, read_gemma_scope, read_saelens
from mechinterp.saes import JumpReluSAE, ReluSAE, TopKSAE

from conftest import REPO, topk_sae

SETTINGS = {"k": 4, "auxk_coefficient": 1 / 32, "auxk_k": 8, "l1_coefficient": 5.0, "l1_warmup_fraction": 0.02}
REVISION = "89abcdef0123456789abcdef0123456789abcdef"


def random_arrays(d_in: int = 16, d_sae: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
            "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g),
            "threshold": torch.rand(d_sae, generator=g)}


def in_hub_cache(cache, repo_id: str, path: str):
    """Where the hub client keeps `path` of `repo_id` at REVISION in the cache folder `cache`."""
    target = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION / path
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def test_a_saved_sae_loads_back_with_the_same_latents(tmp_path):
    sae = topk_sae(16, 48, 4)
    torch.nn.init.normal_(sae.W_enc)
    torch.nn.init.normal_(sae.b_dec)
    sae.save(tmp_path / "sae", {"hook_name": "blocks.1.hook_resid_post"})
    loaded = read_saelens(tmp_path / "sae", SETTINGS, "sae.sites.0.pretrained")
    x = torch.randn(10, 16)
    assert isinstance(loaded, TopKSAE) and loaded.settings.k == 4
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_a_pretrained_sae_with_a_broken_cfg_json_is_refused_by_name(tmp_path):
    topk_sae(16, 48, 4).save(tmp_path / "sae", {})
    for text, problem in (("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")):
        (tmp_path / "sae" / "cfg.json").write_text(text)
        with pytest.raises(UserError, match=rf"sae\.sites\.0\.pretrained: .*cfg\.json {problem}"):
            read_saelens(tmp_path / "sae", SETTINGS, "sae.sites.0.pretrained")


def test_a_pretrained_sae_holding_nan_is_refused_by_name(tmp_path):
    arrays = {k: v for k, v in random_arrays().items() if k != "threshold"}
    arrays["W_enc"][0, 0] = float("nan")
    folder = tmp_path / "standard"
    folder.mkdir()
    save_file(arrays, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48,
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    with pytest.raises(UserError, match=r"sae\.sites\.0\.pretrained: the SAE's W_enc hold NaN or infinite values"):
        read_saelens(folder, SETTINGS, "sae.sites.0.pretrained")


def test_a_foreign_saelens_folder_converts_its_input_bias_and_dtype(tmp_path):
    """A SAELens 'standard' SAE as another tool writes it: bfloat16 weights, no b_dec subtraction,
    only the format's own cfg.json keys."""
    arrays = {k: v for k, v in random_arrays().items() if k != "threshold"}
    folder = tmp_path / "standard"
    folder.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in arrays.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 16, "d_sae": 48, "dtype": "bfloat16", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    sae = read_saelens(folder, SETTINGS, "sae.sites.0.pretrained")
    x = torch.randn(10, 16)
    w = {k: v.to(torch.bfloat16).float() for k, v in arrays.items()}
    assert isinstance(sae, ReluSAE) and sae.W_enc.dtype == torch.float32
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]), atol=1e-4, rtol=1e-4)


def test_a_normalising_saelens_folder_is_refused(tmp_path):
    folder = tmp_path / "normed"
    folder.mkdir()
    save_file({k: v for k, v in random_arrays().items() if k != "threshold"}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48,
                                                 "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(UserError, match=r"sae.sites.0.pretrained: the SAE normalises its inputs"):
        read_saelens(folder, SETTINGS, "sae.sites.0.pretrained")


def test_gemma_scope_params_give_jumprelu_latents(tmp_path):
    arrays = random_arrays()
    path = tmp_path / "params.npz"
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    sae = read_gemma_scope(path, SETTINGS, "sae.sites.0.pretrained")
    x = torch.randn(10, 16)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]  # Gemma Scope's encoder reads x itself
    expected = pre * (pre > arrays["threshold"])
    assert isinstance(sae, JumpReluSAE)
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-4, rtol=1e-4)
    assert 0 < (expected > 0).float().mean() < 1
    # and it survives the workflow's own SAELens format
    sae.save(tmp_path / "saved", {})
    again = read_saelens(tmp_path / "saved", SETTINGS, "x")
    torch.testing.assert_close(again.encode(x), sae.encode(x))


def test_gemma_scope_without_its_arrays_or_with_pickles_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=np.zeros((4, 8)))
    with pytest.raises(UserError, match=r"has no arrays \['W_dec', 'b_dec', 'b_enc', 'threshold'\]"):
        read_gemma_scope(path, SETTINGS, "sae.sites.0.pretrained")
    arrays = {k: v.numpy() for k, v in random_arrays().items()}
    np.savez(path, **{**arrays, "threshold": np.array([object()] * 48, dtype=object)})
    with pytest.raises(UserError, match=r"not a readable .npz without pickles"):
        read_gemma_scope(path, SETTINGS, "sae.sites.0.pretrained")


@pytest.mark.parametrize("fmt", ["saelens", "gemma_scope"])
def test_hub_sources_read_a_prefilled_cache_offline(fmt, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # the hub client reads both at import, which another test may have done
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "someone/saes"
    if fmt == "gemma_scope":
        path = "layer_1/width_16k/average_l0_9/params.npz"
        np.savez(in_hub_cache(tmp_path / "hub", repo, path), **{k: v.numpy() for k, v in random_arrays().items()})
    else:
        path = "blocks.1.hook_resid_post"
        sae = topk_sae(16, 48, 4)
        sae.save(in_hub_cache(tmp_path / "hub", repo, path + "/x").parent, {})
    settings = PretrainedSettings(format=fmt, path=path, hub={"repo_id": repo, "revision": REVISION})
    source = fetch_pretrained(settings, "sae.sites.2.pretrained")
    assert source.exists() and str(source).startswith(str(tmp_path / "hub"))
    missing = PretrainedSettings(format=fmt, path="layer_9/nothing", hub={"repo_id": repo, "revision": REVISION})
    with pytest.raises(UserError, match=r"sae.sites.2.pretrained: 'layer_9/nothing' of someone/saes at revision "
                                        r"\w+ is not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):
        fetch_pretrained(missing, "sae.sites.2.pretrained")


@pytest.mark.parametrize("hub", ["left out", None])
def test_the_readme_s_local_form_validates_and_loads(tmp_path, hub):
    """Issue 30: the README's `pretrained: {format: saelens, path: ...}` with no `hub` raised a TypeError, and
    `hub: null` was refused by the schema. Both name a local folder, read as such."""
    topk_sae(16, 48, 4).save(tmp_path / "sae", {"hook_name": "blocks.2.hook_resid_post"})
    pretrained = {"format": "saelens", "path": str(tmp_path / "sae"), **({} if hub == "left out" else {"hub": hub})}
    config = load_default_config()
    config["sae"]["sites"].append({"site": "resid", "layer": 2, "pretrained": pretrained})
    entry = sae_specs(validate_config(config, REPO / "workflow/schemas/config.schema.yaml"))["resid2-topk"]
    settings = PretrainedSettings(**entry.pretrained)
    assert settings.hub is None and fetch_pretrained(settings, "sae.sites.4.pretrained") == tmp_path / "sae"
    assert isinstance(read_saelens(tmp_path / "sae", entry.settings, "sae.sites.4.pretrained"), TopKSAE)


def test_a_local_path_that_does_not_exist_names_the_key(tmp_path):
    settings = PretrainedSettings(format="gemma_scope", path=str(tmp_path / "nope.npz"), hub=None)
    with pytest.raises(UserError, match=r"sae.sites.0.pretrained.path '.*nope.npz' does not exist"):
        fetch_pretrained(settings, "sae.sites.0.pretrained")


def test_the_settings_dataclass_agrees_with_the_schema():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    entry = schema["properties"]["sae"]["properties"]["sites"]["items"]["properties"]["pretrained"]
    assert {f.name for f in fields(PretrainedSettings)} == set(entry["properties"])
