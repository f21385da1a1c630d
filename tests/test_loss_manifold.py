"""loss_manifold.py: the analytic curves, the minimisers against a dense search, figures and JSON."""
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import common
import loss_manifold as lm
from conftest import CODE


def dense_argmin(fun, low, high, points=2_000_001):
    grid = np.linspace(low, high, points, endpoint=False)
    return grid[np.argmin(fun(grid))]


def test_best_response_minimises_training_loss():
    lam = np.linspace(-np.pi, np.pi, 37)
    w = np.linspace(-3, 3, 60001)[:, None]
    grid_best = w[np.argmin(lm.train_loss(w, lam[None, :]), axis=0), 0]
    np.testing.assert_allclose(grid_best, lm.best_response(lam), atol=1e-3)
    np.testing.assert_allclose(lm.hypernet_response(lam), -lam)


def test_minimisers_match_dense_search():
    c = lm.Config()
    summary, _ = lm.run(c, None)
    dense = dense_argmin(lambda x: lm.valid_loss(lm.best_response(x)), c.lam_low, c.lam_high)
    dense_phi = dense_argmin(lambda x: lm.valid_loss(lm.hypernet_response(x)), c.phi_low, c.phi_high)
    assert summary["lambda_star"] == pytest.approx(dense, abs=1e-5)
    assert summary["lambda_phi_star"] == pytest.approx(dense_phi, abs=1e-5)
    # Analytically both are pi/2: w*(pi/2) = -1 is the lowest w* reaches; w_phi(pi/2) = -pi/2 minimises sin.
    assert summary["lambda_star"] == pytest.approx(np.pi / 2, abs=1e-5)
    assert summary["valid_loss_at_lambda_star"] == pytest.approx(np.sin(-1.0), abs=1e-9)
    assert summary["valid_loss_at_lambda_phi_star"] == pytest.approx(-1.0, abs=1e-9)


def test_minimiser_respects_range():
    # On a range that stops before pi/2 the minimum of sin(-lambda) is at the upper end.
    best = lm.minimise_along(lm.hypernet_response, -1.0, 1.0, 1001)
    assert best == pytest.approx(1.0, abs=1e-6) and best <= 1.0


def test_grid_matches_spec():
    _, arrays = lm.run(lm.Config(), None)
    assert arrays["w"].shape == (100,) and arrays["lam"].shape == (100,)
    assert arrays["train_surface"].shape == (100, 100)
    assert arrays["lam_phi"].min() >= -np.pi / 1.61 and arrays["lam_phi"].max() < np.pi / 1.65


def test_script_end_to_end_and_replot(tmp_path):
    cmd = [sys.executable, str(CODE / "loss_manifold.py"), "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lambda* = 1.570796" in out.stdout
    names = [f"{n}.{e}" for n in ("train_loss_manifold", "valid_loss_manifold") for e in ("pdf", "png")]
    for name in names:
        assert (tmp_path / name).stat().st_size > 1000
    summary = json.loads((tmp_path / "results" / "loss_manifold.json").read_text())
    assert {"lambda_star", "lambda_phi_star", "provenance", "config"} <= set(summary)
    pdfs = {name: (tmp_path / name).read_bytes() for name in names if name.endswith(".pdf")}
    for name in names:
        (tmp_path / name).unlink()
    assert common.main(lm, ["--out-dir", str(tmp_path), "--replot"]) == 0  # redraw from the saved results only
    assert all((tmp_path / name).exists() for name in names)
    assert all((tmp_path / name).read_bytes() == data for name, data in pdfs.items())  # byte-identical


def test_replot_without_results_is_one_line_error(tmp_path, capsys):
    assert common.main(lm, ["--out-dir", str(tmp_path), "--replot"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_analytic_script_offers_no_seed(capsys):
    """The problem has no random numbers, so there is no --seed flag that would do nothing."""
    assert common.main(lm, ["--seed", "3"]) == 2
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--w-step", "0"], ["--w-step", "1e-9"], ["--lam-low", "4"],
                                  ["--search-points", "2"], ["--search-points", str(10**12)], ["--stride", "x"]])
def test_bad_settings_are_one_line_usage_errors(tmp_path, capsys, args):
    assert common.main(lm, ["--out-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "results").exists()


def test_claims_and_tex_numbers():
    summary, _ = lm.run(lm.Config(), None)
    verdicts = {c.id: c.evaluate(summary) for c in lm.CLAIMS}
    assert all(v == "reproduced" for _, v in verdicts.values()), verdicts
    assert verdicts["fig3-lambda-star"][0] == pytest.approx(np.pi / 2, abs=1e-8)
    moved = lm.run(dataclasses.replace(lm.Config(), lam_hat=0.5), None)[0]  # not the tangent point any more
    assert dict((c.id, c.evaluate(moved)) for c in lm.CLAIMS)["fig3-tangent"][1] == "not reproduced"
    short = lm.run(dataclasses.replace(lm.Config(), phi_high=1.0), None)[0]  # a range that misses pi/2
    assert dict((c.id, c.evaluate(short)) for c in lm.CLAIMS)["fig3-lambda-phi-star"][1] != "reproduced"
    numbers = lm.tex_numbers(summary)
    assert numbers["ManifoldLambdaStar"] == r"\ensuremath{1.57}"
    main_tex = (CODE.parent / "paper" / "main.tex").read_text()
    assert set(re.findall(r"\\(Manifold[A-Za-z]+)", main_tex)) <= set(numbers)
