rule figures_logit_lens:
    input:
        positions=rules.logit_lens.output.positions,
        targets=rules.logit_lens.output.targets,
        first_layer=rules.logit_lens.output.first_layer,
    output:
        notebook=f"{RESULTS}/figures/logit_lens.ipynb",
        html=report(
            f"{RESULTS}/figures/logit_lens.html",
            caption="../report/logit_lens_notebook.rst",
            category="Logit lens",
        ),
        heatmaps=[
            report(
                f,
                caption="../report/logit_lens_heatmap.rst",
                category="Logit lens",
                subcategory="Heatmaps",
            )
            for prompt_id in lens_ids()
            for f in figure_files(f"logit_lens/heatmap_{prompt_id}")
        ],
        curves=[
            report(
                f, caption="../report/logit_lens_targets.rst", category="Logit lens"
            )
            for f in figure_files("logit_lens/target_curves")
        ],
        kl=[
            report(f, caption="../report/logit_lens_kl.rst", category="Logit lens")
            for f in figure_files("logit_lens/kl_to_final")
        ],
    log:
        f"{RESULTS}/logs/figures_logit_lens.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_logit_lens.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("logit_lens"),
        code=stage_code("mechinterp.plotting", notebook("logit_lens")),
        figure_dir=lambda wc, output: Path(output.curves[0]).parent,
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p positions {input.positions} -p targets {input.targets} -p first_layer {input.first_layer}"
        " -p figure_dir {params.figure_dir} -p model_name {params.model_name:q} > {log} 2>&1"


rule figures_sae:
    input:
        metrics=main_run(rules.collect_sae_metrics.output.metrics),
        density=main_run(rules.collect_sae_metrics.output.density),
        saes=expand(main_run(rules.train_sae.output[0]), sae=SAES),
    output:
        notebook=f"{RESULTS}/figures/sae_quality.ipynb",
        html=report(
            f"{RESULTS}/figures/sae_quality.html",
            caption="../report/sae_notebook.rst",
            category="Sparse autoencoders",
        ),
        figures=[
            report(
                f, caption=f"../report/sae_{stem}.rst", category="Sparse autoencoders"
            )
            for stem in SAE_FIGURES
            for f in figure_files(f"sae/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_sae.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_sae.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("sae_quality"),
        code=stage_code("mechinterp.plotting", notebook("sae_quality")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        saes=lambda wc, input: json.dumps(list(input.saes)),
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p metrics {input.metrics} -p density {input.density} -p sae_dirs {params.saes:q}"
        " -p figure_dir {params.figure_dir} -p model_name {params.model_name:q} > {log} 2>&1"


rule figures_polysemanticity:
    input:
        units=main_run(rules.collect_polysemanticity.output.units),
        comparison=main_run(rules.collect_polysemanticity.output.comparison),
        lexicons=rules.fetch_corpus.output.lexicons,
    output:
        notebook=f"{RESULTS}/figures/polysemanticity.ipynb",
        html=report(
            f"{RESULTS}/figures/polysemanticity.html",
            caption="../report/polysemanticity_notebook.rst",
            category="Polysemanticity",
        ),
        figures=[
            report(
                f,
                caption=f"../report/polysemanticity_{stem}.rst",
                category="Polysemanticity",
            )
            for stem in POLYSEMANTICITY_FIGURES
            for f in figure_files(f"polysemanticity/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_polysemanticity.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_polysemanticity.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("polysemanticity"),
        code=stage_code("mechinterp.plotting", notebook("polysemanticity")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p units {input.units} -p comparison {input.comparison} -p lexicons {input.lexicons}"
        " -p figure_dir {params.figure_dir} -p model_name {params.model_name:q} > {log} 2>&1"


rule figures_clamping:
    input:
        **{name: main_run(rules.clamping.output[name]) for name in CLAMPING_TABLES},
    output:
        notebook=f"{RESULTS}/figures/clamping.ipynb",
        html=report(
            f"{RESULTS}/figures/clamping.html",
            caption="../report/clamping_notebook.rst",
            category="Clamping",
        ),
        figures=[
            report(f, caption=f"../report/clamping_{stem}.rst", category="Clamping")
            for stem in CLAMPING_FIGURES
            for f in figure_files(f"clamping/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_clamping.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_clamping.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("clamping"),
        code=stage_code("mechinterp.plotting", notebook("clamping")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        model_name=config["model"]["name"],
        headline_site=SAES[config["clamping"]["sae"]].site.id,
        tables=lambda wc, input: " ".join(
            f"-p {name} {input[name]}" for name in CLAMPING_TABLES
        ),
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " {params.tables} -p headline_site {params.headline_site} -p figure_dir {params.figure_dir}"
        " -p model_name {params.model_name:q} > {log} 2>&1"


rule figures_claims:
    input:
        claims=main_run(rules.claims.output[0]),
    output:
        notebook=f"{RESULTS}/figures/claims.ipynb",
        html=report(
            f"{RESULTS}/figures/claims.html",
            caption="../report/claims_notebook.rst",
            category="Claims",
        ),
        figures=[
            report(f, caption="../report/claims_verdicts.rst", category="Claims")
            for f in figure_files("claims/verdicts")
        ],
    log:
        f"{RESULTS}/logs/figures_claims.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_claims.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("claims"),
        code=stage_code("mechinterp.plotting", notebook("claims")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p claims {input.claims} -p figure_dir {params.figure_dir} -p model_name {params.model_name:q}"
        " > {log} 2>&1"
