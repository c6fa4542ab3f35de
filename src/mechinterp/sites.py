"""Where in the model activations are read and edited: a `Site` is a kind (`resid`, the residual
stream after a block; `mlp`, the MLP's hidden activations, its "neurons") and a layer.

It is parsed once from the config (`Site.parse("resid12")` or `Site(kind, layer)`) and travels as
this type; its string form `site.id` ("resid12") is what file names, wildcards and tables carry.

>>> site = Site.parse("mlp10")
>>> site.hook_name, site.id
('blocks.10.mlp.hook_post', 'mlp10')
"""

from __future__ import annotations

from dataclasses import dataclass

from mechinterp.errors import UserError

SITE_HOOKS = {"resid": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.mlp.hook_post"}


@dataclass(frozen=True, order=True)
class Site:
    """One cached site: `kind` is a key of SITE_HOOKS, `layer` a block index."""

    kind: str
    layer: int

    @property
    def hook_name(self) -> str:
        """The transformer-lens hook whose output is this site's activation [batch, pos, width]."""
        return SITE_HOOKS[self.kind].format(layer=self.layer)

    @property
    def id(self) -> str:
        return f"{self.kind}{self.layer}"

    @classmethod
    def parse(cls, site_id: str) -> Site:
        for kind in SITE_HOOKS:
            if site_id.startswith(kind) and site_id[len(kind):].isdigit():
                return cls(kind, int(site_id[len(kind):]))
        raise UserError(f"{site_id!r} is not a site id; use resid<layer> or mlp<layer>, e.g. resid12.")

    def width(self, cfg) -> int:
        """Activation width at this site for a model config (d_model or d_mlp)."""
        return cfg.d_model if self.kind == "resid" else cfg.d_mlp


def check_layers(n_layers: int, sites: list[Site], config_key: str) -> None:
    """Refuse sites whose layer a model of `n_layers` blocks does not have."""
    for site in sites:
        if not 0 <= site.layer < n_layers:
            raise UserError(f"{config_key}: layer {site.layer} ({site.id}) does not exist; the model has layers "
                            f"0..{n_layers - 1}. Fix the layer in {config_key}.")
