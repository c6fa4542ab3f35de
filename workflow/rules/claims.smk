rule claims:
    input:
        lens_summary=rules.logit_lens.output.summary,
        lens_targets=rules.logit_lens.output.targets,
        first_layer=rules.logit_lens.output.first_layer,
        sae_metrics=rules.collect_sae_metrics.output.metrics,
        comparison=rules.collect_polysemanticity.output.comparison,
        clamping_verdict=rules.clamping.output.verdict,
    output:
        f"{RESULTS}/{{replicate}}claims.parquet",
    log:
        f"{RESULTS}/{{replicate}}logs/claims.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/claims.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.claims"),
        settings=settings("claims"),
        headline_site=SAES[config["clamping"]["sae"]].site.id,
    shell:
        "python -m mechinterp.claims --lens-summary {input.lens_summary} --lens-targets {input.lens_targets}"
        " --first-layer {input.first_layer} --sae-metrics {input.sae_metrics} --comparison {input.comparison}"
        " --clamping-verdict {input.clamping_verdict} --headline-site {params.headline_site}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
