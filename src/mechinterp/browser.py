"""Feature browser: a static HTML site for every SAE and the neurons of its site, in one layout.

Two entry points, one per rule:
- `python -m mechinterp.browser sae` (rule `browser_sae`, one job per SAE) writes `browser/<sae>/`: the
  index table of its live features and of its site's neurons (or residual dimensions), and for each unit
  its activation histogram, top contexts with every token's activation, samples from its activation
  quantiles, the tokens its write direction promotes and suppresses through the unembedding, its scores,
  its clamping selection scores and results; and for each scored window the features firing on each
  token. Everything is read from the polysemanticity stage (its top contexts and `SparseCodes`: the
  cache is not encoded again; a neuron's activation is the cache itself) and the clamping tables.
- `python -m mechinterp.browser site` (rule `browser`) copies the page, its script and CSS (workflow/browser/), writes
  the text of the scored windows (`corpus.js`) and the list of SAEs (`site.js`).

Data files are JavaScript, `MI.put("<key>", <JSON>)`, loaded by <script> tags: the site opens from
file:// with no server (browsers refuse fetch() of local files). A JSON string cannot leave its
literal, and it is written ASCII-only, so no charset guess changes it; the pages put every string into
the DOM as text (text nodes, never innerHTML): a document containing markup is shown, not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache
from mechinterp.clamping import load_parts
from mechinterp.clamping_stats import BASELINES, mean_effects, unit_label
from mechinterp.crosscoder import Layout, StackedCache, load_crosscoder, open_stacked
from mechinterp.errors import UserError, run_stage
from mechinterp.evaluate_sae import DENSE_THRESHOLD
from mechinterp.files import atomic_path
from mechinterp.model import resolve_device, vocabulary_strings
from mechinterp.polysemanticity import SparseCodes, example_units
from mechinterp.saes import load_sae
from mechinterp.sites import Site
from mechinterp.tokens import split_rows

log = logging.getLogger(__name__)
LOGIT_BINS = 16  # bins of the histogram of a unit's logit effects: its shape is what it shows
ALIGNED_FEATURES = 3  # the features listed per unit whose decoder direction is closest to the unit's
PROMPT_WINDOWS_PER_FILE = 16  # the prompt view's data files: 16 windows of every token's strongest features
SCORES = ("density", "density_positive", "n_active", "max_activation", "effective_tokens", "token_focus", "monosemanticity",
          "best_concept", "concept_specificity", "concept_share", "concept_base_rate")


@dataclass(frozen=True)
class BrowserSettings:
    """The config's `browser` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    quantiles: int
    """activation quantile groups (of equal token count) sampled on each unit's page"""
    samples_per_quantile: int
    """contexts shown per quantile group"""
    logit_tokens: int
    """promoted and suppressed tokens listed per unit"""
    histogram_bins: int
    """bins of the activation histogram, from 0 to the unit's maximum"""
    units_per_file: int
    """units per data file (a page loads only its unit's file)"""
    prompt_features: int
    """strongest features listed per token in the prompt view"""


# --- activations of a dictionary on the scored rows ----------------------------------------------

def cached_codes(cache: ActivationCache, rows: np.ndarray, chunk: int = 4096) -> SparseCodes:
    """`SparseCodes` of the cached activations themselves on `rows` (their positive part: a neuron's
    unit, as in the polysemanticity stage), read chunk by chunk from the memory-mapped cache."""
    return SparseCodes.concat([SparseCodes.from_dense(cache.rows(rows[i : i + chunk]))
                               for i in range(0, len(rows), chunk)])


def row_of_entry(codes: SparseCodes) -> np.ndarray:
    """[nnz] the scored-row position of each stored activation."""
    return np.repeat(np.arange(len(codes.indptr) - 1), np.diff(codes.indptr))


@dataclass
class Lookup:
    """A dictionary's activation at any (scored-row position, unit) pair, from its `SparseCodes`.

    Example: for codes of [[0, 2], [3, 0]], Lookup.of(codes, 2)(np.array([0, 1, 1]), np.array([1, 0, 1]))
    is [2, 3, 0] (0 where the unit is not positive)."""

    keys: np.ndarray  # [nnz] position * n_units + unit, ascending (CSR rows with sorted units)
    values: np.ndarray  # [nnz]
    n_units: int

    @classmethod
    def of(cls, codes: SparseCodes, n_units: int) -> Lookup:
        keys = row_of_entry(codes) * n_units + np.asarray(codes.indices, np.int64)
        return cls(keys, np.asarray(codes.values), n_units)

    def __call__(self, positions: np.ndarray, units: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(positions))
        query = np.asarray(positions, np.int64) * self.n_units + np.asarray(units, np.int64)
        found = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[found] == query, self.values[found], 0.0)


def unit_columns(codes: SparseCodes, n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes by unit (CSC): unit u's scored-row positions are `positions[ptr[u]:ptr[u + 1]]` with
    activations `values[...]`. Returns (ptr [n_units + 1], positions, values)."""
    order = np.argsort(codes.indices, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(codes.indices, minlength=n_units))])
    return ptr, row_of_entry(codes)[order], np.asarray(codes.values)[order]


def histogram(values: np.ndarray, bins: int) -> dict[str, object]:
    """Counts of a unit's positive activations in `bins` equal bins from 0 to its maximum."""
    top = float(values.max()) if len(values) else 0.0
    counts = np.histogram(values, bins=bins, range=(0.0, top or 1.0))[0]
    return {"max": top, "counts": counts.tolist()}


def quantile_samples(positions: np.ndarray, values: np.ndarray, groups: int, per_group: int, exclude: set[int],
                     rng: np.random.Generator) -> list[tuple[float, float, list[int]]]:
    """Samples from `groups` activation quantiles of one unit (groups of equal count of its positive
    activations, highest first): per group its lowest and highest activation and up to `per_group`
    positions drawn without replacement, leaving out `exclude` (the top contexts already shown)."""
    order = np.argsort(-values, kind="stable")
    shown = np.isin(positions, list(exclude))
    out = []
    for part in np.array_split(order, min(groups, len(order))) if len(order) else []:
        pool = positions[part][~shown[part]]
        chosen = rng.choice(len(pool), size=min(per_group, len(pool)), replace=False) if len(pool) else []
        out.append((float(values[part].min()), float(values[part].max()), sorted(int(pool[i]) for i in chosen)))
    return out


# --- text windows ---------------------------------------------------------------------------------

@dataclass
class Windows:
    """Where each scored row's context window lies in the token table."""

    rows: np.ndarray  # [scored] token-table row of each scored position
    position_of: np.ndarray  # [table rows] scored position of each token-table row, -1 when not scored
    sequence: np.ndarray  # [table rows]
    position: np.ndarray  # [table rows] position in its window
    before: int
    after: int

    @classmethod
    def of(cls, rows: np.ndarray, table: pl.DataFrame, before: int, after: int) -> Windows:
        position_of = np.full(table.height, -1, dtype=np.int64)
        position_of[rows] = np.arange(len(rows))
        return cls(rows, position_of, table["sequence"].to_numpy(), table["position"].to_numpy(), before, after)

    def span(self, row: int) -> tuple[int, int]:
        """Token-table rows [first, stop) of the context of `row`: `before` tokens before it and `after`
        after it, within its own window (the same span as the polysemanticity stage's context text)."""
        first = row - min(self.before, int(self.position[row]))
        stop = row + 1
        while stop < len(self.sequence) and stop <= row + self.after and self.sequence[stop] == self.sequence[row]:
            stop += 1
        return first, stop

    def contexts(self, lookup: Lookup, unit: int, rows: list[int]) -> list[list]:
        """Contexts of a unit, compact: per row [row, activations], the unit's activation on every token
        of `span(row)` (None on tokens not scored: BOS, attention sinks, other splits). The pages find
        the span's first row by the same rule, max(first row of the window, row - before)."""
        spans = [np.arange(*self.span(row)) for row in rows]
        if not spans:
            return []
        where = self.position_of[np.concatenate(spans)]
        acts = lookup(np.maximum(where, 0), np.full(len(where), unit)).tolist()
        shown = [round_value(a) if p >= 0 else None for a, p in zip(acts, where, strict=True)]
        ends = np.cumsum([len(span) for span in spans]).tolist()
        return [[row, shown[end - len(span) : end]] for row, span, end in zip(rows, spans, ends, strict=True)]


def round_value(value: float) -> float | int:
    """Three significant digits (enough for colour and hover, a third of the bytes of a float's
    repr), and a plain 0 for zero: most tokens of a feature's context."""
    return float(f"{value:.3g}") if value else 0


# --- direct logit effects ---------------------------------------------------------------------------

@dataclass
class LogitEffects:
    """What `logit_effects` returns, each row one unit."""

    promoted_ids: torch.Tensor  # [U, k] the most promoted tokens, descending
    promoted: torch.Tensor  # [U, k]
    suppressed_ids: torch.Tensor  # [U, k] the most suppressed, ascending
    suppressed: torch.Tensor  # [U, k]
    counts: torch.Tensor  # [U, bins] histogram of the logit effects over the whole vocabulary
    low: torch.Tensor  # [U] its range: the smallest and largest effect
    high: torch.Tensor  # [U]


@torch.no_grad()
def logit_effects(directions: torch.Tensor, norm_weight: torch.Tensor | None, centre: bool, unembed: torch.Tensor,
                  k: int, bins: int, chunk: int = 512) -> LogitEffects:
    """The direct logit effect of each write direction [U, d_model] (in the residual stream): its
    logits through the final norm's scale and the unembedding [vocab, d_model], the norm's 1/rms
    factor left out (it is positive and shared by all tokens, so the ranking is the norm's). For a
    LayerNorm the direction is centred first. The `k` most promoted and suppressed tokens, and the
    histogram of every token's effect in `bins` equal bins."""
    if centre:
        directions = directions - directions.mean(1, keepdim=True)
    if norm_weight is not None:
        directions = directions * norm_weight
    parts: list[list[torch.Tensor]] = [[] for _ in range(7)]
    for i in range(0, len(directions), chunk):
        logits = directions[i : i + chunk] @ unembed.T
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        low, high = down.values[:, 0], up.values[:, 0]
        width = (high - low).clamp_min(torch.finfo(logits.dtype).tiny) / bins
        which = ((logits - low[:, None]) / width[:, None]).long().clamp_(0, bins - 1)
        counts = torch.zeros(len(logits), bins, dtype=torch.long).scatter_add_(1, which, torch.ones_like(which))
        for store, value in zip(parts, (up.indices, up.values, down.indices, down.values, counts, low, high),
                                strict=True):
            store.append(value)
    return LogitEffects(*(torch.cat(p) for p in parts))


@torch.no_grad()
def aligned_features(decoder: torch.Tensor, directions: torch.Tensor, n: int, exclude_self: bool,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each unit's direction [U, d_site], the `n` SAE features whose decoder rows [F, d_site] point
    most the same way (cosine similarity, descending); `exclude_self` when the units are the features."""
    rows = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids, values = [], []
    for i in range(0, len(directions), chunk):
        part = directions[i : i + chunk]
        cosine = (part / part.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ rows.T
        if exclude_self:
            cosine[torch.arange(len(part)), torch.arange(i, i + len(part))] = -torch.inf
        best = cosine.topk(n, dim=1)
        ids.append(best.indices)
        values.append(best.values)
    return torch.cat(ids), torch.cat(values)


# --- clamping on a unit's page -------------------------------------------------------------------

CLAMPED_AS = {"features": ("feature", "random"), "neurons": ("neuron", "correlated_neuron")}


def clamping_records(dictionary: str, sae: str, site: str, targets: pl.DataFrame, effects: pl.DataFrame,
                     comparisons: pl.DataFrame, continuations: pl.DataFrame) -> dict[int, list[dict]]:
    """Per unit of `dictionary` ("features" of `sae`, or the "neurons" of `site`), every clamping it was
    part of: the concept, how it was chosen and its selection scores, its mean effect and KL per
    strength with the curves of the other units clamped for that concept beside it, the feature-minus-
    baseline comparisons, and its continuations."""
    at_site = targets.filter((pl.col("site") == site) & (pl.col("sae") == sae))
    curves = mean_effects(effects.filter(pl.col("site") == site))
    out: dict[int, list[dict]] = {}
    for target in at_site.filter(pl.col("unit_kind").is_in(CLAMPED_AS[dictionary])).iter_rows(named=True):
        concept, unit = target["concept"], target["unit"]
        units = at_site.filter(pl.col("concept") == concept)
        lines = []
        for other in units.iter_rows(named=True):
            curve = curves.filter((pl.col("concept") == concept) & (pl.col("unit_kind") == other["unit_kind"])
                                  & (pl.col("selection") == other["selection"]) & (pl.col("unit") == other["unit"]))
            lines.append({"label": unit_label(other["unit_kind"], other["selection"]), "unit": other["unit"],
                          "this": (other["unit_kind"], other["selection"], other["unit"])
                          == (target["unit_kind"], target["selection"], unit),
                          "strength": curve["strength"].to_list(),
                          "effect": [round_value(v) for v in curve["relative_effect"].to_list()],
                          "kl": [round_value(v) for v in curve["kl"].to_list()]})
        if target["unit_kind"] == "feature":
            mine = (pl.col("feature_selection") == target["selection"]) & (pl.col("feature") == unit)
        else:  # the baselines this unit was: a pool member is `best_random` where it was the best
            names = [name for name, kind, _ in BASELINES if kind == target["unit_kind"]]
            mine = pl.col("baseline").is_in(names) & (pl.col("baseline_unit") == unit)
            if target["unit_kind"] == "correlated_neuron":  # each selected feature has its own
                mine = mine & (pl.col("feature_selection") == target["selection"])
        compared = comparisons.filter((pl.col("site") == site) & (pl.col("concept") == concept) & mine)
        texts = continuations.filter((pl.col("site") == site) & (pl.col("concept") == concept)
                                     & (pl.col("selection") == target["selection"]) & (pl.col("unit") == unit))
        if target["unit_kind"] != "feature":
            texts = texts.clear()  # continuations clamp the named concepts' features only
        out.setdefault(unit, []).append({
            "concept": concept, "label": unit_label(target["unit_kind"], target["selection"]),
            "input_score": finite(target["input_score"]), "output_score": finite(target["output_score"]),
            "direct_logit_effect": finite(target["direct_logit_effect"]), "concept_tokens": target["concept_tokens"],
            "curves": lines,
            "comparisons": [{k: finite(v) if isinstance(v, float) else v for k, v in row.items()
                             if k in ("feature_selection", "feature", "baseline", "baseline_unit", "kl",
                                      "difference", "ci_low", "ci_high", "beats")}
                            for row in compared.iter_rows(named=True)],
            "continuations": [{"prompt": row["prompt_text"], "mode": row["mode"], "strength": row["strength"],
                               "text": row["continuation"], "perplexity": round_value(row["perplexity"])}
                              for row in texts.sort("prompt", "mode", "strength").iter_rows(named=True)]})
    return out


KIND = {"features": "feature", "neurons": "neuron"}


def selection_records(scores: pl.DataFrame) -> dict[int, list[dict]]:
    """Per unit, its selection scores from the clamping stage (`scores`: its rows of clamping/scores.parquet):
    each concept it is among the best by input score, or was an output candidate for, highest first."""
    out: dict[int, list[dict]] = {}
    for row in scores.sort("unit", "input_score", "output_score", descending=[False, True, True],
                           nulls_last=True).iter_rows(named=True):
        out.setdefault(row["unit"], []).append({k: finite(row[k]) if k != "concept" else row[k] for k in
                                                ("concept", "input_score", "output_score", "direct_logit_effect")})
    return out


def finite(value: float | None) -> float | None:
    """JSON has no NaN: None instead (and four significant digits)."""
    return round_value(value) if value is not None and np.isfinite(value) else None


# --- one dictionary's data ------------------------------------------------------------------------

def unit_records(units: pl.DataFrame, codes: SparseCodes, windows: Windows, writes: LogitEffects,
                 aligned: tuple[torch.Tensor, torch.Tensor], vocabulary: list[str],
                 clamped: dict[int, list[dict]], selected: dict[int, list[dict]], settings: BrowserSettings,
                 seed: int) -> list[dict]:
    """The page data of every live unit of one dictionary (`units`: its rows of the units table, sorted
    by unit), its scores left to the index (`index_table`), which every page loads. `writes` is
    `logit_effects`'s result, `aligned` `aligned_features`'; `clamped` and `selected` are `clamping_records` and `selection_records`."""
    n_units = units.height
    ptr, positions, values = unit_columns(codes, n_units)
    lookup = Lookup.of(codes, n_units)
    aligned_ids, aligned_values = aligned
    records = []
    for row in tqdm(units.filter(pl.col("status") != "dead").iter_rows(named=True), desc="unit pages", unit="unit",
                    total=int((units["status"] != "dead").sum())):
        u = row["unit"]
        mine = slice(ptr[u], ptr[u + 1])
        top_rows = [c["row"] for c in row["top_contexts"]]
        exclude = {int(windows.position_of[r]) for r in top_rows}
        rng = np.random.default_rng([seed, u])
        groups = quantile_samples(positions[mine], values[mine], settings.quantiles, settings.samples_per_quantile,
                                  exclude, rng)
        record = {
            "unit": u,
            "histogram": histogram(values[mine], settings.histogram_bins),
            "top": windows.contexts(lookup, u, top_rows),
            "quantiles": [{"low": round_value(low), "high": round_value(high),
                           "contexts": windows.contexts(lookup, u, windows.rows[picked].tolist())}
                          for low, high, picked in groups],
            "promoted": [[vocabulary[t], round_value(v)] for t, v in zip(writes.promoted_ids[u].tolist(),
                                                                        writes.promoted[u].tolist(), strict=True)],
            "suppressed": [[vocabulary[t], round_value(v)] for t, v in zip(writes.suppressed_ids[u].tolist(),
                                                                          writes.suppressed[u].tolist(), strict=True)],
            "logit_histogram": {"low": round_value(float(writes.low[u])), "high": round_value(float(writes.high[u])),
                                "counts": writes.counts[u].tolist()},
            "aligned": [[f, round_value(c)] for f, c in zip(aligned_ids[u].tolist(), aligned_values[u].tolist(),
                                                            strict=True)],
            "selection": selected.get(u, []),
            "clamping": clamped.get(u, []),
        }
        records.append(record)
    return records


def index_table(units: pl.DataFrame, table: pl.DataFrame, latents: bool) -> dict[str, object]:
    """The index of one dictionary: columns of its live units (scores, best concept, best-correlated
    unit, the tokens of its top contexts for search), and the dead units listed apart, and for SAE
    latents (`latents`) the dense ones, as the SAE evaluation counts them (a neuron's positive side is
    not a firing rate)."""
    live = units.filter(pl.col("status") != "dead")
    tokens = table["token"].to_list()
    columns = {name: [finite(v) if isinstance(v, float) else v for v in live[name].to_list()]
               for name in ("unit", "status", *SCORES)}
    for name in ("best_neuron", "best_neuron_correlation", "best_feature_sae", "best_feature",
                 "best_feature_correlation"):
        if name in live.columns:
            columns[name] = [finite(v) if isinstance(v, float) else v for v in live[name].to_list()]
    columns["top_tokens"] = [sorted({tokens[c["row"]] for c in contexts}) for contexts in live["top_contexts"]]
    return {"columns": columns, "dead": units.filter(pl.col("status") == "dead")["unit"].to_list(),
            "dense": live.filter(pl.col("density_positive") > DENSE_THRESHOLD)["unit"].to_list() if latents else [],
            "dense_density": DENSE_THRESHOLD, "n_units": units.height}


def prompt_view(codes: SparseCodes, windows: Windows, n_features: int) -> dict[int, list]:
    """Per window (sequence) of the scored rows, per scored token row: the `n_features` strongest
    features firing there, as [row, [feature, ...], [activation, ...]]."""
    out: dict[int, list] = {}
    for position, row in enumerate(windows.rows.tolist()):
        span = slice(codes.indptr[position], codes.indptr[position + 1])
        units, acts = np.asarray(codes.indices[span]), np.asarray(codes.values[span])
        order = np.argsort(-acts, kind="stable")[:n_features]
        out.setdefault(int(windows.sequence[row]), []).append(
            [row, units[order].tolist(), [round_value(a) for a in acts[order].tolist()]])
    return out


def data_script(key: str, data: object) -> str:
    """A data file: `MI.put(key, data)` with the data as ASCII-only JSON."""
    return f"MI.put({json.dumps(key)}, {json.dumps(data, ensure_ascii=True, separators=(',', ':'))});\n"


def write_chunks(folder: Path, prefix: str, key: str, records: list[dict], per_file: int, id_of) -> dict[str, int]:
    """Records in files of `per_file` each (`<prefix>-<n>.js`, key `<key>/<n>`, a dict by id); returns
    which file holds which id."""
    where = {}
    for n, start in enumerate(range(0, len(records), per_file)):
        chunk = records[start : start + per_file]
        (folder / f"{prefix}-{n}.js").write_text(data_script(f"{key}/{n}", {str(id_of(r)): r for r in chunk}))
        where.update({str(id_of(r)): n for r in chunk})
    return where


def write_directions(to_residual, sites: list[Site], blocks: list[slice], directions: torch.Tensor) -> torch.Tensor:
    """Each unit's write direction in the residual stream [U, d_model] from its direction in the cached
    space [U, sum of widths]: its block at the deepest site where that block is non-zero, through
    `to_residual(site, block)`. One site: the direction itself; a crosscoder's latent: its decoder at the
    deepest site (what the unembedding reads); a stacked site's own dimension: that dimension at its site."""
    writes = [to_residual(site, directions[:, block]) for site, block in zip(sites, blocks, strict=True)]
    out = writes[-1].clone()
    for earlier in reversed(writes[:-1]):
        empty = out.norm(dim=1) == 0
        out[empty] = earlier[empty]
    return out


def build_sae_browser(sae_id: str, sae_folder: str, units: pl.DataFrame, codes_folder: str,
                      cache: ActivationCache | StackedCache, table: pl.DataFrame, model_dir: str,
                      clamping: dict[str, pl.DataFrame], scores: pl.DataFrame, scoring: dict[str, object],
                      settings: BrowserSettings, seed: int, device: str, out: Path,
                      layout: Layout | None = None) -> dict[str, object]:
    """Write one SAE's browser folder `out` (`scoring`: the config's `polysemanticity` section, whose
    context span and active fraction the pages share); returns its summary. A crosscoder comes with its
    `layout` and the `StackedCache` of its sites: its latents are the features, the stacked sites'
    dimensions the neurons."""
    sae, _ = load_sae(sae_folder)
    if layout is None:
        layout = Layout([cache.site], [cache.header["shape"][1]], [1.0])
    sites, site_id = layout.sites, layout.site_id
    rows = np.load(Path(codes_folder) / "rows.npy")
    windows = Windows.of(rows, table, scoring["context_before"], scoring["context_after"])
    site_units = units.filter(pl.col("site") == site_id)
    dictionaries = {
        "features": (site_units.filter(pl.col("dictionary") == sae_id).sort("unit"),
                     SparseCodes.load(codes_folder, sae_id), sae.W_dec.detach()),
        "neurons": (site_units.filter(pl.col("dictionary") == "neurons").sort("unit"),
                    cached_codes(cache, rows), torch.eye(cache.header["shape"][1])),
    }
    parts, tokenizer = load_parts(model_dir, device)
    vocabulary = vocabulary_strings(tokenizer)
    norm = parts.model.get_submodule(parts.final_norm)
    norm_weight = getattr(norm, "weight", None)
    unembed = parts.model.get_submodule(parts.unembed).weight.detach().cpu()
    one_kind = len({site.kind for site in sites}) == 1
    summary = {"sae": sae_id, "site": site_id, "site_kind": sites[0].kind if one_kind else "stacked",
               "layer": sites[0].layer if len(sites) == 1 else None,
               "unit_kind": site_units.filter(pl.col("dictionary") == "neurons")["unit_kind"][0], "dictionaries": {},
               "context_before": scoring["context_before"], "context_after": scoring["context_after"],
               "active_fraction": scoring["active_fraction"]}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, (frame, codes, directions) in dictionaries.items():
            with torch.no_grad():
                writes = torch.cat([write_directions(parts.to_residual, sites, layout.blocks(),
                                                     directions[i : i + 1024].to(parts.model.device)).cpu()
                                    for i in range(0, len(directions), 1024)])
            effects = logit_effects(writes, norm_weight.detach().cpu() if norm_weight is not None else None,
                                    isinstance(norm, torch.nn.LayerNorm), unembed, settings.logit_tokens,
                                    LOGIT_BINS)
            aligned = aligned_features(sae.W_dec.detach(), directions, ALIGNED_FEATURES, name == "features")
            clamped = clamping_records(name, sae_id, site_id, **clamping)
            selected = selection_records(scores.filter((pl.col("sae") == sae_id) & (pl.col("unit_kind") == KIND[name])))
            records = unit_records(frame, codes, windows, effects, aligned, vocabulary, clamped, selected, settings, seed)
            where = write_chunks(tmp, name, f"{sae_id}/{name}", records, settings.units_per_file, lambda r: r["unit"])
            index = index_table(frame, table, name == "features") | {"file_of": where}
            (tmp / f"{name}-index.js").write_text(data_script(f"{sae_id}/{name}-index", index))
            summary["dictionaries"][name] = {"units": frame.height, "live": len(records), "dead": len(index["dead"]),
                                             "dense": len(index["dense"]), "clamped": len(clamped)}
        summary["named"] = named_units(units, sae_id, site_id, clamping["targets"])
        by_window = prompt_view(dictionaries["features"][1], windows, settings.prompt_features)
        summary["windows"] = write_chunks(tmp, "prompts", f"{sae_id}/prompts",
                                          [{"sequence": s, "tokens": by_window[s]} for s in sorted(by_window)],
                                          PROMPT_WINDOWS_PER_FILE, lambda r: r["sequence"])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def named_units(units: pl.DataFrame, sae_id: str, site: str, targets: pl.DataFrame, n_extreme: int = 3
                ) -> list[dict]:
    """The units the study names at one SAE's site, for the browser's front page: the polysemanticity
    figures' example cards (when at this site), every clamped feature and neuron, and the `n_extreme`
    highest and lowest by monosemanticity of the features and of the neurons. `units`: the units table
    of every site."""
    named = []
    try:
        cards = example_units(units)
    except ValueError:
        cards = ()
    for card, label in zip(cards, ("example card: the median neuron", "example card: the median feature"),
                           strict=False):
        if card["site"] == site and card["dictionary"] in ("neurons", sae_id):
            named.append({"label": label, "dict": "features" if card["dictionary"] == sae_id else "neurons",
                          "unit": card["unit"]})
    clamped = targets.filter((pl.col("site") == site) & (pl.col("sae") == sae_id))
    for row in clamped.filter(pl.col("unit_kind") != "diffmean").iter_rows(named=True):
        named.append({"label": f"clamped for {row['concept']} as {unit_label(row['unit_kind'], row['selection'])}",
                      "dict": "neurons" if row["unit_kind"] in CLAMPED_AS["neurons"] else "features", "unit": row["unit"]})
    for dictionary, name in (("features", sae_id), ("neurons", "neurons")):
        scored = units.filter((pl.col("site") == site) & (pl.col("dictionary") == name)
                              & pl.col("monosemanticity").is_not_null()).sort("monosemanticity", "unit")
        for end, rows in (("lowest", scored.head(n_extreme)), ("highest", scored.reverse().head(n_extreme))):
            named += [{"label": f"{end} monosemanticity ({row['monosemanticity']:.3f})", "dict": dictionary,
                       "unit": row["unit"]} for row in rows.iter_rows(named=True)]
    return named


# --- the site ----------------------------------------------------------------------------------------

def corpus_text(table: pl.DataFrame, split: str) -> dict[str, object]:
    """The token text of every window of the scored split, for the pages to show contexts from:
    per sequence its first token-table row, tokens, document source and label."""
    rows, _ = split_rows(table, split)
    part = table.with_row_index("row")[rows]
    out = {}
    for (sequence,), group in part.group_by("sequence", maintain_order=True):
        out[str(sequence)] = {"first": int(group["row"][0]), "tokens": group["token"].to_list(),
                              "source": group["source"].to_list(), "label": group["label"].to_list(),
                              "doc": group["doc_id"].cast(pl.Utf8).to_list()}
    return out


def build_site(sae_summaries: list[dict], table: pl.DataFrame, split: str, pages: Path, run: str, model: str,
               out: Path) -> None:
    """Copy the pages into `out` and write `site.js` (the SAEs) and `corpus.js` (the windows' text)."""
    out.mkdir(parents=True, exist_ok=True)
    for page in sorted(pages.iterdir()):
        with atomic_path(out / page.name) as tmp:
            shutil.copyfile(page, tmp)
    with atomic_path(out / "corpus.js") as tmp:
        tmp.write_text(data_script("corpus", corpus_text(table, split)))
    # written last: the site's index lists the SAEs only when everything it links exists
    with atomic_path(out / "site.js") as tmp:
        tmp.write_text(data_script("site", {"run": run, "model": model, "split": split, "saes": sae_summaries}))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    """Entry point of rules `browser_sae` and `browser`: `python -m mechinterp.browser {sae,site} --help`."""
    parser = argparse.ArgumentParser(description="Build the feature browser: one SAE's data, or the site.")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("sae", help="one SAE's features and its site's neurons")
    one.add_argument("--sae-id", required=True)
    one.add_argument("--sae", required=True, help="the SAE folder")
    one.add_argument("--cache", nargs="+", required=True,
                     help="the site's activation cache (a crosscoder's: each of its sites' caches, in order)")
    one.add_argument("--units", required=True, help="the polysemanticity units table of every site")
    one.add_argument("--codes", required=True, help="the site's polysemanticity codes folder")
    one.add_argument("--table", required=True)
    one.add_argument("--model", required=True)
    for name in ("targets", "effects", "comparisons", "continuations", "scores"):
        one.add_argument(f"--{name}", required=True, help=f"clamping/{name}.parquet")
    one.add_argument("--polysemanticity", required=True, help="the config's `polysemanticity` section as JSON")
    one.add_argument("--settings", required=True, help="the config's `browser` section as JSON")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--device", default="cpu")
    one.add_argument("--threads", type=int, required=True)
    one.add_argument("--out", required=True)
    site = commands.add_parser("site", help="the pages, the corpus text and the list of SAEs")
    site.add_argument("--summaries", nargs="+", required=True, help="each SAE folder's summary.json")
    site.add_argument("--table", required=True)
    site.add_argument("--split", required=True)
    site.add_argument("--pages", required=True, help="the folder of the pages (workflow/browser)")
    site.add_argument("--run", required=True)
    site.add_argument("--model-name", required=True)
    site.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = pl.read_parquet(args.table)
    if args.command == "sae":
        torch.set_num_threads(args.threads)
        scoring = json.loads(args.polysemanticity)
        clamping = {name: pl.read_parquet(getattr(args, name))
                    for name in ("targets", "effects", "comparisons", "continuations")}
        scores = pl.read_parquet(args.scores)
        layout = None
        if len(args.cache) == 1:
            cache = ActivationCache.open(args.cache[0], args.table)
        else:  # a crosscoder over several sites
            cache, layout = open_stacked(args.cache, args.table), load_crosscoder(args.sae)[1]
        units = pl.read_parquet(args.units)
        if args.sae_id not in set(units["dictionary"]):
            raise UserError(f"{args.units} has no units of SAE {args.sae_id!r}; rerun its polysemanticity stage.")
        summary = build_sae_browser(args.sae_id, args.sae, units, args.codes, cache, table, args.model, clamping, scores,
                                    scoring,
                                    BrowserSettings(**json.loads(args.settings)), args.seed,
                                    resolve_device(args.device), Path(args.out), layout)
        log.info("%s: %s; %.1f MB in %.1f s", args.sae_id, summary["dictionaries"], folder_bytes(Path(args.out)) / 1e6,
                 time.perf_counter() - start)
    else:
        summaries = [json.loads(Path(path).read_text()) for path in args.summaries]
        out = Path(args.out)
        build_site(summaries, table, args.split, Path(args.pages), args.run, args.model_name, out)
        log.info("browser: %d SAEs, %.1f MB in all (%.1f s for the site files)", len(summaries),
                 folder_bytes(out) / 1e6, time.perf_counter() - start)


if __name__ == "__main__":
    run_stage(main)
