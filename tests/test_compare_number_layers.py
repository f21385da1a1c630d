"""compare_number_layers (Figure 5 bottom): hand-written pieces against autograd and the reference stopping rule,
data separation of the baselines, the control, claims, and end-to-end runs through common.main."""
import dataclasses
import json

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from threadpoolctl import threadpool_limits

import common
import compare_number_layers as layers
import references
from conftest import assert_one_line_error
from data_loader import small_splits
from neural_network import num_params
from per_weight_decay import decay_objective, fan_in_init, mse_loss

TINY = dataclasses.replace(layers.Config(), **layers.QUICK)
SIZES = (784, 8, 6, 10)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """As the driver runs experiments: one BLAS thread (two spin and stall on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


def start(seed=3):
    """Fan-in start weights with small nonzero biases (zero biases make ReLU ties, where autograd's maximum
    splits the gradient in halves and the hand-written backprop gives 0: both are subgradients)."""
    rs = np.random.RandomState(seed)
    return fan_in_init(SIZES, rs) + 1e-3 * rs.randn(num_params(SIZES))


@pytest.fixture(scope="module")
def splits(synthetic):
    return small_splits(synthetic, 300, 200, 200)


def run(capsys, *argv):
    capsys.readouterr()
    code = common.main(layers, ["--synthetic", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_config_matches_the_paper_and_includes_the_start_in_the_grid():
    config = layers.Config()
    assert [num_params(s) for s in config.models] == [7850, 79510, 89610]
    assert config.n_train == config.n_valid == config.n_test == 10000
    assert config.init_lambda in config.search_lambdas
    assert len(config.seconds) == len(config.models)


def test_decay_gradient_equals_autograd():
    rs = np.random.RandomState(0)
    P, K = num_params(SIZES), 3
    w, lam = 0.3 * rs.randn(K, P), rs.uniform(-6, -1, size=(K, P))
    x, y = rs.rand(5, 784), np.eye(10)[rs.randint(10, size=5)]
    objective = decay_objective(SIZES)
    expected = grad(lambda w: anp.sum(objective(w, lam, x, y)))(w)
    got = layers.DecayGradient(SIZES, K, 5)(w, 2 * np.exp(lam), x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_grid_training_follows_the_reference_stopping_rule(splits):
    """One model of the stacked grid = references.train_to_convergence with the same rule, start and minibatches."""
    config = dataclasses.replace(TINY, step_size=1e-2, search_eval_every=2, search_patience=6, search_max_steps=400)
    w0 = start()
    [ours] = layers.converge_grid(SIZES, [-6.0], splits, config, w0)
    ref = references.train_to_convergence(SIZES, -6.0, splits, seed=config.seed, step_size=config.step_size,
                                          batch_size=config.batch_size, eval_every=2, patience=6, max_steps=400, w0=w0)
    assert ours["step"] == ref["step"] and ours["steps"] == ref["steps"] and ours["converged"] == ref["converged"]
    assert ref["converged"] and ref["steps"] < 400  # stopped by the rule, on a noisy validation curve
    assert ours["valid"] == pytest.approx(ref["valid"], rel=1e-9)
    assert ours["test"] == pytest.approx(ref["test"], rel=1e-9)


def test_stacked_grid_equals_separate_runs_even_when_models_stop_at_different_times(splits):
    config = dataclasses.replace(TINY, step_size=3e-3, search_eval_every=5, search_patience=2, search_max_steps=150)
    w0 = start()
    lams = [-9.0, -3.0, -1.0]
    both = layers.converge_grid(SIZES, lams, splits, config, w0)
    assert len({row["steps"] for row in both}) > 1  # the models did stop at different times
    for lam, row in zip(lams, both, strict=True):
        [alone] = layers.converge_grid(SIZES, [lam], splits, config, w0)
        assert alone["steps"] == row["steps"] and alone["step"] == row["step"]
        assert alone["valid"] == pytest.approx(row["valid"], rel=1e-9)


def perturbed(splits, part, rs):
    """A copy of splits with the images and labels of `part` ("valid" or "test") replaced by noise."""
    changes = {f"{part}_x": rs.rand(*getattr(splits, f"{part}_x").shape),
               f"{part}_y": np.eye(10)[rs.randint(10, size=len(getattr(splits, f"{part}_y")))]}
    return splits._replace(**changes)


def test_baselines_never_train_on_validation_or_test_data(splits):
    """With one check (so the stopping rule cannot differ) the trained weights ignore validation and test data; the
    reported test loss is the only number that depends on the test set."""
    config = dataclasses.replace(TINY, search_eval_every=30, search_max_steps=30)
    w0 = start()
    rs = np.random.RandomState(5)
    base = layers.converge_grid(SIZES, [-6.0], splits, config, w0)[0]
    other_valid = layers.converge_grid(SIZES, [-6.0], perturbed(splits, "valid", rs), config, w0)[0]
    other_test = layers.converge_grid(SIZES, [-6.0], perturbed(splits, "test", rs), config, w0)[0]
    np.testing.assert_array_equal(base["weights"], other_valid["weights"])
    np.testing.assert_array_equal(base["weights"], other_test["weights"])
    assert base["valid"] == other_test["valid"] and base["test"] != other_test["test"]
    # the linear model's baseline is the closed form of the training data
    linear = layers.hand_tuned((784, 10), splits, dataclasses.replace(TINY, search_lambdas=(-7.0,)), None)
    moved = layers.hand_tuned((784, 10), perturbed(splits, "valid", rs),
                              dataclasses.replace(TINY, search_lambdas=(-7.0,)), None)
    assert linear["test"] == moved["test"]
    assert linear["valid"][0] == pytest.approx(references.fixed_lambda_reference(-7.0, splits)["valid"], rel=1e-12)


def test_hand_tuned_setting_is_picked_on_validation_data(splits):
    config = dataclasses.replace(TINY, search_lambdas=(-9.0, -7.0, -5.0, -3.0, -1.0))
    rs = np.random.RandomState(9)
    base = layers.hand_tuned((784, 10), splits, config, None, log=lambda line: None)
    noisy = layers.hand_tuned((784, 10), perturbed(splits, "test", rs), config, None, log=lambda line: None)
    for result in (base, noisy):
        assert result["best_valid"] == min(result["valid"])
        assert result["best_lambda"] == result["lambdas"][int(np.argmin(result["valid"]))]
    assert noisy["best_lambda"] == base["best_lambda"] and noisy["test"] != base["test"]
    assert int(np.argmin(noisy["test"])) != int(np.argmin(noisy["valid"]))  # the test set would pick another


def test_control_is_plain_training_on_the_hypernetworks_minibatches(splits):
    """The control's step i: Adam on the decay objective at lambda_hat_0 with minibatch (seed, i, train stream)."""
    from common import step_rng
    from optimizers import adam_init, adam_textbook
    from per_weight_decay import STREAM_TRAIN_BATCH, minibatch

    config = dataclasses.replace(TINY, step_size=1e-3)
    P = num_params(SIZES)
    w0 = start(1)
    state, step_fn, evaluate = layers.make_control(SIZES, w0, splits, config)
    objective = decay_objective(SIZES)
    lam = np.full((1, P), config.init_lambda)
    g_fn = grad(lambda w, x, y: objective(w, lam, x, y)[0])
    w, adam = w0[None].copy(), adam_init(w0[None])
    for i in range(4):
        state = step_fn(state, i)
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size,
                         step_rng(config.seed, i, STREAM_TRAIN_BATCH))
        w, adam = adam_textbook(w, g_fn(w, x, y), adam, config.step_size)
    valid, _ = evaluate(state)
    assert valid == pytest.approx(mse_loss(SIZES)(w, splits.valid_x, splits.valid_y)[0], rel=1e-9)


TRUSTED_CHECKPOINTS = [dict(step=0), dict(step=10, half_cosine=0.9)]  # a stable reference direction


def summary_with(hyper, control, converged_start, hand=0.02):
    """A minimal summary for the claims: per model final valid/test, control valid, hand-tuned levels."""
    models = {}
    for name, h, c, s in zip(("784-10", "784-100-10", "784-100-100-10"), hyper, control, converged_start, strict=True):
        models[name] = dict(final_valid=h, final_test=h + 0.001, control_valid_minus_final_valid=c - h,
                            final_valid_minus_hand_tuned_valid=h - hand,
                            hand_tuned=dict(best_valid=hand, start_lambda_valid=s),
                            diagnostics=dict(cosine_mean=0.0, checkpoints=TRUSTED_CHECKPOINTS))
    return {"models": models}


def test_claims_follow_the_numbers():
    claims = {c.id: c for c in layers.CLAIMS}
    # hyper-training equal to the control: nothing tuned -> refuted, whatever the other numbers
    same = summary_with([0.04, 0.015, 0.012], [0.04, 0.015, 0.012], [0.041, 0.016, 0.013])
    assert claims["layers-tunes-lambda"].evaluate(same)[1] == "refuted"
    # ahead of the control but not of training to convergence at lambda_hat_0 -> not reproduced
    faster = summary_with([0.04, 0.015, 0.012], [0.05, 0.02, 0.02], [0.039, 0.014, 0.011])
    assert claims["layers-tunes-lambda"].evaluate(faster)[1] == "not reproduced"
    better = summary_with([0.03, 0.010, 0.009], [0.05, 0.02, 0.02], [0.039, 0.014, 0.011])
    assert claims["layers-tunes-lambda"].evaluate(better)[1] == "reproduced"
    assert claims["layers-deeper-lower"].evaluate(same)[1] == "reproduced"
    assert claims["layers-beat-hand-tuned"].evaluate(same)[1] == "reproduced"   # 0.015, 0.012 < 0.02
    worse = summary_with([0.04, 0.025, 0.012], [0.04, 0.025, 0.012], [0.041, 0.03, 0.013])
    assert claims["layers-beat-hand-tuned"].evaluate(worse)[1] == "partly"
    for claim in layers.CLAIMS:
        value, verdict = claim.evaluate(same)
        assert verdict in common.VERDICTS


def test_quick_end_to_end_replot_and_iters_reproducible(tmp_path, capsys):
    results = []
    for i in range(2):
        code, _, err = run(capsys, "--quick", "--iters", "3", "--out-dir", str(tmp_path / str(i)))
        assert code == 0, err
        results.append(json.loads((tmp_path / str(i) / "results" / "compare_number_layers.json").read_text()))
    models = results[0]["models"]
    assert list(models) == ["784-10", "784-20-10", "784-20-20-10"]
    for name, m in models.items():
        other = results[1]["models"][name]
        assert m["steps"] == 3 and m["control"]["steps"] == 3 * TINY.inner_steps == m["hypernet_steps"]
        hand = m["hand_tuned"]
        assert hand["best_valid"] == min(hand["valid"]) and TINY.init_lambda in hand["lambdas"]
        for key in ("final_valid", "final_test", "best_valid", "lambda_mean"):
            assert m[key] == other[key]
        assert m["control"]["final_valid"] == other["control"]["final_valid"]
        assert {**hand, "cpu_seconds": 0} == {**other["hand_tuned"], "cpu_seconds": 0}
    with np.load(tmp_path / "0" / "results" / "compare_number_layers.npz") as npz:
        for name in models:  # the control starts where hyper-training starts
            assert npz[f"{name}_control_valid"][0] == pytest.approx(npz[f"{name}_valid"][0], rel=1e-12)
    png = tmp_path / "0" / "compare_number_layers.png"
    assert png.exists() and (tmp_path / "0" / "compare_number_layers.pdf").exists()
    png.unlink()
    code, _, err = run(capsys, "--replot", "--out-dir", str(tmp_path / "0"))
    assert code == 0, err
    assert png.exists()


def test_budget_is_extended_to_the_step_floor(tmp_path, capsys):
    code, _, err = run(capsys, "--quick", "--seconds", "0.001,0.001,0.001", "--min-steps", "3,3,3", "--out-dir",
                       str(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "results" / "compare_number_layers.json").read_text())
    for m in summary["models"].values():
        assert m["steps"] == 3 and m["budget_extended_to_min_steps"] and m["control"]["steps"] == 30


@pytest.mark.parametrize("argv", [["--seconds", "1,2"], ["--min-steps", "1,2"], ["--step-size", "0"],
                                  ["--search-lambdas", "-8,-6"], ["--models", "784-100"], ["--n-train", str(10**12)],
                                  ["--paper-budgets", "--seconds", "1,1,1"], ["--seconds", "1e-9,1e-9,1e-9"],
                                  ["--seed", str(2**32)], ["--diag-checkpoints", "1"], ["--diag-cg-iters", "0"]])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv):
    code, _, err = run(capsys, "--out-dir", str(tmp_path), *argv)
    assert_one_line_error(code, err, 2, tmp_path)


def test_divergence_stops_the_run_with_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "--quick", "--iters", "3", "--step-size", "1e6", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, 1, tmp_path, contains=("diverged",))


def test_jobs_2_gives_the_bits_of_jobs_1(tmp_path, capsys):
    """--jobs 1 (one model after another here) and --jobs 2 (a process per model) give the same numbers."""
    results = {}
    for jobs in (1, 2):
        d = tmp_path / str(jobs)
        code, out, err = run(capsys, "--quick", "--iters", "3", "--jobs", str(jobs), "--out-dir", str(d))
        assert code == 0, err
        summary = json.loads((d / "results" / "compare_number_layers.json").read_text())
        assert summary["parallel"]["jobs"] == jobs
        with np.load(d / "results" / "compare_number_layers.npz") as npz:
            results[jobs] = summary, {k: npz[k] for k in npz.files}
        if jobs == 2:  # the children's log lines reach the parent, each naming its model
            assert all(f"{name} hand-tuned:" in out for name in summary["models"])
    (one, arrays1), (two, arrays2) = results[1], results[2]
    assert list(one["models"]) == list(two["models"]) == [layers.model_name(s) for s in TINY.models]
    assert set(two["parallel"]["process_cpu_seconds"]) == set(two["parallel"]["process_wall_seconds"]) \
        == set(two["models"])
    assert all(s > 0 for s in two["parallel"]["process_cpu_seconds"].values())

    def without_clocks(value):  # CPU and wall seconds differ between runs; everything else must not
        if isinstance(value, dict):
            return {k: without_clocks(v) for k, v in value.items() if "seconds" not in k}
        if isinstance(value, list):
            return [without_clocks(v) for v in value]
        return value

    assert without_clocks(one["models"]) == without_clocks(two["models"])
    assert set(arrays1) == set(arrays2)
    for key in arrays1:
        if "seconds" not in key:
            np.testing.assert_array_equal(arrays1[key], arrays2[key], err_msg=key)


def test_a_failing_model_process_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(layers, "hand_tuned", broken)
    code, _, err = run(capsys, "--quick", "--iters", "2", "--jobs", "2", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, 1, tmp_path, contains=("model process failed", "broken on purpose"))
