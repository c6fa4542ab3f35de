"""Sparse autoencoder architectures, one module each; add one by subclassing
`base.SparseAutoencoder` and registering it here."""

from mechinterp.saes.base import SparseAutoencoder, load_sae
from mechinterp.saes.relu import ReluSAE
from mechinterp.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {cls.architecture: cls for cls in (TopKSAE, ReluSAE)}

__all__ = ["ARCHITECTURES", "ReluSAE", "SparseAutoencoder", "TopKSAE", "load_sae"]
