"""Paper-style matplotlib figures, headless, saved atomically and byte-reproducibly as .pdf and .png.

Helpers for scripts:
* save_figure / save_panel: fixed file metadata (no creation date, no version string), so saving the same
  figure twice, in any process, gives the same bytes (`--replot` leaves committed figures unchanged).
* fit_limits(ax, values, axis="y"): fit an axis to the data; for --quick runs, whose numbers fall outside the
  paper's fixed axes (e.g. quick losses near 2.2 on a scatter fixed at 0.6-1.1). With only_outside=True the
  paper's limits are kept whenever the data fit inside them.
* place_legend(ax): a legend at matplotlib's "best" place, moved outside the axes (right) when it would still
  cover data; save_figure then widens the saved area to include it.
"""
import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np

from atomic_io import PART_PREFIX, replace_readable

matplotlib.use("Agg")  # headless by default; no screen is ever needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

PAPER_DIR = Path(__file__).resolve().parent.parent / "paper"
FORMATS = ("pdf", "png")

CREATOR = "hypernetwork reproduction (code/plotting.py)"
# Per-format metadata that replaces matplotlib's defaults (which hold the time and the matplotlib version).
METADATA = {
    "pdf": {"Creator": CREATOR, "Producer": "matplotlib", "CreationDate": None, "ModDate": None},
    "png": {"Software": CREATOR},
    "svg": {"Creator": CREATOR, "Date": None},
}
SVG_HASH_SALT = "hypernet"  # fixed seed of SVG element ids (random per process otherwise)

LIMIT_MARGIN = 0.05  # fit_limits: blank space beyond the data, as a fraction of the data's span
LEGEND_GAP = 0.02  # place_legend outside: gap between the axes and the legend, in axes widths
LEGEND_PAD_PIXELS = 2.0  # place_legend: data this close to the legend box counts as covered
TIGHT_PAD_INCHES = 0.05  # padding when the saved area is widened to take in an outside legend


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
    """savefig into a temporary file beside path (fixed metadata), then rename it over path."""
    fmt = path.suffix[1:]
    if fmt in METADATA:
        kwargs["metadata"] = {**METADATA[fmt], **kwargs.get("metadata", {})}
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + PART_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT}):
            fig.savefig(tmp, format=fmt, **kwargs)
        replace_readable(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _legend_outside_figure(fig):
    """Whether any legend of fig reaches beyond the figure's edges (then the saved area must grow)."""
    legends = [legend for ax in fig.axes for legend in [ax.get_legend()] if legend is not None] + list(fig.legends)
    if not legends:
        return False
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    return any(not (box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1)
               for e in (legend.get_window_extent(renderer) for legend in legends))


def save_figure(fig, name, out_dir=None, formats=FORMATS, **kwargs):
    """Write fig as <out_dir>/<name>.<fmt> for each format (same figure -> same bytes); returns the paths."""
    out = resolve_out_dir(out_dir)
    if "bbox_inches" not in kwargs and _legend_outside_figure(fig):
        kwargs.update(bbox_inches="tight", pad_inches=TIGHT_PAD_INCHES)
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


# ----------------------------------------------------------------------------------- quick-run helpers

def despine(axes):
    """Hide the top and right spines of one Axes or of every Axes in an array of them (the paper's style)."""
    for ax in np.ravel(axes):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)


def schematic_axes(ax, xlabel, ylabel):
    """The small experiments' schematic style (Figures 2 and 4): no ticks, no top or right spine, labels only."""
    ax.set_xticks([])
    ax.set_yticks([])
    despine(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def fit_limits(ax, values, axis="y", margin=LIMIT_MARGIN, only_outside=False):
    """Set ax's x or y limits to the finite values' range plus margin*span each side; returns (lo, hi).

    values: any array-like or list of arrays (flattened; NaN/inf ignored; on a log axis only values > 0, and
    the margin is taken in log space). only_outside=True keeps the current limits when they already hold all
    the values. No finite value: the limits are left as they are.
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', not {axis!r}")
    get_lim, set_lim = (ax.get_xlim, ax.set_xlim) if axis == "x" else (ax.get_ylim, ax.set_ylim)
    log = (ax.get_xscale() if axis == "x" else ax.get_yscale()) == "log"
    flat = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in _as_list(values)] or [np.empty(0)])
    flat = flat[np.isfinite(flat) & ((flat > 0) if log else True)]
    current = get_lim()
    if flat.size == 0:
        return current
    lo, hi = flat.min(), flat.max()
    if only_outside and min(current) <= lo and hi <= max(current):
        return current
    to, back = (np.log10, lambda t: 10.0 ** t) if log else (float, float)
    t_lo, t_hi = to(lo), to(hi)
    span = t_hi - t_lo
    pad = margin * span if span > 0 else margin * max(abs(t_lo), 1.0)  # one value: a band around it
    new = (float(back(t_lo - pad)), float(back(t_hi + pad)))
    if current[0] > current[1]:  # an inverted axis stays inverted
        new = new[::-1]
    set_lim(*new)
    return new


def _as_list(values):
    """values as a list of array-likes (a flat sequence of numbers is one array)."""
    if isinstance(values, np.ndarray) or np.isscalar(values):
        return [values]
    values = list(values)
    if all(np.isscalar(v) for v in values):
        return [values]
    return values


def _covers_data(ax, box):
    """Whether the display-space box touches any line, marker, filled area or bar of ax."""
    box = box.padded(LEGEND_PAD_PIXELS)
    for line in ax.get_lines():
        xy = line.get_transform().transform(line.get_xydata())
        xy = xy[np.all(np.isfinite(xy), axis=1)]
        if len(xy) and (np.any(_inside(xy, box)) or MplPath(xy).intersects_bbox(box, filled=False)):
            return True
    for collection in ax.collections:
        if isinstance(collection, PathCollection):  # a scatter: one marker per offset
            points = collection.get_offset_transform().transform(np.asarray(collection.get_offsets(), float))
            if np.any(_inside(points, box)):
                return True
        else:  # fill_between, LineCollection and other polygons: their paths are in data space
            transform = collection.get_transform()
            if any(transform.transform_path(p).intersects_bbox(box, filled=True) for p in collection.get_paths()):
                return True
    return any(patch.get_window_extent().overlaps(box) for patch in ax.patches)


def _inside(points, box):
    return (box.x0 <= points[:, 0]) & (points[:, 0] <= box.x1) & (box.y0 <= points[:, 1]) & (points[:, 1] <= box.y1)


def place_legend(ax, outside=None, **kwargs):
    """Add ax's legend where it covers no data: matplotlib's "best", else outside to the right; returns it.

    outside=True / False forces outside / "best". An outside legend lies beyond the figure's edge; save_figure
    notices and saves with bbox_inches="tight" so it is kept. kwargs go to ax.legend (fontsize, ncol, ...).
    """
    if not outside:
        legend = ax.legend(loc="best", **kwargs)
        if outside is False:
            return legend
        ax.figure.canvas.draw()  # "best" is chosen at draw time
        if not _covers_data(ax, legend.get_window_extent(ax.figure.canvas.get_renderer())):
            return legend
        legend.remove()
    return ax.legend(loc="upper left", bbox_to_anchor=(1.0 + LEGEND_GAP, 1.0), borderaxespad=0.0, **kwargs)


def finish_figure(fig, name, out_dir, tight=True, **kwargs):
    """tight_layout (unless tight=False), save as <out_dir>/<name>.pdf|png, close; returns the paths."""
    if tight:
        fig.tight_layout()
    paths = save_figure(fig, name, out_dir, **kwargs)
    plt.close(fig)
    return paths
