import copy

import pytest
import yaml

from mechinterp.config import validate_config
from mechinterp.errors import UserError

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
    assert config["clamping"]["sae"] == "resid12-topk" and len(config["clamping"]["prompts"]) == 4


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
        (lambda c: c["clamping"].update(sae="resid99-topk"), r"clamping\.sae is 'resid99-topk', which is not one of"),
        (lambda c: c["clamping"].update(strengths=[1]), r"config key clamping\.strengths"),
        (lambda c: c["clamping"].update(concepts=["Negativ"]), r"config key clamping\.concepts\.0"),
        (lambda c: c["polysemanticity"].update(active_fraction=0), r"config key polysemanticity\.active_fraction"),
        (lambda c: c["audit"]["tolerances"].update(default={"rel": -1, "abs": 0}),
         r"config key audit\.tolerances\.default\.rel"),
        (lambda c: c["sae"]["sites"].append({"site": "resid", "layer": 4}), r"sae\.sites lists resid4-topk twice"),
    ],
)
def test_bad_config_names_the_key(default_config, change, message):
    change(default_config)
    with pytest.raises(UserError, match=message):
        validate_config(default_config, SCHEMA)
