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
    cache_residuals,
    constant_log_probs,
    heldout_kl,
    kl_to_final,
    least_squares_start,
    main,
    output_log_probs,
    position_kinds,
    stop_rule,
    train_jointly,
    train_translators,
    window_means,
)

LENS = LensSettings(top_k=5, corpus_windows=2, corpus_window_tokens=6, random_tokens=10,
                    prompts=[{"id": "capital", "text": "The capital of France is", "targets": [" Paris"]}])


def text_windows(tokenizer, n_pos: int = 16) -> np.ndarray:
    """The test corpus as windows [n, n_pos] of BOS + n_pos - 1 consecutive tokens."""
    stream = encode(tokenizer, " ".join(TEXT), prepend_bos=False)
    body = n_pos - 1
    n = len(stream) // body
    rows = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    return np.concatenate([np.full((n, 1), encode(tokenizer, "")[0]), rows], axis=1)


def settings(**changes) -> TunedLensSettings:
    base = {"train_tokens": 1024, "batch_sequences": 4, "lr": 3e-2, "eval_sequences": 4, "sink_norm_ratio": 5.0,
            "validation_windows": 2, "batch_tokens": 32, "eval_every": 2, "patience": 2, "min_improvement": 0.0,
            "max_steps": 8}
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
    lenses = {"tuned": translators, "bias_only": Translators(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model, affine=False)}
    constant = torch.zeros(tiny_bridge.cfg.d_vocab).log_softmax(-1)
    kl = heldout_kl(tiny_bridge, lenses, constant, windows[:3], batch_sequences=2, sink_norm_ratio=5.0)
    by_lens = [kl.filter(pl.col("lens") == lens).drop("lens") for lens in ("logit", "tuned", "bias_only")]
    assert_frame_equal(by_lens[0], by_lens[1], check_exact=True)
    assert_frame_equal(by_lens[2], by_lens[1], check_exact=True)


def trained(bridge, windows: np.ndarray, **changes):
    resid, kinds = cache_residuals(bridge, windows, batch_sequences=4, sink_norm_ratio=5.0)
    return train_translators(bridge, resid, kinds, n_validation=2, settings=settings(**changes), seed=0)


def test_training_lowers_heldout_kl_below_the_logit_lens_and_the_baselines(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)
    train, heldout = windows[:-6], windows[-6:]
    translators, constant, training = trained(tiny_bridge, train)
    n_layers = tiny_bridge.cfg.n_layers
    assert set(training["layer"]) == set(range(n_layers))  # every layer but the last is trained
    assert set(training["lens"]) == {"tuned", "bias_only"}
    kl = heldout_kl(tiny_bridge, translators, constant, heldout, batch_sequences=4, sink_norm_ratio=5.0)
    other = kl.filter((pl.col("position_kind") == "other") & pl.col("layer").is_not_null()).sort("layer")
    logit, tuned, bias = (other.filter(pl.col("lens") == lens)["mean_kl"].to_numpy() for lens in ("logit", "tuned", "bias_only"))
    # a wrong gradient (its sign, or a loss that does not reach the translators) would raise the KL or leave it
    assert (tuned[:n_layers] < 0.7 * logit[:n_layers]).all(), (logit, tuned)
    assert (bias[:n_layers] < logit[:n_layers]).all(), (logit, bias)
    assert tuned[n_layers] == pytest.approx(0.0, abs=1e-4) and logit[n_layers] == pytest.approx(0.0, abs=1e-4)
    for (lens, layer), rows in training.group_by("lens", "layer"):
        val = rows.filter(pl.col("val_loss").is_not_null()).sort("step")
        kept = rows.filter(pl.col("kept"))
        assert kept.height == 1 and kept["val_loss"].item() == val["val_loss"].min()  # the best evaluation is kept
        assert rows["stopped_by"].n_unique() == 1


def test_the_stop_rule_stops_on_a_plateau_and_not_on_a_falling_curve():
    falling = [3.0 * 0.9**i for i in range(12)]
    assert not any(stop_rule(falling[: i + 1], patience=2, min_improvement=0.01) for i in range(12))
    plateau = [3.0, 2.0, 1.5, 1.499, 1.4995]
    assert [stop_rule(plateau[: i + 1], patience=2, min_improvement=0.01) for i in range(5)] == [False] * 4 + [True]
    rising = [1.0, 1.2, 1.3]
    assert stop_rule(rising, patience=2, min_improvement=0.0)
    assert not stop_rule([1.0, 0.99, 0.98], patience=2, min_improvement=0.0)  # any drop counts at 0
    assert not stop_rule([1.0, 1.1], patience=2, min_improvement=0.0)  # not enough evaluations yet


def test_layers_stop_by_the_rule_on_a_plateau_and_by_the_cap_otherwise(tiny_bridge):
    """With a zero learning rate the validation KL never moves (a planted plateau): every layer stops by
    the rule after patience + 1 evaluations; with a huge patience every layer runs to the cap."""
    windows = text_windows(tiny_bridge.tokenizer)[:12]
    _, _, flat = trained(tiny_bridge, windows, lr=1e-12, max_steps=20, eval_every=2, patience=2)
    assert set(flat["stopped_by"]) == {"rule"}
    assert (flat.group_by("lens", "layer").agg(pl.col("step").max())["step"] == 4).all()  # evaluations at 0, 2, 4
    _, _, capped = trained(tiny_bridge, windows, max_steps=4, eval_every=2, patience=50)
    assert set(capped["stopped_by"]) == {"cap"}
    steps = capped.filter(pl.col("train_loss").is_not_null()).group_by("lens", "layer").len()["len"]
    assert (steps == 4).all()
    assert capped.filter(pl.col("step") == 4)["val_loss"].is_not_null().all()  # evaluated after the last step


def test_a_translator_trains_the_same_alone_as_decoded_with_the_others(tiny_bridge):
    """Translators are decoded together for speed; each must still see only its own loss and samples: one
    layer trained alone ends where it ends trained beside every other layer (a gradient leaking between
    translators, or a sample drawn from another layer's positions, would move it)."""
    windows = text_windows(tiny_bridge.tokenizer)[:12]
    resid, kinds = cache_residuals(tiny_bridge, windows, batch_sequences=4, sink_norm_ratio=5.0)
    n_layers, d_model = resid.shape[0] - 1, resid.shape[-1]
    flat = resid.reshape(n_layers + 1, -1, d_model)
    final = output_log_probs(tiny_bridge, flat[-1])
    index = torch.arange(flat.shape[1])
    fit, validation = [index[32:]] * n_layers, [index[:32]] * n_layers
    start = {(layer, lens): least_squares_start(flat[layer][fit[layer]], flat[-1][fit[layer]], affine=lens == "tuned")
             for layer in range(n_layers) for lens in ("tuned", "bias_only")}
    together, rows = train_jointly(tiny_bridge, flat, final, fit, validation, start, settings(max_steps=6), seed=3)
    alone, alone_rows = train_jointly(tiny_bridge, flat, final, fit, validation,
                                      {pair: start[pair] for pair in start if pair[0] == 1}, settings(max_steps=6), seed=3)
    for lens in ("tuned", "bias_only"):
        for joint, single in zip(together[(1, lens)], alone[(1, lens)], strict=True):
            assert (joint is None) == (single is None)
            if joint is not None:
                assert torch.allclose(joint, single, atol=1e-5, rtol=1e-4)
    layer_rows = [row for row in rows if row["layer"] == 1]
    for joint, single in zip(layer_rows, alone_rows, strict=True):
        assert (joint["lens"], joint["step"], joint["kept"]) == (single["lens"], single["step"], single["kept"])
        for loss in ("train_loss", "val_loss"):
            assert (joint[loss] is None) == (single[loss] is None)
            assert joint[loss] is None or joint[loss] == pytest.approx(single[loss], rel=1e-4)
    moved = [row["train_loss"] for row in rows if row["layer"] == 0 and row["lens"] == "bias_only"]
    assert moved[0] != moved[-1]  # the translators did train


def test_the_bias_only_translator_changes_only_a_bias(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)[:12]
    translators, _, _ = trained(tiny_bridge, windows, max_steps=4)
    bias_only = translators["bias_only"]
    assert bias_only.weight is None and [n for n, _ in bias_only.named_parameters()] == ["bias"]
    assert bias_only.bias.abs().sum() > 0
    resid = torch.randn(tiny_bridge.cfg.n_layers + 1, 3, tiny_bridge.cfg.d_model)
    shifted = bias_only(resid)
    for layer in range(tiny_bridge.cfg.n_layers):
        assert torch.allclose(shifted[layer] - resid[layer], bias_only.bias[layer].expand(3, -1), atol=1e-6)
    assert torch.equal(shifted[-1], resid[-1])


def test_the_constant_baseline_is_the_mean_output_distribution(tiny_bridge):
    """The constant's held-out KL equals KL(output || mean of the training outputs), computed by hand,
    at every layer; its training log-probs are the log of the fit windows' mean output after BOS."""
    windows = text_windows(tiny_bridge.tokenizer)
    train, heldout = windows[:10], windows[-3:]
    translators, constant, _ = trained(tiny_bridge, train, max_steps=0)
    with torch.no_grad():
        fit_probs = tiny_bridge(torch.from_numpy(train[2:])).float().softmax(-1)[:, 1:].reshape(-1, tiny_bridge.cfg.d_vocab)
        assert torch.allclose(constant.exp(), fit_probs.mean(0), atol=1e-6)
        out = tiny_bridge(torch.from_numpy(heldout)).float().softmax(-1)
    kl = heldout_kl(tiny_bridge, translators, constant, heldout, batch_sequences=2, sink_norm_ratio=1e9)
    # sink_norm_ratio 1e9: no sinks, so `other` is every position after BOS
    by_hand = (out[:, 1:] * (out[:, 1:].log() - fit_probs.mean(0).log())).sum(-1).mean().item()
    rows = kl.filter((pl.col("lens") == "constant") & (pl.col("position_kind") == "other"))
    assert rows["mean_kl"].to_numpy() == pytest.approx(by_hand, rel=1e-4)


def test_heldout_kl_reads_each_layer_through_its_own_translator(tiny_bridge):
    """KL per layer and lens, by hand from the model's residuals: a translator applied to the wrong layer
    (a skipped or shifted layer) or the KL taken the other way round would not match."""
    from mechinterp.logit_lens import decode, residual_stream

    n_layers, d = tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model
    torch.manual_seed(0)
    tuned, bias_only = Translators(n_layers, d), Translators(n_layers, d, affine=False)
    with torch.no_grad():
        for p in [*tuned.parameters(), *bias_only.parameters()]:
            p.normal_(0, 0.3)
    windows = text_windows(tiny_bridge.tokenizer)[:3]
    constant = torch.randn(tiny_bridge.cfg.d_vocab).log_softmax(-1)
    kl = heldout_kl(tiny_bridge, {"tuned": tuned, "bias_only": bias_only}, constant, windows, batch_sequences=3,
                    sink_norm_ratio=1e9)
    with torch.no_grad():
        logits, resid = residual_stream(tiny_bridge, torch.from_numpy(windows))
        out = logits.float().log_softmax(-1)[:, 1:]
        for layer in range(n_layers + 1):
            h = resid[layer][:, 1:]
            if layer < n_layers:  # the translators written out: h + h W_l + b_l, and h + b_l
                translated = (h + h @ tuned.weight[layer] + tuned.bias[layer], h + bias_only.bias[layer])
            else:  # the last layer is what the model decodes: never translated
                translated = (h, h)
            for lens, decoded in (("logit", decode(tiny_bridge, h)), ("tuned", decode(tiny_bridge, translated[0])),
                                  ("bias_only", decode(tiny_bridge, translated[1]))):
                by_hand = (out.exp() * (out - decoded)).sum(-1).mean().item()
                row = kl.filter((pl.col("lens") == lens) & (pl.col("layer") == layer) & (pl.col("position_kind") == "other"))
                # abs: at the last layer both are float32 rounding around 0 (5e-9 against 0 under MKL_CBWR=COMPATIBLE)
                assert row["mean_kl"].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-6), (lens, layer)


def test_kl_to_final_is_the_forward_kl():
    """KL(p || q) with p the output: [0.9, 0.1] against [0.5, 0.5] is 0.368 nats (the reverse is 0.511)."""
    p, q = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.5, 0.5]]).log()
    assert kl_to_final(p, q).item() == pytest.approx(0.9 * np.log(1.8) + 0.1 * np.log(0.2), abs=1e-6)
    assert kl_to_final(q, p).item() != pytest.approx(kl_to_final(p, q).item(), abs=0.1)


def test_the_warm_start_recovers_a_planted_map_up_to_the_outputs_scale():
    """Output residuals that are a rotation of the residuals, at any per-position scale: the least-squares
    start finds the rotation (only the direction counts: the final norm rescales), and the bias-only
    start is the mean offset to the output direction at the residual's norm."""
    torch.manual_seed(0)
    x = torch.randn(4000, 6, dtype=torch.float64) * 3 + 1
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    final = (x @ rotation) * torch.rand(4000, 1, dtype=torch.float64).add(0.5) * 7  # norm-preserving, then rescaled
    weight, bias = least_squares_start(x, final, affine=True)
    assert torch.allclose(torch.eye(6, dtype=torch.float64) + weight, rotation, atol=0.01)
    assert bias.abs().max() < 0.05
    none, offset = least_squares_start(x, final, affine=False)
    assert none is None and torch.allclose(offset, (x @ rotation - x).mean(0))


def test_output_log_probs_are_the_models(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)[:2]
    resid, kinds = cache_residuals(tiny_bridge, windows, batch_sequences=1, sink_norm_ratio=5.0)
    assert resid.shape[:3] == (tiny_bridge.cfg.n_layers + 1, 2, windows.shape[1]) and kinds.shape == resid.shape[:3]
    with torch.no_grad():
        model = tiny_bridge(torch.from_numpy(windows)).float().log_softmax(-1).reshape(-1, tiny_bridge.cfg.d_vocab)
    assert torch.allclose(output_log_probs(tiny_bridge, resid[-1].reshape(-1, resid.shape[-1]), chunk=5), model, atol=1e-4)
    lp = torch.randn(7, 11).log_softmax(-1)
    assert torch.allclose(constant_log_probs(lp).exp(), lp.exp().mean(0), atol=1e-6)


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
    bias_only = Translators(n_layers=3, d_model=8, affine=False)
    with torch.no_grad():
        bias_only.bias.normal_()
    bias_only.save(tmp_path / "b.safetensors")
    assert set(load_file(tmp_path / "b.safetensors")) == {"bias"}
    assert torch.equal(Translators.load(tmp_path / "b.safetensors")(resid), bias_only(resid))


def test_positions_are_bos_sinks_and_others():
    norms = torch.tensor([[[0.5, 1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 1.0, 1.0]],      # layer 0: BOS even when small
                          [[50.0, 1.0, 30.0, 1.0, 1.0, 1.0, 4.99, 5.01, 0.9]]])  # layer 1: median 1
    direction = torch.nn.functional.normalize(torch.randn(2, 1, 9, 3), dim=-1)
    kinds = position_kinds(direction * norms[..., None], sink_norm_ratio=5.0)
    assert kinds[0, 0].tolist() == [BOS] + [OTHER] * 8
    assert kinds[1, 0].tolist() == [BOS, OTHER, SINK, OTHER, OTHER, OTHER, OTHER, SINK, OTHER]


def test_heldout_kl_counts_every_position_once(tiny_bridge):
    windows = text_windows(tiny_bridge.tokenizer)[:5]
    n_layers, d = tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model
    lenses = {"tuned": Translators(n_layers, d), "bias_only": Translators(n_layers, d, affine=False)}
    kl = heldout_kl(tiny_bridge, lenses, torch.zeros(tiny_bridge.cfg.d_vocab).log_softmax(-1), windows,
                    batch_sequences=2, sink_norm_ratio=1.5)
    assert set(kl["lens"]) == {"logit", "tuned", "bias_only", "constant"}
    per_layer = kl.filter(pl.col("layer").is_not_null())
    totals = per_layer.group_by("lens", "layer").agg(pl.col("n_tokens").sum())["n_tokens"]
    assert (totals == windows.size).all()
    assert (per_layer.filter(pl.col("position_kind") == "bos")["n_tokens"] == len(windows)).all()
    rows = kl.filter(pl.col("n_windows") >= 2)
    tuned = kl.filter(pl.col("lens") == "tuned")
    assert (tuned["excess_over_tuned"].fill_nan(0) == 0).all()
    assert ((rows["excess_ci_low"] <= rows["excess_over_tuned"] + 1e-12)
            & (rows["excess_over_tuned"] <= rows["excess_ci_high"] + 1e-12)).all()
    other = kl.filter(pl.col("position_kind") == "other")
    for lens in ("logit", "constant"):
        part = other.filter(pl.col("lens") == lens)
        mean_row = part.filter(pl.col("layer").is_null())
        before_last = part.filter(pl.col("layer") < n_layers)
        assert mean_row["mean_kl"].item() == pytest.approx(before_last["mean_kl"].mean())
        assert mean_row["excess_over_tuned"].item() == pytest.approx(before_last["excess_over_tuned"].mean())
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
    assert summary["train_windows"] == 10 and summary["validation_windows"] == 2
    assert len(summary["tuned_kept_val_loss"]) == len(summary["bias_only_stopped_by"]) == tiny_bridge.cfg.n_layers
    assert pl.read_parquet(out / "heldout_kl.parquet")["n_windows"].max() == 4
    assert pl.read_parquet(out / "first_layer.parquet").height == 3  # the prompt's target and two corpus windows
    assert Translators.load(out / "translators.safetensors").n_layers == tiny_bridge.cfg.n_layers
    assert Translators.load(out / "bias_translators.safetensors").weight is None
    assert pl.read_parquet(out / "training.parquet").columns == ["layer", "lens", "step", "train_loss", "val_loss",
                                                                 "stopped_by", "kept"]


def kl_table(excess: dict[str, list[tuple[float, float, float]]]) -> pl.DataFrame:
    """A heldout_kl table of `other` positions: per baseline, (excess, ci_low, ci_high) per layer 0..n-1,
    the last layer (all zero) and the mean row (null layer)."""
    rows = []
    for lens, values in excess.items():
        values = [*values, (0.0, 0.0, 0.0)]
        mean = tuple(float(np.mean([v[i] for v in values[:-1]])) for i in range(3))
        for layer, (value, low, high) in [*enumerate(values), (None, mean)]:
            rows.append({"layer": layer, "lens": lens, "position_kind": "other", "excess_over_tuned": value,
                         "excess_ci_low": low, "excess_ci_high": high})
    return pl.DataFrame(rows, schema_overrides={"layer": pl.Int64})


def test_tuned_lens_claims_follow_the_intervals_and_name_the_layers():
    from mechinterp.claims import tuned_lens_claims

    table = kl_table({"logit": [(5.0, 4.0, 6.0)] * 4,
                      "bias_only": [(-0.5, -0.8, -0.2), (0.1, -0.1, 0.3), (0.5, 0.2, 0.8), (0.6, 0.3, 0.9)],
                      "constant": [(-1.0, -1.2, -0.8)] * 4})
    claims = {r["claim"]: r for r in tuned_lens_claims(table)}
    assert claims["tuned_lens.beats_logit"]["verdict"] == "holds" and claims["tuned_lens.beats_logit"]["value"] == 5.0
    assert "better at layers 0-3; worse at layers none; of 4" in claims["tuned_lens.beats_logit"]["statement"]
    bias = claims["tuned_lens.beats_bias_only"]
    assert "better at layers 2-3; worse at layers 0; of 4" in bias["statement"]
    assert bias["verdict"] == "inconclusive"  # mean interval [-0.1, 0.45]... spans 0
    assert claims["tuned_lens.beats_constant"]["verdict"] == "fails"
    assert {r["bound"] for r in claims.values()} == {0.0}
