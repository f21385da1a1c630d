"""common.py helpers outside the driver: atomic files get umask permissions, per-step seeds, finiteness checks,
the strict results reader, and the benchmark's argument type and error wrapper."""
import argparse
import os
import stat

import matplotlib.pyplot as plt
import numpy as np
import pytest

import common
import protocol_toy as toy
from common import ExperimentError, atomic_write_bytes
from plotting import save_figure


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_are_group_and_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        fig = plt.figure()
        (png,) = save_figure(fig, "f", tmp_path, formats=("png",))
        plt.close(fig)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(png) == 0o644


def test_step_rng():
    a = common.step_rng(7, 3).randn(5)
    np.testing.assert_array_equal(a, common.step_rng(7, 3).randn(5))
    assert not np.allclose(a, common.step_rng(7, 4).randn(5))
    assert not np.allclose(a, common.step_rng(8, 3).randn(5))
    assert not np.allclose(a, common.step_rng(7, 3, 1).randn(5))


def test_check_finite():
    common.check_finite(np.array([1.0, 2.0]), 5)
    with pytest.raises(common.DivergenceError, match="objective is not finite at step 12"):
        common.check_finite(np.array([1.0, np.nan]), 12)
    with pytest.raises(common.DivergenceError, match="loss is not finite at step 0"):
        common.check_finite(np.inf, 0, "loss")


def test_load_results_reads_a_driver_run_and_rejects_damage(tmp_path, capsys):
    assert common.main(toy, ["--out-dir", str(tmp_path)]) == 0
    summary, arrays = common.load_results(tmp_path, "protocol_toy")
    assert summary["experiment"] == "protocol_toy" and arrays["grid"].shape == (3, 4)
    with pytest.raises(ExperimentError, match="no saved results"):
        common.load_results(tmp_path, "other")
    (tmp_path / "results" / "protocol_toy.json").write_text('{"a": NaN}')
    with pytest.raises(ExperimentError, match="not valid results JSON"):
        common.load_results(tmp_path, "protocol_toy")


def test_load_results_never_unpickles(tmp_path, capsys):
    assert common.main(toy, ["--out-dir", str(tmp_path)]) == 0
    np.savez(tmp_path / "results" / "protocol_toy.npz", objects=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ExperimentError, match="unreadable"):
        common.load_results(tmp_path, "protocol_toy")


@pytest.mark.parametrize("text", ["0", "-3", "nan", "inf", "abc", "1.5", ""])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_int(text)


def test_run_main_reports_one_line(capsys):
    def failing(argv):
        raise common.DivergenceError("objective is not finite at step 3")
    assert common.run_main(failing, []) == 1
    assert capsys.readouterr().err == "error: objective is not finite at step 3\n"
    assert common.run_main(lambda argv: 0, []) == 0


def test_quick_output_goes_to_build_quick():
    assert common.QUICK_OUT_DIR.parts[-2:] == ("build", "quick")
    args = common.build_parser(toy).parse_args(["--quick"])
    assert common.resolve_out(args) == common.QUICK_OUT_DIR
