"""ReLU sparse autoencoder with an L1 penalty weighted by decoder-row norms (Anthropic 2023):
z = ReLU(W_enc^T (x - b_dec) + b_enc), loss = ||x - x_hat||^2 + lambda * sum_j z_j ||W_dec[j]||.
Dense by nature (any latent may fire), so it trains through autograd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mechinterp.saes.base import SparseAutoencoder


@dataclass(frozen=True)
class ReluSettings:
    """A ReLU SAE's settings: keys of the config's `sae` section (defaults in the schema)."""

    d_sae: int
    """number of latents"""
    l1_coefficient: float
    """weight of the decoder-norm-weighted L1 penalty"""
    l1_warmup_fraction: float
    """share of training over which the L1 penalty ramps up from zero"""


class ReluSAE(SparseAutoencoder):
    """ReLU + L1 SAE on activations [n, d_in].

    >>> sae = ReluSAE(576, ReluSettings(d_sae=1536, l1_coefficient=5.0, l1_warmup_fraction=0.02))
    >>> sae(torch.randn(8, 576)).shape
    torch.Size([8, 576])
    """

    architecture: ClassVar[str] = "relu"
    saelens_architecture: ClassVar[str] = "standard"
    Settings: ClassVar[type] = ReluSettings
    settings: ReluSettings

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            z = self.encode(x)
            x_hat = self.decode(z)
            mse = (x_hat - x).pow(2).sum(1).mean()
            l1 = (z * self.W_dec.norm(dim=1)).sum(1).mean()
            # the penalty ramps up over the first steps so latents can settle before they are pushed to zero
            warmup = self.settings.l1_warmup_fraction
            ramp = min(1.0, progress / warmup) if warmup > 0 else 1.0
            (mse + ramp * self.settings.l1_coefficient * l1).backward()
        with torch.no_grad():
            active = (z > 0).any(0)
            return {"mse": mse.detach(), "l1": l1.detach(), "l0": (z > 0).sum(1).float().mean(), "active": active}
