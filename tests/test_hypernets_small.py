"""Tests of the small experiments: hypernets_global_small.py, hypernets_local_small.py, small_experiments.py."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import common
import hypernets_global_small as glob
import hypernets_local_small as local
import small_experiments as se
from common import step_rng
from conftest import CODE, REPO
from neural_network import batched_mlp_predict, gaussian_nll, init_hypernet, norm_regulariser, unflatten_batch
from optimizers import adam_init

# Even smaller than --quick, for the tests that only need a run to exist.
TINY = ["--iters", "20", "--cv-iters", "5", "--sweep-size", "5", "--curve-count", "9", "--log-every", "10"]
TINY_CONFIG = dict(num_iters=20, cv_iters=5, sweep_size=5, curve_count=9, log_every=10)
# Numbers of the code before the protocol refactor and the hand-written steps (commit 4bde806, its own Adam),
# --quick --synthetic: the refactored scripts must give them again, up to rounding.
BEFORE = {"global_valid_at_cv_3": 2.6194731010249868, "global_cv_valid_3": 2.8903352017366926,
          "lambda_star_cv": 2.311400324677193, "local_lambda_final": -2.589596217858704,
          "local_valid_loss_final": 3.8847077970831583}
TIMING_KEYS = {"seconds", "train_seconds", "train_cpu_seconds", "step_ms"}


@pytest.fixture(scope="module")
def data():
    from data_loader import synthetic_mnist

    return synthetic_mnist()


@pytest.fixture(scope="module")
def splits(data):
    return se.splits_of(data)


def main(module, capsys, *argv):
    """common.main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = common.main(module, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def read_json(out_dir, name):
    return json.loads((out_dir / "results" / f"{name}.json").read_text())


def comparable(summary):
    """A summary without what legitimately differs between two identical runs (clocks, provenance)."""
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS | {"provenance"}}


def run_script(script, *args):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DIR"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
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


def test_splits_follow_the_spec_sizes(data):
    assert se.splits_of(data).valid_x.shape == (se.SYNTHETIC_SPLIT["n_valid"], 785)  # the small stand-in
    fake = data._replace(train_images=np.zeros((10010, 784)), train_labels=np.zeros((10010, 10)),
                         test_images=np.zeros((10000, 784)), test_labels=np.zeros((10000, 10)))
    real = se.splits_of(fake)
    assert (len(real.train_x), len(real.valid_x), len(real.test_x)) == (10, 10000, 10000)
    assert np.all(real.train_x[:, -1] == 1.0)  # augmented with the constant input of the bias


def test_stacked_cross_validation_equals_separate_runs(splits):
    lambdas = np.array([-1.0, 1.0, 3.0])
    for train in (se.train_elementary, se.train_elementary_handwritten):
        stacked = train(lambdas, splits.train_x, splits.train_y, 0.01, 7, 1e-3, 5)
        for k, lam in enumerate(lambdas):
            alone = train([lam], splits.train_x, splits.train_y, 0.01, 7, 1e-3, 5)
            np.testing.assert_allclose(stacked[k], alone[0], rtol=1e-12, atol=1e-15)
        assert not np.allclose(stacked[0], stacked[2])  # different lambdas really train differently


def test_handwritten_cross_validation_equals_autograd(splits):
    lambdas = np.linspace(-2, 4, 7)
    for steps in (1, 8):
        fast = se.train_elementary_handwritten(lambdas, splits.train_x, splits.train_y, 0.01, 3, 1e-3, steps)
        ref = se.train_elementary(lambdas, splits.train_x, splits.train_y, 0.01, 3, 1e-3, steps)
        np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref)))


def test_parabola_argmin_finds_the_vertex_and_falls_back_at_the_edges():
    xs = np.linspace(-2, 4, 13)
    assert se.parabola_argmin(xs, (xs - 1.23) ** 2) == pytest.approx(1.23, abs=1e-12)
    assert se.parabola_argmin(xs, (xs - 9.0) ** 2) == xs[-1]
    assert se.parabola_argmin(xs, -np.abs(xs)) in (xs[0], xs[-1])


def test_step_normals_are_the_numbers_of_step_rng():
    normals = se.StepNormals(11)
    for step in (0, 1, 7, 123456):
        np.testing.assert_array_equal(normals(step, 10), step_rng(11, step).randn(10))


def test_global_lambda_samples_follow_the_released_distribution():
    config, normals = glob.Config(), se.StepNormals(7)
    draws = np.concatenate([glob.sample_lambdas(config, normals, step) for step in range(400)])
    assert draws.max() <= 4.0 and draws.min() >= -100.0
    assert np.mean(draws == 4.0) == pytest.approx(0.16, abs=0.03)  # P(1 + 3 N(0,1) > 4) = 0.159
    np.testing.assert_array_equal(glob.sample_lambdas(config, normals, 5), glob.sample_lambdas(config, normals, 5))
    assert not np.array_equal(glob.sample_lambdas(config, normals, 5), glob.sample_lambdas(config, normals, 6))


# ------------------------------------------------------------------ hot loops against autograd

def global_start(hidden=50):
    return se.global_flat_params(init_hypernet("mlp", 1, se.N_WEIGHTS, 0.01, np.random.RandomState(7), hidden=hidden))


def local_start():
    return se.local_flat_params(init_hypernet("linear", 1, se.N_WEIGHTS, 0.01, np.random.RandomState(7)))


def test_global_step_equals_autograd_reference_over_several_steps(splits):
    problem = se.GlobalProblem(splits.train_x, splits.train_y, 50, 10)
    fast, ref = global_start(), global_start()
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
    assert not np.allclose(fast, global_start())


def test_local_step_equals_autograd_reference_over_several_steps(splits):
    problem = se.LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, 10)
    fast, ref = local_start(), local_start()
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


def test_gram_validation_loss_and_slope_match_autograd(splits):
    problem = se.LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, 1)
    params = 0.05 * np.random.RandomState(1).randn(2 * se.N_WEIGHTS)

    def loss(lam):
        weights = anp.reshape(lam * params[:se.N_WEIGHTS] + params[se.N_WEIGHTS:], (1, se.N_WEIGHTS))
        return se.prediction_loss(weights, splits.valid_x, splits.valid_y)[0]

    for lam in (-3.5, 0.7, 2.0):
        value, slope = se.local_valid_loss_and_slope(problem, params, lam)
        assert value == pytest.approx(loss(lam), rel=1e-12)
        assert slope == pytest.approx(grad(loss)(lam), rel=1e-9)


@pytest.mark.parametrize("step_fn", [se.local_step, se.local_step_reference])
def test_lambda_hat_descends_the_validation_slope(splits, step_fn):
    """A lambda_hat step that ascended the validation loss (a flipped sign) fails here."""
    problem = se.LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, 10)
    params, lambda_hat = local_start(), np.array([-3.5])
    state = adam_init(lambda_hat)
    for _ in range(3):
        before = lambda_hat[0]
        *_, slope, state = step_fn(problem, params, lambda_hat, state, np.full(10, before), 1e-4, 0.01)
        assert slope != 0 and (lambda_hat[0] - before) * slope < 0
        assert abs(lambda_hat[0] - before) == pytest.approx(0.01, rel=0.05)  # Adam: steps of about the step size


@pytest.mark.parametrize("step_fn", [se.local_step, se.local_step_reference])
def test_local_hypernetwork_step_never_sees_the_validation_set(splits, step_fn):
    """Perturbing the validation set changes lambda_hat's step, never the hypernetwork's SGD step."""
    other_valid = splits.valid_x + 0.5 * np.random.RandomState(2).rand(*splits.valid_x.shape)
    results = []
    for valid_x in (splits.valid_x, other_valid):
        problem = se.LocalProblem(splits.train_x, splits.train_y, valid_x, splits.valid_y, 10)
        params, lambda_hat = local_start(), np.array([-3.5])
        step_fn(problem, params, lambda_hat, adam_init(lambda_hat), np.full(10, -3.5), 1e-4, 0.01)
        results.append((params, problem.gram.sum()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] != results[1][1]  # the perturbation did reach the step


def test_global_hypernetwork_never_trains_on_the_validation_set(splits):
    config = glob.Config(**TINY_CONFIG)
    params = glob.train_hypernet(config, splits)[0]
    perturbed = splits._replace(valid_x=splits.valid_x[::-1] * 0.5, valid_y=splits.valid_y[::-1])
    np.testing.assert_array_equal(glob.train_hypernet(config, perturbed)[0], params)
    trained_on_train = glob.train_hypernet(config, splits._replace(train_x=splits.train_x * 0.9))[0]
    assert not np.array_equal(trained_on_train, params)  # the training set does matter


def test_the_seed_reaches_the_lambda_samples(splits, monkeypatch):
    """With the initialisation pinned, two seeds still train differently: the per-step samples use the seed."""
    fixed = init_hypernet
    monkeypatch.setattr(glob, "init_hypernet", lambda *a, **k: fixed(*a[:4], np.random.RandomState(0), **k))
    monkeypatch.setattr(local, "init_hypernet", lambda *a, **k: fixed(*a[:4], np.random.RandomState(0), **k))
    small = dict(TINY_CONFIG, num_iters=3)
    first, second = (glob.train_hypernet(glob.Config(seed=s, **small), splits)[0] for s in (7, 8))
    assert not np.array_equal(first, second)
    first, second = (local.optimise_jointly(local.Config(seed=s, sigma=1.0, **small), splits)[1] for s in (7, 8))
    assert first[1:] != second[1:]
    same = [local.optimise_jointly(local.Config(seed=s, **small), splits)[1] for s in (7, 8)]
    assert same[0] == same[1]  # sigma = 0: the seed only sets the initialisation, pinned here


def test_convergence_rule():
    assert not local.settled([0.0, 0.5, 0.5], window=2, tol=1e-3)          # moved 0.5 over the window
    assert local.settled([0.0, 0.5, 0.5, 0.5], window=2, tol=1e-3)
    assert not local.settled([0.5, 0.5], window=2, tol=1e-3)                # not a full window yet
    assert not local.settled([0.5] * 10, window=2, tol=0.0)                 # tol 0 turns the rule off


# --------------------------------------------------------------------------- end to end, CLI

def test_global_quick_end_to_end_and_replot(tmp_path, capsys):
    code, out, err = main(glob, capsys, "--quick", "--synthetic", "--out-dir", str(tmp_path))
    assert code == 0, err
    assert "step    100/100" in out and "lambda*: cross-validation" in out
    for suffix in ("pdf", "png"):
        assert (tmp_path / f"hypernets_global_small.{suffix}").stat().st_size > 1000
    summary = read_json(tmp_path, glob.NAME)
    assert summary["iterations"] == 100 and summary["data"] == "synthetic" and summary["config"]["num_iters"] == 100
    assert len(summary["cv_lambdas"]) == len(summary["cv_valid_loss"]) == len(summary["hypernet_valid_at_cv"]) == 10
    assert summary["lambda_gap"] == pytest.approx(abs(summary["lambda_star_hypernet"] - summary["lambda_star_cv"]))
    assert summary["arrays"]["hypernet_valid"]["shape"] == [50] and summary["arrays"]["cv_sweep_valid"]["shape"] == [21]
    # the numbers of the code before the refactor (own Adam, autograd steps), up to rounding
    assert summary["lambda_star_cv"] == pytest.approx(BEFORE["lambda_star_cv"], abs=1e-9)
    assert summary["cv_valid_loss"][3] == pytest.approx(BEFORE["global_cv_valid_3"], rel=1e-12)
    assert summary["hypernet_valid_at_cv"][3] == pytest.approx(BEFORE["global_valid_at_cv_3"], rel=1e-12)

    pdf = (tmp_path / "hypernets_global_small.pdf").read_bytes()
    (tmp_path / "hypernets_global_small.png").unlink()
    code, out, err = main(glob, capsys, "--replot", "--out-dir", str(tmp_path), "--data-dir", str(tmp_path / "none"))
    assert code == 0, err
    assert "cross-validation:" not in out and "step" not in out  # no training, no data
    assert (tmp_path / "hypernets_global_small.png").exists()
    assert (tmp_path / "hypernets_global_small.pdf").read_bytes() == pdf  # replot leaves the figure's bytes
    assert read_json(tmp_path, glob.NAME) == summary


def test_local_quick_end_to_end_and_replot(tmp_path, capsys):
    code, out, err = main(local, capsys, "--quick", "--synthetic", "--out-dir", str(tmp_path))
    assert code == 0, err
    assert "step    100/100" in out
    summary = read_json(tmp_path, local.NAME)
    assert summary["lambda_init"] == -3.5 and summary["iterations"] == 100 and not summary["converged"]
    assert summary["lambda_trajectory"][0] == -3.5 and summary["lambda_trajectory"][-1] == summary["lambda_final"]
    assert summary["lambda_final"] > -3.0  # lambda_hat moves toward the optimum from the heavily regularised side
    assert summary["lambda_final"] == pytest.approx(BEFORE["local_lambda_final"], abs=1e-12)
    assert summary["valid_loss_final"] == pytest.approx(BEFORE["local_valid_loss_final"], rel=1e-12)
    assert summary["arrays"]["lambda_trajectory"]["shape"] == [101]
    for suffix in ("pdf", "png"):
        (tmp_path / f"hypernets_local_small.{suffix}").unlink()
    code, out, err = main(local, capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 0, err and "step" not in out
    assert (tmp_path / "hypernets_local_small.pdf").exists() and (tmp_path / "hypernets_local_small.png").exists()


def test_local_run_stops_when_lambda_hat_settles(tmp_path, capsys):
    code, _, err = main(local, capsys, "--synthetic", *TINY, "--iters", "500", "--converge-window", "5",
                        "--converge-tol", "10", "--out-dir", str(tmp_path))
    assert code == 0, err
    summary = read_json(tmp_path, local.NAME)
    assert summary["converged"] and summary["iterations"] == 5  # the first step with a full window behind it
    assert summary["arrays"]["lambda_trajectory"]["shape"] == [6]


@pytest.mark.parametrize("module", [glob, local])
def test_same_seed_gives_identical_numbers(module, tmp_path, capsys):
    for folder, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(module, capsys, "--synthetic", *TINY, "--seed", seed, "--out-dir", str(tmp_path / folder))[0] == 0
    a, b, c = (read_json(tmp_path / f, module.NAME) for f in "abc")
    assert comparable(a) == comparable(b)
    assert comparable(c) != comparable(a)
    with np.load(tmp_path / "a" / "results" / f"{module.NAME}.npz") as first, \
            np.load(tmp_path / "b" / "results" / f"{module.NAME}.npz") as second:
        for key in first.files:
            np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("module", [glob, local])
def test_autograd_reference_run_gives_the_same_numbers(module, tmp_path, capsys):
    for folder, gradients in (("fast", "handwritten"), ("ref", "autograd")):
        code, _, err = main(module, capsys, "--synthetic", *TINY, "--gradients", gradients,
                            "--out-dir", str(tmp_path / folder))
        assert code == 0, err
    fast, ref = (read_json(tmp_path / f, module.NAME) for f in ("fast", "ref"))
    for key, value in comparable(ref).items():
        if isinstance(value, float):
            assert fast[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_simplified_algorithm_equals_joint_with_sigma_zero(splits):
    runs = {}
    for name, extra in (("joint", {}), ("simplified", dict(algorithm="simplified")), ("noisy", dict(sigma=1.0))):
        config = local.Config(**TINY_CONFIG, **extra)
        runs[name] = np.array(local.optimise_jointly(config, splits)[1])
    np.testing.assert_allclose(runs["simplified"], runs["joint"], rtol=0, atol=1e-12)
    assert not np.allclose(runs["noisy"], runs["joint"], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------ errors

def test_replot_without_results_is_a_one_line_error(tmp_path, capsys):
    code, _, err = main(glob, capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1 and "--replot" in err


def test_replot_of_the_other_experiments_results_is_a_one_line_error(tmp_path, capsys):
    assert main(local, capsys, "--synthetic", *TINY, "--out-dir", str(tmp_path))[0] == 0
    results = tmp_path / "results"
    for suffix in ("json", "npz"):
        (results / f"{local.NAME}.{suffix}").rename(results / f"{glob.NAME}.{suffix}")
    code, _, err = main(glob, capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1 and local.NAME in err


@pytest.mark.parametrize("module", [glob, local])
def test_huge_step_size_stops_with_a_one_line_error(module, tmp_path, capsys):
    code, _, err = main(module, capsys, "--synthetic", *TINY, "--step-size", "1e300", "--out-dir", str(tmp_path))
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1
    assert re.search(r"at step \d+", err) and "diverged" in err
    assert not (tmp_path / "results" / f"{module.NAME}.json").exists()


@pytest.mark.parametrize("module, argv", [
    (glob, ["--step-size", "-1"]), (glob, ["--log-every", "0"]), (glob, ["--seed", "x"]), (glob, ["--iters", "0"]),
    (glob, ["--gradients", "jax"]), (local, ["--algorithm", "newton"]), (local, ["--hyper-step-size", "0"]),
    (local, ["--iters", "-5"]), (local, ["--converge-window", "0"]), (local, ["--seed", str(2**32)]),
])
def test_rejected_arguments_are_one_line_usage_errors(module, argv, tmp_path, capsys):
    code, _, err = main(module, capsys, *argv, "--out-dir", str(tmp_path))
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_script_runs_by_path_from_anywhere_and_rejects_bad_flags():
    result = run_script("hypernets_local_small.py", "--iters", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    help_text = " ".join(run_script("hypernets_global_small.py", "--help").stdout.split())
    assert "hypernetwork Adam step size (released code) (default: 0.0001)" in help_text
    assert "--iters" in help_text and "--num-iters" not in help_text and "--jobs" not in help_text


# ----------------------------------------------------------------------- claims, paper numbers

def fake_global(gap, curve_gap):
    return {"lambda_gap": gap, "curve_gap": curve_gap}


def fake_local(gap, converged=True, tracking=0.0, regret=0.0):
    return {"lambda_gap": gap, "converged": converged, "tracking_gap": tracking, "regret": regret}


def verdicts(module, summary):
    return {claim.id: claim.evaluate(summary)[1] for claim in module.CLAIMS}


def test_claims_apply_their_named_thresholds():
    assert verdicts(glob, fake_global(0.1, 0.01)) == {"fig2-argmin": "reproduced", "fig2-curve": "reproduced"}
    assert verdicts(glob, fake_global(glob.ARGMIN_GAP_PARTLY, glob.CURVE_GAP_PARTLY + 0.01)) == {
        "fig2-argmin": "partly", "fig2-curve": "not reproduced"}
    assert verdicts(local, fake_local(0.1))["fig4-lambda"] == "reproduced"
    assert verdicts(local, fake_local(0.1, converged=False))["fig4-lambda"] == "not reproduced"
    assert verdicts(local, fake_local(0.5, tracking=0.1, regret=-0.5)) == {
        "fig4-lambda": "partly", "fig4-tracking": "partly", "fig4-regret": "not reproduced"}
    for module in (glob, local):
        assert len({c.id for c in module.CLAIMS}) == len(module.CLAIMS)
        assert all(c.evaluate(fake_global(0, 0) | fake_local(0))[1] in common.VERDICTS for c in module.CLAIMS)


@pytest.mark.parametrize("module, prefix", [(glob, "Global"), (local, "Local")])
def test_tex_numbers_cover_the_macros_the_paper_uses(module, prefix, tmp_path, capsys):
    assert main(module, capsys, "--synthetic", *TINY, "--out-dir", str(tmp_path))[0] == 0
    numbers = module.tex_numbers(read_json(tmp_path, module.NAME))
    used = set(re.findall(rf"\\({prefix}[A-Za-z]+)", (REPO / "paper" / "main.tex").read_text()))
    assert used <= set(numbers), used - set(numbers)
    assert all(name.isalpha() and isinstance(text, str) and text for name, text in numbers.items())


def test_every_config_field_has_help_saying_where_its_default_comes_from():
    for module in (glob, local):
        comments = common.field_comments(module.Config)
        for field in dataclasses.fields(module.Config):
            assert comments.get(field.name), f"{module.NAME}.{field.name} has no comment"


# ------------------------------------------------------------------------------------ figures

def test_global_figure_keeps_the_legend_clear_of_high_data(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=glob.FIGSIZE)
    ax.set_xlim(-2, 4)
    ax.set_ylim(0, 1)
    ax.plot([-1.5], [1.0], "kx", label="a long legend entry to cover the left of the axes")
    legend = ax.legend(loc="upper left")
    glob.clear_legend(ax, legend, np.array([-1.5]), np.array([1.0]), glob.MARKER_SIZE)
    fig.canvas.draw()
    box = legend.get_window_extent().transformed(ax.transAxes.inverted())
    assert ax.get_ylim()[1] > 1.0 and (1.0 - ax.get_ylim()[0]) / (ax.get_ylim()[1] - ax.get_ylim()[0]) < box.y0
    plt.close(fig)


def test_local_figure_of_a_short_run_shows_its_data(tmp_path, capsys):
    """A quick run's lambda_hat lies left of the curves and its losses outside the published y-limits: the
    axes then take them in (the published limits stay for a converged run)."""
    import matplotlib.pyplot as plt

    assert main(local, capsys, "--quick", "--synthetic", "--out-dir", str(tmp_path))[0] == 0
    summary = read_json(tmp_path, local.NAME)
    with np.load(tmp_path / "results" / f"{local.NAME}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    captured = {}
    close = plt.close
    try:
        plt.close = lambda fig: captured.setdefault("ax", fig.axes[0])  # keep the figure to inspect
        local.plot(summary, arrays, tmp_path / "figure")
    finally:
        plt.close = close
    ax = captured["ax"]
    lo, hi = ax.get_ylim()
    values = np.concatenate([arrays["cv_train_loss"], arrays["cv_valid_loss"]])
    assert lo <= values.min() and values.max() <= hi
    assert ax.get_xlim()[0] <= summary["lambda_final"] - local.DENSITY_HALF_WIDTH
    close(ax.figure)


# ------------------------------------------------------------------------------- real MNIST

@pytest.mark.mnist
@pytest.mark.parametrize("module", [glob, local])
def test_quick_mode_on_real_mnist(module, mnist_dir, tmp_path, capsys):
    code, _, err = main(module, capsys, "--quick", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path))
    assert code == 0, err
    summary = read_json(tmp_path, module.NAME)
    assert summary["data"] == "mnist"
    assert (tmp_path / f"{module.NAME}.pdf").exists() and (tmp_path / f"{module.NAME}.png").exists()
    assert 0.0 < summary["lambda_star_cv"] < 4.0  # even a short cross-validation puts lambda* inside the sweep
