"""TopK sparse autoencoder (Gao et al. 2024): z = ReLU(TopK(W_enc^T (x - b_dec) + b_enc)),
x_hat = W_dec^T z + b_dec, unit-norm decoder rows, and an auxiliary-k loss that revives dead latents.

Only k latents per token are non-zero, so the training step is written by hand to use that: the
encoder's forward product is the one dense matrix product; the decoder (an `embedding_bag` over the
k chosen rows) and every gradient touch only k latents per token."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mechinterp.saes.base import SparseAutoencoder


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * rows[idx[b, j]] for each b: [n, k] x [m, d] -> [n, d]."""
    return F.embedding_bag(idx, rows, per_sample_weights=vals, mode="sum")


def sparse_outer(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Z^T @ dense for the sparse Z [n, n_rows] with entries vals[b, j] at (b, idx[b, j]): [n_rows, d]."""
    n, k = idx.shape
    z_t = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), torch.arange(n).repeat_interleave(k)]), vals.reshape(-1), (n_rows, n), check_invariants=False
    )
    return torch.sparse.mm(z_t, dense)


def gathered_dot(idx: torch.Tensor, rows: torch.Tensor, dense: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """<rows[idx[b, j]], dense[b]> for every (b, j): [n, k], in chunks to bound the gathered memory."""
    out = torch.empty(idx.shape, dtype=dense.dtype)
    for start in range(0, idx.shape[0], chunk):
        part = idx[start : start + chunk]
        out[start : start + chunk] = torch.bmm(rows[part], dense[start : start + chunk, :, None]).squeeze(-1)
    return out


class TopKSAE(SparseAutoencoder):
    architecture: ClassVar[str] = "topk"
    saelens_architecture: ClassVar[str] = "topk"
    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, d_in: int, d_sae: int, k: int = 32, auxk_coefficient: float = 1 / 32,
                 auxk_k: int | None = None) -> None:
        super().__init__(d_in, d_sae)
        self.k, self.auxk_coefficient = k, auxk_coefficient
        self.auxk_k = auxk_k if auxk_k is not None else d_in // 2

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active latents per row: values [n, k] (>= 0) and indices [n, k]."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        return vals.clamp_min(0), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=x.dtype, device=x.device).scatter_(1, idx, vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return sparse_decode(idx, vals, self.W_dec) + self.b_dec

    @torch.no_grad()
    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        centred = x - self.b_dec
        pre = centred @ self.W_enc + self.b_enc  # the one dense product
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        vals = vals.clamp_min(0)
        x_hat = sparse_decode(idx, vals, self.W_dec) + self.b_dec
        error = x_hat - x
        mse = error.pow(2).sum(1).mean()
        d_x_hat = error * (2.0 / n)

        # Gradients of the reconstruction loss through the k active latents.
        g_vals = gathered_dot(idx, self.W_dec, d_x_hat) * (vals > 0)
        grad_W_dec = sparse_outer(idx, vals, d_x_hat, self.d_sae)
        grad_W_enc_t = sparse_outer(idx, g_vals, centred, self.d_sae)
        grad_b_enc = torch.zeros(self.d_sae).index_add_(0, idx.reshape(-1), g_vals.reshape(-1))
        grad_b_dec = d_x_hat.sum(0) - self.W_enc @ grad_b_enc

        auxk = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead > 0 and self.auxk_coefficient > 0:
            # Auxiliary-k loss: the top dead latents reconstruct the (fixed) residual error; its gradient
            # reaches their encoder columns and decoder rows, so they can come back to life.
            k_aux = min(self.auxk_k, n_dead)
            aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1, sorted=False)
            aux_vals = aux_vals.clamp_min(0)
            target = -error
            scale = target.sub(target.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
            aux_error = sparse_decode(aux_idx, aux_vals, self.W_dec) - target
            auxk = aux_error.pow(2).sum(1).mean() / scale
            d_aux = aux_error * (2.0 * self.auxk_coefficient / (n * scale))
            g_aux = gathered_dot(aux_idx, self.W_dec, d_aux) * (aux_vals > 0)
            grad_W_dec += sparse_outer(aux_idx, aux_vals, d_aux, self.d_sae)
            grad_W_enc_t += sparse_outer(aux_idx, g_aux, centred, self.d_sae)
            grad_b_enc_aux = torch.zeros(self.d_sae).index_add_(0, aux_idx.reshape(-1), g_aux.reshape(-1))
            grad_b_enc += grad_b_enc_aux
            grad_b_dec -= self.W_enc @ grad_b_enc_aux

        self.W_enc.grad, self.b_enc.grad = grad_W_enc_t.T.contiguous(), grad_b_enc
        self.W_dec.grad, self.b_dec.grad = grad_W_dec, grad_b_dec
        active = torch.zeros(self.d_sae, dtype=torch.bool)
        active[idx[vals > 0]] = True
        return {"mse": mse, "auxk": auxk, "l0": (vals > 0).sum(1).float().mean(), "active": active,
                "variance": x.sub(x.mean(0)).pow(2).sum(1).mean()}

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
