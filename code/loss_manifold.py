"""Training and validation loss manifolds of a toy problem (SPEC section 5; figures train/valid_loss_manifold).

One parameter w and one hyperparameter lambda, analytic (no data, no training):
    training loss    L(w, lambda) = -logaddexp(-1, -(w - sin(lambda + pi))^2) - (lambda + sin(2 lambda)) / 10
    best response    w*(lambda) = sin(lambda + pi)       (the exact minimiser of L over w)
    hypernetwork     w_phi(lambda) = -lambda             (a linear best-response approximation)
    validation loss  L_V(w) = sin(w)
The figures draw both surfaces with the two curves, their projections on a side wall, and the current
hyperparameter (train) or the minimisers lambda* and lambda_phi* of L_V along each curve (valid).

    python loss_manifold.py [--out-dir DIR] [--replot]
"""
import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from common import experiment_parser, replot_or_run, run_main

NAME = "loss_manifold"


@dataclass(frozen=True)
class Config:
    """Grid, curve ranges and view of the released figures (SPEC section 5)."""

    w_low: float = -2.0                 # parameter grid [w_low, w_high) ...
    w_high: float = 2.0
    w_step: float = 0.04                # ... step
    lam_low: float = -np.pi             # hyperparameter grid [lam_low, lam_high) ...
    lam_high: float = np.pi
    lam_step: float = 0.04 * 2 * np.pi / 4  # ... step
    phi_low: float = -np.pi / 1.61      # the hypernetwork curve is drawn over [phi_low, phi_high)
    phi_high: float = np.pi / 1.65
    lam_hat: float = 0.0                # the current hyperparameter (train figure)
    stride: int = 10                    # wireframe: every 10th grid line
    elev: float = 46.0                  # orthographic view
    azim: float = 120.0
    wall_shift_valid: float = 1.0       # valid figure: projection wall this much further out
    search_points: int = 200001         # dense grid for the minimisers, refined by a bounded search
    zoom: float = 0.9                   # 3-D axes scale inside the figure
    font_size: int = 32


# ---------------------------------------------------------------------------------------- math

def train_loss(w, lam):
    """L(w, lambda), any broadcastable shapes."""
    return -np.logaddexp(-1.0, -(w - np.sin(lam + np.pi)) ** 2) - (lam + np.sin(2 * lam)) / 10.0


def best_response(lam):
    """w*(lambda) = sin(lambda + pi): minimises L(., lambda) (the logaddexp term peaks at w = w*)."""
    return np.sin(lam + np.pi)


def hypernet_response(lam):
    """w_phi(lambda) = -lambda, the linear approximation of the best response."""
    return -lam


def valid_loss(w):
    """L_V(w) = sin(w)."""
    return np.sin(w)


def minimise_along(response, low, high, points):
    """argmin over lambda in [low, high) of L_V(response(lambda)): dense grid, then a bounded refinement."""
    from scipy.optimize import minimize_scalar

    grid = np.linspace(low, high, points, endpoint=False)
    i = int(np.argmin(valid_loss(response(grid))))
    step = grid[1] - grid[0]
    a, b = max(low, grid[i] - step), min(high, grid[i] + step)
    res = minimize_scalar(lambda x: valid_loss(response(x)), bounds=(a, b), method="bounded",
                          options={"xatol": 1e-12})
    best = res.x if valid_loss(response(res.x)) <= valid_loss(response(grid[i])) else grid[i]
    return float(best)


def run(config):
    """Surfaces, curves and minimisers -> (summary dict, arrays dict)."""
    w = np.arange(config.w_low, config.w_high, config.w_step)
    lam = np.arange(config.lam_low, config.lam_high, config.lam_step)
    lam_phi = lam[(lam >= config.phi_low) & (lam < config.phi_high)]
    W, LAM = np.meshgrid(w, lam)
    lam_star = minimise_along(best_response, config.lam_low, config.lam_high, config.search_points)
    lam_phi_star = minimise_along(hypernet_response, config.phi_low, config.phi_high, config.search_points)
    summary = {
        "lambda_star": lam_star,
        "lambda_phi_star": lam_phi_star,
        "valid_loss_at_lambda_star": float(valid_loss(best_response(lam_star))),
        "valid_loss_at_lambda_phi_star": float(valid_loss(hypernet_response(lam_phi_star))),
        "lambda_hat": config.lam_hat,
        "config": dataclasses.asdict(config),
    }
    arrays = {"w": w, "lam": lam, "lam_phi": lam_phi, "train_surface": train_loss(W, LAM),
              "valid_surface": valid_loss(W)}
    return summary, arrays


# ---------------------------------------------------------------------------------------- plot

def _axes3d(fig, config, rect):
    """Orthographic 3-D axes without ticks and with white panes (modern matplotlib API)."""
    ax = fig.add_axes(rect, projection="3d")
    ax.set_proj_type("ortho")
    ax.view_init(elev=config.elev, azim=config.azim)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_pane_color((1.0, 1.0, 1.0, 1.0))
        axis.line.set_color("k")
        axis._axinfo["grid"]["color"] = (1, 1, 1, 0)
        axis.set_ticks([])
    ax.grid(False)
    ax.set_box_aspect(None, zoom=config.zoom)
    ax.set_xlabel(r"Parameter $\mathrm{w}$", labelpad=-10)
    ax.set_ylabel(r"Hyperparameter $\lambda$", labelpad=-10)
    return ax


def _surface(ax, arrays, z, config):
    W, LAM = np.meshgrid(arrays["w"], arrays["lam"])
    ax.plot_wireframe(W, LAM, z, rstride=config.stride, cstride=config.stride, color="k", linewidth=1)


def plot(summary, arrays, out_dir):
    """Write train_loss_manifold and valid_loss_manifold (.pdf, .png); returns the paths."""
    import matplotlib.pyplot as plt

    from plotting import close, save_figure, set_paper_style

    config = Config(**{k: v for k, v in summary["config"].items() if k in Config.__dataclass_fields__})
    set_paper_style(config.font_size)
    lam, lam_phi = arrays["lam"], arrays["lam_phi"]
    wall = config.w_low                         # projections go on the w = w_low wall
    paths = []

    # ---- training loss
    fig = plt.figure(figsize=(13.4, 9.1))
    ax = _axes3d(fig, config, [0.33, 0.0, 0.67, 1.0])
    ax.set_zlabel(r"Loss $\mathcal{L}_{\mathrm{Train}}(\mathrm{w}, \lambda)$", labelpad=-10)
    _surface(ax, arrays, arrays["train_surface"], config)
    curve = train_loss(best_response(lam), lam)
    curve_phi = train_loss(hypernet_response(lam_phi), lam_phi)
    ax.plot(best_response(lam), lam, curve, "b", linewidth=2, label=r"$\mathcal{L}(\mathrm{w}^*(\lambda), \lambda)$")
    ax.plot(hypernet_response(lam_phi), lam_phi, curve_phi, "r", linewidth=2,
            label=r"$\mathcal{L}(\mathrm{w}_{\phi^*}(\lambda), \lambda)$")
    ax.plot(np.full_like(lam, wall), lam, curve, "b", linewidth=2)
    ax.plot(np.full_like(lam_phi, wall), lam_phi, curve_phi, "r", linewidth=2)
    lh = config.lam_hat
    w_hat, z_hat = best_response(lh), train_loss(best_response(lh), lh)
    z_top = arrays["train_surface"].max()
    ax.plot([config.w_high, wall], [lh, lh], [z_hat, z_hat], "g--", linewidth=2, label=r"$\hat{\lambda}$")
    ax.plot([wall, wall], [lh, lh], [z_hat, z_top], "g--", linewidth=2)
    ax.plot([w_hat], [lh], [z_hat], "g*", markersize=14, linestyle="none",
            label=r"$\mathrm{w}^*(\hat{\lambda}), \mathrm{w}_{\phi^*}(\hat{\lambda})$")
    ax.set_xlim(config.w_low, config.w_high)
    ax.set_ylim(config.lam_low, config.lam_high)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.0, 0.55), frameon=False)
    paths += save_figure(fig, "train_loss_manifold", out_dir)
    close(fig)

    # ---- validation loss
    fig = plt.figure(figsize=(13.3, 9.1))
    ax = _axes3d(fig, config, [0.0, 0.0, 0.67, 1.0])
    ax.set_zlabel(r"Loss $\mathcal{L}_{\mathrm{Valid.}}(\mathrm{w})$", labelpad=-10)
    _surface(ax, arrays, arrays["valid_surface"], config)
    wall_v = wall - config.wall_shift_valid
    curve = valid_loss(best_response(lam))
    curve_phi = valid_loss(hypernet_response(lam_phi))
    ax.plot(best_response(lam), lam, curve, "b", linewidth=2)
    ax.plot(hypernet_response(lam_phi), lam_phi, curve_phi, "r", linewidth=2)
    ax.plot(np.full_like(lam, wall_v), lam, curve, "b", linewidth=2)
    ax.plot(np.full_like(lam_phi, wall_v), lam_phi, curve_phi, "r", linewidth=2)
    z_top = arrays["valid_surface"].max()
    for key, response, color, line_label, star_label in (
            ("lambda_star", best_response, "b", r"$\lambda^*$", r"$\mathrm{w}^*(\lambda^*)$"),
            ("lambda_phi_star", hypernet_response, "r", r"$\lambda_{\phi^*}$",
             r"$\mathrm{w}_{\phi^*}(\lambda_{\phi^*})$")):
        ls = summary[key]
        ws, zs = response(ls), valid_loss(response(ls))
        ax.plot([config.w_high, wall_v], [ls, ls], [zs, zs], color + "--", linewidth=2, label=line_label)
        ax.plot([wall_v, wall_v], [ls, ls], [zs, z_top], color + "--", linewidth=2)
        ax.plot([ws], [ls], [zs], color + "*", markersize=14, markeredgecolor="k", markeredgewidth=0.5,
                linestyle="none", label=star_label)
    ax.set_xlim(wall_v, config.w_high)
    ax.set_ylim(config.lam_low, config.lam_high)
    fig.legend(*ax.get_legend_handles_labels(), loc="center right", bbox_to_anchor=(1.0, 0.6), frameon=False)
    paths += save_figure(fig, "valid_loss_manifold", out_dir)
    close(fig)
    return paths


# ----------------------------------------------------------------------------------------- CLI

def main(argv=None):
    from plotting import resolve_out_dir

    parser = experiment_parser("Training / validation loss manifolds of the toy problem (no data, no training).")
    args = parser.parse_args(argv)  # --quick, --seed and --data-dir are accepted but change nothing here
    out_dir = resolve_out_dir(args.out_dir)
    summary, _ = replot_or_run(out_dir, NAME, args.replot, lambda: run(Config()), plot)
    print(f"lambda* = {summary['lambda_star']:.6f}, lambda_phi* = {summary['lambda_phi_star']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
