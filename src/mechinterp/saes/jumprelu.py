"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024; the architecture of Gemma Scope):
z_j = pre_j if pre_j > threshold_j else 0, with pre = W_enc^T (x - b_dec) + b_enc.

Loaded, not trained, here: a pretrained SAE (`pretrained` in an entry of the config's `sae.sites`,
stage `load_sae`) such as Gemma Scope's; the config refuses `architecture: jumprelu` without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mechinterp.errors import UserError
from mechinterp.saes.base import SparseAutoencoder


@dataclass(frozen=True)
class JumpReluSettings:
    """A JumpReLU SAE's settings: keys of the config's `sae` section."""

    d_sae: int
    """number of latents"""


class JumpReluSAE(SparseAutoencoder):
    """JumpReLU SAE on activations [n, d_in], with a per-latent threshold [d_sae].

    >>> sae = JumpReluSAE(2304, JumpReluSettings(d_sae=16384))
    >>> sae.encode(torch.randn(8, 2304)).shape
    torch.Size([8, 16384])
    """

    architecture: ClassVar[str] = "jumprelu"
    saelens_architecture: ClassVar[str] = "jumprelu"
    Settings: ClassVar[type] = JumpReluSettings
    settings: JumpReluSettings

    def __init__(self, d_in: int, settings: JumpReluSettings) -> None:
        super().__init__(d_in, settings)
        # saved with the weights (SAELens's tensor name), never trained here
        self.threshold = torch.nn.Parameter(torch.zeros(settings.d_sae), requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold)

    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        raise UserError("JumpReLU SAEs are loaded (`pretrained` in an entry of sae.sites), not trained by this "
                        "workflow; train a topk or relu SAE instead.")
