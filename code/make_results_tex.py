"""Write paper/results.tex: one LaTeX macro for every number the paper quotes, read from paper/results/*.json.

Usage (from code/, or by path from anywhere):
    python make_results_tex.py [--results-dir DIR] [--out FILE]

A results file that does not exist yet turns its macros into the placeholder "n/a" (one warning line on
stderr per file), so the paper always compiles; a results file that exists but is not valid JSON is an
error (one line, exit status 1), because silently printing "n/a" would hide a broken run.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "paper" / "results"
OUT_FILE = REPO / "paper" / "results.tex"
MISSING = r"\textup{n/a}"  # what a macro expands to when its number is not available


class ResultsError(Exception):
    """A results file exists but cannot be read (reported as one line, exit status 1)."""


# ------------------------------------------------------------------------------------------ formats

def _number(value):
    """value as a finite float; ValueError for booleans, strings, NaN, infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not finite")
    return value


def _math(text):
    """Wrap a formatted number so that its minus sign is typeset correctly in text and in math."""
    return r"\ensuremath{" + text + "}"


def fixed(decimals):
    """Formatter with a fixed number of decimals (hyperparameters, losses on one scale)."""
    def fmt(value):
        text = f"{_number(value):.{decimals}f}"
        return _math("0" + text[2:] if text.startswith("-0") and float(text) == 0 else text)  # no "-0.00"
    return fmt


def significant(digits=3):
    """Formatter with a number of significant digits, never in exponent notation (errors, MSE values)."""
    def fmt(value):
        value = _number(value)
        if value == 0:
            return _math("0")
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
        return fixed(decimals)(value)
    return fmt


def integer(value):
    """Whole number with thin-space thousands groups: 10240 -> 10{,}240."""
    value = _number(value)
    if value != round(value):
        raise ValueError(f"{value!r} is not a whole number")
    return _math(f"{int(round(value)):,}".replace(",", "{,}"))


def seconds(value):
    """A runtime in seconds: whole seconds from 10 s up, one decimal below."""
    value = _number(value)
    if value < 0:
        raise ValueError(f"{value!r} is a negative runtime")
    return _math(f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def minutes(value):
    """A runtime in seconds shown in minutes with one decimal."""
    return _math(f"{_number(value) / 60:.1f}")


def percent(value):
    """A fraction in [0, 1] as a whole percentage: 0.873 -> 87\\%."""
    value = _number(value)
    if not 0 <= value <= 1:
        raise ValueError(f"{value!r} is not a fraction")
    return _math(f"{100 * value:.0f}" + r"\%")


def scientific(value):
    """A small constant like 1e-05 as 10^{-5} (or 2\\times 10^{-4})."""
    value = _number(value)
    if value == 0:
        return _math("0")
    exponent = math.floor(math.log10(abs(value)))
    mantissa = round(value / 10 ** exponent, 3)
    if abs(mantissa) == 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    if exponent in (-1, 0, 1, 2):
        return significant(3)(value)
    head = "" if mantissa == 1 else (f"{mantissa:g}" + r"\times ")
    return _math(f"{head}10^{{{exponent}}}")


def text(value):
    """A short string (script or method names) escaped for LaTeX."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    specials = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(specials.get(char, char) for char in value)


# ------------------------------------------------------------------------------------------ lookups

def key(*path):
    """Getter for a nested key path: key('gp', 'error_mean')(summary) == summary['gp']['error_mean']."""
    def get(summary):
        value = summary
        for part in path:
            if isinstance(value, list):
                value = value[int(part)]
            elif isinstance(value, dict):
                value = value[part]
            else:
                raise KeyError(part)
        return value
    get.label = ".".join(map(str, path))
    return get


def first(*getters):
    """Getter that returns the first available of several key paths (keys that differ between scripts)."""
    def get(summary):
        for getter in getters:
            try:
                return getter(summary)
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        raise KeyError(" or ".join(g.label for g in getters))
    get.label = " or ".join(g.label for g in getters)
    return get


def derived(label, function):
    """Getter computed from several keys (e.g. a gap between two numbers)."""
    def get(summary):
        return function(summary)
    get.label = label
    return get


def _abs_gap(a, b):
    return derived(f"|{a.label} - {b.label}|", lambda s: abs(_number(a(s)) - _number(b(s))))


def _mean_abs_gap(a, b):
    def gap(summary):
        xs, ys = a(summary), b(summary)
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) or not xs:
            raise ValueError("expected two lists of equal, non-zero length")
        return sum(abs(_number(x) - _number(y)) for x, y in zip(xs, ys, strict=True)) / len(xs)
    return derived(f"mean |{a.label} - {b.label}|", gap)


def _last(getter):
    def get(summary):
        values = getter(summary)
        if not isinstance(values, list) or not values:
            raise ValueError("expected a non-empty list")
        return values[-1]
    return derived(f"{getter.label}[-1]", get)


def _length(getter):
    def get(summary):
        values = getter(summary)
        if not isinstance(values, list):
            raise ValueError("expected a list")
        return len(values)
    return derived(f"len({getter.label})", get)


# ------------------------------------------------------------------------------------------ the macros

@dataclass(frozen=True)
class Macro:
    """One LaTeX macro: its name (letters only), how to find its value in the summary, how to print it."""
    name: str
    get: Callable
    fmt: Callable


LAMBDA = fixed(2)        # hyperparameters (log weight decay) to two decimals
NLL = fixed(3)           # losses on the Gaussian log-likelihood scale (about 0.5 to 3)
ERR = significant(2)     # signed errors of predicted losses
MSE = significant(3)     # mean squared errors (about 0.01 to 0.05)
CONF = significant(3)    # step sizes, scales and other settings


def _config(*names):
    """Getter for a setting in the saved config, under any of several names."""
    return first(*(key("config", n) for n in names))


GLOBAL = key("lambda_star_cv"), key("lambda_star_hypernet")
LOCAL = key("lambda_final"), key("lambda_star_cv")


def _scatter(prefix, model):
    return [
        Macro(f"Scatter{prefix}ErrorMean", key(model, "error_mean"), ERR),
        Macro(f"Scatter{prefix}ErrorStd", key(model, "error_std"), ERR),
        Macro(f"Scatter{prefix}BestTrue", key(model, "predicted_best_true_loss"), NLL),
        Macro(f"Scatter{prefix}BestGap", derived(
            f"{model}.predicted_best_true_loss - true_best",
            lambda s: _number(s[model]["predicted_best_true_loss"]) - _number(s["true_best"])), ERR),
    ]


def _method(prefix, method):
    """Macros of one method of a runtime-comparison experiment (large, layers, medium)."""
    names = {"hypernet": ("hypernet", "hyper", "hypernetwork", "hyper_training"),
             "unrolled": ("unrolled", "reverse", "unroll"),
             "random": ("random_search", "random"),
             "bayes": ("bayesian_optimisation", "bayesian_optimization", "bayes_opt", "bayesopt", "bo")}[method]

    def pick(*fields):
        return first(*(key(n, f) for n in names for f in fields),
                     *(key(f"{n}_{f}") for n in names for f in fields))
    return [
        Macro(f"{prefix}FinalValid", pick("final_valid", "valid_final", "final_valid_loss", "valid_loss_final"), MSE),
        Macro(f"{prefix}FinalTest", pick("final_test", "test_final", "final_test_loss", "test_loss_final"), MSE),
        Macro(f"{prefix}BestValid", pick("best_valid", "valid_best", "best_valid_loss"), MSE),
        Macro(f"{prefix}BestTest", pick("best_test", "test_best", "test_at_best_valid", "best_test_loss"), MSE),
        Macro(f"{prefix}TimeToOnePercent", pick("time_to_1pct", "seconds_to_1pct", "time_to_within_1pct",
                                                "time_within_1pct", "time_to_one_percent"), seconds),
        Macro(f"{prefix}Seconds", pick("seconds", "elapsed", "runtime"), seconds),
    ]


def _medium(prefix, method):
    """Macros of one method of hypernets_local_medium (its summary has methods.<method>.<field>)."""
    return [
        Macro(f"Medium{prefix}BestValid", key("methods", method, "best_valid"), NLL),
        Macro(f"Medium{prefix}BestTest", key("methods", method, "test_at_best"), NLL),
        Macro(f"Medium{prefix}Evaluations", key("methods", method, "evaluations"), integer),
        Macro(f"Medium{prefix}Seconds", key("methods", method, "runtime_seconds"), seconds),
    ]


def _total_runtime(methods):
    """Sum of runtime_seconds over the entries of a dict of methods."""
    def total(summary):
        entries = methods(summary)
        if not isinstance(entries, dict) or not entries:
            raise ValueError("expected a non-empty dict of methods")
        return sum(_number(entry["runtime_seconds"]) for entry in entries.values())
    return derived(f"sum of {methods.label}.*.runtime_seconds", total)


def _layer_model(prefix, index):
    """Macros of the index-th model (0: 784-10, 1: 784-100-10, 2: 784-100-100-10) of compare_number_layers."""
    def pick(*fields):
        getters = []
        for container in ("models", "results", "runs"):
            getters += [key(container, index, f) for f in fields]
        return first(*getters)
    return [
        Macro(f"{prefix}FinalValid", pick("final_valid", "valid_final", "final_valid_loss"), MSE),
        Macro(f"{prefix}FinalTest", pick("final_test", "test_final", "final_test_loss"), MSE),
        Macro(f"{prefix}HandValid", pick("baseline_valid", "hand_tuned_valid", "baseline_valid_loss"), MSE),
        Macro(f"{prefix}HandTest", pick("baseline_test", "hand_tuned_test", "baseline_test_loss"), MSE),
        Macro(f"{prefix}NumHypers", pick("n_hypers", "num_hypers", "n_hyperparameters"), integer),
    ]


EXPERIMENTS = {
    # Section 3, Algorithm 2.
    "hypernets_global_small": [
        Macro("GlobalLambdaStarCV", GLOBAL[0], LAMBDA),
        Macro("GlobalLambdaStarHypernet", GLOBAL[1], LAMBDA),
        Macro("GlobalLambdaGap", _abs_gap(*GLOBAL), LAMBDA),
        Macro("GlobalCurveGap", _mean_abs_gap(key("hypernet_valid_at_cv"), key("cv_valid_loss")), NLL),
        Macro("GlobalNumCV", _length(key("cv_lambdas")), integer),
        Macro("GlobalIterations", key("iterations"), integer),
        Macro("GlobalSeconds", key("seconds"), seconds),
        Macro("GlobalHyperBatch", _config("hyper_batch", "batch_size", "n_hyper_samples", "num_hyper_samples"),
              integer),
        Macro("GlobalStepSize", _config("step_size", "hyper_step_size", "learning_rate", "hypernet_step_size"),
              scientific),
        Macro("GlobalCVIters", _config("cv_iters", "cv_steps", "elementary_iters", "cv_iterations"), integer),
        Macro("GlobalSweepSize", _config("sweep_size", "n_sweep", "dense_sweep", "n_dense", "sweep_points"), integer),
    ],
    # Section 4, Algorithm 3.
    "hypernets_local_small": [
        Macro("LocalLambdaInit", key("lambda_init"), LAMBDA),
        Macro("LocalLambdaFinal", LOCAL[0], LAMBDA),
        Macro("LocalLambdaStarCV", LOCAL[1], LAMBDA),
        Macro("LocalLambdaGap", _abs_gap(*LOCAL), LAMBDA),
        Macro("LocalValidLossFinal", key("valid_loss_final"), NLL),
        Macro("LocalIterations", key("iterations"), integer),
        Macro("LocalSeconds", key("seconds"), seconds),
        Macro("LocalHyperBatch", _config("hyper_batch", "batch_size", "n_hyper_samples", "num_hyper_samples"),
              integer),
        Macro("LocalHypernetStep", _config("hypernet_step_size", "hypernet_step", "sgd_step_size", "step_size"),
              scientific),
        Macro("LocalHyperStep", _config("hyper_step_size", "lambda_step_size", "hyper_step", "adam_step_size"),
              scientific),
    ],
    # Section 5: analytic manifolds.
    "loss_manifold": [
        Macro("ManifoldLambdaStar", key("lambda_star"), LAMBDA),
        Macro("ManifoldLambdaPhiStar", key("lambda_phi_star"), LAMBDA),
        Macro("ManifoldLambdaGap", _abs_gap(key("lambda_star"), key("lambda_phi_star")), LAMBDA),
        Macro("ManifoldValidAtStar", key("valid_loss_at_lambda_star"), NLL),
        Macro("ManifoldValidAtPhiStar", key("valid_loss_at_lambda_phi_star"), NLL),
    ],
    # Section 6: learned versus true validation loss.
    "learn_vs_true_loss_scatter": [
        *_scatter("GP", "gp"),
        *_scatter("Fixed", "hypernet_fixed"),
        *_scatter("Stoch", "hypernet_stochastic"),
        Macro("ScatterTrueBest", key("true_best"), NLL),
        Macro("ScatterNTrain", key("n_train_tuples"), integer),
        Macro("ScatterNHeldout", key("n_heldout"), integer),
        Macro("ScatterSeconds", key("seconds"), seconds),
        Macro("ScatterGroundTruthSeconds", key("ground_truth_seconds"), seconds),
    ],
    # Section 7: the experiments without released code.
    "hypernets_local_large": [
        *_method("LargeHyper", "hypernet"),
        *_method("LargeUnrolled", "unrolled"),
        Macro("LargeBudget", first(key("config", "seconds"), key("config", "budget_seconds"), key("budget_seconds")),
              seconds),
        Macro("LargeUnrollSteps", _config("unroll_steps", "unroll", "inner_steps", "unrolled_steps"), integer),
        Macro("LargeSeconds", key("seconds"), seconds),
    ],
    "compare_number_layers": [
        *_layer_model("LayersOne", 0),
        *_layer_model("LayersTwo", 1),
        *_layer_model("LayersThree", 2),
        Macro("LayersSeconds", key("seconds"), seconds),
    ],
    "hypernets_local_medium": [
        *_medium("Hyper", "hypernet"),
        *_medium("Random", "random"),
        *_medium("Bayes", "bayesopt"),
        Macro("MediumBudget", key("budget_seconds"), seconds),
        Macro("MediumSeconds", _total_runtime(key("methods")), seconds),
        Macro("MediumFractionAhead", key("fraction_of_budget_hypernet_below_both"), percent),
    ],
}


# ------------------------------------------------------------------------------------------ writing

def _read(path):
    """The summary dict in path, None when the file does not exist; ResultsError when it is unreadable."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} cannot be read ({err})") from None
    try:
        summary = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not valid JSON ({err}); rerun the script that writes it") from None
    if not isinstance(summary, dict):
        raise ResultsError(f"{path} does not hold a JSON object")
    return summary


def build(results_dir, warn):
    """The text of results.tex for the JSON files in results_dir; warn(line) is called for each gap."""
    lines = [
        "% Generated by code/make_results_tex.py from results/*.json; do not edit (make results-tex rewrites it).",
        r"\newif\ifAllResultsPresent",
    ]
    missing = []
    for name, macros in EXPERIMENTS.items():
        path = Path(results_dir) / f"{name}.json"
        summary = _read(path)
        lines.append(f"% {name}: " + ("not yet generated" if summary is None else f"from results/{name}.json"))
        if summary is None:
            missing.append(name)
            warn(f"warning: {path} not found; its {len(macros)} macros read 'n/a' (run {name}.py)")
        for macro in macros:
            value = MISSING
            if summary is not None:
                try:
                    value = macro.fmt(macro.get(summary))
                except (KeyError, IndexError, TypeError, ValueError) as err:
                    warn(f"warning: {path.name}: no usable {macro.get.label} for \\{macro.name} ({err}); using n/a")
            lines.append(rf"\newcommand{{\{macro.name}}}{{{value}}}")
    listing = ", ".join(rf"\texttt{{{text(n)}}}" for n in missing)
    lines.append(rf"\newcommand{{\MissingResults}}{{{listing}}}")
    lines.append(r"\AllResultsPresentfalse" if missing else r"\AllResultsPresenttrue")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the LaTeX macros of the paper's numbers from results JSON.")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="folder of <script>.json (default paper/results)")
    parser.add_argument("--out", default=str(OUT_FILE), help="macro file to write (default paper/results.tex)")
    args = parser.parse_args(argv)
    try:
        content = build(args.results_dir, lambda line: print(line, file=sys.stderr))
        atomic_write_bytes(args.out, content.encode("utf-8"))
    except (ResultsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
