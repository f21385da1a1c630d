"""compare_number_layers diagnostics (issue 10 item 2): the true hypergradient of the deeper models (implicit
differentiation at L-BFGS-converged weights) against finite differences of the converged validation loss on a tiny
MLP, the data each part reads, the cosine's wiring and sign (a hypernetwork equal to the exact best-response
expansion scores +1), the checkpoints, the claim and an end-to-end run."""
import dataclasses
import json

import numpy as np
import pytest

import common
import compare_number_layers as layers
import references as R
from data_loader import Splits
from large_fixtures import one_blas_thread  # noqa: F401  (autouse fixture: one BLAS thread)
from per_weight_decay import Alg3Settings, HyperProblem, decay_objective, mse_loss
from test_references import MLP, P_MLP, newton, teacher_data, tiny_mlp_problem

TINY = dataclasses.replace(layers.Config(), **layers.QUICK)
# tight settings for the tiny MLP: L-BFGS as far as it goes (|gradient| ~1e-8), CG to rounding
TIGHT = dataclasses.replace(TINY, diag_lbfgs_evals=5000, diag_refine_evals=5000, diag_gtol=1e-11, diag_cg_iters=500,
                            diag_cg_tol=1e-13)


@pytest.fixture(scope="module")
def tiny():
    """Splits of a smooth tiny-MLP problem (teacher data, test_references), lambda (P,), w*(lambda) to 1e-12."""
    rs = np.random.RandomState(3)
    teacher, xt, yt, xv, yv, lam, w = tiny_mlp_problem(rs)
    xs, ys = teacher_data(rs, teacher, 20)
    return Splits(xt, yt, xv, yv, xs, ys), lam, w


def checkpoint(lam, phi=None, step=0):
    return {"step": step, "seconds": 0.0, "lam": np.array(lam, dtype=float), "phi": phi}


def converged_valid(splits, lam, w):
    w_lam, grad_max = newton(R.MLPObjective(MLP, splits.train_x, splits.train_y, lam), w)
    assert grad_max < 1e-12
    return R.MLPObjective(MLP, splits.valid_x, splits.valid_y).value(w_lam)


def test_true_hypergradient_of_a_deeper_model_equals_finite_differences(tiny):
    """From a perturbed warm start, L-BFGS then implicit differentiation give dL_V(w*(lambda))/dlambda: central
    differences of the re-converged validation loss on coordinates of both layers."""
    splits, lam, w = tiny
    start = w + 1e-3 * np.random.RandomState(4).randn(P_MLP)
    [(got, info)] = layers.true_hypergradients(MLP, [checkpoint(lam)], splits, TIGHT, start, log=lambda line: None)
    assert info["method"] == "implicit differentiation" and info["lbfgs_evaluations"] > 1
    assert info["train_grad_max"] < 1e-7 and info["cg_residual_undamped"] < 1e-9
    assert info["exact_valid"] == pytest.approx(converged_valid(splits, lam, w), rel=1e-6)
    h, coords = 1e-3, [1, 13, 24, 29, 35, 41]
    fd = np.array([(converged_valid(splits, lam + h * e, w) - converged_valid(splits, lam - h * e, w)) / (2 * h)
                   for e in np.eye(P_MLP)[coords]])
    assert np.min(np.abs(fd)) > 1e-4
    np.testing.assert_allclose(got[coords], fd, rtol=1e-4)


def test_true_hypergradient_reads_training_and_validation_data_never_test(tiny):
    splits, lam, w = tiny
    rs = np.random.RandomState(6)
    run = lambda s: layers.true_hypergradients(MLP, [checkpoint(lam)], s, TIGHT, w, log=lambda line: None)[0][0]
    base = run(splits)
    np.testing.assert_array_equal(run(splits._replace(test_x=rs.randn(*splits.test_x.shape))), base)
    assert R.cosine(run(splits._replace(valid_y=rs.randn(*splits.valid_y.shape))), base) < 0.99
    assert R.cosine(run(splits._replace(train_y=splits.train_y + 0.3 * rs.randn(*splits.train_y.shape))), base) < 0.99


def test_true_hypergradient_warm_starts_later_checkpoints(tiny):
    splits, lam, w = tiny
    config = dataclasses.replace(TIGHT, diag_refine_evals=0)
    cps = [checkpoint(lam), checkpoint(lam + 1e-3, step=5)]
    (g0, i0), (g1, i1) = layers.true_hypergradients(MLP, cps, splits, config, w, log=lambda line: None)
    assert i1["lbfgs_evaluations"] == 0 and i0["train_grad_max"] < 1e-10
    # no refinement at the second checkpoint: its w* is the first one's, no longer stationary at the new lambda
    assert i1["train_grad_max"] > 10 * i0["train_grad_max"]


def test_linear_model_uses_the_closed_form(synthetic):
    from data_loader import small_splits

    splits = small_splits(synthetic, 200, 150, 100)
    lam = -6.0 + 0.1 * np.random.RandomState(2).randn(7850)
    [(got, info)] = layers.true_hypergradients((784, 10), [checkpoint(lam)], splits, TINY, None)
    exact, _, valid = R.exact_hypergradient(R.ridge_problem(splits.train_x, splits.train_y), lam, splits.valid_x,
                                            splits.valid_y)
    np.testing.assert_array_equal(got, exact)
    assert info == {"method": "closed form", "exact_valid": valid}


def best_response_hypernet(splits, lam, w):
    """A linear hypernetwork [P, P] equal to the first-order expansion of w*(lambda) at lam: bias w*(lam) and weight
    (dw*/dlambda)' = (-H^{-1} diag(2 exp(lam) w))' (input lambda - lam)."""
    hvp = R.MLPObjective(MLP, splits.train_x, splits.train_y, lam).hessian(w)
    H = np.array([hvp(e) for e in np.eye(P_MLP)])
    jac = -np.linalg.solve(H, np.diag(2.0 * np.exp(lam) * w))  # (P, H) dw*/dlambda
    return [(jac.T.copy(), w.copy())]


def test_a_hypernetwork_along_the_best_response_scores_cosine_one_and_its_reverse_minus_one(tiny):
    splits, lam, w = tiny
    problem = HyperProblem(decay_objective(MLP), mse_loss(MLP), splits.train_x, splits.train_y, splits.valid_x,
                           splits.valid_y, P_MLP, P_MLP)
    settings = Alg3Settings(hypernet_kind="linear", input_offset=lam)  # the hypernetwork's input is lambda - lam
    phi = best_response_hypernet(splits, lam, w)
    hand = {"start_lambda_valid": 0.0, "start_lambda_test": 0.0}
    result, arrays = layers.diagnose(MLP, [checkpoint(lam, phi)], splits, TIGHT, settings, problem, w, hand,
                                     log=lambda line: None)
    assert result["cosine_start"] == pytest.approx(1.0, abs=1e-8)
    reverse = [(-phi[0][0], phi[0][1])]
    result, _ = layers.diagnose(MLP, [checkpoint(lam, reverse)], splits, TIGHT, settings, problem, w, hand,
                                log=lambda line: None)
    assert result["cosine_start"] == pytest.approx(-1.0, abs=1e-8)
    moved = lam - TIGHT.init_lambda
    assert result["lambda_shift"]["max_abs"] == pytest.approx(np.max(np.abs(moved))) and list(arrays) == [
        f"6-4-3_diag_{f}" for f in ("step", "seconds", "cosine", "exact_valid", "lambda_moved_rms")]


def test_checkpoint_steps_are_evenly_spaced_on_evaluation_steps():
    config = dataclasses.replace(TINY, num_iters=20, eval_every=2, diag_checkpoints=4)
    assert layers.checkpoint_steps(config, floor=0) == [0, 6, 14]
    budget = dataclasses.replace(TINY, num_iters=None, eval_every=5, diag_checkpoints=3)
    assert layers.checkpoint_steps(budget, floor=190) == [0, 95]
    assert layers.checkpoint_steps(dataclasses.replace(budget, diag_checkpoints=2), floor=190) == [0]


def test_lambda_summary():
    lam = np.array([-7.0, -6.9, -7.2, -7.0])
    s = layers.lambda_summary(lam, -7.0)
    assert s["max_abs"] == pytest.approx(0.2) and s["rms"] == pytest.approx(np.sqrt(0.05 / 4))
    assert s["percentiles"]["50"] == pytest.approx(0.0) and s["mean_abs"] == pytest.approx(0.075)


def diag_summary(cosines, half=0.9):
    """A summary with the given mean cosines per model and trained checkpoints whose CG half-way cosine is half."""
    rows = [{"step": 0}, {"step": 10, "half_cosine": half}]
    return {"models": {name: {"diagnostics": {"cosine_mean": c, "checkpoints": rows}}
                       for name, c in zip(("784-10", "784-100-10", "784-100-100-10"), cosines, strict=True)}}


def test_direction_claim_follows_the_cosines():
    claim = {c.id: c for c in layers.CLAIMS}["layers-direction"]
    zero, aligned = layers.large.COSINE_ZERO, layers.large.COSINE_ALIGNED
    assert claim.evaluate(diag_summary([0.9, 0.02, -0.03]))[1] == "refuted"  # the linear model does not count
    assert claim.evaluate(diag_summary([0.0, -0.5, -0.3]))[1] == "refuted"   # pointing uphill
    assert claim.evaluate(diag_summary([0.0, 0.5, 0.02]))[1] == "partly"
    assert claim.evaluate(diag_summary([0.0, zero, aligned]))[1] == "partly"    # aligned is above zero only
    assert claim.evaluate(diag_summary([0.0, zero, zero]))[1] == "refuted"      # the bands are strict
    value, verdict = claim.evaluate(diag_summary([0.0, 0.6, aligned + 0.1]))
    assert verdict == "reproduced" and value == f"+0.600 / {aligned + 0.1:+.3f}"
    # an unstable reference direction cannot refute: the diagnostic could not tell
    assert claim.evaluate(diag_summary([0.0, 0.02, -0.03], half=0.5))[1] == "not reproduced"


def test_quick_run_records_diagnostics_and_draws_the_companion(tmp_path, capsys):
    capsys.readouterr()
    code = common.main(layers, ["--synthetic", "--quick", "--iters", "3", "--out-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "results" / "compare_number_layers.json").read_text())
    for name, m in summary["models"].items():
        d = m["diagnostics"]
        assert [c["step"] for c in d["checkpoints"]] == [0, 2, 3]  # start, one between (diag_checkpoints 3), end
        assert d["cosine_mean"] == pytest.approx(np.mean([c["cosine"] for c in d["checkpoints"][1:]]))
        assert d["lambda_shift"]["rms"] == pytest.approx(m["lambda_moved_rms"], rel=1e-12)
        assert d["checkpoints"][0]["lambda_moved_max"] == 0.0
        assert d["reference"]["valid"] == m["hand_tuned"]["start_lambda_valid"]
        assert d["method"] == ("closed form" if name == "784-10" else "implicit differentiation")
        assert d["cpu_seconds"] > 0
    deeper = summary["models"]["784-20-20-10"]["diagnostics"]["checkpoints"]
    assert all(c["cg_iterations"] <= TINY.diag_cg_iters for c in deeper)
    # the L-BFGS caps (checked between iterations: a line search may overshoot by a few evaluations)
    assert deeper[0]["lbfgs_evaluations"] <= TINY.diag_lbfgs_evals + 3
    assert all(0 < c["lbfgs_evaluations"] <= TINY.diag_refine_evals + 3 for c in deeper[1:])
    assert (tmp_path / "compare_number_layers_diagnostics.png").exists()
    assert (tmp_path / "compare_number_layers_diagnostics.pdf").exists()
    numbers = layers.tex_numbers(summary)
    assert {"LayersTwoCosine", "LayersThreeCosineFinal", "LayersTwoCGResidual"} <= set(numbers)
