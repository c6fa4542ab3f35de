"""Benchmarks of the polysemanticity and clamping stages (issues 4 and 5) on a finished default run.

    .venv/bin/python benchmarks/bench_study.py [--run results/default]

Polysemanticity: wall time and peak memory (max RSS) of scoring one site's neurons and SAE features
(default: mlp10, the largest) over the held-out tokens and over the training tokens (8x as many):
memory should stay flat, time grow linearly. Clamping: wall time of the stage and its share per clamped unit, from the rule's log.
Writes results/benchmarks/study.json and prints it."""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mechinterp.config import validate_config

REPO = Path(__file__).resolve().parents[1]


def score_site(run: Path, site: str, sae: str, split: str, out: Path) -> dict:
    """Run the polysemanticity entry point under /usr/bin/time -v; wall time, peak RSS, tokens scored."""
    config = validate_config(yaml.safe_load((REPO / "config" / "default.yaml").read_text()),
                             REPO / "workflow" / "schemas" / "config.schema.yaml")
    spec = {**config["polysemanticity"], "split": split}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mechinterp.polysemanticity",
           "--cache", str(run / "activations" / f"{site}.npy"), "--table", str(run / "tokens" / "token_table.parquet"),
           "--lexicons", str(run / "corpus" / "lexicons.parquet"), "--saes", str(run / "saes" / sae), "--sae-ids", sae,
           "--settings", json.dumps(spec), "--seed", "0", "--threads", "2", "--units", str(out / "units.parquet"),
           "--concepts", str(out / "concepts.parquet"), "--comparison", str(out / "comparison.parquet")]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    tokens = int(re.search(r"scored \d+ units on (\d+) tokens", done.stderr).group(1))
    return {"site": site, "sae": sae, "split": split, "tokens": tokens, "wall_s": seconds,
            "peak_rss_mib": peak_kib / 1024, "tokens_per_s": tokens / seconds}


def clamping_from_log(run: Path) -> dict:
    text = (run / "logs" / "clamping.log").read_text()
    match = re.search(r"clamped (\d+) units at (\d+) strengths on (\d+) prompts in ([\d.]+) s", text)
    units, strengths, prompts, seconds = int(match[1]), int(match[2]), int(match[3]), float(match[4])
    return {"units": units, "strengths": strengths, "prompts": prompts, "stage_s": seconds,
            "s_per_unit": seconds / units}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--sites", nargs="+", default=["mlp10"], help="sites to score (each with its <site>-topk SAE)")
    args = parser.parse_args()
    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        out["polysemanticity"] = [score_site(args.run, site, f"{site}-topk", split, Path(tmp))
                                  for site in args.sites for split in ("heldout", "train")]
    out["clamping"] = clamping_from_log(args.run)
    path = REPO / "results" / "benchmarks" / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
