"""Benchmarks of the activation cache and SAE training (issue 3).

    .venv/bin/python benchmarks/bench_sae.py [--run results/default] [--skip-memory]

1. Training step throughput (tokens/s) at d_in 576, d_sae 4608, k 32, batch 4096 on 2 threads: the dense
   encoder product alone (the floor of any TopK step), a straightforward dense PyTorch TopK step
   (autograd, Adam), this project's TopK step (without and with the aux-k loss, a quarter of the
   latents dead) with its profile, and its ReLU + L1 step, measured in one process.
2. Caching throughput against a bare forward pass to the same depth, on the run's model and tokens.
3. Peak memory (RSS, and its anonymous part) of caching and of training at two token counts.
Writes results/benchmarks/sae.json and prints it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def per_call_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def naive_topk_step(params: dict[str, torch.Tensor], optimizer, x: torch.Tensor, k: int) -> None:
    """A straightforward dense TopK SAE step: every product dense, gradients by autograd."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    loss = (z @ params["W_dec"] + params["b_dec"] - x).pow(2).sum(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def bench_steps(repeats: int) -> dict[str, float]:
    """Each step against the floor, measured side by side in this process; the TopK step also with a
    quarter of its latents dead (the aux-k loss active), and its profile: the time of each part."""
    from mechinterp.manifest import cpu_model
    from mechinterp.saes import ReluSAE, TopKSAE
    from mechinterp.saes.relu import ReluSettings
    from mechinterp.saes.topk import TopKSettings, sparse_decode, sparse_dots, sparse_outers, top_k

    torch.set_num_threads(2)
    torch.manual_seed(0)
    d_in, d_sae, k, batch = 576, 4608, 32, 4096
    x = torch.randn(batch, d_in)
    w_enc = torch.randn(d_in, d_sae) / d_in**0.5
    floor = per_call_seconds(lambda: x @ w_enc, repeats)

    params = {"W_enc": w_enc.clone().requires_grad_(), "b_enc": torch.zeros(d_sae, requires_grad=True),
              "W_dec": torch.randn(d_sae, d_in).requires_grad_(), "b_dec": torch.zeros(d_in, requires_grad=True)}
    naive_opt = torch.optim.Adam(params.values(), lr=1e-4)
    naive = per_call_seconds(lambda: naive_topk_step(params, naive_opt, x, k), repeats)

    no_dead = torch.zeros(d_sae, dtype=torch.bool)
    quarter_dead = torch.arange(d_sae) % 4 == 0
    results = {}
    for name, sae, dead in (
            ("topk", TopKSAE(d_in, TopKSettings(d_sae, k, auxk_coefficient=1 / 32, auxk_k=64)), no_dead),
            ("topk_auxk", TopKSAE(d_in, TopKSettings(d_sae, k, auxk_coefficient=1 / 32, auxk_k=64)), quarter_dead),
            ("relu", ReluSAE(d_in, ReluSettings(d_sae, l1_coefficient=5.0, l1_warmup_fraction=0.02)), no_dead)):
        sae.initialise(x[:1024], torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

        def step(sae=sae, optimizer=optimizer, dead=dead):
            sae.training_step(x, dead, 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.after_step()

        results[name] = per_call_seconds(step, repeats)

    # the TopK step's parts, on the same inputs (the step runs the encoder in chunks of 1024 rows)
    sae = TopKSAE(d_in, TopKSettings(d_sae, k, auxk_coefficient=1 / 32, auxk_k=64))
    sae.initialise(x[:1024], torch.Generator().manual_seed(0))
    with torch.no_grad():
        centred = x - sae.b_dec
        pre = torch.mm(centred[:1024], sae.W_enc).add_(sae.b_enc)
        vals, idx, _, _ = sae._top_latents(centred)
        latents, values, error = idx.reshape(-1), vals.reshape(-1), torch.randn(batch, d_in)
        row_ptr = torch.arange(0, batch * k + 1, k)
        rows = torch.arange(batch).repeat_interleave(k)
        chunks = batch // 1024
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        for p in sae.parameters():
            p.grad = torch.randn_like(p)
        profile = {
            "encoder_product": per_call_seconds(lambda: torch.mm(centred[:1024], sae.W_enc).add_(sae.b_enc), repeats) * chunks,
            "top_k": per_call_seconds(lambda: top_k(pre, k), repeats) * chunks,
            "torch_topk_for_comparison": per_call_seconds(lambda: torch.topk(pre, k, dim=1, sorted=False), repeats) * chunks,
            "decode": per_call_seconds(lambda: sparse_decode(idx, vals, sae.W_dec), repeats),
            "value_gradients": per_call_seconds(lambda: sparse_dots(row_ptr, latents, error, sae.W_dec), repeats),
            "weight_gradients": per_call_seconds(
                lambda: sparse_outers(latents, d_sae, [rows, rows], [values, values], [error, centred]), repeats),
            "encoder_gradient_transpose": per_call_seconds(lambda: sae.W_dec.T.contiguous(), repeats),
            "adam_and_decoder_norm": per_call_seconds(lambda: (optimizer.step(), sae.after_step()), repeats),
        }
    return {"cpu": cpu_model(), "floor_encoder_product_ms": 1000 * floor, "naive_dense_topk_step_ms": 1000 * naive,
            "topk_step_ms": 1000 * results["topk"], "topk_auxk_step_ms": 1000 * results["topk_auxk"],
            "relu_step_ms": 1000 * results["relu"],
            "topk_step_over_floor": results["topk"] / floor, "topk_auxk_step_over_floor": results["topk_auxk"] / floor,
            "floor_tokens_per_s": batch / floor, "naive_topk_tokens_per_s": batch / naive,
            "topk_tokens_per_s": batch / results["topk"], "relu_tokens_per_s": batch / results["relu"],
            "topk_speedup_over_naive": naive / results["topk"],
            "topk_step_profile_ms": {part: 1000 * seconds for part, seconds in profile.items()}}


def bench_caching(run: Path, n_windows: int) -> dict[str, float]:
    from mechinterp.activations import cache_activations
    from mechinterp.sites import Site
    from mechinterp.model import load_model

    torch.set_num_threads(2)
    bridge = load_model(run / "model", "cpu")
    tokens = np.load(run / "tokens" / "tokens.npy", mmap_mode="r")[:n_windows]
    sites = [Site("resid", 4), Site("resid", 10), Site("resid", 16), Site("mlp", 10)]
    batch = 8
    with torch.no_grad():
        bridge(torch.from_numpy(np.asarray(tokens[:batch], dtype=np.int64)), stop_at_layer=17)  # warm-up
        start = time.perf_counter()
        for i in range(0, n_windows, batch):
            bridge(torch.from_numpy(np.asarray(tokens[i : i + batch], dtype=np.int64)), stop_at_layer=17)
        bare = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache_activations(bridge, tokens, sites, {s: Path(tmp) / f"{s.id}.npy" for s in sites}, "float16", batch, {})
        cached = time.perf_counter() - start
    n = tokens.size
    return {"cache_sites": [s.id for s in sites], "bare_forward_tokens_per_s": n / bare,
            "caching_tokens_per_s": n / cached, "caching_share_of_bare_forward": bare / cached}


def peak_memory(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`, sampling its resident memory; return the peaks in MiB."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_anon = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        except FileNotFoundError:
            break
        fields = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "RssAnon"))}
        peak_rss, peak_anon = max(peak_rss, fields.get("VmRSS", 0)), max(peak_anon, fields.get("RssAnon", 0))
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {process.stderr.read()[-2000:]}")
    return {"peak_rss_mib": peak_rss / 1024, "peak_anon_mib": peak_anon / 1024}


def bench_memory(run: Path, windows: tuple[int, int]) -> dict[str, dict]:
    """Caching and training on the first n windows, for two values of n; training runs the same steps."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokens = np.load(run / "tokens" / "tokens.npy")
        import polars as pl

        table = pl.read_parquet(run / "tokens" / "token_table.parquet")
        for n in windows:
            part = tmp / f"n{n}"
            part.mkdir()
            np.save(part / "tokens.npy", tokens[:n])
            table.filter(pl.col("sequence") < n).with_columns(pl.lit("train").alias("split")).write_parquet(
                part / "table.parquet")
            cache = peak_memory([sys.executable, "-m", "mechinterp.activations", "--model", str(run / "model"),
                                 "--tokens", str(part / "tokens.npy"), "--table", str(part / "table.parquet"),
                                 "--sites", "resid10", "--settings", '{"dtype": "float16", "batch_sequences": 8}',
                                 "--device", "cpu", "--threads", "2", "--out-dir", str(part / "acts")])
            spec = {"architecture": "topk", "d_sae": 4608, "k": 32, "l1_coefficient": 5, "l1_warmup_fraction": 0.02,
                    "lr": 1e-3, "batch_size": 4096, "training_tokens": 4096 * 20, "warmup_fraction": 0.02,
                    "decay_fraction": 0.2, "auxk_coefficient": 1 / 32, "auxk_k": 64, "dead_after_tokens": 10**9,
                    "outlier_norm_ratio": 10, "log_every": 5, "checkpoint_every": 1000}
            train = peak_memory([sys.executable, "-m", "mechinterp.train_sae", "--cache", str(part / "acts" / "resid10.npy"),
                                 "--table", str(part / "table.parquet"), "--spec", json.dumps(spec), "--seed", "0",
                                 "--threads", "2", "--checkpoint", str(part / "ckpt.pt"), "--device", "cpu",
                                 "--model-name", "m", "--dataset", "d", "--out", str(part / "sae")])
            out[f"{n * tokens.shape[1]}_tokens"] = {"caching": cache, "training": train}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "results" / "default", help="a finished run (model, tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cache-windows", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    report = {"threads": 2, **bench_steps(args.repeats), **bench_caching(args.run, args.cache_windows)}
    if not args.skip_memory:
        report["memory"] = bench_memory(args.run, (200, 800))
    out = REPO / "results" / "benchmarks" / "sae.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
