rule cache_activations:
    input:
        model=rules.fetch_model.output[0],
        tokens=rules.tokenize.output.tokens,
        table=rules.tokenize.output.table,
    output:
        arrays=[f"{RESULTS}/activations/{site}.npy" for site in cache_sites()],
        headers=[f"{RESULTS}/activations/{site}.json" for site in cache_sites()],
    log:
        f"{RESULTS}/logs/cache_activations.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_activations.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.activations"),
        settings=settings("activations"),
        sites=" ".join(cache_sites()),
        device=config["device"],
        out_dir=lambda wc, output: Path(output.arrays[0]).parent,
    shell:
        "python -m mechinterp.activations --model {input.model} --tokens {input.tokens} --table {input.table}"
        " --sites {params.sites} --settings {params.settings:q}"
        " --device {params.device:q} --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule train_sae:
    input:
        cache=lambda wc: activation_file(wc.sae, "npy"),
        header=lambda wc: activation_file(wc.sae, "json"),
        table=rules.tokenize.output.table,
    output:
        directory(f"{RESULTS}/{{replicate}}saes/{{sae}}"),
    log:
        f"{RESULTS}/{{replicate}}logs/train_sae/{{sae}}.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/train_sae/{{sae}}.tsv"
    wildcard_constraints:
        sae=id_pattern(TRAINED),
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.train_sae"),
        spec=lambda wc: json.dumps(SAES[wc.sae].settings, sort_keys=True),
        seed=replicate_seed,
        checkpoint=lambda wc: f"{RESULTS}/{wc.replicate}checkpoints/{wc.sae}.pt",
        model_name=config["model"]["name"],
        dataset=dataset_name(),
        device=config["device"],
    shell:
        "python -m mechinterp.train_sae --cache {input.cache} --table {input.table} --spec {params.spec:q}"
        " --seed {params.seed} --threads {threads} --checkpoint {params.checkpoint} --device {params.device:q}"
        " --model-name {params.model_name:q} --dataset {params.dataset:q} --out {output} > {log} 2>&1"


rule load_sae:
    input:
        cache=lambda wc: activation_file(wc.sae, "npy"),
        header=lambda wc: activation_file(wc.sae, "json"),
        table=rules.tokenize.output.table,
    output:
        directory(f"{RESULTS}/{{replicate}}saes/{{sae}}"),
    log:
        f"{RESULTS}/{{replicate}}logs/load_sae/{{sae}}.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/load_sae/{{sae}}.tsv"
    wildcard_constraints:
        sae=id_pattern(PRETRAINED),
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("compute"),
    params:
        code=stage_code("mechinterp.pretrained_sae"),
        spec=lambda wc: json.dumps(
            {**SAES[wc.sae].settings, "pretrained": SAES[wc.sae].pretrained},
            sort_keys=True,
        ),
        where=lambda wc: f"sae.sites.{list(SAES).index(wc.sae)}",
        model_name=config["model"]["name"],
        dataset=dataset_name(),
    shell:
        "python -m mechinterp.pretrained_sae --cache {input.cache} --table {input.table} --spec {params.spec:q}"
        " --where {params.where} --model-name {params.model_name:q} --dataset {params.dataset:q}"
        " --out {output} > {log} 2>&1"


rule evaluate_sae:
    input:
        model=rules.fetch_model.output[0],
        sae=rules.train_sae.output[0],
        cache=lambda wc: activation_file(wc.sae, "npy"),
        table=rules.tokenize.output.table,
        tokens=rules.tokenize.output.tokens,
    output:
        metrics=f"{RESULTS}/{{replicate}}sae_eval/{{sae}}.parquet",
        density=f"{RESULTS}/{{replicate}}sae_eval/{{sae}}.density.parquet",
    log:
        f"{RESULTS}/{{replicate}}logs/evaluate_sae/{{sae}}.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/evaluate_sae/{{sae}}.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.evaluate_sae"),
        settings=settings("sae_eval"),
        seed=replicate_seed,
        device=config["device"],
    shell:
        "python -m mechinterp.evaluate_sae --model {input.model} --sae {input.sae} --sae-id {wildcards.sae:q}"
        " --cache {input.cache} --table {input.table} --tokens {input.tokens} --settings {params.settings:q}"
        " --seed {params.seed} --device {params.device:q} --threads {threads} --out {output.metrics}"
        " --density-out {output.density} > {log} 2>&1"


rule collect_sae_metrics:
    input:
        metrics=expand(rules.evaluate_sae.output.metrics, sae=SAES, allow_missing=True),
        density=expand(rules.evaluate_sae.output.density, sae=SAES, allow_missing=True),
    output:
        metrics=f"{RESULTS}/{{replicate}}sae_eval/metrics.parquet",
        density=f"{RESULTS}/{{replicate}}sae_eval/density.parquet",
    log:
        f"{RESULTS}/{{replicate}}logs/collect_sae_metrics.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/collect_sae_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.collect"),
    shell:
        "(python -m mechinterp.collect {input.metrics} --out {output.metrics}"
        " && python -m mechinterp.collect {input.density} --out {output.density}) > {log} 2>&1"
