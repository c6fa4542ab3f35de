import json
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
import torch
from conftest import TEXT
from polars.testing import assert_frame_equal
from safetensors.torch import load_file

from mechinterp.logit_lens import LensSettings, lens_inputs, run_logit_lens
from mechinterp.model import encode
from mechinterp.tuned_lens import (
    BOS,
    OTHER,
    SINK,
    Translators,
    TunedLensSettings,
    heldout_kl,
    kl_to_final,
    main,
    position_kinds,
    train_translators,
    window_means,
)

LENS = LensSettings(top_k=5, corpus_windows=2, corpus_window_tokens=6,
                    prompts=[{"id": "capital", "text": "The capital of France is", "targets": [" Paris"]}])


def text_windows(tokenizer, n_pos: int = 16) -> np.ndarray:
    """The test corpus as windows [n, n_pos] of BOS + n_pos - 1 consecutive tokens."""
    stream = encode(tokenizer, " ".join(TEXT), prepend_bos=False)
    body = n_pos - 1
    n = len(stream) // body
    rows = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    return np.concatenate([np.full((n, 1), encode(tokenizer, "")[0]), rows], axis=1)


def settings(**changes) -> TunedLensSettings:
    base = {"train_tokens": 1024, "batch_sequences": 4, "lr": 3e-2, "eval_sequences": 4, "sink_norm_ratio": 5.0}
    return TunedLensSettings(**{**base, **changes})


def test_the_tuned_lens_at_initialisation_equals_the_logit_lens(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)
    inputs = lens_inputs(tiny_bridge.tokenizer, LENS, windows, windows.shape[1], seed=0)
    translators = Translators(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model)
    logit = run_logit_lens(tiny_bridge, inputs, LENS.top_k)
    tuned = run_logit_lens(tiny_bridge, inputs, LENS.top_k, translator=translators)
    for name in ("positions", "targets", "first_layer"):
        assert logit[name].height > 0
        assert_frame_equal(tuned[name], logit[name], check_exact=True)
    kl = heldout_kl(tiny_bridge, translators, windows[:3], batch_sequences=2, sink_norm_ratio=5.0)
    by_lens = [kl.filter(pl.col("lens") == lens).drop("lens") for lens in ("logit", "tuned")]
    assert_frame_equal(by_lens[0], by_lens[1], check_exact=True)


def test_training_lowers_heldout_kl_below_the_logit_lens(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)
    train, heldout = windows[:-6], windows[-6:]
    translators, training = train_translators(tiny_bridge, train, settings())
    n_layers = tiny_bridge.cfg.n_layers
    assert set(training["layer"]) == set(range(n_layers))  # every layer but the last is trained
    kl = heldout_kl(tiny_bridge, translators, heldout, batch_sequences=4, sink_norm_ratio=5.0)
    other = kl.filter(pl.col("position_kind") == "other").sort("layer")
    logit, tuned = (other.filter(pl.col("lens") == lens)["mean_kl"].to_numpy() for lens in ("logit", "tuned"))
    # a wrong gradient (its sign, or a loss that does not reach the translators) would raise the KL or leave it
    assert (tuned[:n_layers] < 0.7 * logit[:n_layers]).all(), (logit, tuned)
    assert tuned[n_layers] == pytest.approx(0.0, abs=1e-4) and logit[n_layers] == pytest.approx(0.0, abs=1e-4)
    first, last = (training.filter(pl.col("step") == s)["loss"].sum() for s in (0, training["step"].max()))
    assert last < first


def test_translators_round_trip_through_safetensors(tmp_path):
    translators = Translators(n_layers=3, d_model=8)
    with torch.no_grad():
        for p in translators.parameters():
            p.normal_()
    translators.save(tmp_path / "t.safetensors")
    assert set(load_file(tmp_path / "t.safetensors")) == {"weight", "bias"}
    loaded = Translators.load(tmp_path / "t.safetensors")
    assert loaded.n_layers == 3
    for name, p in translators.named_parameters():
        assert torch.equal(p, getattr(loaded, name))
    resid = torch.randn(4, 5, 8)
    assert torch.equal(loaded(resid), translators(resid))
    assert torch.equal(loaded(resid)[3], resid[3])  # the last layer is never translated
    assert not torch.equal(loaded(resid)[0], resid[0])


def test_positions_are_bos_sinks_and_others():
    norms = torch.tensor([[[0.5, 1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 1.0, 1.0]],      # layer 0: BOS even when small
                          [[50.0, 1.0, 30.0, 1.0, 1.0, 1.0, 4.99, 5.01, 0.9]]])  # layer 1: median 1
    direction = torch.nn.functional.normalize(torch.randn(2, 1, 9, 3), dim=-1)
    kinds = position_kinds(direction * norms[..., None], sink_norm_ratio=5.0)
    assert kinds[0, 0].tolist() == [BOS] + [OTHER] * 8
    assert kinds[1, 0].tolist() == [BOS, OTHER, SINK, OTHER, OTHER, OTHER, OTHER, SINK, OTHER]


def test_heldout_kl_counts_every_position_once(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)[:5]
    kl = heldout_kl(tiny_bridge, Translators(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model), windows,
                    batch_sequences=2, sink_norm_ratio=1.5)
    totals = kl.group_by("lens", "layer").agg(pl.col("n_tokens").sum())["n_tokens"]
    assert (totals == windows.size).all()
    assert (kl.filter(pl.col("position_kind") == "bos")["n_tokens"] == len(windows)).all()
    rows = kl.filter(pl.col("n_windows") >= 2)
    assert ((rows["ci_low"] <= rows["mean_kl"]) & (rows["mean_kl"] <= rows["ci_high"])).all()


def test_window_means_weigh_tokens_and_resample_windows():
    sums = np.array([[2.0, 6.0, 0.0], [3.0, 0.0, 0.0]])
    counts = np.array([[1.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    mean, low, high = window_means(sums, counts, n_boot=200, seed=0)
    assert mean.tolist() == [2.0, 3.0]  # (2 + 6) / (1 + 3): the mean over tokens, not over windows
    assert low[0] == 2.0 and high[0] == 2.0  # both windows with tokens have mean 2
    assert np.isnan(low[1]) and np.isnan(high[1])  # one window: no interval


def test_kl_to_final_is_zero_for_the_same_distribution_and_positive_otherwise():
    lp = torch.randn(4, 10).log_softmax(-1)
    assert torch.allclose(kl_to_final(lp, lp), torch.zeros(4))
    assert (kl_to_final(lp, torch.randn(4, 10).log_softmax(-1)) > 0).all()


def test_the_stage_writes_its_outputs(tiny_bridge, tiny_model_dir, tmp_path):
    windows = text_windows(tiny_bridge.tokenizer)
    split = np.where(np.arange(len(windows)) < len(windows) - 6, "train", "heldout")
    table = pl.DataFrame({"sequence": np.repeat(np.arange(len(windows)), windows.shape[1]),
                          "split": np.repeat(split, windows.shape[1])})
    np.save(tmp_path / "tokens.npy", windows.astype(np.int32))
    table.write_parquet(tmp_path / "table.parquet")
    out = tmp_path / "out"
    main(["--model", str(tiny_model_dir), "--tokens", str(tmp_path / "tokens.npy"), "--table",
          str(tmp_path / "table.parquet"), "--settings", json.dumps(asdict(settings(train_tokens=160))),
          "--lens-settings", json.dumps(asdict(LENS)), "--seed", "0", "--device", "cpu", "--threads", "1",
          "--out-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_windows"] == 10 and summary["steps"] == 3
    assert len(summary["final_loss"]) == tiny_bridge.cfg.n_layers
    assert pl.read_parquet(out / "heldout_kl.parquet")["n_windows"].max() == 4
    assert pl.read_parquet(out / "first_layer.parquet").height == 3  # the prompt's target and two corpus windows
    assert Translators.load(out / "translators.safetensors").n_layers == tiny_bridge.cfg.n_layers
    assert pl.read_parquet(out / "training.parquet").columns == ["layer", "step", "loss"]
