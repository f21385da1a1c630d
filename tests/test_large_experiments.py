"""hypernets_local_large on small synthetic data: each step of each method against an independent autograd
computation (so a wrong sign, a wrong data set or a wrong input shift fails), data separation, finite differences
of the unrolled hypergradient, the claims' verdict logic, and the protocol end to end (quick run, replot, --iters
reproducibility, errors)."""
import dataclasses
import json

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import common
import hypernets_local_large as large
import per_weight_decay as pwd
import references as refs
import unrolled
from common import step_rng
from large_fixtures import BLOCK, data, one_blas_thread, splits  # noqa: F401  (fixtures)
from neural_network import flatten_params, init_mlp


def small_config(**overrides):
    base = dict(block=BLOCK, n_test=BLOCK, unroll_steps=4, iters=3, eval_every=1, diag_every=1,
                unroll_diag_every=1, exact_diag_every=1, log_every=1000, unroll_log_every=1000)
    return dataclasses.replace(large.Config(), **{**base, **overrides})


def hypernet_forward(phi, lam, offset):
    """The factorised linear hypernetwork written out: ((lambda - offset) W1 + b1) W2 + b2, lam (K, P) -> (K, P)."""
    (W1, b1), (W2, b2) = phi
    return anp.dot(anp.dot(lam - offset, W1) + b1, W2) + b2


def linear_mse(w, x, y):
    """MSE of the linear 784-10 model with flat weights w (P,)."""
    W, b = anp.reshape(w[:7840], (784, 10)), w[7840:]
    return anp.mean((anp.dot(x, W) + b - y) ** 2)


def first_adam_step(g, step_size, eps=1e-8):
    """The first bias-corrected Adam step from zero moments: -step_size * g / (|g| + eps)."""
    return -step_size * g / (np.abs(g) + eps)


def copy_phi(phi):
    return [(W.copy(), b.copy()) for W, b in phi]


# -------------------------------------------------------------------- hyper-training, one step at a time

@pytest.mark.parametrize("raw_input", [False, True])
def test_lambda_step_descends_the_validation_minibatch_loss(splits, raw_input):
    """With the hypernetwork frozen, lambda_hat's first step is -step * g/(|g| + eps) for g = d/dlambda of the
    validation-minibatch MSE of w_phi(lambda_hat - offset): kills an ascending step, a step on training data and
    a wrong input shift on the lambda path."""
    config = small_config(hypernet_step=0.0, lambda_step=1e-2, inner_steps=1, init_scale=0.05, raw_input=raw_input)
    state, step_fn, *_ , settings = large.make_hyper(splits, config)
    lam0, phi0 = state.lam.copy(), copy_phi(state.phi)
    offset = settings.input_offset
    new = step_fn(state, 0)
    idx = step_rng(config.seed, 0, pwd.STREAM_VALID_BATCH).randint(0, len(splits.valid_x), size=config.batch_size)
    vx, vy = splits.valid_x[idx], splits.valid_y[idx]
    g = grad(lambda lam: linear_mse(hypernet_forward(phi0, lam[None, :], offset)[0], vx, vy))(lam0)
    assert np.abs(g).max() > 1e-6
    np.testing.assert_allclose(new.lam - lam0, first_adam_step(g, config.lambda_step), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["joint", "simplified"])
def test_hypernet_step_descends_the_training_objective(splits, algorithm):
    """With lambda_hat frozen, the hypernetwork's first Adam step follows the gradient of the mean training
    objective MSE + sum exp(lambda_k) w^2 at w_phi(lambda_k - offset) over the training minibatch: kills a
    hypernetwork trained on validation data and a wrong input shift on the training path."""
    config = small_config(lambda_step=0.0, hypernet_step=1e-3, inner_steps=1, init_scale=0.05, sample_sd=0.3,
                          algorithm=algorithm)
    state, step_fn, *_, settings = large.make_hyper(splits, config)
    lam0, phi0 = state.lam.copy(), copy_phi(state.phi)
    new = step_fn(state, 0)
    if algorithm == "joint":
        noise = step_rng(config.seed, 0, pwd.STREAM_SAMPLES).randn(config.n_samples, lam0.size)
        lambdas = lam0[None, :] + config.sample_sd * noise
    else:
        lambdas = lam0[None, :]
    idx = step_rng(config.seed, 0, pwd.STREAM_TRAIN_BATCH).randint(0, len(splits.train_x), size=config.batch_size)
    x, y = splits.train_x[idx], splits.train_y[idx]

    def objective(phi):
        w = hypernet_forward(phi, lambdas, settings.input_offset)
        total = 0.0
        for k in range(len(lambdas)):
            total = total + linear_mse(w[k], x, y) + anp.sum(anp.exp(lambdas[k]) * w[k] ** 2)
        return total / len(lambdas)
    g = grad(objective)(phi0)
    for (W0, b0), (W1, b1), (gW, gb) in zip(phi0, new.phi, g, strict=True):
        np.testing.assert_allclose(W1 - W0, first_adam_step(gW, config.hypernet_step), rtol=1e-6, atol=1e-13)
        np.testing.assert_allclose(b1 - b0, first_adam_step(gb, config.hypernet_step), rtol=1e-6, atol=1e-13)
    np.testing.assert_array_equal(new.lam, lam0)


def test_evaluated_weights_are_the_hypernetwork_at_lambda_hat(splits):
    """The curve's losses are those of w_phi(lambda_hat - offset) on the full validation and test sets."""
    config = small_config(init_scale=0.05)
    state, step_fn, evaluate, _, settings = large.make_hyper(splits, config)
    state = step_fn(state, 0)
    w = hypernet_forward(state.phi, state.lam[None, :], settings.input_offset)[0]
    valid, test = evaluate(state)
    assert np.isclose(valid, linear_mse(w, splits.valid_x, splits.valid_y), rtol=1e-12)
    assert np.isclose(test, linear_mse(w, splits.test_x, splits.test_y), rtol=1e-12)


# ----------------------------------------------------------------------------------- unrolled baseline

@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_unrolled_hypergradient_matches_finite_differences(splits, inner):
    """The baseline's hypergradient (default Adam inner loop, and SGD) against central differences of the
    validation MSE of an independently written unrolled training run."""
    config = small_config(unroll_steps=5, unroll_inner=inner, unroll_inner_step=0.05 if inner == "sgd" else 1e-2,
                          init_lambda=-2.0)
    direction = large.unrolled_direction(splits, config)
    rs = step_rng(config.seed, 0, unrolled.STREAM_UNROLL_SCHEDULE)
    idx = rs.randint(0, len(splits.train_x), size=(config.unroll_steps, config.batch_size))
    bx, by = splits.train_x[idx], splits.train_y[idx]
    start = flatten_params(init_mlp(large.LAYERS, config.unroll_init_scale, np.random.RandomState(config.seed)))

    def trained(lam):  # independent unrolled loop: textbook Adam / SGD on MSE + sum exp(lambda) w^2
        w, m, v = start.copy(), np.zeros(7850), np.zeros(7850)
        for t in range(config.unroll_steps):
            g = grad(lambda w, t=t: linear_mse(w, bx[t], by[t]) + np.sum(np.exp(lam) * w ** 2))(w)
            if inner == "sgd":
                w = w - config.unroll_inner_step * g
            else:
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g ** 2
                w = w - config.unroll_inner_step * (m / (1 - 0.9 ** (t + 1))) / (np.sqrt(v / (1 - 0.999 ** (t + 1)))
                                                                                + 1e-8)
        return linear_mse(w, splits.valid_x, splits.valid_y)
    lam = np.full(7850, config.init_lambda) + 0.1 * np.random.RandomState(3).randn(7850)
    g = direction(unrolled.UnrolledState(lam, None, 0))
    u = np.random.RandomState(6).randn(7850)
    eps = 1e-4
    numeric = (trained(lam + eps * u) - trained(lam - eps * u)) / (2 * eps)
    assert np.isclose(np.dot(g, u), numeric, rtol=1e-4)


def test_unrolled_curve_is_the_unrolled_training_run(splits):
    """The baseline's recorded losses are those of w_T(lambda) on the full validation and test sets."""
    config = small_config(unroll_steps=3)
    state, step_fn, evaluate = unrolled.make_unrolled(splits, config)
    state = step_fn(state, 0)
    rs = step_rng(config.seed, 0, unrolled.STREAM_UNROLL_SCHEDULE)
    idx = rs.randint(0, len(splits.train_x), size=(config.unroll_steps, config.batch_size))
    w0 = flatten_params(init_mlp(large.LAYERS, config.unroll_init_scale, np.random.RandomState(config.seed)))
    w = unrolled.unrolled_train(state.lam, w0, splits.train_x[idx], splits.train_y[idx], "adam",
                                config.unroll_inner_step)
    valid, test = evaluate(state)
    assert np.isclose(valid, linear_mse(w, splits.valid_x, splits.valid_y), rtol=1e-10)
    assert np.isclose(test, linear_mse(w, splits.test_x, splits.test_y), rtol=1e-10)


# ------------------------------------------------------------------------------------- data separation

def perturbed(data, which, seed=0):
    """data with the validation block (training images BLOCK..2 BLOCK) or the test images changed."""
    rs = np.random.RandomState(seed)
    if which == "test":
        images = data.test_images.copy()
        images[:BLOCK] = np.clip(images[:BLOCK] + 0.2 * rs.randn(BLOCK, 784), 0, 1)
        return data._replace(test_images=images)
    images = data.train_images.copy()
    images[BLOCK:2 * BLOCK] = np.clip(images[BLOCK:2 * BLOCK] + 0.2 * rs.randn(BLOCK, 784), 0, 1)
    return data._replace(train_images=images)


def hyper_trajectory(data, steps=3, **overrides):
    config = small_config(**{"init_scale": 0.05, "lambda_step": 1e-2, **overrides})
    splits = refs.block_splits(data, 1, 0, BLOCK, BLOCK)
    state, step_fn, *_ = large.make_hyper(splits, config)
    for i in range(steps):
        state = step_fn(state, i)
    return copy_phi(state.phi), state.lam.copy()


def test_hypernetwork_never_sees_validation_or_test_data(data):
    """With lambda_hat frozen, phi is a function of the training data only."""
    phi, _ = hyper_trajectory(data, lambda_step=0.0)
    for which in ("valid", "test"):
        other, _ = hyper_trajectory(perturbed(data, which), lambda_step=0.0)
        for (W, b), (W2, b2) in zip(phi, other, strict=True):
            np.testing.assert_array_equal(W, W2)
            np.testing.assert_array_equal(b, b2)


def test_lambda_hat_reads_validation_data_and_never_test_data(data):
    phi, lam = hyper_trajectory(data)
    _, lam_test = hyper_trajectory(perturbed(data, "test"))
    np.testing.assert_array_equal(lam, lam_test)
    _, lam_valid = hyper_trajectory(perturbed(data, "valid"))
    assert not np.array_equal(lam, lam_valid)   # lambda_hat is stepped on the validation set


@pytest.fixture(scope="module")
def small_run(data):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # module fixtures are set up before the autouse one
        return large.run(small_config(), data)


def test_no_method_reads_test_data_and_each_reads_validation_data(data, small_run):
    """Perturbing the test images changes only the test curves; perturbing the validation block moves every
    method's lambda (every method tunes on validation data)."""
    _, arrays = small_run
    _, test_arrays = large.run(small_config(), perturbed(data, "test"))
    _, valid_arrays = large.run(small_config(), perturbed(data, "valid"))
    for m in large.METHODS:
        np.testing.assert_array_equal(arrays[f"{m}_lambda"], test_arrays[f"{m}_lambda"])
        np.testing.assert_array_equal(arrays[f"{m}_valid"], test_arrays[f"{m}_valid"])
        np.testing.assert_array_equal(arrays[f"{m}_cosine"], test_arrays[f"{m}_cosine"])
        assert not np.array_equal(arrays[f"{m}_test"], test_arrays[f"{m}_test"])
        assert not np.array_equal(arrays[f"{m}_lambda"], valid_arrays[f"{m}_lambda"])


# --------------------------------------------------------------------------------------------- diagnostics

def test_diagnostics_match_the_references(splits, small_run):
    """The recorded reference is the closed form at lambda_0, the exact method's cosine is 1 and the hyper
    method's cosine at the end is that of references.hypernet_hypergradient with the exact hypergradient."""
    summary, arrays = small_run
    ridge = refs.ridge_problem(splits.train_x, splits.train_y)
    lam0 = np.full(7850, -7.0)
    expected = refs.fixed_lambda_reference(lam0, splits, ridge)
    assert np.isclose(summary["reference"]["valid"], expected["valid"], rtol=1e-12)
    assert np.allclose(arrays["exact_cosine"], 1.0, atol=1e-9)
    exact, _, exact_valid = refs.exact_hypergradient(ridge, arrays["exact_lambda"], splits.valid_x, splits.valid_y)
    assert np.isclose(arrays["exact_exact_valid"][-1], exact_valid, rtol=1e-12)
    assert np.isclose(arrays["hyper_lambda_shift"][-1], np.linalg.norm(arrays["hyper_lambda"] - lam0), rtol=1e-12)
    assert arrays["hyper_diag_step"][0] == 0 and arrays["hyper_diag_step"][-1] == summary["hyper"]["steps"]
    assert [row["block"] for row in summary["split_sensitivity"]] == [1, 2, 3]
    for row in summary["split_sensitivity"]:
        assert np.isclose(row["gap"], row["valid"] - row["test"])


def test_exact_descent_lowers_the_exact_validation_loss(small_run):
    summary, arrays = small_run
    assert arrays["exact_exact_valid"][-1] < summary["reference"]["valid"]
    assert np.all(np.diff(arrays["exact_valid"]) < 0)


# --------------------------------------------------------------------------------------------------- claims

def fake_summary(hyper_valid, cosine, exact_gain, unrolled_valid=0.0383, hyper_s=50.0, unrolled_s=500.0):
    ref = {"lambda": -7.0, "valid": 0.0411, "test": 0.0397}
    method = lambda valid, test, cos, gain: {
        "final_valid": valid, "final_test": test, "cosine": {"mean": cos}, "exact_gain": gain,
        "gain_over_reference": ref["valid"] - valid, "tunes": gain >= large.TUNED_GAIN,
        "lambda_shift": {"mean_abs": 0.003}}
    return {"reference": ref, "hyper": method(hyper_valid, hyper_valid + 0.0012, cosine, exact_gain),
            "unrolled": method(unrolled_valid, unrolled_valid + 0.0018, 0.6, 0.001),
            "speed": {"level": 1.01 * hyper_valid, "hyper_seconds": hyper_s, "unrolled_seconds": unrolled_s}}


def verdicts(summary):
    return {c.id: c.evaluate(summary)[1] for c in large.CLAIMS}


def test_untuned_hyper_training_is_never_reported_as_converging():
    """A curve ending at the fixed-lambda reference with a zero cosine refutes every claim that rests on
    hyper-training tuning lambda, however fast it got there."""
    v = verdicts(fake_summary(hyper_valid=0.0412, cosine=0.003, exact_gain=0.0))
    for claim in ("fig5top-tunes", "fig5top-faster", "fig5top-worse-optimum", "fig5top-overfits-less"):
        assert v[claim] == "refuted", claim
    # below the reference by early stopping, but lambda_hat itself no better: still not tuning
    v = verdicts(fake_summary(hyper_valid=0.0400, cosine=0.003, exact_gain=0.0))
    assert v["fig5top-faster"] == "refuted" and v["fig5top-tunes"] == "refuted"


def test_tuning_hyper_training_is_judged_on_its_numbers():
    v = verdicts(fake_summary(hyper_valid=0.0391, cosine=0.5, exact_gain=0.002))
    assert v["fig5top-tunes"] == "reproduced" and v["fig5top-faster"] == "reproduced"
    assert v["fig5top-worse-optimum"] == "reproduced" and v["fig5top-overfits-less"] == "reproduced"
    v = verdicts(fake_summary(hyper_valid=0.0391, cosine=0.5, exact_gain=0.002, hyper_s=600.0, unrolled_s=300.0))
    assert v["fig5top-faster"] == "not reproduced"
    for claim in large.CLAIMS:
        assert claim.evaluate(fake_summary(0.0391, 0.5, 0.002))[1] in common.VERDICTS


# ------------------------------------------------------------------------------------------- end to end

def run_cli(*args):
    return common.main(large, ["--synthetic", *args])


def test_quick_end_to_end_and_replot(tmp_path, capsys):
    assert run_cli("--quick", "--out-dir", str(tmp_path)) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "results" / "hypernets_local_large.json").read_text())
    assert summary["budget"] == "cpu_seconds" and summary["hypernet_parameters"] == 164860
    for method in large.METHODS:
        s = summary[method]
        assert s["steps"] > 0 and np.isfinite(s["final_valid"]) and s["best_valid"] <= s["final_valid"]
        assert -1 <= s["cosine"]["mean"] <= 1
    assert {c.id for c in large.CLAIMS} <= {"fig5top-" + k for k in
                                            ("levels", "tunes", "faster", "worse-optimum", "overfits-less")}
    assert set(large.tex_numbers(summary)) and all(isinstance(v, str) for v in large.tex_numbers(summary).values())
    for stem in ("hypernets_local_large", "hypernets_local_large_diagnostics"):
        (tmp_path / f"{stem}.png").unlink()
    assert run_cli("--replot", "--out-dir", str(tmp_path)) == 0
    for stem in ("hypernets_local_large", "hypernets_local_large_diagnostics"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 10000


def test_fixed_iters_reproducible_in_one_process_or_in_parallel(tmp_path):
    """--jobs 1 (interleaved in one process) and --jobs 2 (a process per method) give the same bits."""
    arrays = []
    for jobs in (1, 2):
        d = tmp_path / str(jobs)
        assert run_cli("--quick", "--iters", "3", "--algorithm", "simplified", "--jobs", str(jobs),
                       "--out-dir", str(d)) == 0
        with np.load(d / "results" / "hypernets_local_large.npz") as npz:
            arrays.append({k: npz[k] for k in npz.files})
        summary = json.loads((d / "results" / "hypernets_local_large.json").read_text())
        assert summary["budget"] == "iters" and summary["config"]["algorithm"] == "simplified"
        assert all(summary[m]["steps"] == 3 for m in large.METHODS)
        assert summary["parallel"]["jobs"] == jobs and summary["config"]["jobs"] == jobs
        assert (set(summary["parallel"].get("process_cpu_seconds", {})) == set(large.METHODS)) == (jobs > 1)
    for key in arrays[0]:
        if "seconds" not in key:                 # timing is the only run-dependent field
            assert np.array_equal(arrays[0][key], arrays[1][key]), key


def test_valid_block_changes_the_validation_set(tmp_path):
    for block in (1, 2):
        out = str(tmp_path / str(block))
        assert run_cli("--quick", "--iters", "1", "--valid-block", str(block), "--out-dir", out) == 0
    ref = [json.loads((tmp_path / str(b) / "results" / "hypernets_local_large.json").read_text())["reference"]
           for b in (1, 2)]
    assert ref[0]["test"] == ref[1]["test"] and ref[0]["valid"] != ref[1]["valid"]


def test_jobs_default_to_one_process_per_method_at_most_one_per_cpu(monkeypatch):
    import forked

    monkeypatch.setattr(forked, "available_cpus", lambda: 2)
    assert large.resolve_jobs(0, 3) == 2 and large.resolve_jobs(1, 3) == 1
    assert large.resolve_jobs(8, 3) == 3
    monkeypatch.setattr(forked, "available_cpus", lambda: 16)
    assert large.resolve_jobs(0, 3) == 3


def test_paper_budgets_select_the_papers_seconds():
    assert large.budget_seconds(large.Config(paper_budgets=True)) == large.PAPER_SECONDS == 1000.0
    assert large.budget_seconds(large.Config(seconds=5.0)) == 5.0


def test_divergence_is_one_line_error(tmp_path, capsys):
    code = run_cli("--quick", "--iters", "2", "--init-lambda", "10", "--lambda-step", "1e3", "--hypernet-step",
                   "1e3", "--unroll-outer-step", "1e3", "--out-dir", str(tmp_path))
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("these settings did not diverge")
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "hypernets_local_large.json").exists()


@pytest.mark.parametrize("args", [["--seconds", "0"], ["--algorithm", "other"], ["--valid-block", "6"],
                                  ["--block", "20000", "--valid-block", "3"], ["--iters", "0"]])
def test_invalid_arguments_rejected(tmp_path, capsys, args):
    assert run_cli(*args, "--out-dir", str(tmp_path)) == 2, args
    assert capsys.readouterr().err.startswith("error: ")


def test_replot_without_results_is_clean_error(tmp_path, capsys):
    assert run_cli("--replot", "--out-dir", str(tmp_path)) == 1
    assert capsys.readouterr().err.startswith("error: no saved results")


def test_paper_budgets_environment_variable_sets_the_default():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PAPER_BUDGETS": "1"}
    out = subprocess.run([sys.executable, str(large.__file__), "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0
    help_text = " ".join(out.stdout.split())
    assert "PAPER_BUDGETS=1) (default: True)" in help_text
