rule polysemanticity:
    input:
        cache=f"{RESULTS}/activations/{{site}}.npy",
        header=f"{RESULTS}/activations/{{site}}.json",
        table=rules.tokenize.output.table,
        lexicons=rules.fetch_corpus.output.lexicons,
        saes=lambda wc: expand(
            rules.train_sae.output[0], sae=saes_at(wc.site), replicate=wc.replicate
        ),
    output:
        units=f"{RESULTS}/{{replicate}}polysemanticity/{{site}}.units.parquet",
        concepts=f"{RESULTS}/{{replicate}}polysemanticity/{{site}}.concepts.parquet",
        comparison=f"{RESULTS}/{{replicate}}polysemanticity/{{site}}.comparison.parquet",
        codes=directory(f"{RESULTS}/{{replicate}}polysemanticity/{{site}}.codes"),
    log:
        f"{RESULTS}/{{replicate}}logs/polysemanticity/{{site}}.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/polysemanticity/{{site}}.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("compute"),
    params:
        code=stage_code("mechinterp.polysemanticity"),
        settings=settings("polysemanticity"),
        sae_ids=lambda wc: saes_at(wc.site),
        seed=replicate_seed,
    shell:
        "python -m mechinterp.polysemanticity --cache {input.cache} --table {input.table}"
        " --lexicons {input.lexicons} --saes {input.saes} --sae-ids {params.sae_ids:q}"
        " --settings {params.settings:q} --seed {params.seed}"
        " --threads {threads} --units {output.units} --concepts {output.concepts}"
        " --comparison {output.comparison} --codes {output.codes} > {log} 2>&1"


rule collect_polysemanticity:
    input:
        units=expand(
            rules.polysemanticity.output.units, site=cache_sites(), allow_missing=True
        ),
        concepts=expand(
            rules.polysemanticity.output.concepts,
            site=cache_sites(),
            allow_missing=True,
        ),
        comparison=expand(
            rules.polysemanticity.output.comparison,
            site=cache_sites(),
            allow_missing=True,
        ),
    output:
        units=f"{RESULTS}/{{replicate}}polysemanticity/units.parquet",
        concepts=f"{RESULTS}/{{replicate}}polysemanticity/concepts.parquet",
        comparison=f"{RESULTS}/{{replicate}}polysemanticity/comparison.parquet",
    log:
        f"{RESULTS}/{{replicate}}logs/collect_polysemanticity.log",
    benchmark:
        f"{RESULTS}/{{replicate}}benchmarks/collect_polysemanticity.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code("mechinterp.collect"),
    shell:
        "(python -m mechinterp.collect {input.units} --out {output.units}"
        " && python -m mechinterp.collect {input.concepts} --out {output.concepts}"
        " && python -m mechinterp.collect {input.comparison} --out {output.comparison}) > {log} 2>&1"
