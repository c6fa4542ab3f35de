"""What every SAE architecture shares: parameters, decoding, initialisation from data, and the
on-disk format of SAELens (`cfg.json` + `sae_weights.safetensors`) so the ecosystem can load them.

An architecture is one module that subclasses `SparseAutoencoder` and provides `encode` and
`training_step` (which computes the loss and sets `.grad` on the parameters). Training works in a
normalised activation space (x * scale); `save` folds the scale into the weights, so a saved SAE
reads and writes raw activations, which is what SAELens expects."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechinterp.errors import UserError, rebuild_hint

SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout of SAELens 6.x
WEIGHTS_FILE, CONFIG_FILE = "sae_weights.safetensors", "cfg.json"


def geometric_median(points: torch.Tensor, iterations: int = 30, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


class SparseAutoencoder(torch.nn.Module):
    architecture: ClassVar[str]  # the name in this project's config
    saelens_architecture: ClassVar[str]  # the name in SAELens's cfg.json
    Settings: ClassVar[type]  # the architecture's settings dataclass; its fields are keys of config `sae`
    saelens_fields: ClassVar[dict[str, Any]] = {}  # fixed cfg.json entries SAELens reads for this architecture

    def __init__(self, d_in: int, settings: Any) -> None:
        super().__init__()
        self.settings = settings
        self.d_in, self.d_sae = d_in, settings.d_sae
        d_sae = settings.d_sae
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    # --- to implement per architecture ---
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [n, d_sae] of inputs [n, d_in]."""
        raise NotImplementedError

    def training_step(self, x: torch.Tensor, dead: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        """Compute the loss on batch `x`, set each parameter's .grad, and return metrics (incl. `active`
        [d_sae] bool, which latents fired). `dead` marks latents that have not fired for a while;
        `progress` in [0, 1] is the share of training done (for schedules such as L1 warm-up)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to keep decoder rows at unit norm)."""

    # --- shared ---
    @property
    def n_units(self) -> int:
        """Latents, under the name every dictionary of the polysemanticity stage shares."""
        return self.d_sae

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Random unit-norm decoder rows, encoder = decoder transposed, b_dec at the sample's
        geometric median (Gao et al. 2024)."""
        w_dec = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.copy_(geometric_median(sample))

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        """Turn an SAE trained on x * scale into one on raw x (the latents are unchanged)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def save(self, folder: str | Path, metadata: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Write SAELens's on-disk format into `folder`: cfg.json and sae_weights.safetensors. Callers
        write the folder under a temporary name (files.atomic_path) and rename it when complete."""
        cfg = {"architecture": self.saelens_architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", **asdict(self.settings), **self.saelens_fields,
               "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION,
                            "sae_lens_training_version": SAELENS_FORMAT_VERSION, **metadata},
               **(extra or {})}
        bad = non_finite(dict(self.named_parameters()))
        if bad:
            raise UserError(f"the trained SAE's {', '.join(bad)} hold NaN or infinite values: training diverged, and "
                            "nothing was saved. Lower its learning rate (sae.lr, or the site's lr in sae.sites).")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (an SAE with one scores NaN everywhere, silently)."""
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE saved by `save` (or any SAELens-format SAE of a known architecture)."""
    from mechinterp.saes import ARCHITECTURES

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a saved SAE (needs {CONFIG_FILE} and {WEIGHTS_FILE}). {rebuild_hint(folder)}")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / CONFIG_FILE} is not valid JSON ({err}). {rebuild_hint(folder)}") from err
    by_saelens_name = {cls.saelens_architecture: cls for cls in ARCHITECTURES.values()}
    if cfg.get("architecture") not in by_saelens_name:
        raise UserError(f"{folder}: SAE architecture {cfg.get('architecture')!r} is not one of {sorted(by_saelens_name)}.")
    cls = by_saelens_name[cfg["architecture"]]
    sae = cls(cfg["d_in"], cls.Settings(**{f.name: cfg[f.name] for f in fields(cls.Settings)}))
    try:
        sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    except (SafetensorError, RuntimeError, OSError) as err:  # truncated or corrupt file, or tensors of other shapes
        raise UserError(f"{folder / WEIGHTS_FILE} does not load ({type(err).__name__}: {err}). "
                        f"{rebuild_hint(folder)}") from err
    bad = non_finite(sae.state_dict())
    if bad:
        raise UserError(f"{folder / WEIGHTS_FILE}: {', '.join(bad)} hold NaN or infinite values. {rebuild_hint(folder)}")
    return sae.eval(), cfg
