"""Clamping on a tiny random Llama: the key-value-cached clamped step equals a full forward, the edit
is exact, planted features are found, the difference-of-means vector and the prompts are what they
claim, hooks never outlive a run, and continuations are reproducible."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from conftest import topk_sae
from mechinterp.clamping import (ClampedNextToken, Units, boundary_prompts, clamp_hook, clamp_rows, coordinate_units,
                                 concept_tokens, continue_prompt, direct_logit_effects, frequency_matched, load_parts,
                                 measure, normed_directions, perplexity, sae_units, selection_scores, site_statistics,
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
    scored = measure(step, sae_units(sae, candidates, scales[candidates]), [4.0], [concept] * 5, [[100, 200]] * 5,
                     desc="output scores")
    output_score = (scored["concept"] - scored["control"])[:, 0].mean(1)
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
