rule logit_lens:
    input:
        model=rules.fetch_model.output[0],
        tokens=rules.tokenize.output.tokens,
        table=rules.tokenize.output.table,
    output:
        positions=f"{RESULTS}/logit_lens/positions.parquet",
        targets=f"{RESULTS}/logit_lens/targets.parquet",
        first_layer=f"{RESULTS}/logit_lens/first_layer.parquet",
        null=f"{RESULTS}/logit_lens/null.parquet",
        summary=f"{RESULTS}/logit_lens/summary.json",
    log:
        f"{RESULTS}/logs/logit_lens.log",
    benchmark:
        f"{RESULTS}/benchmarks/logit_lens.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.logit_lens"),
        settings=settings("logit_lens"),
        seed=config["data_seed"],
        device=config["device"],
        out_dir=lambda wc, output: Path(output.summary).parent,
    shell:
        "python -m mechinterp.logit_lens --model {input.model} --tokens {input.tokens} --table {input.table}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device:q} --threads {threads}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule tuned_lens:
    input:
        model=rules.fetch_model.output[0],
        tokens=rules.tokenize.output.tokens,
        table=rules.tokenize.output.table,
    output:
        positions=f"{RESULTS}/tuned_lens/positions.parquet",
        targets=f"{RESULTS}/tuned_lens/targets.parquet",
        first_layer=f"{RESULTS}/tuned_lens/first_layer.parquet",
        heldout_kl=f"{RESULTS}/tuned_lens/heldout_kl.parquet",
        training=f"{RESULTS}/tuned_lens/training.parquet",
        translators=f"{RESULTS}/tuned_lens/translators.safetensors",
        bias_translators=f"{RESULTS}/tuned_lens/bias_translators.safetensors",
        summary=f"{RESULTS}/tuned_lens/summary.json",
    log:
        f"{RESULTS}/logs/tuned_lens.log",
    benchmark:
        f"{RESULTS}/benchmarks/tuned_lens.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.tuned_lens"),
        settings=settings("tuned_lens"),
        lens_settings=settings("logit_lens"),
        seed=config["data_seed"],
        device=config["device"],
        out_dir=lambda wc, output: Path(output.summary).parent,
    shell:
        "python -m mechinterp.tuned_lens --model {input.model} --tokens {input.tokens} --table {input.table}"
        " --settings {params.settings:q} --lens-settings {params.lens_settings:q} --seed {params.seed}"
        " --device {params.device:q} --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"
