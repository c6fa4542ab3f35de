import numpy as np
import polars as pl

from mechinterp.tokens import NO_DOCUMENT, pack_windows, tokenize_corpus


def test_pack_windows_concatenates_documents_behind_bos():
    docs = [(10, [1, 2, 3]), (11, [4, 5]), (12, [6, 7, 8, 9])]
    ids, doc_ids = pack_windows(iter(docs), bos=100, sep=99, context_length=4, n_windows=3)
    # stream: 1 2 3 99 4 5 99 6 7 8 9 99 -> three windows of BOS + 3 tokens
    assert ids.tolist() == [[100, 1, 2, 3], [100, 99, 4, 5], [100, 99, 6, 7]]
    assert doc_ids.tolist() == [[NO_DOCUMENT, 10, 10, 10], [NO_DOCUMENT, 10, 11, 11], [NO_DOCUMENT, 11, 12, 12]]


def test_pack_windows_drops_a_partial_window_when_text_runs_out():
    ids, _ = pack_windows(iter([(0, [1, 2, 3, 4])]), bos=9, sep=8, context_length=3, n_windows=10)
    assert ids.tolist() == [[9, 1, 2], [9, 3, 4]]  # the separator alone would be a partial window


def _documents(n=40):
    words = ["alpha", "beta", "gamma", "delta", "scam", "Paris"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(5 + i % 7)) for i in range(n)]
    return pl.DataFrame({"doc_id": np.arange(n), "text": texts, "source": ["s"] * n,
                         "label": ["a" if i % 2 else "b" for i in range(n)],
                         "split": ["heldout" if i % 5 == 0 else "train" for i in range(n)]})


def test_tokenize_corpus_table_lines_up_with_windows(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = _documents()
    ids, table = tokenize_corpus(docs, tokenizer, 16, {"train": 64, "heldout": 32}, seed=3)
    assert ids.shape == (6, 16)
    assert table.height == ids.size
    assert table["token_id"].to_list() == ids.ravel().tolist()
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert table.filter(pl.col("position") == 0)["doc_id"].unique().to_list() == [NO_DOCUMENT]
    # train windows come first, and every token's document belongs to that window's split
    assert table.group_by("sequence").agg(pl.col("split").n_unique())["split"].max() == 1
    joined = table.filter(pl.col("doc_id") >= 0).join(docs, on="doc_id", suffix="_doc")
    assert (joined["split"] == joined["split_doc"]).all() and (joined["label"] == joined["label_doc"]).all()
    # the same seed gives the same windows; another seed another order
    again, _ = tokenize_corpus(docs, tokenizer, 16, {"train": 64, "heldout": 32}, seed=3)
    other, _ = tokenize_corpus(docs, tokenizer, 16, {"train": 64, "heldout": 32}, seed=4)
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)


def test_a_corpus_that_runs_short_is_reported_by_split_and_key(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, _ = tokenize_corpus(_documents(), tokenizer, 16, {"train": 16 * 500, "heldout": 32}, seed=3)
    assert 1 < len(ids) < 500 + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "the 'train' split's 32 documents gave" in warnings[0]
    assert "of the 500 asked (tokens.train_tokens = 8000)" in warnings[0] and "lower tokens.train_tokens" in warnings[0]
