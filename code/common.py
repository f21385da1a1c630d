"""Shared experiment plumbing: per-step seeds, atomic results files, CLI argument types, clean errors."""
import argparse
import contextlib
import dataclasses
import datetime
import inspect
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import typing
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from atomic_io import PART_PREFIX, atomic_write_bytes, replace_readable  # noqa: F401  (re-exported)


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


def load_results(out_dir, name):
    """Read back (summary dict, arrays dict) that a protocol run saved in out_dir/results (strict JSON, never
    unpickles): for reading another experiment's results. A script's own replot uses load_checked."""
    results_dir = Path(out_dir) / "results"
    try:
        summary = loads_strict((results_dir / f"{name}.json").read_text(errors="replace"), f"{name}.json")
        with np.load(results_dir / f"{name}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as err:
        raise ExperimentError(f"no saved results to replot: {err.filename} is missing (run without --replot)") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:  # JSONDecodeError is a ValueError
        raise ExperimentError(f"saved results in {results_dir} are unreadable ({err})") from None
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


# ================================================================================ the protocol driver
# Every experiment script declares NAME, a frozen Config dataclass (fields made with setting()), QUICK,
# DATA, run(config, data) -> (summary, arrays), plot(summary, arrays, out_dir) and CLAIMS, and ends with
# `sys.exit(common.main(sys.modules[__name__]))`. main() builds the command line from Config, runs or
# replots, stamps provenance, and publishes every output file of the run as one all-or-nothing set.

REPO = Path(__file__).resolve().parent.parent
PAPER_DIR = REPO / "paper"
QUICK_OUT_DIR = REPO / "build" / "quick"      # `make quick` writes here too; --quick never touches paper/
VERDICTS = ("reproduced", "partly", "not reproduced", "refuted")  # SPEC section 10
DIVERGENCE_FACTOR = 1e3          # an objective this many times its starting value has diverged
MAX_RESULTS_BYTES = 256 * 2**20  # results JSON/NPZ larger than this are refused on load
STAGING_PREFIX = ".staging-"     # <out_dir>/.staging-<pid>-XXXX holds a run's files until they are published
EXIT_ERROR, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143
SEED_MAX = 2**32 - 1             # numpy's RandomState accepts seeds in [0, 2**32)
OUTPUT_PATHS = ("paper", "cache")  # what runs write; changes there do not make the code "dirty" in provenance
VERSIONED_PACKAGES = ("numpy", "scipy", "autograd", "scikit-learn", "matplotlib", "threadpoolctl", "joblib", "dask",
                      "distributed")


class Terminated(BaseException):
    """SIGTERM arrived (raised from the signal handler, handled like KeyboardInterrupt)."""


def setting(default, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, flag=None, aliases=()):
    """A Config field: its default, bounds (lo <= x <= hi; open ends with lo_open / hi_open), allowed choices,
    and the command-line flag name (default: --field-name) plus older names that keep working."""
    meta = dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, flag=flag, aliases=tuple(aliases))
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the paper that an experiment's results bear on (a row of the scorecard).

    evaluate(summary) -> (value, verdict): value a float (shown with fmt) or a short text; verdict in VERDICTS."""

    id: str               # short and unique, e.g. "fig2-argmin"
    claim: str            # the claim, one line, in our words
    paper: str            # the paper's value, read from its figures or tables
    evaluate: Callable    # summary -> (value, verdict)
    evidence: str         # a results key and a figure
    fmt: str = "{:.3g}"   # how a numeric value is shown


CLAIM_KEYS = ("id", "claim", "paper", "evaluate", "evidence", "fmt")  # a claims table's keys; fmt is optional


def claims(namespace, table):
    """[Claim] from a claims table: blocks separated by blank lines, one 'key: value' line per key of CLAIM_KEYS
    (after dedenting, keys start a line and an indented line continues the value above); `evaluate` names a
    function in namespace (a script passes globals()). ValueError on an unknown, missing or repeated key, an
    unknown function or a repeated id."""
    blocks, block, key = [], {}, None
    for number, line in enumerate(textwrap.dedent(table).splitlines(), 1):
        if not line.strip():
            if block:
                blocks.append(block)
            block, key = {}, None
        elif line[:1].isspace() and key is not None:
            block[key] += " " + line.strip()
        else:
            key, sep, value = (part.strip() for part in line.partition(":"))
            if not sep or key not in CLAIM_KEYS or key in block:
                raise ValueError(f"claims table line {number}: {line.strip()!r} is not a new 'key: value' with a key "
                                 f"of {', '.join(CLAIM_KEYS)}")
            block[key] = value
    if block:
        blocks.append(block)
    rows = []
    for block in blocks:
        missing = [k for k in CLAIM_KEYS[:-1] if k not in block]
        if missing:
            raise ValueError(f"claim {block.get('id', '?')}: missing {', '.join(missing)}")
        function = namespace.get(block["evaluate"])
        if not callable(function):
            raise ValueError(f"claim {block['id']}: evaluate names no function {block['evaluate']!r}")
        rows.append(Claim(**{**block, "evaluate": function}))
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"claims table repeats an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    return rows


def threshold_verdict(value, reproduced, partly):
    """'reproduced' when value <= reproduced, 'partly' when value <= partly, else 'not reproduced'."""
    return "reproduced" if value <= reproduced else "partly" if value <= partly else "not reproduced"


def check_divergence(value, start_value, step, what="objective", factor=DIVERGENCE_FACTOR):
    """Raise DivergenceError when value is non-finite or exceeds factor x |start_value| (and start_value > 0)."""
    check_finite(value, step, what)
    if np.max(value) > factor * max(abs(float(np.max(start_value))), np.finfo(float).tiny):
        raise DivergenceError(f"{what} grew from {float(np.max(start_value)):.4g} to {float(np.max(value)):.4g} "
                              f"at step {step} (diverged; try a smaller step size)")


# --------------------------------------------------------------------------- Config -> command line

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?=.*?#\s?(.*)$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def field_comments(config_cls):
    """{field name: its trailing '# comment'} read from the class source; comment-only lines continue it."""
    comments, current = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(config_cls)}:
            current = match.group(1)
            comments[current] = match.group(2).strip()
            continue
        match = _COMMENT_LINE.match(line)
        if match and current is not None:
            comments[current] += " " + match.group(1).strip()
        else:
            current = None
    return comments


def _base_type(tp):
    """(type, optional) of an annotation: Optional[X] / X | None -> (X, True)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_scalar(tp, text):
    if tp is int:
        return int(text)
    if tp is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("not finite")
        return value
    if tp is str:
        return text
    raise TypeError(f"unsupported setting type {tp}")


def _parser_for(tp):
    """text -> value for an annotation: scalars, Optional (text 'none'), tuples (comma-separated; nested
    tuples of ints as 784-100-10,784-10)."""
    tp, optional = _base_type(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def parse(text):
        if optional and text.lower() == "none":
            return None
        if origin is tuple:
            inner = args[0]
            if typing.get_origin(inner) is tuple:
                return tuple(tuple(_parse_scalar(typing.get_args(inner)[0], part) for part in item.split("-"))
                             for item in text.split(",") if item)
            return tuple(_parse_scalar(inner, item) for item in text.split(",") if item)
        return _parse_scalar(tp, text)
    return parse


def _show(value):
    """A default as shown in --help (tuples comma-separated, as typed on the command line)."""
    if isinstance(value, tuple):
        return ",".join("-".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def check_setting(field, value):
    """One-line message if value breaks field's declared bounds or choices, else None."""
    meta = field.metadata
    items = value if isinstance(value, tuple) else (value,)
    flat = [x for item in items for x in (item if isinstance(item, tuple) else (item,))]
    for x in flat:
        if x is None or isinstance(x, bool):
            continue
        if meta.get("choices") is not None and x not in meta["choices"]:
            return f"must be one of {', '.join(map(str, meta['choices']))} (got {x!r})"
        if isinstance(x, (int, float)):
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None and (x < lo or (meta.get("lo_open") and x == lo)):
                return f"must be {'>' if meta.get('lo_open') else '>='} {lo} (got {x})"
            if hi is not None and (x > hi or (meta.get("hi_open") and x == hi)):
                return f"must be {'<' if meta.get('hi_open') else '<='} {hi} (got {x})"
    return None


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ('error: ...') with exit status 2, no usage dump."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def flag_name(field):
    """The command-line flag of a Config field."""
    return "--" + (field.metadata.get("flag") or field.name).replace("_", "-")


def build_parser(module):
    """argparse parser of a protocol script: one flag per Config field, then the driver's own flags."""
    doc = (module.__doc__ or module.NAME).strip().splitlines()[0]
    parser = _OneLineParser(prog=f"{module.NAME}.py", description=doc)
    hints = typing.get_type_hints(module.Config)
    comments = field_comments(module.Config)
    group = parser.add_argument_group("experiment settings (recorded with the results)")
    for field in dataclasses.fields(module.Config):
        tp, _ = _base_type(hints[field.name])
        names = [flag_name(field), *field.metadata.get("aliases", ())]
        help_text = f"{comments.get(field.name, '')} (default: {_show(field.default)})".strip()
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            group.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        parse = _parser_for(hints[field.name])

        def typed(text, parse=parse, field=field):
            try:
                value = parse(text)
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"{text!r} is not a valid value") from None
            problem = check_setting(field, value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return value
        typed.__name__ = field.name
        group.add_argument(*names, dest=field.name, type=typed, default=None, metavar=field.name.upper(),
                           help=help_text)
    driver = parser.add_argument_group("driver")
    driver.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test (seconds); output defaults to build/quick/")
    driver.add_argument("--out-dir", default=None,
                        help="output folder: figures in it, results in its results/ "
                             "(default: the repository's paper/, or build/quick/ with --quick)")
    driver.add_argument("--replot", action="store_true", help="redraw the figures from saved results, no training")
    if getattr(module, "DATA", None) == "mnist":
        driver.add_argument("--data-dir", default=None, help="MNIST folder (default: $MNIST_DIR, else code/data)")
        driver.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # tests: synthetic data
    if getattr(module, "PARALLEL", False):
        driver.add_argument("--jobs", type=positive_int, default=1,
                            help="worker processes, capped at the CPUs and the work's chunks (default: 1)")
    return parser


def make_config(module, args):
    """Config: defaults, then QUICK when --quick, then the flags given; every value checked once more."""
    config = module.Config()
    if args.quick:
        config = dataclasses.replace(config, **getattr(module, "QUICK", {}))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if getattr(args, f.name) is not None}
    config = dataclasses.replace(config, **given)
    for field in dataclasses.fields(config):
        problem = check_setting(field, getattr(config, field.name))
        if problem:
            raise UsageError(f"{flag_name(field)} {problem}")
    if hasattr(module, "validate"):
        module.validate(config)
    return config


class UsageError(ExperimentError):
    """A setting is out of range (exit status 2)."""


def available_memory_bytes():
    """MemAvailable of /proc/meminfo (bytes), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed_bytes, what):
    """UsageError when needed_bytes exceeds the memory available now (a one-line up-front refusal)."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise UsageError(f"{what} needs about {needed_bytes / 2**30:.1f} GiB, but only "
                         f"{available / 2**30:.1f} GiB of memory is available")


# ------------------------------------------------------------------------------------------ provenance

def _git(*args):
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info():
    """The BLAS libraries loaded and their thread counts now (threadpoolctl)."""
    import threadpoolctl

    return [{"api": lib.get("internal_api"), "version": lib.get("version"), "threads": lib.get("num_threads"),
             "library": Path(lib.get("filepath", "")).name} for lib in threadpoolctl.threadpool_info()]


@contextlib.contextmanager
def blas_limited(threads, where):
    """Run the body with `threads` BLAS threads, checked (threadpoolctl); ExperimentError naming `where` if a
    BLAS library keeps another count (its numbers would not be those of the sequential path)."""
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        wrong = {lib.get("internal_api"): lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                 if lib.get("user_api") == "blas" and lib["num_threads"] != threads}
        if wrong:
            raise ExperimentError(f"{where}: BLAS still uses {wrong} threads (need {threads})")
        yield


def tree_cpu_seconds():
    """CPU seconds of this process plus its finished (reaped) children: forked workers and per-method processes
    count; a dask cluster's workers, which are not our children, do not."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def provenance(argv, started, wall_seconds, cpu_seconds, blas):
    """Which code, command, environment and machine produced a result (recorded in every results JSON);
    blas = blas_info() taken while the run was going."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    # uncommitted changes to the code, not to the outputs that runs write (paper/ and cache/ hold those: one
    # script of `make reproduce` must not mark the next one's results as made by a dirty tree)
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in OUTPUT_PATHS))
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": " ".join(shlex.quote(a) for a in argv),
        "started_utc": started,
        "wall_seconds": round(wall_seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "versions": versions,
        "blas": blas,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------- strict JSON

def _nonfinite_path(obj, path="summary"):
    """Where in a JSON-able tree the first NaN or infinity sits, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _nonfinite_path(v, f"{path}[{k!r}]")
            if found:
                return found
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _nonfinite_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


def dumps_strict(obj):
    """JSON text (sorted keys, indented); ExperimentError naming the key if any value is NaN or infinite."""
    obj = _to_jsonable(obj)
    where = _nonfinite_path(obj)
    if where:
        raise DivergenceError(f"non-finite value at {where}; results not written")
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text, what):
    """Parse JSON that has no NaN/Infinity and is not absurdly nested; ExperimentError naming `what`."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ExperimentError(f"{what} is not valid results JSON ({str(err)[:120]})") from None


# -------------------------------------------------------------------------------- output-set publisher

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir):
    """Remove staging folders of dead runs and orphaned .part- files left by a killed process in out_dir."""
    for folder in (out_dir, out_dir / "results"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
                pid = entry.name[len(STAGING_PREFIX):].split("-")[0]
                if not pid.isdigit() or not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
            elif PART_PREFIX in entry.name and entry.name.startswith(".") and entry.is_file():
                try:
                    if time.time() - entry.stat().st_mtime > 60:  # a live writer renames within seconds
                        entry.unlink()
                except OSError:
                    pass


def verify_output(path):
    """ExperimentError unless path is a complete file of its kind (PDF, PNG, JSON, NPZ, TeX)."""
    data = path.read_bytes()
    ok = len(data) > 0
    if path.suffix == ".pdf":
        ok = data.startswith(b"%PDF") and b"%%EOF" in data[-1024:]
    elif path.suffix == ".png":
        ok = data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    elif path.suffix == ".json":
        loads_strict(data.decode(), path.name)
    elif path.suffix == ".npz":
        ok = zipfile.is_zipfile(path)
    if not ok:
        raise ExperimentError(f"{path.name} was not written completely; previous outputs kept")


@contextlib.contextmanager
def _signals_blocked():
    """Hold SIGINT and SIGTERM until the block ends (they are delivered then)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def publish(out_dir, write):
    """Run write(staging_dir), verify every file it made, then move them into out_dir (same relative paths):
    figures and tables first, results/*.npz then results/*.json last, with signals held during the moves.
    On any failure the previous files stay and the staging folder is removed. Returns the published paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        write(staging)
        files = [p for p in staging.rglob("*") if p.is_file() and PART_PREFIX not in p.name]
        for path in files:
            verify_output(path)

        def order(p):
            rel = p.relative_to(staging)
            is_result = rel.parts[0] == "results" and p.suffix in (".json", ".npz")
            return (is_result, p.suffix == ".json", str(rel))
        published = []
        with _signals_blocked():
            for path in sorted(files, key=order):
                dest = out_dir / path.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                replace_readable(path, dest)
                published.append(dest)
        return published
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_results(staging, name, summary, arrays):
    """Write results/<name>.npz and .json into the staging folder (strict JSON)."""
    results = staging / "results"
    results.mkdir(parents=True, exist_ok=True)
    text = dumps_strict(summary)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    (results / f"{name}.npz").write_bytes(buf.getvalue())
    (results / f"{name}.json").write_text(text)


def array_manifest(arrays):
    """{name: {"shape": [...], "dtype": str}} of a run's arrays, saved with the summary and checked on replot."""
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()}


def load_checked(out_dir, module):
    """(summary, arrays) saved by module's last run, checked: readable, strict JSON, the same experiment,
    the same Config fields, arrays matching their manifest and finite. ExperimentError names the file."""
    results = Path(out_dir) / "results"
    json_path, npz_path = results / f"{module.NAME}.json", results / f"{module.NAME}.npz"
    for path in (json_path, npz_path):
        if not path.is_file():
            raise ExperimentError(f"no saved results to replot: {path} is missing (run without --replot)")
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise ExperimentError(f"{path} is larger than {MAX_RESULTS_BYTES >> 20} MiB; not a results file")
    summary = loads_strict(json_path.read_text(errors="replace"), str(json_path))
    if not isinstance(summary, dict) or summary.get("experiment") != module.NAME:
        found = summary.get("experiment") if isinstance(summary, dict) else type(summary).__name__
        raise ExperimentError(f"{json_path} holds results of {found!r}, not {module.NAME!r}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    if not isinstance(summary.get("config"), dict) or set(summary["config"]) != fields:
        raise ExperimentError(f"{json_path} was written by another version of {module.NAME} (its settings differ); "
                              "run without --replot")
    manifest = summary.get("arrays")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ExperimentError(f"{npz_path} is unreadable ({err})") from None
    if not isinstance(manifest, dict) or set(manifest) != set(arrays):
        raise ExperimentError(f"{npz_path} does not hold the arrays that {json_path.name} lists")
    for key, value in arrays.items():
        spec = manifest[key]
        if (not isinstance(spec, dict) or list(value.shape) != spec.get("shape")
                or str(value.dtype) != spec.get("dtype")):
            raise ExperimentError(f"{npz_path}: array {key!r} has shape {list(value.shape)} {value.dtype}, "
                                  f"expected {spec}")
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise ExperimentError(f"{npz_path}: array {key!r} holds NaN or infinite values")
    return summary, arrays


# ------------------------------------------------------------------------------------------ main()

def _on_sigterm(signum, frame):
    raise Terminated()


def resolve_out(args):
    """The output folder: --out-dir, else build/quick/ with --quick, else paper/."""
    if args.out_dir is not None:
        return Path(args.out_dir).resolve()
    return QUICK_OUT_DIR if args.quick else PAPER_DIR


def load_data(module, args):
    """MNIST (or the synthetic stand-in of the tests) when the script declares DATA = "mnist", else None."""
    if getattr(module, "DATA", None) != "mnist":
        return None, None
    from data_loader import load_mnist, synthetic_mnist

    if args.synthetic:
        return synthetic_mnist(), "synthetic"
    return load_mnist(args.data_dir), "mnist"


def _plot_checked(module, summary, arrays, out_dir, source):
    """module.plot, with errors from loaded results of the wrong form turned into one line naming them."""
    try:
        return module.plot(summary, arrays, out_dir)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        if source is None:
            raise
        raise ExperimentError(f"{source} does not fit this version of {module.NAME} ({type(err).__name__}: "
                              f"{str(err)[:100]}); run without --replot") from None


def execute(module, argv):
    """Parse, then replot or run; publish the outputs; print where each file went. Returns the summary."""
    args = build_parser(module).parse_args(argv)
    out_dir = resolve_out(args)
    if args.replot:
        summary, arrays = load_checked(out_dir, module)
        source = out_dir / "results" / f"{module.NAME}.json"
        paths = publish(out_dir, lambda staging: _plot_checked(module, summary, arrays, staging, source))
    else:
        config = make_config(module, args)
        data, data_name = load_data(module, args)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        wall0, cpu0 = time.perf_counter(), tree_cpu_seconds()
        kwargs = {}
        if getattr(module, "PARALLEL", False):
            kwargs["jobs"] = args.jobs
        from threadpoolctl import threadpool_limits

        with np.errstate(over="ignore", invalid="ignore"), \
                threadpool_limits(limits=getattr(module, "BLAS_THREADS", 1)):
            summary, arrays = module.run(config, data, **kwargs)
            blas = blas_info()
        summary = dict(summary)
        clash = {"experiment", "config", "data", "provenance", "arrays"} & set(summary)
        if clash:
            raise ExperimentError(f"{module.NAME}.run returned reserved summary keys {sorted(clash)}")
        summary.update(experiment=module.NAME, config=dataclasses.asdict(config), data=data_name,
                       arrays=array_manifest(arrays),
                       provenance=provenance([f"{module.NAME}.py", *argv], started,
                                             time.perf_counter() - wall0, tree_cpu_seconds() - cpu0, blas))
        summary = json.loads(dumps_strict(summary))  # the plot sees exactly what a replot will see

        def write(staging):
            _plot_checked(module, summary, arrays, staging, None)
            stage_results(staging, module.NAME, summary, arrays)
        paths = publish(out_dir, write)
        if hasattr(module, "report"):
            module.report(summary)
    for path in paths:
        print(f"wrote {path}")
    return summary


def main(module, argv=None):
    """Command-line entry of a protocol script: exit status 0, 1 (error), 2 (usage), 130 (SIGINT), 143 (SIGTERM).

    Every expected failure is one 'error: ...' line on stderr; the previous outputs stay untouched."""
    from data_loader import MNISTError

    argv = sys.argv[1:] if argv is None else list(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        execute(module, argv)
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ExperimentError, MNISTError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; previous outputs kept", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("error: out of memory; try smaller settings", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; previous outputs kept", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("error: terminated (SIGTERM); previous outputs kept", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
