"""TopK sparse autoencoder (Gao et al. 2024): z = ReLU(TopK(W_enc^T (x - b_dec) + b_enc)),
x_hat = W_dec^T z + b_dec, unit-norm decoder rows, and an auxiliary-k loss that revives dead latents.

Only k latents per token are non-zero, so the training step is written by hand to use that: the
encoder's forward product is the one dense matrix product; the decoder (an `embedding_bag` over the
k chosen rows) and every gradient touch only k latents per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
        torch.stack([idx.reshape(-1), torch.arange(n, device=idx.device).repeat_interleave(k)]), vals.reshape(-1), (n_rows, n), check_invariants=False
    )
    return torch.sparse.mm(z_t, dense)


@dataclass(frozen=True)
class TopKSettings:
    """A TopK SAE's settings: keys of the config's `sae` section (defaults in the schema)."""

    d_sae: int
    """number of latents"""
    k: int
    """active latents per token"""
    auxk_coefficient: float
    """weight of the auxiliary-k loss on dead latents (Gao et al. suggest 1/32)"""
    auxk_k: int
    """dead latents that reconstruct the residual error in the auxiliary-k loss"""


class TopKSAE(SparseAutoencoder):
    """TopK SAE on activations [n, d_in].

    >>> sae = TopKSAE(576, TopKSettings(d_sae=4608, k=32, auxk_coefficient=1 / 32, auxk_k=64))
    >>> sae.encode(torch.randn(8, 576)).shape
    torch.Size([8, 4608])
    """

    architecture: ClassVar[str] = "topk"
    saelens_architecture: ClassVar[str] = "topk"
    Settings: ClassVar[type] = TopKSettings
    saelens_fields: ClassVar[dict] = {"rescale_acts_by_decoder_norm": False}
    settings: TopKSettings

    @property
    def k(self) -> int:
        return self.settings.k

    @torch.no_grad()
    def _top_latents(self, centred: torch.Tensor, dead: torch.Tensor | None = None,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Top-k pre-activations (and the top dead ones, if `dead` is given) of `centred` = x - b_dec.
        Computed in row chunks so each chunk's pre-activations stay in cache for the top-k that follows
        (faster than one large product followed by one large top-k)."""
        n = centred.shape[0]
        vals = torch.empty(n, self.k, device=centred.device)
        idx = torch.empty(n, self.k, dtype=torch.long, device=centred.device)
        dead_ids = dead.nonzero().squeeze(1) if dead is not None else None
        k_aux = min(self.settings.auxk_k, len(dead_ids)) if dead_ids is not None else 0
        aux_vals = torch.empty(n, k_aux, device=centred.device)
        aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=centred.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            pre = torch.addmm(self.b_enc, centred[rows], self.W_enc)
            torch.topk(pre, self.k, dim=1, sorted=False, out=(vals[rows], idx[rows]))
            if k_aux:
                torch.topk(pre.index_select(1, dead_ids), k_aux, dim=1, sorted=False, out=(aux_vals[rows], aux_idx[rows]))
        if not k_aux:
            return vals.clamp_min_(0), idx, None, None
        return vals.clamp_min_(0), idx, aux_vals.clamp_min_(0), dead_ids[aux_idx]

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active latents per row: values [n, k] (>= 0) and indices [n, k]."""
        vals, idx, _, _ = self._top_latents(x - self.b_dec)
        return vals, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=x.dtype, device=x.device).scatter_(1, idx, vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return sparse_decode(idx, vals, self.W_dec) + self.b_dec

    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            centred = x - self.b_dec
            use_aux = bool(dead.any()) and self.settings.auxk_coefficient > 0
            vals, idx, aux_vals, aux_idx = self._top_latents(centred, dead if use_aux else None)
            latents = [(idx, vals)] + ([(aux_idx, aux_vals)] if use_aux else [])
        # Decoder side through autograd: embedding_bag's backward gives the decoder gradient and the
        # gradient of each active latent's value while touching only the k chosen rows.
        with torch.enable_grad():
            weights = [v.clone().requires_grad_() for _, v in latents]
            x_hat = sparse_decode(idx, weights[0], self.W_dec) + self.b_dec
            mse = (x_hat - x).pow(2).sum(1).mean()
            loss, auxk = mse, torch.zeros(())
            if len(latents) > 1:
                # Auxiliary-k loss (Gao et al. 2024): dead latents reconstruct the fixed residual error.
                target = (x - x_hat).detach()
                scale = target.sub(target.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
                auxk = (sparse_decode(latents[1][0], weights[1], self.W_dec) - target).pow(2).sum(1).mean() / scale
                loss = loss + self.settings.auxk_coefficient * auxk
            loss.backward()
        # Encoder side by hand: its gradient is non-zero only in the columns of active latents.
        with torch.no_grad():
            grad_enc_t = torch.zeros(self.d_sae, self.d_in, device=x.device)
            grad_b_enc = torch.zeros(self.d_sae, device=x.device)
            for (ids, v), w in zip(latents, weights):
                g_pre = w.grad * (v > 0)
                grad_enc_t += sparse_outer(ids, g_pre, centred, self.d_sae)
                grad_b_enc.index_add_(0, ids.reshape(-1), g_pre.reshape(-1))
            self.W_enc.grad, self.b_enc.grad = grad_enc_t.T.contiguous(), grad_b_enc
            self.b_dec.grad -= self.W_enc @ grad_b_enc  # b_dec is also subtracted from the encoder's input
            active = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
            active[idx[vals > 0]] = True
            return {"mse": mse.detach(), "auxk": auxk.detach(), "l0": (vals > 0).sum(1).float().mean(),
                    "active": active, "variance": x.sub(x.mean(0)).pow(2).sum(1).mean()}

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
