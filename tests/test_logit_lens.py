import math

import numpy as np
import polars as pl
import pytest
import torch

from mechinterp.errors import UserError
from mechinterp.logit_lens import (
    LensInput,
    corpus_inputs,
    distribution_stats,
    lens_log_probs,
    prepare_prompts,
    run_logit_lens,
    target_ranks,
)
from mechinterp.model import encode

PROMPTS = [{"id": "capital", "text": "The capital of France is", "targets": [" Paris"]},
           {"id": "scam", "text": "I knew it was a", "targets": [" scam", "."]}]


def test_final_layer_lens_equals_model_output(tiny_bridge):
    ids = encode(tiny_bridge.tokenizer, "The capital of France is Paris.")
    lens, model_lp = lens_log_probs(tiny_bridge, ids)
    assert lens.shape == (tiny_bridge.cfg.n_layers + 1, len(ids), tiny_bridge.cfg.d_vocab)
    assert (lens[-1] - model_lp).abs().max().item() <= 1e-4
    # earlier layers decode something else: the lens is not just repeating the output
    assert (lens[0] - model_lp).abs().max().item() > 1e-2


def test_each_layer_gets_its_own_norm(tiny_bridge):
    """Decoding layer l by hand (RMS-normalise that layer's residual, scale, unembed) matches the lens."""
    ids = encode(tiny_bridge.tokenizer, "I knew it was a scam")
    lens, _ = lens_log_probs(tiny_bridge, ids)
    _, cache = tiny_bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == "blocks.0.hook_resid_post")
    resid = cache["blocks.0.hook_resid_post"][0]
    norm = tiny_bridge.ln_final._original_component
    by_hand = resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    logits = by_hand @ tiny_bridge.W_U
    assert torch.allclose(lens[1], logits.log_softmax(-1), atol=1e-4)


def test_distribution_stats_match_their_definitions():
    log_probs = (torch.randn(4, 3, 50) * 3).log_softmax(-1)
    stats = distribution_stats(log_probs, top_k=5)
    p, final = log_probs.exp(), log_probs[-1].exp()
    assert torch.allclose(stats["entropy"], -(p * log_probs).sum(-1), atol=1e-5)
    assert torch.allclose(stats["kl_to_final"], (final * (log_probs[-1] - log_probs)).sum(-1), atol=1e-5)
    assert torch.equal(stats["top_ids"], p.argsort(-1, descending=True)[..., :5])
    assert torch.allclose(stats["top_probs"], p.sort(-1, descending=True).values[..., :5])


def test_target_ranks_match_sorting():
    log_probs = torch.randn(3, 50).log_softmax(-1)
    lp, ranks = target_ranks(log_probs, [7, 11])
    for layer in range(3):
        order = log_probs[layer].argsort(descending=True).tolist()
        assert ranks[layer].tolist() == [order.index(7) + 1, order.index(11) + 1]
        assert torch.equal(lp[layer], log_probs[layer, [7, 11]])


def test_run_logit_lens_tables(tiny_bridge):
    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS, context_length=64)
    result = run_logit_lens(tiny_bridge, inputs, top_k=5)
    n_layers = tiny_bridge.cfg.n_layers + 1
    positions, targets, first = result["positions"], result["targets"], result["first_layer"]
    assert positions.height == n_layers * sum(len(i.token_ids) for i in inputs)
    assert result["max_final_abs_diff"] <= 1e-4
    final = positions.filter(pl.col("layer") == n_layers - 1)
    assert final["kl_to_final"].abs().max() < 1e-5
    assert all(len(t) == 5 for t in positions["top_tokens"])
    assert targets.height == n_layers * 3
    assert (targets["rank"] >= 1).all()
    # first layer in top k agrees with the per-layer ranks
    for row in first.iter_rows(named=True):
        ranks = targets.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("target") == row["target"]))
        entered = ranks.filter(pl.col("rank") <= 5)["layer"]
        assert row["first_layer_in_top_k"] == (entered.min() if len(entered) else None)


def test_prompt_longer_than_context_is_refused(tiny_bridge):
    with pytest.raises(UserError, match=r"logit_lens\.prompts\[0\] \('capital'\) is \d+ tokens.*tokens\.context_length"):
        prepare_prompts(tiny_bridge.tokenizer, PROMPTS, context_length=4)


def test_a_top_k_beyond_the_vocabulary_is_refused_naming_the_key(tiny_bridge):
    """Issue 30: `logit_lens.top_k: 100000` failed with torch's `selected index k out of range`."""
    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS, context_length=64)
    with pytest.raises(UserError, match=rf"logit_lens\.top_k = 100000 is larger than the model's vocabulary "
                                        rf"\({tiny_bridge.cfg.d_vocab} tokens\); lower logit_lens\.top_k"):
        run_logit_lens(tiny_bridge, inputs, top_k=100_000)


def test_target_that_is_not_one_token_is_refused(tiny_bridge):
    prompts = [{"id": "p", "text": "The capital", "targets": [" Parisiennes-de-Lutece"]}]
    with pytest.raises(UserError, match=r"logit_lens\.prompts\[0\] \('p'\): target ' Parisiennes-de-Lutece' is not a single token"):
        prepare_prompts(tiny_bridge.tokenizer, prompts, context_length=64)


def test_corpus_inputs_take_the_true_next_token(tiny_bridge):
    windows = np.arange(40, dtype=np.int32).reshape(4, 10) % 300
    inputs = corpus_inputs(tiny_bridge.tokenizer, windows, n_windows=2, n_tokens=6, seed=0)
    assert [len(i.token_ids) for i in inputs] == [6, 6]
    for item in inputs:
        row = windows[windows[:, 0] == item.token_ids[0]][0]
        assert list(item.targets.values()) == [int(row[6])]
    assert isinstance(inputs[0], LensInput) and inputs[0].origin == "corpus"


def test_more_corpus_windows_than_the_heldout_split_has_names_the_key(tiny_bridge):
    windows = np.arange(3 * 8).reshape(3, 8) % 50
    with pytest.raises(UserError, match=r"logit_lens\.corpus_windows = 4 but the heldout split has 3 windows"):
        corpus_inputs(tiny_bridge.tokenizer, windows, n_windows=4, n_tokens=6, seed=0)


def test_a_translator_acts_before_the_final_norm(tiny_bridge):
    """The translator sees the stacked residuals and the norm is recomputed after it: scaling every
    residual changes nothing, shifting them changes every layer's decoding."""
    ids = encode(tiny_bridge.tokenizer, "The capital of France is")
    plain, model_lp = lens_log_probs(tiny_bridge, ids)
    scaled, _ = lens_log_probs(tiny_bridge, ids, translator=lambda resid: 3.0 * resid)
    shifted, shifted_model_lp = lens_log_probs(tiny_bridge, ids, translator=lambda resid: resid + 1.0)
    assert torch.allclose(scaled, plain, atol=1e-4)
    assert (shifted - plain).abs().amax(dim=(1, 2)).min() > 1e-2
    assert torch.equal(shifted_model_lp, model_lp)  # the model's own output is never translated


def test_every_table_entry_is_read_off_the_decoded_layers(tiny_bridge):
    """Each entry of the three tables, recomputed here from each layer's decoded log-probabilities; top k
    set to a target's final rank, so that target is in the top k at the last layer exactly at the edge."""
    from mechinterp.logit_lens import layer_name
    from mechinterp.model import vocabulary_strings

    vocab = vocabulary_strings(tiny_bridge.tokenizer)
    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS, context_length=64)
    decoded = {item.id: lens_log_probs(tiny_bridge, item.token_ids)[0] for item in inputs}
    last = decoded["scam"][-1, -1]
    top_k = int((last > last[inputs[1].targets[" scam"]]).sum()) + 1
    result = run_logit_lens(tiny_bridge, inputs, top_k=top_k)
    positions, targets, first = result["positions"], result["targets"], result["first_layer"]
    assert positions.columns == ["prompt_id", "origin", "layer", "layer_name", "position", "input_token", "is_last",
                                 "top_tokens", "top_ids", "top_probs", "entropy", "kl_to_final"]
    assert targets.columns == ["prompt_id", "origin", "target", "target_id", "layer", "log_prob", "prob", "rank",
                               "in_top_k"]
    assert first.columns == ["prompt_id", "origin", "target", "target_id", "first_layer_in_top_k", "entry",
                             "ranked_at_output", "final_rank", "final_prob", "rise_spearman", "rise_percentile",
                             "top_token", "top_first_layer_in_top_k", "top_rise_percentile"]
    for row in positions.iter_rows(named=True):
        item = next(i for i in inputs if i.id == row["prompt_id"])
        lp = decoded[item.id][row["layer"], row["position"]]
        assert row["origin"] == item.origin and row["layer_name"] == layer_name(row["layer"])
        assert row["input_token"] == vocab[item.token_ids[row["position"]]]
        assert row["is_last"] == (row["position"] == len(item.token_ids) - 1)
        assert row["top_ids"] == lp.topk(top_k).indices.tolist() and row["top_tokens"] == [vocab[i] for i in row["top_ids"]]
        assert row["top_probs"] == pytest.approx(lp.topk(top_k).values.exp().tolist(), rel=1e-5)
    for row in targets.iter_rows(named=True):
        item = next(i for i in inputs if i.id == row["prompt_id"])
        lp = decoded[item.id][row["layer"], -1]
        assert row["target_id"] == item.targets[row["target"]] and row["origin"] == item.origin
        assert row["log_prob"] == pytest.approx(float(lp[row["target_id"]]), abs=1e-5)
        assert row["prob"] == pytest.approx(float(lp[row["target_id"]].exp()), rel=1e-5)
        assert row["rank"] == int((lp > lp[row["target_id"]]).sum()) + 1 and row["in_top_k"] == (row["rank"] <= top_k)
    n_layers = tiny_bridge.cfg.n_layers + 1
    for row in first.iter_rows(named=True):
        ranks = targets.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("target") == row["target"]))
        at_last = ranks.filter(pl.col("layer") == n_layers - 1).row(0, named=True)
        assert (row["final_rank"], row["final_prob"]) == (at_last["rank"], pytest.approx(at_last["prob"]))
        assert row["target_id"] == at_last["target_id"] and row["origin"] == at_last["origin"]
    edge = first.filter(pl.col("target") == " scam").row(0, named=True)
    assert edge["final_rank"] == top_k and edge["first_layer_in_top_k"] is not None
    assert result["layer_positions_per_s"] > 0 and result["max_final_abs_diff"] <= 1e-4
    assert first.schema["first_layer_in_top_k"] == pl.Int64 and targets.schema["prob"] == pl.Float64


def test_layer_zero_is_the_embedding_and_layer_l_the_output_of_block_l_minus_one():
    """The layer names the tables carry: the residual entering block 0, then after each block."""
    from mechinterp.logit_lens import layer_name

    assert [layer_name(layer) for layer in range(4)] == ["embed", "block 0", "block 1", "block 2"]


def test_lens_inputs_are_the_prompts_then_seeded_corpus_windows(tiny_bridge):
    """The prompts come first, tokenized as prepare_prompts does; then `corpus_windows` distinct held-out
    windows cut to `corpus_window_tokens`, each targeting its true next token, the same for the same seed."""
    from mechinterp.logit_lens import LensSettings, lens_inputs
    from mechinterp.model import vocabulary_strings

    tokenizer = tiny_bridge.tokenizer
    heldout = np.arange(50 * 10).reshape(50, 10)  # row r starts with token 10 r: a window is known by its first token
    settings = LensSettings(top_k=5, corpus_windows=5, corpus_window_tokens=6, random_tokens=10, prompts=PROMPTS)
    inputs = lens_inputs(tokenizer, settings, heldout, context_length=64, seed=3)
    assert [(i.id, i.origin) for i in inputs[:2]] == [("capital", "prompt"), ("scam", "prompt")]
    assert inputs[0].token_ids == encode(tokenizer, PROMPTS[0]["text"])
    corpus = inputs[2:]
    assert [i.id for i in corpus] == [f"corpus_{i}" for i in range(5)] and {i.origin for i in corpus} == {"corpus"}
    rows = [i.token_ids[0] // 10 for i in corpus]
    assert rows == sorted(set(rows))  # distinct windows, in the held-out split's order
    vocab = vocabulary_strings(tokenizer)
    for item, row in zip(corpus, rows, strict=True):
        assert item.token_ids == heldout[row, :6].tolist() and item.targets == {vocab[10 * row + 6]: 10 * row + 6}
    again = lens_inputs(tokenizer, settings, heldout, context_length=64, seed=3)
    assert [i.token_ids for i in again] == [i.token_ids for i in inputs]
    assert [i.token_ids for i in corpus] == [i.token_ids for i in corpus_inputs(tokenizer, heldout, 5, 6, seed=3)]
    with pytest.raises(UserError, match=r"tokens\.context_length = 4"):
        lens_inputs(tokenizer, settings, heldout, context_length=4, seed=3)


def test_asking_for_every_heldout_window_takes_each_once(tiny_bridge):
    """corpus_windows equal to the held-out split's size is allowed and decodes every window exactly once."""
    windows = np.arange(6 * 8).reshape(6, 8)
    inputs = corpus_inputs(tiny_bridge.tokenizer, windows, n_windows=6, n_tokens=5, seed=1)
    assert [i.token_ids for i in inputs] == windows[:, :5].tolist()


def test_throughput_counts_every_decoded_layer_position_over_the_time_spent_decoding(tiny_bridge, monkeypatch):
    """layer_positions_per_s is all inputs' (layers x positions) over the summed decoding time: with a clock
    that advances half a second per reading, each input takes half a second."""
    import itertools
    import types

    import mechinterp.logit_lens as logit_lens

    ticks = itertools.count()
    monkeypatch.setattr(logit_lens, "time", types.SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    prompts = [*PROMPTS, {"id": "long", "text": "The movie was dull and the acting was awful.", "targets": []}]
    inputs = prepare_prompts(tiny_bridge.tokenizer, prompts, context_length=64)
    result = run_logit_lens(tiny_bridge, inputs, top_k=3)
    decoded = (tiny_bridge.cfg.n_layers + 1) * sum(len(i.token_ids) for i in inputs)
    assert len({len(i.token_ids) for i in inputs}) == 2  # inputs of different lengths: each one counts
    assert result["layer_positions_per_s"] == pytest.approx(decoded / (0.5 * len(inputs)))


def test_the_tables_decode_through_the_translator(tiny_bridge):
    """With a translator, every table is read off the translated decoding, not the plain logit lens."""
    def shift(resid: torch.Tensor) -> torch.Tensor:
        return resid + 1.0

    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS[:1], context_length=64)
    translated, model_lp = lens_log_probs(tiny_bridge, inputs[0].token_ids, translator=shift)
    result = run_logit_lens(tiny_bridge, inputs, top_k=3, translator=shift)
    for row in result["positions"].iter_rows(named=True):
        assert row["top_ids"] == translated[row["layer"], row["position"]].topk(3).indices.tolist()
    assert result["max_final_abs_diff"] == pytest.approx(float((translated[-1] - model_lp).abs().max()))
    assert result["max_final_abs_diff"] > 1e-2


def test_a_target_that_never_enters_leaves_a_null_integer_first_layer(tiny_bridge):
    """A target outside the top k at every layer has first_layer_in_top_k null, and the column stays Int64
    even when every target is such a one."""
    ids = encode(tiny_bridge.tokenizer, "I knew it was a")
    lens, _ = lens_log_probs(tiny_bridge, ids)
    never_top = int(lens[:, -1].max(0).values.argmin())  # its best log p at any layer is the lowest of all tokens
    item = LensInput("p", "prompt", ids, {"never": never_top})
    first = run_logit_lens(tiny_bridge, [item], top_k=1)["first_layer"]
    assert first["first_layer_in_top_k"].to_list() == [None]
    assert first.schema["first_layer_in_top_k"] == pl.Int64


def test_no_measurable_decoding_time_gives_nan_throughput(tiny_bridge, monkeypatch):
    """With a clock that never advances the decoding took no measurable time: the throughput is NaN
    rather than a division by zero."""
    import types

    import mechinterp.logit_lens as logit_lens

    monkeypatch.setattr(logit_lens, "time", types.SimpleNamespace(perf_counter=lambda: 1.0))
    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS[:1], context_length=64)
    assert math.isnan(run_logit_lens(tiny_bridge, inputs, top_k=3)["layer_positions_per_s"])


def test_a_token_that_rises_like_the_random_tokens_sits_at_the_null_and_a_steeper_one_beats_it():
    """Planted: every random token gains log p with depth (the whole distribution flattens), with noise.
    A target drawn like them scores near the null percentile 0.5; a target that rises at every layer
    beats them all; one that falls sits at the bottom. Spearman is +1/-1 for monotone curves."""
    from mechinterp.logit_lens import null_percentile, rise_spearman

    rng = np.random.default_rng(0)
    layers = np.arange(12)[:, None]
    random = -20 + 0.5 * layers + rng.normal(0, 2.0, (12, 2000))  # 2000 random tokens, most rise
    rho = rise_spearman(random)
    assert (rho > 0).mean() > 0.8  # the random tokens rise too: the 0.5 null of "rises" would be wrong
    like_random = -20 + 0.5 * layers + rng.normal(0, 2.0, (12, 400))
    assert np.median(null_percentile(rise_spearman(like_random), rho)) == pytest.approx(0.5, abs=0.05)
    steep, falling = -20 + 2.0 * layers[:, 0], -5 - 1.0 * layers[:, 0]
    spearman = rise_spearman(np.stack([steep, falling], 1))
    assert spearman.tolist() == pytest.approx([1.0, -1.0])
    assert null_percentile(spearman, rho).tolist() == [1.0, 0.0]
    assert null_percentile(np.array([0.3]), np.array([0.1, 0.3, 0.3, 0.5])).tolist() == [0.5]  # mid-rank of ties
    assert np.isnan(null_percentile(np.array([0.3]), np.array([]))).all()


def test_rise_spearman_matches_a_rank_correlation_by_hand():
    from mechinterp.clamping_stats import spearman
    from mechinterp.logit_lens import rise_spearman

    values = np.random.default_rng(1).normal(size=(9, 5))
    assert rise_spearman(values).tolist() == pytest.approx([spearman(np.arange(9), v) for v in values.T])


def test_entry_at_the_last_layer_is_not_before_the_output():
    """The last layer is the output: a token first in the top k there entered `at_last`, not before."""
    from mechinterp.logit_lens import first_entry

    assert first_entry(np.array([50, 20, 3, 1]), top_k=5) == (2, "before_last")
    assert first_entry(np.array([50, 20, 9, 4]), top_k=5) == (3, "at_last")
    assert first_entry(np.array([50, 20, 9, 6]), top_k=5) == (None, "never")
    assert first_entry(np.array([2, 20, 9, 6]), top_k=5) == (0, "before_last")  # left again: still entered


def test_random_tokens_leave_out_special_targets_and_top():
    from mechinterp.logit_lens import random_token_ids

    ids = random_token_ids(50, {0, 1, 7}, 20, np.random.default_rng(0))
    assert len(set(ids.tolist())) == 20 and not {0, 1, 7} & set(ids.tolist()) and ids.max() < 50
    assert random_token_ids(5, {0, 1}, 20, np.random.default_rng(0)).tolist() == [2, 3, 4]
    again = random_token_ids(50, {0, 1, 7}, 20, np.random.default_rng(0))
    assert ids.tolist() == again.tolist()


def test_the_null_table_holds_targets_top_and_random_tokens(tiny_bridge):
    """Per input with targets: the targets, the model's top token at the output and `random_tokens`
    random ones, each at every layer, read off the decoded last position; the percentiles in first_layer
    are computed against exactly those random tokens."""
    from mechinterp.logit_lens import null_percentile, rise_spearman

    inputs = prepare_prompts(tiny_bridge.tokenizer, PROMPTS, context_length=64)
    result = run_logit_lens(tiny_bridge, inputs, top_k=5, random_tokens=30, seed=4)
    null, first = result["null"], result["first_layer"]
    n_layers = tiny_bridge.cfg.n_layers + 1
    for item in inputs:
        lens, model_lp = lens_log_probs(tiny_bridge, item.token_ids)
        part = null.filter(pl.col("prompt_id") == item.id)
        counts = dict(part.group_by("kind").len().iter_rows())
        assert counts == {"target": n_layers * len(item.targets), "top": n_layers, "random": 30 * n_layers}
        top = part.filter(pl.col("kind") == "top")
        assert top["token_id"].unique().to_list() == [int(model_lp[-1].argmax())]
        random = part.filter(pl.col("kind") == "random")
        assert not set(random["token_id"]) & ({*item.targets.values(), top["token_id"][0]} | {0, 1, 2})
        for row in part.sample(20, seed=0).iter_rows(named=True):
            assert row["log_prob"] == pytest.approx(float(lens[row["layer"], -1, row["token_id"]]), abs=1e-5)
        curves = random.sort("token_id", "layer")["log_prob"].to_numpy().reshape(30, n_layers).T
        for row in first.filter(pl.col("prompt_id") == item.id).iter_rows(named=True):
            own = part.filter(pl.col("token_id") == row["target_id"]).sort("layer")["log_prob"].to_numpy()
            expected = null_percentile(rise_spearman(own[:, None]), rise_spearman(curves))[0]
            assert row["rise_percentile"] == pytest.approx(expected)
    again = run_logit_lens(tiny_bridge, inputs, top_k=5, random_tokens=30, seed=4)["null"]
    assert again.equals(null)
    assert 0 <= result["random_rise_share"] <= 1


def first_layer_table(percentiles: list[float], entries: list[str], ranked: list[bool]) -> pl.DataFrame:
    """A first_layer table of prompt targets, two per prompt, plus a corpus row the claims must ignore."""
    n = len(percentiles)
    return pl.DataFrame({
        "prompt_id": [f"p{i // 2}" for i in range(n)] + ["corpus_0"], "origin": ["prompt"] * n + ["corpus"],
        "target": [f" t{i}" for i in range(n)] + [" c"], "rise_percentile": [*percentiles, 0.0],
        "top_rise_percentile": [0.9] * n + [0.0], "entry": [*entries, "never"], "ranked_at_output": [*ranked, True]})


def test_lens_claims_test_targets_against_random_tokens_and_count_entry_before_the_last_layer():
    """Targets at the null percentile are not claimed to rise; targets far above it are. Entry at the
    last layer is not entry before the output, and targets never ranked at the output are left out."""
    from mechinterp.claims import lens_claims

    summary = {"max_final_abs_diff": 0.0, "random_rise_share": 0.91}
    null_like = first_layer_table([0.45, 0.55, 0.5, 0.48, 0.52, 0.5], ["before_last"] * 6, [True] * 6)
    verdict = {r["claim"]: r for r in lens_claims(summary, null_like)}
    rise = verdict["logit_lens.targets_rise_beyond_random"]
    assert rise["value"] == pytest.approx(0.5) and rise["verdict"] == "inconclusive" and rise["bound"] == 0.5
    assert "91.0% of random tokens rise" in rise["statement"]
    planted = first_layer_table([0.97, 0.99, 0.95, 0.98, 0.96, 0.99], ["before_last"] * 6, [True] * 6)
    rise = {r["claim"]: r for r in lens_claims(summary, planted)}["logit_lens.targets_rise_beyond_random"]
    assert rise["verdict"] == "holds" and rise["ci_low"] > 0.9
    low = first_layer_table([0.02, 0.05, 0.01, 0.03, 0.04, 0.02], ["before_last"] * 6, [True] * 6)
    assert {r["claim"]: r for r in lens_claims(summary, low)}["logit_lens.targets_rise_beyond_random"]["verdict"] == "fails"
    # entry: 18 at the last layer and 2 before, among the ranked; 10 never ranked, which do not count
    entries = ["at_last"] * 18 + ["before_last"] * 2 + ["never"] * 10
    table = first_layer_table([0.5] * 30, entries, [True] * 20 + [False] * 10)
    enter = {r["claim"]: r for r in lens_claims(summary, table)}["logit_lens.targets_enter_before_output"]
    assert enter["value"] == pytest.approx(0.1) and enter["verdict"] == "fails"
    assert "20 such targets; 10 never ranked there" in enter["statement"]
    table = first_layer_table([0.5] * 20, ["before_last"] * 10 + ["never"] * 10, [True] * 10 + [False] * 10)
    enter = {r["claim"]: r for r in lens_claims(summary, table)}["logit_lens.targets_enter_before_output"]
    assert enter["value"] == 1.0 and enter["verdict"] == "holds"
    control = {r["claim"]: r for r in lens_claims(summary, table)}["logit_lens.top_token_rises_beyond_random"]
    assert control["value"] == pytest.approx(0.9)
    assert len(lens_claims(summary, table)) == 4
