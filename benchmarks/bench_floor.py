"""Where the DAG's time goes: every rule of a finished run against its compute floor (issue 29).

    .venv/bin/python benchmarks/bench_floor.py [--run results/default] [--label before]

Per rule, summed over its jobs (the `benchmarks/*.tsv` Snakemake wrote for the run): wall and CPU seconds.
Its **floor** is the floating-point work the stage cannot avoid, counted from the run's own outputs and
model config (model forwards over its tokens up to its deepest layer, the SAE products, the unembedding
products of the lenses and of clamping), divided by the fp32 GEMM throughput measured here, in the same
run (2 threads). Its **fixed cost** is what every job pays before any work, measured here too: starting
Python and importing torch, polars and the package; for a job that runs the model, importing
transformer-lens and booting the model; a figure job is all fixed cost (papermill, a kernel, seaborn).
`ratio` = wall / floor; `beyond` = (wall - fixed) / floor, what an optimisation of the work can still take.

Writes `results/benchmarks/floor_<label>.parquet` and `.md` (the table the README quotes) and prints it.
The timings are the run's: rerun the DAG quietly (nothing else on the machine) before reading them as speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_RULES = {"cache_activations", "logit_lens", "tuned_lens", "evaluate_sae", "evaluate_crosscoder", "clamping",
               "browser"}  # the rules whose jobs import transformer-lens and boot the model
GATED_MLPS = {"llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral"}  # three MLP matrices, not two
STEP_PRODUCTS = {"topk": 4, "batchtopk": 4}  # d_in x d_sae products per training token: encoder forward and
# its weight gradient (a TopK decoder is sparse); a dense decoder (ReLU) adds three more: 10


def gemm_flops_per_s(threads: int, repeats: int = 20) -> float:
    """fp32 throughput of the SAE encoder's product, 4096x576 @ 576x4608, best of `repeats` after 5 warm-ups."""
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 576), torch.randn(576, 4608)
    for _ in range(5):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 4096 * 576 * 4608 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def process_seconds(code: str, repeats: int = 3) -> float:
    """Best wall time of a fresh Python process running `code`."""
    return min(_timed(lambda: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True))
               for _ in range(repeats))


def fixed_costs(model_dir: Path) -> dict[str, float]:
    """Seconds every job pays before its work: a bare Python start, a stage's imports, transformer-lens
    and the model boot (each measured in a fresh process, the extra over the one before)."""
    bare = process_seconds("pass")
    stage = process_seconds("import torch, polars, numpy, mechinterp.files")
    lens = process_seconds("import torch, polars, transformer_lens")
    boot = process_seconds(f"from mechinterp.model import load_model; load_model({str(model_dir)!r})", repeats=2)
    return {"python_s": bare, "stage_imports_s": stage - bare, "transformer_lens_s": lens - stage,
            "model_boot_s": boot - lens}


class Model:
    """FLOPs per token of a decoder-only transformer, from its Hugging Face config.json."""

    def __init__(self, config: dict) -> None:
        get = lambda *keys, default=None: next((config[k] for k in keys if config.get(k) is not None), default)  # noqa: E731
        self.d = get("hidden_size", "n_embd", "d_model")
        self.n_layers = get("num_hidden_layers", "n_layer")
        self.heads = get("num_attention_heads", "n_head")
        self.kv_heads = get("num_key_value_heads", default=self.heads)
        self.head_dim = get("head_dim", default=self.d // self.heads)
        self.d_mlp = get("intermediate_size", "n_inner", default=4 * self.d)
        self.vocab = get("vocab_size")
        self.mlp_matrices = 3 if config.get("model_type") in GATED_MLPS else 2

    def block(self, context: int) -> float:
        """One block, one token, attending to `context` / 2 earlier positions on average."""
        attention = self.d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return 2 * (attention + self.mlp_matrices * self.d * self.d_mlp) + 2 * self.heads * self.head_dim * context

    def unembed(self) -> float:
        return 2.0 * self.d * self.vocab


def sae_shape(folder: Path) -> tuple[int, int, str]:
    cfg = json.loads((folder / "cfg.json").read_text())
    return cfg["d_in"], cfg["d_sae"], cfg["architecture"]


def site_layer(sae_id: str) -> tuple[str, int]:
    """'mlp10-topk' -> ('mlp', 10)."""
    site = sae_id.split("-")[0]
    kind = site.rstrip("0123456789")
    return kind, int(site[len(kind):])


def floors(run: Path) -> dict[str, float]:
    """FLOPs each rule cannot avoid, from the run's outputs and config."""
    config = json.loads((run / "MANIFEST.json").read_text())["config"]
    model = Model(json.loads((run / "model" / "config.json").read_text()))
    windows, context = np.load(run / "tokens" / "tokens.npy", mmap_mode="r").shape
    table = pl.read_parquet(run / "tokens" / "token_table.parquet", columns=["split"])
    heldout_rows = int((table["split"] == "heldout").sum())
    block, unembed, n_layers = model.block(context), model.unembed(), model.n_layers
    forward = n_layers * block + unembed
    saes = {p.name: sae_shape(p) for p in sorted((run / "saes").iterdir()) if (p / "cfg.json").is_file()}
    out: dict[str, float] = {}

    deepest = max(site_layer(s)[1] for s in saes)
    out["cache_activations"] = windows * context * (deepest + 1) * block

    lens_rows = pl.read_parquet(run / "logit_lens" / "positions.parquet").height  # positions x (layers + 1)
    out["logit_lens"] = lens_rows / (n_layers + 1) * forward + lens_rows * unembed

    tl, summary = config["tuned_lens"], json.loads((run / "tuned_lens" / "summary.json").read_text())
    training = pl.read_parquet(run / "tuned_lens" / "training.parquet")
    steps = training["train_loss"].is_not_null().sum()
    evaluations = training["val_loss"].is_not_null().sum()
    heldout_positions = tl["eval_sequences"] * context
    out["tuned_lens"] = (summary["train_tokens"] * forward
                         + steps * tl["batch_tokens"] * 3 * unembed  # decode forward, its input gradient (x2)
                         + evaluations * tl["validation_windows"] * context * unembed
                         + heldout_positions * (forward + 3 * (n_layers + 1) * unembed)  # logit, tuned, bias-only
                         + lens_rows / (n_layers + 1) * forward + lens_rows * unembed)

    def training_tokens(folder: Path) -> int:  # 0 for a loaded (pretrained) SAE, which trains nothing
        return json.loads((folder / "cfg.json").read_text()).get("mechinterp", {}).get("training_tokens", 0)

    out["train_sae"] = sum(training_tokens(run / "saes" / s) * STEP_PRODUCTS.get(arch, 10) * d_in * d_sae
                           for s, (d_in, d_sae, arch) in saes.items())
    spliced = 4 * config["sae_eval"]["sequences"] * context * forward  # clean, SAE, zero and mean ablation
    out["evaluate_sae"] = sum(spliced + heldout_rows * 2 * d_in * d_sae for d_in, d_sae, _ in saes.values())
    by_site: dict[str, list[tuple[int, int]]] = {}
    for s, (d_in, d_sae, _) in saes.items():
        by_site.setdefault(s.split("-")[0], []).append((d_in, d_sae))
    # every SAE and its untrained control encode the scored (held-out) rows
    out["polysemanticity"] = sum(heldout_rows * 2 * 2 * d_in * d_sae for shapes in by_site.values()
                                 for d_in, d_sae in shapes)
    out["browser"] = sum(heldout_rows * 2 * d_in * d_sae + d_sae * (2 * d_in * model.d + unembed)
                         for d_in, d_sae, _ in saes.values())

    crosscoder = run / "crosscoder" / "sae"
    if (crosscoder / "cfg.json").is_file():
        d_in, d_sae, arch = sae_shape(crosscoder)
        n_sites = len(json.loads((crosscoder / "cfg.json").read_text())["mechinterp"]["crosscoder"]["sites"])
        out["train_crosscoder"] = training_tokens(crosscoder) * STEP_PRODUCTS.get(arch, 10) * d_in * d_sae
        out["evaluate_crosscoder"] = ((1 + n_sites) * config["sae_eval"]["sequences"] * context * forward
                                      + heldout_rows * 2 * d_in * d_sae)
        out["crosscoder_latents"] = config["crosscoder"]["analysis_tokens"] * 2 * d_in * d_sae
        out["browser"] += heldout_rows * 2 * d_in * d_sae

    # clamping: every distinct clamped row runs one token from its site's block up, and the unembedding
    effects = pl.read_parquet(run / "clamping" / "effects.parquet",
                              columns=["site", "layer", "unit_kind", "unit", "strength", "prompt"])
    distinct = effects.unique(["site", "unit_kind", "unit", "strength", "prompt"]).group_by("site", "layer").len()
    statistics = config["clamping"]["statistics_tokens"]
    out["clamping"] = sum(row["len"] * ((n_layers - row["layer"]) * model.block(config["clamping"]["prompt_tokens"])
                                        + unembed) for row in distinct.iter_rows(named=True))
    out["clamping"] += sum(statistics * 2 * d_in * d_sae for d_in, d_sae, _ in saes.values())
    return out


def rule_times(run: Path) -> pl.DataFrame:
    """Per rule: jobs, wall and CPU seconds summed over them, from the run's Snakemake benchmark files."""
    rows = []
    for tsv in sorted((run / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(run / "benchmarks").parts[0].removesuffix(".tsv")
        last = pl.read_csv(tsv, separator="\t").tail(1)
        rows.append({"rule": rule, "wall_s": float(last["s"][0]), "cpu_s": float(last["cpu_time"][0])})
    return (pl.DataFrame(rows).group_by("rule").agg(jobs=pl.len(), wall_s=pl.col("wall_s").sum(),
                                                     cpu_s=pl.col("cpu_s").sum()))


def floor_table(run: Path, threads: int) -> tuple[pl.DataFrame, dict]:
    flops_per_s = gemm_flops_per_s(threads)
    costs = fixed_costs(run / "model")
    per_job = costs["python_s"] + costs["stage_imports_s"]
    model_job = per_job + costs["transformer_lens_s"] + costs["model_boot_s"]
    work = floors(run)
    table = rule_times(run).with_columns(
        flop=pl.col("rule").replace_strict({k: float(v) for k, v in work.items()}, default=0.0,
                                           return_dtype=pl.Float64),
        fixed_s=pl.when(pl.col("rule").str.starts_with("figures_")).then(pl.col("wall_s"))
        .when(pl.col("rule").is_in(list(MODEL_RULES))).then(pl.col("jobs") * model_job)
        .otherwise(pl.col("jobs") * per_job),
    ).with_columns(floor_s=pl.col("flop") / flops_per_s).with_columns(
        ratio=pl.when(pl.col("floor_s") > 0).then(pl.col("wall_s") / pl.col("floor_s")),
        beyond=pl.when(pl.col("floor_s") > 0).then((pl.col("wall_s") - pl.col("fixed_s")) / pl.col("floor_s")),
    ).sort("wall_s", descending=True)
    meta = {"run": str(run), "cpu": cpu_model(), "threads": threads, "gemm_gflop_per_s": flops_per_s / 1e9,
            **costs, "total_wall_s": table["wall_s"].sum(), "total_cpu_s": table["cpu_s"].sum(),
            "total_floor_s": table["floor_s"].sum(), "total_fixed_s": table["fixed_s"].sum()}
    return table, meta


def cpu_model() -> str:
    """The CPU's name, family and model, and whether it has AVX-512 and native bf16 products."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    if not fields:
        return platform.processor()
    return (f"{fields.get('model name')} (family {fields.get('cpu family')} model {fields.get('model')}; "
            f"{'AVX-512' if 'avx512f' in flags else 'AVX2'}, {'with' if 'avx512_bf16' in flags else 'no'} native bf16)")


def markdown(table: pl.DataFrame, meta: dict) -> str:
    lines = [f"{meta['cpu']}, {meta['threads']} threads: fp32 GEMM {meta['gemm_gflop_per_s']:.0f} GFLOP/s; "
             f"per job: Python {meta['python_s']:.2f} s + imports {meta['stage_imports_s']:.1f} s, a model job "
             f"+ transformer-lens {meta['transformer_lens_s']:.1f} s + boot {meta['model_boot_s']:.1f} s",
             "", "| rule | jobs | wall s | CPU s | floor s | fixed s | wall / floor | (wall - fixed) / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for row in table.iter_rows(named=True):
        lines.append(f"| {row['rule']} | {row['jobs']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | "
                     f"{row['floor_s']:.1f} | {row['fixed_s']:.0f} | {fmt(row['ratio'])} | {fmt(row['beyond'])} |")
    lines.append(f"| **all** | {table['jobs'].sum()} | {meta['total_wall_s']:.0f} | {meta['total_cpu_s']:.0f} | "
                 f"{meta['total_floor_s']:.0f} | {meta['total_fixed_s']:.0f} | "
                 f"{meta['total_wall_s'] / meta['total_floor_s']:.2f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default")
    parser.add_argument("--label", default="default", help="the name of the table under results/benchmarks/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    table, meta = floor_table(args.run, args.threads)
    out = REPO / "results" / "benchmarks" / f"floor_{args.label}"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out.with_suffix(".parquet"))
    text = markdown(table, meta)
    out.with_suffix(".md").write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(meta, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
