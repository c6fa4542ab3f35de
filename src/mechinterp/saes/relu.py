"""ReLU sparse autoencoder with an L1 penalty weighted by decoder-row norms (Anthropic 2023):
z = ReLU(W_enc^T (x - b_dec) + b_enc), loss = ||x - x_hat||^2 + lambda * sum_j z_j ||W_dec[j]||.
Dense by nature (any latent may fire), so it trains through autograd."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mechinterp.saes.base import SparseAutoencoder


class ReluSAE(SparseAutoencoder):
    architecture: ClassVar[str] = "relu"
    saelens_architecture: ClassVar[str] = "standard"
    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, l1_warmup_fraction: float = 0.05) -> None:
        super().__init__(d_in, d_sae)
        self.l1_coefficient, self.l1_warmup_fraction = l1_coefficient, l1_warmup_fraction

    @classmethod
    def from_settings(cls, d_in: int, settings: dict[str, Any]) -> ReluSAE:
        return cls(d_in, settings["d_sae"], l1_coefficient=settings["l1_coefficient"],
                   l1_warmup_fraction=settings["warmup_fraction"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            z = self.encode(x)
            x_hat = self.decode(z)
            mse = (x_hat - x).pow(2).sum(1).mean()
            l1 = (z * self.W_dec.norm(dim=1)).sum(1).mean()
            # the penalty ramps up over the first steps so latents can settle before they are pushed to zero
            ramp = min(1.0, progress / self.l1_warmup_fraction) if self.l1_warmup_fraction > 0 else 1.0
            (mse + ramp * self.l1_coefficient * l1).backward()
        with torch.no_grad():
            active = (z > 0).any(0)
            return {"mse": mse.detach(), "l1": l1.detach(), "l0": (z > 0).sum(1).float().mean(), "active": active,
                    "variance": x.sub(x.mean(0)).pow(2).sum(1).mean()}
