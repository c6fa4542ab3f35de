"""Tokenize the documents into fixed-length windows that start with BOS, and a token table that
says, for every token, which window and position it sits at and which document it came from."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from mechinterp.config import window_count
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, write_parquet
from mechinterp.model import bos_token_id, vocabulary_strings

log = logging.getLogger(__name__)
NO_DOCUMENT = -1  # doc_id of the BOS token that opens every window


@dataclass(frozen=True)
class TokenSettings:
    """The config's `tokens` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    context_length: int
    """tokens per window, BOS included"""
    train_tokens: int
    """tokens of the train split (SAE training)"""
    heldout_tokens: int
    """tokens of the held-out split (evaluation, polysemanticity, the logit lens's corpus windows)"""


def split_rows(table: pl.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the token table (= rows of every activation cache) in one split (`train`, `heldout`, or
    `all`), sorted, as int64, and their positions in the window. `table` needs `position`, and `split`
    unless `split` is `all`."""
    frame = table.with_row_index("row")
    if split != "all":
        frame = frame.filter(pl.col("split") == split)
    return frame["row"].to_numpy().astype(np.int64), frame["position"].to_numpy()


def split_sequences(table: pl.DataFrame, split: str) -> np.ndarray:
    """Indices of the windows (rows of tokens.npy) in one split, sorted. `table` needs `sequence` and `split`."""
    return np.unique(table.filter(pl.col("split") == split)["sequence"].to_numpy())


def pack_windows(doc_tokens: Iterator[tuple[int, list[int]]], bos: int, sep: int, context_length: int,
                 n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents (each followed by `sep`) into windows of `context_length` tokens, each
    opened by `bos`. Return token ids and document ids, both [n_windows, context_length]; fewer
    windows if the documents run out (a trailing partial window is dropped)."""
    body = context_length - 1
    need = n_windows * body
    ids, docs = np.empty(need, dtype=np.int32), np.empty(need, dtype=np.int64)
    filled = 0
    for doc_id, tokens in doc_tokens:
        piece = [*tokens, sep][: need - filled]
        ids[filled : filled + len(piece)] = piece
        docs[filled : filled + len(piece)] = doc_id
        filled += len(piece)
        if filled == need:
            break
    n_full = filled // body
    ids, docs = ids[: n_full * body].reshape(n_full, body), docs[: n_full * body].reshape(n_full, body)
    return (np.concatenate([np.full((n_full, 1), bos, np.int32), ids], axis=1),
            np.concatenate([np.full((n_full, 1), NO_DOCUMENT, np.int64), docs], axis=1))


def _tokenized(tokenizer, texts: list[str], doc_ids: list[int], batch: int = 256) -> Iterator[tuple[int, list[int]]]:
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        yield from zip(doc_ids[start : start + batch], encoded)


def tokenize_corpus(documents: pl.DataFrame, tokenizer, context_length: int, tokens_per_split: dict[str, int],
                    seed: int) -> tuple[np.ndarray, pl.DataFrame]:
    """Windows of every split (train first, then heldout), documents in a seeded random order.

    Returns token ids [n_windows, context_length] and the token table, one row per token in
    row-major order of the windows (the order every activation cache follows)."""
    bos = bos_token_id(tokenizer)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    rng = np.random.default_rng(seed)
    all_ids, all_docs, splits = [], [], []
    for split, n_tokens in tokens_per_split.items():
        part = documents.filter(pl.col("split") == split)
        order = rng.permutation(part.height)
        texts, doc_ids = part["text"].gather(order).to_list(), part["doc_id"].gather(order).to_list()
        n_windows = window_count(n_tokens, context_length)
        ids, docs = pack_windows(_tokenized(tokenizer, texts, doc_ids), bos, sep, context_length, n_windows)
        if len(ids) == 0:
            raise UserError(f"the {split!r} split ({part.height} documents) has too little text for one window of "
                            f"{context_length} tokens; add documents to the corpus, or lower tokens.context_length "
                            "or (for the heldout split) raise corpus.heldout_fraction.")
        if len(ids) < n_windows:
            log.warning("the %r split's %d documents gave %d windows of the %d asked (tokens.%s_tokens = %d): every "
                        "stage reading it runs on fewer tokens; add documents to the corpus or lower tokens.%s_tokens",
                        split, part.height, len(ids), n_windows, split, n_tokens, split)
        all_ids.append(ids), all_docs.append(docs), splits.extend([split] * len(ids))
    token_ids, doc_of_token = np.concatenate(all_ids), np.concatenate(all_docs)
    n_seq = len(token_ids)
    table = pl.DataFrame({
        "sequence": np.repeat(np.arange(n_seq, dtype=np.int32), context_length),
        "position": np.tile(np.arange(context_length, dtype=np.int32), n_seq),
        "token_id": token_ids.ravel(),
        "doc_id": doc_of_token.ravel(),
        "split": np.repeat(np.array(splits), context_length),
    })
    strings = pl.Series("token", vocabulary_strings(tokenizer))
    table = table.with_columns(strings.gather(token_ids.ravel()))
    labels = documents.select("doc_id", "source", "label")
    table = table.join(labels, on="doc_id", how="left", maintain_order="left")
    return token_ids, table.select("sequence", "position", "token_id", "token", "doc_id", "source", "label", "split")


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `tokenize`: `python -m mechinterp.tokens --help`."""
    parser = argparse.ArgumentParser(description="Pack documents into BOS-led windows and write the token table.")
    parser.add_argument("--model", required=True, help="the fetched model folder (its tokenizer is used)")
    parser.add_argument("--documents", required=True)
    parser.add_argument("--settings", required=True, help="the config's `tokens` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tokens", required=True, help="output .npy of token ids [n_windows, context_length]")
    parser.add_argument("--table", required=True, help="output token table (Parquet)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    settings = TokenSettings(**json.loads(args.settings))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    budget = {"train": settings.train_tokens, "heldout": settings.heldout_tokens}
    token_ids, table = tokenize_corpus(pl.read_parquet(args.documents), tokenizer, settings.context_length, budget,
                                       args.seed)
    with atomic_path(args.tokens) as tmp, open(tmp, "wb") as handle:
        np.save(handle, token_ids)
    write_parquet(table, args.table)
    log.info("%d windows of %d tokens: %s", *token_ids.shape, dict(table.group_by("split").len().iter_rows()))


if __name__ == "__main__":
    run_stage(main)
