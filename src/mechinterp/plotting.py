"""Helpers the figure notebooks share: one figure style, atomic PNG + SVG output shown inline in the
notebook, notebook execution through papermill, and reading the figures back out of the HTML export."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from mechinterp.errors import run_stage
from mechinterp.files import atomic_path

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One colour per kind of unit in every figure (seaborn's colour-blind palette, as hex): a feature is blue
# wherever it is drawn, a neuron green, a control grey or brown. Keys are the labels the tables give
# (clamping_stats.unit_label, the polysemanticity units' unit_kind).
UNIT_KIND_COLOURS = {
    "feature": "#0173b2", "feature (input)": "#0173b2", "feature (output)": "#de8f05",
    "neuron": "#029e73", "neuron (output)": "#029e73", "residual_dim": "#029e73",
    "correlated_neuron": "#d55e00", "correlated_neuron (input)": "#d55e00", "correlated_neuron (output)": "#fbafe4",
    "diffmean": "#cc78bc", "random": "#949494", "random (pool)": "#949494", "random (pool_mean)": "#949494",
    "best_random": "#56b4e9", "random (best_of_pool)": "#56b4e9", "control": "#ca9161",
}


def save_figure(fig, figure_dir: str | Path, stem: str) -> list[Path]:
    """Write `fig` as `<figure_dir>/<stem>.png` and `.svg`, each renamed into place when complete, then
    show the PNG file's exact bytes as the cell's output (when running in an IPython kernel) and close
    the figure. The notebook's HTML export therefore embeds the very PNG file the workflow delivers, and
    the figure is shown once: notebooks call this instead of `plt.show()`."""
    import matplotlib.pyplot as plt

    paths = []
    try:
        for ext in ("png", "svg"):
            path = Path(figure_dir) / f"{stem}.{ext}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
            paths.append(path)
        _display_png(paths[0].read_bytes())
    finally:
        plt.close(fig)
    return paths


def context_card(contexts: list[dict[str, Any]], concepts: list[str], title: str):
    """A unit's card: one line per top context (its activation, the concept of its token on a colour of
    its own, the context text). `contexts` as the polysemanticity stage's `top_contexts`, `concepts` one
    label per context (polysemanticity.context_concepts). Returns the figure, for `save_figure`."""
    import textwrap

    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = dict(zip(dict.fromkeys(concepts), sns.color_palette("tab10", 10) * 3))
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.42 * len(contexts)))
    ax.axis("off")
    for i, (c, concept) in enumerate(zip(contexts, concepts, strict=True)):
        text = c["context"].replace("\n", " ⏎ ")
        y = 1 - (i + 0.5) / len(contexts)
        ax.text(0.0, y, f"{c['activation']:.2f}", fontsize=8, va="center", family="monospace")
        ax.text(0.06, y, textwrap.shorten(concept, 42), fontsize=8, va="center",
                bbox={"facecolor": palette[concept], "alpha": 0.35, "edgecolor": "none"})
        ax.text(0.40, y, textwrap.shorten(text, 90), fontsize=8, va="center")
    ax.set_title(title, fontsize=9, loc="left")
    return fig


def _display_png(png: bytes) -> None:
    """Display PNG bytes as an output of the running notebook cell; nothing outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return
    if get_ipython() is not None:
        display(Image(data=png, format="png"))


class _ImageSources(HTMLParser):
    """Collects the `src` attribute of every <img> tag (entities already unescaped by the parser)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.extend(value for name, value in attrs if name == "src" and value)

    handle_startendtag = handle_starttag


_PNG_DATA_URI = re.compile(r"^\s*data:image/png(?:;[^,;]+=[^,;]*)*;base64,(?P<data>.*)$", re.IGNORECASE | re.DOTALL)


def embedded_pngs(html_text: str) -> list[bytes]:
    """The PNG images embedded in an HTML page as `<img src="data:image/png;base64,...">`, decoded, in
    document order (whitespace inside the base64 text is ignored). Images linked by URL, other image
    types and data that does not decode to a PNG are left out."""
    parser = _ImageSources()
    parser.feed(html_text)
    parser.close()
    images = []
    for source in parser.sources:
        match = _PNG_DATA_URI.match(source)
        if match is None:
            continue
        try:
            data = base64.b64decode("".join(match["data"].split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        if data.startswith(PNG_SIGNATURE):
            images.append(data)
    return images


def render_notebook(notebook: str | Path, out: str | Path, html: str | Path, parameters: dict[str, Any]) -> None:
    """Execute a notebook with papermill (its cell tagged `parameters` gets `parameters`), then write the
    executed notebook and an HTML copy; neither appears under its final name unless execution succeeded."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    with atomic_path(out) as tmp_notebook:
        papermill.execute_notebook(str(notebook), str(tmp_notebook), parameters=parameters,
                                   kernel_name="python3", progress_bar=True, cwd=str(Path.cwd()))
        body, _ = HTMLExporter().from_notebook_node(nbformat.read(tmp_notebook, as_version=4))
        with atomic_path(html) as tmp_html:
            tmp_html.write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `figures_*` rules: `python -m mechinterp.plotting --help`."""
    parser = argparse.ArgumentParser(description="Execute a figure notebook with papermill and export HTML.")
    parser.add_argument("--notebook", required=True)
    parser.add_argument("--out", required=True, help="the executed notebook")
    parser.add_argument("--html", required=True)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter; VALUE is read as JSON when it parses, else as a string")
    args = parser.parse_args(argv)
    parameters = {}
    for key, value in args.parameter:
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value  # a plain string, such as a path
    render_notebook(args.notebook, args.out, args.html, parameters)
    log.info("rendered %s -> %s, %s", args.notebook, args.out, args.html)


if __name__ == "__main__":
    run_stage(main)
