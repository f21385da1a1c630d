"""Tests of the small experiments: hypernets_global_small.py, hypernets_local_small.py, small_experiments.py."""
import json
import os
import subprocess
import sys

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import hypernets_global_small as glob
import hypernets_local_small as local
import small_experiments as se
from common import run_main
from conftest import CODE
from neural_network import batched_mlp_predict, gaussian_nll, norm_regulariser, unflatten_batch

GLOBAL_KEYS = {"lambda_star_cv", "lambda_star_hypernet", "cv_lambdas", "cv_valid_loss", "hypernet_valid_at_cv",
               "iterations", "seconds", "config"}
LOCAL_KEYS = {"lambda_init", "lambda_final", "lambda_star_cv", "lambda_trajectory", "valid_loss_final",
              "iterations", "seconds", "config"}
# Even smaller than --quick, for the tests that only need a run to exist.
TINY_GLOBAL = dict(num_iters=20, cv_iters=5, sweep_size=5, curve_count=9, log_every=10)
TINY_LOCAL = dict(num_iters=20, cv_iters=5, sweep_size=5, curve_count=9, log_every=10)


@pytest.fixture(scope="module")
def splits():
    return se.load_small_splits(synthetic=True)


def read_json(out_dir, name):
    return json.loads((out_dir / "results" / f"{name}.json").read_text())


def without_seconds(summary):
    return {k: v for k, v in summary.items() if k != "seconds"}


def run_script(script, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DIR"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(CODE / script), *args], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)


# ------------------------------------------------------------------------------ shared pieces

def test_predict_and_objective_match_the_foundation(splits):
    rs = np.random.RandomState(0)
    flat, lambdas = 0.1 * rs.randn(3, se.N_WEIGHTS), np.array([-1.0, 0.5, 2.0])
    x = splits.train_x[:, :-1]
    reference = batched_mlp_predict(unflatten_batch(flat, list(se.LAYER_SIZES)), x)
    np.testing.assert_allclose(se.predict(flat, splits.train_x), reference, rtol=1e-12, atol=1e-12)
    expected = gaussian_nll(reference, splits.train_y) + norm_regulariser(flat, lambdas)
    np.testing.assert_allclose(se.training_objective(flat, lambdas, splits.train_x, splits.train_y), expected,
                               rtol=1e-12)
    np.testing.assert_allclose(se.evaluate_loss(flat, splits.valid_x, splits.valid_y, chunk=2),
                               gaussian_nll(se.predict(flat, splits.valid_x), splits.valid_y), rtol=1e-12)


def test_stacked_cross_validation_equals_separate_runs(splits):
    lambdas = np.array([-1.0, 1.0, 3.0])
    stacked = se.train_elementary(lambdas, splits.train_x, splits.train_y, 0.01, 7, 1e-3, 5)
    for k, lam in enumerate(lambdas):
        alone = se.train_elementary([lam], splits.train_x, splits.train_y, 0.01, 7, 1e-3, 5)
        np.testing.assert_allclose(stacked[k], alone[0], rtol=1e-12, atol=1e-15)
    assert not np.allclose(stacked[0], stacked[2])  # different lambdas really train differently


def test_parabola_argmin_finds_the_vertex_and_falls_back_at_the_edges():
    xs = np.linspace(-2, 4, 13)
    assert se.parabola_argmin(xs, (xs - 1.23) ** 2) == pytest.approx(1.23, abs=1e-12)
    assert se.parabola_argmin(xs, (xs - 9.0) ** 2) == xs[-1]
    assert se.parabola_argmin(xs, -np.abs(xs)) in (xs[0], xs[-1])


def test_valid_loss_and_slope_match_autograd(splits):
    rs = np.random.RandomState(1)
    hyper = [(0.05 * rs.randn(1, se.N_WEIGHTS), 0.05 * rs.randn(se.N_WEIGHTS))]

    def loss(lam):
        weights = local.hypernet_flat_weights(hyper, anp.reshape(lam, (1,)))
        return se.prediction_loss(weights, splits.valid_x, splits.valid_y)[0]

    value, slope = local.valid_loss_and_slope(hyper, 0.7, splits.valid_x, splits.valid_y)
    assert value == pytest.approx(loss(0.7), rel=1e-12)
    assert slope == pytest.approx(grad(loss)(0.7), rel=1e-9)


def test_global_lambda_samples_follow_the_released_distribution():
    config = glob.Config()
    draws = np.concatenate([glob.sample_lambdas(config, step) for step in range(400)])
    assert draws.max() <= 4.0 and draws.min() >= -100.0
    assert np.mean(draws == 4.0) == pytest.approx(0.16, abs=0.03)  # P(1 + 3 N(0,1) > 4) = 0.159
    np.testing.assert_array_equal(glob.sample_lambdas(config, 5), glob.sample_lambdas(config, 5))
    assert not np.array_equal(glob.sample_lambdas(config, 5), glob.sample_lambdas(config, 6))


# --------------------------------------------------------------------------- end to end, CLI

def test_global_quick_end_to_end_cli_and_replot(tmp_path):
    result = run_script("hypernets_global_small.py", "--quick", "--synthetic", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "step    100/100" in result.stdout and "Traceback" not in result.stderr
    for suffix in ("pdf", "png"):
        assert (tmp_path / f"hypernets_global_small.{suffix}").stat().st_size > 1000
    summary = read_json(tmp_path, "hypernets_global_small")
    assert set(summary) == GLOBAL_KEYS
    assert summary["iterations"] == 100 and summary["config"]["data"] == "synthetic"
    assert len(summary["cv_lambdas"]) == len(summary["cv_valid_loss"]) == len(summary["hypernet_valid_at_cv"]) == 10
    with np.load(tmp_path / "results" / "hypernets_global_small.npz") as npz:
        assert npz["hypernet_valid"].shape == npz["curve_lambdas"].shape == (50,)
        assert npz["cv_sweep_valid"].shape == (21,)

    # --replot: no training and no data (the data folder does not exist), same numbers, figure redrawn.
    (tmp_path / "hypernets_global_small.png").unlink()
    replot = run_script("hypernets_global_small.py", "--replot", "--out-dir", str(tmp_path),
                        "--data-dir", str(tmp_path / "no-such-folder"))
    assert replot.returncode == 0, replot.stderr
    assert "step" not in replot.stdout.split("lambda*")[0] and "cross-validation:" not in replot.stdout
    assert (tmp_path / "hypernets_global_small.png").exists()
    assert read_json(tmp_path, "hypernets_global_small") == summary


def test_local_quick_end_to_end_and_replot(tmp_path, capsys):
    assert run_main(local.main, ["--quick", "--synthetic", "--out-dir", str(tmp_path)]) == 0
    assert "step    100/100" in capsys.readouterr().out
    summary = read_json(tmp_path, "hypernets_local_small")
    assert set(summary) == LOCAL_KEYS
    assert summary["lambda_init"] == -3.5 and summary["iterations"] == 100
    assert summary["lambda_trajectory"][0] == -3.5 and summary["lambda_trajectory"][-1] == summary["lambda_final"]
    assert summary["lambda_final"] > -3.0  # lambda_hat moves toward the optimum from the heavily regularised side
    assert np.isfinite(summary["valid_loss_final"])
    for suffix in ("pdf", "png"):
        (tmp_path / f"hypernets_local_small.{suffix}").unlink()
    assert run_main(local.main, ["--replot", "--out-dir", str(tmp_path)]) == 0
    assert "step" not in capsys.readouterr().out.split("lambda_hat:")[0]
    assert (tmp_path / "hypernets_local_small.pdf").exists() and (tmp_path / "hypernets_local_small.png").exists()


def test_replot_without_results_is_a_one_line_error(tmp_path, capsys):
    assert run_main(glob.main, ["--replot", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--replot" in err


def test_replot_of_foreign_results_is_a_one_line_error(tmp_path, capsys, splits):
    local.save(local.run(local.Config(data="synthetic", **TINY_LOCAL), splits), tmp_path)
    path = tmp_path / "results" / "hypernets_local_small.json"
    summary = json.loads(path.read_text())
    summary["config"]["no_such_setting"] = 1
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    assert run_main(local.main, ["--replot", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "another version" in err


@pytest.mark.parametrize("module, tiny", [(glob, TINY_GLOBAL), (local, TINY_LOCAL)])
def test_same_seed_gives_identical_numbers(module, tiny, splits, tmp_path):
    config = module.Config(data="synthetic", **tiny)
    first, second = module.run(config, splits), module.run(config, splits)
    module.save(first, tmp_path / "a")
    module.save(second, tmp_path / "b")
    a, b = read_json(tmp_path / "a", module.NAME), read_json(tmp_path / "b", module.NAME)
    assert without_seconds(a) == without_seconds(b)
    other = module.run(module.Config(data="synthetic", seed=8, **tiny), splits)
    module.save(other, tmp_path / "c")
    assert without_seconds(read_json(tmp_path / "c", module.NAME)) != without_seconds(a)


def test_simplified_algorithm_equals_joint_with_sigma_zero(splits):
    joint = local.run(local.Config(data="synthetic", algorithm="joint", **TINY_LOCAL), splits)
    simplified = local.run(local.Config(data="synthetic", algorithm="simplified", **TINY_LOCAL), splits)
    np.testing.assert_allclose(simplified.lambda_trajectory, joint.lambda_trajectory, rtol=0, atol=1e-12)
    noisy = local.run(local.Config(data="synthetic", algorithm="joint", sigma=1.0, **TINY_LOCAL), splits)
    assert not np.allclose(noisy.lambda_trajectory, joint.lambda_trajectory, rtol=0, atol=1e-9)


def test_huge_step_size_stops_with_a_one_line_error_cli(tmp_path):
    result = run_script("hypernets_global_small.py", "--quick", "--synthetic", "--iters", "20", "--step-size", "1e300",
                        "--out-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert "not finite at step" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results" / "hypernets_global_small.json").exists()


def test_local_huge_step_size_names_the_step(tmp_path, capsys):
    argv = ["--quick", "--synthetic", "--iters", "20", "--step-size", "1e300", "--out-dir", str(tmp_path)]
    assert run_main(local.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "not finite at step" in err


def test_rejected_arguments_exit_without_traceback_cli(tmp_path):
    result = run_script("hypernets_local_small.py", "--iters", "0", "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "error:" in result.stderr and "positive" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module, argv", [
    (glob, ["--step-size", "-1"]), (glob, ["--log-every", "0"]), (glob, ["--seed", "x"]),
    (local, ["--algorithm", "newton"]), (local, ["--hyper-step-size", "0"]), (local, ["--iters", "-5"]),
])
def test_rejected_arguments(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real MNIST

@pytest.mark.mnist
@pytest.mark.parametrize("module, keys", [(glob, GLOBAL_KEYS), (local, LOCAL_KEYS)])
def test_quick_mode_on_real_mnist(module, keys, mnist_dir, tmp_path):
    assert module.main(["--quick", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)]) == 0
    summary = read_json(tmp_path, module.NAME)
    assert set(summary) == keys and summary["config"]["data"] == "mnist"
    assert (tmp_path / f"{module.NAME}.pdf").exists() and (tmp_path / f"{module.NAME}.png").exists()
    assert 0.0 < summary["lambda_star_cv"] < 4.0  # even a short cross-validation puts lambda* inside the sweep


# ------------------------------------------------------------------ hot loops against autograd

def test_global_step_equals_autograd_reference_over_several_steps(splits):
    from neural_network import init_hypernet
    from optimizers import adam_init

    problem = se.GlobalProblem(splits.train_x, splits.train_y, 50, 10)
    fast = se.global_flat_params(init_hypernet("mlp", 1, se.N_WEIGHTS, 0.01, np.random.RandomState(7), hidden=50))
    ref = fast.copy()
    fast_state, ref_state = adam_init(fast), adam_init(ref)
    for step in range(6):
        lambdas = np.clip(1.0 + 3.0 * np.random.RandomState(step).randn(10), -100, 4)
        fast_objective, fast_state = se.global_step(problem, fast, fast_state, lambdas, 1e-3)
        ref_objective, ref_state = se.global_step_reference(problem, ref, ref_state, lambdas, 1e-3)
        assert fast_objective == pytest.approx(ref_objective, rel=1e-9)
        np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref)))
        np.testing.assert_allclose(fast_state.m, ref_state.m, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref_state.m)))
        np.testing.assert_allclose(fast_state.v, ref_state.v, rtol=1e-9, atol=1e-9 * np.max(ref_state.v))
        assert fast_state.step == ref_state.step == step + 1
    assert not np.allclose(fast, se.global_flat_params(init_hypernet("mlp", 1, se.N_WEIGHTS, 0.01,
                                                                      np.random.RandomState(7), hidden=50)))


def test_local_step_equals_autograd_reference_over_several_steps(splits):
    from neural_network import init_hypernet
    from optimizers import adam_init

    problem = se.LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, 10)
    fast = se.local_flat_params(init_hypernet("linear", 1, se.N_WEIGHTS, 0.01, np.random.RandomState(7)))
    ref = fast.copy()
    fast_lambda, ref_lambda = np.array([-3.5]), np.array([-3.5])
    fast_state, ref_state = adam_init(fast_lambda), adam_init(ref_lambda)
    for step in range(6):
        lambdas = fast_lambda[0] + 0.3 * np.random.RandomState(step).randn(10)
        *fast_out, fast_state = se.local_step(problem, fast, fast_lambda, fast_state, lambdas, 1e-4, 0.05)
        *ref_out, ref_state = se.local_step_reference(problem, ref, ref_lambda, ref_state, lambdas, 1e-4, 0.05)
        np.testing.assert_allclose(fast_out, ref_out, rtol=1e-9)
        np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref)))
        np.testing.assert_allclose(fast_lambda, ref_lambda, rtol=1e-9)
        np.testing.assert_allclose([fast_state.m[0], fast_state.v[0]], [ref_state.m[0], ref_state.v[0]], rtol=1e-9)
    assert fast_lambda[0] != -3.5
