"""Paper-style matplotlib figures, headless, saved atomically as .pdf and .png."""
import os
import tempfile
from pathlib import Path

import matplotlib

from common import replace_readable

matplotlib.use("Agg")  # headless by default; no screen is ever needed
import matplotlib.pyplot as plt  # noqa: E402

PAPER_DIR = Path(__file__).resolve().parent.parent / "paper"
FORMATS = ("pdf", "png")


def set_paper_style(font_size=28):
    """Serif text in matplotlib's bundled STIX (Times-like, always present, so no font warnings)."""
    plt.rcParams.update({
        "font.family": "serif",
        "font.serif": ["STIXGeneral"],
        "mathtext.fontset": "stix",
        "font.size": font_size,
        "axes.unicode_minus": False,
        "pdf.fonttype": 42,
        "savefig.dpi": 100,
    })


def resolve_out_dir(out_dir=None):
    """The output folder (default: the repository's paper/), created when missing."""
    out = Path(out_dir) if out_dir is not None else PAPER_DIR
    out.mkdir(parents=True, exist_ok=True)
    return out


def _atomic_savefig(fig, path, **kwargs):
    """savefig into a temporary file beside path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".part-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix[1:], **kwargs)
        replace_readable(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_figure(fig, name, out_dir=None, formats=FORMATS, **kwargs):
    """Write fig as <out_dir>/<name>.<fmt> for each format; returns the paths."""
    out = resolve_out_dir(out_dir)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        _atomic_savefig(fig, path, **kwargs)
        paths.append(path)
    return paths


def save_panel(fig, ax, name, out_dir=None, formats=FORMATS, pad=(1.15, 1.2)):
    """Write one axes of a multi-panel figure (with its labels) as its own files."""
    fig.canvas.draw()
    extent = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.dpi_scale_trans.inverted())
    extent = extent.expanded(*pad) if pad else extent
    return save_figure(fig, name, out_dir, formats, bbox_inches=extent)


def close(fig):
    plt.close(fig)
