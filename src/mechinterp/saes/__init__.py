"""Sparse autoencoder architectures, one module each; add one by subclassing
`base.SparseAutoencoder` and registering it here."""

from mechinterp.saes.base import SparseAutoencoder, load_sae
from mechinterp.saes.jumprelu import JumpReluSAE
from mechinterp.saes.relu import ReluSAE
from mechinterp.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {cls.architecture: cls for cls in (TopKSAE, ReluSAE, JumpReluSAE)}

__all__ = ["ARCHITECTURES", "JumpReluSAE", "ReluSAE", "SparseAutoencoder", "TopKSAE", "load_sae"]
