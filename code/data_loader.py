"""MNIST: verified loading, atomic downloading and the splits used by the experiments (SPEC section 1).

Files are read as a stream and never take more memory than their expected content: a gzip bomb, a huge file or
an endless download stops with one line (MNISTError) as soon as it passes the size an MNIST file must have.

Run as a script to verify (or fetch) the four files:  python data_loader.py [--data-dir DIR]
"""
import argparse
import errno
import hashlib
import http.client
import os
import signal
import stat
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atomic_io import PART_PREFIX, replace_readable

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT = 30.0  # seconds a mirror may stay silent (connect, or between two reads)
DOWNLOAD_DEADLINE = 600.0  # seconds one file may take from one mirror (the largest is 9.9 MB)
STALE_PART_SECONDS = 2 * DOWNLOAD_DEADLINE  # a partial download untouched this long was left by a killed run

READ_CHUNK = 1 << 20  # bytes read, and decompressed, per step: memory stays near the expected size
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib's code for "a gzip wrapper" (header, CRC-32 and length checked)
STORED_OVERHEAD_DIVISOR = 1024  # incompressible data grows by 5 bytes per 64 KiB stored block: < size / 1024
GZIP_SLACK = 1 << 16  # bytes allowed for the gzip header (a file name, a comment) and trailer

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

def header_length(spec):
    """Bytes of the IDX header: magic, count, and for images rows and cols (4 bytes each)."""
    return 16 if spec.magic == IMAGES_MAGIC else 8


def expected_size(spec):
    """Exact decompressed size of a file matching spec: header + count*28*28 (images) or + count (labels)."""
    return header_length(spec) + spec.count * (N_PIXELS if spec.magic == IMAGES_MAGIC else 1)


def compressed_limit(spec):
    """Most bytes a gzip of such a file may take: the content (stored blocks if incompressible) plus slack."""
    size = expected_size(spec)
    return size + size // STORED_OVERHEAD_DIVISOR + GZIP_SLACK


def check_header(header, spec):
    """Check the first header_length(spec) bytes (magic, count, image shape); returns the array shape."""
    magic, count = struct.unpack(">II", header[:8])
    if magic != spec.magic:
        raise MNISTError(f"{spec.name}: wrong magic number {magic} (expected {spec.magic})")
    if count != spec.count:
        raise MNISTError(f"{spec.name}: wrong count {count} (expected {spec.count})")
    if spec.magic != IMAGES_MAGIC:
        return (count,)
    rows, cols = struct.unpack(">II", header[8:16])
    if (rows, cols) != (28, 28):
        raise MNISTError(f"{spec.name}: wrong image shape {rows}x{cols} (expected 28x28)")
    return (count, rows, cols)


def parse_idx(raw, spec):
    """Parse decompressed IDX bytes (any buffer) into a uint8 array (count, 28, 28) or (count,); checks everything."""
    header_len = header_length(spec)
    if len(raw) < header_len:
        raise MNISTError(f"{spec.name}: truncated ({len(raw)} bytes, shorter than the IDX header)")
    shape = check_header(raw[:header_len], spec)
    expected_len = expected_size(spec)
    if len(raw) != expected_len:
        kind = "truncated" if len(raw) < expected_len else "too long"
        raise MNISTError(f"{spec.name}: {kind} ({len(raw)} bytes, expected {expected_len})")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise MNISTError(f"{spec.name}: checksum mismatch (sha256 {digest[:16]}..., expected {spec.sha256[:16]}...)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


class _CappedBuffer:
    """The decompressed content, preallocated at its expected size; refuses to grow past it (a gzip bomb)."""

    def __init__(self, spec, name, verb="decompresses to"):
        self.spec, self.name, self.verb = spec, name, verb
        self.limit = expected_size(spec)
        self.data = bytearray(self.limit)
        self.size = 0

    def room(self):
        """Bytes the next piece may hold: one more than is left, so that an overflow is seen."""
        return min(READ_CHUNK, self.limit - self.size + 1)

    def append(self, piece):
        """Add decompressed bytes; checks the header as soon as it is complete, and the size cap."""
        end = self.size + len(piece)
        if end > self.limit:
            raise MNISTError(f"{self.name}: {self.verb} more than {self.limit} bytes (not an MNIST file)")
        header_len = header_length(self.spec)
        self.data[self.size:end] = piece
        if self.size < header_len <= end:  # fail fast on another file's header (EMNIST, a label file, ...)
            check_header(self.data[:header_len], self.spec)
        self.size = end

    def content(self):
        """The bytes received so far, without a copy."""
        return memoryview(self.data)[:self.size]


def _gunzip_into(chunks, out):
    """Decompress a stream of gzip chunks (one or more members) into out, never more than out's cap."""
    inflater = zlib.decompressobj(GZIP_WBITS)
    fed = False  # has the current member received any input
    for chunk in chunks:
        data = chunk
        while data:
            fed = True
            room = out.room()
            piece = inflater.decompress(data, room)
            out.append(piece)
            data = inflater.unconsumed_tail
            while len(piece) == room and not data and not inflater.eof:  # output zlib still holds (defensive)
                room = out.room()
                piece = inflater.decompress(b"", room)
                out.append(piece)
            if inflater.eof:  # end of one member; anything after it must be another gzip member
                data = inflater.unused_data + data
                inflater, fed = zlib.decompressobj(GZIP_WBITS), False
    if fed and not inflater.eof:
        raise zlib.error("the compressed stream ends early")


def _file_chunks(f, name, cap):
    """Yield a file's bytes in chunks, refusing to read more than cap bytes."""
    total = 0
    while chunk := f.read(READ_CHUNK):
        total += len(chunk)
        if total > cap:
            raise MNISTError(f"{name}: larger than {cap} bytes compressed (not an MNIST file)")
        yield chunk


def _open_regular(path, name):
    """Open path for reading binary; refuses anything but a regular file (a FIFO would block forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        if os.path.islink(path) and not os.path.exists(path) and err.errno == errno.ENOENT:
            raise MNISTError(f"{name}: cannot read (a broken symbolic link to {os.readlink(path)})") from None
        raise MNISTError(f"{name}: cannot read ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise MNISTError(f"{name}: cannot read ({kind})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_content(path, spec, name=None):
    """The decompressed bytes of a .gz or raw file (a memoryview), read as a stream, capped at expected_size(spec)."""
    name = name or Path(path).name
    try:
        out = _CappedBuffer(spec, name)
    except MemoryError:
        raise MNISTError(f"{name}: not enough memory for its {expected_size(spec)} bytes") from None
    try:
        with _open_regular(path, name) as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(2) == GZIP_MAGIC:
                f.seek(0)
                cap = compressed_limit(spec)
                if size > cap:
                    raise MNISTError(f"{name}: larger than {cap} bytes compressed (not an MNIST file)")
                try:
                    _gunzip_into(_file_chunks(f, name, cap), out)
                except zlib.error as err:  # a damaged deflate stream, a bad CRC, a cut file, trailing bytes
                    raise MNISTError(f"{name}: corrupt or truncated gzip data ({err})") from None
            else:  # not gzipped (whatever its name): read it as it is
                if size > out.limit:
                    raise MNISTError(f"{name}: too long ({size} bytes, expected {out.limit})")
                f.seek(0)
                out.verb = "is"
                while chunk := f.read(out.room()):  # the size may change while reading: stay capped
                    out.append(chunk)
    except OSError as err:  # e.g. EIO, or the file vanished while being read
        raise MNISTError(f"{name}: cannot read ({err.strerror or err})") from None
    return out.content()


def find_file(data_dir, spec):
    """Path of the .gz or raw copy of a file in data_dir, or None."""
    for candidate in (data_dir / (spec.name + ".gz"), data_dir / spec.name):
        if candidate.is_file():
            return candidate
    return None


def read_idx_file(path, spec, name=None):
    """Read, decompress and verify one file; returns the parsed uint8 array."""
    return parse_idx(read_content(path, spec, name), spec)


# ------------------------------------------------------------------------------------- downloading

def _copy_capped(response, out, spec, url):
    """Copy a download into the file out; stops past compressed_limit(spec) bytes or DOWNLOAD_DEADLINE seconds."""
    cap, start, total = compressed_limit(spec), time.monotonic(), 0
    while chunk := response.read1(READ_CHUNK):  # read1: returns what has arrived, so the deadline is seen
        total += len(chunk)
        if total > cap:
            raise MNISTError(f"served more than {cap} bytes (not an MNIST file)")
        if time.monotonic() - start > DOWNLOAD_DEADLINE:
            raise MNISTError(f"slower than {DOWNLOAD_DEADLINE:g} s for one file")
        out.write(chunk)


def remove_stale_parts(data_dir, spec):
    """Delete partial downloads of spec that a killed run left (untouched for STALE_PART_SECONDS); returns them."""
    removed, now = [], time.time()
    for part in Path(data_dir).glob("." + spec.name + PART_PREFIX + "*"):
        try:
            info = part.lstat()
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_PART_SECONDS:
                part.unlink()
                removed.append(part)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            pass
    return removed


def download(spec, data_dir, mirrors=MIRRORS, timeout=DOWNLOAD_TIMEOUT):
    """Fetch spec's .gz from the first mirror that serves valid content; atomic, verified before rename."""
    data_dir = Path(data_dir)
    target = data_dir / (spec.name + ".gz")
    failures = []
    for mirror in mirrors:
        url = mirror + spec.name + ".gz"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_parts(data_dir, spec)
            fd, tmp = tempfile.mkstemp(prefix="." + spec.name + PART_PREFIX, dir=data_dir)
        except OSError as err:
            raise MNISTError(f"{spec.name}: cannot write into {data_dir} ({err.strerror or err})") from None
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                _copy_capped(response, out, spec, url)
            read_idx_file(tmp, spec, name=spec.name)  # verify before keeping it
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
        return Path(data_dir).expanduser()
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"]).expanduser()
    return DEFAULT_DATA_DIR


def fetch_file(key, data_dir=None, allow_download=True, mirrors=MIRRORS):
    """Path of a verified copy of FILES[key], downloading it when missing."""
    data_dir = resolve_data_dir(data_dir)
    spec = FILES[key]
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise MNISTError(f"{data_dir}: not a folder (the data folder must hold the four MNIST files)")
    path = find_file(data_dir, spec)
    if path is None:
        for candidate in (data_dir / (spec.name + ".gz"), data_dir / spec.name):
            if os.path.lexists(candidate):  # there, but not a readable file: say why rather than download over it
                _open_regular(candidate, candidate.name).close()
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

class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial downloads are removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Verify (or download) the four MNIST files.")
    parser.add_argument("--data-dir", default=None, help="folder of the files (default: $MNIST_DIR or code/data)")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        for key, spec in FILES.items():
            path = fetch_file(key, data_dir)
            array = read_idx_file(path, spec)
            kind = "images" if array.ndim == 3 else "labels"
            print(f"ok  {path}  {array.shape[0]} {kind}  sha256 {spec.sha256[:12]}")
    except (MNISTError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (no partial file left)", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print("error: terminated (no partial file left)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
