"""Check that SAELens loads this workflow's SAEs and computes what this package computes.

SAELens pins an older transformer-lens than the workflow, so it lives in its own environment;
scripts/check_saelens.sh makes that environment and runs the two halves of this script:

    export RUN OUT   (workflow env)  each SAE's reconstruction of 256 cached activations -> OUT/<sae>.npz
    compare RUN OUT  (SAELens env)   SAE.load_from_disk on each SAE folder, same inputs, compare
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def export(run: Path, out: Path) -> None:
    import torch

    from mechinterp.activations import ActivationCache
    from mechinterp.saes import load_sae

    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted((run / "saes").iterdir()):
        sae, cfg = load_sae(folder)
        site = folder.name.split("-")[0]
        cache = ActivationCache.open(run / "activations" / f"{site}.npy")
        rows = np.sort(np.random.default_rng(0).choice(len(cache.array), 256, replace=False))
        x = cache.rows(rows)
        with torch.no_grad():
            np.savez(out / f"{folder.name}.npz", x=x.numpy(), reconstruction=sae(x).numpy(),
                     active=(sae.encode(x) > 0).numpy())


def compare(run: Path, out: Path) -> int:
    import torch
    from sae_lens import SAE

    failures = 0
    for saved in sorted(out.glob("*.npz")):
        data = np.load(saved)
        sae = SAE.load_from_disk(str(run / "saes" / saved.stem), device="cpu")
        with torch.no_grad():
            x = torch.from_numpy(data["x"])
            theirs = sae(x).numpy()
            active = (sae.encode(x) > 0).numpy()
        diff = float(np.abs(theirs - data["reconstruction"]).max() / np.abs(data["reconstruction"]).max())
        same_latents = float((active == data["active"]).mean())
        ok = diff < 1e-4 and same_latents > 0.999
        failures += not ok
        print(f"{saved.stem:16s} {type(sae).__name__:12s} hook {sae.cfg.metadata.hook_name:28s} "
              f"max rel. diff {diff:.1e}  same active latents {same_latents:.4f}  {'ok' if ok else 'MISMATCH'}")
    return failures


if __name__ == "__main__":
    mode, run, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "export":
        export(run, out)
    else:
        sys.exit(1 if compare(run, out) else 0)
