"""Fixtures shared by the per-weight-decay test files (imported by name, so pytest finds them there)."""
import pytest

import references as refs
from data_loader import synthetic_mnist

BLOCK = 300  # synthetic blocks: train = images 0..299, valid = 300..599


@pytest.fixture(autouse=True)
def one_blas_thread():
    """One BLAS thread, as the driver runs experiments (several threads stall on the shared 2-core machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def data():
    """Synthetic MNIST stand-in large enough for five blocks of BLOCK images."""
    return synthetic_mnist(n_train=1200, n_test=300)


@pytest.fixture(scope="module")
def splits(data):
    """train = block 0, valid = block 1, test = the first BLOCK test images."""
    return refs.block_splits(data, 1, 0, BLOCK, BLOCK)
