"""Clamp one SAE feature (or, as the control, one neuron) and measure what the model does.

A feature j is clamped to value v by adding (v - f_j(x)) * W_dec[j] to the activation at the SAE's
site, so the SAE's reconstruction error never enters the edit: clamping a feature to its current
value changes nothing. A neuron (an MLP neuron or a residual dimension of the site) is clamped by
setting its activation to v. Values are strengths times the unit's maximum activation on the
corpus. BOS (position 0) keeps its clean value, as in SAE training.

Effects are read from the next-token distribution at each prompt's last position: the change in
log-probability of the concept's tokens, of frequency-matched control tokens, and the KL from the
unclamped distribution (the off-target damage).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import SparseAutoencoder, load_sae
from mechinterp.sites import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClampingSettings:
    """The config's `clamping` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    sae: str
    """id of the SAE whose features are clamped"""
    concepts: list[str]
    """lexicon concepts (<lexicon>:<category>) whose most specific feature is always clamped"""
    top_concepts: int
    """also clamp the best features of this many other concepts, the most specific first"""
    features: list[dict[str, Any]]
    """features named by index: {feature, concept}"""
    min_concept_tokens: int
    """a concept needs this many whole-word tokens in the vocabulary to be measured"""
    exclude_frequent_words: int
    """the most frequent words of the corpus are left out of concept and control tokens"""
    strengths: list[float]
    """clamp values as multiples of the unit's maximum activation on the corpus (0 ablates)"""
    equal_kl: float
    """KL (nats) at which features and neurons are compared at equal damage"""
    prompts: list[str]
    """held-out prompts; effects are read at the next token after each"""
    continuation_prompts: int
    """the first this many prompts are continued at every strength"""
    new_tokens: int
    """tokens generated per continuation"""


@dataclass(frozen=True)
class Target:
    """A unit to clamp: an SAE feature (`sae` set) or a neuron of `site`, with the concept it is
    meant to move and its maximum activation on the corpus."""

    concept: str
    unit_kind: str  # "feature", "neuron" or "residual_dim"
    unit: int
    max_activation: float
    site: Site


def feature_clamp_hook(sae: SparseAutoencoder, feature: int, values: torch.Tensor):
    """A hook setting feature `feature` to `values` [batch] (or [batch, seq]) at every non-BOS position."""
    direction = sae.W_dec[feature]

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:
        current = sae.encode(acts.reshape(-1, acts.shape[-1]).float())[:, feature].reshape(acts.shape[:-1])
        delta = values.reshape(values.shape[0], -1).to(current) - current
        delta[:, 0] = 0  # BOS keeps its clean value
        return acts + (delta[..., None] * direction).to(acts.dtype)

    return hook


def neuron_clamp_hook(neuron: int, values: torch.Tensor):
    """A hook setting unit `neuron` of the site to `values` [batch] at every non-BOS position."""

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:
        edited = acts.clone()
        edited[:, 1:, neuron] = values.reshape(-1, 1).to(acts.dtype)
        return edited

    return hook


def clamp_hook(target: Target, sae: SparseAutoencoder | None, values: torch.Tensor):
    if target.unit_kind == "feature":
        return feature_clamp_hook(sae, target.unit, values)
    return neuron_clamp_hook(target.unit, values)


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [n, max_len] and each prompt's last position. With a causal model right
    padding never changes the positions before it."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
    return ids, torch.tensor([len(p) - 1 for p in prompts])


def log_mass(log_probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log of the total probability of `token_ids` under each row of `log_probs` [n, vocab]."""
    return log_probs[:, token_ids].logsumexp(-1)


@torch.no_grad()
def next_token_log_probs(bridge, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] of the token after position `last` of each row of `ids`."""
    logits = bridge(ids.to(bridge.cfg.device))
    return logits[torch.arange(len(ids)), last.to(logits.device)].float().log_softmax(-1).cpu()


@torch.no_grad()
def clamp_effects(bridge, target: Target, sae: SparseAutoencoder | None, strengths: list[float],
                  prompts: list[list[int]], concept_ids: torch.Tensor, control_ids: torch.Tensor,
                  clean: torch.Tensor, pad_id: int) -> pl.DataFrame:
    """One row per (strength, prompt): change in log-probability of the concept tokens and of the
    control tokens at the prompt's last position, their difference, and KL(clean || clamped).
    `clean` holds the unclamped next-token log-probabilities [n_prompts, vocab]."""
    ids, last = pad_prompts(prompts, pad_id)
    n = len(prompts)
    batch_ids, batch_last = ids.repeat(len(strengths), 1), last.repeat(len(strengths))
    values = torch.tensor(strengths, dtype=torch.float32).repeat_interleave(n) * target.max_activation
    # the bridge's hook context removes the hook on exit, even after an error
    with bridge.hooks(fwd_hooks=[(target.site.hook_name, clamp_hook(target, sae, values.to(bridge.cfg.device)))]):
        clamped_lp = next_token_log_probs(bridge, batch_ids, batch_last)
    clean_rep = clean.repeat(len(strengths), 1)
    concept_change = log_mass(clamped_lp, concept_ids) - log_mass(clean_rep, concept_ids)
    control_change = log_mass(clamped_lp, control_ids) - log_mass(clean_rep, control_ids)
    kl = (clean_rep.exp() * (clean_rep - clamped_lp)).sum(-1).clamp_min(0)
    return pl.DataFrame({
        "strength": np.repeat(np.asarray(strengths, dtype=np.float64), n), "prompt": np.tile(np.arange(n), len(strengths)),
        "value": values.double().numpy(), "concept_logprob_change": concept_change.double().numpy(),
        "control_logprob_change": control_change.double().numpy(),
        "relative_effect": (concept_change - control_change).double().numpy(), "kl": kl.double().numpy(),
        "top_token": clamped_lp.argmax(-1).numpy().astype(np.int64)})


@torch.no_grad()
def continuations(bridge, target: Target, sae: SparseAutoencoder | None, strengths: list[float], prompt: list[int],
                  new_tokens: int, seed: int) -> dict[str, list[list[int]]]:
    """Greedy and seeded-sampled continuations of `prompt` at every strength (one batch row each),
    the clamp applied at every new position too. Each step reruns the whole sequence: the bridge's
    KV-cached generation (transformer-lens 4.3) continues "The capital of France is" with
    " Paris-------", without any hook, while the full forward gives " Paris.\n\nThe capital"."""
    values = torch.tensor(strengths, dtype=torch.float32) * target.max_activation
    ids = torch.tensor([prompt] * len(strengths), device=bridge.cfg.device)
    out = {}
    # the bridge's hook context removes the hook on exit, even after an error
    with bridge.hooks(fwd_hooks=[(target.site.hook_name, clamp_hook(target, sae, values.to(bridge.cfg.device)))]):
        for mode in ("greedy", "sampled"):
            torch.manual_seed(seed)
            generated = bridge.generate(ids, max_new_tokens=new_tokens, do_sample=mode == "sampled", stop_at_eos=False,
                                        temperature=1.0, use_past_kv_cache=False, verbose=False,
                                        return_type="tokens")
            out[mode] = generated[:, len(prompt):].tolist()
    return out


def effect_at_kl(kl: np.ndarray, effect: np.ndarray, level: float) -> float:
    """The effect at a given KL, interpolated linearly in log KL over strengths sorted by KL; NaN when
    `level` is outside the measured range."""
    order = np.argsort(kl)
    kl, effect = np.log(np.maximum(kl[order], 1e-12)), effect[order]
    if not kl[0] <= np.log(level) <= kl[-1]:
        return float("nan")
    return float(np.interp(np.log(level), kl, effect))


def summarise(effects: pl.DataFrame, equal_kl: float) -> pl.DataFrame:
    """Per target: mean effects over prompts at each strength, the Spearman correlation of the
    effect with strength (NaN when either is constant), and the effect at KL = `equal_kl`
    (comparing units at equal damage), over non-negative strengths in the direction of raising the unit."""
    means = mean_effects(effects)
    rows = []
    for (concept, kind, unit), group in means.group_by("concept", "unit_kind", "unit", maintain_order=True):
        raised = group.filter(pl.col("strength") >= 0)
        rho = group.select(relative=pl.corr("strength", "relative_effect", method="spearman"),
                           concept=pl.corr("strength", "concept_logprob_change", method="spearman")).row(0, named=True)
        rows.append({"concept": concept, "unit_kind": kind, "unit": unit,
                     "spearman_relative": rho["relative"], "spearman_concept": rho["concept"],
                     "effect_at_equal_kl": effect_at_kl(raised["kl"].to_numpy(), raised["relative_effect"].to_numpy(),
                                                        equal_kl),
                     "equal_kl": equal_kl, "max_relative_effect": float(group["relative_effect"].max()),
                     "max_kl": float(group["kl"].max())})
    return pl.DataFrame(rows)


def word_tokens(vocabulary: list[str], counts: np.ndarray, exclude_frequent: int) -> dict[str, list[int]]:
    """Whole-word tokens (a leading space, then letters only), grouped by their lower-cased word,
    leaving out the `exclude_frequent` words most frequent in the corpus: lexicons list common
    words ("get", "even", "on") under many categories, and their probability mass would swamp the
    concept's."""
    words: dict[str, list[int]] = {}
    for token_id, text in enumerate(vocabulary):
        if text.startswith(" ") and text[1:].isalpha():
            words.setdefault(text[1:].lower(), []).append(token_id)
    by_count = sorted(words, key=lambda w: (-int(counts[words[w]].sum()), w))
    return {w: words[w] for w in by_count[exclude_frequent:]}


def concept_tokens(lexicons: pl.DataFrame, words: dict[str, list[int]]) -> dict[str, list[int]]:
    """For every lexicon concept (`<lexicon>:<category>`), the whole-word tokens whose word is one of its terms."""
    word_ids = pl.DataFrame({"term": list(words), "token": list(words.values())},
                            schema={"term": pl.Utf8, "token": pl.List(pl.Int64)})
    grouped = (lexicons.select(pl.concat_str("lexicon", pl.lit(":"), "category").alias("concept"),
                               pl.col("term").str.to_lowercase())
               .unique().join(word_ids, on="term").explode("token")
               .group_by("concept").agg(pl.col("token").unique().sort()))
    return dict(zip(grouped["concept"].to_list(), grouped["token"].to_list(), strict=True))


def frequency_matched(concept_ids: list[int], candidate_ids: list[int], counts: np.ndarray, seed: int) -> list[int]:
    """For each concept token, a different candidate token with the nearest corpus count (ties broken
    by a seeded shuffle), each candidate used once."""
    rng = np.random.default_rng(seed)
    pool = np.array(sorted(set(candidate_ids) - set(concept_ids)), dtype=np.int64)
    if len(pool) < len(concept_ids):
        raise UserError(f"only {len(pool)} candidate control tokens for {len(concept_ids)} concept tokens.")
    pool = pool[rng.permutation(len(pool))]
    pool = pool[np.argsort(counts[pool], kind="stable")]
    used = np.zeros(len(pool), dtype=bool)
    matched = []
    for token in sorted(concept_ids, key=lambda t: -counts[t]):
        left = int(np.searchsorted(counts[pool], counts[token])) - 1
        right = left + 1
        while left >= 0 and used[left]:  # walk outwards to the nearest unused candidates
            left -= 1
        while right < len(pool) and used[right]:
            right += 1
        nearer_right = left < 0 or (right < len(pool)
                                    and counts[pool[right]] - counts[token] <= counts[token] - counts[pool[left]])
        pick = right if nearer_right else left
        used[pick] = True
        matched.append(int(pool[pick]))
    return matched


def choose_targets(concepts: pl.DataFrame, units: pl.DataFrame, sae_id: str, site: Site, settings: ClampingSettings,
                   usable: set[str]) -> list[tuple[str, int]]:
    """(concept, feature) pairs to clamp: for each concept named in the config, its most specific
    feature of SAE `sae_id`; then the `top_concepts` other concepts whose best feature is most
    specific; then the features the config names by index. `usable` holds the concepts with
    enough whole-word tokens to measure."""
    ranked = concepts.filter((pl.col("dictionary") == sae_id) & (pl.col("site") == site.id) & (pl.col("rank") == 0))
    known = set(ranked["concept"])
    chosen: list[tuple[str, int]] = []
    for concept in settings.concepts:
        if concept not in known:
            close = sorted(c for c in known if concept.split(":")[-1].lower() in c.lower())[:5]
            raise UserError(f"clamping.concepts: {concept!r} is not a concept of the polysemanticity table for "
                            f"{sae_id} (concepts are <lexicon>:<category>; similar: {close}).")
        if concept not in usable:
            raise UserError(f"clamping.concepts: {concept!r} has too few whole-word tokens in the vocabulary to "
                            f"measure (needs clamping.min_concept_tokens = {settings.min_concept_tokens}).")
        chosen.append((concept, int(ranked.filter(pl.col("concept") == concept)["unit"][0])))
    lexical = ranked.filter(pl.col("concept").is_in(sorted(usable)) & ~pl.col("concept").is_in([c for c, _ in chosen]))
    for row in lexical.sort(["specificity", "concept"], descending=[True, False]).iter_rows(named=True):
        if sum(1 for c, _ in chosen if c not in settings.concepts) >= settings.top_concepts:
            break
        if row["unit"] not in {u for _, u in chosen}:
            chosen.append((row["concept"], int(row["unit"])))
    n_features = int(units.filter(pl.col("dictionary") == sae_id).height)
    for entry in settings.features:
        if not 0 <= entry["feature"] < n_features:
            raise UserError(f"clamping.features: feature {entry['feature']} does not exist in {sae_id} "
                            f"(it has {n_features} features).")
        if entry["concept"] not in usable:
            raise UserError(f"clamping.features: concept {entry['concept']!r} has too few whole-word tokens to measure.")
        chosen.append((entry["concept"], int(entry["feature"])))
    return chosen


def run_clamping(bridge, sae: SparseAutoencoder, sae_id: str, site: Site, units: pl.DataFrame, concepts: pl.DataFrame,
                 lexicons: pl.DataFrame, token_counts: np.ndarray, settings: ClampingSettings, seed: int
                 ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The whole experiment for one SAE: choose targets, then for each target feature and its
    best-correlated neuron measure effects at every strength on every prompt, and continue a few
    prompts. Returns the targets, effects and continuations tables."""
    from mechinterp.model import encode, vocabulary_strings

    tokenizer = bridge.tokenizer
    vocabulary = vocabulary_strings(tokenizer)
    words = word_tokens(vocabulary, token_counts, settings.exclude_frequent_words)
    all_words = sorted(t for ids in words.values() for t in ids)
    token_sets = concept_tokens(lexicons, words)
    usable = {c for c, ids in token_sets.items() if len(ids) >= settings.min_concept_tokens}
    site_units = units.filter(pl.col("site") == site.id)
    features = site_units.filter(pl.col("dictionary") == sae_id).sort("unit")
    neurons = site_units.filter(pl.col("dictionary") == "neurons").sort("unit")
    neuron_kind = neurons["unit_kind"][0]
    prompts = [encode(tokenizer, p) for p in settings.prompts]
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    ids, last = pad_prompts(prompts, pad_id)
    clean = next_token_log_probs(bridge, ids, last)
    sae = sae.to(bridge.cfg.device)
    target_rows, effect_tables, continuation_rows = [], [], []
    chosen = choose_targets(concepts, units, sae_id, site, settings, usable)
    if not chosen:
        raise UserError(f"clamping: no targets for {sae_id}; no lexicon concept has a ranked feature with enough "
                        "whole-word tokens. Name concepts in clamping.concepts or features in clamping.features.")
    # continuations for the concepts the config names (the first target's when it names none)
    continued = set(settings.concepts) | {entry["concept"] for entry in settings.features} or {chosen[0][0]}
    for concept, feature in tqdm(chosen, desc="clamping", unit="target"):
        feature_row = features.row(feature, named=True)
        neuron = int(feature_row["best_neuron"])
        concept_ids = token_sets[concept]
        control_ids = frequency_matched(concept_ids, all_words, token_counts, seed)
        pair = [Target(concept, "feature", feature, float(feature_row["max_activation"]), site),
                Target(concept, neuron_kind, neuron, float(neurons.row(neuron, named=True)["max_activation"]), site)]
        for target in pair:
            table = clamp_effects(bridge, target, sae, settings.strengths, prompts, torch.tensor(concept_ids),
                                  torch.tensor(control_ids), clean, pad_id)
            effect_tables.append(table.select(pl.lit(concept).alias("concept"), pl.lit(target.unit_kind).alias("unit_kind"),
                                              pl.lit(target.unit).alias("unit"), pl.all()))
            target_rows.append({"concept": concept, "unit_kind": target.unit_kind, "unit": target.unit, "sae": sae_id,
                                "site": site.id, "max_activation": target.max_activation,
                                "concept_specificity": feature_row["concept_specificity"] if target.unit_kind == "feature" else None,
                                "best_neuron_correlation": feature_row["best_neuron_correlation"],
                                "n_concept_tokens": len(concept_ids), "concept_tokens": [vocabulary[t] for t in concept_ids],
                                "control_tokens": [vocabulary[t] for t in control_ids]})
        target = pair[0]
        for prompt_index in range(min(settings.continuation_prompts, len(prompts)) if concept in continued else 0):
            generated = continuations(bridge, target, sae, settings.strengths, prompts[prompt_index],
                                      settings.new_tokens, seed)
            for mode, sequences in generated.items():
                for strength, sequence in zip(settings.strengths, sequences, strict=True):
                    continuation_rows.append({"concept": concept, "unit_kind": "feature", "unit": feature,
                                              "prompt": prompt_index, "prompt_text": settings.prompts[prompt_index],
                                              "mode": mode, "strength": float(strength),
                                              "continuation": tokenizer.decode(sequence)})
    effects = pl.concat(effect_tables).with_columns(
        prompt_text=pl.col("prompt").replace_strict(dict(enumerate(settings.prompts))),
        top_token=pl.col("top_token").replace_strict(dict(enumerate(vocabulary)), return_dtype=pl.Utf8))
    return pl.DataFrame(target_rows), effects, pl.DataFrame(continuation_rows)


# ---------------------------------------------------------------------------------------------------
# Tables for the clamping notebook (and `summarise`): the notebook only plots what these return.
# ---------------------------------------------------------------------------------------------------

def mean_effects(effects: pl.DataFrame) -> pl.DataFrame:
    """Mean effects over prompts, one row per (concept, unit_kind, unit, strength), sorted by those keys.

    `effects` is the effects table of `run_clamping` (one row per target and strength and prompt, with
    at least the columns concept, unit_kind, unit, strength, concept_logprob_change,
    control_logprob_change, relative_effect and kl). Returns the four key columns followed by the means
    of concept_logprob_change, control_logprob_change, relative_effect and kl."""
    return (effects.group_by("concept", "unit_kind", "unit", "strength")
            .agg(pl.col("concept_logprob_change", "control_logprob_change", "relative_effect", "kl").mean())
            .sort("concept", "unit_kind", "unit", "strength"))


def continuation_table(continuations: pl.DataFrame) -> pl.DataFrame:
    """The continuations side by side: one row per (concept, prompt_text, strength), sorted by those,
    with columns concept, prompt_text, strength, greedy and sampled (the continuation text of each mode).

    `continuations`: the continuations table of `run_clamping` (columns concept, prompt_text, mode,
    strength, continuation, ...), with one continuation per (concept, prompt_text, strength, mode)."""
    return (continuations.pivot(on="mode", index=["concept", "prompt_text", "strength"], values="continuation")
            .select("concept", "prompt_text", "strength", "greedy", "sampled")
            .sort("concept", "prompt_text", "strength"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `clamping`: `python -m mechinterp.clamping --help`."""
    parser = argparse.ArgumentParser(description="Clamp concept features and their best neurons; measure the output.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--sae", required=True, help="the SAE folder whose features are clamped")
    parser.add_argument("--sae-id", required=True)
    parser.add_argument("--units", required=True, help="the polysemanticity units table")
    parser.add_argument("--concepts", required=True, help="the polysemanticity concepts table")
    parser.add_argument("--lexicons", required=True)
    parser.add_argument("--table", required=True, help="the token table (corpus frequencies for control tokens)")
    parser.add_argument("--settings", required=True, help="the config's `clamping` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--continuations", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    settings = ClampingSettings(**json.loads(args.settings))
    start = time.perf_counter()
    sae = load_sae(args.sae)[0]
    site = Site.parse(json.loads((Path(args.sae) / "training_summary.json").read_text())["site"])
    bridge = load_model(args.model, args.device)
    token_ids = pl.read_parquet(args.table, columns=["token_id"])["token_id"].to_numpy()
    counts = np.bincount(token_ids, minlength=bridge.cfg.d_vocab)
    targets, effects, continued = run_clamping(
        bridge, sae, args.sae_id, site, pl.read_parquet(args.units), pl.read_parquet(args.concepts),
        pl.read_parquet(args.lexicons), counts, settings, args.seed)
    summary = summarise(effects, settings.equal_kl)
    for table, path in ((targets, args.targets), (effects, args.effects), (summary, args.summary),
                        (continued, args.continuations)):
        write_parquet(table, path)
    log.info("clamped %d units at %d strengths on %d prompts in %.1f s", targets.height, len(settings.strengths),
             len(settings.prompts), time.perf_counter() - start)
    for row in summary.iter_rows(named=True):
        log.info("%s %s %d: Spearman %.2f (relative), effect at KL %.2f: %.3f nats", row["concept"], row["unit_kind"],
                 row["unit"], row["spearman_relative"], row["equal_kl"], row["effect_at_equal_kl"])


if __name__ == "__main__":
    run_stage(main)
