"""Run independent chunks of work here (inline or in a local process pool) or on a dask.distributed cluster.

    results = map_chunks(fn, chunks, shared, backend="dask", scheduler="tcp://host:8786")
    with ChunkPool(shared, backend, scheduler, jobs, pool) as chunks:   # many map calls, one set-up
        for step in ...: results = chunks.map(fn, step_chunks)

fn(chunk, shared) -> result must be a module-level function (pickled by reference), depend only on its chunk
(its own seed stream) and `shared` (a dict of read-only arrays), and give the same bits with one BLAS thread
wherever it runs. Results come back as a list in chunk order, so any backend and any number of workers gives
the same bits as the inline single-job loop. On a cluster, `shared` is sent once to every worker
(client.scatter(..., broadcast=True), through joblib's Dask backend) and each task carries only its chunk.
Remote workers need this repository's code/ folder on their PYTHONPATH, the same numpy/BLAS, and, for bit
identity with a local run, the same CPU family (BLAS kernels are chosen per CPU).
No generator returns are used (joblib's Ray backend rejects return_as="generator"): results are gathered in
waves of WAVE_PER_WORKER tasks per worker, and on_result reports each wave in chunk order.
"""
import contextlib
import sys
from pathlib import Path
from typing import NamedTuple

from common import ExperimentError, blas_limited

BACKENDS = ("local", "dask")
CONNECT_TIMEOUT_SECONDS = 5       # an unreachable scheduler fails this fast, as one line
WORKERS_TIMEOUT_SECONDS = 30      # a reachable scheduler must show at least one worker within this
WAVE_PER_WORKER = 4               # chunks per worker between result reports (chunks cost alike: little idle)
BLAS_THREADS = 1                  # every chunk runs with one BLAS thread (bit identity across backends)


def resolve_backend(backend, scheduler):
    """The backend actually used: a scheduler address implies "dask"; "dask" needs an address."""
    if backend not in BACKENDS:
        raise ExperimentError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if scheduler:
        return "dask"
    if backend == "dask":
        raise ExperimentError("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786), the address of "
                              "a running dask scheduler")
    return backend


def blas_threads():
    """{BLAS library name: threads} as threadpoolctl sees it in this process."""
    from threadpoolctl import threadpool_info

    return {f"{p['internal_api']}:{p.get('filepath', '')}": p["num_threads"] for p in threadpool_info()
            if p.get("user_api") == "blas"}


def run_chunk(fn, chunk, shared, label=None):
    """fn(chunk, shared) with one BLAS thread, checked (this runs inside the worker); errors name the chunk by
    label (default: the chunk itself)."""
    label = chunk if label is None else label
    with blas_limited(BLAS_THREADS, f"chunk {label} on its worker"):
        try:
            return fn(chunk, shared)
        except (ExperimentError, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001  reported by the caller as one line naming the chunk
            raise ExperimentError(f"chunk {label} failed: {type(err).__name__}: {err}") from None


def connect(scheduler, timeout=CONNECT_TIMEOUT_SECONDS):
    """A distributed.Client on the scheduler at `scheduler`; an unreachable one is one ExperimentError line."""
    try:
        from distributed import Client
    except ImportError:
        raise ExperimentError("the dask backend needs dask and distributed (pip install -r requirements.txt)") \
            from None
    try:
        return Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExperimentError(f"cannot reach the dask scheduler at {scheduler} within {timeout} s ({reason})") \
            from None


def wait_for_workers(client, scheduler, timeout=WORKERS_TIMEOUT_SECONDS):
    """Number of worker threads of the cluster, after waiting for at least one worker."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        raise ExperimentError(f"the dask scheduler at {scheduler} has no worker after {timeout} s") from None
    return max(1, sum(client.nthreads().values()))


def check_imports(client, scheduler, modules):
    """One ExperimentError line unless the scheduler and every worker can import `modules` (the scheduler
    unpickles the tasks: without this check, a cluster started without code/ on its path would hang)."""
    statement = "import " + ", ".join(modules)
    for where, call in (("scheduler", client.run_on_scheduler), ("workers", client.run)):
        try:
            call(exec, statement)
        except ImportError as err:
            raise ExperimentError(f"the dask {where} at {scheduler} cannot import this project's code ({err}); "
                                  f"start them with code/ on PYTHONPATH") from None


def _module_name(fn):
    """The importable module of fn: a script run as __main__ is imported on the workers by its file name."""
    if fn.__module__ != "__main__":
        return fn.__module__
    main = sys.modules["__main__"]
    return Path(getattr(main, "__file__", "__main__")).stem


def _waves(chunks, size):
    for i in range(0, len(chunks), size):
        yield i, chunks[i:i + size]


def _map_local(fn, chunks, shared, jobs, pool, on_result):
    """Inline for jobs == 1; else pool(jobs, work) (a ForkedWorkers-like context manager whose run(indices)
    yields (index, result) in any order)."""
    results = [None] * len(chunks)
    if jobs <= 1 or len(chunks) <= 1:
        for i, chunk in enumerate(chunks):
            results[i] = run_chunk(fn, chunk, shared, i)
            if on_result is not None:
                on_result(i, results[i])
        return results
    if pool is None:
        raise ExperimentError("the local backend with jobs > 1 needs a process pool")

    def work(i):
        return run_chunk(fn, chunks[i], shared, i)

    with pool(jobs, work) as workers:
        for i, result in workers.run(range(len(chunks))):
            results[i] = result
            if on_result is not None:
                on_result(i, result)
    return results


class _Task(NamedTuple):
    """One chunk sent to a persistent local worker: its index, the chunk function and the chunk."""

    index: int
    fn: object
    chunk: object


class ChunkPool:
    """map_chunks for many calls with one set-up (e.g. one batch of evaluations per step of a budgeted loop).

        with ChunkPool(shared, backend, scheduler, jobs, pool) as chunks:
            results = chunks.map(fn, chunk_list)        # as often as needed

    backend "dask" (implied by a scheduler address): one client on that cluster, `shared` scattered once to every
    worker for all map calls. backend "local": inline for jobs == 1, else pool(jobs, work) started once (e.g.
    forked.ForkedWorkers: the workers inherit `shared` through fork; each task carries its chunk function and
    chunk, pickled). `workers` is the number of chunks worth running at once; `remote` is False when chunks run
    inline in this process (their CPU time is then in this process's own clock)."""

    def __init__(self, shared, backend="local", scheduler=None, jobs=1, pool=None):
        self.shared, self.backend = shared, resolve_backend(backend, scheduler)
        self.scheduler, self.jobs, self.pool = scheduler, jobs, pool
        self.workers, self.remote = 1, False
        self._stack, self._client, self._parallel, self._local = None, None, None, None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            if self.backend == "dask":
                with _dask_errors(self.scheduler):
                    self._open_dask()
            elif self.jobs > 1:
                if self.pool is None:
                    raise ExperimentError("the local backend with jobs > 1 needs a process pool")
                self._local = self._stack.enter_context(self.pool(self.jobs, self._work))
                self.workers, self.remote = self.jobs, True
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _work(self, task):
        """Local worker side: one _Task."""
        return run_chunk(task.fn, task.chunk, self.shared, task.index)

    def _open_dask(self):
        import joblib

        client = connect(self.scheduler)
        self._stack.callback(_close_client, client)
        self.workers, self.remote = wait_for_workers(client, self.scheduler), True
        self._client = client
        self._checked = set()  # modules the scheduler and workers were checked to import
        self._stack.enter_context(joblib.parallel_config(backend="dask", client=client, scatter=[self.shared]))
        self._parallel = self._stack.enter_context(joblib.Parallel(n_jobs=-1, return_as="list", batch_size=1,
                                                                   pre_dispatch="all"))

    def map(self, fn, chunks, on_result=None):
        """[fn(chunk, shared) for chunk in chunks], each with one BLAS thread, in chunk order; on_result(index,
        result) as results arrive."""
        chunks = list(chunks)
        if self._parallel is not None:
            return self._map_dask(fn, chunks, on_result)
        if self._local is None:
            return _map_local(fn, chunks, self.shared, 1, None, on_result)
        results = [None] * len(chunks)
        for task, result in self._local.run([_Task(i, fn, chunk) for i, chunk in enumerate(chunks)]):
            results[task.index] = result
            if on_result is not None:
                on_result(task.index, result)
        return results

    def _map_dask(self, fn, chunks, on_result):
        import joblib

        with _dask_errors(self.scheduler):
            modules = {"scaleout", "common", _module_name(fn)} - self._checked
            if modules:  # checked once per module (a cluster without code/ would otherwise hang)
                check_imports(self._client, self.scheduler, sorted(modules))
                self._checked |= modules
            results = []
            for start, wave in _waves(chunks, self.workers * WAVE_PER_WORKER):
                out = self._parallel(joblib.delayed(run_chunk)(fn, chunk, self.shared, start + k)
                                     for k, chunk in enumerate(wave))
                for k, result in enumerate(out):
                    results.append(result)
                    if on_result is not None:
                        on_result(start + k, result)
            return results


def _close_client(client):
    """Cancel whatever is still running on the cluster and close the client (the scheduler may be gone)."""
    try:
        client.cancel(list(client.futures.values()), force=True) if client.futures else None
    except Exception:  # noqa: BLE001  the scheduler may be gone already
        pass
    client.close(timeout=CONNECT_TIMEOUT_SECONDS)


class _dask_errors:
    """Context manager: a lost scheduler or worker becomes one ExperimentError line."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, ExperimentError) or not isinstance(err, Exception):
            return False
        scheduler = self.scheduler
        if isinstance(err, (OSError, TimeoutError)):
            raise ExperimentError(f"lost the dask scheduler at {scheduler} ({type(err).__name__}: {err})") from None
        if type(err).__name__ in ("KilledWorker", "CancelledError", "CommClosedError"):  # one line
            raise ExperimentError(f"a dask worker at {scheduler} died or was lost ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
        return False


def map_chunks(fn, chunks, shared, backend="local", scheduler=None, jobs=1, pool=None, on_result=None):
    """[fn(chunk, shared) for chunk in chunks], each with one BLAS thread, in chunk order.

    backend "local": inline when jobs == 1, else in pool(jobs, work) (e.g. the scatter script's ForkedWorkers);
    backend "dask" (implied by a scheduler address): on that dask.distributed cluster. on_result(index, result)
    is called as results arrive (for progress bars)."""
    chunks = list(chunks)
    if resolve_backend(backend, scheduler) == "dask":
        with ChunkPool(shared, "dask", scheduler) as pool_:
            return pool_.map(fn, chunks, on_result)
    return _map_local(fn, chunks, shared, jobs, pool, on_result)

