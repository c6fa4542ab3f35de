rule clamping:
    input:
        model=rules.fetch_model.output[0],
        sae=expand(rules.train_sae.output[0], sae=config["clamping"]["sae"]),
        units=rules.collect_polysemanticity.output.units,
        concepts=rules.collect_polysemanticity.output.concepts,
        lexicons=rules.fetch_corpus.output.lexicons,
        table=rules.tokenize.output.table,
    output:
        targets=f"{RESULTS}/clamping/targets.parquet",
        effects=f"{RESULTS}/clamping/effects.parquet",
        summary=f"{RESULTS}/clamping/summary.parquet",
        continuations=f"{RESULTS}/clamping/continuations.parquet",
    log:
        f"{RESULTS}/logs/clamping.log",
    benchmark:
        f"{RESULTS}/benchmarks/clamping.tsv"
    conda:
        ENV
    threads: workflow.cores
    params:
        code=stage_code("mechinterp.clamping"),
        settings=settings("clamping"),
        sae_id=config["clamping"]["sae"],
        seed=config["seed"],
        device=config["device"],
    shell:
        "python -m mechinterp.clamping --model {input.model} --sae {input.sae} --sae-id {params.sae_id}"
        " --units {input.units} --concepts {input.concepts} --lexicons {input.lexicons} --table {input.table}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device} --threads {threads}"
        " --targets {output.targets} --effects {output.effects} --summary {output.summary}"
        " --continuations {output.continuations} > {log} 2>&1"
