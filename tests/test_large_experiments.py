"""The large experiments (hypernets_local_large, compare_number_layers) and their shared module, on small
synthetic data: gradients, Algorithm 3/4, the budgeted loop, quick runs end to end, errors, replot."""
import json

import numpy as np
import pytest
from autograd import grad

import compare_number_layers as layers
import hypernets_local_large as large
import per_weight_decay as pwd
from data_loader import synthetic_mnist
from neural_network import num_params


@pytest.fixture(scope="module")
def splits():
    return pwd.large_splits(synthetic_mnist(n_train=600, n_test=200), 300, 300, 200)


def small_problem(splits, sizes=(784, 10)):
    P = num_params(sizes)
    return pwd.HyperProblem(pwd.decay_objective(sizes), pwd.mse_loss(sizes), splits.train_x, splits.train_y,
                            splits.valid_x, splits.valid_y, P, P)


# ----------------------------------------------------------------------- unrolled baseline

def test_linear_decay_grad_matches_autograd():
    rs = np.random.RandomState(4)
    w, lam = 0.01 * rs.randn(7850), rs.randn(7850) - 4
    x, y = rs.rand(20, 784), rs.rand(20, 10)
    reference = grad(lambda w: pwd.decay_objective((784, 10))(w[None, :], lam[None, :], x, y)[0])(w)
    assert np.allclose(large.linear_decay_grad(w, lam, x, y), reference, rtol=1e-10, atol=1e-14)


def test_unrolled_hypergradient_matches_finite_differences(splits):
    config = large.Config(unroll_steps=3, unroll_inner="sgd", unroll_inner_step=0.5)
    w0 = 0.01 * np.random.RandomState(5).randn(7850)
    bx, by = large.unrolled_schedule(splits, config)
    loss = pwd.mse_loss((784, 10))
    f = lambda lam: loss(large.unrolled_train(lam, w0, bx, by, config)[None, :], splits.valid_x, splits.valid_y)[0]
    lam = np.full(7850, -1.0)
    g = grad(f)(lam)
    direction = np.random.RandomState(6).randn(7850)
    eps = 1e-4
    numeric = (f(lam + eps * direction) - f(lam - eps * direction)) / (2 * eps)
    assert np.isclose(np.dot(g, direction), numeric, rtol=1e-4)


# -------------------------------------------------------------------------------- end to end

class Outcome:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(module, *args, capsys):
    """Run module.main in-process (faster than a subprocess) like the command line: exit status and output."""
    from common import run_main

    capsys.readouterr()
    try:
        code = run_main(module.main, ["--synthetic", *args])
    except SystemExit as exit_:  # argparse rejections
        code = exit_.code
    out = capsys.readouterr()
    return Outcome(code, out.out, out.err)


def test_large_quick_end_to_end_and_replot(tmp_path, capsys):
    out = run_script(large, "--quick", "--seconds", "1", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "results" / "hypernets_local_large.json").read_text())
    assert summary["budget"] == "seconds" and summary["hypernet_parameters"] == 164860
    for method in ("hyper", "unrolled"):
        s = summary[method]
        assert s["steps"] > 0 and np.isfinite(s["final_valid"]) and s["best_valid"] <= s["final_valid"]
    assert "target" in summary and isinstance(summary["target"]["met"], bool)
    png = tmp_path / "hypernets_local_large.png"
    png.unlink()
    out = run_script(large, "--replot", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 10000


def test_large_fixed_iters_reproducible(tmp_path, capsys):
    arrays = []
    for i in range(2):
        d = tmp_path / str(i)
        out = run_script(large, "--quick", "--iters", "3", "--algorithm", "simplified",
                         "--out-dir", str(d), capsys=capsys)
        assert out.returncode == 0, out.stderr
        with np.load(d / "results" / "hypernets_local_large.npz") as npz:
            arrays.append({k: npz[k] for k in npz.files})
        summary = json.loads((d / "results" / "hypernets_local_large.json").read_text())
        assert summary["budget"] == "iters" and summary["config"]["algorithm"] == "simplified"
        assert summary["hyper"]["steps"] == 3 and summary["unrolled"]["steps"] == 3
    for key in arrays[0]:
        if not key.endswith("_seconds"):                 # timing is the only run-dependent field
            assert np.array_equal(arrays[0][key], arrays[1][key]), key


def test_large_divergence_is_one_line_error(tmp_path, capsys):
    out = run_script(large, "--quick", "--iters", "2", "--init-lambda", "1000",
                     "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "not finite at step" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "hypernets_local_large.json").exists()


def test_invalid_arguments_rejected(tmp_path, capsys):
    for script, args in [(large, ["--seconds", "0"]),
                         (large, ["--algorithm", "other"]),
                         (layers, ["--seconds", "1", "2"]),
                         (layers, ["--search-steps", "-3"])]:
        out = run_script(script, *args, "--out-dir", str(tmp_path), capsys=capsys)
        assert out.returncode == 2, (script, args)


def test_replot_without_results_is_clean_error(tmp_path, capsys):
    out = run_script(layers, "--replot", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 1 and out.stderr.startswith("error: no saved results")


