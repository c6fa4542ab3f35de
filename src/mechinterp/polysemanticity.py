"""Score how monosemantic every unit of a site is, neurons and SAE features by the same code.

A *dictionary* turns a site's activations [n, d_in] into unit activations [n, n_units]: an SAE's
encoder (its features), or `IdentityDictionary` (the site's own neurons or residual dimensions).
All dictionaries of a site are scored together, streaming over the cached rows in chunks: one read
finds each unit's maximum (which defines "active"), a second accumulates the activation mass per
distinct token and per document label, the top-activating rows, and the feature-neuron
correlations. Memory is [distinct tokens x units]: it grows with the distinct tokens (bounded by
the vocabulary), not with the number of tokens.

Scores per unit, all on positive activation mass (SAE features are non-negative; for signed
neurons and residual dimensions the positive side is the unit):
- density: share of tokens on which the unit is active;
- effective tokens exp(H) of the token distribution of its mass, and token focus 1 - H / ln(V),
  V = distinct tokens scored (1: one token, 0: spread like the corpus's vocabulary);
- concept specificity (Bricken et al. 2023): share of its mass on one concept, corrected for the
  concept's base rate, (share - base) / (1 - base), best over lexicon categories and labels;
- monosemanticity = max(token focus, concept specificity): a unit is monosemantic when one token
  family or one concept explains its activation mass.
Each is computed for two views of "active", the same for every unit: activations at or above
`active_fraction` of the unit's maximum (the headline), and every positive activation (suffix
`_positive`). Units that never fire are `dead`; units active on fewer than `min_active` tokens are
`rare`; neither gets a monosemanticity score.

Token focus is high for any unit active on few tokens, whatever they are, so every score is set against
a null matched on activity (suffix `_null`): the same scoring of the unit's own active activations,
each credited to the token and document of a random scored row (one seeded permutation of the rows,
shared by every dictionary of the site). The null unit keeps its activation values, its threshold and
its active-token count, and its concept specificity is the best over the same concepts, so the
best-of-many-concepts bias is in the null too. `_excess` = score - null.

Controls, scored as dictionaries of unit kind `control` beside the neurons and features (named
`control:...`): for each SAE, a TopK code over random unit-norm directions with the SAE's width and k
(`random_directions:<sae>`) and the SAE's architecture initialised as training starts it, untrained
(`random_init:<sae>`); the site's units negated (`neurons_negative`: the negative lobe of a signed
SwiGLU neuron or residual dimension); at residual sites the principal axes of the scored rows and a
random rotation, each on both signs (`pca`, `pca_negative`, `rotation`, `rotation_negative`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mechinterp.activations import ActivationCache
from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, write_parquet
from mechinterp.saes import SparseAutoencoder, TopKSAE, load_sae
from mechinterp.saes.topk import TopKSettings
from mechinterp.tokens import split_rows

log = logging.getLogger(__name__)
VIEWS = ("active", "positive", "null")
CONTROL_VIEWS = ("active", "null")  # a control needs no `_positive` scores, top contexts, correlations or codes
CONTROL = "control"  # the unit kind of a control dictionary, and the prefix of its name


@dataclass(frozen=True)
class ScoringSettings:
    """The config's `polysemanticity` section (defaults and ranges: workflow/schemas/config.schema.yaml)."""

    split: str
    """which tokens of the cache are scored: heldout, train or all (BOS and attention sinks always left out)"""
    active_fraction: float
    """a unit is active where its activation is at least this share of its maximum"""
    min_active: int
    """units active on fewer tokens are `rare` and get no monosemanticity score"""
    min_concept_words: int
    """lexicon categories matching fewer distinct words among the scored tokens are not concepts"""
    exclude_frequent_words: int
    """the most frequent words of the scored tokens belong to no lexicon concept (function words)"""
    concept_unit_min_words: int
    """a unit is ranked for a lexicon concept only when active on this many distinct words of it"""
    top_contexts: int
    """top-activating contexts kept per unit"""
    context_before: int
    """tokens of text shown before a context's token"""
    context_after: int
    """tokens of text shown after a context's token"""
    concept_units: int
    """most specific units listed per concept"""
    bootstrap_samples: int
    """resamples of the bootstrap CI of median differences"""
    controls: bool
    """score the control dictionaries (random directions, untrained SAE, negated units, other bases)"""
    matched_bin_min_units: int
    """a log2 bin of active tokens enters the activity-matched difference when both groups have this many units"""


class IdentityDictionary(torch.nn.Module):
    """The site's own units (MLP neurons or residual dimensions) as a dictionary: activations [n, width]
    are the unit activations (`negated`: their negatives, so a signed unit's negative side is scored)."""

    def __init__(self, width: int, negated: bool = False) -> None:
        super().__init__()
        self.n_units = width
        self.negated = negated

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return -x if self.negated else x


class LinearDictionary(torch.nn.Module):
    """Units read along other axes of the site: activations [n, d] -> (x - centre) @ basis [n, m]."""

    def __init__(self, basis: torch.Tensor, centre: torch.Tensor) -> None:
        super().__init__()
        self.basis, self.centre = basis, centre
        self.n_units = basis.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre) @ self.basis


@dataclass
class Concepts:
    """Token-level concepts (lexicon categories) and row-level concepts (document source, label)."""

    token_names: list[str]
    token_members: torch.Tensor  # [n distinct tokens, n token concepts] 0/1
    token_word: torch.Tensor  # [n distinct tokens] index of the token's word (" On", "on" -> "on")
    row_names: list[str]
    row_index: np.ndarray  # [n rows, 2] index into row_names for source and label, -1 when none


def token_concepts(token_strings: list[str], token_counts: np.ndarray, lexicons: pl.DataFrame, min_words: int,
                   exclude_frequent: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Membership of each distinct token in each lexicon category (a token belongs when its word, its
    text stripped and lower-cased, is a term of the category), and each token's word index.
    The `exclude_frequent` most frequent words belong to no category: lexicons list function words
    ("on", "a", "in") under many categories, which would make every function-word unit look
    conceptual. Categories matching fewer than `min_words` distinct words are dropped: with one or
    two words a category is a word, not a concept."""
    words = [t.strip().lower() for t in token_strings]
    word_ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    word_counts = pl.DataFrame({"term": words, "count": token_counts}).group_by("term").agg(pl.col("count").sum())
    frequent = word_counts.sort(["count", "term"], descending=[True, False])["term"][:exclude_frequent]
    normalised = pl.DataFrame({"token_index": np.arange(len(words)), "term": words}).filter(
        ~pl.col("term").is_in(frequent.implode()))
    pairs = (lexicons.select(pl.concat_str("lexicon", pl.lit(":"), "category").alias("concept"), "term")
             .unique().join(normalised, on="term").select("concept", "token_index", "term").unique())
    kept = (pairs.group_by("concept").agg(pl.col("term").n_unique())
            .filter(pl.col("term") >= min_words)["concept"].sort().to_list())
    pairs = pairs.filter(pl.col("concept").is_in(kept))
    members = torch.zeros(len(words), len(kept))
    column = {name: i for i, name in enumerate(kept)}
    members[pairs["token_index"].to_list(), [column[c] for c in pairs["concept"]]] = 1.0
    return kept, members, torch.tensor([word_ids[w] for w in words], dtype=torch.long)


def concept_word_variety(concepts: Concepts, token_mass: torch.Tensor) -> torch.Tensor:
    """[token concepts, units]: how many distinct words of each concept each unit is active on."""
    n_words = int(concepts.token_word.max()) + 1 if len(concepts.token_word) else 0
    active = torch.zeros(n_words, token_mass.shape[1]).index_add_(0, concepts.token_word, (token_mass > 0).float())
    members = torch.zeros(n_words, concepts.token_members.shape[1]).index_add_(0, concepts.token_word,
                                                                             concepts.token_members)
    return (members > 0).float().T @ (active > 0).float()


def row_concepts(sources: list[str | None], labels: list[str | None]) -> tuple[list[str], np.ndarray]:
    """Each row's document source and label as concepts `source:<name>` and `label:<name>`."""
    names = sorted({f"source:{s}" for s in sources if s} | {f"label:{x}" for x in labels if x})
    lookup = {name: i for i, name in enumerate(names)}
    index = np.array([[lookup.get(f"source:{s}", -1), lookup.get(f"label:{x}", -1)]
                      for s, x in zip(sources, labels, strict=True)], dtype=np.int64).reshape(-1, 2)
    return names, index


def _chunks(cache: ActivationCache, rows: np.ndarray, chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    for start in range(0, len(rows), chunk):
        yield slice(start, start + chunk), cache.rows(rows[start : start + chunk])


@torch.no_grad()
def unit_maxima(dictionaries: dict[str, torch.nn.Module], cache: ActivationCache, rows: np.ndarray,
                outlier_threshold: float = float("inf"), chunk: int = 4096) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """First read: which rows to score (norm at most `outlier_threshold`, as in SAE training) and each
    unit's largest activation over them."""
    maxima = {name: torch.full((d.n_units,), -torch.inf) for name, d in dictionaries.items()}
    kept = np.zeros(len(rows), dtype=bool)
    for part, x in tqdm(_chunks(cache, rows, chunk), desc="unit maxima", unit="chunk", total=-(-len(rows) // chunk)):
        keep = x.norm(dim=1) <= outlier_threshold
        kept[part] = keep.numpy()
        for name, dictionary in dictionaries.items():
            if keep.any():
                maxima[name] = torch.maximum(maxima[name], dictionary.encode(x[keep]).amax(0))
    return maxima, kept


@dataclass
class Accumulated:
    """What the second read gathers for one dictionary, per view where it differs."""

    count: dict[str, torch.Tensor]  # [units] tokens active
    token_mass: dict[str, torch.Tensor]  # [distinct tokens, units]
    row_concept_mass: dict[str, torch.Tensor]  # [row concepts, units]
    top_values: torch.Tensor  # [top_n, units], descending
    top_rows: torch.Tensor  # [top_n, units] positions in `rows`
    correlation: torch.Tensor | None  # [units, neurons] Pearson, for SAE features
    codes: SparseCodes | None  # every positive activation, for SAE features


@dataclass
class SparseCodes:
    """A dictionary's positive activations on the scored rows, row by row (CSR): row i's units are
    `indices[indptr[i]:indptr[i + 1]]` (ascending) with activations `values[...]`. The feature browser
    reads its contexts, quantile samples and prompt view from these, so the cache is encoded once."""

    indptr: np.ndarray  # [n rows + 1] int64
    indices: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32

    @classmethod
    def from_dense(cls, a: torch.Tensor) -> SparseCodes:
        """From activations [rows, units]."""
        row, unit = torch.nonzero(a > 0, as_tuple=True)
        counts = np.bincount(row.numpy(), minlength=len(a))
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), unit.numpy().astype(np.int32),
                   a[row, unit].numpy().astype(np.float32))

    @classmethod
    def concat(cls, parts: list[SparseCodes]) -> SparseCodes:
        """The rows of `parts`, one after another."""
        offsets = np.cumsum([0] + [len(p.indices) for p in parts])
        return cls(np.concatenate([[0], *(p.indptr[1:] + o for p, o in zip(parts, offsets, strict=False))]).astype(np.int64),
                   np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]))

    FILES = ("indptr", "indices", "values")

    def save(self, folder: Path, name: str) -> None:
        for part in self.FILES:
            np.save(folder / f"{name}.{part}.npy", getattr(self, part))

    @classmethod
    def load(cls, folder: str | Path, name: str) -> SparseCodes:
        """Memory-mapped from the files `save` wrote."""
        return cls(*(np.load(Path(folder) / f"{name}.{part}.npy", mmap_mode="r") for part in cls.FILES))


@torch.no_grad()
def accumulate(dictionaries: dict[str, torch.nn.Module], cache: ActivationCache, rows: np.ndarray,
               token_index: np.ndarray, n_tokens: int, row_concept_index: np.ndarray, n_row_concepts: int,
               maxima: dict[str, torch.Tensor], active_fraction: float, top_n: int, null_order: np.ndarray,
               neurons: str | None = None, controls: frozenset[str] = frozenset(), chunk: int = 4096
               ) -> dict[str, Accumulated]:
    """Second read over `rows`. `token_index` [n] maps each row to its distinct-token index;
    `row_concept_index` [n, 2] to row concepts (-1: none). In the "null" view row i's active
    activations are credited to the token and row concepts of row `null_order[i]` (`null_order` [n], a
    permutation of range(n)). When `neurons` names the identity dictionary, every other dictionary's
    units are correlated (Pearson) with its units, and their positive activations are kept as
    `SparseCodes` (the neurons' own are the cache). The dictionaries named in `controls` are only
    scored: views CONTROL_VIEWS, no top rows, correlations or codes."""
    acc = {}
    for name, d in dictionaries.items():
        views, top = (CONTROL_VIEWS, 0) if name in controls else (VIEWS, top_n)
        acc[name] = Accumulated(
            count={v: torch.zeros(d.n_units, dtype=torch.long) for v in ("active", "positive")},
            token_mass={v: torch.zeros(n_tokens, d.n_units) for v in views},
            row_concept_mass={v: torch.zeros(n_row_concepts + 1, d.n_units) for v in views},  # last row: none
            top_values=torch.full((top, d.n_units), -torch.inf), top_rows=torch.zeros(top, d.n_units, dtype=torch.long),
            correlation=None, codes=None)
    learned = [name for name in dictionaries if name not in controls]
    coded = {name: [] for name in learned if name != neurons}
    moments = {name: [torch.zeros(dictionaries[name].n_units, dtype=torch.float64) for _ in range(2)]
               for name in learned}
    cross = {name: torch.zeros(dictionaries[name].n_units, dictionaries[neurons].n_units, dtype=torch.float64)
             for name in learned if neurons is not None and name != neurons}
    thresholds = {name: (active_fraction * m).clamp_min(torch.finfo(torch.float32).tiny) for name, m in maxima.items()}
    null_token_index, null_concept_index = token_index[null_order], row_concept_index[null_order]

    def concept_rows(index: np.ndarray) -> torch.Tensor:
        concepts = torch.from_numpy(index).clone()
        concepts[concepts < 0] = n_row_concepts
        return concepts

    for part, x in tqdm(_chunks(cache, rows, chunk), desc="unit scores", unit="chunk", total=-(-len(rows) // chunk)):
        labels = {"real": (torch.from_numpy(token_index[part]), concept_rows(row_concept_index[part])),
                  "null": (torch.from_numpy(null_token_index[part]), concept_rows(null_concept_index[part]))}
        positions = torch.arange(part.start, part.start + len(x))
        encoded = {name: d.encode(x) for name, d in dictionaries.items()}
        for name, a in encoded.items():
            acc_d = acc[name]
            # the null view is the active view's mass on other rows' labels: same values, same threshold
            masses = {"positive": a.clamp_min(0), "active": a * (a >= thresholds[name])}
            masses["null"] = masses["active"]
            for view in ("active", "positive"):
                acc_d.count[view] += (masses[view] > 0).sum(0)
            for view in acc_d.token_mass:
                tokens, concepts = labels["null" if view == "null" else "real"]
                acc_d.token_mass[view].index_add_(0, tokens, masses[view])
                for column in range(concepts.shape[1]):
                    acc_d.row_concept_mass[view].index_add_(0, concepts[:, column], masses[view])
            if name in controls:
                continue
            values = torch.cat([acc_d.top_values, a])
            where = torch.cat([acc_d.top_rows, positions[:, None].expand_as(a)])
            acc_d.top_values, order = values.topk(min(top_n, len(values)), dim=0)
            acc_d.top_rows = where.gather(0, order)
            moments[name][0] += a.double().sum(0)
            moments[name][1] += a.double().pow(2).sum(0)
            if name in cross:
                cross[name] += (a.T @ encoded[neurons]).double()
            if name in coded:
                coded[name].append(SparseCodes.from_dense(a))
    n = len(rows)

    def std(name: str) -> torch.Tensor:
        """Standard deviation per unit; infinite for a constant unit, so its correlations are 0."""
        mean_sq, sq_mean = moments[name][1] / n, (moments[name][0] / n).pow(2)
        variance = mean_sq - sq_mean
        return torch.where(variance > 1e-9 * mean_sq, variance.clamp_min(0).sqrt(), torch.inf)

    for name, products in cross.items():
        covariance = products / n - (moments[name][0] / n)[:, None] * (moments[neurons][0] / n)[None, :]
        acc[name].correlation = (covariance / (std(name)[:, None] * std(neurons)[None, :])).float()
    for name, parts in coded.items():
        acc[name].codes = SparseCodes.concat(parts)
    for a in acc.values():
        for view in a.row_concept_mass:
            a.row_concept_mass[view] = a.row_concept_mass[view][:n_row_concepts]
    return acc


def entropy_scores(token_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective number of tokens exp(H) and token focus 1 - H / ln(V) per unit, from the mass per
    distinct token [V, units]; NaN for a unit with no mass."""
    total = token_mass.sum(0)
    p = token_mass / total
    entropy = -(p * p.clamp_min(1e-30).log()).sum(0)
    entropy[total == 0] = torch.nan
    n_tokens = token_mass.shape[0]
    # clamped: float32 sums leave a few ulps outside [0, 1]
    focus = (1 - entropy / np.log(n_tokens)).clamp(0, 1) if n_tokens > 1 else torch.ones_like(entropy)
    return entropy.exp(), focus


def concept_specificity(concept_mass: torch.Tensor, total_mass: torch.Tensor, base_rate: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best concept per unit from its mass per concept [concepts, units]: the index, the raw share,
    and the specificity (share - base) / (1 - base), which is 0 for a unit that ignores the concept
    and 1 for a unit whose whole mass falls on it."""
    share = concept_mass / total_mass.clamp_min(torch.finfo(torch.float32).tiny)
    specificity = (share - base_rate[:, None]) / (1 - base_rate[:, None]).clamp_min(1e-9)
    best_specificity, best = specificity.clamp_max(1).max(0)
    return best, share.gather(0, best[None])[0], best_specificity


def concept_table(share: torch.Tensor, specificity: torch.Tensor, variety: torch.Tensor, concept_names: list[str],
                  base_rate: torch.Tensor, eligible: torch.Tensor, min_variety: int, top_n: int) -> pl.DataFrame:
    """For each concept, the `top_n` eligible units with the highest specificity for it, among units
    active on at least `min_variety` distinct words of the concept (`variety` [concepts, units]):
    a unit that fires on a single word is that word's unit, not the concept's."""
    ranked = specificity.masked_fill(~eligible[None, :] | (variety < min_variety), -torch.inf)
    n = min(top_n, int(eligible.sum()))
    values, units = ranked.topk(n, dim=1)
    found = torch.isfinite(values).flatten().numpy()
    return pl.DataFrame({
        "concept": np.repeat(concept_names, n), "rank": np.tile(np.arange(n), len(concept_names)),
        "unit": units.flatten().numpy().astype(np.int64), "share": share.gather(1, units).flatten().double().numpy(),
        "base_rate": np.repeat(base_rate.double().numpy(), n), "specificity": values.flatten().double().numpy(),
        "concept_words_active": variety.gather(1, units).flatten().numpy().astype(np.int64),
    }, schema_overrides={"concept": pl.Utf8}).filter(pl.Series(found))


NULL_SCORES = ("monosemanticity", "token_focus", "concept_specificity")  # each with `_null` and `_excess`


def score_dictionary(acc: Accumulated, maxima: torch.Tensor, concepts: Concepts, token_counts: torch.Tensor,
                     row_concept_counts: torch.Tensor, n_rows: int, min_active: int, min_concept_words: int,
                     top_concepts: int, rank_concepts: bool = True) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Per-unit scores (without contexts) and the per-concept ranking of units, from one dictionary's
    accumulated sums. `token_counts` [distinct tokens] and `row_concept_counts` [row concepts] give
    the base rates. The null view gives NULL_SCORES with suffix `_null`, and each score's excess over
    it (`_excess`). Without `rank_concepts` the ranking is None."""
    names = concepts.token_names + concepts.row_names
    base_rate = torch.cat([token_counts @ concepts.token_members, row_concept_counts]).float() / n_rows
    columns: dict[str, np.ndarray] = {"max_activation": maxima.double().numpy()}
    status = np.where(acc.count["positive"].numpy() == 0, "dead",
                      np.where(acc.count["active"].numpy() < min_active, "rare", "alive"))
    eligible = torch.from_numpy(status == "alive")
    concept_rows = None
    scored = eligible.numpy()
    for view in VIEWS:
        if view not in acc.token_mass:
            continue
        suffix = "" if view == "active" else f"_{view}"
        mass = acc.token_mass[view]
        total = mass.sum(0)
        concept_mass = torch.cat([concepts.token_members.T @ mass, acc.row_concept_mass[view]])
        effective, focus = entropy_scores(mass)
        best, share, specificity = concept_specificity(concept_mass, total, base_rate)
        mono = torch.maximum(focus, specificity)
        if view == "null":
            for score, value in zip(NULL_SCORES, (mono, focus, specificity), strict=True):
                columns[f"{score}_null"] = np.where(scored, value.double().numpy(), np.nan)
                columns[f"{score}_excess"] = columns[score] - columns[f"{score}_null"]
            continue
        columns[f"density{suffix}"] = acc.count[view].double().numpy() / n_rows
        columns[f"effective_tokens{suffix}"] = np.where(scored, effective.double().numpy(), np.nan)
        columns[f"token_focus{suffix}"] = np.where(scored, focus.double().numpy(), np.nan)
        columns[f"best_concept{suffix}"] = pl.Series([names[b] if ok else None for b, ok in zip(best.tolist(), scored)],
                                                     dtype=pl.Utf8)
        columns[f"concept_share{suffix}"] = np.where(scored, share.double().numpy(), np.nan)
        columns[f"concept_base_rate{suffix}"] = np.where(scored, base_rate[best].double().numpy(), np.nan)
        columns[f"concept_specificity{suffix}"] = np.where(scored, specificity.double().numpy(), np.nan)
        columns[f"monosemanticity{suffix}"] = np.where(scored, mono.double().numpy(), np.nan)
        if view == "active" and rank_concepts:
            all_share = concept_mass / total.clamp_min(torch.finfo(torch.float32).tiny)
            all_spec = (all_share - base_rate[:, None]) / (1 - base_rate[:, None]).clamp_min(1e-9)
            variety = torch.cat([concept_word_variety(concepts, mass),  # a row concept spans any token
                                 (mass > 0).sum(0, keepdim=True).float().expand(len(concepts.row_names), -1)])
            concept_rows = concept_table(all_share, all_spec, variety, names, base_rate, eligible, min_concept_words,
                                         top_concepts)
    columns["n_active"] = acc.count["active"].numpy()
    units = pl.DataFrame({"unit": np.arange(len(maxima)), "status": status, **columns}).with_columns(
        pl.col(pl.Float64).fill_nan(None))
    if acc.correlation is not None:
        best_r, best_neuron = acc.correlation.max(1)
        units = units.with_columns(best_neuron=pl.Series(best_neuron.numpy().astype(np.int64)),
                                   best_neuron_correlation=pl.Series(best_r.double().numpy()))
    return units, concept_rows


def top_contexts(top_rows: torch.Tensor, top_values: torch.Tensor, rows: np.ndarray, table: pl.DataFrame,
                 before: int, after: int) -> list[list[dict]]:
    """Each unit's top-activating rows as contexts: the token-table row, the token, the surrounding
    text of its window with the token marked [[like this]], its activation, document source and label."""
    tokens = table["token"].to_numpy()
    sequence, position = table["sequence"].to_numpy(), table["position"].to_numpy()
    source, label = table["source"].to_list(), table["label"].to_list()
    per_unit = []
    for unit in range(top_rows.shape[1]):
        contexts = []
        for value, index in zip(top_values[:, unit].tolist(), top_rows[:, unit].tolist(), strict=True):
            if not value > 0:
                break
            row = int(rows[index])
            start = row - min(before, int(position[row]))
            stop = row + 1
            while stop < len(tokens) and stop <= row + after and sequence[stop] == sequence[row]:
                stop += 1
            text = "".join(tokens[start:row]) + "[[" + tokens[row] + "]]" + "".join(tokens[row + 1 : stop])
            contexts.append({"row": row, "activation": float(value), "token": tokens[row], "context": text,
                             "source": source[row], "label": label[row]})
        per_unit.append(contexts)
    return per_unit


def bootstrap_median_difference(features: np.ndarray, neurons: np.ndarray, n_boot: int, seed: int
                                ) -> tuple[float, float, float]:
    """median(features) - median(neurons) and its bootstrap 95% percentile interval."""
    features, neurons = features[~np.isnan(features)], neurons[~np.isnan(neurons)]
    if len(features) == 0 or len(neurons) == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    diffs = (np.median(rng.choice(features, (n_boot, len(features))), axis=1)
             - np.median(rng.choice(neurons, (n_boot, len(neurons))), axis=1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(np.median(features) - np.median(neurons)), float(low), float(high)


COMPARED_SCORES = ("monosemanticity", "concept_specificity", "token_focus", "effective_tokens", "density",
                   "monosemanticity_positive", "effective_tokens_positive", "density_positive",
                   *(f"{score}_excess" for score in NULL_SCORES))
CONTROL_SCORES = ("monosemanticity_excess",)  # what a pair with a control compares
MATCHED = "monosemanticity_matched"  # the score name of the activity-matched difference of monosemanticity


def activity_bins(n_active: np.ndarray) -> np.ndarray:
    """The log2 bin of each unit's active-token count: floor(log2(n_active))."""
    return np.floor(np.log2(np.maximum(n_active, 1))).astype(np.int64)


def matched_difference(features: np.ndarray, features_active: np.ndarray, neurons: np.ndarray,
                       neurons_active: np.ndarray, min_units: int, n_boot: int, seed: int) -> dict[str, float]:
    """The difference of medians (features - neurons) within log2 bins of active tokens, averaged over
    the bins where both groups have at least `min_units` units, each bin weighted by
    n_features * n_neurons / (n_features + n_neurons) (the inverse variance of a difference of two
    means, so bins where both groups are well populated count most; the weights are fixed under the
    bootstrap). Its bootstrap 95% percentile interval resamples units within each bin.

    Returns difference, ci_low, ci_high (NaN when no bin qualifies), the number of bins, the units of
    each group in them and their medians there."""
    bins_f, bins_n = activity_bins(features_active), activity_bins(neurons_active)
    common = [b for b in np.intersect1d(bins_f, bins_n)
              if (bins_f == b).sum() >= min_units and (bins_n == b).sum() >= min_units]
    empty = {"difference": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_bins": 0, "n_features": 0,
             "n_neurons": 0, "median_features": np.nan, "median_neurons": np.nan}
    if not common:
        return empty
    rng = np.random.default_rng(seed)
    groups = [(features[bins_f == b], neurons[bins_n == b]) for b in common]
    weights = np.array([len(f) * len(n) / (len(f) + len(n)) for f, n in groups])
    weights /= weights.sum()
    difference, resampled = 0.0, np.zeros(n_boot)
    for w, (f, n) in zip(weights, groups, strict=True):
        difference += w * (np.median(f) - np.median(n))
        resampled += w * (np.median(rng.choice(f, (n_boot, len(f))), axis=1)
                          - np.median(rng.choice(n, (n_boot, len(n))), axis=1))
    low, high = np.percentile(resampled, [2.5, 97.5])
    in_bins_f, in_bins_n = np.concatenate([f for f, _ in groups]), np.concatenate([n for _, n in groups])
    return {"difference": float(difference), "ci_low": float(low), "ci_high": float(high), "n_bins": len(common),
            "n_features": len(in_bins_f), "n_neurons": len(in_bins_n),
            "median_features": float(np.median(in_bins_f)), "median_neurons": float(np.median(in_bins_n))}


def compared_pairs(units: pl.DataFrame) -> list[tuple[str, str, tuple[str, ...]]]:
    """(dictionary, baseline, scores) of each comparison of one site: every SAE against the neurons
    on COMPARED_SCORES, every control against the neurons, and every SAE against every control, on
    CONTROL_SCORES. Each pair against the neurons also gets the activity-matched difference."""
    kinds = dict(units.select("dictionary", "unit_kind").unique().iter_rows())
    controls = sorted(d for d, kind in kinds.items() if kind == CONTROL)
    saes = sorted(d for d, kind in kinds.items() if kind != CONTROL and d != "neurons")
    return ([(sae, "neurons", COMPARED_SCORES) for sae in saes]
            + [(control, "neurons", CONTROL_SCORES) for control in controls]
            + [(sae, control, CONTROL_SCORES) for sae in saes for control in controls])


def compare(units: pl.DataFrame, n_boot: int, seed: int, min_bin_units: int) -> pl.DataFrame:
    """The comparisons of one site (`compared_pairs`), over alive units: per pair and score the medians,
    their difference (dictionary - baseline) and its bootstrap 95% interval; and per pair the
    activity-matched difference of monosemanticity against the neurons (score `monosemanticity_matched`, see
    `matched_difference`: its medians and unit counts are those of the units in the matched bins).

    Columns: sae (the dictionary compared: an SAE or a control), baseline ("neurons" or a control),
    score, median_features and median_neurons (the dictionary's and the baseline's), difference,
    ci_low, ci_high, n_features, n_neurons (alive units, or units in matched bins), n_bins (matched
    bins; null for a plain median difference), n_dead_features, n_dead_neurons."""
    rows = []
    for dictionary, baseline, scores in compared_pairs(units):
        features, neurons = (units.filter(pl.col("dictionary") == name) for name in (dictionary, baseline))
        alive_f, alive_n = (d.filter(pl.col("status") == "alive") for d in (features, neurons))
        dead = {"n_dead_features": int((features["status"] == "dead").sum()),
                "n_dead_neurons": int((neurons["status"] == "dead").sum())}

        def values(frame: pl.DataFrame, score: str) -> np.ndarray:
            return frame[score].cast(pl.Float64).fill_null(np.nan).to_numpy()

        for score in scores:
            f, n = values(alive_f, score), values(alive_n, score)
            diff, low, high = bootstrap_median_difference(f, n, n_boot, seed)
            rows.append({"sae": dictionary, "baseline": baseline, "score": score,
                         "median_features": float(np.nanmedian(f)) if len(f) else np.nan,
                         "median_neurons": float(np.nanmedian(n)) if len(n) else np.nan, "difference": diff,
                         "ci_low": low, "ci_high": high, "n_features": len(f), "n_neurons": len(n), "n_bins": None,
                         **dead})
        if baseline == "neurons":
            matched = matched_difference(values(alive_f, "monosemanticity"), alive_f["n_active"].to_numpy(),
                                         values(alive_n, "monosemanticity"), alive_n["n_active"].to_numpy(),
                                         min_bin_units, n_boot, seed)
            rows.append({"sae": dictionary, "baseline": baseline, "score": MATCHED, **matched, **dead})
    schema = {"sae": pl.Utf8, "baseline": pl.Utf8, "score": pl.Utf8, "median_features": pl.Float64,
              "median_neurons": pl.Float64, "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
              "n_features": pl.Int64, "n_neurons": pl.Int64, "n_bins": pl.Int64, "n_dead_features": pl.Int64,
              "n_dead_neurons": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def score_site(cache: ActivationCache, table: pl.DataFrame, rows: np.ndarray, dictionaries: dict[str, torch.nn.Module],
               unit_kinds: dict[str, str], lexicons: pl.DataFrame, settings: ScoringSettings,
               outlier_threshold: float = float("inf"), seed: int = 0
               ) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray, dict[str, SparseCodes]]:
    """Score every unit of every dictionary of one site over cache `rows` (indices into the token
    table `table`). The identity dictionary must be named "neurons"; SAE features are correlated
    with it; dictionaries of unit kind CONTROL are only scored (no contexts, concept ranking or
    codes). `seed` draws the null's permutation of the scored rows. Returns the units table (one row
    per unit, with top contexts), the concept ranking, the rows scored (`rows` without outliers) and
    each SAE's `SparseCodes` on them."""
    maxima, kept = unit_maxima(dictionaries, cache, rows, outlier_threshold)
    rows = rows[kept]
    scored = table[rows]
    distinct, token_index = np.unique(scored["token_id"].to_numpy(), return_inverse=True)
    first = np.unique(token_index, return_index=True)[1]
    token_strings = scored["token"].gather(first).to_list()
    counts = np.bincount(token_index, minlength=len(distinct))
    token_names, members, token_word = token_concepts(token_strings, counts, lexicons, settings.min_concept_words,
                                                      settings.exclude_frequent_words)
    row_names, row_index = row_concepts(scored["source"].to_list(), scored["label"].to_list())
    concepts = Concepts(token_names, members, token_word, row_names, row_index)
    token_counts = torch.from_numpy(counts).float()
    valid = row_index[row_index >= 0]
    row_counts = torch.from_numpy(np.bincount(valid, minlength=len(row_names))).float()
    controls = frozenset(name for name, kind in unit_kinds.items() if kind == CONTROL)
    null_order = np.random.default_rng(seed).permutation(len(rows))
    acc = accumulate(dictionaries, cache, rows, token_index, len(distinct), row_index, len(row_names), maxima,
                     settings.active_fraction, settings.top_contexts, null_order,
                     neurons="neurons" if "neurons" in dictionaries else None, controls=controls)
    unit_tables, concept_tables = [], []
    neuron_matches = best_features(acc) if "neurons" in acc else None
    for name, accumulated in acc.items():
        units, ranking = score_dictionary(accumulated, maxima[name], concepts, token_counts, row_counts, len(rows),
                                          settings.min_active, settings.concept_unit_min_words,
                                          settings.concept_units, rank_concepts=name not in controls)
        if name not in controls:
            contexts = top_contexts(accumulated.top_rows, accumulated.top_values, rows, table,
                                    settings.context_before, settings.context_after)
            units = units.with_columns(pl.Series("top_contexts", contexts, dtype=CONTEXTS_TYPE))
            concept_tables.append(ranking.select(pl.lit(name).alias("dictionary"), pl.all()))
        if name == "neurons" and neuron_matches is not None:
            units = pl.concat([units, neuron_matches], how="horizontal")
        front = {"dictionary": name, "unit_kind": unit_kinds[name], "n_scored_tokens": len(rows)}
        unit_tables.append(units.select(*[pl.lit(v).alias(k) for k, v in front.items()], pl.all()))
    codes = {name: a.codes for name, a in acc.items() if a.codes is not None}
    return pl.concat(unit_tables, how="diagonal_relaxed"), pl.concat(concept_tables), rows, codes


def best_features(acc: dict[str, Accumulated]) -> pl.DataFrame | None:
    """For each neuron, the SAE feature most correlated with it over every SAE of the site (the
    feature the browser's compare view sets beside it): columns best_feature_sae, best_feature,
    best_feature_correlation; None when the site has no SAE."""
    saes = [(name, a.correlation) for name, a in acc.items() if a.correlation is not None]
    if not saes:
        return None
    stacked = torch.stack([c.max(0).values for _, c in saes])  # [saes, neurons]
    best_sae = stacked.argmax(0)
    features = torch.stack([c.argmax(0) for _, c in saes]).gather(0, best_sae[None])[0]
    return pl.DataFrame({"best_feature_sae": [saes[i][0] for i in best_sae.tolist()],
                         "best_feature": features.numpy().astype(np.int64),
                         "best_feature_correlation": stacked.max(0).values.double().numpy()})


CONTEXTS_TYPE = pl.List(pl.Struct({"row": pl.Int64, "activation": pl.Float64, "token": pl.Utf8, "context": pl.Utf8,
                                   "source": pl.Utf8, "label": pl.Utf8}))


# ---------------------------------------------------------------------------------------------------
# Tables and choices for the polysemanticity notebook: the notebook only plots what these return.
# ---------------------------------------------------------------------------------------------------

UNIT_STATUSES = ("alive", "rare", "dead")


def unit_status_counts(units: pl.DataFrame) -> pl.DataFrame:
    """How many units of each site and dictionary are alive, rare and dead.

    `units`: the units table (columns site, dictionary, status, ...). Returns one row per (site,
    dictionary), sorted by both, with columns site, dictionary and one count column per status that
    occurs anywhere in `units`, in the order alive, rare, dead (0 where a dictionary has none)."""
    present = [s for s in UNIT_STATUSES if s in set(units["status"])]
    counts = units.group_by("site", "dictionary", "status").len()
    return (counts.pivot(on="status", index=["site", "dictionary"], values="len")
            .select("site", "dictionary", *[pl.col(s).fill_null(0) for s in present])
            .sort("site", "dictionary"))


def compared_units(units: pl.DataFrame, site: str, sae: str) -> pl.DataFrame:
    """The units whose scores `compare` sets against each other at one site: the alive neurons (or
    residual dimensions) of `site` and the alive features of SAE `sae` there.

    Returns those rows of `units` with a column unit_type appended: the unit_kind for neurons
    ("neuron", "residual_dim"), the SAE's name for its features."""
    return (units.filter((pl.col("site") == site) & pl.col("dictionary").is_in(["neurons", sae])
                         & (pl.col("status") == "alive"))
            .with_columns(unit_type=pl.when(pl.col("dictionary") == "neurons").then(pl.col("unit_kind"))
                          .otherwise(pl.lit(sae))))


def example_units(units: pl.DataFrame) -> tuple[dict[str, object], dict[str, object]]:
    """The two units of the example cards, as rows of `units` (dicts of column -> value): a typical
    neuron and a typical feature of one site, not the extremes of either.

    The site is the first MLP site (by layer, then name) with an alive neuron and an alive SAE feature,
    else the first such residual site; the SAE is the first by name there (controls are not SAEs).
    Each card shows the median unit of its group: among the alive neurons (alive features) sorted by
    monosemanticity, then unit index, then table order, the one at position (n - 1) // 2 (the lower
    median). `units` needs columns site, site_kind, layer, dictionary, unit_kind, unit, status and
    monosemanticity. Raises ValueError when no site has both."""
    alive = units.filter(pl.col("status") == "alive")
    neurons = alive.filter(pl.col("dictionary") == "neurons")
    features = alive.filter((pl.col("dictionary") != "neurons") & (pl.col("unit_kind") != CONTROL))
    sites = (neurons.join(features.select("site").unique(), on="site")
             .select("site", "site_kind", "layer").unique()
             .sort(pl.col("site_kind") != "mlp", "layer", "site"))
    if sites.height == 0:
        raise ValueError("no site has both an alive neuron and an alive SAE feature to show on the example cards")
    site = sites["site"][0]
    at_site = features.filter(pl.col("site") == site)
    sae = sorted(set(at_site["dictionary"]))[0]

    def median_unit(group: pl.DataFrame) -> dict[str, object]:
        ranked = group.sort("monosemanticity", "unit", maintain_order=True)
        return ranked.row((ranked.height - 1) // 2, named=True)

    return (median_unit(neurons.filter(pl.col("site") == site)),
            median_unit(at_site.filter(pl.col("dictionary") == sae)))


def null_comparison(comparison: pl.DataFrame) -> pl.DataFrame:
    """The feature-minus-neuron difference of monosemanticity before and after the null, per site and
    SAE: rows of `comparison` (against the neurons) for the raw score, its excess over the null and
    the activity-matched difference, with a column `statistic` naming each (raw, excess over null,
    matched activity)."""
    names = {"monosemanticity": "raw", "monosemanticity_excess": "excess over null", MATCHED: "matched activity"}
    return (comparison.filter((pl.col("baseline") == "neurons") & ~pl.col("sae").str.starts_with(f"{CONTROL}:")
                              & pl.col("score").is_in(list(names)))
            .with_columns(statistic=pl.col("score").replace_strict(names)))


def control_comparison(comparison: pl.DataFrame) -> pl.DataFrame:
    """Every dictionary set against the neurons of its site on the excess over the null (SAEs and
    controls), and every SAE against each control: rows of `comparison` with score
    monosemanticity_excess, a column `kind` ("vs neurons" or "SAE vs control")."""
    excess = comparison.filter(pl.col("score") == "monosemanticity_excess")
    return excess.with_columns(kind=pl.when(pl.col("baseline") == "neurons").then(pl.lit("vs neurons"))
                               .otherwise(pl.lit("SAE vs control")))


def activity_curves(units: pl.DataFrame, site: str) -> pl.DataFrame:
    """Monosemanticity and its null against activity at one site: per dictionary and log2 bin of
    active tokens (alive units), the bin's lower edge 2^bin, the unit count, and the medians of
    monosemanticity and monosemanticity_null. Sorted by dictionary and bin."""
    alive = units.filter((pl.col("site") == site) & (pl.col("status") == "alive"))
    return (alive.with_columns(bin=pl.Series(activity_bins(alive["n_active"].to_numpy())))
            .group_by("dictionary", "unit_kind", "bin")
            .agg(pl.len().alias("n_units"), pl.col("monosemanticity").median(),
                 pl.col("monosemanticity_null").median())
            .with_columns(n_active=(2.0 ** pl.col("bin")))
            .sort("dictionary", "bin"))


def token_concept_labels(lexicons: pl.DataFrame) -> pl.DataFrame:
    """The concept each lexicon term stands for on the example cards: the most specific lexicon
    category listing it, i.e. the one with the fewest rows in `lexicons` (ties: by lexicon, then
    category name).

    `lexicons`: columns lexicon, category, term. Returns columns term and concept
    ("<lexicon>:<category>"), one row per distinct term, terms as they appear in `lexicons`."""
    category_size = lexicons.group_by("lexicon", "category").len()
    return (lexicons.join(category_size, on=["lexicon", "category"]).sort("len", "lexicon", "category")
            .unique("term", keep="first", maintain_order=True)
            .select("term", concept=pl.concat_str("lexicon", pl.lit(":"), "category")))


def context_concepts(contexts: list[dict[str, object]], labels: pl.DataFrame) -> list[str]:
    """The concept of each top context's token: the label (`token_concept_labels`) of the token's text,
    stripped and lower-cased, or "source:<document source> (no lexicon)" when no lexicon lists it.

    `contexts`: a unit's top_contexts (dicts with at least token and source); `labels`: columns term,
    concept. Returns one concept per context, in order."""
    concept_of = dict(zip(labels["term"].to_list(), labels["concept"].to_list(), strict=True))
    return [concept_of.get(str(c["token"]).strip().lower(), f"source:{c['source']} (no lexicon)") for c in contexts]


def site_dictionaries(cache: ActivationCache, sae_ids: list[str], sae_folders: list[str]
                      ) -> tuple[dict[str, torch.nn.Module], dict[str, str], float]:
    """The dictionaries scored at a cached site: its own units as "neurons" (unit kind `neuron` for an
    MLP site, `residual_dim` for the residual stream) and each SAE's features; and the lowest of the
    SAEs' attention-sink thresholds (tokens above it are left out of every dictionary's scores)."""
    dictionaries = {"neurons": IdentityDictionary(cache.header["shape"][1])}
    unit_kinds = {"neurons": "neuron" if cache.site.kind == "mlp" else "residual_dim"}
    thresholds = []
    for sae_id, folder in zip(sae_ids, sae_folders, strict=True):
        dictionaries[sae_id] = load_sae(folder)[0]
        unit_kinds[sae_id] = "feature"
        thresholds.append(json.loads((Path(folder) / "training_summary.json").read_text())["outlier_threshold"])
    return dictionaries, unit_kinds, min(thresholds, default=float("inf"))


@torch.no_grad()
def scored_moments(cache: ActivationCache, rows: np.ndarray, outlier_threshold: float, covariance: bool,
                   chunk: int = 8192) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """The rows `score_site` scores (norm at most `outlier_threshold`) and, with `covariance`, their
    mean [d] and covariance [d, d] (float64; else None)."""
    kept, total, products = [], 0.0, 0.0
    for part, x in cache.chunks(rows, chunk):
        keep = x.norm(dim=1) <= outlier_threshold
        kept.append(part[keep.numpy()])
        if covariance:
            x = x[keep].double()
            total, products = total + x.sum(0), products + x.T @ x
    kept = np.concatenate(kept)
    if not covariance:
        return kept, None, None
    mean = total / len(kept)
    return kept, mean, products / len(kept) - torch.outer(mean, mean)


@torch.no_grad()
def control_dictionaries(cache: ActivationCache, rows: np.ndarray, saes: dict[str, SparseAutoencoder],
                         outlier_threshold: float, seed: int, sample_size: int = 4096) -> dict[str, torch.nn.Module]:
    """The control dictionaries of a site, named `control:<name>` (see the module's docstring): built
    from the rows `score_site` will score (`rows` without the outliers above `outlier_threshold`),
    seeded. `saes`: the site's SAEs by id, each mirrored by a random-directions code (k: the SAE's,
    or for an SAE without a fixed k its mean L0 on a sample of `sample_size` rows, rounded) and by an
    untrained copy initialised as `train_sae` initialises it (same seed; on this sample)."""
    width = cache.header["shape"][1]
    controls: dict[str, torch.nn.Module] = {f"{CONTROL}:neurons_negative": IdentityDictionary(width, negated=True)}
    kept, mean, covariance = scored_moments(cache, rows, outlier_threshold, covariance=cache.site.kind == "resid")
    sample = cache.rows(np.sort(np.random.default_rng(seed).choice(kept, min(sample_size, len(kept)), replace=False)))
    for sae_id, sae in saes.items():
        k = sae.k if isinstance(sae, TopKSAE) else max(1, round(float((sae.encode(sample) > 0).sum(1).float().mean())))
        directions = TopKSAE(width, TopKSettings(d_sae=sae.d_sae, k=k, auxk_coefficient=0.0, auxk_k=0))
        # initialised on a zero sample: random unit-norm rows, encoder = decoder, b_enc = b_dec = 0
        directions.initialise(torch.zeros(1, width), torch.Generator().manual_seed(seed + 1))
        untrained = type(sae)(width, sae.settings)
        # train_sae also scales the sample to a mean squared norm of d_in first: every score here is
        # invariant to a positive scale of the activations, so that is left out
        untrained.initialise(sample, torch.Generator().manual_seed(seed))
        controls[f"{CONTROL}:random_directions:{sae_id}"] = directions.eval()
        controls[f"{CONTROL}:random_init:{sae_id}"] = untrained.eval()
    if cache.site.kind == "resid":
        axes = torch.linalg.eigh(covariance).eigenvectors.flip(1).float()  # by decreasing variance
        gaussian = torch.randn(width, width, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
        rotation = torch.linalg.qr(gaussian).Q.float()
        # the principal axes read the centred rows; the rotation only turns the residual basis
        for name, basis, centre in (("pca", axes, mean.float()), ("rotation", rotation, torch.zeros(width))):
            controls[f"{CONTROL}:{name}"] = LinearDictionary(basis, centre)
            controls[f"{CONTROL}:{name}_negative"] = LinearDictionary(-basis, centre)
    return controls


def check_alive_units(units: pl.DataFrame, min_active: int) -> None:
    """Refuse a dictionary none of whose units is scored (every later table and figure needs some),
    and warn when fewer than half are: the comparison then rests on few units."""
    n_tokens = units["n_scored_tokens"][0]
    for (dictionary,), group in units.group_by("dictionary", maintain_order=True):
        alive = int((group["status"] == "alive").sum())
        why = (f"{alive} of the {group.height} units of {dictionary} are active on polysemanticity.min_active = "
               f"{min_active} of the {n_tokens} tokens scored")
        if alive == 0:
            raise UserError(f"{why}, so none can be scored; lower polysemanticity.min_active or score more tokens "
                            "(tokens.heldout_tokens, or polysemanticity.split: all).")
        if 2 * alive < group.height:
            log.warning("%s: its scores rest on few units; lower polysemanticity.min_active or score more tokens", why)


def write_codes(rows: np.ndarray, codes: dict[str, SparseCodes], folder: str | Path) -> None:
    """`rows.npy` (the token-table rows scored, in order) and each SAE's `SparseCodes` on them."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        np.save(tmp / "rows.npy", rows.astype(np.int64))
        for name, part in codes.items():
            part.save(tmp, name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `polysemanticity`: `python -m mechinterp.polysemanticity --help`."""
    parser = argparse.ArgumentParser(description="Score neurons and SAE features of one site the same way.")
    parser.add_argument("--cache", required=True, help="the site's activation cache")
    parser.add_argument("--table", required=True)
    parser.add_argument("--lexicons", required=True)
    parser.add_argument("--saes", nargs="*", default=[], help="SAE folders trained on this site")
    parser.add_argument("--sae-ids", nargs="*", default=[])
    parser.add_argument("--settings", required=True, help="the config's `polysemanticity` section as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--units", required=True, help="output: one row per unit")
    parser.add_argument("--concepts", required=True, help="output: the most specific units per concept")
    parser.add_argument("--comparison", required=True, help="output: neurons against features, medians and CIs")
    parser.add_argument("--codes", required=True, help="output folder: the scored rows and each SAE's SparseCodes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ScoringSettings(**json.loads(args.settings))
    start = time.perf_counter()
    cache = ActivationCache.open(args.cache, args.table)
    dictionaries, unit_kinds, outlier_threshold = site_dictionaries(cache, args.sae_ids, args.saes)
    table = pl.read_parquet(args.table)
    rows, positions = split_rows(table, settings.split)
    rows = rows[positions != 0]
    if settings.controls:
        controls = control_dictionaries(cache, rows, {sae_id: dictionaries[sae_id] for sae_id in args.sae_ids},
                                        outlier_threshold, args.seed)
        dictionaries |= controls
        unit_kinds |= dict.fromkeys(controls, CONTROL)
    units, concepts, scored_rows, codes = score_site(cache, table, rows, dictionaries, unit_kinds,
                                                     pl.read_parquet(args.lexicons), settings, outlier_threshold,
                                                     args.seed)
    check_alive_units(units.filter(pl.col("unit_kind") != CONTROL), settings.min_active)
    site = cache.site
    site_columns = [pl.lit(site.id).alias("site"), pl.lit(site.kind).alias("site_kind"),
                    pl.lit(site.layer).alias("layer")]
    units = units.select(*site_columns, pl.all())
    comparison = compare(units, settings.bootstrap_samples, args.seed, settings.matched_bin_min_units
                         ).select(*site_columns, pl.all())
    write_parquet(units, args.units)
    write_parquet(concepts.select(*site_columns, pl.all()), args.concepts)
    write_parquet(comparison, args.comparison)
    write_codes(scored_rows, codes, args.codes)
    log.info("scored %d units on %d tokens in %.1f s", units.height, units["n_scored_tokens"][0],
             time.perf_counter() - start)
    for row in comparison.filter(pl.col("score").is_in(["monosemanticity", "monosemanticity_excess", MATCHED])
                                 ).iter_rows(named=True):
        log.info("%s vs %s: %s median %.3f vs %.3f, difference %.3f [%.3f, %.3f]", row["sae"], row["baseline"],
                 row["score"], row["median_features"], row["median_neurons"], row["difference"], row["ci_low"],
                 row["ci_high"])


if __name__ == "__main__":
    run_stage(main)
