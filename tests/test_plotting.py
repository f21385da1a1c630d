"""Figure saving (valid PDF/PNG, atomic, panels, byte-reproducible), paper style without font warnings, the
quick-run helpers (fit_limits, place_legend), and common.py helpers."""
import logging
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

import plotting
from conftest import CODE, REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def two_panel_figure():
    fig, axes = plotting.plt.subplots(1, 2, figsize=(8, 3))
    for ax in axes:
        ax.plot([0, 1, 2], [1, 0, 1], "r-")
        ax.set_xlabel(r"Hyperparameter $\lambda$")
    return fig, axes


def test_backend_is_headless():
    assert plotting.matplotlib.get_backend().lower() == "agg"


def test_paper_dir_is_beside_the_code():
    assert plotting.PAPER_DIR == REPO / "paper"


def test_save_figure_writes_valid_pdf_and_png(tmp_path):
    fig, _ = two_panel_figure()
    out = tmp_path / "new" / "folder"
    paths = plotting.save_figure(fig, "demo", out)
    plotting.close(fig)
    assert paths == [out / "demo.pdf", out / "demo.png"]
    assert (out / "demo.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "demo.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    assert png_size(out / "demo.png") == (800, 300)  # savefig.dpi 100
    assert sorted(p.name for p in out.iterdir()) == ["demo.pdf", "demo.png"]  # no temporary files left


def test_save_figure_replaces_existing_files_and_cleans_up_on_failure(tmp_path):
    fig, _ = two_panel_figure()
    (tmp_path / "demo.png").write_bytes(b"old")
    plotting.save_figure(fig, "demo", tmp_path, formats=("png",))
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plotting.save_figure(fig, "demo", tmp_path, formats=("not-a-format",))
    plotting.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png"]


def test_save_panel_is_smaller_than_the_figure(tmp_path):
    fig, axes = two_panel_figure()
    whole = plotting.save_figure(fig, "whole", tmp_path, formats=("png",))[0]
    panel = plotting.save_panel(fig, axes[1], "panel", tmp_path)
    plotting.close(fig)
    assert [p.suffix for p in panel] == [".pdf", ".png"]
    assert panel[0].read_bytes()[:5] == b"%PDF-"
    (pw, ph), (fw, fh) = png_size(panel[1]), png_size(whole)
    assert pw < 0.75 * fw and pw * ph < 0.75 * fw * fh  # (the padding may add a margin above and below)
    assert len(list(tmp_path.iterdir())) == 3


def test_paper_style_uses_stix_without_font_warnings(tmp_path, caplog):
    from matplotlib import font_manager

    plotting.set_paper_style(font_size=17)
    assert plotting.plt.rcParams["font.size"] == 17
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, "matplotlib.font_manager"):
        warnings.simplefilter("always")
        font = font_manager.findfont(font_manager.FontProperties(family="serif"), fallback_to_default=False)
        fig, _ = two_panel_figure()
        fig.suptitle(r"Validation Loss $\mathcal{L}_{\mathrm{Valid.}}$ $-1.5$")
        plotting.save_figure(fig, "styled", tmp_path)
        plotting.close(fig)
    assert "STIXGeneral" in font
    font_messages = [r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING or "not found" in r.getMessage()]
    assert font_messages == []
    assert [str(w.message) for w in caught if "font" in str(w.message).lower()] == []


def test_resolve_out_dir_creates_folders(tmp_path):
    assert plotting.resolve_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


# ------------------------------------------------------------------------------- reproducible bytes

DRAW_SCRIPT = """
import sys
import plotting
plotting.set_paper_style(font_size=20)
fig, axes = plotting.plt.subplots(1, 2, figsize=(8, 3))
for ax in axes:
    ax.plot([0, 1, 2], [1, 0, 1], "r-", label=r"$\\lambda$ curve")
    ax.scatter([0.5, 1.5], [0.5, 0.2], label="points")
    ax.set_xlabel(r"Hyperparameter $\\lambda$ $\\mathcal{L}_{\\mathrm{Valid.}}$")
    ax.legend()
plotting.save_figure(fig, "demo", sys.argv[1], formats=("pdf", "png", "svg"))
plotting.save_panel(fig, axes[1], "panel", sys.argv[1])
"""


def draw_in_process(out_dir, hash_seed, date_epoch):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), SOURCE_DATE_EPOCH=str(date_epoch))
    result = subprocess.run([sys.executable, "-c", DRAW_SCRIPT, str(out_dir)], cwd=CODE, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_same_figure_saved_twice_gives_the_same_bytes(tmp_path):
    fig, axes = two_panel_figure()
    axes[0].legend(["curve"])
    for folder in ("a", "b"):
        plotting.save_figure(fig, "demo", tmp_path / folder)
        plotting.save_panel(fig, axes[1], "panel", tmp_path / folder)
    plotting.close(fig)
    names = ["demo.pdf", "demo.png", "panel.pdf", "panel.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bytes_do_not_depend_on_the_process_or_the_date(tmp_path):
    # what --replot does: a new process, another hash seed, another clock (SOURCE_DATE_EPOCH would be used
    # by matplotlib for the PDF date if one were written)
    first = draw_in_process(tmp_path / "1", 1, 0)
    second = draw_in_process(tmp_path / "2", 2, 2_000_000_000)
    assert sorted(first) == ["demo.pdf", "demo.png", "demo.svg", "panel.pdf", "panel.png"]
    assert [name for name in first if first[name] != second[name]] == []


def test_metadata_holds_no_date_and_no_version(tmp_path):
    fig, _ = two_panel_figure()
    pdf, png = plotting.save_figure(fig, "demo", tmp_path)
    plotting.close(fig)
    data = pdf.read_bytes()
    assert b"/CreationDate" not in data and b"/ModDate" not in data
    assert plotting.matplotlib.__version__.encode() not in data and plotting.matplotlib.__version__.encode() \
        not in png.read_bytes()
    assert b"/Creator (hypernetwork reproduction" in data
    assert b"Software" in png.read_bytes()[:200] and plotting.CREATOR.encode() in png.read_bytes()[:300]


def test_caller_metadata_is_merged(tmp_path):
    fig, _ = two_panel_figure()
    pdf = plotting.save_figure(fig, "demo", tmp_path, formats=("pdf",), metadata={"Title": "Figure 2"})[0]
    plotting.close(fig)
    assert b"/Title (Figure 2)" in pdf.read_bytes() and b"/CreationDate" not in pdf.read_bytes()


def test_plotting_does_not_import_common():
    code = "import sys, plotting; print('common' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CODE, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ----------------------------------------------------------------------------------- fit_limits

def test_fit_limits_fits_quick_losses_on_a_fixed_paper_axis():
    fig, ax = plotting.plt.subplots()
    ax.set_ylim(0.6, 1.1)  # the paper's scatter axis
    losses = np.array([2.15, 2.3, np.nan, 2.25, np.inf])
    lo, hi = plotting.fit_limits(ax, losses)
    assert (lo, hi) == pytest.approx((2.15 - 0.05 * 0.15, 2.3 + 0.05 * 0.15))
    assert ax.get_ylim() == pytest.approx((lo, hi)) and ax.get_xlim() == pytest.approx((0, 1))
    plotting.close(fig)


def test_fit_limits_x_axis_lists_of_arrays_and_margin():
    fig, ax = plotting.plt.subplots()
    assert plotting.fit_limits(ax, [np.array([1.0, 2.0]), [3.0], 5.0], axis="x", margin=0.5) == \
        pytest.approx((-1.0, 7.0))
    assert ax.get_xlim() == pytest.approx((-1.0, 7.0))
    assert plotting.fit_limits(ax, [4.0, 0.0, 2.0], axis="x", margin=0.0) == pytest.approx((0.0, 4.0))
    plotting.close(fig)


def test_fit_limits_only_outside_keeps_the_paper_axes_when_the_data_fit():
    fig, ax = plotting.plt.subplots()
    ax.set_ylim(0.6, 1.1)
    assert plotting.fit_limits(ax, [0.7, 0.9], only_outside=True) == (0.6, 1.1)
    assert ax.get_ylim() == (0.6, 1.1)
    assert plotting.fit_limits(ax, [0.7, 1.2], only_outside=True) != (0.6, 1.1)
    plotting.close(fig)


def test_fit_limits_edge_cases():
    fig, ax = plotting.plt.subplots()
    ax.set_ylim(0.0, 1.0)
    assert plotting.fit_limits(ax, [np.nan, np.inf]) == (0.0, 1.0)         # nothing finite: unchanged
    assert plotting.fit_limits(ax, []) == (0.0, 1.0)
    assert plotting.fit_limits(ax, [2.0, 2.0]) == pytest.approx((1.9, 2.1))  # one value: a band around it
    assert plotting.fit_limits(ax, [0.0]) == pytest.approx((-0.05, 0.05))
    ax.set_ylim(1.0, 0.0)                                                     # inverted stays inverted
    assert plotting.fit_limits(ax, [0.0, 1.0], margin=0.0) == (1.0, 0.0)
    ax.set_yscale("log")
    lo, hi = plotting.fit_limits(ax, [-1.0, 0.0, 1e-3, 1e1], margin=0.25)   # log: positives, log-space margin
    assert (lo, hi) == pytest.approx((1e-4, 1e2)) or (hi, lo) == pytest.approx((1e-4, 1e2))
    with pytest.raises(ValueError, match="axis must be"):
        plotting.fit_limits(ax, [1.0], axis="z")
    plotting.close(fig)


# ---------------------------------------------------------------------------------- place_legend

def legend_box(fig, legend):
    fig.canvas.draw()
    return legend.get_window_extent(fig.canvas.get_renderer())


def test_place_legend_stays_inside_when_there_is_room(tmp_path):
    fig, ax = plotting.plt.subplots(figsize=(4, 3))
    x = np.linspace(0, 1, 50)
    ax.plot(x, 0.1 * x, label="low curve")
    ax.set_ylim(0, 1)
    legend = plotting.place_legend(ax)
    assert ax.bbox.contains(*legend_box(fig, legend).p0) and ax.bbox.contains(*legend_box(fig, legend).p1)
    assert not plotting._covers_data(ax, legend_box(fig, legend))
    assert png_size(plotting.save_figure(fig, "inside", tmp_path, formats=("png",))[0]) == (400, 300)
    plotting.close(fig)


def test_place_legend_moves_outside_when_data_fill_the_axes(tmp_path):
    fig, ax = plotting.plt.subplots(figsize=(4, 3))
    grid = np.linspace(0, 1, 25)
    xs, ys = np.meshgrid(grid, grid)
    ax.scatter(xs.ravel(), ys.ravel(), s=4, label="dense scatter")  # no free corner anywhere
    ax.plot(grid, grid, label="diagonal")
    legend = plotting.place_legend(ax)
    box = legend_box(fig, legend)
    assert box.x0 >= ax.bbox.x1  # right of the axes
    assert not plotting._covers_data(ax, box)
    width, height = png_size(plotting.save_figure(fig, "outside", tmp_path, formats=("png",))[0])
    assert width > 400 and legend.get_texts()[0].get_text() == "dense scatter"  # the saved area grew to hold it
    plotting.close(fig)


def draw_covering(ax, kind):
    """Data over the whole of ax, of one kind of artist, with no free corner for a legend."""
    grid = np.linspace(0, 1, 25)
    if kind == "scatter":
        xs, ys = np.meshgrid(grid, grid)
        ax.scatter(xs.ravel(), ys.ravel(), s=4, label="dense scatter")
    elif kind == "lines":  # straight lines whose only vertices are on the axes' edges
        for y in np.linspace(0.0, 1.0, 21):
            ax.plot([0, 1], [y, y], "k-", lw=0.5, label=f"y={y:.2f}" if y == 0 else None)
    elif kind == "fill":
        ax.fill_between([0, 1], [0, 0], [1, 1], label="band")
    else:
        ax.bar([0.5], [1.0], width=1.0, label="bar")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


@pytest.mark.parametrize("kind", ["scatter", "lines", "fill", "bar"])
def test_place_legend_sees_every_kind_of_data(kind):
    fig, ax = plotting.plt.subplots(figsize=(4, 3))
    draw_covering(ax, kind)
    assert plotting._covers_data(ax, legend_box(fig, plotting.place_legend(ax, outside=False)))
    ax.get_legend().remove()
    box = legend_box(fig, plotting.place_legend(ax))
    assert box.x0 >= ax.bbox.x1 and not plotting._covers_data(ax, box)
    plotting.close(fig)


def test_place_legend_forced_outside():
    fig, ax = plotting.plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 0.1], label="low")
    assert legend_box(fig, plotting.place_legend(ax, outside=True)).x0 >= ax.bbox.x1
    plotting.close(fig)
