"""A tiny protocol script for the driver's tests: a noisy quadratic 'trained' for num_iters steps."""
import sys
import time
from dataclasses import dataclass

import numpy as np

import common
from common import ExperimentError, setting

NAME = "protocol_toy"


@dataclass(frozen=True)
class Config:
    """Settings of the toy run."""

    seed: int = setting(7, lo=0, hi=common.SEED_MAX)       # random seed
    num_iters: int = setting(50, lo=1, flag="iters")        # steps of the toy loop
    step_size: float = setting(0.1, lo=0, lo_open=True)     # gradient step on the quadratic
    mode: str = setting("plain", choices=("plain", "nan", "sleep", "fail_plot"))  # test hooks:
                                                            # nan = a non-finite summary, sleep = slow steps
    sizes: tuple[int, ...] = setting((3, 4), lo=1)          # array sizes


QUICK = dict(num_iters=5)
DATA = None


def min_verdict(summary):
    return summary["final"], "reproduced" if abs(summary["final"]) < 0.1 else "not reproduced"


CLAIMS = common.claims(globals(), """
    id: toy-min
    claim: the toy loop finds the minimum
    paper: 0
    evaluate: min_verdict
    evidence: final; protocol_toy.pdf
""")


def validate(config):
    if config.mode == "sleep" and config.num_iters > 10**6:
        raise ExperimentError("too many sleeping steps")


def run(config, data):
    rs = np.random.RandomState(config.seed)
    x, trace = 5.0 + rs.randn(), []
    for _ in range(config.num_iters):
        x -= config.step_size * 2 * x
        trace.append(x)
        if config.mode == "sleep":
            time.sleep(0.05)
    final = float("nan") if config.mode == "nan" else float(x)
    return {"final": final}, {"trace": np.array(trace), "grid": np.zeros(config.sizes)}


def plot(summary, arrays, out_dir):
    import matplotlib.pyplot as plt

    from plotting import save_figure

    if summary["config"]["mode"] == "fail_plot":
        raise OSError(28, "No space left on device", str(out_dir / "protocol_toy.png"))
    fig, ax = plt.subplots()
    ax.plot(arrays["trace"])
    paths = save_figure(fig, NAME, out_dir)
    plt.close(fig)
    return paths


def tex_numbers(summary):
    return {"ToyFinal": f"{summary['final']:.3f}"}


if __name__ == "__main__":
    sys.exit(common.main(sys.modules[__name__]))
