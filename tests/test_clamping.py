"""Clamping on a tiny random Llama: the key-value-cached clamped step equals a full forward, the edit
is exact, planted features are found, the difference-of-means vector and the prompts are what they
claim, hooks never outlive a run, and continuations are reproducible."""

from __future__ import annotations

import logging
import re

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import topk_sae
from mechinterp.clamping import (ClampedNextToken, ClampingSettings, SiteInputs, SiteStatistics, StatisticsTokens,
                                 Units, boundary_prompts, bracketing_strengths, choose_concepts, choose_units, clamp_hook, clamp_rows,
                                 concept_tokens, continue_prompt, coordinate_units, direct_logit_effects,
                                 final_residual, frequency_matched, load_parts, measure, normed_directions, perplexity,
                                 run_clamping, sae_units, selection_scores, site_statistics, site_units, statistics_rows,
                                 unambiguous_terms, word_list_tokens, word_tokens)
from mechinterp.errors import UserError
from mechinterp.sites import Site

from test_polysemanticity import planted_table

SITES = [Site("resid", 0), Site("mlp", 1), Site("resid", 1)]


@pytest.fixture(scope="module")
def parts(tiny_model_dir, tmp_path_factory):
    import json
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("clamp") / "model")
    (folder / "SOURCE.json").write_text(json.dumps({"trust_remote_code": False}))
    return load_parts(folder, "cpu")


@pytest.mark.parametrize("trusted", [True, False])
def test_model_code_in_the_folder_runs_exactly_when_source_json_trusts_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                          trusted):
    import json
    import shutil

    # transformers copies trusted model code into its modules cache: here, not the user's
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    # the folder's own model class: a Llama that marks itself (a known architecture, so untrusted code falls back)
    (folder / "marked_llama.py").write_text("from transformers import LlamaForCausalLM\n\n\n"
                                            "class MarkedLlama(LlamaForCausalLM):\n    marked = True\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForCausalLM": "marked_llama.MarkedLlama"}}))
    (folder / "SOURCE.json").write_text(json.dumps({"trust_remote_code": trusted}))
    model_parts, _ = load_parts(folder, "cpu")
    assert getattr(model_parts.model, "marked", False) is trusted
    assert type(model_parts.model).__name__ == ("MarkedLlama" if trusted else "LlamaForCausalLM")


def random_sae(d_in: int, seed: int = 0):
    torch.manual_seed(seed)
    sae = topk_sae(d_in, 64, k=8)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def site_width(parts, site: Site) -> int:
    config = parts[0].model.config
    return config.hidden_size if site.kind == "resid" else config.intermediate_size


def prompts(n: int = 5, length: int = 9) -> torch.Tensor:
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 300, (n, length)))
    ids[:, 0] = 0  # BOS
    return ids


@pytest.mark.parametrize("site", SITES, ids=lambda s: s.id)
def test_the_cached_clamped_step_equals_a_full_forward_clamped_at_the_last_position(parts, site):
    model_parts, _ = parts
    sae = random_sae(site_width(parts, site))
    units = Units(torch.tensor([3, -1, 10]), torch.cat([torch.zeros(1, sae.d_in), torch.eye(sae.d_in)[[5]],
                                                         torch.zeros(1, sae.d_in)]),
                  torch.cat([sae.W_dec[[3]], torch.eye(sae.d_in)[[5]], sae.W_dec[[10]]]).detach(),
                  torch.tensor([2.0, 1.5, 3.0]))
    values = torch.tensor([4.0, -2.0, 0.0])
    ids = prompts()
    step = ClampedNextToken(model_parts, ids, site, sae, batch_rows=8)  # 1 unit per batch: batching exercised
    cached = torch.cat([lp for _, lp in step.batches(units, values)])  # [G, P, V]
    for g in range(len(units)):
        rows = units.take(torch.tensor([g] * len(ids)))

        def edit(acts, rows=rows, value=values[g]):
            edited = acts.clone()
            edited[:, -1] = clamp_rows(acts[:, -1], rows, value.repeat(len(ids)), sae)
            return edited

        with torch.no_grad(), clamp_hook(model_parts, site, edit):
            full = model_parts.model(ids).logits[:, -1].float().log_softmax(-1)
        assert (cached[g] - full).abs().max() <= 1e-5
    with torch.no_grad():
        clean = model_parts.model(ids).logits[:, -1].float().log_softmax(-1)
    assert (step.clean - clean).abs().max() <= 1e-5
    assert (cached[0] - clean).abs().max() > 1e-3  # the clamp did something


def test_clamping_a_unit_to_its_current_value_changes_nothing():
    sae = random_sae(16)
    x = torch.randn(6, 16) * 3
    units = concat = Units(torch.tensor([2, -1, 7, -1, 9, 40]), torch.zeros(6, 16), torch.zeros(6, 16),
                           torch.ones(6))
    concat.read[1, 4] = 1.0
    concat.read[3] = torch.nn.functional.normalize(torch.randn(16), dim=0)
    units.write = torch.randn(6, 16)
    current = sae.encode(x)
    values = torch.stack([current[0, 2], x[1, 4], current[2, 7], x[3] @ units.read[3], current[4, 9], current[5, 40]])
    assert torch.allclose(clamp_rows(x, units, values, sae), x, atol=1e-6)
    moved = clamp_rows(x, units, values + 1.0, sae)
    assert torch.allclose(moved - x, units.write, atol=1e-5)  # the edit is the write direction times the change


def test_hooks_are_removed_after_every_run_even_after_an_error(parts):
    model_parts, _ = parts
    module = model_parts.site_module(SITES[0])
    with pytest.raises(RuntimeError, match="inside"):
        with clamp_hook(model_parts, SITES[0], lambda acts: acts):
            raise RuntimeError("inside")
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_planted_feature_whose_decoder_row_is_a_concept_tokens_unembedding_ranks_first(parts):
    model_parts, _ = parts
    site = Site("resid", 1)  # the last block: its output meets the final norm directly
    sae = random_sae(site_width(parts, site), seed=1)
    concept = [17, 42]
    unembedding = model_parts.model.get_submodule(model_parts.unembed).weight
    planted = 11
    with torch.no_grad():
        sae.W_dec[planted] = unembedding[17] / unembedding[17].norm()
        sae.W_dec[:] = torch.nn.functional.normalize(sae.W_dec, dim=1)
    ids = prompts(6)
    from mechinterp.clamping import final_residual

    reference = final_residual(model_parts, ids)
    scales = torch.full((sae.d_sae,), 3.0)
    normed = normed_directions(model_parts, site, sae.W_dec.detach(), scales, reference)
    effects = direct_logit_effects(model_parts, normed, concept, [100, 200])
    assert int(effects.argmax()) == planted
    step = ClampedNextToken(model_parts, ids, site, sae, batch_rows=64)
    candidates = torch.tensor([planted, 0, 1, 2, 3])
    scored = measure(step, sae_units(sae, candidates, scales[candidates]), torch.full((5, 1), 4.0),
                     [(concept, [100, 200])], desc="output scores")
    output_score = (scored["concept"] - scored["control"])[:, 0, :, 0].mean(1)
    assert int(np.argmax(output_score)) == 0 and output_score[0] > 0


def test_difference_of_means_and_input_scores_equal_a_direct_computation(tmp_path):
    from conftest import write_cache
    from mechinterp.activations import ActivationCache

    rng = np.random.default_rng(0)
    n, d = 3000, 6
    acts = rng.normal(size=(n, d)).astype(np.float16)
    tokens = rng.integers(0, 50, n)
    following = np.append(tokens[1:], -1)
    acts[following == 7, 2] += 3  # the activation before token 7 leans on dimension 2
    write_cache(tmp_path / "c.npy", acts)
    cache = ActivationCache.open(tmp_path / "c.npy")
    rows = np.arange(n)
    sae = random_sae(d)
    concepts = [[7, 8], [20]]
    stats = site_statistics(cache, rows, tokens, following, concepts, sae, outlier_threshold=1e9, min_active=1,
                            min_concept_words=1, chunk=700)
    x = acts.astype(np.float64)
    for c, ids in enumerate(concepts):
        before = np.isin(following, ids)
        direct = x[before].mean(0) - x[~before].mean(0)
        assert np.allclose(stats.diffmean[c].numpy(), direct / np.linalg.norm(direct), atol=1e-5)
        assert stats.diffmean_max[c] == pytest.approx((x @ (direct / np.linalg.norm(direct))).max(), abs=1e-3)
    assert int(stats.diffmean[0].abs().argmax()) == 2
    z = sae.encode(torch.from_numpy(acts.astype(np.float32))).clamp_min(0).double().numpy()
    on = np.isin(tokens, concepts[0])
    fired = z.sum(0) > 0
    share = z[on].sum(0)[fired] / z.sum(0)[fired]
    expected = np.full(z.shape[1], np.nan)
    expected[fired] = (share - on.mean()) / (1 - on.mean())
    finite = np.isfinite(stats.input_score[0].numpy())
    assert finite.sum() > 10
    assert np.allclose(stats.input_score[0].numpy()[finite], expected[finite], atol=1e-4)
    assert torch.equal(stats.neuron_max, torch.from_numpy(acts.astype(np.float32)).max(0).values)


def test_selection_and_measurement_prompts_come_from_disjoint_windows_and_stop_before_a_word():
    from mechinterp.tokens import split_sequences

    table = planted_table(n_sequences=60, length=24).with_columns(
        split=pl.when(pl.col("sequence") < 40).then(pl.lit("train")).otherwise(pl.lit("heldout")))
    windows = table["token_id"].to_numpy().reshape(60, 24)
    word_start = np.zeros(windows.max() + 1, dtype=bool)
    word_start[::3] = True
    train, heldout = split_sequences(table, "train"), split_sequences(table, "heldout")
    selection = boundary_prompts(windows[train], word_start, 10, 8, seed=0)
    measured = boundary_prompts(windows[heldout], word_start, 10, 8, seed=0)
    assert selection.shape == measured.shape == (10, 8)

    def origin(prompt):
        for w, window in enumerate(windows):
            for p in range(8, 24):
                if np.array_equal(window[p - 7 : p], prompt[1:]) and word_start[window[p]]:
                    return w
        raise AssertionError("prompt not found before a word start")

    assert {origin(p) for p in selection} <= set(train) and {origin(p) for p in measured} <= set(heldout)
    with pytest.raises(UserError, match="measure_prompts"):
        boundary_prompts(windows[heldout], word_start, 50, 8, seed=0)


def test_word_lists_must_be_single_tokens(parts):
    from mechinterp.model import vocabulary_strings

    _, tokenizer = parts
    vocabulary = vocabulary_strings(tokenizer)
    token = next(i for i in range(2, len(vocabulary)) if vocabulary[i].startswith(" ") and len(vocabulary[i]) > 3
                 and tokenizer(vocabulary[i], add_special_tokens=False)["input_ids"] == [i])
    word = vocabulary[token]
    assert word_list_tokens(tokenizer, {"w": [word]}) == {"list:w": [token]}
    with pytest.raises(UserError, match=r"clamping\.word_lists\.w: \['a phrase of many words'\] are not single"):
        word_list_tokens(tokenizer, {"w": [word, "a phrase of many words"]})


def test_ambiguous_words_and_frequent_words_belong_to_no_concept():
    lexicons = pl.DataFrame({"lexicon": ["r"] * 6 + ["g"], "category": ["A", "B", "C", "A", "B", "A", "X"],
                             "term": ["set", "set", "set", "scam", "fraud", "fraud", "set"]})
    kept = unambiguous_terms(lexicons, max_categories=2)
    assert sorted(kept.rows()) == [("g", "X", "set"), ("r", "A", "fraud"), ("r", "A", "scam"), ("r", "B", "fraud")]
    vocabulary = [" Scam", " scam", " fraud", "scam", " the", " set", "x"]
    counts = np.array([1, 5, 2, 9, 100, 3, 1])
    words = word_tokens(vocabulary, counts, exclude_frequent=1)
    assert words == {"scam": [0, 1], "set": [5], "fraud": [2]}  # " the" is the most frequent word
    assert concept_tokens(kept, words) == {"r:A": [0, 1, 2], "r:B": [2], "g:X": [5]}


def test_control_tokens_are_frequency_matched_and_disjoint():
    counts = np.arange(100) * 10
    concept = [10, 50, 90]
    controls = frequency_matched(concept, list(range(100)), counts, seed=0)
    assert len(set(controls)) == 3 and not set(controls) & set(concept)
    assert all(abs(counts[c] - counts[t]) <= 10 for c, t in zip(sorted(controls), sorted(concept)))


def test_continuations_are_reproducible_clamped_and_scored(parts):
    model_parts, tokenizer = parts
    site = SITES[0]
    sae = random_sae(site_width(parts, site))
    unit = sae_units(sae, torch.tensor([5]), torch.tensor([4.0]))
    prompt = [0, 40, 41, 42]
    values = torch.tensor([0.0, 8.0])
    first = continue_prompt(model_parts, site, sae, unit, values, prompt, 4, sample=True, seed=3)
    assert first == continue_prompt(model_parts, site, sae, unit, values, prompt, 4, sample=True, seed=3)
    greedy = continue_prompt(model_parts, site, sae, unit, values, prompt, 4, sample=False, seed=0)
    # a manual greedy loop, the whole sequence rerun with the unit clamped at every position but BOS
    ids = torch.tensor([prompt])
    rows = sae_units(sae, torch.tensor([5]), torch.tensor([4.0]))

    def edit(acts):
        edited = acts.clone()
        edited[:, 1:] = clamp_rows(acts[0, 1:], rows.take(torch.zeros(acts.shape[1] - 1, dtype=torch.long)),
                                   torch.full((acts.shape[1] - 1,), 8.0), sae)[None]
        return edited

    with torch.no_grad(), clamp_hook(model_parts, site, edit):
        for _ in range(4):
            ids = torch.cat([ids, model_parts.model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy[1] == ids[0, len(prompt):].tolist()
    scores = perplexity(model_parts, prompt, greedy)
    assert len(scores) == 2 and all(s >= 1 for s in scores)
    with torch.no_grad():
        logits = model_parts.model(torch.tensor([prompt + greedy[0]])).logits[0].log_softmax(-1)
    nll = -np.mean([logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(greedy[0])])
    assert scores[0] == pytest.approx(np.exp(nll), rel=1e-4)


def test_neuron_and_residual_units_are_coordinates():
    units = coordinate_units(5, torch.tensor([1, 3]), torch.tensor([2.0, 7.0]))
    assert torch.equal(units.read, units.write) and units.read[1, 3] == 1 and units.read.sum() == 2
    assert (units.sae_index == -1).all()


def test_selection_scores_list_each_features_best_concepts_and_every_output_candidate():
    input_score = torch.tensor([[0.9, -torch.inf, 0.1], [0.2, 0.5, -torch.inf], [-torch.inf, 0.4, 0.3]])
    measured = [{"concept": "b", "unit_kind": "feature", "unit": 1, "output_score": 1.5, "direct_logit_effect": 0.2},
                {"concept": "a", "unit_kind": "neuron", "unit": 7, "output_score": -0.1, "direct_logit_effect": 0.3}]
    table = selection_scores(input_score, ["a", "b", "c"], measured, best=2)
    rows = {(r["unit_kind"], r["unit"], r["concept"]): (r["input_score"], r["output_score"]) for r in table.iter_rows(named=True)}
    assert rows == {("feature", 0, "a"): (pytest.approx(0.9), None), ("feature", 0, "b"): (pytest.approx(0.2), None),
                    ("feature", 1, "b"): (pytest.approx(0.5), 1.5), ("feature", 1, "c"): (pytest.approx(0.4), None),
                    ("feature", 2, "c"): (pytest.approx(0.3), None), ("feature", 2, "a"): (pytest.approx(0.1), None),
                    ("neuron", 7, "a"): (None, -0.1)}


# --- choosing concepts, tokens and controls ---------------------------------------------------------

def clamping_settings(**overrides) -> ClampingSettings:
    """Settings small enough for the tiny model; `overrides` replace single fields."""
    values = dict(sae="resid1-topk", word_lists={}, concepts=[], lexicon_concepts=0, max_word_categories=2,
                  min_concept_tokens=2, exclude_frequent_words=0, min_concept_words=1, statistics_tokens=100,
                  prompt_tokens=6, selection_prompts=3, measure_prompts=4, output_strength=4.0, output_candidates=3,
                  strengths=[-1.0, 0.0, 1.0], kl_targets=[0.02, 0.3], max_strength=32.0, kl_levels=[0.03, 0.1],
                  random_pool=3, placebo_concepts=0, monotone_threshold=0.5, bootstrap_samples=20, batch_rows=16,
                  prompts=[], continuation_strengths=[-1.0, 0.0, 2.0], continuation_prompts=0, new_tokens=3)
    return ClampingSettings(**{**values, **overrides})


def test_single_letter_words_are_words_and_tokens_with_digits_are_not():
    vocabulary = [" a", " I", " 3d", " x1", " ok", "ok", " "]
    words = word_tokens(vocabulary, np.ones(len(vocabulary), dtype=np.int64), exclude_frequent=0)
    assert words == {"a": [0], "i": [1], "ok": [4]}


def test_unambiguous_terms_keep_the_lexicons_row_order():
    lexicons = pl.DataFrame({"lexicon": ["r", "g", "r", "r", "g", "r"], "category": ["B", "X", "A", "C", "Y", "A"],
                             "term": ["zeta", "alpha", "mid", "zeta", "beta", "alpha"]})
    kept = unambiguous_terms(lexicons, max_categories=2)
    assert kept.rows() == lexicons.rows()  # every term is unambiguous here: nothing dropped, nothing reordered


def test_each_concept_token_gets_the_nearest_unused_control_even_below_the_rarest_candidate():
    counts = np.array([2, 1, 0, 10, 20, 100])  # tokens 0, 1: the concept; 2..5 candidates
    # token 0 (count 2) takes token 2 (count 0, nearer than 10); token 1 (count 1) must then walk right to token 3
    assert frequency_matched([0, 1], [0, 1, 2, 3, 4, 5], counts, seed=0) == [2, 3]
    # a concept token rarer than every candidate takes the nearest one above it
    assert frequency_matched([0], [3, 4, 5], np.array([1, 0, 0, 5, 9, 50]), seed=0) == [3]
    assert frequency_matched([], [], counts, seed=0) == []
    with pytest.raises(UserError, match="only 1 candidate control tokens for 2 concept tokens"):
        frequency_matched([0, 1], [1, 2], counts, seed=0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=12, max_size=12), st.sets(st.integers(0, 11), min_size=1, max_size=4),
       st.integers(0, 5))
def test_controls_are_distinct_candidates_outside_the_concept(counts, concept, seed):
    controls = frequency_matched(sorted(concept), list(range(12)), np.array(counts), seed)
    assert len(controls) == len(set(controls)) == len(concept)
    assert not set(controls) & concept and set(controls) <= set(range(12))
    first = sorted(concept, key=lambda t: -counts[t])[0]  # the most frequent concept token chooses first
    nearest = min(abs(counts[c] - counts[first]) for c in range(12) if c not in concept)
    assert abs(counts[controls[0]] - counts[first]) == nearest


def test_named_concepts_are_checked_and_the_sampled_ones_are_the_other_usable_lexicon_concepts():
    token_sets = {"list:s": [1, 2, 3], "a:x": [4, 5, 6], "a:y": [7, 8, 9], "a:short": [10], "a:absent": [11, 12, 13],
                  "a:z": [14, 15, 16]}
    present = np.ones(20, dtype=bool)
    present[11:14] = False
    base = dict(word_lists={"s": [" s"]}, concepts=["a:x"], min_concept_tokens=2, min_concept_words=2)
    named, sampled = choose_concepts(token_sets, present, clamping_settings(**base, lexicon_concepts=2), seed=0)
    assert named == ["list:s", "a:x"] and sampled == ["a:y", "a:z"]
    with pytest.raises(UserError, match=r"only 2 lexicon concepts are usable .* clamping.lexicon_concepts = 3"):
        choose_concepts(token_sets, present, clamping_settings(**base, lexicon_concepts=3), seed=0)
    with pytest.raises(UserError, match=r"'b:x' is not a lexicon concept .*similar: \['a:x'\]"):
        choose_concepts(token_sets, present, clamping_settings(**{**base, "concepts": ["b:x"]}), seed=0)
    with pytest.raises(UserError, match=r"'a:short' has 1 unambiguous whole-word tokens.*min_concept_tokens = 2"):
        choose_concepts(token_sets, present, clamping_settings(**{**base, "concepts": ["a:short"]}), seed=0)
    with pytest.raises(UserError, match=r"'a:absent' has 0 of its tokens in the statistics tokens.*min_concept_words"):
        choose_concepts(token_sets, present, clamping_settings(**{**base, "concepts": ["a:absent"]}), seed=0)


def token_table(n_sequences: int = 6, length: int = 5, n_train: int = 4) -> pl.DataFrame:
    """A token table of `n_sequences` windows, the first `n_train` of them train; token ids count up."""
    return pl.DataFrame({"sequence": np.repeat(np.arange(n_sequences), length),
                         "position": np.tile(np.arange(length), n_sequences),
                         "token_id": np.arange(n_sequences * length) + 100,
                         "split": np.where(np.repeat(np.arange(n_sequences), length) < n_train, "train", "heldout")})


def test_statistics_tokens_are_a_seeded_sorted_sample_of_train_rows_with_their_next_tokens():
    table = token_table()
    train_rows = [r for r in range(30) if r < 20 and r % 5 != 0]  # train windows, BOS left out
    assert statistics_rows(table, 100, seed=0).tolist() == train_rows
    sample = statistics_rows(table, 7, seed=3)
    assert len(set(sample)) == 7 and set(sample) <= set(train_rows) and list(sample) == sorted(sample)
    assert np.array_equal(sample, statistics_rows(table, 7, seed=3))
    tokens = StatisticsTokens.sample(table, 100, seed=0)
    assert tokens.rows.tolist() == train_rows
    assert tokens.token_ids.tolist() == [r + 100 for r in train_rows]
    # the next token within the window, -1 after a window's last token
    assert tokens.next_ids.tolist() == [r + 101 if r % 5 != 4 else -1 for r in train_rows]


# --- the clamped step and its measurement -------------------------------------------------------------

def test_the_step_runs_on_the_models_device_and_never_batches_more_rows_than_asked(parts):
    model_parts, _ = parts
    site = SITES[0]
    sae = random_sae(site_width(parts, site))
    ids = prompts()
    step = ClampedNextToken(model_parts, ids, site, sae, batch_rows=3)  # fewer rows than prompts: one unit a batch
    assert step.device == next(model_parts.model.parameters()).device == step.prompts.device
    assert step.batch_units == 1
    units = sae_units(sae, torch.tensor([1, 2, 3]), torch.ones(3))
    sizes = [(start, len(log_probs)) for start, log_probs in step.batches(units, torch.ones(3))]
    assert sizes == [(0, 1), (1, 1), (2, 1)]


def test_a_unit_that_writes_nothing_changes_neither_concept_nor_control_nor_the_distribution(parts):
    model_parts, _ = parts
    site = SITES[1]
    width = site_width(parts, site)
    ids = prompts(4)
    step = ClampedNextToken(model_parts, ids, site, None, batch_rows=8)
    silent = Units(torch.tensor([-1, -1]), torch.eye(width)[[0, 1]], torch.zeros(2, width), torch.tensor([1.0, 2.0]))
    measured = measure(step, silent, torch.tensor([[-2.0, 3.0], [0.5, 8.0]]), [([17, 42], [100, 200]), ([5], [300, 301])],
                       desc="silent")
    for key, shape in (("concept", (2, 2, 4, 2)), ("control", (2, 2, 4, 2)), ("kl", (2, 2, 4))):
        assert measured[key].shape == shape
        assert np.abs(measured[key]).max() <= 1e-5
    assert np.array_equal(measured["top_token"], np.broadcast_to(step.clean.argmax(-1).numpy(), (2, 2, 4)))


def test_an_mlp_sites_directions_enter_the_residual_stream_through_the_output_projection(parts):
    model_parts, _ = parts
    site = Site("mlp", 0)
    directions = torch.eye(site_width(parts, site))[[3, 7]]
    with torch.no_grad():
        residual = model_parts.to_residual(site, directions)
    down = model_parts.model.get_submodule(model_parts.mlp_out_names[0]).weight  # [d_model, d_mlp], no bias
    assert torch.allclose(residual, down[:, [3, 7]].T, atol=1e-6)
    assert torch.equal(model_parts.to_residual(Site("resid", 0), directions), directions)


# --- choosing the units of a concept ------------------------------------------------------------------

def clamped_last_log_probs(model_parts, site: Site, ids: torch.Tensor, unit: Units, value: float, sae) -> torch.Tensor:
    """Next-token log-probabilities [P, V] of a full forward of `ids`, `unit` set to `value` at the last position."""
    rows = unit.take(torch.zeros(len(ids), dtype=torch.long))

    def edit(acts):
        edited = acts.clone()
        edited[:, -1] = clamp_rows(acts[:, -1], rows, torch.full((len(ids),), float(value)), sae)
        return edited

    with torch.no_grad(), clamp_hook(model_parts, site, edit):
        return model_parts.model(ids).logits[:, -1].float().log_softmax(-1)


def direct_effect(model_parts, reference: torch.Tensor, write: torch.Tensor, scale: float, concept: list[int],
                  control: list[int]) -> float:
    """The logit gain of the concept's tokens minus the control tokens' when the final residual moves by
    scale x write (a site of the last block: its output is the final residual), over the whole unembedding."""
    norm = model_parts.model.get_submodule(model_parts.final_norm)
    head = model_parts.model.get_submodule(model_parts.unembed)
    with torch.no_grad():
        gain = head(norm(reference + scale * write)) - head(norm(reference))
    return float(gain[concept].mean() - gain[control].mean())


CONCEPTS = ["a", "b"]
CONCEPT_SETS = [[17, 42], [60, 61, 62]]
CONTROL_SETS = [[100, 200], [120, 130, 140]]
PLANTED = 11  # concept a's feature: its decoder row is token 17's unembedding


def planted_statistics(width: int, d_sae: int) -> SiteStatistics:
    """Hand-made statistics of a site: features 5-9 and neurons 0-1 dead, input scores finite for a few features."""
    generator = torch.Generator().manual_seed(0)
    input_score = torch.full((len(CONCEPTS), d_sae), -torch.inf)
    input_score[0, [20, PLANTED, 30]] = torch.tensor([0.9, 0.1, 0.5])
    input_score[1, [40, 41]] = torch.tensor([0.7, 0.2])
    feature_max = 1 + 2 * torch.rand(d_sae, generator=generator)
    feature_max[PLANTED] = 3.0
    feature_active = torch.full((d_sae,), 50.0)
    feature_active[5:10] = 0
    neuron_active = torch.full((width,), 50.0)
    neuron_active[:2] = 0
    diffmean = torch.nn.functional.normalize(torch.randn(len(CONCEPTS), width, generator=generator), dim=1)
    next_input_score = input_score / 2  # -inf where ineligible, as the input score
    return SiteStatistics(feature_max, feature_active, input_score, next_input_score,
                          0.5 + 1.5 * torch.rand(width, generator=generator), neuron_active, diffmean,
                          torch.tensor([1.5, 2.5]))


@pytest.fixture(scope="module")
def chosen_units(parts):
    """choose_units at the last block's output, with a planted feature and hand-made statistics."""
    model_parts, _ = parts
    site = Site("resid", 1)
    width = site_width(parts, site)
    sae = random_sae(width, seed=1)
    unembedding = model_parts.model.get_submodule(model_parts.unembed).weight
    with torch.no_grad():
        sae.W_dec[PLANTED] = unembedding[17] / unembedding[17].norm()
    stats = planted_statistics(width, sae.d_sae)
    ids = prompts(4, 7)
    step = ClampedNextToken(model_parts, ids, site, sae, batch_rows=64)
    reference = final_residual(model_parts, ids)
    correlated = {f: (3 * f) % width for f in range(sae.d_sae)}
    settings_ = clamping_settings(output_candidates=3, output_strength=4.0)
    chosen, scores = choose_units(model_parts, site, sae, stats, CONCEPTS, CONCEPT_SETS, CONTROL_SETS, correlated, step,
                                  reference, settings_, seed=0, random_pool=POOL_SIZE)
    units = site_units([c.space for c in chosen], sae, stats)
    return dict(site=site, sae=sae, stats=stats, ids=ids, reference=reference, correlated=correlated, chosen=chosen,
                units=units, scores=scores, width=width)


POOL_SIZE = 3
KINDS = [("feature", "input"), ("feature", "output"), ("neuron", "output"), ("correlated_neuron", "input"),
         ("correlated_neuron", "output"), ("diffmean", "")]


def test_each_concept_gets_its_input_feature_output_units_and_the_baselines(chosen_units):
    chosen, stats, correlated = chosen_units["chosen"], chosen_units["stats"], chosen_units["correlated"]
    kinds = [(c.concept, c.unit_kind, c.selection) for c in chosen]
    assert kinds == [(a, *k) for a in CONCEPTS for k in [*KINDS, *[("random", "pool")] * POOL_SIZE]]
    by_kind = {(c.concept, c.unit_kind, c.selection): c for c in chosen if c.selection != "pool"}
    assert by_kind["a", "feature", "input"].unit == 20 and by_kind["b", "feature", "input"].unit == 40
    assert by_kind["a", "feature", "input"].input_score == pytest.approx(0.9)
    assert by_kind["a", "feature", "input"].next_input_score == pytest.approx(0.45)
    assert by_kind["a", "feature", "output"].unit == PLANTED  # the feature that writes the concept's token
    assert by_kind["a", "feature", "output"].input_score == pytest.approx(0.1)
    pools = [[c.unit for c in chosen if c.concept == concept and c.selection == "pool"] for concept in CONCEPTS]
    assert pools[0] == pools[1] == sorted(set(pools[0]))  # one pool for the site, every concept reads it
    assert all(stats.feature_active[u] > 0 for u in pools[0])
    for c, concept in enumerate(CONCEPTS):
        for selection in ("input", "output"):
            feature = by_kind[concept, "feature", selection].unit
            assert by_kind[concept, "correlated_neuron", selection].unit == correlated[feature]
        assert by_kind[concept, "diffmean", ""].unit == c
        assert stats.neuron_active[by_kind[concept, "neuron", "output"].unit] > 0
        for kind in ("neuron", "correlated_neuron", "diffmean"):
            assert np.isnan(next(u for (a, k, _), u in by_kind.items() if a == concept and k == kind).input_score)


def test_the_chosen_units_read_and_write_what_their_kind_says_at_their_maximum(chosen_units):
    chosen, units, stats, sae = (chosen_units[k] for k in ("chosen", "units", "stats", "sae"))
    eye = torch.eye(chosen_units["width"])
    assert len(units) == len(chosen) == 2 * (len(KINDS) + POOL_SIZE)
    for row, unit in enumerate(chosen):
        c = CONCEPTS.index(unit.concept)
        if unit.unit_kind in ("feature", "random"):
            expected = (unit.unit, torch.zeros(sae.d_in), sae.W_dec[unit.unit].detach(), stats.feature_max[unit.unit])
        elif unit.unit_kind == "diffmean":
            expected = (-1, stats.diffmean[c], stats.diffmean[c], stats.diffmean_max[c])
        else:
            expected = (-1, eye[unit.unit], eye[unit.unit], stats.neuron_max[unit.unit])
        assert int(units.sae_index[row]) == expected[0]
        assert torch.equal(units.read[row], expected[1]) and torch.equal(units.write[row], expected[2])
        assert float(units.scale[row]) == pytest.approx(float(expected[3]))


def test_direct_logit_effects_of_the_chosen_units_equal_the_full_unembedding_of_their_write(parts, chosen_units):
    model_parts, _ = parts
    chosen, stats, sae, reference = (chosen_units[k] for k in ("chosen", "stats", "sae", "reference"))
    eye = torch.eye(chosen_units["width"])
    for unit in chosen:
        c = CONCEPTS.index(unit.concept)
        if unit.unit_kind in ("feature", "random"):
            write, scale = sae.W_dec[unit.unit].detach(), stats.feature_max[unit.unit]
        elif unit.unit_kind == "diffmean":
            write, scale = stats.diffmean[c], stats.diffmean_max[c]
        else:
            write, scale = eye[unit.unit], stats.neuron_max[unit.unit]
            if stats.neuron_active[unit.unit] == 0:  # a dead neuron (a feature's best-correlated one may be) has none
                assert np.isnan(unit.direct_logit_effect)
                continue
        expected = direct_effect(model_parts, reference, write, float(scale), CONCEPT_SETS[c], CONTROL_SETS[c])
        assert unit.direct_logit_effect == pytest.approx(expected, abs=1e-4), (unit.unit_kind, unit.concept)


def test_output_candidates_are_the_largest_direct_effects_and_their_scores_are_clamped_forwards(parts, chosen_units):
    model_parts, _ = parts
    chosen, stats, sae, scores, ids = (chosen_units[k] for k in ("chosen", "stats", "sae", "scores", "ids"))
    reference, site = chosen_units["reference"], chosen_units["site"]
    with torch.no_grad():
        clean = model_parts.model(ids).logits[:, -1].float().log_softmax(-1)
    outputs = scores.filter(pl.col("output_score").is_not_null())
    assert scores.columns[:3] == ["concept", "unit_kind", "unit"]
    for c, concept in enumerate(CONCEPTS):
        alive = torch.nonzero(stats.feature_active > 0).squeeze(1).tolist()
        effects = {f: direct_effect(model_parts, reference, sae.W_dec[f].detach(), float(stats.feature_max[f]),
                                    CONCEPT_SETS[c], CONTROL_SETS[c]) for f in alive}
        listed = outputs.filter((pl.col("concept") == concept) & (pl.col("unit_kind") == "feature"))
        top = sorted(effects, key=effects.get)[-3:]
        pool = {u.unit for u in chosen if u.selection == "pool"}
        assert set(listed["unit"]) == set(top) | pool  # the candidates, and the random pool's output scores
        candidates = listed.filter(pl.col("unit").is_in(top))
        for row in candidates.iter_rows(named=True):
            assert row["direct_logit_effect"] == pytest.approx(effects[row["unit"]], abs=1e-4)
        neurons = outputs.filter((pl.col("concept") == concept) & (pl.col("unit_kind") == "neuron"))
        assert neurons.height == 3
        best = {(u.unit_kind, u.selection): u for u in chosen if u.concept == concept}
        for kind, frame in (("feature", candidates), ("neuron", neurons)):
            assert best[kind, "output"].output_score == pytest.approx(frame["output_score"].max())
            assert best[kind, "output"].unit == frame.sort("output_score")["unit"][-1]
        # the neuron's output score, recomputed by a full forward with the neuron amplified at the last position
        neuron = best["neuron", "output"].unit
        unit = coordinate_units(chosen_units["width"], torch.tensor([neuron]), stats.neuron_max[[neuron]])
        lp = clamped_last_log_probs(model_parts, site, ids, unit, 4.0 * float(stats.neuron_max[neuron]), None)
        gain = [(lp[:, s].logsumexp(-1) - clean[:, s].logsumexp(-1)) for s in (CONCEPT_SETS[c], CONTROL_SETS[c])]
        assert best["neuron", "output"].output_score == pytest.approx(float((gain[0] - gain[1]).mean()), abs=1e-4)
        for u in best.values():  # a unit not among the candidates has no output score
            space = "feature" if u.unit_kind in ("feature", "random") else "neuron"
            listed = outputs.filter((pl.col("concept") == concept) & (pl.col("unit_kind") == space)
                                    & (pl.col("unit") == u.unit))["output_score"]
            if u.unit_kind == "diffmean" or listed.is_empty():
                assert np.isnan(u.output_score)
            else:
                assert u.output_score == pytest.approx(listed[0])


def test_a_concept_no_eligible_feature_fires_on_is_an_error_naming_min_concept_words(parts, chosen_units):
    model_parts, _ = parts
    stats = chosen_units["stats"]
    blind = SiteStatistics(**{**stats.__dict__, "input_score": torch.full_like(stats.input_score, -torch.inf)})
    step = ClampedNextToken(model_parts, chosen_units["ids"], chosen_units["site"], chosen_units["sae"], batch_rows=64)
    with pytest.raises(UserError, match=r"no feature of resid1 is active on clamping.min_concept_words = 1 words of"
                                         r" 'a' in the statistics tokens"):
        choose_units(model_parts, chosen_units["site"], chosen_units["sae"], blind, CONCEPTS, CONCEPT_SETS,
                     CONTROL_SETS, chosen_units["correlated"], step, chosen_units["reference"], clamping_settings(),
                     seed=0, random_pool=POOL_SIZE)


# --- the whole stage on a tiny corpus -----------------------------------------------------------------

# "bank" is under three categories: ambiguous, in none of them; "tiny" has too few words to be a concept
TOY_LEXICON = {"place": ["France", "Japan", "Paris", "Tokyo", "bank"],
               "money": ["bank", "money", "double", "password", "overnight"],
               "film": ["movie", "film", "acting", "dull", "awful", "great"],
               "speech": ["asked", "promised", "sounded", "knew", "like", "bank"],
               "tiny": ["fun"]}
RUN_SETTINGS = dict(sae="resid1-topk", word_lists={"suspicion": [" scam", " fraud", " email"]}, concepts=["toy:place"],
                    lexicon_concepts=2, min_concept_tokens=3, exclude_frequent_words=2, statistics_tokens=500,
                    placebo_concepts=1, prompts=["The email asked for my bank", "He promised"], continuation_prompts=1)
SEED, DATA_SEED = 3, 5
RUN_SITES = {"resid1-topk": Site("resid", 1), "mlp0-topk": Site("mlp", 0)}


class Messages(logging.Handler):
    """Collects the formatted log messages (a message whose arguments do not fit its format raises here)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def site_activations(model_parts, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Each run site's activations [windows x positions, width], rows in the token table's order."""
    captured = {}
    model = model_parts.model
    handles = [model.get_submodule(model_parts.block_names[1]).register_forward_hook(
                   lambda _m, _a, out: captured.__setitem__("resid1-topk", out[0] if isinstance(out, tuple) else out)),
               model.get_submodule(model_parts.mlp_out_names[0]).register_forward_pre_hook(
                   lambda _m, args: captured.__setitem__("mlp0-topk", args[0]))]
    try:
        with torch.no_grad():
            model(torch.from_numpy(windows).long())
    finally:
        for handle in handles:
            handle.remove()
    return {k: v.reshape(-1, v.shape[-1]).numpy().astype(np.float16) for k, v in captured.items()}


@pytest.fixture(scope="module")
def clamping_run(parts, tmp_path_factory):
    """run_clamping on windows of the tiny model's training text: a resid SAE (the headline) and an mlp SAE."""
    from conftest import TEXT, write_cache
    from mechinterp.activations import ActivationCache
    from mechinterp.model import encode, vocabulary_strings

    model_parts, tokenizer = parts
    folder = tmp_path_factory.mktemp("clamping_run")
    lines = [TEXT[i] for i in np.random.default_rng(0).permutation(len(TEXT))]
    body = np.concatenate([encode(tokenizer, f" {line}", prepend_bos=False) for line in lines])
    length, n_windows = 16, 64
    windows = np.concatenate([np.zeros((n_windows, 1), np.int64),  # BOS (id 0) opens every window
                              body[: n_windows * (length - 1)].reshape(n_windows, length - 1)], 1)
    sequence = np.repeat(np.arange(n_windows), length)
    table = pl.DataFrame({"sequence": sequence, "position": np.tile(np.arange(length), n_windows),
                          "token_id": windows.ravel(), "split": np.where(sequence < 48, "train", "heldout")})
    activations = site_activations(model_parts, windows)
    saes = {"resid1-topk": random_sae(32, seed=2), "mlp0-topk": random_sae(64, seed=3)}
    sites = [SiteInputs(sae_id, saes[sae_id], site,
                        ActivationCache.open(write_cache(folder / f"{sae_id}.npy", activations[sae_id])), 1e9)
             for sae_id, site in RUN_SITES.items()]
    widths = {"resid1-topk": 32, "mlp0-topk": 64}
    units_table = pl.concat([pl.DataFrame({"site": site.id, "dictionary": sae_id, "unit": np.arange(64),
                                           "best_neuron": (5 * np.arange(64)) % widths[sae_id]})
                             for sae_id, site in RUN_SITES.items()]
                            + [pl.DataFrame({"site": "resid1", "dictionary": "resid1-relu", "unit": np.arange(64),
                                             "best_neuron": np.zeros(64, np.int64)})])  # another SAE at the site
    lexicons = pl.DataFrame([("toy", category, term) for category, terms in TOY_LEXICON.items() for term in terms],
                            schema=["lexicon", "category", "term"], orient="row")
    settings_ = clamping_settings(**RUN_SETTINGS)
    logger, handler = logging.getLogger("mechinterp.clamping"), Messages()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        tables = run_clamping(model_parts, tokenizer, sites, table, windows, lexicons, units_table, settings_, SEED,
                              DATA_SEED)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return dict(tables=tables, table=table, windows=windows, activations=activations, saes=saes, widths=widths,
                settings=settings_, vocabulary=vocabulary_strings(tokenizer), messages=handler.messages)


def test_the_stage_writes_every_table_with_each_concepts_units_and_the_random_pool(clamping_run):
    from mechinterp.clamping import OTHER_SITES_RANDOM_POOL

    tables = clamping_run["tables"]
    assert set(tables) == {"targets", "effects", "summary", "comparisons", "verdict", "continuations", "scores"}
    targets = tables["targets"]
    named = ["list:suspicion", "toy:place"]
    headline = targets.filter(pl.col("sae") == "resid1-topk")
    sampled = sorted(set(headline["concept"]) - set(named) - {"placebo:00"})
    assert len(sampled) == 2 and set(sampled) <= {"toy:money", "toy:film", "toy:speech"}
    assert headline.filter(pl.col("placebo"))["concept"].unique().to_list() == ["placebo:00"]
    pools = {"resid1-topk": clamping_run["settings"].random_pool, "mlp0-topk": OTHER_SITES_RANDOM_POOL}
    for sae_id, concepts in (("resid1-topk", [*named, *sampled, "placebo:00"]), ("mlp0-topk", named)):
        rows = targets.filter(pl.col("sae") == sae_id)
        site = RUN_SITES[sae_id]
        assert rows.select("site", "layer").unique().rows() == [(site.id, site.layer)]
        assert sorted(rows.select("concept", "unit_kind", "selection").rows()) == sorted(
            (c, *k) for c in concepts for k in [*KINDS, *[("random", "pool")] * pools[sae_id]])
        assert rows.filter(pl.col("named"))["concept"].unique().sort().to_list() == named
        features = {(r["concept"], r["selection"]): r["unit"]
                    for r in rows.filter(pl.col("unit_kind") == "feature").iter_rows(named=True)}
        for row in rows.filter(pl.col("unit_kind") == "correlated_neuron").iter_rows(named=True):
            feature = features[row["concept"], row["selection"]]
            assert row["unit"] == (5 * feature) % clamping_run["widths"][sae_id]  # this SAE's table
    place = targets.filter(pl.col("concept") == "toy:place")
    assert place["concept_tokens"][0].to_list() == [" France", " Japan", " Paris", " Tokyo"]  # " bank" is ambiguous
    assert (place["n_concept_tokens"] == 4).all()
    summary = tables["summary"]  # the pool's members become two rows per concept: its mean and its best
    assert summary.height == targets.filter(pl.col("selection") != "pool").height + 2 * (4 + 1 + 2)
    assert summary.select("layer", "sae", "named", "placebo").null_count().sum_horizontal()[0] == 0
    assert set(tables["verdict"]["site"]) == {"resid1", "mlp0"}
    assert set(tables["verdict"].filter(pl.col("site") == "resid1")["concepts"]) == {"real", "placebo"}


def test_each_units_maximum_is_its_largest_value_on_the_statistics_tokens(clamping_run):
    rows = statistics_rows(clamping_run["table"], clamping_run["settings"].statistics_tokens, DATA_SEED)
    for sae_id, acts in clamping_run["activations"].items():
        x = torch.from_numpy(acts[rows].astype(np.float32))
        with torch.no_grad():
            feature_max = clamping_run["saes"][sae_id].encode(x).max(0).values
        targets = clamping_run["tables"]["targets"].filter(pl.col("sae") == sae_id)
        for row in targets.iter_rows(named=True):
            if row["unit_kind"] in ("feature", "random"):
                assert row["max_activation"] == pytest.approx(float(feature_max[row["unit"]]), rel=1e-5)
            elif row["unit_kind"] in ("neuron", "correlated_neuron"):
                assert row["max_activation"] == pytest.approx(float(x[:, row["unit"]].max()), rel=1e-5)
            else:
                assert row["max_activation"] > 0


def test_every_effect_row_is_a_clamped_forward_of_its_unit_strength_and_prompt(parts, clamping_run):
    from mechinterp.tokens import split_sequences

    model_parts, _ = parts
    tables, vocabulary, table = clamping_run["tables"], clamping_run["vocabulary"], clamping_run["table"]
    effects, settings_ = tables["effects"], clamping_run["settings"]
    n_strengths, n_prompts = len(settings_.strengths) + 2 * len(settings_.kl_targets), settings_.measure_prompts
    assert effects.height == tables["targets"].height * n_strengths * n_prompts
    change = effects["concept_logprob_change"] - effects["control_logprob_change"]
    assert np.allclose(effects["relative_effect"], change)
    assert effects["top_token"].to_list() == [vocabulary[t] for t in effects["top_token_id"]]
    # the held-out prompts and the control words, rebuilt from the inputs
    word_start = np.array([text.startswith(" ") and text[1:2].isalpha() for text in vocabulary])
    windows = clamping_run["windows"][split_sequences(table, "heldout")]
    ids = torch.from_numpy(boundary_prompts(windows, word_start, n_prompts, settings_.prompt_tokens, SEED))
    counts = np.bincount(table["token_id"].to_numpy(), minlength=len(vocabulary))
    all_words = sorted(t for w in word_tokens(vocabulary, counts, settings_.exclude_frequent_words).values() for t in w)
    with torch.no_grad():
        clean = model_parts.model(ids).logits[:, -1].float().log_softmax(-1)
    checked = [("resid1-topk", "list:suspicion", "feature", "input"), ("resid1-topk", "toy:place", "neuron", "output"),
               ("mlp0-topk", "toy:place", "feature", "output")]
    for sae_id, concept, kind, selection in checked:
        target = tables["targets"].filter((pl.col("sae") == sae_id) & (pl.col("concept") == concept)
                                          & (pl.col("unit_kind") == kind) & (pl.col("selection") == selection)).row(
                                              0, named=True)
        site, sae = RUN_SITES[sae_id], clamping_run["saes"][sae_id]
        scale = torch.tensor([target["max_activation"]], dtype=torch.float32)
        unit = (sae_units(sae, torch.tensor([target["unit"]]), scale) if kind == "feature"
                else coordinate_units(clamping_run["widths"][sae_id], torch.tensor([target["unit"]]), scale))
        concept_ids = [vocabulary.index(t) for t in target["concept_tokens"]]
        control_ids = frequency_matched(concept_ids, all_words, counts, DATA_SEED)
        rows = effects.filter((pl.col("site") == site.id) & (pl.col("concept") == concept)
                              & (pl.col("unit_kind") == kind) & (pl.col("selection") == selection)).sort(
                                  "strength", "prompt")
        assert rows.height == n_strengths * n_prompts
        # the probes, then strengths aimed at the KL targets from the unit's mean KL at the probes
        probe_kl = [rows.filter(pl.col("strength") == p)["kl"].mean() for p in settings_.strengths]
        aimed = bracketing_strengths(settings_.strengths, np.array([probe_kl]), settings_.kl_targets,
                                     settings_.max_strength)[0]
        assert sorted(rows["strength"].to_list()) == sorted(np.repeat([*settings_.strengths, *aimed], n_prompts))
        for strength in sorted(set(rows["strength"].to_list())):
            lp = clamped_last_log_probs(model_parts, site, ids, unit, strength * float(scale[0]), sae)
            part = rows.filter(pl.col("strength") == strength).head(n_prompts)
            assert part["prompt"].to_list() == list(range(n_prompts))
            for column, ids_ in (("concept_logprob_change", concept_ids), ("control_logprob_change", control_ids)):
                expected = lp[:, ids_].logsumexp(-1) - clean[:, ids_].logsumexp(-1)
                assert np.allclose(part[column].to_numpy(), expected.numpy(), atol=1e-4)
            kl = (clean.exp() * (clean - lp)).sum(-1).clamp_min(0)
            assert np.allclose(part["kl"].to_numpy(), kl.numpy(), atol=1e-5)
            assert part["top_token_id"].to_list() == lp.argmax(-1).tolist()


def test_selection_scores_name_their_site_and_sae(clamping_run):
    scores = clamping_run["tables"]["scores"]
    assert scores.columns[:5] == ["site", "sae", "concept", "unit_kind", "unit"]
    assert sorted(scores.select("site", "sae").unique().rows()) == [("mlp0", "mlp0-topk"), ("resid1", "resid1-topk")]
    outputs = scores.filter(pl.col("output_score").is_not_null())
    assert outputs["concept"].null_count() == 0 and set(outputs["unit_kind"]) == {"feature", "neuron"}
    k = clamping_run["settings"].output_candidates
    # every concept's feature and neuron candidates, and the random pool's output scores, at both sites (5 concepts,
    # a placebo among them, and a pool of 3 at the headline; the 2 named ones and a pool of 4 at the other)
    assert outputs.height == 5 * (2 * k + 3) + 2 * (2 * k + 4)


def test_continuations_clamp_the_named_concepts_features_at_the_headline_site(parts, clamping_run):
    from mechinterp.model import encode

    model_parts, tokenizer = parts
    tables, settings_ = clamping_run["tables"], clamping_run["settings"]
    continuations = tables["continuations"]
    assert continuations.columns == ["concept", "site", "selection", "unit", "prompt", "prompt_text", "mode",
                                     "strength", "continuation", "perplexity"]
    assert continuations.height == 2 * 2 * settings_.continuation_prompts * 2 * len(settings_.continuation_strengths)
    assert set(continuations["site"]) == {"resid1"} and set(continuations["mode"]) == {"greedy", "sampled"}
    assert set(continuations["prompt_text"]) == {settings_.prompts[0]}
    target = tables["targets"].filter((pl.col("sae") == "resid1-topk") & (pl.col("concept") == "toy:place")
                                      & (pl.col("selection") == "output")
                                      & (pl.col("unit_kind") == "feature")).row(0, named=True)
    sae = clamping_run["saes"]["resid1-topk"]
    unit = sae_units(sae, torch.tensor([target["unit"]]), torch.tensor([target["max_activation"]]))
    values = torch.tensor(settings_.continuation_strengths) * target["max_activation"]
    prompt = encode(tokenizer, settings_.prompts[0])
    greedy = continue_prompt(model_parts, RUN_SITES["resid1-topk"], sae, unit, values, prompt, settings_.new_tokens,
                             False, SEED)
    rows = continuations.filter((pl.col("concept") == "toy:place") & (pl.col("selection") == "output")
                                & (pl.col("mode") == "greedy")).sort("strength")
    assert rows["unit"].unique().to_list() == [target["unit"]]
    assert rows["continuation"].to_list() == [tokenizer.decode(s) for s in greedy]
    assert np.allclose(rows["perplexity"], perplexity(model_parts, prompt, greedy))


def test_the_stage_logs_each_sites_statistics_choice_and_measurement(clamping_run):
    messages = clamping_run["messages"]
    assert any(m.startswith("resid1: statistics of 500 train tokens in ") for m in messages)
    # resid1: 5 concepts (a placebo among them) x (6 units + a pool of 3); mlp0: 2 x (6 + 4)
    chosen = {m.split(":")[0]: m for m in messages if " chosen for " in m}
    assert re.match(r"resid1: 45 units \((\d+) distinct\) chosen for 5 concepts in ", chosen["resid1"])
    distinct = int(re.match(r"mlp0: 20 units \((\d+) distinct\) chosen for 2 concepts in ", chosen["mlp0"]).group(1))
    assert 4 < distinct <= 20
    assert any(m.startswith(f"mlp0: {distinct * 7 * 4} clamped rows in ") for m in messages)


def test_strengths_need_a_probe_on_each_side():
    """Each unit's strengths are aimed at its KL targets from its KL at the largest positive and the most negative
    probe strength: a config without one of them is an error naming the key and the fix."""
    with pytest.raises(UserError, match=r"clamping.strengths is \[0.0, 1.0\]: it needs a negative and a positive"):
        clamping_settings(strengths=[0.0, 1.0])
    assert clamping_settings(strengths=[-0.5, 2.0]).strengths == [-0.5, 2.0]
