"""Shared fixtures: real MNIST when MNIST_DIR is set, a small synthetic stand-in always."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE = REPO / "code"


@pytest.fixture(scope="session")
def mnist_dir():
    """Folder of the real MNIST files; skips the test when MNIST_DIR is not set."""
    path = os.environ.get("MNIST_DIR")
    if not path:
        pytest.skip("MNIST_DIR is not set")
    return Path(path)


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from data_loader import load_mnist

    return load_mnist(mnist_dir, allow_download=False)


@pytest.fixture(scope="session")
def synthetic():
    from data_loader import synthetic_mnist

    return synthetic_mnist()


def assert_one_line_error(code, err, expected_code, out_dir=None, contains=()):
    """A failed run: exit code expected_code, stderr one 'error: ...' line holding every text of contains, and
    (when out_dir is given) no results folder written."""
    assert code == expected_code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(text in err for text in contains), err
    if out_dir is not None:
        assert not (out_dir / "results").exists()


def child_pids(pid):
    """PIDs of the live processes whose parent is pid (read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out
