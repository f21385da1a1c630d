"""Shared experiment plumbing: per-step seeds, atomic results files, CLI argument types, clean errors."""
import argparse
import dataclasses
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from atomic_io import atomic_write_bytes, replace_readable  # noqa: F401  (re-exported)


class ExperimentError(Exception):
    """A failure to report as one line ('error: ...') with exit status 1."""


class DivergenceError(ExperimentError):
    """The objective became NaN or infinite."""


def step_rng(seed, step, *keys):
    """RandomState derived from (seed, step, *keys): the same numbers for the same step, in any run."""
    entropy = np.random.SeedSequence([int(seed), int(step), *map(int, keys)]).generate_state(1)[0]
    return np.random.RandomState(entropy)


def check_finite(value, step, what="objective"):
    """Raise DivergenceError when value (scalar or array) has a NaN or infinity."""
    if not np.all(np.isfinite(value)):
        raise DivergenceError(f"{what} is not finite at step {step} (diverged; try a smaller step size)")


# -------------------------------------------------------------------------------------- atomic I/O

def _to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_results(out_dir, name, summary, arrays):
    """Write <out_dir>/results/<name>.json (summary, with config) and .npz (arrays), atomically."""
    results_dir = Path(out_dir) / "results"
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(results_dir / f"{name}.npz", buf.getvalue())
    text = json.dumps(_to_jsonable(summary), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(results_dir / f"{name}.json", text.encode())
    return results_dir / f"{name}.json", results_dir / f"{name}.npz"


def load_results(out_dir, name):
    """Read back (summary dict, arrays dict) saved by save_results; never unpickles."""
    results_dir = Path(out_dir) / "results"
    try:
        summary = json.loads((results_dir / f"{name}.json").read_text())
        with np.load(results_dir / f"{name}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as err:
        raise ExperimentError(f"no saved results to replot: {err.filename} is missing (run without --replot)") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:  # JSONDecodeError is a ValueError
        raise ExperimentError(f"saved results in {results_dir} are unreadable ({err})") from None
    return summary, arrays


def load_results_as(out_dir, name, build):
    """build(summary, arrays) on results saved by save_results; missing keys -> one-line ExperimentError."""
    summary, arrays = load_results(out_dir, name)
    try:
        return build(summary, arrays)
    except (KeyError, TypeError) as err:
        raise ExperimentError(f"saved results in {Path(out_dir) / 'results'} are incomplete or from another "
                              f"version ({err}); run without --replot") from None


def replot_or_run(out_dir, name, replot, compute, plot):
    """The experiment scripts' driver: (summary, arrays) loaded when replotting, else compute() and saved;
    then plot(summary, arrays, out_dir) and one 'wrote' line per file. Returns (summary, arrays)."""
    if replot:
        summary, arrays = load_results(out_dir, name)
    else:
        summary, arrays = compute()
        save_results(out_dir, name, summary, arrays)
    for path in plot(summary, arrays, out_dir):
        print(f"wrote {path}")
    return summary, arrays


# ------------------------------------------------------------------------------------ CLI helpers

def positive_int(text):
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


QUICK_OUT_DIR = Path(__file__).resolve().parent.parent / "build" / "quick"  # `make quick` writes here too


class ExperimentParser(argparse.ArgumentParser):
    """ArgumentParser whose --quick runs default to build/quick/, so a smoke test never overwrites paper/."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False) and getattr(parsed, "out_dir", "") is None:
            parsed.out_dir = str(QUICK_OUT_DIR)
        return parsed


def experiment_parser(description, default_iters=None):
    """argparse parser with the flags every experiment script shares."""
    parser = ExperimentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test (well under a minute); output defaults to build/quick/")
    if default_iters is not None:
        parser.add_argument("--iters", type=positive_int, default=None,
                            help=f"training steps (default {default_iters})")
    parser.add_argument("--seed", type=nonnegative_int, default=7, help="random seed (default 7)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $MNIST_DIR or code/data)")
    parser.add_argument("--out-dir", default=None,
                        help="figure folder (default: the repository's paper/, or build/quick/ with --quick)")
    parser.add_argument("--replot", action="store_true", help="redraw figures from saved results, no training")
    parser.add_argument("--log-every", type=positive_int, default=None, help="steps between progress lines")
    parser.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # tests: synthetic data
    return parser


def run_main(main, argv=None):
    """Call main(argv); report expected failures as one 'error: ...' line and exit status 1."""
    from data_loader import MNISTError

    try:
        return main(argv)
    except (ExperimentError, MNISTError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
