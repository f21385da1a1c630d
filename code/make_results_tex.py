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


def _math_g(value):
    """A setting in its shortest form: 1.0 -> 1, -100.0 -> -100, 0.25 -> 0.25."""
    return _math(f"{_number(value):g}")


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


def word(value):
    """A word chosen by a comparison (see _choose); only plain letters and spaces pass."""
    if not isinstance(value, str) or not all(c.isalpha() or c in " -" for c in value):
        raise ValueError(f"{value!r} is not a plain word")
    return value


def number_list(values):
    """A short list of settings: [-12.0, -10.0] -> -12, -10."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{values!r} is not a non-empty list")
    return _math(", ".join(f"{_number(v):g}" for v in values))


def seconds_or_never(value):
    """A runtime with its unit ('12\\,s'), or words for null (a level the method did not reach in its budget)."""
    return r"\textup{not within the budget}" if value is None else seconds(value) + r"\,s"


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
        return _math(f"{value:g}")
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


def const(value):
    """Getter of a fixed value (the zero that a mean error is compared with)."""
    def get(summary):
        return value
    get.label = repr(value)
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


def _choose(label, condition, yes, no):
    """Getter of a word that states a comparison, so that sentences about the results follow the numbers."""
    def get(summary):
        flag = condition(summary)
        if not isinstance(flag, bool):
            raise ValueError(f"{flag!r} is not a boolean")
        return yes if flag else no
    return derived(label, get)


def _less(a, b, yes, no):
    """Word yes when the number a is below the number b, else no."""
    return _choose(f"{a.label} < {b.label}", lambda s: _number(a(s)) < _number(b(s)), yes, no)


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
CONF = _math_g           # settings as written in the config (1.0 -> 1, 0.25 -> 0.25)


def _scatter(prefix, model):
    return [
        Macro(f"Scatter{prefix}ErrorMean", key(model, "error_mean"), ERR),
        Macro(f"Scatter{prefix}ErrorStd", key(model, "error_std"), ERR),
        Macro(f"Scatter{prefix}BestTrue", key(model, "predicted_best_true_loss"), NLL),
        Macro(f"Scatter{prefix}BestGap", derived(
            f"{model}.predicted_best_true_loss - true_best",
            lambda s: _number(s[model]["predicted_best_true_loss"]) - _number(s["true_best"])), ERR),
    ]


def _large(prefix, method):
    """Macros of one method of hypernets_local_large (its summary has <method>.<field>)."""
    return [
        Macro(f"Large{prefix}FinalValid", key(method, "final_valid"), MSE),
        Macro(f"Large{prefix}FinalTest", key(method, "final_test"), MSE),
        Macro(f"Large{prefix}BestValid", key(method, "best_valid"), MSE),
        Macro(f"Large{prefix}TestAtBestValid", key(method, "test_at_best_valid"), MSE),
        Macro(f"Large{prefix}TimeToOnePercent", key(method, "seconds_to_1pct_of_final_valid"), seconds),
        Macro(f"Large{prefix}Steps", key(method, "steps"), integer),
        Macro(f"Large{prefix}Seconds", key(method, "seconds"), seconds),
    ]


def _layers(prefix, index):
    """Macros of the index-th model of compare_number_layers (summary models.<name>.<field>, in run order)."""
    def model(*path):
        def get(summary):
            models = summary["models"]
            if not isinstance(models, dict):
                raise ValueError("models is not a dict")
            return key(*path)(list(models.values())[index])
        return derived(f"models[{index}]." + ".".join(path), get)

    def name(summary):
        return list(summary["models"])[index].replace("-", "--")
    return [
        Macro(f"Layers{prefix}Name", derived(f"models[{index}] name", name), text),
        Macro(f"Layers{prefix}NumHypers", model("n_hyperparameters"), integer),
        Macro(f"Layers{prefix}FinalValid", model("final_valid"), MSE),
        Macro(f"Layers{prefix}FinalTest", model("final_test"), MSE),
        Macro(f"Layers{prefix}HandValid", model("hand_tuned", "best_valid"), MSE),
        Macro(f"Layers{prefix}HandTest", model("hand_tuned", "best_test"), MSE),
        Macro(f"Layers{prefix}HandLambda", model("hand_tuned", "best_lambda"), LAMBDA),
        Macro(f"Layers{prefix}Seconds", model("seconds"), seconds),
        Macro(f"Layers{prefix}VsHandWord",
              _less(model("final_valid"), model("hand_tuned", "best_valid"), "below", "above"), word),
    ]


def _medium(prefix, method):
    """Macros of one method of hypernets_local_medium (its summary has methods.<method>.<field>)."""
    return [
        Macro(f"Medium{prefix}BestValid", key("methods", method, "best_valid"), NLL),
        Macro(f"Medium{prefix}BestTest", key("methods", method, "test_at_best"), NLL),
        Macro(f"Medium{prefix}Evaluations", key("methods", method, "evaluations"), integer),
        Macro(f"Medium{prefix}Seconds", key("methods", method, "runtime_seconds"), seconds),
    ]


GLOBAL = key("lambda_star_cv"), key("lambda_star_hypernet")
LOCAL = key("lambda_final"), key("lambda_star_cv")

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
        Macro("GlobalHyperBatch", key("config", "batch_size"), integer),
        Macro("GlobalStepSize", key("config", "step_size"), scientific),
        Macro("GlobalHidden", key("config", "hidden_units"), integer),
        Macro("GlobalLambdaMean", key("config", "lambda_mean"), CONF),
        Macro("GlobalLambdaStd", key("config", "lambda_std"), CONF),
        Macro("GlobalLambdaMax", key("config", "lambda_max"), CONF),
        Macro("GlobalCVLo", key("config", "cv_lo"), CONF),
        Macro("GlobalCVHi", key("config", "cv_hi"), CONF),
        Macro("GlobalCVIters", key("config", "cv_iters"), integer),
        Macro("GlobalSweepSize", key("config", "sweep_size"), integer),
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
        Macro("LocalHyperBatch", key("config", "batch_size"), integer),
        Macro("LocalHypernetStep", key("config", "hypernet_step_size"), scientific),
        Macro("LocalHyperStep", key("config", "hyper_step_size"), scientific),
        Macro("LocalSigma", key("config", "sigma"), CONF),
        Macro("LocalCVIters", key("config", "cv_iters"), integer),
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
        Macro("ScatterStochSpreadWord", _choose(
            "hypernet_stochastic.error_std < gp and hypernet_fixed error_std",
            lambda s: _number(s["hypernet_stochastic"]["error_std"])
            < min(_number(s["gp"]["error_std"]), _number(s["hypernet_fixed"]["error_std"])),
            "the smallest", "not the smallest"), word),
        Macro("ScatterGPBiasWord", _less(key("gp", "error_mean"), const(0.0), "under-predicts", "over-predicts"),
              word),
        Macro("ScatterFixedBiasWord", _less(key("hypernet_fixed", "error_mean"), const(0.0), "under-predicts",
                                            "over-predicts"), word),
        Macro("ScatterTrueBest", key("true_best"), NLL),
        Macro("ScatterNTrain", key("n_train_tuples"), integer),
        Macro("ScatterNHeldout", key("n_heldout"), integer),
        Macro("ScatterSeconds", key("seconds"), seconds),
        Macro("ScatterGroundTruthSeconds", key("ground_truth_seconds"), seconds),
        Macro("ScatterGTCachedWord", _choose("ground_truth_cached", key("ground_truth_cached"),
                                             "loaded them from the on-disk cache", "trained them itself"), word),
        Macro("ScatterModels", key("config", "n_models"), integer),
        Macro("ScatterBatch", key("config", "batch_size"), integer),
        Macro("ScatterGTSteps", key("config", "gt_steps"), integer),
        Macro("ScatterGTDtype", key("config", "gt_dtype"), text),
        Macro("ScatterFixedSteps", key("config", "fixed_steps"), integer),
        Macro("ScatterStochSteps", key("config", "stochastic_steps"), integer),
    ],
    # Section 7: the experiments without released code.
    "hypernets_local_large": [
        *_large("Hyper", "hyper"),
        *_large("Unrolled", "unrolled"),
        Macro("LargeNumHypers", key("n_hyperparameters"), integer),
        Macro("LargeHypernetParams", key("hypernet_parameters"), integer),
        Macro("LargeBudget", key("config", "seconds"), seconds),
        Macro("LargeUnrollSteps", key("config", "unroll_steps"), integer),
        Macro("LargeUnrollInnerStep", key("config", "unroll_inner_step"), scientific),
        Macro("LargeUnrollOuterStep", key("config", "unroll_outer_step"), scientific),
        Macro("LargeInitLambda", key("config", "init_lambda"), LAMBDA),
        Macro("LargeHidden", key("config", "hidden"), integer),
        Macro("LargeSamples", key("config", "n_samples"), integer),
        Macro("LargeSampleSD", key("config", "sample_sd"), scientific),
        Macro("LargeInnerSteps", key("config", "inner_steps"), integer),
        Macro("LargeHypernetStep", key("config", "hypernet_step"), scientific),
        Macro("LargeLambdaStep", key("config", "lambda_step"), scientific),
        Macro("LargeBatch", key("config", "batch_size"), integer),
        Macro("LargeInitScale", key("config", "init_scale"), scientific),
        Macro("LargeUnrolledToHyperLevel", key("target", "unrolled_seconds"), seconds_or_never),
        Macro("LargeSeconds", key("total_seconds"), seconds),
        Macro("LargeValidWord", _less(key("hyper", "final_valid"), key("unrolled", "final_valid"), "lower", "higher"),
              word),
        Macro("LargeTestWord", _less(key("hyper", "final_test"), key("unrolled", "final_test"), "lower", "higher"),
              word),
        Macro("LargeTargetWord", _choose("target.met", key("target", "met"), "does", "does not"), word),
    ],
    "compare_number_layers": [
        *_layers("One", 0),
        *_layers("Two", 1),
        *_layers("Three", 2),
        Macro("LayersSeconds", key("total_seconds"), seconds),
        Macro("LayersDeeperWord", _choose("target.deeper_models_below_linear_valid",
                                          key("target", "deeper_models_below_linear_valid"),
                                          "both end", "do not both end"), word),
        Macro("LayersSearchGrid", key("config", "search_lambdas"), number_list),
        Macro("LayersSearchSteps", key("config", "search_steps"), integer),
        Macro("LayersSearchStep", key("config", "search_step"), scientific),
    ],
    "hypernets_local_medium": [
        *_medium("Hyper", "hypernet"),
        *_medium("Random", "random"),
        *_medium("Bayes", "bayesopt"),
        Macro("MediumBudget", key("budget_seconds"), seconds),
        Macro("MediumSeconds", key("total_seconds"), seconds),
        Macro("MediumHypernetSteps", key("methods", "hypernet", "hypernet_steps"), integer),
        Macro("MediumLambdaSteps", key("methods", "hypernet", "lambda_steps"), integer),
        Macro("MediumHypernetParams", key("hypernet_parameters"), integer),
        Macro("MediumSampleSD", key("config", "sample_sd"), CONF),
        Macro("MediumLambdaStep", key("config", "lambda_step"), scientific),
        Macro("MediumLambdaInit", key("config", "lambda_init"), CONF),
        Macro("MediumElementarySteps", key("config", "elementary_steps"), integer),
        Macro("MediumFractionAhead", key("fraction_of_budget_hypernet_below_both"), percent),
        Macro("MediumEndWord", _choose("hypernet_below_both_at_end", key("hypernet_below_both_at_end"),
                                       "the lowest", "not the lowest"), word),
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
