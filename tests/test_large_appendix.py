"""hypernets_local_large_appendix on small synthetic data: random search against an independent closed-form
computation, data separation, the log-likelihood scale, the claims' verdict logic, the protocol end to end."""
import dataclasses
import json

import numpy as np
import pytest

import common
import hypernets_local_large_appendix as app
import references as refs
from common import step_rng
from large_fixtures import BLOCK, data, one_blas_thread, splits  # noqa: F401  (fixtures)


def small_config(**overrides):
    base = dict(block=BLOCK, n_test=BLOCK, iters=4, eval_every=1, diag_every=2, log_every=1000,
                random_log_every=1000)
    return dataclasses.replace(app.Config(), **{**base, **overrides})


def test_log_likelihood_scale():
    """NLL of N(t | y, 0.1) averaged over outputs = 50 MSE - 1.38364 (SPEC section 2)."""
    assert np.isclose(app.nll(0.0), np.log(0.1) + 0.5 * np.log(2 * np.pi))
    assert np.isclose(app.nll(0.0385), 0.54, atol=0.002)   # the appendix's hypernet valid ~0.54 in MSE terms


def test_random_search_is_best_so_far_of_closed_form_samples(splits):
    """Each sample: lambda uniform in the box, its model the closed form on the training block, scored on the
    validation block; the curve is the best so far and the test loss of that best sample."""
    config = small_config()
    state, step_fn, evaluate = app.make_random_search(splits, config)
    ridge = refs.ridge_problem(splits.train_x, splits.train_y)
    valids, tests, curve = [], [], []
    for i in range(5):
        state = step_fn(state, i)
        lam = config.init_lambda + config.random_halfwidth * step_rng(config.seed, i, app.STREAM_RANDOM).uniform(
            -1.0, 1.0, size=7850)
        assert np.all(np.abs(lam - config.init_lambda) <= config.random_halfwidth)
        w = refs.best_response(ridge, lam)
        valids.append(refs.linear_loss(w, splits.valid_x, splits.valid_y))
        tests.append(refs.linear_loss(w, splits.test_x, splits.test_y))
        curve.append(evaluate(state))
        assert np.isclose(state.last_valid, valids[-1], rtol=1e-12)
    best = np.minimum.accumulate(valids)
    assert np.allclose([c[0] for c in curve], best, rtol=1e-12)
    assert np.allclose([c[1] for c in curve], [tests[int(np.argmin(valids[:k + 1]))] for k in range(5)], rtol=1e-12)


def perturbed_test(data):
    images = data.test_images.copy()
    images[:BLOCK] = np.clip(images[:BLOCK] + 0.2 * np.random.RandomState(0).randn(BLOCK, 784), 0, 1)
    return data._replace(test_images=images)


@pytest.fixture(scope="module")
def small_run(data):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return app.run(small_config(), data)


def test_neither_method_reads_test_data(data, small_run):
    _, arrays = small_run
    _, other = app.run(small_config(), perturbed_test(data))
    for key in ("hyper_valid", "random_valid", "hyper_lambda", "random_best_lambda", "hyper_cosine"):
        np.testing.assert_array_equal(arrays[key], other[key])
    assert not np.array_equal(arrays["hyper_test"], other["hyper_test"])
    assert not np.array_equal(arrays["random_test"], other["random_test"])


def test_summary_carries_reference_and_diagnostics(splits, small_run):
    summary, arrays = small_run
    expected = refs.fixed_lambda_reference(np.full(7850, -7.0), splits)
    assert np.isclose(summary["reference"]["valid"], expected["valid"], rtol=1e-12)
    assert np.isclose(summary["reference"]["valid_nll"], app.nll(expected["valid"]))
    assert summary["hyper"]["steps"] == summary["random"]["steps"] == 4
    assert np.all(np.diff(arrays["random_valid"]) <= 0)        # best so far never rises
    assert -1 <= summary["hyper"]["cosine"]["mean"] <= 1 and arrays["hyper_diag_step"][-1] == 4


# --------------------------------------------------------------------------------------------------- claims

def fake_summary(hyper_valid, random_valid, tunes, cosine=0.0):
    m = lambda v: {"final_valid_nll": v, "final_test_nll": v + 0.06}
    return {"hyper": {**m(hyper_valid), "tunes": tunes, "exact_gain": 0.001 if tunes else 0.0,
                      "cosine": {"mean": cosine}},
            "random": m(random_valid), "reference": {"valid_nll": 0.67}}


def verdicts(summary):
    return {c.id: c.evaluate(summary)[1] for c in app.CLAIMS}


def test_an_untuned_lead_over_random_search_is_refuted():
    """Hyper-training ahead of random search only because lambda_hat_0 is good: refuted, not reproduced."""
    v = verdicts(fake_summary(0.54, 0.62, tunes=False))
    assert v["appendix-beats-random"] == "refuted" and v["appendix-tunes"] == "refuted"
    v = verdicts(fake_summary(0.54, 0.62, tunes=True, cosine=0.5))
    assert v["appendix-beats-random"] == "reproduced" and v["appendix-tunes"] == "reproduced"
    assert v["appendix-levels"] == "reproduced"
    assert verdicts(fake_summary(0.70, 0.62, tunes=True))["appendix-beats-random"] == "not reproduced"


# ------------------------------------------------------------------------------------------- end to end

def run_cli(*args):
    return common.main(app, ["--synthetic", *args])


def test_quick_end_to_end_and_replot(tmp_path, capsys):
    assert run_cli("--quick", "--out-dir", str(tmp_path)) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "results" / "hypernets_local_large_appendix.json").read_text())
    assert summary["budget"] == "cpu_seconds" and summary["n_hyperparameters"] == 7850
    assert summary["random"]["steps"] > 0 and summary["hyper"]["steps"] > 0
    assert all(isinstance(v, str) for v in app.tex_numbers(summary).values())
    for claim in app.CLAIMS:
        assert claim.evaluate(summary)[1] in common.VERDICTS
    pngs = [tmp_path / f"{stem}.png" for stem in ("hypernets_local_large_appendix",
                                                  "hypernets_local_large_appendix_diagnostics")]
    for png in pngs:
        assert (tmp_path / png.name.replace(".png", ".pdf")).is_file()
        png.unlink()
    assert run_cli("--replot", "--out-dir", str(tmp_path)) == 0
    assert all(png.stat().st_size > 10000 for png in pngs)


def test_fixed_iters_reproducible_in_one_process_or_in_parallel(tmp_path):
    """--jobs 1 (interleaved in one process) and --jobs 2 (a process per method) give the same bits."""
    arrays = []
    for jobs in (1, 2):
        d = tmp_path / str(jobs)
        assert run_cli("--quick", "--iters", "3", "--jobs", str(jobs), "--out-dir", str(d)) == 0
        with np.load(d / "results" / "hypernets_local_large_appendix.npz") as npz:
            arrays.append({k: npz[k] for k in npz.files})
        summary = json.loads((d / "results" / "hypernets_local_large_appendix.json").read_text())
        assert summary["parallel"]["jobs"] == jobs and summary["hyper"]["steps"] == summary["random"]["steps"] == 3
    for key in arrays[0]:
        if "seconds" not in key:
            assert np.array_equal(arrays[0][key], arrays[1][key]), key


def test_paper_budgets_and_invalid_arguments(tmp_path, capsys):
    assert app.budget_seconds(app.Config(paper_budgets=True)) == app.PAPER_SECONDS == 850.0
    for args in (["--seconds", "0"], ["--random-halfwidth", "-1"], ["--valid-block", "0"]):
        assert run_cli(*args, "--out-dir", str(tmp_path)) == 2, args
        assert capsys.readouterr().err.startswith("error: ")
