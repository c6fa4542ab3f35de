# Replication workflow: logit lens, sparse autoencoders, polysemanticity and clamping on a real model.
# Run all figures:  snakemake --cores all        (config/default.yaml)
# Smoke run:        snakemake --cores all --configfile config/smoke.yaml
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/default.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/logit_lens.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        all_figures(),
    default_target: True
