"""Evaluate a trained SAE on held-out tokens: reconstruction (MSE, FVU, L0, dead and dense latents,
per-latent density) from the activation cache, and the model's loss with the SAE spliced in at its
site against the clean model and against zero ablation.

The same tokens are left out as in training (BOS and attention-sink outliers, by the training
threshold): they are excluded from FVU and keep their clean activation when the SAE is spliced in
(and when the site is zero-ablated), and the metrics table says how many there were."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache, Site
from mechinterp.saes import SparseAutoencoder

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, cache: ActivationCache, rows: np.ndarray,
                           outlier_threshold: float = float("inf"), chunk: int = 4096) -> tuple[dict[str, float], np.ndarray]:
    """One streaming pass over `rows`: tokens with norm above `outlier_threshold` are counted and
    left out; on the rest, MSE, FVU = SSE / total variance, mean L0 and each latent's density.
    Runs on the SAE's device."""
    device = sae.W_enc.device
    n, n_outliers, sse, l0, sum_sq = 0, 0, 0.0, 0.0, 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fires = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    for _, x in tqdm(cache.chunks(rows, chunk), desc="reconstruction", unit="chunk", total=-(-len(rows) // chunk)):
        x = x.to(device)
        kept = x.norm(dim=1) <= outlier_threshold
        n_outliers += int((~kept).sum())
        x = x[kept]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += float((x_hat - x).double().pow(2).sum())
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        active = z > 0
        l0 += float(active.sum())
        fires += active.sum(0)
        n += len(x)
    variance = sum_sq - float(sum_x.pow(2).sum()) / n
    density = (fires.double() / n).cpu().numpy()
    return {"n_eval_tokens": n, "n_excluded_outliers": n_outliers, "mse": sse / n, "fvu": sse / variance,
            "l0": l0 / n, "dead_fraction": float((density == 0).mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).mean())}, density


def splice_hook(edit: Callable[[torch.Tensor], torch.Tensor], outlier_threshold: float):
    """A hook that replaces the site's activation by `edit(activation)` at every position except BOS
    and norm outliers, which keep their clean value."""

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:
        flat = acts.reshape(-1, acts.shape[-1]).float()
        keep = flat.norm(dim=1) > outlier_threshold
        keep.view(acts.shape[:-1])[:, 0] = True
        edited = torch.where(keep[:, None], flat, edit(flat))
        return edited.reshape(acts.shape).to(acts.dtype)

    return hook


@torch.no_grad()
def loss_metrics(bridge, sae: SparseAutoencoder, site: Site, windows: np.ndarray, outlier_threshold: float,
                 batch_sequences: int) -> dict[str, float]:
    """Next-token cross-entropy (nats/token) clean, with the SAE spliced in, and with the site
    zero-ablated; CE loss recovered; and KL(clean || spliced) per token. The SAE must sit on the
    model's device."""
    spliced = [(site.hook_name, splice_hook(sae, outlier_threshold))]
    zeroed = [(site.hook_name, splice_hook(torch.zeros_like, outlier_threshold))]
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0}
    n_predictions = 0
    for start in tqdm(range(0, len(windows), batch_sequences), desc="spliced loss", unit="batch"):
        tokens = torch.from_numpy(np.asarray(windows[start : start + batch_sequences], dtype=np.int64)).to(bridge.cfg.device)
        targets = tokens[:, 1:]
        clean = bridge(tokens)[:, :-1].float().log_softmax(-1)
        with_sae = bridge.run_with_hooks(tokens, fwd_hooks=spliced)[:, :-1].float().log_softmax(-1)
        zero = bridge.run_with_hooks(tokens, fwd_hooks=zeroed)[:, :-1].float().log_softmax(-1)
        for name, lp in (("ce_clean", clean), ("ce_sae", with_sae), ("ce_zero", zero)):
            totals[name] -= float(lp.gather(-1, targets[..., None]).sum())
        totals["kl_sae"] += float((clean.exp() * (clean - with_sae)).sum())
        n_predictions += targets.numel()
    out = {name: value / n_predictions for name, value in totals.items()}
    out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["ce_increase"] = out["ce_sae"] - out["ce_clean"]
    out["n_loss_tokens"] = n_predictions
    return out
