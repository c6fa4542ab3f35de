"""Figures reach the notebook's HTML: save_figure shows the PNG file it wrote, byte for byte, and
embedded_pngs reads the images back out of an HTML page."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nbformat

from mechinterp.plotting import PNG_SIGNATURE, embedded_pngs, render_notebook, save_figure


def tiny_png(color: str) -> bytes:
    from io import BytesIO

    fig, ax = plt.subplots(figsize=(0.5, 0.5))
    ax.set_facecolor(color)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=20)
    plt.close(fig)
    return buffer.getvalue()


def test_embedded_pngs_decodes_png_data_uris_in_document_order_and_skips_the_rest():
    first, second = tiny_png("red"), tiny_png("blue")
    encoded = base64.b64encode(second).decode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))  # line-wrapped base64
    html = (f'<html><body><p>text</p><img alt="a" src="data:image/png;base64,{base64.b64encode(first).decode()}">'
            f"<IMG SRC='data:image/png;base64,{wrapped}\n'/>"
            f'<img src="data:image/jpeg;base64,{base64.b64encode(b"not a png").decode()}">'
            '<img src="figure.png"><img src="data:image/png;base64,!!!notbase64">'
            f'<img src="data:image/png;base64,{base64.b64encode(b"plain bytes").decode()}">'
            f'<pre>data:image/png;base64,{base64.b64encode(first).decode()}</pre></body></html>')
    assert embedded_pngs(html) == [first, second]
    assert embedded_pngs("<html><body>no images</body></html>") == []


def test_save_figure_writes_png_and_svg_and_closes_the_figure_outside_a_kernel(tmp_path, capsys):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "figures", "line")
    assert [p.name for p in paths] == ["line.png", "line.svg"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert paths[1].read_text().lstrip().startswith("<?xml")
    assert not plt.fignum_exists(fig.number)
    assert capsys.readouterr().out == ""  # nothing displayed (or printed) without IPython
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["line.png", "line.svg"]  # no partial files


def test_rendered_notebook_html_embeds_each_figure_file_once(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook.cells = [
        nbformat.v4.new_code_cell('figure_dir = "unset"\ncolors = []', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import matplotlib\n\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n\n"
            "from mechinterp.plotting import save_figure\n\n"
            "for i, color in enumerate(colors):\n"
            "    fig, ax = plt.subplots(figsize=(2, 1.5))\n"
            "    ax.bar([0, 1], [1, 2], color=color)\n"
            "    save_figure(fig, figure_dir, f'bars_{i}')\n"
            "assert plt.get_fignums() == []"),
    ]
    source = tmp_path / "tiny.ipynb"
    nbformat.write(notebook, source)
    figure_dir = tmp_path / "figures"
    out, html = tmp_path / "out" / "tiny.ipynb", tmp_path / "out" / "tiny.html"
    render_notebook(source, out, html, {"figure_dir": str(figure_dir), "colors": ["C0", "C3"]})

    images = embedded_pngs(html.read_text(encoding="utf-8"))
    pngs = [(figure_dir / f"bars_{i}.png").read_bytes() for i in range(2)]
    assert pngs[0] != pngs[1]
    assert images == pngs  # each figure file, byte for byte, shown once and in order
    executed = nbformat.read(out, as_version=4)
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
    assert [o.output_type for o in outputs] == ["display_data", "display_data"]
