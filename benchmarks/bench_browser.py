"""Benchmark the feature browser on a finished run (default: results/default).

In one run on this machine: the size of the run's browser/ by part (unit pages' data, index tables, prompt
view, corpus text, pages), and one SAE's build (`python -m mechinterp.browser sae`, as its rule runs it, into
a temporary folder) beside two floors measured in the same run: loading the model (which the build needs for
the unembedding) and the bare logit-effect products of its features and neurons (one GEMM each, the largest
computation of the build). Reports the build's time, its ratio to the floors' sum, and the CPU model. Writes
results/benchmarks/browser.json.

    .venv/bin/python benchmarks/bench_browser.py [--run results/default] [--sae mlp10-topk]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = {"unit data": ("features-[0-9]*.js", "neurons-[0-9]*.js"), "index tables": ("*-index.js",),
         "prompt view": ("prompts-*.js",)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sizes(browser: Path) -> dict[str, int]:
    out = {part: sum(f.stat().st_size for pattern in patterns for f in browser.glob(f"*/{pattern}"))
           for part, patterns in PARTS.items()}
    out["corpus text"] = (browser / "corpus.js").stat().st_size
    out["pages and site list"] = sum(f.stat().st_size for f in browser.iterdir() if f.is_file()) - out["corpus text"]
    out["total"] = sum(f.stat().st_size for f in browser.rglob("*") if f.is_file())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="results/default")
    parser.add_argument("--sae", default="mlp10-topk")
    args = parser.parse_args()
    run = REPO / args.run
    manifest = json.loads((run / "MANIFEST.json").read_text())
    config = manifest["config"]
    site = json.loads((run / "browser" / args.sae / "summary.json").read_text())
    torch.set_num_threads(2)
    from mechinterp.clamping import load_parts
    from mechinterp.saes import load_sae
    from mechinterp.sites import Site

    start = time.perf_counter()
    parts, _ = load_parts(run / "model", "cpu")
    load_s = time.perf_counter() - start
    sae, _ = load_sae(run / "saes" / args.sae)
    unembed = parts.model.get_submodule(parts.unembed).weight.detach()
    with torch.no_grad():
        writes = parts.to_residual(Site(site["site_kind"], site["layer"]), sae.W_dec.detach())
        neurons = parts.to_residual(Site(site["site_kind"], site["layer"]), torch.eye(sae.d_in))
        start = time.perf_counter()
        for directions in (writes, neurons):
            for i in range(0, len(directions), 512):
                directions[i : i + 512] @ unembed.T
        gemm_s = time.perf_counter() - start
    poly = run / "polysemanticity"
    clamping = [f"--{n}={run / 'clamping' / f'{n}.parquet'}" for n in ("targets", "effects", "comparisons",
                                                                       "continuations", "scores")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mechinterp.browser", "sae", "--sae-id", args.sae,
                        "--sae", str(run / "saes" / args.sae),
                        "--cache", str(run / "activations" / f"{site['site']}.npy"),
                        "--units", str(poly / "units.parquet"),
                        "--codes", str(poly / f"{site['site']}.codes"),
                        "--table", str(run / "tokens" / "token_table.parquet"), "--model", str(run / "model"), *clamping,
                        "--polysemanticity", json.dumps(config["polysemanticity"]),
                        "--settings", json.dumps(config["browser"]), "--seed", str(config["seed"]), "--threads", "2",
                        "--out", str(Path(tmp) / args.sae)], check=True, capture_output=True)
        build_s = time.perf_counter() - start
    result = {"cpu": cpu_model(), "sae": args.sae, "build_s": round(build_s, 2), "model_load_s": round(load_s, 2),
              "logit_gemm_s": round(gemm_s, 2), "build_over_floors": round(build_s / (load_s + gemm_s), 2),
              "bytes": sizes(run / "browser"),
              "jobs_wall_s": {name: job["wall_s"] for name, job in manifest["jobs"].items() if name.startswith("browser")}}
    out = REPO / "results" / "benchmarks" / "browser.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
