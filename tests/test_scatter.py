"""learn_vs_true_loss_scatter.py: hot loop vs autograd, ground truth on validation data only, forked workers
and their clean-up on signals, the cache (crafted bad files), surrogates, table, figures, claims, the driver."""
import dataclasses
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from autograd import grad

import common
import learn_vs_true_loss_scatter as lvt
from common import DivergenceError, ExperimentError
from conftest import CODE, child_pids
from data_loader import MNIST, scatter_splits, synthetic_mnist
from neural_network import batched_mlp_predict, class_norm_regulariser, gaussian_nll, mlp_predict, unflatten_batch
from optimizers import adam

TINY = dict(n_models=12, n_train_tuples=5, n_train_points=1500, n_valid_points=500, gt_steps=6, chunk_size=4,
            fixed_steps=5, stochastic_steps=5, eval_batch=5, log_every=1000, hyper_log_every=1000,
            table_budgets=(3, 5, 40))
QUIET = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def data():
    return synthetic_mnist()


@pytest.fixture(scope="module")
def splits(data):
    return scatter_splits(data, 1500, 500, 0)


def tiny(tmp_path=None, **kw):
    base = {**TINY, **({"cache_dir": str(tmp_path)} if tmp_path is not None else {})}
    return dataclasses.replace(lvt.Config(), **{**base, **kw})


def driver(*argv):
    """common.main in-process: (exit code, stdout, stderr) are checked by the callers via capsys."""
    return common.main(lvt, list(argv))


# ------------------------------------------------------------------------------------------ hot loop

def test_batched_trainer_equals_training_one_by_one(splits):
    config = tiny(float64=True, gt_steps=12)
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


def test_scatter_model_step_equals_its_autograd_reference(splits):
    """The hand-written step against autograd + textbook Adam, float64, over several steps (benchmark API)."""
    lambdas = lvt.sample_lambdas(lvt.Config())[:5]
    stack = lvt.scatter_step_stack(lambdas, dtype="float64")
    ref = lvt.scatter_step_stack(lambdas, reference=True, dtype="float64")
    rng = np.random.RandomState(0)
    for t in range(1, 16):
        offset = rng.randint(0, 1400)
        xb, tb = splits.train_x[offset:offset + 100], splits.train_y[offset:offset + 100]
        lvt.scatter_model_step(stack, xb, tb, t)
        lvt.scatter_model_step_reference(ref, xb, tb, t)
        for a, b in zip(stack.weights(), ref.weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    W0 = lvt.initial_elementary(lvt.Config())[0]
    assert np.max(np.abs(stack.weights()[0] - np.tile(W0.T, (5, 1)))) > 1e-4  # the weights really moved


def test_float32_training_is_close_to_float64(splits):
    lambdas = lvt.sample_lambdas(tiny())[:4]
    gram = lvt.make_gram(splits.valid_x, splits.valid_y)
    losses = [lvt.ground_truth_chunk_losses(lambdas, splits.train_x, splits.train_y, gram, tiny(float64=f), 0)
              for f in (False, True)]
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


def test_finite_divergence_is_caught(splits):
    """A step size that makes the data fit explode without reaching inf stops the run."""
    config = tiny(step_size=300.0, gt_steps=10, float64=True)
    with pytest.raises(DivergenceError, match="grew from"):
        lvt.train_ground_truth_chunk(lvt.sample_lambdas(config)[:2], splits.train_x, splits.train_y, config, 0)


# ------------------------------------------------------------------------- which data is read where

def test_ground_truth_is_scored_on_validation_data_and_trained_without_it(data, tmp_path, monkeypatch):
    """Test images never matter; validation images change the losses but not a single trained weight."""
    config = tiny(tmp_path, use_cache=False, table=False)
    valid_rows = slice(config.n_train_points, config.n_train_points + config.n_valid_points)
    seen = []
    real_rows, real_hyper = lvt.valid_losses_rows, lvt.hypernet_valid_losses
    monkeypatch.setattr(lvt, "valid_losses_rows", lambda rows, gram: (seen.append(("rows", rows.copy())),
                                                                      real_rows(rows, gram))[1])
    monkeypatch.setattr(lvt, "hypernet_valid_losses", lambda params, *a: (seen.append(("hyper", params)),
                                                                          real_hyper(params, *a))[1])

    def run(d):
        seen.clear()
        summary, arrays = lvt.run(config, d, log=QUIET)
        return summary, arrays, list(seen)

    base = run(data)
    test_changed = run(MNIST(data.n_train, data.train_images, data.train_labels,
                             np.random.RandomState(1).rand(*data.test_images.shape), data.test_labels))
    valid_changed = run(MNIST(data.n_train, _noise_rows(data.train_images, valid_rows), data.train_labels,
                              data.test_images, data.test_labels))
    for key in base[1]:
        np.testing.assert_array_equal(base[1][key], test_changed[1][key])
    assert not np.allclose(base[1]["true"], valid_changed[1]["true"])  # scored on the validation images
    assert len(base[2]) == len(valid_changed[2]) > 0
    for (kind, a), (_, b) in zip(base[2], valid_changed[2], strict=True):  # ... and trained without them
        if kind == "rows":
            np.testing.assert_array_equal(a, b)
        else:
            for x, y in zip(a[0], b[0], strict=True):
                np.testing.assert_array_equal(x, y)


def _noise_rows(images, rows):
    images = images.copy()
    images[rows] = np.random.RandomState(2).rand(*images[rows].shape)
    return images


# ------------------------------------------------------------------------------------ forked workers

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
    lam2, loss2 = lvt.compute_ground_truth(tiny(**kw), splits, jobs=2, log=QUIET)
    np.testing.assert_array_equal(lam2, lvt.sample_lambdas(tiny(**kw)))
    np.testing.assert_array_equal(loss1, loss2)
    assert loss1.shape == (128,) and np.all(np.isfinite(loss1)) and np.ptp(loss1) > 0


def test_jobs_capped_at_cpus_and_chunks_with_one_note(splits, capsys, monkeypatch):
    monkeypatch.setattr(lvt, "available_cpus", lambda: 2)
    assert lvt.effective_jobs(8, 100, lvt._note) == 2
    assert lvt.effective_jobs(8, 1, lvt._note) == 1
    assert lvt.effective_jobs(2, 100, lvt._note) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("note: --jobs 8 capped at") for line in err)
    monkeypatch.setattr(lvt, "available_cpus", lambda: 64)
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: (forks.append(1), real_fork())[1])
    lvt.compute_ground_truth(tiny(n_models=8, chunk_size=4), splits, jobs=16, log=QUIET)  # 2 chunks
    assert len(forks) == 2 and "capped at 2" in capsys.readouterr().err


def test_worker_failures_are_one_line_errors():
    with pytest.raises(ExperimentError, match="died while working on chunk"):
        with lvt.ForkedWorkers(2, lambda task: os.kill(os.getpid(), signal.SIGKILL)) as workers:
            list(workers.run(range(4)))
    with pytest.raises(DivergenceError, match="not finite"):
        with lvt.ForkedWorkers(2, lambda task: common.check_finite(np.nan, task, "x")) as workers:
            list(workers.run(range(4)))
    with pytest.raises(ExperimentError, match="ZeroDivisionError"):
        with lvt.ForkedWorkers(1, lambda task: 1 / 0) as workers:
            list(workers.run(range(2)))
    with lvt.ForkedWorkers(2, lambda task: task * task) as workers:
        assert sorted(workers.run(range(7))) == [(i, i * i) for i in range(7)]
        pids = [pid for pid, _ in workers.workers]
    assert not any(_alive(pid) for pid in pids)


def test_fork_failure_is_one_line_error(monkeypatch):
    calls = []

    def failing_fork():
        calls.append(1)
        if len(calls) > 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    real_fork = os.fork
    monkeypatch.setattr(os, "fork", failing_fork)
    with pytest.raises(ExperimentError, match="cannot start ground-truth worker 2 of 3.*--jobs 1"):
        lvt.ForkedWorkers(3, lambda task: task)
    assert child_pids(os.getpid()) == []  # the worker that did start was stopped


def _alive(pid):
    """Whether pid is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _debris(tmp_path, pids):
    """Temporary files of a run: anything in its private TMPDIR, and entries of /tmp or /dev/shm named after
    one of its processes (joblib's memmap folders and loky's semaphores carry the pid)."""
    private = [str(p) for p in (tmp_path / "tmpdir").rglob("*")]
    shared = [e for d in ("/tmp", "/dev/shm") for e in os.listdir(d) if any(str(pid) in e for pid in pids)]
    return private + shared


def _parallel_run(tmp_path, tag):
    """The script as a user starts it: a real --jobs 2 ground truth, from another folder. Its chunks take
    ~10 s or more each, so a worker that merely noticed its parent's end at its next task would be caught."""
    out = tmp_path / tag
    (tmp_path / "tmpdir").mkdir(exist_ok=True)
    cmd = [sys.executable, str(CODE / "learn_vs_true_loss_scatter.py"), "--quick", "--synthetic", "--jobs", "2",
           "--n-models", "256", "--chunk-size", "32", "--gt-steps", "4000", "--log-every", "1",
           "--out-dir", str(out), "--cache-dir", str(tmp_path / f"cache-{tag}")]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=env), out


def _wait_for_workers(proc, n=2, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = child_pids(proc.pid)
        if len(kids) >= n:
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the workers never started")


def _gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_parallel_run_leaves_nothing(tmp_path, sig, code):
    proc, out = _parallel_run(tmp_path, "sig")
    workers = _wait_for_workers(proc)
    time.sleep(random.uniform(0.0, 2.0))  # a random moment of the ground truth
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    lines = stderr.strip().splitlines()  # one error line, after any progress lines (one about every 10 s)
    assert lines[-1].startswith("error:") and all(line.startswith("ground truth: ") for line in lines[:-1]), stderr
    assert _gone_within(workers, 3.0), "worker processes outlived the run"
    assert _debris(tmp_path, [proc.pid, *workers]) == []  # no temporary folders, no semaphores
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert leftovers == []  # no partial output set
    cache = tmp_path / "cache-sig"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_sigkill_of_the_parent_takes_the_workers_down(tmp_path):
    proc, _ = _parallel_run(tmp_path, "kill")
    workers = _wait_for_workers(proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    proc.communicate(timeout=30)
    assert _gone_within(workers, 3.0), "worker processes outlived a SIGKILLed parent"
    assert _debris(tmp_path, [proc.pid, *workers]) == []


def test_workers_die_with_the_parent_without_prctl(monkeypatch):
    """The portable guard alone (a thread polling the parent's pid) also ends an orphaned worker."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # a parent that starts a worker and then dies at once
        try:
            import ctypes

            def no_prctl(*args, **kwargs):
                raise OSError("no prctl here")
            ctypes.CDLL = no_prctl  # only in this short-lived process
            workers = lvt.ForkedWorkers(1, lambda task: time.sleep(60))
            workers.workers[0][1].send(0)  # busy: it will not read the closed pipe for a minute
            os.write(w, str(workers.workers[0][0]).encode())
        finally:
            os._exit(0)
    os.close(w)
    worker = int(os.read(r, 64).decode())
    os.close(r)
    os.waitpid(middle, 0)
    assert _gone_within([worker], 3.0)


# ------------------------------------------------------------------------------------------- cache

def _counting(monkeypatch):
    calls = []
    real = lvt.compute_ground_truth
    monkeypatch.setattr(lvt, "compute_ground_truth", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_cache_used_other_settings_separate_and_corruption_rebuilt(splits, tmp_path, capsys, monkeypatch):
    config = tiny(tmp_path)
    lambdas, losses, _, cached = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    assert not cached
    path = lvt.cache_path(tmp_path, lvt.ground_truth_settings(config, lvt.data_digest(splits)))
    assert path.exists() and len(list(tmp_path.iterdir())) == 1
    calls = _counting(monkeypatch)
    got = lvt.get_ground_truth(config, splits, 1, log=QUIET)  # valid cache: used
    assert calls == [] and np.array_equal(got[1], losses) and got[3]
    got = lvt.get_ground_truth(dataclasses.replace(config, seed=3, train_tuples="drawn"), splits, 1, log=QUIET)
    assert calls == [] and got[3]  # the surrogates' seed does not touch the ground truth

    other = dataclasses.replace(config, gt_steps=config.gt_steps + 1)  # other settings: their own file
    got = lvt.get_ground_truth(other, splits, 1, log=QUIET)
    assert calls == [1] and not np.array_equal(got[1], losses) and len(list(tmp_path.iterdir())) == 2
    other_data = splits._replace(valid_x=splits.valid_x * 0.5)  # other data: their own file
    lvt.get_ground_truth(config, other_data, 1, log=QUIET)
    assert calls == [1, 1] and len(list(tmp_path.iterdir())) == 3
    assert capsys.readouterr().err == ""

    data = bytearray(path.read_bytes())
    i = data.find(np.ascontiguousarray(losses).tobytes()[:8])
    data[i + 3] ^= 0xFF  # flip a byte inside the stored losses
    path.write_bytes(bytes(data))
    calls.clear()
    got = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    err = capsys.readouterr().err
    assert calls == [1] and "rebuilding" in err and len(err.strip().splitlines()) == 1  # CRC or checksum
    np.testing.assert_array_equal(got[1], losses)

    path.write_bytes(path.read_bytes()[:200])  # truncated
    calls.clear()
    got = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    assert calls == [1] and "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(got[1], losses)

    calls.clear()
    lvt.get_ground_truth(dataclasses.replace(config, use_cache=False), splits, 1, log=QUIET)  # --no-cache
    assert calls == [1]


def _crafted(path, meta, lambdas, losses, extra=None, compressed=False):
    buf = io.BytesIO()
    arrays = {"lambdas": lambdas, "valid_losses": losses, **(extra or {})}
    (np.savez_compressed if compressed else np.savez)(buf, **({"meta": meta} if meta is not None else {}), **arrays)
    path.write_bytes(buf.getvalue())


def _good_meta(key_settings, lambdas, losses, **changes):
    """Metadata that is right for these arrays, with `changes` applied."""
    meta = {"settings": key_settings, "settings_hash": lvt.settings_hash(key_settings),
            "digest": lvt._arrays_digest({"lambdas": lambdas, "valid_losses": losses}), "seconds": 1.0, **changes}
    return np.array(json.dumps(meta))


CRAFTED = {
    "meta is a number": lambda s, lam, los: (np.array(5), lam, los),
    "meta is a JSON list": lambda s, lam, los: (np.array("[1, 2]"), lam, los),
    "meta is not JSON": lambda s, lam, los: (np.array("{not json"), lam, los),
    "meta has NaN": lambda s, lam, los: (np.array('{"seconds": NaN}'), lam, los),
    "meta is a 1-d array": lambda s, lam, los: (np.array(["a", "b"]), lam, los),
    "settings of the wrong type": lambda s, lam, los: (_good_meta(s, lam, los, settings=[1, 2]), lam, los),
    "hash of the wrong type": lambda s, lam, los: (_good_meta(s, lam, los, settings_hash=12), lam, los),
    "seconds is text": lambda s, lam, los: (_good_meta(s, lam, los, seconds="soon"), lam, los),
    "seconds is negative": lambda s, lam, los: (_good_meta(s, lam, los, seconds=-1), lam, los),
    "seconds is a bool": lambda s, lam, los: (_good_meta(s, lam, los, seconds=True), lam, los),
    "lambdas of the wrong shape": lambda s, lam, los: (_good_meta(s, lam[:-1], los), lam[:-1], los),
    "lambdas transposed": lambda s, lam, los: (_good_meta(s, lam.T.copy(), los), lam.T.copy(), los),
    "losses float32": lambda s, lam, los: (_good_meta(s, lam, los.astype(np.float32)), lam, los.astype(np.float32)),
    "losses 2-d": lambda s, lam, los: (_good_meta(s, lam, los[:, None]), lam, los[:, None]),
    "losses NaN": lambda s, lam, los: (_good_meta(s, lam, np.full_like(los, np.nan)), lam, np.full_like(los, np.nan)),
    "lambdas out of range": lambda s, lam, los: (_good_meta(s, lam * 10, los), lam * 10, los),
    "lambdas as text": lambda s, lam, los: (_good_meta(s, lam, los), lam.astype(str), los),
    "no meta": lambda s, lam, los: (None, lam, los),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_cache_is_rebuilt_with_one_warning(splits, tmp_path, capsys, monkeypatch, case):
    config = tiny(tmp_path)
    settings = lvt.ground_truth_settings(config, lvt.data_digest(splits))
    path = lvt.cache_path(tmp_path, settings)
    lambdas, losses, _, _ = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    _crafted(path, *CRAFTED[case](settings, lambdas, losses))
    calls = _counting(monkeypatch)
    got = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert calls == [1] and len(err) == 1 and err[0].startswith("warning:") and "rebuilding" in err[0], err
    np.testing.assert_array_equal(got[1], losses)
    assert lvt.load_ground_truth(path, settings)[0] is not None  # the rebuilt file is valid


def test_cache_with_extra_or_oversized_arrays_is_rebuilt(splits, tmp_path, capsys):
    config = tiny(tmp_path)
    settings = lvt.ground_truth_settings(config, lvt.data_digest(splits))
    path = lvt.cache_path(tmp_path, settings)
    lambdas, losses, _, _ = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    meta = _good_meta(settings, lambdas, losses)
    _crafted(path, meta, lambdas, losses, extra={"x": np.zeros(3)})
    assert "not a ground-truth cache" in lvt.load_ground_truth(path, settings)[1]
    _crafted(path, meta, lambdas, losses, extra={"valid_losses": np.zeros(50_000_000 // 8)}, compressed=True)
    assert "larger than" in lvt.load_ground_truth(path, settings)[1]  # a small file that would inflate
    path.write_bytes(b"PK\x03\x04 not a zip")
    assert "unreadable" in lvt.load_ground_truth(path, settings)[1]


def test_cache_path_that_cannot_be_written_is_a_warning(splits, tmp_path, capsys):
    config = tiny(tmp_path)
    settings = lvt.ground_truth_settings(config, lvt.data_digest(splits))
    lvt.cache_path(tmp_path, settings).mkdir()  # a directory where the file should be
    got = lvt.get_ground_truth(config, splits, 1, log=QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert not got[3] and len(err) == 2 and "cannot write" in err[1], err


def test_cache_dir_default_is_the_repository_cache():
    assert lvt.resolve_cache_dir(lvt.Config()) == lvt.REPO / "cache"
    assert str(lvt.resolve_cache_dir(lvt.Config(cache_dir="/x/y"))) == "/x/y"


# ----------------------------------------------------------------------------------- run, table, seeds

def test_run_summary_and_table(data, tmp_path):
    config = tiny(tmp_path, n_models=16)
    summary, arrays = lvt.run(config, data, log=QUIET)
    for name in lvt.MODELS:
        assert {"error_mean", "error_std", "error_median", "error_skew", "predicted_best_loss",
                "predicted_best_true_loss"} == set(summary[name])
        assert arrays[f"inferred_{name}"].shape == (11,)
        assert summary[name]["predicted_best_true_loss"] >= summary["true_best"]
    assert summary["n_heldout"] == 11 and summary["n_train_tuples"] == 5
    table = summary["table"]
    assert table["budgets"] == [3, 5]  # budgets that leave no held-out tuples are dropped
    assert table["rows"]["gp"][1] == summary["gp"]["predicted_best_true_loss"]
    lvt.plot(summary, arrays, tmp_path)
    tex = (tmp_path / "results" / "gp_vs_hypernet_table.tex").read_text()
    assert "True best" in tex and tex.count("\\\\") == 5
    assert "table" not in lvt.run(dataclasses.replace(config, table=False), data, log=QUIET)[0]


def test_seeds_vary_the_surrogates_over_one_ground_truth(data, tmp_path, monkeypatch):
    config = tiny(tmp_path, n_models=40, table=False)
    first = lvt.run(config, data, log=QUIET)
    calls = _counting(monkeypatch)
    other = lvt.run(dataclasses.replace(config, seed=8), data, log=QUIET)
    drawn = lvt.run(dataclasses.replace(config, seed=8, train_tuples="drawn"), data, log=QUIET)
    assert calls == []  # one ground truth for every surrogate seed
    assert other[0]["ground_truth_cached"] and drawn[0]["ground_truth_cached"]
    np.testing.assert_array_equal(first[1]["true"], other[1]["true"])  # same held-out tuples ...
    assert not np.array_equal(first[1]["inferred_hypernet_stochastic"], other[1]["inferred_hypernet_stochastic"])
    assert not np.array_equal(first[1]["true"], drawn[1]["true"])  # ... unless drawn with the seed
    order = lvt.tuple_order(dataclasses.replace(config, seed=8, train_tuples="drawn"))
    assert sorted(order) == list(range(40)) and list(order[:5]) != list(range(5))
    assert list(lvt.tuple_order(config)) == list(range(40))


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


# -------------------------------------------------------------------------------- figures, claims

def _captured_figures(monkeypatch):
    import plotting

    figs = []
    real_close = plotting.close
    monkeypatch.setattr(plotting, "close", lambda fig: (figs.append(fig), real_close(fig))[1])
    return figs


def _arrays(center, spread, stochastic_offset=0.0, n=500, seed=0):
    rs = np.random.RandomState(seed)
    true = center + spread * rs.rand(n)
    return {"true": true, "inferred_gp": true - 0.03 + 0.02 * rs.randn(n),
            "inferred_hypernet_fixed": true + 0.1 * rs.rand(n) ** 3,
            "inferred_hypernet_stochastic": true + stochastic_offset + 0.01 * rs.randn(n)}


def test_paper_axes_at_default_scale_fitted_axes_for_quick_losses(tmp_path, monkeypatch):
    figs = _captured_figures(monkeypatch)
    lvt.plot({}, _arrays(0.6, 0.3), tmp_path / "paper")
    scatter, hist = figs
    for ax in scatter.axes:
        assert ax.get_xlim() == lvt.EXTENT and ax.get_ylim() == lvt.EXTENT
    assert all(ax.get_xlim() == lvt.ERROR_RANGE for ax in hist.axes)
    figs.clear()
    quick = _arrays(2.15, 0.15, -0.5)  # like --quick: losses near 2.2, stochastic errors near -0.5
    lvt.plot({}, quick, tmp_path / "quick")
    scatter, hist = figs
    for ax, name in zip(scatter.axes, lvt.MODELS, strict=True):
        lo, hi = ax.get_xlim()
        assert ax.get_ylim() == (lo, hi)
        for values in (quick["true"], quick[f"inferred_{name}"]):
            assert np.mean((values >= lo) & (values <= hi)) >= 0.95
        assert hi - lo < 1.0  # fitted, not merely widened
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2
    errors = np.concatenate([quick[f"inferred_{m}"] - quick["true"] for m in lvt.MODELS])
    for ax in hist.axes:
        lo, hi = ax.get_xlim()
        assert np.mean((errors >= lo) & (errors <= hi)) >= 0.95 and hi - lo < 1.0


def test_claims_and_tex_numbers_on_the_committed_numbers():
    s = {"gp": {"error_mean": -0.039, "error_std": 0.089, "error_median": -0.04, "error_skew": 0.1,
                "predicted_best_true_loss": 0.6997, "predicted_best_loss": 0.6},
         "hypernet_fixed": {"error_mean": 0.12, "error_std": 0.131, "error_median": 0.08, "error_skew": 1.5,
                            "predicted_best_true_loss": 0.616, "predicted_best_loss": 0.7},
         "hypernet_stochastic": {"error_mean": 0.052, "error_std": 0.046, "error_median": 0.05, "error_skew": 0.2,
                                 "predicted_best_true_loss": 0.5982, "predicted_best_loss": 0.65},
         "true_best": 0.5932, "n_train_tuples": 25, "n_heldout": 10215, "seconds": 30.0,
         "ground_truth_seconds": 520.0, "ground_truth_cached": True,
         "table": {"budgets": [10, 25, 100, 250, 1000],
                   "rows": {"gp": [0.955, 0.700, 0.599, 0.616, 0.617], "hypernet_fixed": [0.718, 0.616, 0.605, 0.599,
                                                                                          0.599],
                            "hypernet_stochastic": [0.598] * 5, "true_best": [0.593] * 5}},
         "config": dataclasses.asdict(lvt.Config())}
    verdicts = {c.id: c.evaluate(s) for c in lvt.CLAIMS}
    assert all(v in common.VERDICTS for _, v in verdicts.values())
    assert verdicts["fig6-gp-under"][1] == "reproduced"
    assert verdicts["fig6-fixed-over"][1] == "reproduced"
    assert verdicts["fig6-stochastic-centred"][1] == "partly"  # tightest, but centred on +0.05
    assert verdicts["fig6-stochastic-best"][1] == "reproduced"
    assert verdicts["table-100"] == ("0.599 / 0.605 / 0.598", "reproduced")
    assert verdicts["table-10"][1] == "not reproduced"
    flipped = {**s, "gp": {**s["gp"], "error_mean": 0.02, "error_median": 0.01}}
    assert lvt.CLAIMS[0].evaluate(flipped)[1] == "not reproduced"
    no_table = {k: v for k, v in s.items() if k != "table"}
    assert lvt.CLAIMS[-1].evaluate(no_table) == ("not run", "not reproduced")
    numbers = lvt.tex_numbers(s)
    main_tex = (CODE.parent / "paper" / "main.tex").read_text()
    used = set(re.findall(r"\\(Scatter[A-Za-z]+)", main_tex))
    assert used <= set(numbers), used - set(numbers)
    assert numbers["ScatterGPBiasWord"] == "under-predicts" and numbers["ScatterGTDtype"] == "float32"


# ------------------------------------------------------------------------------------------- driver

def script_args(tmp_path, *extra):
    return ["--quick", "--synthetic", "--n-models", "64", "--gt-steps", "5", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


FIGURES = ["learn_vs_true_loss_scatter", "learn_vs_true_loss_hist"] + [f"ax{i}_{k}" for i in range(3)
                                                                       for k in ("scatter", "hist")]


def check_outputs(out, n_models=64):
    for name in FIGURES:
        for ext in ("pdf", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    summary = json.loads((out / "results" / "learn_vs_true_loss_scatter.json").read_text())
    assert {"gp", "hypernet_fixed", "hypernet_stochastic", "true_best", "n_heldout", "table", "provenance"} \
        <= set(summary)
    assert summary["n_heldout"] == n_models - 25
    assert (out / "results" / "gp_vs_hypernet_table.tex").exists()
    return summary


def test_quick_end_to_end_by_path_and_replot(tmp_path):
    cmd = [sys.executable, str(CODE / "learn_vs_true_loss_scatter.py"), *script_args(tmp_path), "--jobs", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = check_outputs(tmp_path / "out")
    assert summary["table"]["budgets"] == [10, 25]
    pdf = (tmp_path / "out" / "learn_vs_true_loss_scatter.pdf").read_bytes()
    for path in (tmp_path / "out").glob("*.png"):
        path.unlink()
    (tmp_path / "out" / "results" / "gp_vs_hypernet_table.tex").unlink()
    assert driver("--out-dir", str(tmp_path / "out"), "--replot") == 0  # redraw from the saved results only
    check_outputs(tmp_path / "out")
    assert (tmp_path / "out" / "learn_vs_true_loss_scatter.pdf").read_bytes() == pdf


@pytest.mark.mnist
def test_quick_end_to_end_mnist(tmp_path, mnist_dir, capsys):
    args = [a for a in script_args(tmp_path) if a != "--synthetic"]
    assert driver(*args, "--data-dir", str(mnist_dir)) == 0, capsys.readouterr().err
    summary = check_outputs(tmp_path / "out")
    zero_model_loss = 50 * 0.1 + np.log(0.1) + 0.5 * np.log(2 * np.pi)  # predicting 0 for one-hot targets
    assert 0.3 < summary["true_best"] < zero_model_loss - 0.05  # five Adam steps already help


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--n-train-tuples", "-3"], ["--n-models", "x"],
                                  ["--seed", str(2**32)], ["--n-train-tuples", "64"], ["--lambda-low", "5"],
                                  ["--train-tuples", "some"], ["--n-models", str(10**12)],
                                  ["--batch-size", "2000"], ["--table-budgets", ","],
                                  ["--n-models", "3000000", "--n-train-tuples", "2000000"]])
def test_invalid_arguments_rejected_in_one_line(tmp_path, args, capsys):
    assert driver(*script_args(tmp_path), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_help_lists_old_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        common.build_parser(lvt).parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--jobs", "--no-cache", "--cache-dir", "--n-train-tuples", "--n-models", "--gt-steps", "--float64",
                 "--table", "--log-every", "--seed", "--gt-seed", "--train-tuples"):
        assert flag in text, flag


def test_dask_backend_end_to_end_equals_local(tmp_path, capsys):
    """--backend dask --scheduler <a 2-process LocalCluster> through the driver: the ground truth (the cache's
    losses) and every held-out prediction equal the local --jobs 1 run's, bit for bit."""
    pytest.importorskip("distributed")
    from test_scaleout import local_cluster  # the same 2-process cluster, in a child process

    def run(tag, *extra):
        args = ["--quick", "--synthetic", "--no-table", "--out-dir", str(tmp_path / tag), "--cache-dir",
                str(tmp_path / f"cache-{tag}"), *extra]
        assert driver(*args) == 0, capsys.readouterr().err
        (cache,) = (tmp_path / f"cache-{tag}").glob("*.npz")
        with np.load(cache) as gt, np.load(tmp_path / tag / "results" / f"{lvt.NAME}.npz") as res:
            return gt["valid_losses"], gt["lambdas"], dict(res)

    local = run("local")
    with local_cluster() as address:
        remote = run("dask", "--backend", "dask", "--scheduler", address)
    assert "on the dask cluster at tcp://127.0.0.1:" in capsys.readouterr().out
    assert local[0].shape == (lvt.QUICK["n_models"],) and np.ptp(local[0]) > 0
    assert local[0].tobytes() == remote[0].tobytes() and local[1].tobytes() == remote[1].tobytes()
    assert local[2].keys() == remote[2].keys()
    for name in local[2]:
        assert local[2][name].tobytes() == remote[2][name].tobytes(), name


def test_dask_backend_needs_a_scheduler_and_reports_an_unreachable_one(tmp_path, capsys):
    import socket

    assert driver(*script_args(tmp_path), "--backend", "dask") == 2
    assert capsys.readouterr().err.strip() == ("error: --backend dask needs --scheduler ADDRESS (e.g. "
                                               "tcp://host:8786), the address of a running dask scheduler")
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert driver(*script_args(tmp_path), "--scheduler", f"tcp://127.0.0.1:{port}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the dask scheduler at tcp://127.0.0.1:{port}")
