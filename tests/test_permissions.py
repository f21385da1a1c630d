"""Atomically written files get the permissions of a plain open(), not mkstemp's 0600."""
import os
import stat

import matplotlib.pyplot as plt

from common import atomic_write_bytes
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
