CROSSCODER_SAES = expand(main_run(rules.train_sae.output[0]), sae=CROSSCODER.saes)
# the match-rate baseline: the first site's SAE trained again with the first replicate seed (the replicates
# target reuses it); the schema's replicates.seeds has at least two seeds, so one differs from `seed`
SECOND_SEED = next(
    seed for seed in config["replicates"]["seeds"] if seed != config["seed"]
)
SECOND_SEED_SAE = rules.train_sae.output[0].format(
    replicate=replicate_dir(SECOND_SEED), sae=CROSSCODER.saes[0]
)


rule train_crosscoder:
    input:
        caches=CROSSCODER_CACHES,
        headers=[str(Path(p).with_suffix(".json")) for p in CROSSCODER_CACHES],
        table=rules.tokenize.output.table,
    output:
        directory(f"{RESULTS}/crosscoder/sae"),
    log:
        f"{RESULTS}/logs/train_crosscoder.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_crosscoder.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.crosscoder"),
        spec=json.dumps(CROSSCODER.settings, sort_keys=True),
        seed=config["seed"],
        checkpoint=f"{RESULTS}/checkpoints/crosscoder.pt",
        model_name=config["model"]["name"],
        dataset=dataset_name(),
        device=config["device"],
    shell:
        "python -m mechinterp.crosscoder --caches {input.caches} --table {input.table} --spec {params.spec:q}"
        " --seed {params.seed} --threads {threads} --checkpoint {params.checkpoint} --device {params.device:q}"
        " --model-name {params.model_name:q} --dataset {params.dataset:q} --out {output} > {log} 2>&1"


rule evaluate_crosscoder:
    input:
        crosscoder=rules.train_crosscoder.output[0],
        saes=CROSSCODER_SAES,
        sae_metrics=main_run(rules.collect_sae_metrics.output.metrics),
        caches=CROSSCODER_CACHES,
        table=rules.tokenize.output.table,
        tokens=rules.tokenize.output.tokens,
        model=rules.fetch_model.output[0],
    output:
        metrics=f"{RESULTS}/crosscoder/metrics.parquet",
        density=f"{RESULTS}/crosscoder/density.parquet",
    log:
        f"{RESULTS}/logs/evaluate_crosscoder.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_crosscoder.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.evaluate_crosscoder"),
        sae_ids=CROSSCODER.saes,
        settings=settings("sae_eval"),
        seed=config["seed"],
        device=config["device"],
    shell:
        "python -m mechinterp.evaluate_crosscoder --crosscoder {input.crosscoder} --saes {input.saes}"
        " --sae-ids {params.sae_ids:q} --sae-metrics {input.sae_metrics} --caches {input.caches}"
        " --table {input.table} --tokens {input.tokens} --model {input.model}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device:q} --threads {threads}"
        " --out {output.metrics} --density-out {output.density} > {log} 2>&1"


rule crosscoder_latents:
    input:
        crosscoder=rules.train_crosscoder.output[0],
        saes=CROSSCODER_SAES,
        second_seed_sae=SECOND_SEED_SAE,
        caches=CROSSCODER_CACHES,
        table=rules.tokenize.output.table,
        lexicons=rules.fetch_corpus.output.lexicons,
    output:
        latents=f"{RESULTS}/crosscoder/latents.parquet",
        match_rates=f"{RESULTS}/crosscoder/match_rates.parquet",
        units=f"{RESULTS}/crosscoder/units.parquet",
        codes=directory(f"{RESULTS}/crosscoder/codes"),
    log:
        f"{RESULTS}/logs/crosscoder_latents.log",
    benchmark:
        f"{RESULTS}/benchmarks/crosscoder_latents.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("compute"),
    params:
        code=stage_code("mechinterp.crosscoder_latents"),
        settings=settings("crosscoder"),
        polysemanticity=settings("polysemanticity"),
        seed=config["seed"],
    shell:
        "python -m mechinterp.crosscoder_latents --crosscoder {input.crosscoder} --saes {input.saes}"
        " --seed-sae {input.second_seed_sae} --caches {input.caches} --table {input.table} --lexicons {input.lexicons}"
        " --settings {params.settings:q} --polysemanticity {params.polysemanticity:q} --seed {params.seed}"
        " --threads {threads} --out {output.latents} --match-rates {output.match_rates} --units {output.units}"
        " --codes {output.codes} > {log} 2>&1"
