"""Clamping on a tiny random model: the delta-form edit is exact, hooks never outlive a run,
continuations are reproducible, and the control tokens and summaries are what they claim."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from conftest import topk_sae
from mechinterp.sites import Site
from mechinterp.clamping import (ClampingSettings, Target, choose_targets, clamp_effects, concept_tokens, continuations,
                                 effect_at_kl, feature_clamp_hook, frequency_matched, neuron_clamp_hook,
                                 next_token_log_probs, pad_prompts, summarise, word_tokens)
from mechinterp.errors import UserError

SITE = Site("resid", 0)


@pytest.fixture(scope="module")
def sae(tiny_bridge):
    torch.manual_seed(0)
    sae = topk_sae(tiny_bridge.cfg.d_model, 64, k=8)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def prompts(bridge) -> list[list[int]]:
    from mechinterp.model import encode

    return [encode(bridge.tokenizer, t) for t in ("The capital of France is", "The movie was dull", "scam")]


def hook_count(bridge) -> int:
    points = {id(point): point for point in bridge.hook_dict.values()}  # aliases name the same point twice
    return sum(len(point.fwd_hooks) for point in points.values())


def test_clamping_a_feature_to_its_current_value_changes_no_logit(tiny_bridge, sae):
    ids, _ = pad_prompts(prompts(tiny_bridge), 0)
    clean, cache = tiny_bridge.run_with_cache(ids, names_filter=[SITE.hook_name])
    acts = cache[SITE.hook_name]
    for feature in range(0, 64, 7):
        current = sae.encode(acts.reshape(-1, acts.shape[-1]))[:, feature].reshape(acts.shape[:-1])
        with tiny_bridge.hooks(fwd_hooks=[(SITE.hook_name, feature_clamp_hook(sae, feature, current))]):
            edited = tiny_bridge(ids)
        assert (edited - clean).abs().max() <= 1e-5
    assert hook_count(tiny_bridge) == 0


def test_feature_edit_is_the_decoder_row_times_the_change_and_spares_bos(sae):
    acts = torch.randn(2, 5, sae.d_in)
    values = torch.tensor([3.0, -1.0])
    edited = feature_clamp_hook(sae, 4, values)(acts, None)
    current = sae.encode(acts.reshape(-1, sae.d_in))[:, 4].reshape(2, 5)
    expected = (values[:, None] - current)[..., None] * sae.W_dec[4]
    torch.testing.assert_close(edited[:, 1:] - acts[:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(edited[:, 0], acts[:, 0])


def test_neuron_clamp_sets_the_unit_except_at_bos():
    acts = torch.randn(3, 4, 6)
    edited = neuron_clamp_hook(2, torch.tensor([1.0, 2.0, 3.0]))(acts, None)
    assert torch.equal(edited[:, 1:, 2], torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3]))
    assert torch.equal(edited[:, 0], acts[:, 0]) and torch.equal(edited[..., [0, 1, 3, 4, 5]], acts[..., [0, 1, 3, 4, 5]])


def test_hooks_are_removed_after_every_run_even_after_an_error(tiny_bridge, sae):
    ids, last = pad_prompts(prompts(tiny_bridge), 0)
    before = next_token_log_probs(tiny_bridge, ids, last)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_bridge.hooks(fwd_hooks=[(SITE.hook_name, feature_clamp_hook(sae, 1, torch.full((3,), 50.0)))]):
            assert hook_count(tiny_bridge) == 1
            raise RuntimeError("boom")
    assert hook_count(tiny_bridge) == 0
    target = Target("c", "feature", 1, 2.0, SITE)
    table = clamp_effects(tiny_bridge, target, sae, [0.0, 4.0], prompts(tiny_bridge), torch.tensor([5, 6]),
                          torch.tensor([7, 8]), before, 0)
    assert hook_count(tiny_bridge) == 0
    torch.testing.assert_close(next_token_log_probs(tiny_bridge, ids, last), before)
    assert table.height == 6 and (table["kl"] >= 0).all()
    assert table.filter(pl.col("strength") == 4.0)["kl"].mean() > table.filter(pl.col("strength") == 0.0)["kl"].mean()


def test_right_padding_leaves_each_prompts_next_token_unchanged(tiny_bridge):
    batch = prompts(tiny_bridge)
    ids, last = pad_prompts(batch, 0)
    together = next_token_log_probs(tiny_bridge, ids, last)
    for i, prompt in enumerate(batch):
        alone = next_token_log_probs(tiny_bridge, torch.tensor([prompt]), torch.tensor([len(prompt) - 1]))
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_continuations_are_reproducible_and_clamped_at_every_step(tiny_bridge, sae):
    target = Target("c", "feature", 3, 1.0, SITE)
    prompt = prompts(tiny_bridge)[0]
    calls = []
    first = continuations(tiny_bridge, target, sae, [0.0, 8.0], prompt, 5, seed=1)
    again = continuations(tiny_bridge, target, sae, [0.0, 8.0], prompt, 5, seed=1)
    assert first == again and hook_count(tiny_bridge) == 0
    assert all(len(seq) == 5 for mode in first.values() for seq in mode)
    manual = torch.tensor([prompt] * 2)
    with torch.no_grad(), tiny_bridge.hooks(fwd_hooks=[(SITE.hook_name, feature_clamp_hook(sae, 3, torch.tensor([0.0, 8.0])))]):
        for _ in range(5):
            manual = torch.cat([manual, tiny_bridge(manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert first["greedy"] == manual[:, len(prompt):].tolist()
    with tiny_bridge.hooks(fwd_hooks=[(SITE.hook_name, lambda acts, hook: calls.append(acts.shape[1]))]):
        tiny_bridge.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, stop_at_eos=False,
                             use_past_kv_cache=False, verbose=False, return_type="tokens")
    assert calls == [len(prompt) + i for i in range(4)]  # the whole sequence, clamped, at every step


def test_control_tokens_are_frequency_matched_and_disjoint():
    counts = np.array([100, 90, 50, 48, 47, 10, 9, 0, 0, 1000])
    concept = [1, 5]
    controls = frequency_matched(concept, list(range(10)), counts, seed=0)
    assert len(set(controls)) == 2 and not set(controls) & set(concept)
    assert controls == [0, 6]  # 90 -> 100 (nearest), 10 -> 9
    with pytest.raises(UserError, match="candidate control tokens"):
        frequency_matched([0, 1, 2], [0, 1, 2, 3], counts, seed=0)


def test_word_tokens_group_case_and_leave_out_frequent_words():
    vocabulary = [" scam", " Scam", "scam", " the", " fraud", " x1", " lie"]
    counts = np.array([3, 1, 9, 500, 2, 0, 1])
    assert word_tokens(vocabulary, counts, exclude_frequent=1) == {"scam": [0, 1], "fraud": [4], "lie": [6]}
    assert "the" in word_tokens(vocabulary, counts, exclude_frequent=0)


def test_concept_tokens_collect_every_case_of_each_term():
    lexicons = pl.DataFrame({"lexicon": "t", "category": ["fraud", "fraud", "fraud", "calm"],
                             "term": ["scam", "Fraud", "lie", "peace"]})
    words = {"scam": [0, 1], "fraud": [4], "calm": [7]}
    assert concept_tokens(lexicons, words) == {"t:fraud": [0, 1, 4]}


def test_spearman_and_effect_at_equal_kl():
    ranked = pl.DataFrame({"concept": "c", "unit_kind": "neuron", "unit": 2, "strength": [1.0, 2.0, 3.0, 4.0],
                           "concept_logprob_change": [0.3, 0.3, 0.3, 0.3], "control_logprob_change": 0.0,
                           "relative_effect": [0.1, 0.5, 0.4, 2.0], "kl": [0.01, 0.1, 0.2, 0.3]}).row
    rho = summarise(pl.DataFrame(ranked(i, named=True) for i in range(4)), 0.1).row(0, named=True)
    assert rho["spearman_relative"] == pytest.approx(0.8)  # ranks 1 3 2 4 against 1 2 3 4: 1 - 6 * 2 / 60
    assert np.isnan(rho["spearman_concept"])  # a constant effect has no rank correlation
    assert effect_at_kl(np.array([0.01, 0.1, 1.0]), np.array([0.0, 0.5, 2.0]), 0.1) == pytest.approx(0.5)
    assert effect_at_kl(np.array([0.01, 1.0]), np.array([0.0, 2.0]), 0.1) == pytest.approx(1.0)
    assert np.isnan(effect_at_kl(np.array([0.2, 1.0]), np.array([0.0, 2.0]), 0.1))
    effects = pl.DataFrame({"concept": "c", "unit_kind": "feature", "unit": 1, "strength": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
                            "concept_logprob_change": [0.0, 0.0, 0.5, 0.7, 1.0, 1.2],
                            "control_logprob_change": [0.0] * 6, "relative_effect": [0.0, 0.0, 0.5, 0.7, 1.0, 1.2],
                            "kl": [0.0, 0.0, 0.1, 0.1, 0.5, 0.5]})
    row = summarise(effects, 0.1).row(0, named=True)
    assert row["spearman_relative"] == pytest.approx(1.0) and row["effect_at_equal_kl"] == pytest.approx(0.6)


def test_targets_follow_the_concept_table_and_unknown_concepts_are_named():
    concepts = pl.DataFrame({"site": "resid0", "dictionary": "sae", "concept": ["lex:a", "lex:b", "lex:c", "source:x"],
                             "rank": 0, "unit": [3, 4, 3, 9], "specificity": [0.2, 0.9, 0.8, 0.99]})
    units = pl.DataFrame({"dictionary": "sae", "unit": range(10)})
    settings = ClampingSettings(sae="sae", concepts=["lex:a"], top_concepts=1, features=[{"feature": 7, "concept": "lex:c"}],
                                min_concept_tokens=5, exclude_frequent_words=0, strengths=[0, 1], equal_kl=0.1,
                                prompts=["p"], continuation_prompts=0, new_tokens=1)
    usable = {"lex:a", "lex:b", "lex:c"}
    assert choose_targets(concepts, units, "sae", SITE, settings, usable) == [("lex:a", 3), ("lex:b", 4), ("lex:c", 7)]
    with pytest.raises(UserError, match=r"clamping.concepts: 'lex:zz' is not a concept"):
        choose_targets(concepts, units, "sae", SITE, dataclasses.replace(settings, concepts=["lex:zz"]), usable)
    with pytest.raises(UserError, match=r"clamping.features: feature 12 does not exist"):
        choose_targets(concepts, units, "sae", SITE, dataclasses.replace(settings, features=[{"feature": 12, "concept": "lex:a"}]),
                       usable)
