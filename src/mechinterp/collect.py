"""Stack the per-job tables of a stage (one per SAE or site) into the stage's table."""

from __future__ import annotations

import argparse

import polars as pl

from mechinterp.errors import run_stage
from mechinterp.files import write_parquet


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `collect_*` rules: `python -m mechinterp.collect IN... --out OUT`."""
    parser = argparse.ArgumentParser(description="Stack Parquet tables into one (columns matched by name).")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_parquet(pl.concat([pl.read_parquet(p) for p in args.inputs], how="diagonal_relaxed"), args.out)


if __name__ == "__main__":
    run_stage(main)
