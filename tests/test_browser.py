"""The feature browser: its pure functions on small arrays, then the site built by the smoke run, driven
in headless Chromium (Debian's package, through Playwright) from file:// as a user opens it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from mechinterp.activations import ActivationCache
from mechinterp.browser import (Lookup, Windows, aligned_features, data_script, histogram, logit_effects,
                                quantile_samples, round_value, write_directions)
from mechinterp.files import sha256_file
from mechinterp.polysemanticity import SparseCodes
from mechinterp.saes import load_sae
from mechinterp.sites import Site

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


# --- pure functions -------------------------------------------------------------------------------

def test_lookup_reads_activations_at_any_row_and_unit():
    dense = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    lookup = Lookup.of(SparseCodes.from_dense(dense), 3)
    rows, units = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(lookup(rows.ravel(), units.ravel()).reshape(4, 3), dense.numpy())


def test_quantile_samples_cover_every_group_once_and_skip_the_top_contexts():
    rng = np.random.default_rng(0)
    values = rng.random(1000).astype(np.float32)
    positions = np.arange(1000) * 3
    top = set(positions[np.argsort(-values)[:8]].tolist())
    groups = quantile_samples(positions, values, 10, 2, top, np.random.default_rng(1))
    assert len(groups) == 10
    by_position = dict(zip(positions.tolist(), values.tolist(), strict=True))
    assert all(low >= next_high for (low, _, _), (_, next_high, _) in zip(groups, groups[1:], strict=False))
    for low, high, picked in groups:
        assert len(picked) == 2 and not set(picked) & top
        assert all(low <= by_position[p] <= high for p in picked)
    again = quantile_samples(positions, values, 10, 2, top, np.random.default_rng(1))
    assert again == groups  # seeded
    assert quantile_samples(positions[:3], values[:3], 10, 1, set(), np.random.default_rng(0))[0][2]  # few values


def test_window_span_is_the_polysemanticity_context():
    table = pl.DataFrame({"sequence": [0] * 6 + [1] * 6, "position": list(range(6)) * 2,
                          "token": [f"t{i}" for i in range(12)]})
    windows = Windows.of(np.arange(1, 12), table, before=3, after=2)
    assert windows.span(2) == (0, 5)  # clipped at the window's start
    assert windows.span(10) == (7, 12)  # at the table's end
    assert windows.span(5) == (2, 6)  # not into the next window
    lookup = Lookup.of(SparseCodes.from_dense(torch.arange(11.0)[:, None]), 1)  # activation = scored position
    assert windows.contexts(lookup, 0, [8, 1]) == [[8, [5, 6, 7, 8, 9]], [1, [None, 0, 1, 2]]]  # row 0 (BOS): not scored
    assert windows.contexts(lookup, 0, []) == []


def test_logit_effects_rank_the_unembedding_of_each_direction():
    torch.manual_seed(0)
    directions, weight, unembed = torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(40, 8)
    effects = logit_effects(directions, weight, False, unembed, k=4, bins=5, chunk=2)
    logits = (directions * weight) @ unembed.T
    torch.testing.assert_close(effects.promoted, logits.topk(4).values)
    torch.testing.assert_close(effects.suppressed, -(-logits).topk(4).values)
    assert torch.equal(effects.promoted_ids, logits.topk(4).indices)
    for u in range(5):  # the histogram of every token's effect, from the lowest to the highest
        expected = np.histogram(logits[u].numpy(), bins=5, range=(float(effects.low[u]), float(effects.high[u])))[0]
        assert np.abs(effects.counts[u].numpy() - expected).sum() <= 2 and effects.counts[u].sum() == 40  # edges: ulps
    centred = logit_effects(directions, None, True, unembed, k=1, bins=2).promoted
    torch.testing.assert_close(centred, ((directions - directions.mean(1, keepdim=True)) @ unembed.T).max(1, keepdim=True).values)


def test_aligned_features_are_the_closest_decoder_directions():
    decoder = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 2.0], [-1.0, -0.1]])
    ids, cosine = aligned_features(decoder, decoder, 2, exclude_self=True)
    assert ids.tolist() == [[1, 2], [0, 2], [1, 0], [2, 0]]
    assert cosine[0, 0] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)
    ids, _ = aligned_features(decoder, torch.eye(2), 1, exclude_self=False)  # a coordinate: who writes most into it
    assert ids.tolist() == [[0], [2]]


def test_write_directions_take_each_unit_at_its_deepest_site():
    sites = [Site("resid", 1), Site("mlp", 2)]
    mlp_out = torch.randn(6, 4)  # an MLP site of width 6 writes into a residual stream of width 4

    def to_residual(site, block):
        return block if site.kind == "resid" else block @ mlp_out

    directions = torch.zeros(3, 4 + 6)
    directions[0, :4] = torch.tensor([1.0, 2, 3, 4])  # only at the first site: read there
    directions[1, 4:] = 1.0  # only at the deeper site: through its output weights
    directions[2] = 1.0  # at both: the deeper site's block, what the unembedding reads
    writes = write_directions(to_residual, sites, [slice(0, 4), slice(4, 10)], directions)
    torch.testing.assert_close(writes[0], directions[0, :4])
    torch.testing.assert_close(writes[1], torch.ones(6) @ mlp_out)
    torch.testing.assert_close(writes[2], torch.ones(6) @ mlp_out)


def test_histogram_and_rounding():
    assert histogram(np.array([0.5, 0.9, 2.5, 4.0], np.float32), 4) == {"max": 4.0, "counts": [2, 0, 1, 1]}
    assert histogram(np.zeros(0, np.float32), 3)["counts"] == [0, 0, 0]
    assert round_value(0.0) == 0 and isinstance(round_value(0.0), int) and round_value(12.3456) == 12.3


def test_data_script_keeps_every_string_inside_the_script():
    planted = '</script><script>alert(1)</script>"\u2028\u00e9'
    text = data_script("key", {"s": planted})
    assert text.isascii() and text.startswith('MI.put("key", {') and text.endswith("});\n")
    assert json.loads(text[len('MI.put("key", '):-3])["s"] == planted


# --- the smoke run's browser, in Chromium -----------------------------------------------------------

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is missing: bash scripts/install_browser.sh")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A page of the browser opened from file://, recording console errors and uncaught exceptions."""

    def __init__(self, browser, folder: Path):
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.folder = folder
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str, ready: str):
        """Load `path` (index.html and its hash) afresh, and wait for the `ready` selector."""
        self.page.goto("about:blank")  # else a new hash re-renders in place, and `ready` may match the old view
        self.page.goto((self.folder / path.split("#")[0]).as_uri() + ("#" + path.split("#")[1] if "#" in path else ""))
        self.page.wait_for_selector(ready)
        return self.page


@pytest.fixture(scope="module")
def smoke(smoke_run):
    results = smoke_run / "results" / "smoke"
    return {"results": results, "browser": results / "browser",
            "units": pl.read_parquet(results / "polysemanticity" / "units.parquet"),
            "table": pl.read_parquet(results / "tokens" / "token_table.parquet")}


def live_units(units: pl.DataFrame, site: str, dictionary: str) -> pl.DataFrame:
    return units.filter((pl.col("site") == site) & (pl.col("dictionary") == dictionary) & (pl.col("status") != "dead"))


def table_rows(page) -> list[int]:
    return [int(u) for u in page.eval_on_selector_all("#units tbody tr", "rows => rows.map(r => r.dataset.unit)")]


@pytest.mark.e2e
@needs_chromium
def test_index_pages_load_and_list_every_live_unit(browser, smoke):
    page = Page(browser, smoke["browser"])
    index = page.open("index.html", "table.saes tbody tr")
    assert sorted(index.eval_on_selector_all("table.saes tbody tr", "r => r.map(x => x.dataset.sae)")) == [
        "crosscoder", "mlp3-relu", "resid3-topk"]
    assert index.get_attribute("a[href='../report.html']", "href") == "../report.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    index.screenshot(path=ARTIFACTS / "browser-index.png", full_page=True)
    # the crosscoder's latents beside the dimensions of its stacked sites, as an SAE's features beside neurons
    crosscoder_units = pl.read_parquet(smoke["results"] / "crosscoder" / "units.parquet")
    for sae, site, units in (("resid3-topk", "resid3", smoke["units"]), ("mlp3-relu", "mlp3", smoke["units"]),
                             ("crosscoder", "resid3+mlp3", crosscoder_units)):
        for dictionary, name in (("features", sae), ("neurons", "neurons")):
            table = page.open(f"index.html#view=table&sae={sae}&dict={dictionary}", "#units tbody tr")
            expected = live_units(units, site, name)
            assert sorted(table_rows(table)) == expected["unit"].sort().to_list()
            dead = units.filter((pl.col("site") == site) & (pl.col("dictionary") == name)
                                & (pl.col("status") == "dead")).height
            assert f"{dead} dead" in table.inner_text("#main")
            # issue 30: the neurons' missing dense list was shown as the text "null"
            assert "null" not in [line.strip() for line in table.inner_text("#main").splitlines()]
    table = page.open("index.html#view=table&sae=resid3-topk&dict=features", "#units tbody tr")
    table.click("th[data-key='monosemanticity']")  # sorted, highest first
    shown = table.eval_on_selector_all("#units tbody tr td:nth-child(3)", "c => c.map(x => x.textContent)")
    values = [float(v) for v in shown if v != "–"]
    assert values == sorted(values, reverse=True) and len(values) > 10
    table.screenshot(path=ARTIFACTS / "browser-features.png")

    # the front page names every unit clamped at the SAE's site (the difference-of-means vector is no unit)
    targets = pl.read_parquet(smoke["results"] / "clamping" / "targets.parquet").filter(
        (pl.col("sae") == "resid3-topk") & (pl.col("unit_kind") != "diffmean"))
    index = page.open("index.html", "details.named")
    links = index.eval_on_selector_all("details.named[data-sae='resid3-topk'] li", "li => li.map(x => x.textContent)")
    assert sum("clamped for" in text for text in links) == targets.height
    index.click("details.named[data-sae='resid3-topk'] summary")
    index.click("details.named[data-sae='resid3-topk'] li a")
    index.wait_for_selector(".panel")
    assert page.errors == []

    # issue 30: a link's dictionary named a script outside the site, which the page loaded and ran; only the
    # site's own names reach an address now
    for view in ("table", "unit"):
        refused = page.open(f"index.html#view={view}&sae=resid3-topk&dict=../../../evil/x&unit=0", "p.error")
        assert "no dictionary ../../../evil/x of resid3-topk (have: features, neurons)" in refused.inner_text("p.error")
        assert not any("evil" in src for src in refused.eval_on_selector_all("script", "s => s.map(x => x.src)"))


@pytest.mark.e2e
@needs_chromium
def test_search_keeps_the_features_whose_top_contexts_contain_the_token(browser, smoke):
    features = live_units(smoke["units"], "resid3", "resid3-topk")
    tokens = smoke["table"]["token"].to_list()
    top_tokens = {row["unit"]: {tokens[c["row"]].strip().lower() for c in row["top_contexts"]}
                  for row in features.iter_rows(named=True)}
    concepts = {row["unit"]: (row["best_concept"] or "").lower() for row in features.iter_rows(named=True)}
    counts: dict[str, int] = {}
    for found in top_tokens.values():
        for token in found:
            counts[token] = counts.get(token, 0) + 1
    # a word token shared by several features but not all, and inside no concept's name
    query = next(t for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                 if re.fullmatch(r"[a-z]{3,}", t) and n < len(features) // 2 and not any(t in c for c in concepts.values()))
    expected = sorted(u for u, found in top_tokens.items() if query in found)
    page = Page(browser, smoke["browser"])
    table = page.open("index.html#view=table&sae=resid3-topk&dict=features", "#units tbody tr")
    table.fill("#search", f"  {query.upper()} ")
    assert sorted(table_rows(table)) == expected and 0 < len(expected) < features.height
    assert page.errors == []


@pytest.mark.e2e
@needs_chromium
def test_feature_page_shows_the_cached_activations_and_the_unembedding_of_its_decoder(browser, smoke):
    results, table = smoke["results"], smoke["table"]
    features = live_units(smoke["units"], "resid3", "resid3-topk").filter(pl.col("status") == "alive")
    unit = features.sort("n_active", descending=True)["unit"][0]
    page = Page(browser, smoke["browser"])
    listing = page.open("index.html#view=table&sae=resid3-topk&dict=features", "#units tbody tr")
    listing.click(f"#units tbody tr[data-unit='{unit}'] td:first-child a")
    feature = listing.wait_for_selector(".contexts.top .context") and listing
    assert f"feature {unit}" in feature.title()
    feature.screenshot(path=ARTIFACTS / "browser-feature.png", full_page=True)

    sae, _ = load_sae(results / "saes" / "resid3-topk")
    cache = ActivationCache.open(results / "activations" / "resid3.npy")
    contexts = feature.query_selector_all(".contexts.top .context")
    expected_top = features.filter(pl.col("unit") == unit)["top_contexts"][0]
    assert len(contexts) == len(expected_top)
    for context, planned in zip(contexts, expected_top, strict=True):
        first, last, row = (int(context.get_attribute(f"data-{k}")) for k in ("first", "last", "row"))
        assert row == planned["row"] and first <= row <= last
        assert context.query_selector(".tokens").text_content() == "".join(table["token"][first : last + 1])
        shown = [(int(t.get_attribute("data-row")), t.get_attribute("data-act"))
                 for t in context.query_selector_all(".tok")]
        scored = [(r, float(a)) for r, a in shown if a != ""]
        strongest = max(scored, key=lambda p: p[1])[0]
        with torch.no_grad():
            cached = sae.encode(cache.rows(np.array([r for r, _ in scored])))[:, unit].numpy()
        assert strongest == scored[int(np.argmax(cached))][0] == row
        # the page keeps three significant digits (browser.round_value): up to half a unit of the third
        # digit, 5e-3 of a value just above a power of ten (1.0961 is shown as 1.1)
        np.testing.assert_allclose([a for _, a in scored], cached, rtol=5e-3, atol=1e-3)

    # promoted tokens: the decoder row through the final norm's scale and the (tied) unembedding
    weights = load_file(results / "model" / "model.safetensors")
    unembed = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    decoder = load_file(results / "saes" / "resid3-topk" / "sae_weights.safetensors")["W_dec"][unit]
    logits = (decoder * weights["model.norm.weight"]) @ unembed.T
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(results / "model")
    top = logits.topk(10)
    rows = feature.query_selector_all(".logits.promoted tr")
    assert [r.query_selector(".tok-text").text_content() for r in rows] == [
        tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(top.indices.tolist())]
    np.testing.assert_allclose([float(r.query_selector(".num").text_content()) for r in rows], top.values.numpy(),
                               rtol=5e-3)
    # aligned features: the other decoder rows of the largest cosine similarity
    rows_all = load_file(results / "saes" / "resid3-topk" / "sae_weights.safetensors")["W_dec"]
    rows_all = rows_all / rows_all.norm(dim=1, keepdim=True)
    cosine = rows_all @ rows_all[unit]
    cosine[unit] = -2
    shown = [int(a.get_attribute("href").split("unit=")[1]) for a in feature.query_selector_all("table.aligned a")]
    assert shown == cosine.topk(3).indices.tolist()
    assert page.errors == []


@pytest.mark.e2e
@needs_chromium
def test_a_clamped_feature_shows_its_selection_scores_and_effect_curve(browser, smoke):
    results = smoke["results"]
    target = pl.read_parquet(results / "clamping" / "targets.parquet").filter(
        (pl.col("sae") == "resid3-topk") & (pl.col("unit_kind") == "feature") & (pl.col("selection") == "output")).row(
        0, named=True)
    scores = pl.read_parquet(results / "clamping" / "scores.parquet").filter(
        (pl.col("sae") == "resid3-topk") & (pl.col("unit_kind") == "feature") & (pl.col("unit") == target["unit"]))
    page = Page(browser, smoke["browser"])
    shown = page.open(f"index.html#view=unit&sae=resid3-topk&dict=features&unit={target['unit']}", ".clamping")
    concepts = shown.eval_on_selector_all("table.selection tbody tr td:first-child", "c => c.map(x => x.textContent)")
    assert sorted(concepts) == sorted(scores["concept"]) and target["concept"] in concepts
    output = scores.filter(pl.col("concept") == target["concept"])["output_score"][0]
    assert output == pytest.approx(target["output_score"])
    headings = shown.eval_on_selector_all(".clamping h3", "h => h.map(x => x.textContent)")
    assert f"{target['concept']} — clamped as feature (output)" in headings
    # every unit its own strengths: the probes, then those aimed at its KL targets (a repeat counts once)
    strengths = pl.read_parquet(results / "clamping" / "effects.parquet").filter(
        (pl.col("site") == target["site"]) & (pl.col("concept") == target["concept"])
        & (pl.col("unit_kind") == "feature") & (pl.col("selection") == "output"))["strength"].n_unique()
    curves = shown.query_selector_all(".clamping .curves polyline")
    points = {c.get_attribute("stroke-width"): len(c.get_attribute("points").split()) for c in curves}
    assert len(curves) >= 5 and points["3"] == strengths >= 3  # the clamped unit's own curve, drawn bold
    assert page.errors == []


@pytest.mark.e2e
@needs_chromium
def test_compare_and_prompt_views_read_the_cache(browser, smoke):
    results = smoke["results"]
    neurons = live_units(smoke["units"], "resid3", "neurons")
    neuron = neurons.sort("best_feature_correlation", descending=True).row(0, named=True)
    page = Page(browser, smoke["browser"])
    compare = page.open(f"index.html#view=compare&sae=resid3-topk&neuron={neuron['unit']}", ".compare .panel")
    panels = compare.eval_on_selector_all(".compare .panel", "p => p.map(x => [x.dataset.dict, Number(x.dataset.unit)])")
    assert panels == [["neurons", neuron["unit"]], ["features", neuron["best_feature"]]]

    prompts = page.open("index.html#view=prompts&sae=resid3-topk", ".prompt .tok")
    token = prompts.query_selector_all(".prompt .tok:not(.unscored)")[5]
    row = int(token.get_attribute("data-row"))
    token.click()
    listed = [int(a.get_attribute("href").split("unit=")[1]) for a in prompts.query_selector_all("#firing li a")]
    sae, _ = load_sae(results / "saes" / "resid3-topk")
    with torch.no_grad():
        acts = sae.encode(ActivationCache.open(results / "activations" / "resid3.npy").rows(np.array([row])))[0]
    assert listed == acts.topk(len(listed)).indices.tolist() and len(listed) == 5
    assert page.errors == []


@pytest.mark.e2e
@needs_chromium
def test_markup_planted_in_a_document_is_shown_as_text(browser, smoke, tmp_path):
    results = smoke["results"]
    features = live_units(smoke["units"], "resid3", "resid3-topk").filter(pl.col("status") == "alive")
    unit = features["unit"][0]
    row = features["top_contexts"][0][0]["row"]
    planted = {row: '<img src=x onerror="window.__planted = 1">', row - 1: "<script>window.__planted = 2</script>",
               row + 1: '" onmouseover="window.__planted = 3" x="'}
    table = smoke["table"].with_row_index("i").with_columns(
        token=pl.col("i").replace_strict(planted, default=pl.col("token"), return_dtype=pl.Utf8),
        source=pl.when(pl.col("i") == row).then(pl.lit("</span><b id='planted'>x</b>")).otherwise(pl.col("source")),
    ).drop("i")
    table.write_parquet(tmp_path / "token_table.parquet")
    # the cache as if made from the planted table (a cache is refused with any other token table)
    (tmp_path / "resid3.npy").symlink_to(results / "activations" / "resid3.npy")
    header = json.loads((results / "activations" / "resid3.json").read_text())
    header["token_table_sha256"] = sha256_file(tmp_path / "token_table.parquet")
    (tmp_path / "resid3.json").write_text(json.dumps(header))
    out = tmp_path / "browser"
    poly = results / "polysemanticity"
    clamping = [f"--{n}={results / 'clamping' / f'{n}.parquet'}" for n in ("targets", "effects", "comparisons",
                                                                           "continuations", "scores")]
    settings = json.loads((results / "MANIFEST.json").read_text())["config"]
    build = [sys.executable, "-m", "mechinterp.browser"]
    subprocess.run([*build, "sae", "--sae-id", "resid3-topk", "--sae", str(results / "saes" / "resid3-topk"),
                    "--cache", str(tmp_path / "resid3.npy"), "--units", str(poly / "units.parquet"),
                    "--codes", str(poly / "resid3.codes"), "--table", str(tmp_path / "token_table.parquet"),
                    "--model", str(results / "model"), *clamping,
                    "--polysemanticity", json.dumps(settings["polysemanticity"]),
                    "--settings", json.dumps(settings["browser"]), "--seed", "0", "--threads", "2",
                    "--out", str(out / "resid3-topk")], check=True, capture_output=True)
    subprocess.run([*build, "site", "--summaries", str(out / "resid3-topk" / "summary.json"), "--table",
                    str(tmp_path / "token_table.parquet"), "--split", "heldout", "--pages", str(REPO / "workflow" / "browser"),
                    "--run", "planted", "--model-name", "planted", "--out", str(out)], check=True, capture_output=True)
    page = Page(browser, out)
    shown = page.open(f"index.html#view=unit&sae=resid3-topk&dict=features&unit={unit}", ".contexts.top .context")
    context = shown.query_selector(f".contexts.top .context[data-row='{row}']")
    text = context.text_content()
    for markup in planted.values():
        assert markup in text
    assert "</span><b id='planted'>x</b>" in text
    context.hover()
    shown.hover(f".tok[data-row='{row + 1}']")
    assert shown.evaluate("window.__planted") is None
    assert shown.query_selector("img, b#planted, .context script") is None
    table_page = page.open("index.html#view=table&sae=resid3-topk&dict=features", "#units tbody tr")
    assert table_page.evaluate("window.__planted") is None and table_page.query_selector("img") is None
    assert page.errors == []
    shutil.rmtree(out)
