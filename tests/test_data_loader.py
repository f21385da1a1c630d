"""MNIST loader: IDX parsing of crafted files, verified atomic downloads from a local server, the CLI, splits."""
import gzip
import hashlib
import http.server
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

import data_loader as dl
from conftest import CODE

N_SMALL = 3  # images / labels in the crafted files


# ------------------------------------------------------------------------------------ crafted files

def idx_images(count=N_SMALL, magic=dl.IMAGES_MAGIC, rows=28, cols=28, seed=0):
    """Raw IDX image bytes with a big-endian header and random pixels."""
    pixels = np.random.RandomState(seed).randint(0, 256, size=count * rows * cols).astype(np.uint8)
    return struct.pack(">IIII", magic, count, rows, cols) + pixels.tobytes()


def idx_labels(labels=(5, 0, 9), magic=dl.LABELS_MAGIC):
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def spec_for(raw, name="crafted-images-idx3-ubyte", magic=dl.IMAGES_MAGIC, count=N_SMALL):
    """An IdxSpec that accepts exactly these raw bytes."""
    return dl.IdxSpec(name, magic, count, hashlib.sha256(raw).hexdigest())


def corrupt_gzip(raw):
    """gzip bytes whose deflate stream is damaged (header intact, so it is recognised as gzip)."""
    data = bytearray(gzip.compress(raw))
    for i in range(12, min(len(data) - 8, 40)):
        data[i] ^= 0xFF
    return bytes(data)


def test_parse_good_images_and_labels():
    raw = idx_images()
    images = dl.parse_idx(raw, spec_for(raw))
    assert images.shape == (N_SMALL, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.ravel(), np.frombuffer(raw[16:], np.uint8))
    raw_labels = idx_labels()
    labels = dl.parse_idx(raw_labels, spec_for(raw_labels, "crafted-labels", dl.LABELS_MAGIC))
    np.testing.assert_array_equal(labels, [5, 0, 9])


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_file_raw_and_gz(tmp_path, compress):
    raw = idx_images()
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    images = dl.read_idx_file(path, spec_for(raw))
    np.testing.assert_array_equal(images.ravel(), np.frombuffer(raw[16:], np.uint8))


@pytest.mark.parametrize("make_bytes, spec_bytes, message", [
    (lambda: idx_images()[:10], idx_images, "truncated"),                 # shorter than the header
    (lambda: idx_images()[:-1], idx_images, "truncated"),                 # one pixel missing
    (lambda: idx_images() + b"\0", idx_images, "too long"),
    (lambda: idx_images(magic=2049), idx_images, "wrong magic"),
    (lambda: idx_images(count=N_SMALL + 1), idx_images, "wrong count"),
    (lambda: idx_images(rows=14, cols=56), idx_images, "wrong image shape"),
    (lambda: idx_images(seed=1), idx_images, "checksum mismatch"),          # right structure, other pixels
], ids=["short-header", "truncated", "too-long", "magic", "count", "shape", "checksum"])
def test_parse_rejects_bad_content(make_bytes, spec_bytes, message):
    spec = spec_for(spec_bytes(), name="crafted-images-idx3-ubyte")
    with pytest.raises(dl.MNISTError) as err:
        dl.parse_idx(make_bytes(), spec)
    assert message in str(err.value)
    assert str(err.value).startswith("crafted-images-idx3-ubyte:")  # names the file


@pytest.mark.parametrize("damage", [corrupt_gzip, lambda raw: gzip.compress(raw)[:-20]], ids=["corrupt", "cut"])
def test_corrupt_gzip_is_a_one_line_mnist_error(tmp_path, damage):
    raw = idx_images()
    path = tmp_path / "crafted.gz"
    path.write_bytes(damage(raw))
    with pytest.raises(dl.MNISTError, match="crafted.gz: corrupt or truncated gzip"):
        dl.read_idx_file(path, spec_for(raw))


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(dl.MNISTError, match="nothing.gz: cannot read"):
        dl.read_idx_file(tmp_path / "nothing.gz", spec_for(idx_images()))


def test_official_specs_match_spec_section_1():
    assert [s.count for s in dl.FILES.values()] == [60000, 60000, 10000, 10000]
    assert [s.magic for s in dl.FILES.values()] == [2051, 2049, 2051, 2049]
    assert dl.FILES["train_images"].sha256.startswith("ba891046e650")


def test_find_file_prefers_gz_and_accepts_raw(tmp_path):
    spec = spec_for(idx_images(), name="x-idx3-ubyte")
    assert dl.find_file(tmp_path, spec) is None
    (tmp_path / "x-idx3-ubyte").write_bytes(b"raw")
    assert dl.find_file(tmp_path, spec) == tmp_path / "x-idx3-ubyte"
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(b"gz")
    assert dl.find_file(tmp_path, spec) == tmp_path / "x-idx3-ubyte.gz"


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "env"))
    assert dl.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert dl.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MNIST_DIR")
    monkeypatch.chdir(tmp_path)  # the default must not depend on the working directory
    assert dl.resolve_data_dir() == CODE / "data"


# ------------------------------------------------------------------ whole pipeline on crafted files

def tiny_files(n_train=12, n_test=4):
    """Raw bytes and matching specs for a tiny four-file MNIST."""
    rs = np.random.RandomState(3)
    contents = {
        "train_images": idx_images(n_train, seed=1),
        "train_labels": idx_labels(tuple(rs.randint(10, size=n_train))),
        "test_images": idx_images(n_test, seed=2),
        "test_labels": idx_labels(tuple(rs.randint(10, size=n_test))),
    }
    specs = {key: dl.IdxSpec(dl.FILES[key].name, dl.FILES[key].magic, n, hashlib.sha256(raw).hexdigest())
             for (key, raw), n in zip(contents.items(), (n_train, n_train, n_test, n_test), strict=True)}
    return contents, specs


def test_load_mnist_on_tiny_files_mixed_gz_and_raw(tmp_path, monkeypatch):
    contents, specs = tiny_files()
    monkeypatch.setattr(dl, "FILES", specs)
    for i, (key, raw) in enumerate(contents.items()):
        if i % 2:
            (tmp_path / specs[key].name).write_bytes(raw)
        else:
            (tmp_path / (specs[key].name + ".gz")).write_bytes(gzip.compress(raw))
    data = dl.load_mnist(tmp_path, allow_download=False)
    assert data.n_train == 12
    assert data.train_images.shape == (12, 784) and data.test_images.shape == (4, 784)
    assert data.train_images.dtype == np.float64
    np.testing.assert_array_equal(data.train_images[0] * 255.0, np.frombuffer(contents["train_images"][16:16 + 784],
                                                                              np.uint8))
    np.testing.assert_array_equal(data.train_labels.argmax(1), np.frombuffer(contents["train_labels"][8:], np.uint8))
    np.testing.assert_array_equal(data.train_labels.sum(1), 1.0)


def test_missing_file_without_download(tmp_path, monkeypatch):
    _, specs = tiny_files()
    monkeypatch.setattr(dl, "FILES", specs)
    with pytest.raises(dl.MNISTError, match=f"train-images-idx3-ubyte: not found in {tmp_path}"):
        dl.load_mnist(tmp_path, allow_download=False)


# ------------------------------------------------------------------------ downloads from 127.0.0.1

class _Handler(http.server.BaseHTTPRequestHandler):
    routes = {}  # replaced per server: path -> bytes

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server; returns (base_url, routes dict to fill, list of requested paths)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    requested = []

    class Handler(_Handler):
        routes = {}

        def do_GET(self):  # noqa: N802
            requested.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler.routes, requested
    httpd.shutdown()
    httpd.server_close()


def test_download_success(tmp_path, server):
    base, routes, requested = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/m1/{spec.name}.gz"] = gzip.compress(raw)
    path = dl.download(spec, tmp_path / "data", mirrors=(base + "/m1/",), timeout=5)
    assert path == tmp_path / "data" / (spec.name + ".gz")
    np.testing.assert_array_equal(dl.read_idx_file(path, spec).ravel(), np.frombuffer(raw[16:], np.uint8))
    assert os.listdir(tmp_path / "data") == [spec.name + ".gz"]  # no stray partial file
    assert requested == [f"/m1/{spec.name}.gz"]


def test_download_falls_back_after_404(tmp_path, server):
    base, routes, requested = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/m2/{spec.name}.gz"] = gzip.compress(raw)
    path = dl.download(spec, tmp_path, mirrors=(base + "/m1/", base + "/m2/"), timeout=5)
    assert requested == [f"/m1/{spec.name}.gz", f"/m2/{spec.name}.gz"]
    assert dl.read_idx_file(path, spec).shape == (N_SMALL, 28, 28)
    assert os.listdir(tmp_path) == [spec.name + ".gz"]


@pytest.mark.parametrize("bad_payload", [
    lambda raw: gzip.compress(idx_images(seed=9)),   # valid IDX, wrong content: checksum mismatch
    lambda raw: gzip.compress(raw)[:-30],             # cut off
    corrupt_gzip,                                     # damaged deflate stream
    lambda raw: b"<html>Forbidden</html>",            # an error page served with status 200
], ids=["checksum", "truncated", "corrupt-gzip", "html"])
def test_corrupt_payload_rejected_then_next_mirror(tmp_path, server, bad_payload):
    base, routes, requested = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/bad/{spec.name}.gz"] = bad_payload(raw)
    routes[f"/good/{spec.name}.gz"] = gzip.compress(raw)
    path = dl.download(spec, tmp_path, mirrors=(base + "/bad/", base + "/good/"), timeout=5)
    assert len(requested) == 2
    assert dl.read_idx_file(path, spec).shape == (N_SMALL, 28, 28)
    assert os.listdir(tmp_path) == [spec.name + ".gz"]


def test_all_mirrors_fail_leaves_nothing_and_explains(tmp_path, server):
    base, routes, _ = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/bad/{spec.name}.gz"] = gzip.compress(idx_images(seed=5))
    mirrors = (base + "/missing/", base + "/bad/", "http://127.0.0.1:9/refused/")
    with pytest.raises(dl.MNISTError) as err:
        dl.download(spec, tmp_path, mirrors=mirrors, timeout=5)
    message = str(err.value)
    assert "\n" not in message
    for mirror in mirrors:
        assert mirror + spec.name + ".gz" in message
    assert "404" in message and "checksum mismatch" in message
    assert str(tmp_path) in message and "MNIST_DIR" in message
    assert os.listdir(tmp_path) == []  # neither a partial file nor one under the final name


def test_unwritable_target_is_an_mnist_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(dl.MNISTError, match="cannot write"):
        dl.download(spec_for(idx_images()), blocker / "sub", mirrors=("http://127.0.0.1:9/",), timeout=1)


def test_load_mnist_downloads_missing_files(tmp_path, server, monkeypatch):
    base, routes, requested = server
    contents, specs = tiny_files()
    monkeypatch.setattr(dl, "FILES", specs)
    for key, raw in contents.items():
        routes[f"/m/{specs[key].name}.gz"] = gzip.compress(raw)
    (tmp_path / specs["train_labels"].name).write_bytes(contents["train_labels"])  # one already present, raw
    data = dl.load_mnist(tmp_path, mirrors=(base + "/m/",))
    assert data.train_images.shape == (12, 784)
    assert len(requested) == 3
    assert sorted(os.listdir(tmp_path)) == sorted([specs["train_labels"].name] + [
        specs[k].name + ".gz" for k in ("train_images", "test_images", "test_labels")])


# ------------------------------------------------------------------------------------------- CLI

def run_cli(*args, cwd):
    env = dict(os.environ)
    env.pop("MNIST_DIR", None)
    return subprocess.run([sys.executable, str(CODE / "data_loader.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_cli_bad_file_is_one_error_line(tmp_path):
    # A corrupt file fails verification before any download could be attempted.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(corrupt_gzip(idx_images()))
    result = run_cli("--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train-images-idx3-ubyte.gz: corrupt")


def test_cli_wrong_content_is_one_error_line(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images())  # valid IDX but only 3 images
    result = run_cli("--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: train-images-idx3-ubyte: wrong count 3 (expected 60000)"


@pytest.mark.mnist
def test_cli_verifies_real_data(mnist_dir, tmp_path):
    result = run_cli("--data-dir", str(mnist_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines)


# ----------------------------------------------------------------------------------------- splits

def indexed_data(n_train, n_test):
    """Fake MNIST whose one-pixel images hold their own index, so splits can be checked exactly."""
    train = np.arange(n_train, dtype=float)[:, None]
    test = -np.arange(n_test, dtype=float)[:, None]
    return dl.MNIST(n_train, train, dl.one_hot(np.arange(n_train) % 10), test, dl.one_hot(np.arange(n_test) % 10))


def test_small_splits_exact_ranges():
    s = dl.small_splits(indexed_data(60000, 10000))
    np.testing.assert_array_equal(s.train_x[:, 0], np.arange(10))
    np.testing.assert_array_equal(s.valid_x[:, 0], np.arange(10, 10010))
    np.testing.assert_array_equal(s.test_x[:, 0], -np.arange(10000))
    np.testing.assert_array_equal(s.valid_y.argmax(1), np.arange(10, 10010) % 10)


def test_scatter_splits_exact_ranges():
    s = dl.scatter_splits(indexed_data(60000, 10000))
    np.testing.assert_array_equal(s.train_x[[0, -1], 0], [0, 49999])
    np.testing.assert_array_equal(s.valid_x[[0, -1], 0], [50000, 59999])
    assert len(s.train_x) == 50000 and len(s.valid_x) == 10000 and len(s.test_x) == 10000


def test_splits_refuse_too_little_data(synthetic):
    with pytest.raises(dl.MNISTError, match="needs 10010 images"):
        dl.small_splits(synthetic)


def test_one_hot():
    np.testing.assert_array_equal(dl.one_hot([2, 0]), [[0, 0, 1] + [0] * 7, [1] + [0] * 9])


def test_synthetic_stand_in_has_mnist_shapes(synthetic):
    assert synthetic.train_images.shape == (2000, 784) and synthetic.test_labels.shape == (500, 10)
    assert 0.0 <= synthetic.train_images.min() and synthetic.train_images.max() <= 1.0


# ------------------------------------------------------------------------------------- real MNIST

@pytest.mark.mnist
def test_real_mnist(mnist):
    assert mnist.n_train == 60000
    assert mnist.train_images.shape == (60000, 784) and mnist.test_images.shape == (10000, 784)
    assert mnist.train_labels.shape == (60000, 10) and mnist.test_labels.shape == (10000, 10)
    for images in (mnist.train_images, mnist.test_images):
        assert images.dtype == np.float64
        assert images.min() == 0.0 and images.max() == 1.0
    for labels in (mnist.train_labels, mnist.test_labels):
        assert labels.dtype == np.float64
        assert set(np.unique(labels)) == {0.0, 1.0}
        np.testing.assert_array_equal(labels.sum(axis=1), 1.0)
    train_counts = mnist.train_labels.sum(axis=0)
    test_counts = mnist.test_labels.sum(axis=0)
    assert train_counts.sum() == 60000 and test_counts.sum() == 10000
    assert np.all((5000 <= train_counts) & (train_counts <= 7000))
    assert train_counts[1] == 6742 and test_counts[1] == 1135
    assert mnist.train_labels[0].argmax() == 5 and mnist.test_labels[0].argmax() == 7  # the famous first digits
    # pixel values are multiples of 1/255
    np.testing.assert_allclose(mnist.train_images[:100] * 255.0, np.round(mnist.train_images[:100] * 255.0),
                               atol=1e-9)


@pytest.mark.mnist
def test_real_mnist_splits(mnist):
    small = dl.small_splits(mnist)
    assert [len(a) for a in small] == [10, 10, 10000, 10000, 10000, 10000]
    np.testing.assert_array_equal(small.valid_x[0], mnist.train_images[10])
    scatter = dl.scatter_splits(mnist)
    assert [len(a) for a in scatter] == [50000, 50000, 10000, 10000, 10000, 10000]
    np.testing.assert_array_equal(scatter.valid_x[0], mnist.train_images[50000])
