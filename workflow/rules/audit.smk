rule manifest:
    input:
        artifacts=run_artifacts(),
        figures=all_figures(),
        benchmarks=all_benchmarks(),
    output:
        f"{RESULTS}/MANIFEST.json",
    log:
        f"{RESULTS}/logs/manifest.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.manifest"),
        config=json.dumps(
            {k: v for k, v in config.items() if k not in ("audit", "replicates")},
            sort_keys=True,
        ),
        run_dir=lambda wc, output: Path(output[0]).parent,
        threads=THREADS,  # the stages' thread count, recorded in the manifest
    shell:
        "python -m mechinterp.manifest --run-dir {params.run_dir} --config {params.config:q}"
        " --artifacts {input.artifacts} --benchmarks {input.benchmarks} --threads {params.threads}"
        " --out {output} > {log} 2>&1"


rule audit_report:
    input:
        manifest=rules.manifest.output[0],
        reference=audit_reference,
    output:
        f"{RESULTS}/audit.txt",
    log:
        f"{RESULTS}/logs/audit_report.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.audit"),
        settings=settings("audit"),
        reference=config["audit"]["reference"],
    shell:
        "python -m mechinterp.audit --manifest {input.manifest} --reference {params.reference:q}"
        " --settings {params.settings:q} --out {output} --exit-zero > {log} 2>&1"


# No output, so it runs each time it is asked for; the report it checks stays whichever way it goes.
rule audit:
    input:
        report=rules.audit_report.output[0],
        # the manifest's inputs too: a missing stage output is rebuilt before the audit
        run=rules.manifest.input,
    log:
        f"{RESULTS}/logs/audit.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    shell:
        "(head -n 1 {input.report}; grep -q '^AUDIT PASSED' {input.report}) > {log} 2>&1"
