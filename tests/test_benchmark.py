"""benchmark.py on tiny settings: the loop and the batched implementations agree and the CLI runs."""
import dataclasses

import numpy as np
import pytest

import benchmark as bm
from common import ExperimentError


def test_hypernet_step_loop_equals_batched(synthetic):
    config = dataclasses.replace(bm.Config(), timed_steps=1)
    result = bm.bench_hypernet_step(config, synthetic.train_images, synthetic.train_labels, repeats=1)
    assert result["grad_diff"] <= 1e-12 * result["grad_scale"]
    assert result["param_diff"] <= 1e-12
    assert result["loop_s"] > 0 and result["batched_s"] > 0


def test_stacked_loop_equals_batched(synthetic):
    config = dataclasses.replace(bm.Config(), n_models=3, n_steps=4, batch_size=20, elementary_step_size=1e-2)
    result = bm.bench_stacked(config, synthetic.train_images, synthetic.train_labels, repeats=1, log=lambda _: None)
    assert result["moved"] > 1e-3
    assert result["batched_diff"] <= 1e-12 and result["wide_diff"] <= 1e-12


def test_check_agreement():
    bm.check_agreement("x", 1e-16, 1.0)
    with pytest.raises(ExperimentError, match="disagree"):
        bm.check_agreement("x", 1e-3, 1.0)
    with pytest.raises(ExperimentError):
        bm.check_agreement("x", np.nan, 1.0)

