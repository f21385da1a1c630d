"""learn_vs_true_loss_scatter.py: batched ground truth, joblib, cache, surrogates, figures and JSON."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from autograd import grad

import learn_vs_true_loss_scatter as lvt
from common import DivergenceError
from conftest import CODE
from data_loader import scatter_splits
from neural_network import batched_mlp_predict, class_norm_regulariser, gaussian_nll, mlp_predict, unflatten_batch
from optimizers import adam

TINY = dict(n_models=12, n_train_tuples=5, n_train_points=1500, n_valid_points=500, gt_steps=6, chunk_size=4,
            fixed_steps=5, stochastic_steps=5, eval_batch=5, synthetic=True, log_every=1000, hyper_log_every=1000)


@pytest.fixture(scope="module")
def splits():
    from data_loader import synthetic_mnist

    return scatter_splits(synthetic_mnist(), 1500, 500, 0)


def tiny(**kw):
    return dataclasses.replace(lvt.Config(), **{**TINY, **kw})


def rows_to_flat(Wt, b):
    K = len(b) // 10
    return np.hstack([Wt.reshape(K, 10, 784).transpose(0, 2, 1).reshape(K, -1), b.reshape(K, 10)])


def test_batched_trainer_equals_training_one_by_one(splits):
    config = tiny(gt_dtype="float64", gt_steps=12)
    lambdas = lvt.sample_lambdas(config)[:3]
    Wt, b = lvt.train_ground_truth_chunk(lambdas, splits.train_x, splits.train_y, config, chunk_index=2)
    offsets = lvt.chunk_offsets(config, 2)
    W0, b0 = lvt.initial_elementary(config)
    for k, lam in enumerate(lambdas):
        def objective(params, i, lam=lam):  # one model, plain autograd, the same minibatches
            x, t = splits.train_x[offsets[i]:offsets[i] + 100], splits.train_y[offsets[i]:offsets[i] + 100]
            return gaussian_nll(mlp_predict(params, x), t) + class_norm_regulariser(params[0][0][None], lam[None])[0]

        (W, bk), = adam(grad(objective), [(W0.copy(), b0.copy())], num_iters=config.gt_steps, step_size=1e-4)
        np.testing.assert_allclose(Wt[10 * k:10 * k + 10].T, W, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(b[10 * k:10 * k + 10], bk, rtol=1e-9, atol=1e-15)
    assert not np.allclose(Wt[:10], Wt[10:20])  # different lambdas really give different models


def test_float32_training_is_close_to_float64(splits):
    lambdas = lvt.sample_lambdas(tiny())[:4]
    gram = lvt.make_gram(splits.valid_x, splits.valid_y)
    losses = [lvt.ground_truth_chunk_losses(lambdas, splits.train_x, splits.train_y, gram, tiny(gt_dtype=d), 0)
              for d in ("float32", "float64")]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)


def test_gram_validation_loss_equals_direct(splits):
    rs = np.random.RandomState(0)
    flat = 0.05 * rs.randn(7, 7850)
    gram = lvt.make_gram(splits.valid_x, splits.valid_y)
    direct = gaussian_nll(batched_mlp_predict(unflatten_batch(flat, [784, 10]), splits.valid_x), splits.valid_y)
    np.testing.assert_allclose(lvt.valid_losses_flat(flat, gram, batch=3), direct, rtol=1e-10)


def test_divergence_is_reported_with_its_step(splits):
    config = tiny(step_size=1e300, gt_steps=3)
    with pytest.raises(DivergenceError, match="step 2"):
        lvt.train_ground_truth_chunk(lvt.sample_lambdas(config)[:2], splits.train_x, splits.train_y, config, 0)


JOBS1_SCRIPT = """
import dataclasses, sys
import numpy as np
import learn_vs_true_loss_scatter as lvt
from data_loader import scatter_splits, synthetic_mnist
config = dataclasses.replace(lvt.Config(), **{config!r})
splits = scatter_splits(synthetic_mnist(), 1500, 500, 0)
np.save(sys.argv[1], lvt.compute_ground_truth(config, splits, jobs=1, log=lambda s: None)[1])
"""


def test_jobs_2_equals_jobs_1(splits, tmp_path):
    # Realistic chunks (64 models: BLAS would use several threads if it could) and --jobs 1 in a fresh
    # process, where the first chunk is the one that would see an unlimited BLAS.
    kw = {**TINY, "n_models": 128, "chunk_size": 64, "gt_steps": 3}
    code = JOBS1_SCRIPT.format(config=kw)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "jobs1.npy")], check=True, cwd=CODE, timeout=300)
    loss1 = np.load(tmp_path / "jobs1.npy")
    lam2, loss2 = lvt.compute_ground_truth(tiny(**kw), splits, jobs=2, log=lambda s: None)
    np.testing.assert_array_equal(lam2, lvt.sample_lambdas(tiny(**kw)))
    np.testing.assert_array_equal(loss1, loss2)
    assert loss1.shape == (128,) and np.all(np.isfinite(loss1)) and np.ptp(loss1) > 0


def test_cache_used_rebuilt_on_other_settings_and_corruption(splits, tmp_path, capsys, monkeypatch):
    config = tiny()
    quiet = lambda s: None  # noqa: E731
    lambdas, losses, _, cached = lvt.get_ground_truth(config, splits, 1, tmp_path, log=quiet)
    assert not cached
    path = lvt.cache_path(tmp_path, config)
    assert path.exists()

    real_compute = lvt.compute_ground_truth
    calls = []

    def counting(*args, **kw):
        calls.append(1)
        return real_compute(*args, **kw)

    monkeypatch.setattr(lvt, "compute_ground_truth", counting)
    got = lvt.get_ground_truth(config, splits, 1, tmp_path, log=quiet)  # valid cache: used
    assert calls == [] and np.array_equal(got[1], losses) and got[3]

    other = dataclasses.replace(config, gt_steps=config.gt_steps + 1)  # other settings: rebuilt
    got = lvt.get_ground_truth(other, splits, 1, tmp_path, log=quiet)
    assert calls == [1] and not np.array_equal(got[1], losses)
    assert "other settings" in capsys.readouterr().err

    lvt.get_ground_truth(config, splits, 1, tmp_path, log=quiet)  # back to the first settings
    capsys.readouterr()
    data = bytearray(path.read_bytes())
    i = data.find(np.ascontiguousarray(losses).tobytes()[:8])
    assert i > 0
    data[i + 3] ^= 0xFF  # flip a byte inside the stored losses
    path.write_bytes(bytes(data))
    calls.clear()
    got = lvt.get_ground_truth(config, splits, 1, tmp_path, log=quiet)
    err = capsys.readouterr().err
    assert calls == [1] and "rebuilding" in err and len(err.strip().splitlines()) == 1
    np.testing.assert_array_equal(got[1], losses)

    path.write_bytes(path.read_bytes()[:200])  # truncated
    calls.clear()
    got = lvt.get_ground_truth(config, splits, 1, tmp_path, log=quiet)
    assert calls == [1] and "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(got[1], losses)

    calls.clear()
    lvt.get_ground_truth(config, splits, 1, tmp_path, use_cache=False, log=quiet)  # --no-cache
    assert calls == [1]


def test_run_summary_and_table(splits, tmp_path):
    config = tiny(n_models=16, table_budgets=(3, 5, 40))
    summary, arrays, table = lvt.run(config, splits, cache_dir=tmp_path, table=True, log=lambda s: None)
    for name in lvt.MODELS:
        assert set(summary[name]) == {"error_mean", "error_std", "predicted_best_true_loss"}
        assert arrays[f"inferred_{name}"].shape == (11,)
        assert summary[name]["predicted_best_true_loss"] >= summary["true_best"]
    assert summary["n_heldout"] == 11 and summary["n_train_tuples"] == 5
    assert table["budgets"] == [3, 5]  # budgets that leave no held-out tuples are dropped
    lvt.save_table(tmp_path, table)
    tex = (tmp_path / "results" / "gp_vs_hypernet_table.tex").read_text()
    assert "True best" in tex and tex.count("\\\\") == 5


def script_args(tmp_path, *extra):
    return ["--quick", "--n-models", "64", "--gt-steps", "5", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--jobs", "1", *extra]


def run_script(tmp_path, *extra):
    """The script as a user runs it: by path, from another folder."""
    cmd = [sys.executable, str(CODE / "learn_vs_true_loss_scatter.py"), *script_args(tmp_path, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


FIGURES = ["learn_vs_true_loss_scatter", "learn_vs_true_loss_hist"] + [f"ax{i}_{k}" for i in range(3)
                                                                       for k in ("scatter", "hist")]
KEYS = {"gp", "hypernet_fixed", "hypernet_stochastic", "true_best", "n_train_tuples", "n_heldout", "seconds",
        "config"}


def check_outputs(out):
    for name in FIGURES:
        for ext in ("pdf", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    summary = json.loads((out / "results" / "learn_vs_true_loss_scatter.json").read_text())
    assert KEYS <= set(summary)
    assert summary["n_heldout"] == 64 - 25
    return summary


def test_quick_end_to_end_synthetic_and_replot(tmp_path):
    res = run_script(tmp_path, "--synthetic", "--table")
    assert res.returncode == 0, res.stderr
    check_outputs(tmp_path / "out")
    table = json.loads((tmp_path / "out" / "results" / "gp_vs_hypernet_table.json").read_text())
    assert table["budgets"] == [10, 25] and set(table["rows"]) == {"gp", "hypernet_fixed", "hypernet_stochastic",
                                                                    "true_best"}
    assert (tmp_path / "out" / "results" / "gp_vs_hypernet_table.tex").exists()
    for path in (tmp_path / "out").glob("*.png"):
        path.unlink()
    assert lvt.main(script_args(tmp_path, "--replot")) == 0  # redraw from the saved results only
    check_outputs(tmp_path / "out")


@pytest.mark.mnist
def test_quick_end_to_end_mnist(tmp_path, mnist_dir):
    res = run_script(tmp_path, "--data-dir", str(mnist_dir))
    assert res.returncode == 0, res.stderr
    summary = check_outputs(tmp_path / "out")
    zero_model_loss = 50 * 0.1 + np.log(0.1) + 0.5 * np.log(2 * np.pi)  # predicting 0 for one-hot targets
    assert 0.3 < summary["true_best"] < zero_model_loss - 0.05  # five Adam steps already help


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--n-train-tuples", "-3"], ["--n-models", "x"]])
def test_invalid_arguments_rejected(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as exc:
        lvt.main(script_args(tmp_path, "--synthetic", *args))
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_too_many_training_tuples_is_one_line_error(tmp_path, capsys):
    from common import run_main

    assert run_main(lvt.main, script_args(tmp_path, "--synthetic", "--n-train-tuples", "64")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_hyper_objective_equals_forming_every_weight_set(splits):
    """The reduced objective (basis predictions, 11x11 norm forms) equals the plain batched computation."""
    import autograd.numpy as anp

    from neural_network import hypernet_weights, identity, init_hypernet

    def direct(hyper_params, lambdas, xb, tb):
        params = unflatten_batch(hypernet_weights(hyper_params, lambdas, identity), [784, 10])
        losses = gaussian_nll(batched_mlp_predict(params, xb), tb) + class_norm_regulariser(params[0][0], lambdas)
        return anp.mean(losses)

    rs = np.random.RandomState(1)
    hyper = init_hypernet("linear", 10, 7850, 0.01, rs)
    lambdas = rs.uniform(-3, 3, (6, 10))
    args = (lambdas, splits.train_x[:100], splits.train_y[:100])
    assert lvt.hyper_objective(hyper, *args) == pytest.approx(direct(hyper, *args), rel=1e-12)
    g1, g2 = grad(lvt.hyper_objective)(hyper, *args), grad(direct)(hyper, *args)
    for a, b in zip(g1[0], g2[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
