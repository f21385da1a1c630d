"""common.py: atomic files get umask permissions; typed loading of saved results."""
import os
import stat

import matplotlib.pyplot as plt
import pytest

from common import ExperimentError, atomic_write_bytes, load_results_as, save_results
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


def test_load_results_as_reports_incomplete_results_in_one_line(tmp_path):
    save_results(tmp_path, "exp", {"a": 1}, {"x": [1.0, 2.0]})
    assert load_results_as(tmp_path, "exp", lambda s, a: (s["a"], a["x"].sum())) == (1, 3.0)
    with pytest.raises(ExperimentError, match="incomplete or from another version.*run without --replot"):
        load_results_as(tmp_path, "exp", lambda s, a: s["missing"])


def test_quick_runs_default_to_build_quick_not_paper():
    from common import QUICK_OUT_DIR, experiment_parser

    parser = experiment_parser("x")
    assert parser.parse_args([]).out_dir is None                      # default: paper/ (resolved by plotting)
    assert parser.parse_args(["--quick"]).out_dir == str(QUICK_OUT_DIR)
    assert parser.parse_args(["--quick", "--out-dir", "/tmp/o"]).out_dir == "/tmp/o"
    assert QUICK_OUT_DIR.parts[-2:] == ("build", "quick")
