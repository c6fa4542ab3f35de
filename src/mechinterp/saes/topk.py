"""TopK sparse autoencoder (Gao et al. 2024): z = ReLU(TopK(W_enc^T (x - b_dec) + b_enc)),
x_hat = W_dec^T z + b_dec, unit-norm decoder rows, and an auxiliary-k loss that revives dead latents.

Only k latents per token are non-zero, so the training step is written by hand to use that: the
encoder's forward product is the one dense matrix product; the decoder (an `embedding_bag` over the
k chosen rows) and every gradient (sparse products with the CSR matrix of the k values per row)
touch only k latents per token."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mechinterp.saes.base import SparseAutoencoder


def top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(pre, k, dim=1, sorted=False) of pre [n, m], exactly (up to ties), with fewer
    comparisons. Each row is cut into groups of g columns (strided m // g apart); at most k groups
    reach the row's k-th largest value, so the k largest entries lie in the k groups of largest
    maximum: one top-k over the m // g group maxima, then one over those k groups' k * g entries.

    >>> pre = torch.randn(5, 4608)
    >>> vals, idx = top_k(pre, 32)
    >>> torch.equal(idx.sort(1).values, pre.topk(32, dim=1).indices.sort(1).values)
    True
    """
    n, m = pre.shape
    # g near sqrt(m / k) balances the two top-k's; it must divide m and leave at least k groups
    divisors = [g for g in range(1, m // k + 1) if m % g == 0 and m // g >= k]
    g = min(divisors, key=lambda d: abs(d - (m / k) ** 0.5))
    if g == 1:
        return torch.topk(pre, k, dim=1, sorted=False)
    stride = m // g
    top_groups = pre.view(n, g, stride).amax(1).topk(k, dim=1, sorted=False).indices  # [n, k]
    columns = (top_groups[:, :, None] + torch.arange(0, m, stride, device=pre.device)).view(n, k * g)
    vals, picked = pre.gather(1, columns).topk(k, dim=1, sorted=False)
    return vals, columns.gather(1, picked)


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * rows[idx[b, j]] for each b: [n, k] x [m, d] -> [n, d]."""
    return F.embedding_bag(idx, rows, per_sample_weights=vals, mode="sum")


def csr(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from its parts (unchecked: callers build them valid)."""
    with warnings.catch_warnings():  # torch calls CSR tensors beta; the products used here are not
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(row_ptr, cols, values, shape, check_invariants=False)


def sparse_dots(row_ptr: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dense[r] . rows[cols[e]] for each entry e of row r of the CSR pattern (row_ptr, cols): the
    entries of dense @ rows^T [R, m] that the pattern keeps, computed alone. [R, d] x [m, d] -> [nnz]."""
    pattern = csr(row_ptr, cols, torch.zeros(len(cols), dtype=dense.dtype, device=dense.device),
                  (dense.shape[0], rows.shape[0]))
    return torch.sparse.sampled_addmm(pattern, dense, rows.T, beta=0.0).values()


def sparse_outers(cols: torch.Tensor, n_cols: int, row_ids: list[torch.Tensor], values: list[torch.Tensor],
                  dense: list[torch.Tensor]) -> list[torch.Tensor]:
    """Z_i^T @ dense_i [n_cols, d] for sparse Z_i [len(dense_i), n_cols] with entries values_i[e] at
    (row_ids_i[e], cols[e]). They share their columns, so Z^T is built as CSR directly with the entries
    sorted by column once for all of them (cheaper than transposing each Z)."""
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(n_cols + 1, dtype=torch.long, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=n_cols), 0, out=crow[1:])
    return [csr(crow, r[order], v[order], (n_cols, x.shape[0])) @ x for r, v, x in zip(row_ids, values, dense, strict=True)]


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
        k_aux = min(self.settings.auxk_k, int(dead.sum())) if dead is not None else 0
        aux_vals = torch.empty(n, k_aux, device=centred.device)
        aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=centred.device)
        if k_aux:  # added to the pre-activations, it leaves only the dead latents to choose from
            only_dead = torch.zeros(self.d_sae, device=centred.device).masked_fill_(~dead, float("-inf"))
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            pre = torch.mm(centred[rows], self.W_enc).add_(self.b_enc)  # addmm would copy b_enc in first
            vals[rows], idx[rows] = top_k(pre, self.k)
            if k_aux:
                aux_vals[rows], aux_idx[rows] = top_k(pre.add_(only_dead), k_aux)
        if not k_aux:
            return vals.clamp_min_(0), idx, None, None
        return vals.clamp_min_(0), idx, aux_vals.clamp_min_(0), aux_idx

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

    @torch.no_grad()
    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        # Every gradient by hand: each is non-zero only at the k active latents of a row, and each
        # product below touches only those.
        n = x.shape[0]
        centred = x - self.b_dec
        use_aux = bool(dead.any()) and self.settings.auxk_coefficient > 0
        vals, idx, aux_vals, aux_idx = self._top_latents(centred, dead if use_aux else None)
        error = sparse_decode(idx, vals, self.W_dec).add_(self.b_dec).sub_(x)  # x_hat - x
        mse = torch.dot(error.view(-1), error.view(-1)) / n
        d_x_hat = error * (2 / n)  # d mse / d x_hat
        # (latents, their values, d loss / d their decoded sum) of each term of the loss
        terms = [(idx, vals, d_x_hat)]
        auxk = torch.zeros((), device=x.device)
        if use_aux:
            # Auxiliary-k loss (Gao et al. 2024): dead latents reconstruct the fixed residual error.
            target = -error
            scale = target.sub(target.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
            aux_error = sparse_decode(aux_idx, aux_vals, self.W_dec) - target
            auxk = aux_error.pow(2).sum(1).mean() / scale
            terms.append((aux_idx, aux_vals, aux_error * (2 * self.settings.auxk_coefficient / (n * scale))))
        # The terms' latents as one sparse matrix [T * n, d_sae]: term t's row b is row t * n + b, so each
        # product below is one call for all terms.
        latents = torch.cat([ids.reshape(-1) for ids, _, _ in terms])
        values = torch.cat([v.reshape(-1) for _, v, _ in terms])
        d_out = torch.cat([d for _, _, d in terms])
        per_row = torch.cat([torch.full((n,), ids.shape[1], device=x.device) for ids, _, _ in terms])
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), per_row.cumsum(0)])
        rows = torch.arange(len(per_row), device=x.device).repeat_interleave(per_row)
        g_pre = sparse_dots(row_ptr, latents, d_out, self.W_dec) * (values > 0)  # d loss / d active pre-activations
        grad_dec, grad_enc_t = sparse_outers(latents, self.d_sae, [rows, rows % n], [values, g_pre], [d_out, centred])
        grad_b_enc = torch.zeros(self.d_sae, device=x.device).index_add_(0, latents, g_pre)
        self.W_dec.grad, self.W_enc.grad, self.b_enc.grad = grad_dec, grad_enc_t.T.contiguous(), grad_b_enc
        self.b_dec.grad = d_x_hat.sum(0) - self.W_enc @ grad_b_enc  # b_dec is also subtracted from the input
        active = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        active[idx[vals > 0]] = True
        return {"mse": mse, "auxk": auxk, "l0": (vals > 0).sum(1).float().mean(), "active": active}

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
