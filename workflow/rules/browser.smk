BROWSER_PAGES = sorted(
    p.name for p in (Path(workflow.basedir) / "workflow" / "browser").iterdir()
)


rule browser_sae:
    input:
        unpack(browsed_inputs),
        table=rules.tokenize.output.table,
        model=rules.fetch_model.output[0],
        targets=main_run(rules.clamping.output.targets),
        effects=main_run(rules.clamping.output.effects),
        comparisons=main_run(rules.clamping.output.comparisons),
        continuations=main_run(rules.clamping.output.continuations),
        scores=main_run(rules.clamping.output.scores),
    output:
        directory(f"{RESULTS}/browser/{{sae}}"),
    log:
        f"{RESULTS}/logs/browser/{{sae}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/browser/{{sae}}.tsv"
    wildcard_constraints:
        sae=id_pattern(BROWSED),
    conda:
        ENV
    threads: THREADS
    resources:
        **job_resources("model"),
    params:
        code=stage_code("mechinterp.browser"),
        settings=settings("browser"),
        polysemanticity=settings("polysemanticity"),
        seed=config["seed"],
        device=config["device"],
    shell:
        "python -m mechinterp.browser sae --sae-id {wildcards.sae:q} --sae {input.sae} --cache {input.cache}"
        " --units {input.units} --codes {input.codes} --table {input.table} --model {input.model}"
        " --targets {input.targets} --effects {input.effects} --comparisons {input.comparisons}"
        " --continuations {input.continuations} --scores {input.scores} --polysemanticity {params.polysemanticity:q}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device:q}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule browser:
    input:
        saes=expand(rules.browser_sae.output[0], sae=BROWSED),
        table=rules.tokenize.output.table,
    output:
        index=f"{RESULTS}/browser/index.html",
        files=[
            f"{RESULTS}/browser/{name}"
            for name in [*BROWSER_PAGES, "corpus.js", "site.js"]
            if name != "index.html"
        ],
    log:
        f"{RESULTS}/logs/browser/site.log",
    benchmark:
        f"{RESULTS}/benchmarks/browser/site.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        code=stage_code(
            "mechinterp.browser",
            *(f"workflow/browser/{name}" for name in BROWSER_PAGES),
        ),
        summaries=lambda wc, input: [f"{folder}/summary.json" for folder in input.saes],
        split=config["polysemanticity"]["split"],
        run=config["run"],
        model_name=config["model"]["name"],
        out=lambda wc, output: Path(output.index).parent,
    shell:
        "python -m mechinterp.browser site --summaries {params.summaries} --table {input.table}"
        " --split {params.split:q} --pages workflow/browser --run {params.run:q}"
        " --model-name {params.model_name:q} --out {params.out} > {log} 2>&1"
