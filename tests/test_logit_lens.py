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
    assert first.columns == ["prompt_id", "origin", "target", "target_id", "first_layer_in_top_k", "final_rank",
                             "final_prob"]
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
    settings = LensSettings(top_k=5, corpus_windows=5, corpus_window_tokens=6, prompts=PROMPTS)
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
