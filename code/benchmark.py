"""The hot loops (issue 13) against their autograd references and against bounds from FLOPs and bytes.

Rows (one call of each is "a step"):
  large_step              one per_weight_decay.alg3_step of Figure 5 top: linear 784-10, 7,850 decays,
                          factorised hypernetwork 7,850 -> 10 -> 7,850, 10 hypernetwork steps + 1 lambda step
  layers_step             the same for the deepest model of Figure 5 bottom, 784-100-100-10 (1.8M hypernet)
  unrolled_hypergradient  unrolled.unrolled_hypergradient, T = 200 inner Adam steps, full validation set
                          (through its Gram matrix, as make_unrolled sets up; the reference reads the set)
  global_step             small_experiments.global_step, hypernetwork [1, 50, 7850], 10 samples
  local_step              small_experiments.local_step (the validation loss through the Gram matrix)
  scatter_model_step      learn_vs_true_loss_scatter.scatter_model_step, per model (64 stacked, float64)
Each fast step is timed against its reference (autograd gradients, textbook Adam with fresh arrays, a new
RandomState per draw) in the same process, alternating, best of --repeats rounds of CPU time
(time.process_time), with one BLAS thread (threadpoolctl). The bound of a step is sum over its phases of
max(FLOPs / GEMM rate, bytes / memory bandwidth), both rates measured at the start of the same run: a large
float64 GEMM and a large array copy. fraction_of_bound = bound_seconds / seconds.

    python benchmark.py [--quick] [--json PATH] [--repeats N] [--only NAME ...] [--data-dir DIR] [--synthetic]
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from common import ExperimentError, positive_int, run_main

NAMES = ("large_step", "layers_step", "unrolled_hypergradient", "global_step", "local_step", "scatter_model_step")
TARGETS = {"large_step": 2.5, "layers_step": 1.6, "unrolled_hypergradient": 3.0, "global_step": 2.2,
           "local_step": 6.0, "scatter_model_step": 1.15}   # speed-up targets of issue 13
TARGET_FRACTION = 0.25                                      # every hot loop at >= 25% of its bound
F8 = 8                                                      # bytes per float64


@dataclass(frozen=True)
class Config:
    """Sizes of the timed problems (the experiments' defaults) and of the rate measurements."""

    seed: int = 7
    large_layers: tuple = (784, 10)             # hypernets_local_large
    deep_layers: tuple = (784, 100, 100, 10)    # compare_number_layers' deepest model
    hidden: int = 10                            # factorised hypernetwork bottleneck
    inner_steps: int = 10                       # hypernetwork steps per lambda step
    batch_size: int = 100                       # minibatch of both
    n_train: int = 10000                        # large splits: 10,000 images each
    unroll_steps: int = 200                     # unrolled baseline's T
    global_hidden: int = 50                     # global hypernetwork [1, 50, 7850]
    global_samples: int = 10                    # lambda samples per global / local step
    scatter_models: int = 64                    # models stacked in the timed scatter step
    gemm_size: int = 1000                       # n of the n x n x n GEMM that measures the GEMM rate
    copy_bytes: int = 64 << 20                  # array size of the copy that measures memory bandwidth
    min_seconds: float = 0.3                    # a timing round repeats a step until this much CPU time


QUICK = dict(min_seconds=0.1)
TINY = dict(deep_layers=(784, 20, 20, 10), inner_steps=2, n_train=300, unroll_steps=4, scatter_models=4,
            gemm_size=200, copy_bytes=1 << 20, min_seconds=0.0)   # tests only: seconds, not minutes


class HotLoop(NamedTuple):
    """One row: fast() and reference() each take one step (on their own state); phases [(FLOPs, bytes)];
    per: the step count one call stands for (scatter: the models of the stack)."""

    name: str
    fast: Callable
    reference: Callable
    phases: list
    per: int = 1


# ------------------------------------------------------------------------------------------ machine

def gemm_rate(n, repeats=3):
    """Float64 FLOP/s of an n x n x n GEMM (best of repeats)."""
    rs = np.random.RandomState(0)
    a, b, c = rs.rand(n, n), rs.rand(n, n), np.empty((n, n))
    best = min(_cpu(lambda: np.dot(a, b, out=c)) for _ in range(repeats))
    return 2.0 * n ** 3 / best


def bandwidth(n_bytes, repeats=5):
    """Bytes/s moved by a copy of an n_bytes array (read + write; best of repeats)."""
    src = np.ones(n_bytes // F8)
    dst = np.empty_like(src)
    best = min(_cpu(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2.0 * src.nbytes / best


def bound_seconds(phases, flops_rate, bytes_rate):
    """Sum over phases of max(FLOPs / GEMM rate, bytes / bandwidth): no implementation can be faster."""
    return sum(max(f / flops_rate, b / bytes_rate) for f, b in phases)


def _cpu(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def time_pair(fast, reference, repeats, min_seconds):
    """(fast, reference) CPU seconds per call: best over rounds; in each round both run, in turn, for at
    least min_seconds (so a change in the machine's load affects both alike)."""
    best = [np.inf, np.inf]
    fast()          # warm-up: caches, buffers, first-call allocations
    reference()
    for _ in range(repeats):
        for i, fn in enumerate((fast, reference)):
            calls, start = 0, time.process_time()
            while True:
                fn()
                calls += 1
                elapsed = time.process_time() - start
                if elapsed >= min_seconds:
                    break
            best[i] = min(best[i], elapsed / calls)
    return tuple(best)


# ------------------------------------------------------------------------------ FLOP and byte models

def mlp_phase(layer_sizes, n_sets, batch, backward_input=False):
    """(FLOPs, bytes) of a forward and backward pass of n_sets MLPs on one batch: each layer m x n costs
    2 B m n for z, 2 B m n for dW and (not the first) 2 B m n for delta; weights read twice, gradient
    written, batch read."""
    pairs = list(zip(layer_sizes[:-1], layer_sizes[1:], strict=False))
    per_set = sum((4 + (2 if (i > 0 or backward_input) else 0)) * batch * m * n for i, (m, n) in enumerate(pairs))
    P = sum(m * n + n for m, n in pairs)
    return n_sets * per_set, F8 * (3 * n_sets * P + batch * layer_sizes[0])


def alg3_phases(layer_sizes, hidden, inner_steps, n_samples, batch, valid_batch):
    """Phases of one alg3_step with the factorised hypernetwork H -> r -> P (H = P decays)."""
    P = sum(m * n + n for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=False))
    H, r, K = P, hidden, n_samples
    n_phi = H * r + r + r * P + P
    inner = [
        (0, F8 * 2 * K * H),                                              # lambdas = lambda_hat + sd N(0, 1)
        (2 * K * (H * r + r * P), F8 * (K * H + H * r + r * P + K * P)),  # hypernetwork forward
        mlp_phase(layer_sizes, K, batch),                                 # elementary gradient
        (0, F8 * 4 * K * P),                                              # decay term: read lambda, w, dw; write
        (2 * K * (2 * r * P + H * r), F8 * (K * P + 2 * r * P + H * r + K * H)),  # hypernetwork backward
        (0, F8 * 7 * n_phi),                                              # Adam: read x g m v, write x m v
    ]
    outer = [
        (2 * (H * r + r * P), F8 * (H + H * r + r * P + P)),              # w(lambda_hat)
        mlp_phase(layer_sizes, 1, valid_batch),
        (2 * (r * P + H * r), F8 * (P + r * P + H * r + H)),              # back to lambda_hat
        (0, F8 * 7 * H),
    ]
    return inner * inner_steps + outer


def unrolled_phases(steps, batch, D, C):
    """Phases of the unrolled hypergradient: per inner step two (B, D) x (D, C)-sized products forward and two
    backward, the batch read each way, the trajectory (w, g, m, v) written then read; the validation loss
    and its gradient through the (D+1, D+1) Gram matrix (formed once per run, not counted)."""
    P = D * C + C
    step = (4 * batch * D * C, F8 * (batch * D + 4 * P))
    return [step] * (2 * steps) + [(2 * (D + 1) ** 2 * C, F8 * (D + 1) ** 2)]


# ------------------------------------------------------------------------------------------ hot loops

def large_like(name, splits, layer_sizes, config):
    """large_step / layers_step: alg3_step, hand-written against the reference, same settings."""
    import per_weight_decay as pwd
    from neural_network import num_params

    P = num_params(layer_sizes)
    problem = pwd.HyperProblem(pwd.decay_objective(layer_sizes), pwd.mse_loss(layer_sizes), splits.train_x,
                               splits.train_y, splits.valid_x, splits.valid_y, P, P)
    settings = pwd.Alg3Settings(hidden=config.hidden, inner_steps=config.inner_steps, batch_size=config.batch_size,
                                valid_batch_size=config.batch_size, input_offset=-7.0)
    if not pwd.Alg3Stepper.supports(problem, settings):
        raise ExperimentError(f"{name}: the hand-written step does not support this problem")
    w0 = pwd.fan_in_init(layer_sizes, np.random.RandomState(config.seed))
    states = {ref: [pwd.init_alg3(problem, settings, config.seed, w0), 0] for ref in (False, True)}

    def stepper(reference):
        def step():
            box = states[reference]
            box[0] = pwd.alg3_step(box[0], box[1], problem, settings, config.seed, reference=reference)
            box[1] += 1
        return step
    phases = alg3_phases(layer_sizes, config.hidden, config.inner_steps, settings.n_samples, config.batch_size,
                         config.batch_size)
    return HotLoop(name, stepper(False), stepper(True), phases)


def unrolled_loop(splits, config):
    import unrolled as ur

    T, D, C = config.unroll_steps, splits.train_x.shape[1], splits.train_y.shape[1]
    bx, by = ur.unrolled_schedule(splits.train_x, splits.train_y, T, config.batch_size, config.seed)
    w0 = ur.initial_weights(D, C, 1e-3, config.seed)
    lam = np.full(w0.size, -7.0)
    vx, vy = splits.valid_x, splits.valid_y
    ws = ur.Workspace(T, D, C, len(vx), config.batch_size).use_gram(vx, vy)   # as make_unrolled: fixed set
    fast = lambda: ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy, "adam", 1e-3, ws)
    reference = lambda: ur.unrolled_hypergradient_autograd(lam, w0, bx, by, vx, vy, "adam", 1e-3)
    return HotLoop("unrolled_hypergradient", fast, reference,
                   unrolled_phases(T, config.batch_size, D, C))


def small_loops(data, config):
    """global_step and local_step of small_experiments (hand-written by their owner), if present."""
    import small_experiments as se
    from neural_network import init_hypernet
    from optimizers import adam_init

    missing = [f for f in ("global_step", "global_step_reference", "local_step", "local_step_reference",
                           "GlobalProblem", "LocalProblem") if not hasattr(se, f)]
    if missing:
        raise ExperimentError(f"small_experiments lacks {', '.join(missing)}")
    splits = se.splits_of(data)
    K, Hh, P = config.global_samples, config.global_hidden, se.N_WEIGHTS
    lambdas = np.clip(1.0 + 3.0 * np.random.RandomState(config.seed).randn(K), -100, 4)
    loops = []
    # global: hypernetwork [1, 50, 7850], ReLU
    gp = {ref: se.GlobalProblem(splits.train_x, splits.train_y, Hh, K) for ref in (False, True)}
    hyper = se.global_flat_params(init_hypernet("mlp", 1, P, 0.01, np.random.RandomState(config.seed), hidden=Hh))
    g_state = {ref: [hyper.copy(), adam_init(hyper)] for ref in (False, True)}

    def global_stepper(reference):
        fn = se.global_step_reference if reference else se.global_step

        def step():
            box = g_state[reference]
            box[1] = fn(gp[reference], box[0], box[1], lambdas, 1e-4)[1]
        return step
    N, Din = splits.train_x.shape
    n_phi = hyper.size
    global_phases = [(2 * K * Hh * P, F8 * (Hh * P + K * P)),                 # w = relu(l W1 + b1) W2 + b2
                     (4 * K * N * Din * 10, F8 * 3 * K * P),                  # K elementary gradients
                     (4 * K * Hh * P, F8 * (2 * Hh * P + K * P)),             # dW2, dA
                     (0, F8 * 7 * n_phi)]                                     # Adam
    loops.append(HotLoop("global_step", global_stepper(False), global_stepper(True), global_phases))
    # local: linear hypernetwork w(l) = l a + c, validation through the Gram matrix
    lp = {ref: se.LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, K)
          for ref in (False, True)}
    local = se.local_flat_params(init_hypernet("linear", 1, P, 1e-3, np.random.RandomState(config.seed)))
    l_state = {ref: [local.copy(), np.array([-3.5]), adam_init(np.zeros(1))] for ref in (False, True)}

    def local_stepper(reference):
        fn = se.local_step_reference if reference else se.local_step

        def step():
            box = l_state[reference]
            box[2] = fn(lp[reference], box[0], box[1], box[2], lambdas, 1e-4, 0.01)[3]
        return step
    local_phases = [(4 * K * N * Din * 10, F8 * (3 * K * P + 2 * P)),         # K elementary gradients, SGD
                    (2 * Din * Din * 10, F8 * (Din * Din + 3 * P))]           # S M through the Gram matrix
    loops.append(HotLoop("local_step", local_stepper(False), local_stepper(True), local_phases))
    return loops


def scatter_loop(data, config):
    """scatter_model_step (float64, so that both sides compute the same thing), per model."""
    import learn_vs_true_loss_scatter as sc

    for f in ("scatter_model_step", "scatter_model_step_reference", "scatter_step_stack", "sample_lambdas"):
        if not hasattr(sc, f):
            raise ExperimentError(f"learn_vs_true_loss_scatter lacks {f}")
    K, B = config.scatter_models, sc.Config().batch_size
    lambdas = sc.sample_lambdas(sc.Config())[:K]
    stacks = {ref: sc.scatter_step_stack(lambdas, reference=ref, dtype="float64") for ref in (False, True)}
    x, t = data.train_images[:B].astype(np.float64), data.train_labels[:B].astype(np.float64)
    counters = {False: 0, True: 0}

    def stepper(reference):
        fn = sc.scatter_model_step_reference if reference else sc.scatter_model_step

        def step():
            counters[reference] += 1
            fn(stacks[reference], x, t, counters[reference])
        return step
    D, C = x.shape[1], sc.N_CLASSES
    P = D * C + C
    phases = [(4 * K * C * D * B, F8 * (B * D + 2 * K * P)),                  # two GEMMs
              (2 * K * P, F8 * 2 * K * P),                                    # column norms, regulariser
              (0, F8 * 7 * K * P)]                                            # Adam
    return HotLoop("scatter_model_step", stepper(False), stepper(True), phases, per=K)


def build_loops(names, data, config, log=print):
    """The HotLoops requested (in NAMES order); a row whose code is missing is reported and skipped."""
    import per_weight_decay as pwd

    need_large = {"large_step", "layers_step", "unrolled_hypergradient"} & set(names)
    splits = pwd.large_splits(data, config.n_train, config.n_train, 1) if need_large else None
    loops = []
    for name in names:
        try:
            if name == "large_step":
                loops.append(large_like(name, splits, config.large_layers, config))
            elif name == "layers_step":
                loops.append(large_like(name, splits, config.deep_layers, config))
            elif name == "unrolled_hypergradient":
                loops.append(unrolled_loop(splits, config))
            elif name == "scatter_model_step":
                loops.append(scatter_loop(data, config))
            elif name in ("global_step", "local_step") and not any(loop.name in ("global_step", "local_step")
                                                                      for loop in loops):
                loops.extend(loop for loop in small_loops(data, config) if loop.name in names)
        except (ExperimentError, ImportError) as err:
            log(f"skipped {name}: {err}")
    return [loop for name in NAMES for loop in loops if loop.name == name]


# ----------------------------------------------------------------------------------------------- main

def measure(loops, config, repeats, log=print):
    """Machine rates, then every loop: rows of the JSON output."""
    flops_rate, bytes_rate = gemm_rate(config.gemm_size), bandwidth(config.copy_bytes)
    log(f"GEMM {flops_rate / 1e9:.1f} GFLOP/s, bandwidth {bytes_rate / 1e9:.1f} GB/s (one thread, this run)")
    rows = []
    for loop in loops:
        fast, ref = time_pair(loop.fast, loop.reference, repeats, config.min_seconds)
        fast, ref = fast / loop.per, ref / loop.per
        bound = bound_seconds(loop.phases, flops_rate, bytes_rate) / loop.per
        rows.append({"name": loop.name, "reference_seconds": ref, "seconds": fast, "speedup": ref / fast,
                     "bound_seconds": bound, "fraction_of_bound": bound / fast})
        log(f"  {loop.name}: {fast * 1e3:.3f} ms (reference {ref * 1e3:.3f} ms)")
    return rows, {"gemm_flops_per_second": flops_rate, "bandwidth_bytes_per_second": bytes_rate}


def table(rows):
    """The rows as a text table, with the targets of issue 13."""
    lines = [f"{'hot loop':24s} {'reference':>11s} {'fast':>11s} {'speed-up':>9s} {'target':>7s} "
             f"{'bound':>11s} {'of bound':>9s}"]
    for r in rows:
        ok = r["speedup"] >= TARGETS[r["name"]] and r["fraction_of_bound"] >= TARGET_FRACTION
        lines.append(f"{r['name']:24s} {_ms(r['reference_seconds'])} {_ms(r['seconds'])} {r['speedup']:8.2f}x "
                     f"{TARGETS[r['name']]:6.2f}x {_ms(r['bound_seconds'])} {100 * r['fraction_of_bound']:8.0f}%"
                     f"{'' if ok else '  (target missed)'}")
    return "\n".join(lines)


def _ms(seconds):
    return f"{seconds * 1e3:8.3f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time the hot loops against their autograd references and "
                                                 "bounds (issue 13).")
    parser.add_argument("--quick", action="store_true", help="shorter timing rounds (under about 3 minutes)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON to PATH")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timing rounds, the best is kept (default 3; 2 with --quick)")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=None, help="time only these hot loops")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $MNIST_DIR or code/data)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic stand-in data instead of MNIST")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests: tiny sizes
    args = parser.parse_args(argv)
    config = Config()
    if args.quick:
        config = replace(config, **QUICK)
    if args.tiny:
        config = replace(config, **TINY)
    repeats = args.repeats or (2 if args.quick or args.tiny else 3)
    from data_loader import load_mnist, synthetic_mnist

    data = synthetic_mnist(n_train=max(2 * config.n_train + 100, 2000)) if args.synthetic else load_mnist(args.data_dir)
    import scipy.linalg.blas  # noqa: F401  (scatter_model_step's BLAS: loaded first, so the limit covers it)

    with threadpool_limits(limits=1), np.errstate(over="ignore", invalid="ignore"):
        loops = build_loops(args.only or NAMES, data, config)
        rows, machine = measure(loops, config, repeats)
    print(table(rows))
    if args.json:
        from atomic_io import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(rows, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
