CLAMPING_TABLES = [
    "targets",
    "effects",
    "summary",
    "comparisons",
    "verdict",
    "continuations",
]


rule clamping:
    input:
        model=rules.fetch_model.output[0],
        saes=expand(rules.train_sae.output[0], sae=SAES, allow_missing=True),
        caches=[activation_file(sae_id, "npy") for sae_id in SAES],
        headers=[activation_file(sae_id, "json") for sae_id in SAES],
        units=rules.collect_polysemanticity.output.units,
        lexicons=rules.fetch_corpus.output.lexicons,
        table=rules.tokenize.output.table,
        tokens=rules.tokenize.output.tokens,
    output:
        **{
            name: f"{RESULTS}/{{replicate}}clamping/{name}.parquet"
            for name in CLAMPING_TABLES
        },
        # every selection score computed, read by the feature browser (not by the figures)
        scores=f"{RESULTS}/{{replicate}}clamping/scores.parquet",
    log:
        f"{RESULTS}/{{replicate}}logs/clamping.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/clamping.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.clamping"),
        settings=settings("clamping"),
        sae_ids=list(SAES),
        seed=replicate_seed,
        data_seed=config["data_seed"],
        device=config["device"],
        out_dir=lambda wc, output: Path(output.summary).parent,
    shell:
        "python -m mechinterp.clamping --model {input.model} --saes {input.saes} --sae-ids {params.sae_ids:q}"
        " --caches {input.caches} --units {input.units} --lexicons {input.lexicons} --table {input.table}"
        " --tokens {input.tokens} --settings {params.settings:q} --seed {params.seed} --data-seed {params.data_seed} --device {params.device:q}"
        " --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"
