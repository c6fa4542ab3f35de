rule toy_superposition:
    output:
        features=f"{RESULTS}/toy/features.parquet",
        gram=f"{RESULTS}/toy/gram.parquet",
        phase=f"{RESULTS}/toy/phase.parquet",
        sae_recovery=f"{RESULTS}/toy/sae_recovery.parquet",
    log:
        f"{RESULTS}/logs/toy_superposition.log",
    benchmark:
        f"{RESULTS}/benchmarks/toy_superposition.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("compute"),
    params:
        code=stage_code("mechinterp.toy_superposition"),
        settings=settings("toy"),
        seed=config["seed"],
        out_dir=lambda wc, output: Path(output.features).parent,
    shell:
        "python -m mechinterp.toy_superposition --settings {params.settings:q} --seed {params.seed}"
        " --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"
