"""The activation cache: exact round trip, one pass for several sites, and refusal of bad caches."""

import json

import numpy as np
import pytest
import torch

from mechinterp.activations import ActivationCache, cache_activations, header_path
from mechinterp.sites import Site
from mechinterp.errors import UserError

from conftest import write_cache

PROVENANCE = {"model_sha256": "m", "token_table_sha256": "t", "tokens_sha256": "x"}


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(2, 300, size=(6, 12)).astype(np.int32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cache_round_trips_exactly(tiny_bridge, windows, tmp_path, dtype):
    sites = [Site("resid", 0), Site("mlp", 1), Site("resid", 1)]
    paths = {s: tmp_path / f"{s.id}.npy" for s in sites}
    cache_activations(tiny_bridge, windows, sites, paths, dtype, batch_sequences=4, provenance=PROVENANCE)
    names = {s.hook_name for s in sites}
    _, reference = tiny_bridge.run_with_cache(torch.from_numpy(windows.astype(np.int64)),
                                              names_filter=lambda n: n in names)
    torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
    for site in sites:
        cache = ActivationCache.open(paths[site])
        expected = reference[site.hook_name].reshape(windows.size, -1).to(torch_dtype).float()
        assert cache.header["shape"] == list(expected.shape) and cache.header["hook"] == site.hook_name
        assert torch.equal(cache.rows(slice(None)), expected)
        rows = np.array([0, 5, 17, 71])
        assert torch.equal(cache.rows(rows), expected[rows])


def test_layer_the_model_lacks_is_refused(tiny_bridge, windows, tmp_path):
    with pytest.raises(UserError, match=r"sae\.sites: layer 7 \(resid7\) does not exist; the model has layers 0\.\.1"):
        cache_activations(tiny_bridge, windows, [Site("resid", 7)], {Site("resid", 7): tmp_path / "r7.npy"},
                          "float16", 4, PROVENANCE)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_truncated_or_foreign_caches_are_refused(tmp_path):
    path = tmp_path / "resid0.npy"
    np.save(path, np.ones((10, 4), np.float16))
    with pytest.raises(UserError, match=r"incomplete.*header resid0\.json missing"):
        ActivationCache.open(path)
    write_cache(path, np.ones((10, 4), np.float16))
    header = json.loads(header_path(path).read_text())
    header["shape"] = [12, 4]
    header_path(path).write_text(json.dumps(header))
    with pytest.raises(UserError, match=r"has shape \[10, 4\].*header says \[12, 4\]"):
        ActivationCache.open(path)
    write_cache(path, np.ones((10, 4), np.float16))
    table = tmp_path / "token_table.parquet"
    table.write_bytes(b"another table")
    with pytest.raises(UserError, match=r"made from another token table"):
        ActivationCache.open(path, table)
    path.write_bytes(path.read_bytes()[:-20])  # cut short, as by a full disk
    with pytest.raises(UserError, match=r"cannot be read|truncated"):
        ActivationCache.open(path)


def test_nan_activations_are_refused(tmp_path):
    array = np.ones((5000, 4), np.float16)
    array[3, 2] = np.nan
    write_cache(tmp_path / "resid0.npy", array)
    with pytest.raises(UserError, match=r"NaN or infinite"):
        ActivationCache.open(tmp_path / "resid0.npy")
    array[3, 2], array[4500, 1] = 0, np.inf  # beyond what opening checks: caught when read
    write_cache(tmp_path / "resid0.npy", array)
    cache = ActivationCache.open(tmp_path / "resid0.npy")
    with pytest.raises(UserError, match=r"NaN or infinite"):
        list(cache.chunks(np.arange(5000), chunk=1000))
