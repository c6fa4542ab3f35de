"""Replication workflow for mechanistic interpretability: logit lens, SAEs, polysemanticity, clamping.

One module per stage: pure functions over arrays and tables, and beside them the stage's entry
point `main()`, which a Snakemake rule runs as `python -m mechinterp.<stage>`.
"""

__version__ = "0.1.0"
