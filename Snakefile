# Replication workflow: logit lens, sparse autoencoders, polysemanticity and clamping on a real model.
# All figures:  snakemake --cores all                                  (config/default.yaml)
# Smoke run:    snakemake --cores all --configfile config/smoke.yaml   (laid over the default)
# Replicates:   snakemake --cores all replicates                      (the stochastic stages with other seeds)
# Audit:        snakemake --cores all audit                           (MANIFEST.json against the reference)
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from mechinterp.config import check_unique_keys, validate_config
from mechinterp.errors import UserError

min_version("9.0")

# Paths in the rules (results/, the notebooks, the browser's pages) are relative to the checkout's root
if Path.cwd().resolve() != Path(workflow.basedir).resolve():
    raise WorkflowError(
        f"run Snakemake in the checkout {workflow.basedir}: cd there, or add --directory {workflow.basedir}"
        " (results are written under its results/<run>/)."
    )


configfile: str(Path(workflow.basedir) / "config/default.yaml")


report: "workflow/report/workflow.rst"


try:
    for path in workflow.configfiles:
        check_unique_keys(path)
    validate_config(
        config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
    )
except UserError as err:
    raise WorkflowError(f"config error: {err}") from None


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/logit_lens.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/polysemanticity.smk"
include: "workflow/rules/clamping.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/crosscoder.smk"
include: "workflow/rules/claims.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/browser.smk"
include: "workflow/rules/replicates.smk"
include: "workflow/rules/audit.smk"


onstart:
    check_cluster_requests()


rule all:
    default_target: True
    input:
        # the manifest's inputs too: a plain rerun then rebuilds whichever of them is missing
        rules.manifest.input,
        rules.manifest.output,
