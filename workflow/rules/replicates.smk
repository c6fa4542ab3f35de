rule replicates:
    input:
        tables=[
            f"{RESULTS}/{replicate_dir(seed)}{name}"
            for seed in replicate_seeds()
            for name in REPLICATED_TABLES
        ],
    output:
        spread=f"{RESULTS}/replicates/spread.parquet",
        claims=f"{RESULTS}/replicates/claims.parquet",
    log:
        # under replicates/: the main run's manifest leaves that folder out
        f"{RESULTS}/replicates/logs/replicates.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.replicates"),
        run_dir=lambda wc, output: Path(output.spread).parent.parent,
        seeds=" ".join(str(seed) for seed in replicate_seeds()),
        dirs=" ".join(replicate_dir(seed) or "." for seed in replicate_seeds()),
    shell:
        "python -m mechinterp.replicates --run-dir {params.run_dir} --seeds {params.seeds} --dirs {params.dirs}"
        " --spread {output.spread} --claims {output.claims} > {log} 2>&1"
