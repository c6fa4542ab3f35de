"""Helpers the figure notebooks share: one figure style, atomic PNG + SVG output, and notebook
execution through papermill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechinterp.files import atomic_path


def save_figure(fig, figure_dir: str | Path, stem: str) -> list[Path]:
    """Write `fig` as `<figure_dir>/<stem>.png` and `.svg`, each renamed into place when complete."""
    paths = []
    for ext in ("png", "svg"):
        path = Path(figure_dir) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


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
