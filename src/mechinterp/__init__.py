"""Replication workflow for mechanistic interpretability: logit lens, SAEs, polysemanticity, clamping.

One module per stage; each exposes pure functions over arrays and tables, and `cli.py` wraps them
in thin command-line entry points that the Snakemake rules call.
"""

__version__ = "0.1.0"
