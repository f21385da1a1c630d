"""Run independent chunks of work here (inline or in a local process pool) or on a dask.distributed cluster.

    results = map_chunks(fn, chunks, shared, backend="dask", scheduler="tcp://host:8786")

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
from common import ExperimentError

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
    from threadpoolctl import threadpool_limits

    label = chunk if label is None else label
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        wrong = {k: n for k, n in blas_threads().items() if n != BLAS_THREADS}
        if wrong:
            raise ExperimentError(f"chunk {label}: BLAS still uses {wrong} threads on its worker "
                                  f"(need {BLAS_THREADS})")
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


def _map_dask(fn, chunks, shared, scheduler, on_result):
    """Every chunk on the dask cluster at `scheduler`, through joblib's Dask backend; shared sent once per worker."""
    import joblib

    client = connect(scheduler)
    try:
        n_workers = wait_for_workers(client, scheduler)
        check_imports(client, scheduler, sorted({"scaleout", "common"} | ({fn.__module__} - {"__main__"})))
        results = []
        with joblib.parallel_config(backend="dask", client=client, scatter=[shared]):
            with joblib.Parallel(n_jobs=-1, return_as="list", batch_size=1, pre_dispatch="all") as parallel:
                for start, wave in _waves(chunks, n_workers * WAVE_PER_WORKER):
                    out = parallel(joblib.delayed(run_chunk)(fn, chunk, shared, start + k)
                                   for k, chunk in enumerate(wave))
                    for k, result in enumerate(out):
                        results.append(result)
                        if on_result is not None:
                            on_result(start + k, result)
        return results
    except ExperimentError:
        raise
    except (OSError, TimeoutError) as err:
        raise ExperimentError(f"lost the dask scheduler at {scheduler} ({type(err).__name__}: {err})") from None
    except Exception as err:  # noqa: BLE001  KilledWorker, CancelledError, ...: one line
        if type(err).__name__ in ("KilledWorker", "CancelledError", "CommClosedError"):
            raise ExperimentError(f"a dask worker at {scheduler} died or was lost ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
        raise
    finally:  # any exception, KeyboardInterrupt and common.Terminated (SIGTERM) included
        try:
            client.cancel(list(client.futures.values()), force=True) if client.futures else None
        except Exception:  # noqa: BLE001  the scheduler may be gone already
            pass
        client.close(timeout=CONNECT_TIMEOUT_SECONDS)


def map_chunks(fn, chunks, shared, backend="local", scheduler=None, jobs=1, pool=None, on_result=None):
    """[fn(chunk, shared) for chunk in chunks], each with one BLAS thread, in chunk order.

    backend "local": inline when jobs == 1, else in pool(jobs, work) (e.g. the scatter script's ForkedWorkers);
    backend "dask" (implied by a scheduler address): on that dask.distributed cluster. on_result(index, result)
    is called as results arrive (for progress bars)."""
    chunks = list(chunks)
    backend = resolve_backend(backend, scheduler)
    if backend == "dask":
        return _map_dask(fn, chunks, shared, scheduler, on_result)
    return _map_local(fn, chunks, shared, jobs, pool, on_result)

