"""The paper: the macros make_results_tex.py writes, and a full LaTeX build of paper/ from the committed figures."""
import importlib
import json
import os
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

def _write_json(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(obj))


def _macros(tex):
    """{name: body} of every \\newcommand in a generated results.tex."""
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", tex, flags=re.M))


@pytest.fixture
def toy_only(monkeypatch):
    """The paper step sees one experiment: tests/protocol_toy.py."""
    monkeypatch.setattr(make_results_tex.experiments, "ALL", ("protocol_toy",))
    monkeypatch.setattr(make_results_tex.experiments, "SEEDED", ("protocol_toy",))


def _toy_results(folder, final=0.01, **extra):
    _write_json(folder, "protocol_toy", {"experiment": "protocol_toy", "final": final, **extra})


def _run(results_dir, out, capsys, *extra):
    rc = make_results_tex.main(["--results-dir", str(results_dir), "--out", str(out), "--no-readme", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --------------------------------------------------------------------------------- make_results_tex.py

def test_macros_come_from_each_experiments_tex_numbers(tmp_path, capsys, toy_only):
    _toy_results(tmp_path / "results", final=0.0123)
    rc, out, _ = _run(tmp_path / "results", tmp_path / "results.tex", capsys)
    assert rc == 0
    macros = _macros((tmp_path / "results.tex").read_text())
    assert macros["ToyFinal"] == "0.012" and macros["MissingResults"] == ""
    assert "Reproduction scorecard" in out and "toy-min" in out


def test_scorecard_rows_follow_the_results(tmp_path, capsys, toy_only):
    for final, verdict in ((0.01, "reproduced"), (3.0, "not reproduced")):
        _toy_results(tmp_path / "results", final=final)
        assert _run(tmp_path / "results", tmp_path / "results.tex", capsys)[0] == 0
        rows = json.loads((tmp_path / "results" / "scorecard.json").read_text())
        assert [r["verdict"] for r in rows] == [verdict]
        assert set(rows[0]) >= {"id", "experiment", "claim", "paper", "ours", "verdict", "evidence"}
        assert "toy-min" in (tmp_path / "results" / "scorecard.tex").read_text()


def test_seeds_give_mean_and_sd(tmp_path, capsys, toy_only):
    _toy_results(tmp_path / "results")
    for seed, final in ((1, 0.02), (2, 0.04), (3, 0.5)):
        _toy_results(tmp_path / "seeds" / f"seed-{seed}" / "results", final=final)
    assert _run(tmp_path / "results", tmp_path / "results.tex", capsys, "--seeds-dir", str(tmp_path / "seeds"))[0] == 0
    row = json.loads((tmp_path / "results" / "scorecard.json").read_text())[0]
    assert row["seeds"]["seeds"] == ["1", "2", "3"] and row["seeds_reproduced"] == "2/3"
    assert abs(row["seeds"]["mean"] - 0.18666666666666668) < 1e-12


def test_missing_results_read_na_and_are_listed(tmp_path, capsys, toy_only):
    (tmp_path / "results").mkdir()
    rc, _, err = _run(tmp_path / "results", tmp_path / "results.tex", capsys)
    assert rc == 0 and "protocol_toy.json not found" in err
    text = (tmp_path / "results.tex").read_text()
    assert r"\AllResultsPresentfalse" in text and r"\texttt{protocol\_toy}" in _macros(text)["MissingResults"]
    assert json.loads((tmp_path / "results" / "scorecard.json").read_text())[0]["verdict"] == "not evaluated"


@pytest.mark.parametrize("content", ['{"final": 1.2,', '{"final": NaN}', "[1, 2]", '{"experiment": "other"}'])
def test_bad_results_json_is_a_one_line_error_and_keeps_old_outputs(tmp_path, content):
    results = tmp_path / "results"
    results.mkdir()
    (results / "loss_manifold.json").write_text(content)
    out = tmp_path / "results.tex"
    out.write_text("% previous build\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results-dir", str(results), "--out", str(out),
                           "--no-readme"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "loss_manifold.json" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "% previous build\n"


def test_readme_tables_are_replaced_between_markers():
    text = "top\n" + "\n".join(make_results_tex.MARKERS["scorecard"]) + "\nbottom\n"
    new = make_results_tex.replace_between(text, "scorecard", "| a |")
    assert new.startswith("top\n") and "| a |" in new and new.endswith("bottom\n")
    with pytest.raises(make_results_tex.ResultsError):
        make_results_tex.replace_between("no markers", "runtimes", "x")


def test_reproduce_cost_sums_provenance_without_the_studies():
    prov = {"cpu_model": "CPU", "cpu_count": 2}
    summaries = {"hypernets_global_small": {"provenance": dict(prov, wall_seconds=60.0, cpu_seconds=50.0)},
                 "loss_manifold": {"provenance": dict(prov, wall_seconds=120.0, cpu_seconds=100.0)},
                 "hypergradient_study": {"provenance": dict(prov, wall_seconds=6000.0, cpu_seconds=6000.0)}}
    modules = dict.fromkeys(["hypernets_global_small", "loss_manifold", "hypergradient_study"])
    assert make_results_tex.reproduce_totals(modules, summaries) == (180.0, 150.0, "CPU x2")
    text = make_results_tex.cost_markdown(modules, summaries)
    assert "**3 minutes**" in text and "2.5 CPU minutes" in text and "not run yet" not in text
    assert "1 script(s) not run yet" in make_results_tex.cost_markdown(dict(modules, scatter=None), summaries)


def test_committed_results_define_every_number_main_tex_quotes(capsys):
    """Every result macro main.tex uses is exported by an experiment's committed results (no n/a, no typo)."""
    warnings = []
    tex, rows, _ = make_results_tex.build(PAPER / "results", warnings.append)
    macros = _macros(tex)
    assert not [w for w in warnings if "reads n/a" in w or "lacks" in w], warnings
    unavailable = sorted(name for name in _used_result_macros() if macros.get(name) == NA)
    assert not unavailable
    assert rows and all(r["verdict"] != "not evaluated" for r in rows), [r["id"] for r in rows
                                                                         if r["verdict"] == "not evaluated"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------------- the LaTeX build

def _main_tex():
    """main.tex without comments."""
    return re.sub(r"(?<!\\)%.*", "", (PAPER / "main.tex").read_text())


def _used_result_macros():
    """Names of the generated result macros main.tex uses."""
    prefixes = [m.TEX_PREFIX for n in make_results_tex.experiments.ALL
                if hasattr(m := importlib.import_module(n), "TEX_PREFIX")]
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
        if os.environ.get("CI"):  # .ci/run installs TeX Live: a missing latexmk there is a broken install, not a skip
            pytest.fail("latexmk is not installed although CI is set (see .ci/run)")
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
                           "--out", str(build / "results.tex"), "--no-readme"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    absent = [n for n in make_results_tex.experiments.ALL if not (build / "results" / f"{n}.json").is_file()]
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
