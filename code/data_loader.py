"""MNIST: verified loading, atomic downloading and the splits used by the experiments (SPEC section 1).

Run as a script to verify (or fetch) the four files:  python data_loader.py [--data-dir DIR]
"""
import argparse
import gzip
import hashlib
import http.client
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atomic_io import replace_readable

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT = 30.0  # seconds per mirror and file

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
N_PIXELS, N_CLASSES = 28 * 28, 10


class IdxSpec(NamedTuple):
    """What one official MNIST file must contain (SHA-256 of the decompressed bytes)."""

    name: str
    magic: int
    count: int
    sha256: str


FILES = {
    "train_images": IdxSpec("train-images-idx3-ubyte", IMAGES_MAGIC, 60000,
                            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": IdxSpec("train-labels-idx1-ubyte", LABELS_MAGIC, 60000,
                            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": IdxSpec("t10k-images-idx3-ubyte", IMAGES_MAGIC, 10000,
                           "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": IdxSpec("t10k-labels-idx1-ubyte", LABELS_MAGIC, 10000,
                           "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"


class MNISTError(Exception):
    """A missing, corrupt or unobtainable MNIST file; the message names the file and the problem."""


class MNIST(NamedTuple):
    """The full data set: images (N, 784) float64 in [0, 1], labels (N, 10) one-hot float64."""

    n_train: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class Splits(NamedTuple):
    """Train / valid / test arrays of one experiment (images (N, 784), one-hot labels (N, 10))."""

    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# ----------------------------------------------------------------------------------------- parsing

def parse_idx(raw, spec):
    """Parse decompressed IDX bytes into a uint8 array (count, 28, 28) or (count,); checks everything."""
    digest = hashlib.sha256(raw).hexdigest()
    header_len = 16 if spec.magic == IMAGES_MAGIC else 8
    if len(raw) < header_len:
        raise MNISTError(f"{spec.name}: truncated ({len(raw)} bytes, shorter than the IDX header)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != spec.magic:
        raise MNISTError(f"{spec.name}: wrong magic number {magic} (expected {spec.magic})")
    if count != spec.count:
        raise MNISTError(f"{spec.name}: wrong count {count} (expected {spec.count})")
    shape = (count,)
    if spec.magic == IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (28, 28):
            raise MNISTError(f"{spec.name}: wrong image shape {rows}x{cols} (expected 28x28)")
        shape = (count, rows, cols)
    expected_len = header_len + int(np.prod(shape))
    if len(raw) != expected_len:
        kind = "truncated" if len(raw) < expected_len else "too long"
        raise MNISTError(f"{spec.name}: {kind} ({len(raw)} bytes, expected {expected_len})")
    if digest != spec.sha256:
        raise MNISTError(f"{spec.name}: checksum mismatch (sha256 {digest[:16]}..., expected {spec.sha256[:16]}...)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def decompress(data, name):
    """Return the decompressed bytes of gzip data (or the data itself when it is not gzipped)."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, ValueError, zlib.error) as err:  # zlib.error: damaged deflate stream
        raise MNISTError(f"{name}: corrupt or truncated gzip data ({err})") from None


def find_file(data_dir, spec):
    """Path of the .gz or raw copy of a file in data_dir, or None."""
    for candidate in (data_dir / (spec.name + ".gz"), data_dir / spec.name):
        if candidate.is_file():
            return candidate
    return None


def read_idx_file(path, spec):
    """Read, decompress and verify one file; returns the parsed uint8 array."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MNISTError(f"{Path(path).name}: cannot read ({err.strerror})") from None
    return parse_idx(decompress(data, Path(path).name), spec)


# ------------------------------------------------------------------------------------- downloading

def download(spec, data_dir, mirrors=MIRRORS, timeout=DOWNLOAD_TIMEOUT):
    """Fetch spec's .gz from the first mirror that serves valid content; atomic, verified before rename."""
    data_dir = Path(data_dir)
    target = data_dir / (spec.name + ".gz")
    failures = []
    for mirror in mirrors:
        url = mirror + spec.name + ".gz"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + spec.name + ".part-", dir=data_dir)
        except OSError as err:
            raise MNISTError(f"{spec.name}: cannot write into {data_dir} ({err.strerror or err})") from None
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            parse_idx(decompress(Path(tmp).read_bytes(), spec.name), spec)  # verify before keeping it
            replace_readable(tmp, target)
            return target
        except urllib.error.HTTPError as err:
            failures.append(f"{url} (HTTP {err.code} {err.reason})")
        except (urllib.error.URLError, OSError, http.client.HTTPException, MNISTError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            failures.append(f"{url} ({reason})")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise MNISTError(
        f"{spec.name}: could not download; tried " + "; ".join(failures)
        + f". Put the four MNIST .gz files in {data_dir} by hand, or set MNIST_DIR to a folder that has them")


def resolve_data_dir(data_dir=None):
    """The argument, else $MNIST_DIR, else code/data beside this module."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    return DEFAULT_DATA_DIR


def fetch_file(key, data_dir=None, allow_download=True, mirrors=MIRRORS):
    """Path of a verified copy of FILES[key], downloading it when missing."""
    data_dir = resolve_data_dir(data_dir)
    spec = FILES[key]
    path = find_file(data_dir, spec)
    if path is None:
        if not allow_download:
            raise MNISTError(f"{spec.name}: not found in {data_dir}")
        path = download(spec, data_dir, mirrors)
    return path


# ----------------------------------------------------------------------------------------- loading

def one_hot(labels, n_classes=N_CLASSES):
    """(N,) integer labels -> (N, n_classes) float64 one-hot rows."""
    return (np.asarray(labels)[:, None] == np.arange(n_classes)[None, :]).astype(np.float64)


def load_mnist(data_dir=None, allow_download=True, mirrors=MIRRORS):
    """Load verified MNIST: MNIST(n_train, train_images, train_labels, test_images, test_labels)."""
    arrays = {}
    for key, spec in FILES.items():
        arrays[key] = read_idx_file(fetch_file(key, data_dir, allow_download, mirrors), spec)
    to_float = lambda images: images.reshape(len(images), N_PIXELS).astype(np.float64) / 255.0  # noqa: E731
    return MNIST(
        n_train=len(arrays["train_images"]),
        train_images=to_float(arrays["train_images"]),
        train_labels=one_hot(arrays["train_labels"]),
        test_images=to_float(arrays["test_images"]),
        test_labels=one_hot(arrays["test_labels"]),
    )


def synthetic_mnist(n_train=2000, n_test=500, seed=0):
    """A small learnable stand-in with MNIST's shapes and ranges (class prototypes plus noise), for tests."""
    rs = np.random.RandomState(seed)
    prototypes = rs.rand(N_CLASSES, N_PIXELS) ** 3

    def draw(n):
        labels = rs.randint(N_CLASSES, size=n)
        images = np.clip(prototypes[labels] + 0.3 * rs.randn(n, N_PIXELS), 0.0, 1.0)
        return images, one_hot(labels)

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    return MNIST(n_train, train_images, train_labels, test_images, test_labels)


# ------------------------------------------------------------------------------------------ splits

def _check_sizes(name, available, needed):
    if needed > available:
        raise MNISTError(f"{name}: the split needs {needed} images but only {available} are loaded")


def small_splits(data, n_train=10, n_valid=10000, n_test=10000):
    """Global/local experiments: train = first n_train, valid = the next n_valid, test = first n_test test."""
    _check_sizes("training images", len(data.train_images), n_train + n_valid)
    _check_sizes("test images", len(data.test_images), n_test)
    tr, va = slice(0, n_train), slice(n_train, n_train + n_valid)
    return Splits(data.train_images[tr], data.train_labels[tr], data.train_images[va], data.train_labels[va],
                  data.test_images[:n_test], data.test_labels[:n_test])


def scatter_splits(data, n_train=50000, n_valid=10000, n_test=10000):
    """Scatter experiment: train = first n_train training images, valid = the next n_valid."""
    return small_splits(data, n_train, n_valid, n_test)


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Verify (or download) the four MNIST files.")
    parser.add_argument("--data-dir", default=None, help="folder of the files (default: $MNIST_DIR or code/data)")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    try:
        for key, spec in FILES.items():
            path = fetch_file(key, data_dir)
            array = read_idx_file(path, spec)
            kind = "images" if array.ndim == 3 else "labels"
            print(f"ok  {path}  {array.shape[0]} {kind}  sha256 {spec.sha256[:12]}")
    except (MNISTError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
