"""Clamping: does setting one unit's value move the model's next token toward a concept?

The study's claim (the note's example: clamping a "suspicion" feature in Gemma-2B up makes " scam"
more likely, and down less likely) is tested over many concepts, at every SAE site of the config,
against baselines at the same site judged at equal damage.

- **Concepts**: every lexicon category with at least `min_concept_tokens` unambiguous whole-word
  tokens (words its lexicon lists under at most `max_word_categories` categories, without the corpus's
  most frequent words); the named ones (`concepts`, and `word_lists` such as the default suspicion
  list " scam", " fraud", ...) plus `lexicon_concepts` sampled with the seed at the headline SAE, and
  `placebo_concepts` placebos there: random word sets frequency-matched to the sampled concepts, which
  go through everything below; their statistics are the null of the real concepts'.
- **Units**: a unit reads a value from the site's activation and writes along one direction, and
  clamping sets the value: x + (v - read(x)) * write. An SAE feature reads f_j(x) and writes
  W_dec[j] (so the SAE's reconstruction error stays out of the edit: clamping to the current value
  changes nothing); a neuron (or residual dimension) reads and writes coordinate j; a
  difference-of-means vector d (the mean activation before the concept's tokens minus elsewhere,
  unit norm; the strong simple baseline of AxBench) reads x.d and writes d. v = strength x the
  unit's maximum on the statistics tokens.
- **Selection**, on the train split only: the input score of a feature is its concept specificity
  (share of its activation mass on the concept's tokens over their base rate, as in the
  polysemanticity stage; the same on the position before a concept token is reported beside it as
  `next_input_score`, where the effect is read); the output score (Arad, Mueller and Belinkov 2025)
  is the concept's relative gain when the unit is amplified to `output_strength` x its maximum on
  neutral train prompts, measured for the `output_candidates` units with the largest direct logit
  effect (the unit's write direction through the final norm and the unembedding). Baselines: the
  neuron with the best output score, each selected feature's own best-correlated neuron, the
  difference-of-means vector, and a pool of `random_pool` random live features (their mean, and the
  best of them by the same output score: the output selection's own selection effect).
- **Measurement**, on held-out prompts (corpus windows of `prompt_tokens` tokens cut before a word):
  the unit is clamped at the position whose next token is read; per row the change in log-probability
  of the concept's tokens minus that of frequency-matched control tokens, and the KL from the clean
  distribution. Every unit is measured at the probe `strengths`, then at strengths aimed at each of
  `kl_targets` from its probe KL, so that its measured points bracket the KL levels at which units are
  compared (a level no two points bracket gives NaN). A unit serving several concepts is measured once
  and read for each. Earlier positions are clean, so every row reuses the prompt's clean key-value
  cache and runs one token through the model instead of the whole window.
- **Continuations** of the hand-written prompts, with the named concepts' input- and output-selected
  features clamped at every position (BOS excepted), are scored by their perplexity under the clean model.

The model runs as a plain Hugging Face module here: transformer-lens 4.3's bridge computes wrong
logits from a key-value cache (it continues "The capital of France is" with " Paris-------"), while
the module under it, loaded on its own, matches its full forward to 1e-5 (tested).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp import clamping_stats
from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet
from mechinterp.saes import SparseAutoencoder, load_sae
from mechinterp.sites import Site
from mechinterp.tokens import split_rows

log = logging.getLogger(__name__)
# the random pool at the sites clamped with the named concepts only: their cross-concept verdicts are
# reported, not audited (too few concepts), and each pool member costs a unit's measurement
OTHER_SITES_RANDOM_POOL = 4


@dataclass(frozen=True)
class ClampingSettings:
    """The config's `clamping` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    sae: str
    """the headline SAE: every concept and baseline is clamped there; the other SAEs get the named concepts"""
    word_lists: dict[str, list[str]]
    """concepts given as words, each a single token of the model (e.g. suspicion: [" scam", ...])"""
    concepts: list[str]
    """lexicon concepts (<lexicon>:<category>) always clamped"""
    lexicon_concepts: int
    """lexicon concepts sampled (seeded) among the usable ones at the headline SAE"""
    max_word_categories: int
    """a word its lexicon lists under more categories than this is ambiguous and left out"""
    min_concept_tokens: int
    """a concept needs this many unambiguous whole-word tokens to be measured"""
    exclude_frequent_words: int
    """the most frequent words of the corpus are left out of concept and control tokens"""
    min_concept_words: int
    """a feature is ranked by input score for a concept only when active on this many of its words (or the most any feature reaches)"""
    statistics_tokens: int
    """train tokens read per site for input scores, maxima and difference-of-means vectors"""
    prompt_tokens: int
    """length of every selection and measurement prompt, BOS included"""
    selection_prompts: int
    """train-split prompts for output scores"""
    measure_prompts: int
    """held-out prompts for the effects"""
    output_strength: float
    """amplification (x max) of a candidate unit for its output score"""
    output_candidates: int
    """units per concept, by direct logit effect, whose output score is measured"""
    strengths: list[float]
    """clamp values (x the unit's maximum) measured for every unit (0 ablates; negative pushes against the
    unit); the largest positive and the most negative probe the unit's KL for `kl_targets`"""
    kl_targets: list[float]
    """KL (nats) each unit's extra strengths aim at, raising and lowering (KL taken to grow as strength^2
    from the probe), so that its measured points bracket every KL level"""
    max_strength: float
    """the largest |strength| an aimed strength may take"""
    kl_levels: list[float]
    """KL (nats) at which effects are read off the effect-against-damage curve, between the measured points
    that bracket them (NaN where none do)"""
    random_pool: int
    """random live features per site, measured once and read for every concept: the random baselines"""
    placebo_concepts: int
    """random word sets, frequency-matched to sampled concepts, run through the same selection and measurement
    at the headline SAE: the null of every cross-concept statistic"""
    monotone_threshold: float
    """a unit moves its concept monotonically when Spearman(strength, effect) reaches this"""
    bootstrap_samples: int
    """resamples of the bootstrap CIs"""
    batch_rows: int
    """clamped rows per forward pass"""
    prompts: list[str]
    """hand-written prompts for the continuations"""
    continuation_strengths: list[float]
    """clamp values (x the unit's maximum) of the continuations"""
    continuation_prompts: int
    """the first this many hand prompts are continued at every strength for the named concepts"""
    new_tokens: int
    """tokens generated per continuation"""

    def __post_init__(self) -> None:
        if not (min(self.strengths) < 0 < max(self.strengths)):
            raise UserError(f"clamping.strengths is {self.strengths}: it needs a negative and a positive strength, "
                            "the probes from which each unit's strengths are aimed at clamping.kl_targets (e.g. [-1, 0, 1]).")


# --- concepts -------------------------------------------------------------------------------------

def word_tokens(vocabulary: list[str], counts: np.ndarray, exclude_frequent: int) -> dict[str, list[int]]:
    """Whole-word tokens (a leading space, then letters only), grouped by their lower-cased word,
    leaving out the `exclude_frequent` words most frequent in the corpus (their probability mass
    would swamp a concept's)."""
    words: dict[str, list[int]] = {}
    for token_id, text in enumerate(vocabulary):
        if text.startswith(" ") and text[1:].isalpha():
            words.setdefault(text[1:].lower(), []).append(token_id)
    by_count = sorted(words, key=lambda w: (-int(counts[words[w]].sum()), w))
    return {w: words[w] for w in by_count[exclude_frequent:]}


def unambiguous_terms(lexicons: pl.DataFrame, max_categories: int) -> pl.DataFrame:
    """The lexicon rows whose term its lexicon lists under at most `max_categories` categories (Roget
    lists " set" and " number" under dozens; they are not evidence for any one of them)."""
    counts = lexicons.group_by("lexicon", "term").agg(pl.col("category").n_unique().alias("n_categories"))
    keep = counts.filter(pl.col("n_categories") <= max_categories).select("lexicon", "term")
    return lexicons.join(keep, on=["lexicon", "term"], maintain_order="left")


def concept_tokens(lexicons: pl.DataFrame, words: dict[str, list[int]]) -> dict[str, list[int]]:
    """For every lexicon concept (`<lexicon>:<category>`), the whole-word tokens whose word is one of its terms."""
    word_ids = pl.DataFrame({"term": list(words), "token": list(words.values())},
                            schema={"term": pl.Utf8, "token": pl.List(pl.Int64)})
    grouped = (lexicons.select(pl.concat_str("lexicon", pl.lit(":"), "category").alias("concept"),
                               pl.col("term").str.to_lowercase())
               .unique().join(word_ids, on="term").explode("token")
               .group_by("concept").agg(pl.col("token").unique().sort()))
    return dict(zip(grouped["concept"].to_list(), grouped["token"].to_list(), strict=True))


def word_list_tokens(tokenizer, word_lists: dict[str, list[str]]) -> dict[str, list[int]]:
    """The configured word lists as concepts `list:<name>`; every word must be one token of the model."""
    sets = {}
    for name, words in word_lists.items():
        ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in words}
        split = sorted(w for w, i in ids.items() if len(i) != 1)
        if split:
            raise UserError(f"clamping.word_lists.{name}: {split} are not single tokens of this model's vocabulary; "
                            "drop them or write them as the model tokenizes them (usually with a leading space).")
        sets[f"list:{name}"] = sorted({i[0] for i in ids.values()})
    return sets


def choose_concepts(token_sets: dict[str, list[int]], present: np.ndarray, settings: ClampingSettings, seed: int
                    ) -> tuple[list[str], list[str]]:
    """The named concepts (word lists, then `concepts`) and the lexicon concepts sampled at the
    headline SAE: a seeded sample of the usable ones, so no result chooses them. A concept is usable
    with `min_concept_tokens` tokens of which `min_concept_words` occur in the statistics tokens
    (`present` [vocab] bool): the input score needs the concept in the corpus."""
    def problem(concept: str) -> str | None:
        ids = token_sets[concept]
        if len(ids) < settings.min_concept_tokens:
            return (f"has {len(ids)} unambiguous whole-word tokens, fewer than clamping.min_concept_tokens = "
                    f"{settings.min_concept_tokens}; lower it or raise clamping.max_word_categories")
        if present[ids].sum() < settings.min_concept_words:
            return (f"has {int(present[ids].sum())} of its tokens in the statistics tokens, fewer than "
                    f"clamping.min_concept_words = {settings.min_concept_words}; raise clamping.statistics_tokens "
                    "or lower clamping.min_concept_words")
        return None

    named = [f"list:{name}" for name in settings.word_lists] + list(settings.concepts)
    for concept in named:
        if concept not in token_sets:
            close = sorted(c for c in token_sets if concept.split(":")[-1].lower() in c.lower())[:5]
            raise UserError(f"clamping.concepts: {concept!r} is not a lexicon concept (<lexicon>:<category>; "
                            f"similar: {close}).")
        if (why := problem(concept)) is not None:
            raise UserError(f"clamping: concept {concept!r} {why}.")
    pool = sorted(c for c in token_sets if not c.startswith("list:") and c not in named and problem(c) is None)
    if len(pool) < settings.lexicon_concepts:
        raise UserError(f"only {len(pool)} lexicon concepts are usable (clamping.min_concept_tokens = "
                        f"{settings.min_concept_tokens} unambiguous tokens, clamping.min_concept_words = "
                        f"{settings.min_concept_words} of them in the statistics tokens), fewer than "
                        f"clamping.lexicon_concepts = {settings.lexicon_concepts}; lower one of them.")
    picked = np.random.default_rng(seed).choice(len(pool), settings.lexicon_concepts, replace=False)
    return named, [pool[i] for i in sorted(picked)]


def statistics_rows(table: pl.DataFrame, n: int, seed: int) -> np.ndarray:
    """The train-split cache rows (BOS left out) that every site's statistics read: a seeded sample of `n`."""
    rows, positions = split_rows(table, "train")
    rows = rows[positions != 0]
    if len(rows) > n:
        rows = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    return rows


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


# --- prompts --------------------------------------------------------------------------------------

def placebo_sets(models: list[list[int]], candidate_ids: list[int], present: np.ndarray, counts: np.ndarray, n: int,
                 seed: int, nearest: int = 20) -> dict[str, list[int]]:
    """`n` placebo concepts `placebo:<i>`: random sets of whole-word tokens, each frequency-matched to a
    model concept's tokens (`models`, cycled): every model token is replaced by one of the `nearest`
    unused candidates closest to it in log corpus count, drawn at random. Candidates are the words in
    no model concept that occur in the statistics tokens (`present` [vocab] bool), so input scores
    exist; the placebos share no token."""
    rng = np.random.default_rng(seed)
    taken = {t for ids in models for t in ids}
    pool = np.array(sorted(t for t in set(candidate_ids) - taken if present[t]), dtype=np.int64)
    log_count = np.log1p(counts[pool].astype(float))
    unused = np.ones(len(pool), dtype=bool)
    placebos = {}
    for i in range(n):
        picked = []
        for token in models[i % len(models)]:
            free = np.flatnonzero(unused)
            if len(free) == 0:
                raise UserError(f"clamping.placebo_concepts = {n}: the corpus has too few unused words for "
                                f"placebo {i}; lower it.")
            near = free[np.argsort(np.abs(log_count[free] - np.log1p(counts[token])), kind="stable")[:nearest]]
            pick = int(rng.choice(near))
            unused[pick] = False
            picked.append(int(pool[pick]))
        placebos[f"placebo:{i:02d}"] = sorted(picked)
    return placebos


def boundary_prompts(windows: np.ndarray, word_start: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """`n` prompts [n, length] from distinct windows [n_windows, context]: the window's BOS, then the
    `length - 1` tokens before a whole-word token (so the next token read is a new word). Seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for window in rng.permutation(len(windows)):
        positions = np.flatnonzero(word_start[windows[window, length:]]) + length
        if len(positions):
            p = int(rng.choice(positions))
            chosen.append(np.concatenate([windows[window, :1], windows[window, p - length + 1 : p]]))
        if len(chosen) == n:
            return np.stack(chosen).astype(np.int64)
    raise UserError(f"only {len(chosen)} of the split's {len(windows)} windows have a word start after {length} tokens, "
                    f"fewer than the {n} prompts asked (clamping.selection_prompts / measure_prompts); lower them or "
                    "clamping.prompt_tokens, or raise tokens.train_tokens / tokens.heldout_tokens (if the tokenize log "
                    "says the corpus ran short of them, add documents instead).")


# --- units and the clamped forward ----------------------------------------------------------------

@dataclass
class Units:
    """G units of one site: `sae_index` [G] (the feature an SAE unit reads, -1 for a linear read),
    `read` [G, d] (the linear read direction; zero for SAE units), `write` [G, d], `scale` [G] (the
    unit's maximum, the clamp value at strength 1)."""

    sae_index: torch.Tensor
    read: torch.Tensor
    write: torch.Tensor
    scale: torch.Tensor

    def take(self, index: torch.Tensor) -> Units:
        return Units(self.sae_index[index], self.read[index], self.write[index], self.scale[index])

    def __len__(self) -> int:
        return len(self.sae_index)


def read_values(x: torch.Tensor, units: Units, sae: SparseAutoencoder | None) -> torch.Tensor:
    """Each row's unit value [R] for activations x [R, d] (row r reads unit r)."""
    values = (x * units.read).sum(-1)
    feature_rows = units.sae_index >= 0
    if feature_rows.any():
        encoded = sae.encode(x[feature_rows])
        values[feature_rows] = encoded.gather(1, units.sae_index[feature_rows, None]).squeeze(1)
    return values


def clamp_rows(x: torch.Tensor, units: Units, values: torch.Tensor, sae: SparseAutoencoder | None) -> torch.Tensor:
    """x [R, d] with row r's unit set to values[r]: x + (v - read(x)) * write."""
    return x + (values - read_values(x, units, sae))[:, None] * units.write


def hf_module_name(bridge, component) -> str:
    """The name, in a plain Hugging Face model, of the module that a bridge component wraps."""
    names = {id(module): name for name, module in bridge.original_model.named_modules()}
    return names[id(component.original_component)].replace("._original_component", "")


@dataclass(frozen=True)
class ModelParts:
    """The plain Hugging Face model and the module names the clamping stage hooks."""

    model: torch.nn.Module
    block_names: list[str]  # decoder layers: a resid site's activation is a layer's output
    mlp_out_names: list[str]  # MLP output projections: an mlp site's activation is their input
    final_norm: str
    unembed: str

    def site_module(self, site: Site) -> torch.nn.Module:
        name = self.block_names[site.layer] if site.kind == "resid" else self.mlp_out_names[site.layer]
        return self.model.get_submodule(name)

    def to_residual(self, site: Site, directions: torch.Tensor) -> torch.Tensor:
        """Directions in the site's space [n, d_site] as residual-stream directions [n, d_model]."""
        if site.kind == "resid":
            return directions
        out = self.model.get_submodule(self.mlp_out_names[site.layer])
        return out(directions) - out(torch.zeros_like(directions[:1]))


def load_parts(model_dir: str | Path, device: str) -> tuple[ModelParts, Any]:
    """The fetched model as a plain Hugging Face module (safetensors, remote code as SOURCE.json allows)
    and its tokenizer; module names come from transformer-lens's mapping of the architecture."""
    from transformers import AutoModelForCausalLM

    from mechinterp.model import load_model

    bridge = load_model(model_dir, device)
    n_layers = bridge.cfg.n_layers
    names = ([hf_module_name(bridge, bridge.blocks[i]) for i in range(n_layers)],
             [hf_module_name(bridge, bridge.blocks[i].mlp.out) for i in range(n_layers)],
             hf_module_name(bridge, bridge.ln_final), hf_module_name(bridge, bridge.unembed))
    tokenizer = bridge.tokenizer
    del bridge
    source = json.loads((Path(model_dir) / "SOURCE.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=source.get("trust_remote_code", False))
    return ModelParts(model.to(device).eval(), *names), tokenizer


@contextmanager
def clamp_hook(parts: ModelParts, site: Site, edit):
    """Apply `edit(activation [R, S, d]) -> activation` at the site while the block runs; removed on exit."""
    module = parts.site_module(site)
    if site.kind == "resid":
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        handle = module.register_forward_hook(hook)
    else:
        def hook(_module, args):
            return (edit(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def start_at_block(parts: ModelParts, layer: int, hidden: torch.Tensor, tuple_output: bool):
    """Run only blocks `layer` and up: the blocks below return their input unchanged, and block `layer`
    gets `hidden` [R, S, d] (the clean residual entering it) instead. For one step from a key-value
    cache this is exact: the skipped blocks' cache entries are never read again."""
    below = [parts.model.get_submodule(name) for name in parts.block_names[:layer]]

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if tuple_output else hidden_states

    def replace_input(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    for block in below:
        block.forward = passthrough  # an instance attribute shadows the class's forward
    handle = parts.model.get_submodule(parts.block_names[layer]).register_forward_pre_hook(replace_input,
                                                                                          with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in below:
            del block.forward


class ClampedNextToken:
    """Next-token log-probabilities of fixed-length prompts [P, T] with units clamped at the last
    position. The clean prefix (positions 0..T-2) is run once and its key-value cache reused by every
    batch of units, and the blocks below the site run once, clean, for the last position too: each
    clamped row costs one token through the blocks from the site up.

    >>> step = ClampedNextToken(parts, prompts, site, sae, batch_rows=512)   # doctest: +SKIP
    >>> for start, log_probs in step.batches(units, values): ...  # [g, P, vocab] per batch   # doctest: +SKIP
    """

    def __init__(self, parts: ModelParts, prompts: torch.Tensor, site: Site, sae: SparseAutoencoder | None,
                 batch_rows: int) -> None:
        self.parts, self.site, self.sae = parts, site, sae
        self.device = next(parts.model.parameters()).device
        self.prompts = prompts.to(self.device)
        self.batch_units = max(1, batch_rows // len(prompts))
        captured = {}

        def capture_input(_module, args, kwargs):
            captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

        def capture_output(_module, _args, output):
            captured["tuple_output"] = isinstance(output, tuple)

        site_block = parts.model.get_submodule(parts.block_names[site.layer])
        handles = [site_block.register_forward_pre_hook(capture_input, with_kwargs=True),
                   site_block.register_forward_hook(capture_output)]
        with torch.no_grad():
            self.prefix = parts.model(self.prompts[:, :-1], use_cache=True).cache
            try:
                # a step appends to the cache it is given: every step gets a copy of the prefix
                self.clean = self._step(copy.deepcopy(self.prefix), self.prompts[:, -1:], None).cpu()  # [P, V]
            finally:
                for handle in handles:
                    handle.remove()
        self.site_input, self.tuple_output = captured["hidden"], captured["tuple_output"]  # [P, 1, d]

    def _step(self, cache, last: torch.Tensor, edit) -> torch.Tensor:
        if edit is None:
            logits = self.parts.model(last, cache=cache, use_cache=True).logits
        else:
            rows = len(last) // len(self.prompts)
            with (clamp_hook(self.parts, self.site, edit),
                  start_at_block(self.parts, self.site.layer, self.site_input.repeat_interleave(rows, 0),
                                 self.tuple_output)):
                logits = self.parts.model(last, cache=cache, use_cache=True).logits
        return logits[:, -1].float().log_softmax(-1)

    @torch.no_grad()
    def batches(self, units: Units, values: torch.Tensor):
        """Yield (start, log-probabilities [g, P, V]) for consecutive batches of the G units."""
        n_prompts = len(self.prompts)
        for start in range(0, len(units), self.batch_units):
            index = torch.arange(start, min(start + self.batch_units, len(units)))
            group, group_values = units.take(index), values[index]
            cache = copy.deepcopy(self.prefix)
            cache.batch_repeat_interleave(len(index))  # rows: prompt-major, then unit
            rows = Units(*(t.to(self.device).repeat(n_prompts, *[1] * (t.dim() - 1))
                           for t in (group.sae_index, group.read, group.write, group.scale)))
            row_values = group_values.to(self.device).repeat(n_prompts)

            def edit(acts: torch.Tensor) -> torch.Tensor:
                edited = acts.clone()
                edited[:, -1] = clamp_rows(acts[:, -1].float(), rows, row_values, self.sae).to(acts.dtype)
                return edited

            last = self.prompts[:, -1:].repeat_interleave(len(index), 0)
            log_probs = self._step(cache, last, edit).cpu()
            yield start, log_probs.reshape(n_prompts, len(index), -1).transpose(0, 1)


def log_mass(log_probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log of the total probability of `token_ids` under log-probabilities [..., vocab]."""
    return log_probs[..., token_ids].logsumexp(-1)


def measure(step: ClampedNextToken, units: Units, strengths: torch.Tensor, token_sets: list[tuple[list[int], list[int]]],
            desc: str) -> dict[str, np.ndarray]:
    """Each unit g clamped at each of its strengths `strengths` [G, S] (x its maximum), on every prompt:
    the change in log-probability of every token set's concept tokens and of its control tokens
    [G, S, P, C] (C = len(token_sets)), KL(clean || clamped) and the top next token [G, S, P]. A clamped
    forward is read for every set, so a unit is measured once for all its concepts.

    >>> measured = measure(step, units, torch.tensor([[-1.0, 1.0]] * len(units)), [(concept, control)], "units")  # doctest: +SKIP
    >>> measured["concept"].shape  # [G, 2, P, 1]   # doctest: +SKIP
    """
    n_units, n_strengths = strengths.shape
    n_prompts, n_sets = len(step.prompts), len(token_sets)
    grid = torch.arange(n_units).repeat_interleave(n_strengths)  # unit-major, then strength
    values = strengths.reshape(-1).float() * units.scale[grid]
    id_sets = {"concept": [torch.tensor(c) for c, _ in token_sets], "control": [torch.tensor(c) for _, c in token_sets]}
    clean = step.clean
    clean_probs = clean.exp()
    clean_mass = {k: torch.stack([log_mass(clean, ids) for ids in sets], -1) for k, sets in id_sets.items()}  # [P, C]
    out = {k: np.zeros((n_units * n_strengths, n_prompts, n_sets)) for k in id_sets}
    out["kl"] = np.zeros((n_units * n_strengths, n_prompts))
    out["top_token"] = np.zeros((n_units * n_strengths, n_prompts), dtype=np.int64)
    for start, log_probs in tqdm(step.batches(units.take(grid), values), desc=desc, unit="batch",
                                 total=-(-len(grid) // step.batch_units)):
        rows = slice(start, start + len(log_probs))
        for k, sets in id_sets.items():
            mass = torch.stack([log_mass(log_probs, ids) for ids in sets], -1)  # [g, P, C]
            out[k][rows] = (mass - clean_mass[k]).double().numpy()
        out["kl"][rows] = (clean_probs * (clean - log_probs)).sum(-1).clamp_min(0).double().numpy()
        out["top_token"][rows] = log_probs.argmax(-1).numpy()
    return {k: v.reshape(n_units, n_strengths, *v.shape[1:]) for k, v in out.items()}


def bracketing_strengths(probe: list[float], probe_kl: np.ndarray, targets: list[float], max_strength: float
                         ) -> np.ndarray:
    """Per unit, strengths [G, 2T] aimed at each KL target raising and lowering it (raising first), from
    its mean KL at the probe strengths `probe_kl` [G, len(probe)]: s = s_probe * sqrt(target / KL_probe),
    with s_probe the largest positive (the most negative) probe strength, so KL is taken to grow as
    strength^2 (a unit's measured KL, not this law, decides what its points bracket); |s| is at most
    `max_strength`, which a unit with no KL at the probe gets.

    >>> bracketing_strengths([-1.0, 0.0, 1.0], np.array([[0.4, 0.0, 0.1]]), [0.025, 0.4], 32.0).tolist()
    [[0.5, 2.0, -0.25, -1.0]]
    """
    probe = np.asarray(probe, dtype=float)
    targets = np.asarray(targets, dtype=float)
    columns = []
    for sign in (1.0, -1.0):
        side = np.flatnonzero(probe * sign > 0)
        at = side[np.argmax(np.abs(probe[side]))]
        kl = probe_kl[:, at, None]
        ratio = np.divide(targets[None], kl, out=np.full((len(kl), len(targets)), np.inf), where=kl > 0)
        columns.append(sign * np.minimum(abs(probe[at]) * np.sqrt(ratio), max_strength))
    return np.concatenate(columns, 1)


# --- statistics of a site on the train split ------------------------------------------------------

@dataclass
class SiteStatistics:
    """What the selection needs from one pass over a site's train tokens (BOS and outliers left out)."""

    feature_max: torch.Tensor  # [F] largest activation of each SAE feature
    feature_active: torch.Tensor  # [F] tokens on which it is positive
    input_score: torch.Tensor  # [C, F] concept specificity on the current token, -inf where ineligible
    next_input_score: torch.Tensor  # [C, F] the same on the position before a concept token, -inf where ineligible
    neuron_max: torch.Tensor  # [N] largest activation of each site unit (neuron or residual dimension)
    neuron_active: torch.Tensor  # [N]
    diffmean: torch.Tensor  # [C, d] unit-norm mean before the concept's tokens minus elsewhere
    diffmean_max: torch.Tensor  # [C] largest projection onto it


@torch.no_grad()
def site_statistics(cache: ActivationCache, rows: np.ndarray, token_ids: np.ndarray, next_ids: np.ndarray,
                    concepts: list[list[int]], sae: SparseAutoencoder, outlier_threshold: float,
                    min_active: int, min_concept_words: int, chunk: int = 4096) -> SiteStatistics:
    """Two reads of cache `rows` (current tokens `token_ids`, next tokens `next_ids`, -1 at a window's
    end): the first for feature and unit maxima, input scores (on the current token, and on the next
    token: where the difference-of-means vector and the effect are read) and difference-of-means
    vectors, the second for the largest projection onto each vector."""
    vocab = int(max(token_ids.max(), next_ids.max(), max(max(c) for c in concepts))) + 1
    membership = torch.zeros(vocab + 1, len(concepts))  # last row: no token
    for c, ids in enumerate(concepts):
        membership[ids, c] = 1
    words = sorted({t for ids in concepts for t in ids})
    word_index = torch.full((vocab + 1,), len(words), dtype=torch.long)
    word_index[words] = torch.arange(len(words))
    f_max, f_active = torch.full((sae.d_sae,), -torch.inf), torch.zeros(sae.d_sae)
    f_mass, f_concept = torch.zeros(sae.d_sae), torch.zeros(len(concepts), sae.d_sae)
    f_next_concept = torch.zeros(len(concepts), sae.d_sae)
    word_active = torch.zeros(len(words) + 1, sae.d_sae)
    width = cache.header["shape"][1]
    n_max, n_active = torch.full((width,), -torch.inf), torch.zeros(width)
    before_sum, before_n = torch.zeros(len(concepts), width, dtype=torch.float64), torch.zeros(len(concepts))
    all_sum, n_rows, concept_rows = torch.zeros(width, dtype=torch.float64), 0, torch.zeros(len(concepts))
    kept_rows = []
    for part, x in tqdm(cache.chunks(rows, chunk), desc="site statistics", unit="chunk", total=-(-len(rows) // chunk)):
        kept = (x.norm(dim=1) <= outlier_threshold).numpy()
        x, part = x[kept], part[kept]
        kept_rows.append(part)
        position = np.searchsorted(rows, part)
        current = torch.from_numpy(token_ids[position])
        following = torch.from_numpy(np.where(next_ids[position] < 0, vocab, next_ids[position]))
        z = sae.encode(x)
        positive = z.clamp_min(0)
        f_max, f_active = torch.maximum(f_max, z.max(0).values), f_active + (z > 0).sum(0)
        f_mass += positive.sum(0)
        f_concept += membership[current].T @ positive
        word_active.index_add_(0, word_index[current], (z > 0).float())
        n_max, n_active = torch.maximum(n_max, x.max(0).values), n_active + (x > 0).sum(0)
        before = membership[following]
        f_next_concept += before.T @ positive
        before_sum += before.T.double() @ x.double()
        before_n += before.sum(0)
        all_sum += x.double().sum(0)
        concept_rows += membership[current].sum(0)
        n_rows += len(x)
    rest = (all_sum[None] - before_sum) / (n_rows - before_n).clamp_min(1)[:, None]
    direction = (before_sum / before_n.clamp_min(1)[:, None] - rest).float()
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_max = torch.full((len(concepts),), -torch.inf)
    for _, x in cache.chunks(np.concatenate(kept_rows), chunk):
        d_max = torch.maximum(d_max, (x @ direction.T).max(0).values)
    mass = f_mass.clamp_min(torch.finfo(torch.float32).tiny)

    def specificity(on_concept: torch.Tensor, concept_share: torch.Tensor) -> torch.Tensor:
        base = concept_share[:, None]
        return (on_concept / mass - base) / (1 - base).clamp_min(1e-9)

    concept_words = torch.zeros(len(concepts), len(words) + 1)
    for c, ids in enumerate(concepts):
        concept_words[c, word_index[ids]] = 1
    words_active = concept_words @ (word_active > 0).float()
    # a concept whose words are rare may have no feature on `min_concept_words` of them: then the
    # features on the most of its words are eligible
    frequent = (f_active >= min_active)[None]
    reached = (words_active * frequent).max(1, keepdim=True).values.clamp(min=1)
    eligible = frequent & (words_active >= torch.minimum(reached, torch.tensor(float(min_concept_words))))
    rows = max(n_rows, 1)
    return SiteStatistics(f_max, f_active, specificity(f_concept, concept_rows / rows).masked_fill(~eligible, -torch.inf),
                          specificity(f_next_concept, before_n / rows).masked_fill(~eligible, -torch.inf),
                          n_max, n_active, direction, d_max)


# --- direct logit effects and the choice of units -------------------------------------------------

@torch.no_grad()
def normed_directions(parts: ModelParts, site: Site, writes: torch.Tensor, scales: torch.Tensor,
                      reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The final norm of the final residual `reference` [d_model] moved by scale x each unit's write
    direction (mapped to the residual stream) [U, d_model], and of `reference` itself (last row):
    what the unembedding reads when only the unit's direct path acts."""
    norm = parts.model.get_submodule(parts.final_norm)
    moved = [norm(reference + scales[i : i + chunk, None] * parts.to_residual(site, writes[i : i + chunk]))
             for i in range(0, len(writes), chunk)]
    return torch.cat([*moved, norm(reference[None])])


def direct_logit_effects(parts: ModelParts, normed: torch.Tensor, concept_ids: list[int], control_ids: list[int]
                         ) -> torch.Tensor:
    """Per unit [U]: the mean logit gain of the concept's tokens minus that of the control tokens from
    `normed_directions` [U + 1, d] (only the unembedding rows of those tokens are read; an unembedding
    bias adds the same to every row, the reference last among them, and cancels in the gain)."""
    unembed = parts.model.get_submodule(parts.unembed)
    gains = []
    for ids in (concept_ids, control_ids):
        logits = normed @ unembed.weight[ids].T
        gains.append((logits[:-1] - logits[-1]).mean(1))
    return gains[0] - gains[1]


@torch.no_grad()
def final_residual(parts: ModelParts, prompts: torch.Tensor) -> torch.Tensor:
    """The mean residual entering the final norm at the prompts' last position [d_model]."""
    captured = []
    module = parts.model.get_submodule(parts.final_norm)
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0][:, -1].float()))
    try:
        parts.model(prompts.to(next(parts.model.parameters()).device))
    finally:
        handle.remove()
    return captured[0].mean(0)


@dataclass
class Chosen:
    """One clamped unit of one concept: what it is, how it was chosen, and its scores."""

    concept: str
    unit_kind: str  # feature, neuron, correlated_neuron, diffmean, random
    selection: str  # input, output, or "" for a baseline chosen by rule; pool for a random feature
    unit: int  # feature or neuron index; the concept's index for diffmean
    input_score: float  # concept specificity on the current token (the input selection's score)
    next_input_score: float  # concept specificity on the position before a concept token
    output_score: float
    direct_logit_effect: float

    @property
    def space(self) -> tuple[str, int]:
        """The unit's identity at its site: the same feature or neuron chosen for two concepts is one unit."""
        return unit_space(self.unit_kind), self.unit


def unit_space(unit_kind: str) -> str:
    """What a kind of unit clamps: an SAE `feature`, a site coordinate (`neuron`) or a `diffmean` vector."""
    return {"random": "feature", "correlated_neuron": "neuron"}.get(unit_kind, unit_kind)


def sae_units(sae: SparseAutoencoder, features: torch.Tensor, scales: torch.Tensor) -> Units:
    return Units(features.long(), torch.zeros(len(features), sae.d_in), sae.W_dec[features].detach(), scales)


def coordinate_units(width: int, index: torch.Tensor, scales: torch.Tensor) -> Units:
    basis = torch.eye(width)[index]
    return Units(torch.full((len(index),), -1, dtype=torch.long), basis, basis, scales)


def concat_units(parts: list[Units]) -> Units:
    return Units(*(torch.cat([getattr(u, f) for u in parts]) for f in ("sae_index", "read", "write", "scale")))


def site_units(spaces: list[tuple[str, int]], sae: SparseAutoencoder, stats: SiteStatistics) -> Units:
    """The Units of distinct (kind, index) identities: SAE features, site coordinates (neurons or residual
    dimensions) and difference-of-means vectors (index: the concept's)."""
    width = stats.neuron_max.numel()
    parts = []
    for kind, index in spaces:
        i = torch.tensor([index])
        if kind == "feature":
            parts.append(sae_units(sae, i, stats.feature_max[i]))
        elif kind == "neuron":
            parts.append(coordinate_units(width, i, stats.neuron_max[i]))
        else:
            parts.append(Units(torch.tensor([-1]), stats.diffmean[i], stats.diffmean[i], stats.diffmean_max[i]))
    return concat_units(parts)


def choose_units(parts: ModelParts, site: Site, sae: SparseAutoencoder, stats: SiteStatistics, concepts: list[str],
                 concept_sets: list[list[int]], control_sets: list[list[int]], correlated: dict[int, int],
                 selection_step: ClampedNextToken, reference: torch.Tensor, settings: ClampingSettings, seed: int,
                 random_pool: int) -> tuple[list[Chosen], pl.DataFrame]:
    """Per concept: the feature with the best input score, the feature and the neuron with the best
    output score (among the `output_candidates` with the largest direct logit effect), each selected
    feature's best-correlated neuron, the difference-of-means vector, and the site's pool of
    `random_pool` random live features (the same for every concept, each with its output score for the
    concept, so the best of them is the output selection's own control). Also every selection score
    computed (`selection_scores`)."""
    rng = np.random.default_rng(seed)
    alive_features = torch.nonzero(stats.feature_active > 0).squeeze(1)
    alive_neurons = torch.nonzero(stats.neuron_active > 0).squeeze(1)
    width = stats.neuron_max.numel()
    token_sets = list(zip(concept_sets, control_sets, strict=True))
    with torch.no_grad():
        normed_features = normed_directions(parts, site, sae.W_dec[alive_features], stats.feature_max[alive_features],
                                            reference)
        normed_neurons = normed_directions(parts, site, torch.eye(width)[alive_neurons], stats.neuron_max[alive_neurons],
                                           reference)
        normed_diffmean = normed_directions(parts, site, stats.diffmean, stats.diffmean_max, reference)
    pool = np.sort(rng.choice(alive_features.numpy(), min(random_pool, len(alive_features)), replace=False))
    pool_scored = measure(selection_step, sae_units(sae, torch.from_numpy(pool), stats.feature_max[pool]),
                          torch.full((len(pool), 1), settings.output_strength), token_sets, desc="random pool output scores")
    pool_output = (pool_scored["concept"] - pool_scored["control"])[:, 0].mean(1)  # [R, C]
    chosen, measured = [], []
    for c, concept in enumerate(tqdm(concepts, desc=f"choosing units at {site.id}", unit="concept")):
        feature_effect = direct_logit_effects(parts, normed_features, concept_sets[c], control_sets[c])
        neuron_effect = direct_logit_effects(parts, normed_neurons, concept_sets[c], control_sets[c])
        diffmean_effect = direct_logit_effects(parts, normed_diffmean, concept_sets[c], control_sets[c])
        k = settings.output_candidates
        feature_candidates = alive_features[feature_effect.topk(min(k, len(alive_features))).indices]
        neuron_candidates = alive_neurons[neuron_effect.topk(min(k, len(alive_neurons))).indices]
        candidates = concat_units([sae_units(sae, feature_candidates, stats.feature_max[feature_candidates]),
                                   coordinate_units(width, neuron_candidates, stats.neuron_max[neuron_candidates])])
        scored = measure(selection_step, candidates, torch.full((len(candidates), 1), settings.output_strength),
                         [token_sets[c]], desc="output scores")
        output = (scored["concept"] - scored["control"])[:, 0, :, 0].mean(1)
        effect_of = {"feature": dict(zip(alive_features.tolist(), feature_effect.tolist(), strict=True)),
                     "neuron": dict(zip(alive_neurons.tolist(), neuron_effect.tolist(), strict=True)),
                     "diffmean": {c: float(diffmean_effect[c].detach())}}
        n_f = len(feature_candidates)
        input_feature = int(stats.input_score[c].argmax())
        if not torch.isfinite(stats.input_score[c, input_feature]):
            raise UserError(f"clamping: no feature of {site.id} is active on clamping.min_concept_words = "
                            f"{settings.min_concept_words} words of {concept!r} in the statistics tokens; lower "
                            "clamping.min_concept_words or raise clamping.statistics_tokens.")
        output_feature = int(feature_candidates[int(np.argmax(output[:n_f]))])
        output_neuron = int(neuron_candidates[int(np.argmax(output[n_f:]))])
        output_of = {("feature", int(u)): float(v) for u, v in zip(feature_candidates, output[:n_f], strict=True)}
        output_of.update({("neuron", int(u)): float(v) for u, v in zip(neuron_candidates, output[n_f:], strict=True)})
        output_of.update({("feature", int(u)): float(v) for u, v in zip(pool, pool_output[:, c], strict=True)})
        measured += [{"concept": concept, "unit_kind": space, "unit": unit, "output_score": score,
                      "direct_logit_effect": effect_of[space][unit]} for (space, unit), score in output_of.items()]
        rows = [("feature", "input", input_feature), ("feature", "output", output_feature),
                ("neuron", "output", output_neuron), ("correlated_neuron", "input", correlated[input_feature]),
                ("correlated_neuron", "output", correlated[output_feature]), ("diffmean", "", c),
                *(("random", clamping_stats.POOL, int(f)) for f in pool)]
        for kind, selection, unit in rows:
            space = unit_space(kind)
            inputs = ((stats.input_score[c, unit], stats.next_input_score[c, unit]) if space == "feature"
                      else (torch.tensor(-torch.inf),) * 2)  # only features have input scores
            chosen.append(Chosen(concept, kind, selection, unit, *(float(v) if torch.isfinite(v) else float("nan")
                                                                  for v in inputs),
                                 output_of.get((space, unit), float("nan")),
                                 float(effect_of[space].get(unit, float("nan")))))
    return chosen, selection_scores(stats.input_score, concepts, measured)


def selection_scores(input_score: torch.Tensor, concepts: list[str], measured: list[dict], best: int = 3
                     ) -> pl.DataFrame:
    """Every selection score of one site, for the feature browser: each feature's `best` concepts by input
    score (`input_score` [concepts, features], -inf where not eligible), and the output score and direct
    logit effect of every output candidate (features and neurons), joined on (concept, unit_kind, unit)."""
    values, index = input_score.topk(min(best, len(concepts)), dim=0)
    finite = torch.isfinite(values)
    rank, feature = torch.nonzero(finite, as_tuple=True)
    inputs = pl.DataFrame({"concept": [concepts[i] for i in index[rank, feature].tolist()], "unit_kind": "feature",
                           "unit": feature.numpy().astype(np.int64), "input_score": values[finite].double().numpy()},
                          schema_overrides={"concept": pl.Utf8})
    outputs = pl.DataFrame(measured, schema={"concept": pl.Utf8, "unit_kind": pl.Utf8, "unit": pl.Int64,
                                             "output_score": pl.Float64, "direct_logit_effect": pl.Float64})
    return (inputs.join(outputs, on=["concept", "unit_kind", "unit"], how="full", coalesce=True)
            .sort("unit_kind", "unit", "concept"))


# --- continuations --------------------------------------------------------------------------------

@torch.no_grad()
def continue_prompt(parts: ModelParts, site: Site, sae: SparseAutoencoder | None, unit: Units, values: torch.Tensor,
                    prompt: list[int], new_tokens: int, sample: bool, seed: int) -> list[list[int]]:
    """Continuations of `prompt` (one row per value [G]) with the unit clamped at every position but
    BOS, greedy or sampled (seeded), through the module's key-value cache."""
    device = next(parts.model.parameters()).device
    rows = Units(*(t.repeat(len(values), *[1] * (t.dim() - 1)).to(device)
                   for t in (unit.sae_index, unit.read, unit.write, unit.scale)))
    values = values.to(device)

    def edit(acts: torch.Tensor) -> torch.Tensor:
        edited = acts.clone()
        first = 1 if acts.shape[1] > 1 else 0  # the prompt pass starts at BOS, which stays clean
        for position in range(first, acts.shape[1]):
            edited[:, position] = clamp_rows(acts[:, position].float(), rows, values, sae).to(acts.dtype)
        return edited

    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt] * len(values), device=device)
    generated, cache = [], None
    with clamp_hook(parts, site, edit):
        for _ in range(new_tokens):
            out = parts.model(ids if cache is None else ids[:, -1:], cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1].float()
            nxt = (torch.multinomial(logits.softmax(-1), 1, generator=generator) if sample
                   else logits.argmax(-1, keepdim=True))
            ids = torch.cat([ids, nxt], 1)
            generated.append(nxt)
    return torch.cat(generated, 1).tolist()


@torch.no_grad()
def perplexity(parts: ModelParts, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """Perplexity of each continuation under the clean model, given the prompt."""
    device = next(parts.model.parameters()).device
    ids = torch.tensor([prompt + c for c in continuations], device=device)
    log_probs = parts.model(ids).logits[:, :-1].float().log_softmax(-1)
    taken = log_probs.gather(-1, ids[:, 1:, None])[..., 0][:, len(prompt) - 1 :]
    return (-taken.mean(1)).exp().tolist()


# --- the stage ------------------------------------------------------------------------------------

@dataclass
class SiteInputs:
    """One SAE's site as the clamping stage reads it."""

    sae_id: str
    sae: SparseAutoencoder
    site: Site
    cache: ActivationCache
    outlier_threshold: float


@dataclass(frozen=True)
class StatisticsTokens:
    """The train tokens every site's statistics read: cache rows, their tokens and next tokens (-1 at a
    window's end)."""

    rows: np.ndarray
    token_ids: np.ndarray
    next_ids: np.ndarray

    @classmethod
    def sample(cls, table: pl.DataFrame, n: int, seed: int) -> StatisticsTokens:
        rows = statistics_rows(table, n, seed)
        token_ids = table["token_id"].to_numpy().astype(np.int64)
        same_window = np.append(table["sequence"].to_numpy()[1:] == table["sequence"].to_numpy()[:-1], False)
        next_ids = np.where(same_window, np.append(token_ids[1:], -1), -1)
        return cls(rows, token_ids[rows], next_ids[rows])


def run_site(parts: ModelParts, inputs: SiteInputs, concepts: list[str], token_sets: dict[str, list[int]],
             controls: dict[str, list[int]], statistics: StatisticsTokens, units_table: pl.DataFrame,
             selection_prompts: torch.Tensor, measure_prompts: torch.Tensor, settings: ClampingSettings, seed: int,
             random_pool: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Choose and measure every unit of every concept at one site: the targets, effects and selection
    scores tables. Each distinct unit is measured once, at the probe strengths and then at strengths
    aimed at the KL targets from its probe KL, and read for every concept it serves."""
    site, sae = inputs.site, inputs.sae
    concept_sets = [token_sets[c] for c in concepts]
    control_sets = [controls[c] for c in concepts]
    rows = statistics.rows
    started = time.perf_counter()
    stats = site_statistics(inputs.cache, rows, statistics.token_ids, statistics.next_ids, concept_sets, sae,
                            inputs.outlier_threshold, min_active=10, min_concept_words=settings.min_concept_words)
    log.info("%s: statistics of %d train tokens in %.1f s", site.id, len(rows), time.perf_counter() - started)
    features = units_table.filter((pl.col("site") == site.id) & (pl.col("dictionary") == inputs.sae_id))
    correlated = dict(zip(features["unit"].to_list(), features["best_neuron"].to_list(), strict=True))
    selection_step = ClampedNextToken(parts, selection_prompts, site, sae, settings.batch_rows)
    reference = final_residual(parts, selection_prompts)
    started = time.perf_counter()
    chosen, scores = choose_units(parts, site, sae, stats, concepts, concept_sets, control_sets, correlated,
                                  selection_step, reference, settings, seed, random_pool)
    spaces = list(dict.fromkeys(c.space for c in chosen))
    log.info("%s: %d units (%d distinct) chosen for %d concepts in %.1f s", site.id, len(chosen), len(spaces),
             len(concepts), time.perf_counter() - started)
    started = time.perf_counter()
    units = site_units(spaces, sae, stats)
    step = ClampedNextToken(parts, measure_prompts, site, sae, settings.batch_rows)
    token_set_pairs = list(zip(concept_sets, control_sets, strict=True))
    probe = torch.tensor(settings.strengths, dtype=torch.float64).repeat(len(units), 1)
    probed = measure(step, units, probe, token_set_pairs, desc=f"clamping {site.id} (probe)")
    aimed = torch.from_numpy(bracketing_strengths(settings.strengths, probed["kl"].mean(2), settings.kl_targets,
                                                  settings.max_strength))
    measured = measure(step, units, aimed, token_set_pairs, desc=f"clamping {site.id} (aimed at the KL targets)")
    measured = {k: np.concatenate([probed[k], measured[k]], 1) for k in measured}
    strengths = torch.cat([probe, aimed], 1).numpy()
    n_units, n_strengths, n_prompts = measured["kl"].shape
    seconds = time.perf_counter() - started
    log.info("%s: %d clamped rows in %.1f s (%.0f rows/s)", site.id, n_units * n_strengths * n_prompts, seconds,
             n_units * n_strengths * n_prompts / seconds)
    unit_of = np.array([spaces.index(c.space) for c in chosen])
    concept_of = np.array([concepts.index(c.concept) for c in chosen])
    chosen_table = pl.DataFrame([asdict(c) for c in chosen]).with_columns(
        site=pl.lit(site.id), layer=pl.lit(site.layer), sae=pl.lit(inputs.sae_id),
        max_activation=units.scale[unit_of].double().numpy(),
        n_concept_tokens=pl.Series([len(concept_sets[c]) for c in concept_of]))
    effects = pl.DataFrame({
        "unit_row": np.repeat(np.arange(len(chosen)), n_strengths * n_prompts),
        "strength": np.repeat(strengths[unit_of], n_prompts, axis=1).ravel(),
        "prompt": np.tile(np.arange(n_prompts), len(chosen) * n_strengths),
        "concept_logprob_change": measured["concept"][unit_of, :, :, concept_of].ravel(),
        "control_logprob_change": measured["control"][unit_of, :, :, concept_of].ravel(),
        "kl": measured["kl"][unit_of].ravel(), "top_token_id": measured["top_token"][unit_of].ravel()})
    effects = effects.with_columns(relative_effect=pl.col("concept_logprob_change") - pl.col("control_logprob_change"))
    keys = chosen_table.select("concept", "site", "layer", "unit_kind", "selection", "unit").with_row_index("unit_row")
    effects = keys.join(effects.with_columns(pl.col("unit_row").cast(pl.UInt32)), on="unit_row").drop("unit_row")
    scores = scores.select(pl.lit(site.id).alias("site"), pl.lit(inputs.sae_id).alias("sae"), pl.all())
    return chosen_table, effects, scores


def run_clamping(parts: ModelParts, tokenizer, sites: list[SiteInputs], table: pl.DataFrame, windows: np.ndarray,
                 lexicons: pl.DataFrame, units_table: pl.DataFrame, settings: ClampingSettings, seed: int,
                 data_seed: int) -> dict[str, pl.DataFrame]:
    """The whole experiment: concepts, prompts, every site (the headline SAE first with every concept,
    the others with the named concepts), the statistics, and the continuations. `data_seed` chooses what
    every replicate shares (the statistics tokens, the sampled concepts, their control words); `seed`
    what a replicate redraws (the prompts, the random units, the bootstrap resamples, sampled text)."""
    from mechinterp.model import encode, vocabulary_strings

    vocabulary = vocabulary_strings(tokenizer)
    counts = np.bincount(table["token_id"].to_numpy(), minlength=len(vocabulary))
    words = word_tokens(vocabulary, counts, settings.exclude_frequent_words)
    token_sets = {**concept_tokens(unambiguous_terms(lexicons, settings.max_word_categories), words),
                  **word_list_tokens(tokenizer, settings.word_lists)}
    statistics = StatisticsTokens.sample(table, settings.statistics_tokens, data_seed)
    present = np.zeros(len(vocabulary), dtype=bool)
    present[statistics.token_ids] = True
    named, sampled = choose_concepts(token_sets, present, settings, data_seed)
    all_words = sorted(t for ids in words.values() for t in ids)
    placebos = placebo_sets([token_sets[c] for c in sampled or named], all_words, present, counts,
                            settings.placebo_concepts, data_seed)
    token_sets.update(placebos)
    controls = {c: frequency_matched(token_sets[c], all_words, counts, data_seed) for c in [*named, *sampled, *placebos]}
    word_start = np.zeros(len(vocabulary), dtype=bool)
    word_start[[i for i, text in enumerate(vocabulary) if text.startswith(" ") and text[1:2].isalpha()]] = True
    from mechinterp.tokens import split_sequences

    selection_prompts = torch.from_numpy(boundary_prompts(windows[split_sequences(table, "train")], word_start,
                                                          settings.selection_prompts, settings.prompt_tokens, seed))
    measure_prompts = torch.from_numpy(boundary_prompts(windows[split_sequences(table, "heldout")], word_start,
                                                        settings.measure_prompts, settings.prompt_tokens, seed))
    targets, effects, site_scores = [], [], []
    for inputs in sites:
        headline = inputs.sae_id == settings.sae
        concepts = [*named, *sampled, *placebos] if headline else named
        chosen, measured, scored = run_site(parts, inputs, concepts, token_sets, controls, statistics, units_table,
                                            selection_prompts, measure_prompts, settings, seed,
                                            settings.random_pool if headline else OTHER_SITES_RANDOM_POOL)
        targets.append(chosen)
        effects.append(measured)
        site_scores.append(scored)
    every = [*named, *sampled, *placebos]
    tokens_of = pl.DataFrame({"concept": every, "concept_tokens": [[vocabulary[t] for t in token_sets[c]] for c in every]})
    targets_table = (pl.concat(targets).with_columns(named=pl.col("concept").is_in(named),
                                                     placebo=pl.col("concept").is_in(list(placebos)))
                     .join(tokens_of, on="concept", how="left", maintain_order="left"))
    effects_table = pl.concat(effects).with_columns(
        top_token=pl.col("top_token_id").replace_strict(dict(enumerate(vocabulary)), return_dtype=pl.Utf8))
    summary, samples = clamping_stats.summarise(effects_table, settings.kl_levels, settings.bootstrap_samples, seed)
    summary = summary.join(targets_table.select(*clamping_stats.UNIT_KEYS, "layer", "sae", "input_score",
                                                "next_input_score", "output_score", "direct_logit_effect",
                                                "max_activation", "n_concept_tokens", "named", "placebo"),
                           on=clamping_stats.UNIT_KEYS, how="left")
    summary, samples = clamping_stats.pool_summary(summary, samples, settings.kl_levels)
    comparisons = clamping_stats.compare_to_baselines(summary, samples, clamping_stats.COMPARED_KL)
    verdict = clamping_stats.verdict(summary, comparisons, samples, settings.monotone_threshold, seed)
    headline = next(s for s in sites if s.sae_id == settings.sae)
    continuation_rows = []
    for concept in named:
        for selection in clamping_stats.FEATURE_SELECTIONS:
            row = targets_table.filter((pl.col("site") == headline.site.id) & (pl.col("concept") == concept)
                                       & (pl.col("unit_kind") == "feature")
                                       & (pl.col("selection") == selection)).row(0, named=True)
            unit = sae_units(headline.sae, torch.tensor([row["unit"]]), torch.tensor([row["max_activation"]]))
            values = torch.tensor(settings.continuation_strengths, dtype=torch.float32) * row["max_activation"]
            for prompt_index, text in enumerate(settings.prompts[: settings.continuation_prompts]):
                prompt = encode(tokenizer, text)
                for mode in ("greedy", "sampled"):
                    sequences = continue_prompt(parts, headline.site, headline.sae, unit, values, prompt,
                                                settings.new_tokens, mode == "sampled", seed)
                    scores = perplexity(parts, prompt, sequences)
                    for strength, sequence, ppl in zip(settings.continuation_strengths, sequences, scores, strict=True):
                        continuation_rows.append({
                            "concept": concept, "site": headline.site.id, "selection": selection, "unit": row["unit"],
                            "prompt": prompt_index, "prompt_text": text, "mode": mode, "strength": float(strength),
                            "continuation": tokenizer.decode(sequence), "perplexity": ppl})
    return {"targets": targets_table, "effects": effects_table, "summary": summary, "comparisons": comparisons,
            "verdict": verdict, "continuations": pl.DataFrame(continuation_rows), "scores": pl.concat(site_scores)}


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `clamping`: `python -m mechinterp.clamping --help`."""
    parser = argparse.ArgumentParser(description="Clamp concept features and their baselines at every SAE site.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--saes", nargs="+", required=True, help="every SAE folder of the config")
    parser.add_argument("--sae-ids", nargs="+", required=True)
    parser.add_argument("--caches", nargs="+", required=True, help="each SAE's site cache, in the order of --saes")
    parser.add_argument("--units", required=True, help="the polysemanticity units table (best-correlated neurons)")
    parser.add_argument("--lexicons", required=True)
    parser.add_argument("--table", required=True, help="the token table")
    parser.add_argument("--tokens", required=True, help="the token windows (prompts are cut from them)")
    parser.add_argument("--settings", required=True, help="the config's `clamping` section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="the replicate's seed (prompts, bootstrap)")
    parser.add_argument("--data-seed", type=int, required=True, help="the inputs' seed (concepts, statistics tokens)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import resolve_device

    torch.set_num_threads(args.threads)
    settings = ClampingSettings(**json.loads(args.settings))
    start = time.perf_counter()
    device = resolve_device(args.device)
    parts, tokenizer = load_parts(args.model, device)
    sites = []
    for sae_id, folder, cache_path in zip(args.sae_ids, args.saes, args.caches, strict=True):
        summary = json.loads((Path(folder) / "training_summary.json").read_text())
        sites.append(SiteInputs(sae_id, load_sae(folder)[0].to(device), Site.parse(summary["site"]),
                                ActivationCache.open(cache_path, args.table), summary["outlier_threshold"]))
    sites.sort(key=lambda s: s.sae_id != settings.sae)  # the headline SAE first
    tables = run_clamping(parts, tokenizer, sites, pl.read_parquet(args.table), np.load(args.tokens, mmap_mode="r"),
                          pl.read_parquet(args.lexicons), pl.read_parquet(args.units), settings, args.seed,
                          args.data_seed)
    for name, frame in tables.items():
        write_parquet(frame, Path(args.out_dir) / f"{name}.parquet")
    rows = tables["effects"].height
    log.info("clamped %d units x %d strengths x %d prompts (%d rows) at %d sites in %.1f s",
             tables["targets"].height, len(settings.strengths) + 2 * len(settings.kl_targets), settings.measure_prompts,
             rows, len(sites),
             time.perf_counter() - start)
    for row in tables["verdict"].filter(pl.col("site") == sites[0].site.id).iter_rows(named=True):
        log.info("verdict %s %s %s %s: %.3f [%.3f, %.3f] (n=%d)", row["site"], row["feature_selection"],
                 row["statistic"], row["baseline"], row["value"], row["ci_low"], row["ci_high"], row["n_concepts"])


if __name__ == "__main__":
    run_stage(main)
