"""The paper: the macros make_results_tex.py writes, and a full LaTeX build of paper/ from the committed figures."""
import json
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import make_results_tex

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "paper"
SCRIPT = REPO / "code" / "make_results_tex.py"
NA = r"\textup{n/a}"

GLOBAL = {
    "lambda_star_cv": 1.8363, "lambda_star_hypernet": 1.9, "cv_lambdas": [-1.0, 1.0, 3.0],
    "cv_valid_loss": [1.0, 2.0, 3.0], "hypernet_valid_at_cv": [1.1, 2.0, 2.9], "iterations": 5000,
    "seconds": 123.4, "config": {"step_size": 1e-4},
}
SCATTER = {
    "gp": {"error_mean": -0.0412, "error_std": 0.0731, "predicted_best_true_loss": 0.6712},
    "hypernet_fixed": {"error_mean": 0.0523, "error_std": 0.0911, "predicted_best_true_loss": 0.6012},
    "hypernet_stochastic": {"error_mean": 0.0012, "error_std": 0.0123, "predicted_best_true_loss": 0.5955},
    "true_best": 0.5931, "n_train_tuples": 25, "n_heldout": 10215, "seconds": 7.25, "config": {},
}


def _write_json(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(obj))


def _macros(tex):
    """{name: body} of every \\newcommand in a generated results.tex."""
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", tex, flags=re.M))


def _run(results_dir, out, capsys):
    rc = make_results_tex.main(["--results-dir", str(results_dir), "--out", str(out)])
    err = capsys.readouterr().err
    return rc, err


# --------------------------------------------------------------------------------- make_results_tex.py

def test_macros_from_crafted_json(tmp_path, capsys):
    results = tmp_path / "results"
    _write_json(results, "hypernets_global_small", GLOBAL)
    _write_json(results, "learn_vs_true_loss_scatter", SCATTER)
    out = tmp_path / "results.tex"
    rc, err = _run(results, out, capsys)
    assert rc == 0
    macros = _macros(out.read_text())
    assert macros["GlobalLambdaStarCV"] == r"\ensuremath{1.84}"
    assert macros["GlobalLambdaStarHypernet"] == r"\ensuremath{1.90}"
    assert macros["GlobalLambdaGap"] == r"\ensuremath{0.06}"
    assert macros["GlobalCurveGap"] == r"\ensuremath{0.067}"  # mean |(0.1, 0, 0.1)|
    assert macros["GlobalNumCV"] == r"\ensuremath{3}"
    assert macros["GlobalIterations"] == r"\ensuremath{5{,}000}"
    assert macros["GlobalSeconds"] == r"\ensuremath{123}"
    assert macros["GlobalStepSize"] == r"\ensuremath{10^{-4}}"
    assert macros["ScatterGPErrorMean"] == r"\ensuremath{-0.041}"
    assert macros["ScatterStochErrorStd"] == r"\ensuremath{0.012}"
    assert macros["ScatterFixedBestTrue"] == r"\ensuremath{0.601}"
    assert macros["ScatterStochBestGap"] == r"\ensuremath{0.0024}"
    assert macros["ScatterNHeldout"] == r"\ensuremath{10{,}215}"
    assert macros["ScatterSeconds"] == r"\ensuremath{7.2}"
    # the experiments without a JSON file are placeholders, each reported once on stderr
    assert macros["LocalLambdaFinal"] == NA and macros["ManifoldLambdaStar"] == NA
    assert "hypernets_local_small.json not found" in err
    assert "hypernets_global_small.json not found" not in err
    assert r"\AllResultsPresentfalse" in out.read_text()


def test_comparison_words_and_nested_results(tmp_path, capsys):
    results = tmp_path / "results"
    run = {"final_valid": 0.0413, "final_test": 0.0398, "best_valid": 0.0412, "test_at_best_valid": 0.0398,
           "seconds_to_1pct_of_final_valid": 16.2, "steps": 1833, "seconds": 240.0}
    _write_json(results, "hypernets_local_large", {
        "hyper": run, "unrolled": {**run, "final_valid": 0.0399, "final_test": 0.0401},
        "target": {"met": False, "unrolled_seconds": None}, "total_seconds": 512.0})
    model = {"final_valid": 0.02, "hand_tuned": {"best_valid": 0.03}, "n_hyperparameters": 7850}
    _write_json(results, "compare_number_layers", {
        "models": {"784-10": model, "784-100-10": {**model, "final_valid": 0.04}, "784-100-100-10": model},
        "target": {"deeper_models_below_linear_valid": False}})
    out = tmp_path / "results.tex"
    rc, _ = _run(results, out, capsys)
    assert rc == 0
    macros = _macros(out.read_text())
    assert macros["LargeValidWord"] == "higher" and macros["LargeTestWord"] == "lower"
    assert macros["LargeTargetWord"] == "does not"
    assert macros["LargeUnrolledToHyperLevel"] == r"\textup{not within the budget}"
    assert macros["LargeHyperSteps"] == r"\ensuremath{1{,}833}"
    assert macros["LayersOneName"] == "784--10" and macros["LayersThreeName"] == "784--100--100--10"
    assert macros["LayersOneVsHandWord"] == "below" and macros["LayersTwoVsHandWord"] == "above"
    assert macros["LayersDeeperWord"] == "do not both end"
    assert macros["LayersTwoNumHypers"] == r"\ensuremath{7{,}850}"
    assert macros["LargeBudget"] == NA  # no config in this summary


def test_missing_json_gives_na_and_one_warning_per_file(tmp_path, capsys):
    out = tmp_path / "results.tex"
    rc, err = _run(tmp_path / "nothing-here", out, capsys)
    assert rc == 0
    macros = _macros(out.read_text())
    expected = [m.name for ms in make_results_tex.EXPERIMENTS.values() for m in ms]
    assert set(expected) <= set(macros)
    assert all(macros[name] == NA for name in expected)
    lines = err.strip().splitlines()
    assert len(lines) == len(make_results_tex.EXPERIMENTS)
    assert all(line.startswith("warning: ") and "not found" in line for line in lines)
    assert r"\AllResultsPresentfalse" in out.read_text()
    assert r"\texttt{hypernets\_global\_small}" in macros["MissingResults"]


def test_missing_or_bad_key_gives_na_and_warning(tmp_path, capsys):
    results = tmp_path / "results"
    _write_json(results, "hypernets_global_small", {**GLOBAL, "lambda_star_cv": float("nan"), "seconds": "slow"})
    out = tmp_path / "results.tex"
    rc, err = _run(results, out, capsys)
    assert rc == 0
    macros = _macros(out.read_text())
    assert macros["GlobalLambdaStarCV"] == NA and macros["GlobalSeconds"] == NA and macros["GlobalLambdaGap"] == NA
    assert macros["GlobalLambdaStarHypernet"] == r"\ensuremath{1.90}"
    assert "\\GlobalLambdaStarCV" in err and "\\GlobalSeconds" in err


def test_all_results_present_sets_flag(tmp_path, capsys):
    results = tmp_path / "results"
    for name in make_results_tex.EXPERIMENTS:
        _write_json(results, name, {"seconds": 1.0})
    out = tmp_path / "results.tex"
    rc, _ = _run(results, out, capsys)
    assert rc == 0
    assert r"\AllResultsPresenttrue" in out.read_text()
    assert _macros(out.read_text())["MissingResults"] == ""


def test_corrupt_json_is_a_one_line_error(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "loss_manifold.json").write_text('{"lambda_star": 1.2,')  # truncated
    out = tmp_path / "results.tex"
    out.write_text("% previous build\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results-dir", str(results), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "loss_manifold.json" in errors[0]
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "% previous build\n"  # the old file is left alone


def test_macro_names_are_letters_and_unique_and_cover_main_tex():
    names = [m.name for ms in make_results_tex.EXPERIMENTS.values() for m in ms]
    assert all(re.fullmatch(r"[A-Za-z]+", n) for n in names)
    assert len(names) == len(set(names))
    # every results macro main.tex uses is one the generator defines (a typo would be an undefined command)
    used = _used_result_macros()
    assert used, "main.tex quotes no generated numbers"
    assert used <= set(names), f"main.tex uses undefined result macros: {sorted(used - set(names))}"


# --------------------------------------------------------------------------------- the LaTeX build

def _main_tex():
    """main.tex without comments."""
    return re.sub(r"(?<!\\)%.*", "", (PAPER / "main.tex").read_text())


def _used_result_macros():
    """Names of the generated result macros main.tex uses."""
    prefixes = ("Global", "Local", "Manifold", "Scatter", "Large", "Layers", "Medium")
    return set(re.findall(r"\\((?:%s)[A-Za-z]*)" % "|".join(prefixes), _main_tex()))


def referenced_figures():
    """Figure files main.tex includes (through \\resultfigure or \\includegraphics), in order."""
    tex = _main_tex()
    names = re.findall(r"\\resultfigure\{[^{}]*\}\{([^{}]+)\}", tex)
    names += [n for n in re.findall(r"\\includegraphics(?:\[[^\]]*\])?\{([^{}]+)\}", tex) if "#" not in n]
    return list(dict.fromkeys(names))


def count_pdf_pages(data):
    """Number of /Type /Page objects in a PDF, looking inside compressed object streams too (pure Python)."""
    chunks = [data]
    for match in re.finditer(rb"stream\r?\n(.*?)endstream", data, flags=re.S):
        try:
            chunks.append(zlib.decompressobj().decompress(match.group(1)))
        except zlib.error:
            continue  # not a Flate stream (e.g. an image)
    return sum(len(re.findall(rb"/Type\s*/Page(?![A-Za-z])", chunk)) for chunk in chunks)


def test_main_tex_includes_every_figure():
    figures = referenced_figures()
    expected = {"hypernets_global_small", "hypernets_local_small", "train_loss_manifold", "valid_loss_manifold",
                "learn_vs_true_loss_scatter", "learn_vs_true_loss_hist", "hypernets_local_large",
                "compare_number_layers", "hypernets_local_medium"}
    assert expected <= {Path(f).stem for f in figures}


@pytest.mark.latex
def test_paper_builds_from_committed_figures(tmp_path):
    if shutil.which("latexmk") is None:
        pytest.skip("latexmk is not installed (CI installs Debian's TeX Live and latexmk; see .ci/run)")
    figures = referenced_figures()
    missing = [f for f in figures if not (PAPER / f).is_file()]
    assert not missing, f"figure files referenced by paper/main.tex are missing from paper/: {', '.join(missing)}"

    build = tmp_path / "paper"
    (build / "results").mkdir(parents=True)
    for name in ("main.tex", "main_bib.bib", *figures):
        shutil.copy(PAPER / name, build / name)
    for path in (PAPER / "results").glob("*"):
        if path.suffix in (".json", ".tex"):
            shutil.copy(path, build / "results" / path.name)

    proc = subprocess.run([sys.executable, str(SCRIPT), "--results-dir", str(build / "results"),
                           "--out", str(build / "results.tex")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    absent = [n for n in make_results_tex.EXPERIMENTS if not (build / "results" / f"{n}.json").is_file()]
    assert not absent, f"results missing from paper/results/: {', '.join(n + '.json' for n in absent)}"

    proc = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                          cwd=build, capture_output=True, text=True, timeout=300)
    log = (build / "main.log").read_text(errors="replace") if (build / "main.log").exists() else ""
    assert proc.returncode == 0, f"latexmk failed:\n{proc.stdout[-3000:]}\n{log[-3000:]}"

    pdf = build / "main.pdf"
    assert pdf.is_file()
    pages = count_pdf_pages(pdf.read_bytes())
    written = re.search(r"Output written on main\.pdf \((\d+) pages?", log)
    assert written and int(written.group(1)) == pages
    assert pages >= 4

    inputs = {Path(line.split(" ", 1)[1]).name for line in (build / "main.fls").read_text().splitlines()
              if line.startswith("INPUT ")}
    not_included = [f for f in figures if Path(f).name not in inputs]
    assert not not_included, f"figures not included in the PDF: {not_included}"

    problems = [line for line in log.splitlines()
                if re.search(r"undefined|File `[^']*' not found|^No file |not yet generated|multiply.defined", line)]
    assert not problems, "LaTeX log problems:\n" + "\n".join(problems)
    blg = (build / "main.blg").read_text(errors="replace")
    assert "didn't find a database entry" not in blg
    macros = _macros((build / "results.tex").read_text())
    unavailable = sorted(name for name in _used_result_macros() if macros.get(name) == NA)
    assert not unavailable, f"numbers quoted in main.tex are unavailable (n/a) in the results: {unavailable}"
