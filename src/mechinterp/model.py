"""Load a fetched model folder through transformer-lens, and tokenize with an explicit BOS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mechinterp.errors import UserError


def resolve_device(device: str) -> str:
    """`auto` picks CUDA when present; an explicit `cuda` without a GPU is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device is {device!r} but no CUDA GPU is visible; set device: cpu or auto.")
    return device


def load_model(folder: str | Path, device: str = "cpu"):
    """Boot a TransformerBridge from a local Hugging Face folder, never touching the hub. Model code
    from the folder runs only if the config allowed it when the model was fetched (SOURCE.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json); run the fetch_model stage first.")
    source = folder / "SOURCE.json"
    trust_remote_code = source.is_file() and json.loads(source.read_text()).get("trust_remote_code", False)
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; fail fast instead of reaching for one
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        str(folder), device=resolve_device(device), dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    bridge.eval()
    return bridge


def bos_token_id(tokenizer) -> int:
    """The id every sequence starts with: BOS, else EOS (GPT-2 style tokenizers have only that)."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise UserError("the model's tokenizer defines neither a BOS nor an EOS token; cannot mark sequence starts.")
    return int(token_id)


def encode(tokenizer, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of `text`, with BOS prepended explicitly (architectures disagree on the default)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [bos_token_id(tokenizer), *ids] if prepend_bos else list(ids)


def single_token_id(tokenizer, text: str, where: str) -> int:
    """The id of a string that must be exactly one token; `where` names it in the error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise UserError(
            f"{where}: target {text!r} is not a single token of this model's vocabulary (it splits into {pieces}). "
            "Use a string that is one token, usually with its leading space, e.g. ' Paris'."
        )
    return int(ids[0])


def vocabulary_strings(tokenizer) -> list[str]:
    """The text of every token id, as it reads inside a string (byte-level pieces decoded)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [tokenizer.convert_tokens_to_string([piece]) for piece in pieces]
