rule claims:
    input:
        # one input per field of claims.StudyTables, passed as --<field>; a replicate's claims read its
        # own SAEs, scores and clamping, and the main run's deterministic or unreplicated stages
        lens_summary=rules.logit_lens.output.summary,
        first_layer=rules.logit_lens.output.first_layer,
        tuned_lens_kl=rules.tuned_lens.output.heldout_kl,
        sae_metrics=rules.collect_sae_metrics.output.metrics,
        comparison=rules.collect_polysemanticity.output.comparison,
        clamping_verdict=rules.clamping.output.verdict,
        crosscoder_metrics=rules.evaluate_crosscoder.output.metrics,
        crosscoder_match_rates=rules.crosscoder_latents.output.match_rates,
        toy_recovery=rules.toy_superposition.output.sae_recovery,
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
        tables=lambda wc, input: " ".join(
            f"--{name.replace('_', '-')} {shlex.quote(path)}"
            for name, path in input.items()
        ),
    shell:
        "python -m mechinterp.claims {params.tables} --headline-site {params.headline_site:q}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
