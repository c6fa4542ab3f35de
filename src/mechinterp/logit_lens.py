"""The logit lens: decode the residual stream after every layer through the final norm and the
unembedding, to see at which depth a token enters the model's next-token prediction.

Layer 0 is the embedding (the residual stream entering block 0); layer l >= 1 is the residual
stream after block l-1, so the last layer is exactly what the model itself decodes. The final
norm is applied to each layer's own residual (its scale recomputed), not with the final layer's
cached scale.

Two controls stand beside each sequence's targets (at its last position): a seeded sample of random
vocabulary tokens (the null: what any token does with depth, since the decoded distributions change
as a whole) and the model's own top token at the output (what a token the model predicts does). A
target's rise is its Spearman correlation of log p with layer, placed among the random tokens'
(`rise_percentile`, 0.5 where it rises like a random token). Entry into the top k counts before the
last layer only: at the last layer the lens is the output itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_json, write_parquet
from mechinterp.model import encode, single_token_id, vocabulary_strings
from mechinterp.tokens import split_sequences

log = logging.getLogger(__name__)
Translator = Callable[[torch.Tensor], torch.Tensor]  # stacked residuals -> translated ones, same shape
ENTRY = ("before_last", "at_last", "never")  # where a token first enters the top k: the last layer is the output


@dataclass(frozen=True)
class LensSettings:
    """The config's `logit_lens` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    top_k: int
    """a target has entered the prediction once its rank is at most this"""
    corpus_windows: int
    """held-out corpus windows decoded besides the prompts"""
    corpus_window_tokens: int
    """tokens of each corpus window; the next one is its target"""
    random_tokens: int
    """random vocabulary tokens decoded beside each sequence's targets (the null of their rise)"""
    prompts: list[dict[str, Any]]
    """hand-written prompts: {id, text, targets (single tokens)}"""


@dataclass
class LensInput:
    """One sequence to decode: its token ids (BOS first) and the single-token targets to follow."""

    id: str
    origin: str  # "prompt" (from the config) or "corpus" (a held-out corpus window)
    token_ids: list[int]
    targets: dict[str, int] = field(default_factory=dict)  # target text -> token id


def residual_hook_names(n_layers: int) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def layer_name(layer: int) -> str:
    return "embed" if layer == 0 else f"block {layer - 1}"


@torch.no_grad()
def residual_stream(bridge, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over token ids [batch, n_pos]: the model's logits [batch, n_pos, vocab] and
    every layer's residual stream, [n_layers + 1, batch, n_pos, d_model]."""
    names = residual_hook_names(bridge.cfg.n_layers)
    tokens = tokens.to(bridge.cfg.device, torch.long)
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in names)
    return logits, torch.stack([cache[name] for name in names])


def decode(bridge, resid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [..., vocab] of residuals [..., d_model] through the final norm (its scale
    recomputed for each residual) and the unembedding. Differentiable: the tuned lens trains through it."""
    return bridge.unembed(bridge.ln_final(resid)).float().log_softmax(-1)


@torch.no_grad()
def lens_log_probs(bridge, token_ids: list[int], translator: Translator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities decoded from every layer, [n_layers + 1, n_pos, vocab], and the model's own
    output log-probabilities, [n_pos, vocab], from one forward pass. A `translator` maps the stacked
    residuals [n_layers + 1, n_pos, d_model] to ones of the same shape before decoding (the tuned
    lens); None decodes them as they are (the logit lens)."""
    logits, resid = residual_stream(bridge, torch.tensor([token_ids]))
    resid = resid[:, 0]
    return decode(bridge, resid if translator is None else translator(resid)), logits[0].float().log_softmax(-1)


def distribution_stats(log_probs: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Top-k ids and probabilities, entropy (nats) and KL(final layer || layer) for [L, pos, vocab]."""
    top_log_probs, top_ids = log_probs.topk(top_k, dim=-1)
    probs = log_probs.exp()
    entropy = -torch.einsum("lpv,lpv->lp", probs, log_probs)
    final_probs = probs[-1]
    cross_entropy = -torch.einsum("pv,lpv->lp", final_probs, log_probs)
    kl_to_final = (cross_entropy - entropy[-1]).clamp_min(0.0)
    return {"top_ids": top_ids, "top_probs": top_log_probs.exp(), "entropy": entropy, "kl_to_final": kl_to_final}


def target_ranks(log_probs: torch.Tensor, target_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For [L, vocab] log-probabilities: log-probability [L, T] and 1-based rank [L, T] of each target
    (one plus the number of tokens with a strictly higher log-probability)."""
    target_lp = log_probs[:, target_ids]
    ascending = log_probs.sort(dim=-1).values
    ranks = log_probs.shape[-1] - torch.searchsorted(ascending, target_lp.contiguous(), right=True) + 1
    return target_lp, ranks


def rank_along_layers(values: np.ndarray) -> np.ndarray:
    """Ranks 0..L-1 along axis 0 of [L, n] (ties broken by order: log-probabilities rarely tie)."""
    return values.argsort(0, kind="stable").argsort(0, kind="stable").astype(float)


def rise_spearman(log_probs: np.ndarray) -> np.ndarray:
    """Spearman correlation of log-probability with layer for each token of [L, n] -> [n]: +1 for a
    token that gains at every layer, -1 for one that loses at every layer."""
    ranks = rank_along_layers(log_probs)
    layers = np.arange(len(log_probs), dtype=float)[:, None]
    centred, layer_centred = ranks - ranks.mean(0), layers - layers.mean()
    return (centred * layer_centred).sum(0) / np.sqrt((centred**2).sum(0) * (layer_centred**2).sum())


def null_percentile(values: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Mid-rank percentile of each value [T] among the null sample [R]: the share of the null below it
    plus half the share equal to it (0.5 for a value at the null's median); NaN for an empty null."""
    if not len(null):
        return np.full(len(values), np.nan)
    below = (null[None, :] < values[:, None]).mean(1)
    equal = (null[None, :] == values[:, None]).mean(1)
    return below + 0.5 * equal


def first_entry(ranks: np.ndarray, top_k: int) -> tuple[int | None, str]:
    """First layer at which a token's rank [L] is at most `top_k`, and where that is (ENTRY): before the
    last layer, only at the last layer (the output), or never."""
    entered = np.flatnonzero(ranks <= top_k)
    if not len(entered):
        return None, "never"
    return int(entered[0]), "at_last" if entered[0] == len(ranks) - 1 else "before_last"


def random_token_ids(n_vocab: int, exclude: set[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct token ids drawn uniformly from the vocabulary without the `exclude` ids (special
    tokens, the targets and the top token), sorted; all of them if fewer remain."""
    allowed = np.setdiff1d(np.arange(n_vocab), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    return np.sort(rng.choice(allowed, size=min(n, len(allowed)), replace=False))


def prepare_prompts(tokenizer, prompts: list[dict], context_length: int) -> list[LensInput]:
    """Tokenize the configured prompts (BOS first) and check their length and targets up front."""
    inputs = []
    for index, prompt in enumerate(prompts):
        where = f"logit_lens.prompts[{index}] ({prompt['id']!r})"
        ids = encode(tokenizer, prompt["text"])
        if len(ids) > context_length:
            raise UserError(f"{where} is {len(ids)} tokens with BOS, longer than tokens.context_length = "
                            f"{context_length}. Shorten the prompt or raise tokens.context_length.")
        targets = {t: single_token_id(tokenizer, t, where) for t in prompt.get("targets", [])}
        inputs.append(LensInput(prompt["id"], "prompt", ids, targets))
    return inputs


def corpus_inputs(tokenizer, windows: np.ndarray, n_windows: int, n_tokens: int, seed: int) -> list[LensInput]:
    """A seeded sample of corpus windows cut to `n_tokens`; the target is the true next token."""
    if n_windows == 0:
        return []
    if len(windows) < n_windows:
        raise UserError(f"logit_lens.corpus_windows = {n_windows} but the heldout split has {len(windows)} windows "
                        "(the corpus ran short: see the tokenize log); lower logit_lens.corpus_windows or add documents.")
    rows = np.sort(np.random.default_rng(seed).choice(len(windows), size=n_windows, replace=False))
    vocab = vocabulary_strings(tokenizer)
    inputs = []
    for i, row in enumerate(rows):
        ids, nxt = windows[row, :n_tokens].tolist(), int(windows[row, n_tokens])
        inputs.append(LensInput(f"corpus_{i}", "corpus", ids, {vocab[nxt]: nxt}))
    return inputs


def lens_inputs(tokenizer, settings: LensSettings, heldout: np.ndarray, context_length: int,
                seed: int) -> list[LensInput]:
    """The sequences the lens decodes: the configured prompts, then seeded held-out corpus windows
    (`heldout` [n_windows, context_length])."""
    inputs = prepare_prompts(tokenizer, settings.prompts, context_length)
    return inputs + corpus_inputs(tokenizer, heldout, settings.corpus_windows, settings.corpus_window_tokens,
                                  seed)


def run_logit_lens(bridge, inputs: list[LensInput], top_k: int, translator: Translator | None = None,
                   random_tokens: int = 0, seed: int = 0) -> dict[str, pl.DataFrame | float]:
    """Decode every layer of every input (through `translator` first, if given: see lens_log_probs).
    Returns the tables `positions`, `targets`, `first_layer` (one row per target: its entry into the top
    k, its rise against `random_tokens` random tokens and the model's own top token beside it), `null`
    (per layer, the log p and rank at the last position of every target, top and random token, by
    `kind`), plus `max_final_abs_diff` (lens at the last layer against the model's output),
    `random_rise_share` (share of the prompts' random tokens whose log p rises with depth, Spearman > 0)
    and `layer_positions_per_s` (throughput of the decoding). Random tokens are drawn per input from
    a generator seeded with (`seed`, the input's index)."""
    if top_k > bridge.cfg.d_vocab:
        raise UserError(f"logit_lens.top_k = {top_k} is larger than the model's vocabulary ({bridge.cfg.d_vocab} "
                        "tokens); lower logit_lens.top_k.")
    vocab = vocabulary_strings(bridge.tokenizer)
    special = set(bridge.tokenizer.all_special_ids)
    position_rows, target_rows, first_rows, null_frames, prompt_random_rise = [], [], [], [], []
    max_diff, decoded, elapsed = 0.0, 0, 0.0
    for index, item in enumerate(tqdm(inputs, desc="logit lens", unit="prompt")):
        start = time.perf_counter()
        lens, model_lp = lens_log_probs(bridge, item.token_ids, translator)
        stats = {k: v.cpu().numpy() for k, v in distribution_stats(lens, top_k).items()}
        elapsed += time.perf_counter() - start
        n_layers, n_pos = lens.shape[:2]
        decoded += n_layers * n_pos
        max_diff = max(max_diff, float((lens[-1] - model_lp).abs().max()))
        for layer in range(n_layers):
            for pos in range(n_pos):
                position_rows.append({
                    "prompt_id": item.id, "origin": item.origin, "layer": layer, "layer_name": layer_name(layer),
                    "position": pos, "input_token": vocab[item.token_ids[pos]], "is_last": pos == n_pos - 1,
                    "top_tokens": [vocab[i] for i in stats["top_ids"][layer, pos]],
                    "top_ids": stats["top_ids"][layer, pos].tolist(),
                    "top_probs": stats["top_probs"][layer, pos].tolist(),
                    "entropy": float(stats["entropy"][layer, pos]),
                    "kl_to_final": float(stats["kl_to_final"][layer, pos]),
                })
        if not item.targets:
            continue
        names, ids = list(item.targets), list(item.targets.values())
        top_id = int(model_lp[-1].argmax())
        random_ids = random_token_ids(lens.shape[-1], special | set(ids) | {top_id}, random_tokens,
                                      np.random.default_rng([seed, index])).tolist()
        kinds = ["target"] * len(ids) + ["top"] + ["random"] * len(random_ids)
        all_ids = [*ids, top_id, *random_ids]
        lp, ranks = (t.cpu().numpy() for t in target_ranks(lens[:, -1], all_ids))
        spearman = rise_spearman(lp)
        percentile = null_percentile(spearman[: len(ids) + 1], spearman[len(ids) + 1 :])
        if item.origin == "prompt":
            prompt_random_rise.append(spearman[len(ids) + 1 :] > 0)
        top_first, _ = first_entry(ranks[:, len(ids)], top_k)
        for j, (name, token_id) in enumerate(zip(names, ids)):
            for layer in range(n_layers):
                target_rows.append({
                    "prompt_id": item.id, "origin": item.origin, "target": name, "target_id": token_id,
                    "layer": layer, "log_prob": float(lp[layer, j]), "prob": float(np.exp(lp[layer, j])),
                    "rank": int(ranks[layer, j]), "in_top_k": bool(ranks[layer, j] <= top_k),
                })
            first, entry = first_entry(ranks[:, j], top_k)
            first_rows.append({
                "prompt_id": item.id, "origin": item.origin, "target": name, "target_id": token_id,
                "first_layer_in_top_k": first, "entry": entry, "ranked_at_output": bool(ranks[-1, j] <= top_k),
                "final_rank": int(ranks[-1, j]), "final_prob": float(np.exp(lp[-1, j])),
                "rise_spearman": float(spearman[j]), "rise_percentile": float(percentile[j]),
                "top_token": vocab[top_id], "top_first_layer_in_top_k": top_first,
                "top_rise_percentile": float(percentile[len(ids)]),
            })
        null_frames.append(pl.DataFrame({
            "prompt_id": item.id, "origin": item.origin, "kind": np.repeat(kinds, n_layers),
            "token": np.repeat([vocab[i] for i in all_ids], n_layers), "token_id": np.repeat(all_ids, n_layers),
            "layer": np.tile(np.arange(n_layers), len(all_ids)), "log_prob": lp.T.reshape(-1).astype(np.float64),
            "rank": ranks.T.reshape(-1).astype(np.int64)}))
    random_rise = np.concatenate(prompt_random_rise) if prompt_random_rise else np.array([])
    return {
        "positions": pl.DataFrame(position_rows),
        "targets": pl.DataFrame(target_rows, schema_overrides={"log_prob": pl.Float64, "prob": pl.Float64}),
        "first_layer": pl.DataFrame(first_rows, schema_overrides={"first_layer_in_top_k": pl.Int64,
                                                                  "top_first_layer_in_top_k": pl.Int64}),
        "null": pl.concat(null_frames) if null_frames else pl.DataFrame(),
        "max_final_abs_diff": max_diff,
        "random_rise_share": float(random_rise.mean()) if len(random_rise) else float("nan"),
        "layer_positions_per_s": decoded / elapsed if elapsed else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `logit_lens`: `python -m mechinterp.logit_lens --help`."""
    parser = argparse.ArgumentParser(description="Decode every layer's residual stream for the prompts.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--settings", required=True, help="the config's `logit_lens` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    from mechinterp.model import load_model

    torch.set_num_threads(args.threads)
    settings = LensSettings(**json.loads(args.settings))
    start = time.perf_counter()
    bridge = load_model(args.model, args.device)
    windows = np.load(args.tokens, mmap_mode="r")
    heldout = windows[split_sequences(pl.read_parquet(args.table, columns=["sequence", "split"]), "heldout")]
    inputs = lens_inputs(bridge.tokenizer, settings, heldout, windows.shape[1], args.seed)
    result = run_logit_lens(bridge, inputs, settings.top_k, random_tokens=settings.random_tokens, seed=args.seed)
    out = Path(args.out_dir)
    for name in ("positions", "targets", "first_layer", "null"):
        write_parquet(result[name], out / f"{name}.parquet")
    summary = {"max_final_abs_diff": result["max_final_abs_diff"], "random_rise_share": result["random_rise_share"],
               "layer_positions_per_s": result["layer_positions_per_s"],
               "n_inputs": len(inputs), "seconds": time.perf_counter() - start, "device": str(bridge.cfg.device)}
    write_json(summary, out / "summary.json")
    log.info("logit lens: %s", summary)


if __name__ == "__main__":
    run_stage(main)
