"""The two declaration tables of the protocol: common.claims (scorecard rows) and texfmt.macros (paper numbers)."""
import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "code"))
import common  # noqa: E402
import experiments  # noqa: E402
import texfmt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "paper" / "results"


def gap_verdict(summary):
    return summary["gap"], "reproduced" if summary["gap"] < 0.1 else "not reproduced"


TABLE = """
    id: toy-gap
    claim: The gap is small,
      even after a continuation line
    paper: ~0 (Figure 1)
    evaluate: gap_verdict
    fmt: {:.2f}
    evidence: gap; toy.pdf

    id: toy-other
    claim: Another claim
    paper: implied: Algorithm 3 descends
    evaluate: gap_verdict
    evidence: gap
"""


def test_claims_table_builds_claims():
    rows = common.claims(globals(), TABLE)
    assert [r.id for r in rows] == ["toy-gap", "toy-other"]
    assert rows[0].claim == "The gap is small, even after a continuation line"
    assert rows[0].fmt == "{:.2f}" and rows[1].fmt == common.Claim.fmt  # fmt is optional
    assert rows[1].paper == "implied: Algorithm 3 descends"              # a colon inside a value is kept
    assert rows[0].evaluate({"gap": 0.05}) == (0.05, "reproduced")


@pytest.mark.parametrize("table, message", [
    ("id: a\nclaim: c\npaper: p\nevaluate: gap_verdict\n", "missing evidence"),
    ("id: a\nclaim: c\npaper: p\nevaluate: nothing_here\nevidence: e\n", "names no function"),
    ("id: a\nclaim: c\nclaim: d\npaper: p\nevaluate: gap_verdict\nevidence: e\n", "is not a new"),
    ("id: a\nverdict: c\n", "is not a new"),
    ("id: a\nclaim: c\npaper: p\nevaluate: gap_verdict\nevidence: e\n\n"
     "id: a\nclaim: c\npaper: p\nevaluate: gap_verdict\nevidence: e\n", "repeats an id"),
    ("id: a\nclaim: c\npaper: p\nevaluate: TABLE\nevidence: e\n", "names no function"),
])
def test_claims_table_rejects(table, message):
    with pytest.raises(ValueError, match=message):
        common.claims(globals(), table)


def test_macro_table_reads_paths_and_formats():
    summary = {"a": 0.12345, "config": {"n": 1000}, "curve": [0.5, 0.25], "m": {"784-10": {"x": -3.0}}}
    numbers = texfmt.macros("Toy", summary, """
        A       fixed3   a
        N       integer  config.n
        Second  nll      curve.1
        X       lam      m.784-10.x
    """)
    assert numbers == {"ToyA": texfmt.fixed(0.12345, 3), "ToyN": texfmt.integer(1000),
                       "ToySecond": texfmt.nll(0.25), "ToyX": texfmt.lam(-3.0)}
    with pytest.raises(KeyError):
        texfmt.macros("Toy", summary, "B  nll  missing.key")


@pytest.mark.parametrize("table, message", [
    ("A nll", "is not 'Name formatter key.path'"),
    ("A bogus a", "unknown formatter"),
    ("A fixed a", "unknown formatter"),
    ("A nll a\nA lam a", "declares a name twice"),
])
def test_macro_table_rejects(table, message):
    with pytest.raises(ValueError, match=message):
        texfmt.macros("Toy", {"a": 1.0}, table)


@pytest.mark.parametrize("name", experiments.ALL + experiments.STUDIES)
def test_every_script_declares_valid_tables(name):
    """Each script's CLAIMS are Claims and its tex_numbers work on its committed results, under its prefix."""
    module = importlib.import_module(name)
    assert module.CLAIMS and all(isinstance(c, common.Claim) for c in module.CLAIMS)
    path = RESULTS / f"{name}.json"
    if path.exists():
        summary = json.loads(path.read_text())
        numbers = module.tex_numbers(summary)
        assert numbers and all(k.startswith(module.TEX_PREFIX) for k in numbers)
