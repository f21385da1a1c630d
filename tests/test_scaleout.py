"""scaleout.py: the scatter ground truth's chunks on a 2-process dask LocalCluster equal the local --jobs 1 run
bit for bit, the shared arrays reach each worker once, one BLAS thread in the workers, one-line errors."""
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

import learn_vs_true_loss_scatter as lvt
import scaleout
from common import ExperimentError
from data_loader import scatter_splits, synthetic_mnist

distributed = pytest.importorskip("distributed")

GT = dict(n_models=24, n_train_points=1500, n_valid_points=500, gt_steps=30, chunk_size=4, log_every=1000)


def gt_chunk(chunk, shared):
    """One ground-truth chunk of the scatter experiment: chunk = (index, lambdas (K, 10), config)."""
    c, lambdas, config = chunk
    return lvt.ground_truth_chunk_losses(lambdas, shared["train_x"], shared["train_y"], shared["gram"], config, c)


def chunks_and_shared(config, splits):
    """The scatter script's chunks (index, lambda rows, config) and its shared arrays, as compute_ground_truth
    builds them."""
    lambdas = lvt.sample_lambdas(config)
    starts = range(0, config.n_models, config.chunk_size)
    chunks = [(c, lambdas[s:s + config.chunk_size], config) for c, s in enumerate(starts)]
    shared = {"train_x": np.ascontiguousarray(splits.train_x, dtype=np.float32),
              "train_y": np.ascontiguousarray(splits.train_y, dtype=np.float32),
              "gram": lvt.make_gram(splits.valid_x, splits.valid_y)}
    return chunks, shared


def calls_and_pid(chunk, shared):
    """How many tasks have used this worker's copy of `shared` so far, and the worker's pid."""
    shared["calls"] = shared.get("calls", 0) + 1
    return shared["calls"], os.getpid()


def threads_inside(chunk, shared):
    return scaleout.blas_threads()


def fails(chunk, shared):
    if chunk == 2:
        raise ZeroDivisionError("boom")
    return chunk


@pytest.fixture(scope="module")
def splits():
    return scatter_splits(synthetic_mnist(), 1500, 500, 0)


CLUSTER_SCRIPT = """
import logging, sys
from distributed import LocalCluster
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the test closes our stdin
"""


class Cluster(NamedTuple):
    scheduler_address: str


@contextlib.contextmanager
def local_cluster():
    """A 2-process LocalCluster on 127.0.0.1 in a child process (this process only holds clients, so no dask
    state leaks into later tests' forked workers): yields its scheduler address."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the cluster can import code/ and tests/
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as address:
        yield Cluster(address)


def test_dask_ground_truth_is_bit_identical_to_local_jobs_1(cluster, splits):
    config = dataclasses.replace(lvt.Config(), **GT)
    local = lvt.compute_ground_truth(config, splits, jobs=1, log=lambda s: None)[1]  # the script's own path
    chunks, shared = chunks_and_shared(config, splits)
    seen = []
    out = scaleout.map_chunks(gt_chunk, chunks, shared, backend="dask", scheduler=cluster.scheduler_address,
                              on_result=lambda i, r: seen.append(i))
    assert seen == list(range(len(chunks)))  # reported in chunk order
    dask_losses = np.concatenate(out)
    assert dask_losses.dtype == local.dtype and dask_losses.shape == (config.n_models,)
    assert dask_losses.tobytes() == local.tobytes()
    inline = np.concatenate(scaleout.map_chunks(gt_chunk, chunks, shared, backend="local", jobs=1))
    assert inline.tobytes() == local.tobytes()


def test_shared_data_reaches_each_worker_once_and_blas_is_single_threaded(cluster):
    shared = {"x": np.zeros(50_000)}  # 400 kB: large enough that joblib would otherwise ship it per task
    out = scaleout.map_chunks(calls_and_pid, range(12), shared, scheduler=cluster.scheduler_address)
    per_worker = {}
    for calls, pid in out:
        per_worker.setdefault(pid, []).append(calls)
    assert len(per_worker) == 2  # both worker processes took part
    for counts in per_worker.values():  # one copy per worker, reused by every task there (a copy replicated
        c = sorted(counts)                # from the other worker may already carry its first counts)
        assert c == list(range(c[0], c[0] + len(c))) and len(c) >= 2
    assert "calls" not in shared  # the caller's dict was never touched: the workers hold their own copy
    threads = scaleout.map_chunks(threads_inside, range(4), {}, scheduler=cluster.scheduler_address)
    assert all(threads) and all(n == 1 for t in threads for n in t.values())


def test_worker_failure_is_one_line_naming_the_chunk(cluster):
    with pytest.raises(ExperimentError, match=r"^chunk 2 failed: ZeroDivisionError: boom$"):
        scaleout.map_chunks(fails, range(5), {}, scheduler=cluster.scheduler_address)
    assert scaleout.map_chunks(fails, [0, 1], {}, scheduler=cluster.scheduler_address) == [0, 1]  # still usable


def test_unreachable_scheduler_is_one_line_within_the_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ExperimentError, match=rf"^cannot reach the dask scheduler at tcp://127.0.0.1:{port} "
                                              rf"within {scaleout.CONNECT_TIMEOUT_SECONDS} s \([^\n]*\)$"):
        scaleout.map_chunks(fails, [0], {}, backend="dask", scheduler=f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < scaleout.CONNECT_TIMEOUT_SECONDS + 10


def test_backend_choice():
    assert scaleout.resolve_backend("local", "") == "local"
    assert scaleout.resolve_backend("local", "tcp://h:8786") == "dask"  # an address implies the cluster
    with pytest.raises(ExperimentError, match="needs --scheduler ADDRESS"):
        scaleout.resolve_backend("dask", "")
    with pytest.raises(ExperimentError, match="unknown backend"):
        scaleout.resolve_backend("ray", "")
    with pytest.raises(ExperimentError, match="needs a process pool"):
        scaleout.map_chunks(fails, [0, 1], {}, jobs=2)


def test_local_pool_results_in_chunk_order():
    class Reversed:  # a ForkedWorkers-like pool that finishes the tasks in reverse order
        def __init__(self, n, work):
            self.work = work

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, tasks):
            for t in reversed(list(tasks)):
                yield t, self.work(t)

    assert scaleout.map_chunks(fails, [0, 1, 3], {}, jobs=2, pool=Reversed) == [0, 1, 3]


def test_cluster_without_the_code_is_one_line_not_a_hang(cluster):
    client = scaleout.connect(cluster.scheduler_address)
    try:
        scaleout.check_imports(client, cluster.scheduler_address, ["scaleout", "common"])  # this cluster has them
        with pytest.raises(ExperimentError, match=r"^the dask scheduler at tcp://127.0.0.1:\d+ cannot import this "
                                                  r"project's code \(No module named 'no_such_module'\); start"):
            scaleout.check_imports(client, cluster.scheduler_address, ["scaleout", "no_such_module"])
    finally:
        client.close()


def medium_run(config, data, **kwargs):
    """A medium run's summary and its random-search and BO arrays (per evaluation), without figures."""
    import hypernets_local_medium as med

    summary, arrays = med.run(config, data, log=lambda line: None, **kwargs)
    return summary, {k: np.asarray(v).tobytes() for k, v in arrays.items()
                     if k.startswith(("random_", "bayesopt_")) and "seconds" not in k}


def test_medium_baseline_batches_on_the_cluster_are_bit_identical_to_jobs_1(cluster):
    """hypernets_local_medium --scheduler: random search's and BO's batches train on the 2 workers (split across
    them), with the same bits as --jobs 1 and the workers' CPU seconds on the methods' clocks."""
    import hypernets_local_medium as med

    config = dataclasses.replace(med.Config(), **{**med.QUICK, "num_iters": 2, "search_iters": 2, "rescore_steps": 20})
    data = synthetic_mnist()
    local, local_arrays = medium_run(config, data, jobs=1)
    dask, dask_arrays = medium_run(dataclasses.replace(config, scheduler=cluster.scheduler_address), data)
    assert dask["backend"] == "dask" and dask["workers"] == 2 and local["workers"] == 1
    assert sorted(dask_arrays) == sorted(local_arrays) and "random_eval_valid" in dask_arrays
    assert dask_arrays == local_arrays  # every evaluation's lambdas, validation and test loss, bit for bit
    for method in ("random", "bayesopt"):
        a, b = dict(local["methods"][method]), dict(dask["methods"][method])
        assert a.pop("worker_cpu_seconds") == 0 and b.pop("worker_cpu_seconds") > 0
        a.pop("runtime_seconds"), b.pop("runtime_seconds")
        assert a == b
    assert local["rescored"] == dask["rescored"]  # the best lambdas, retrained alike


def test_a_script_run_as_main_is_checked_by_its_file_name(monkeypatch):
    """A chunk function defined in a script run as `python script.py` lives in __main__; the import check must
    still name a module the workers can import (it used to skip the check altogether)."""
    import types

    fake_main = types.ModuleType("__main__")
    fake_main.__file__ = "/somewhere/code/hypernets_local_medium.py"
    monkeypatch.setitem(sys.modules, "__main__", fake_main)

    def chunk_fn(chunk, shared):
        return chunk

    chunk_fn.__module__ = "__main__"
    assert scaleout._module_name(chunk_fn) == "hypernets_local_medium"
    assert scaleout._module_name(calls_and_pid) == calls_and_pid.__module__
