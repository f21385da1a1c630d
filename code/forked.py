"""Forked worker processes for independent work on this machine: the work function and its data are inherited
through fork, so only each task and its result cross a pipe (no files on disk or in /dev/shm); workers die with
the parent however it ends (SIGKILL included).

    with ForkedWorkers(n, work, role="ground-truth worker", describe="chunk {}".format) as workers:
        for task, result in workers.run(tasks, on_message=None):
            ...

Inside a worker, work(task) may call send_message(obj): the parent's run() passes it to on_message(task, obj)
(progress lines and bars of the children are drawn by the parent, one per task). A worker's failure surfaces in
the parent as one ExperimentError line (DivergenceError when it diverged); leaving the context, by any exception,
KeyboardInterrupt or SIGTERM, kills and reaps every worker.
"""
import os
import signal
import sys
import threading
import time

import common
from common import ExperimentError

PARENT_POLL_SECONDS = 0.5         # a worker checks this often that its parent is alive

_channel = None                   # in a worker: [connection to the parent, current task]


def available_cpus():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def in_worker():
    """True inside a ForkedWorkers worker process."""
    return _channel is not None


def send_message(obj):
    """Worker side: send obj (picklable) to the parent's on_message(task, obj); nothing outside a worker."""
    if _channel is not None:
        _channel[0].send(("message", _channel[1], obj))


def die_with_parent(parent_pid):
    """Worker side: exit as soon as the parent is gone, whatever ended it (SIGKILL included)."""
    try:  # Linux: the kernel sends SIGKILL to this process when its parent exits
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)

    def poll():  # everywhere: a thread watching the parent's pid (we are re-parented when it dies)
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)
    threading.Thread(target=poll, daemon=True).start()


def _worker_loop(conn, parent_pid, work, role, hint):
    """Body of a forked worker: run work(task) for each task received, send back ("ok"|"diverged"|"error", task,
    payload)."""
    global _channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group; the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's handler, inherited through fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    die_with_parent(parent_pid)
    _channel = [conn, None]
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        _channel[1] = task
        try:
            reply = ("ok", task, work(task))
        except common.DivergenceError as err:
            reply = ("diverged", task, str(err))
        except ExperimentError as err:
            reply = ("error", task, str(err))
        except MemoryError:
            reply = ("error", task, f"out of memory in a {role}; {hint}")
        except Exception as err:  # noqa: BLE001  anything else: reported by the parent as one line
            reply = ("error", task, f"{type(err).__name__}: {err}")
        for stream in (sys.stdout, sys.stderr):  # os._exit flushes nothing
            stream.flush()
        conn.send(reply)


class ForkedWorkers:
    """n forked processes that run work(task). Use as a context manager; on leaving it, by any exception or
    signal, every worker is killed and reaped. role and describe(task) name the workers and tasks in errors;
    hint is the advice an error ends with."""

    def __init__(self, n, work, role="worker", describe=str, hint="try --jobs 1"):
        from multiprocessing.connection import Pipe

        self.role, self.describe, self.hint = role, describe, hint
        self.workers = []  # (pid, connection)
        parent = os.getpid()
        blocked = {signal.SIGINT, signal.SIGTERM}
        for stream in (sys.stdout, sys.stderr):  # else buffered output would be printed again by each worker
            stream.flush()
        for _ in range(n):
            ours, theirs = Pipe()
            old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # no signal between fork and bookkeeping
            try:
                pid = os.fork()
            except OSError as err:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                ours.close()
                theirs.close()
                started = len(self.workers)
                self.close()
                raise ExperimentError(f"cannot start {role} {started + 1} of {n} ({err.strerror}); {hint}") from None
            if pid == 0:  # the worker
                status = 0
                try:
                    ours.close()
                    _worker_loop(theirs, parent, work, role, hint)
                except BaseException:  # noqa: BLE001
                    status = 1
                finally:
                    os._exit(status)
            theirs.close()
            self.workers.append((pid, ours))
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Kill and reap every worker (idempotent)."""
        workers, self.workers = self.workers, []
        for pid, conn in workers:
            conn.close()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, _ in workers:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def run(self, tasks, on_message=None):
        """Yield (task, result) as the workers finish them (any order); a worker's failure raises it here.
        Messages a task's work sends (send_message) go to on_message(task, obj) as they arrive."""
        from multiprocessing.connection import wait

        pending, busy = list(tasks)[::-1], {}
        for pid, conn in self.workers:
            if pending:
                task = pending.pop()
                conn.send(task)
                busy[conn] = (pid, task)
        while busy:
            for conn in wait(list(busy)):
                pid, task = busy[conn]
                try:
                    kind, done, *payload = conn.recv()
                except (EOFError, OSError):
                    raise ExperimentError(f"{self.role} {pid} died while working on {self.describe(task)} "
                                          "(killed, or out of memory?)") from None
                if kind == "message":
                    if on_message is not None:
                        on_message(done, payload[0])
                    continue
                del busy[conn]
                if kind == "diverged":
                    raise common.DivergenceError(payload[0])
                if kind != "ok":
                    raise ExperimentError(f"{self.role} failed on {self.describe(done)}: {payload[0]}")
                if pending:
                    nxt = pending.pop()
                    conn.send(nxt)
                    busy[conn] = (pid, nxt)
                yield done, payload[0]
