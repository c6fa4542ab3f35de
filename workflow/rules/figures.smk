rule figures_logit_lens:
    input:
        positions=rules.logit_lens.output.positions,
        targets=rules.logit_lens.output.targets,
        first_layer=rules.logit_lens.output.first_layer,
        null=rules.logit_lens.output.null,
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
        " -p null {input.null} -p figure_dir {params.figure_dir} -p model_name {params.model_name:q} > {log} 2>&1"


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
        bounds=settings("claims"),
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p metrics {input.metrics} -p density {input.density} -p sae_dirs {params.saes:q}"
        " -p figure_dir {params.figure_dir} -p model_name {params.model_name:q} -p bounds {params.bounds:q}"
        " > {log} 2>&1"


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
        " {params.tables} -p headline_site {params.headline_site:q} -p figure_dir {params.figure_dir}"
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


rule figures_toy:
    input:
        features=rules.toy_superposition.output.features,
        gram=rules.toy_superposition.output.gram,
        phase=rules.toy_superposition.output.phase,
        sae_recovery=rules.toy_superposition.output.sae_recovery,
    output:
        notebook=f"{RESULTS}/figures/toy_superposition.ipynb",
        html=report(
            f"{RESULTS}/figures/toy_superposition.html",
            caption="../report/toy_notebook.rst",
            category="Toy superposition",
        ),
        figures=[
            report(
                f, caption="../report/toy_figures.rst", category="Toy superposition"
            )
            for stem in TOY_FIGURES
            for f in figure_files(f"toy/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_toy.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_toy.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("toy_superposition"),
        code=stage_code("mechinterp.plotting", notebook("toy_superposition")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p features {input.features} -p gram {input.gram} -p phase {input.phase}"
        " -p sae_recovery {input.sae_recovery} -p figure_dir {params.figure_dir} > {log} 2>&1"


rule figures_crosscoder:
    input:
        metrics=rules.evaluate_crosscoder.output.metrics,
        latents=rules.crosscoder_latents.output.latents,
        latent_units=rules.crosscoder_latents.output.units,
        match_rates=rules.crosscoder_latents.output.match_rates,
        site_units=main_run(rules.collect_polysemanticity.output.units),
        lexicons=rules.fetch_corpus.output.lexicons,
    output:
        notebook=f"{RESULTS}/figures/crosscoder.ipynb",
        html=report(
            f"{RESULTS}/figures/crosscoder.html",
            caption="../report/crosscoder_notebook.rst",
            category="Crosscoder",
        ),
        figures=[
            report(
                f, caption="../report/crosscoder_figures.rst", category="Crosscoder"
            )
            for stem in CROSSCODER_FIGURES
            for f in figure_files(f"crosscoder/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_crosscoder.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_crosscoder.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("crosscoder"),
        code=stage_code("mechinterp.plotting", notebook("crosscoder")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        drive_threshold=config["crosscoder"]["drive_threshold"],
        match_cosine=config["crosscoder"]["match_cosine"],
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p metrics {input.metrics} -p latents {input.latents} -p latent_units {input.latent_units}"
        " -p match_rates {input.match_rates} -p site_units {input.site_units} -p lexicons {input.lexicons} -p figure_dir {params.figure_dir}"
        " -p drive_threshold {params.drive_threshold} -p match_cosine {params.match_cosine}"
        " -p model_name {params.model_name:q} > {log} 2>&1"


rule figures_tuned_lens:
    input:
        logit_first_layer=rules.logit_lens.output.first_layer,
        tuned_first_layer=rules.tuned_lens.output.first_layer,
        heldout_kl=rules.tuned_lens.output.heldout_kl,
        training=rules.tuned_lens.output.training,
    output:
        notebook=f"{RESULTS}/figures/tuned_lens.ipynb",
        html=report(
            f"{RESULTS}/figures/tuned_lens.html",
            caption="../report/tuned_lens_notebook.rst",
            category="Logit lens",
        ),
        figures=[
            report(
                f, caption="../report/tuned_lens_figures.rst", category="Logit lens"
            )
            for stem in TUNED_LENS_FIGURES
            for f in figure_files(f"tuned_lens/{stem}")
        ],
    log:
        f"{RESULTS}/logs/figures_tuned_lens.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures_tuned_lens.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("table"),
    params:
        notebook=notebook("tuned_lens"),
        code=stage_code("mechinterp.plotting", notebook("tuned_lens")),
        figure_dir=lambda wc, output: Path(output.figures[0]).parent,
        model_name=config["model"]["name"],
    shell:
        "python -m mechinterp.plotting --notebook {params.notebook} --out {output.notebook} --html {output.html}"
        " -p logit_first_layer {input.logit_first_layer} -p tuned_first_layer {input.tuned_first_layer}"
        " -p heldout_kl {input.heldout_kl} -p training {input.training} -p figure_dir {params.figure_dir}"
        " -p model_name {params.model_name:q} > {log} 2>&1"
