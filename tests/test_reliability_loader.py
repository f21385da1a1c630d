"""MNIST loader against hostile inputs (issue 11): gzip bombs, odd files, huge or slow downloads; one-line errors."""
import contextlib
import gzip
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import data_loader as dl
from conftest import CODE
from test_data_loader import N_SMALL, idx_images, idx_labels, server, spec_for, tiny_files  # noqa: F401


@contextlib.contextmanager
def drip_server(length, chunks, chunk_bytes, pause=0.05):
    """A local HTTP server that announces `length` bytes, then sends `chunks` gzip-looking chunks of chunk_bytes
    every `pause` s (never silent long enough for a socket timeout); yields its URL."""
    import http.server

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            try:
                for _ in range(chunks):
                    self.wfile.write(b"\x1f\x8b" + bytes(chunk_bytes))
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()

MB = 1 << 20
BOMB_ZEROS = 200 * MB  # content of the big bomb: 200 MB of zeros, about 0.2 MB gzipped
TRAIN = dl.FILES["train_images"]


def write_bomb(path, header, n_zeros, level=9):
    """A gzip file of header + n_zeros zero bytes, written as a stream (never 200 MB in memory)."""
    zeros = bytes(MB)
    with gzip.open(path, "wb", compresslevel=level) as f:
        f.write(header)
        for _ in range(n_zeros // MB):
            f.write(zeros)
    return path


def train_header(count=TRAIN.count):
    return struct.pack(">IIII", dl.IMAGES_MAGIC, count, 28, 28)


def small_header():
    return struct.pack(">IIII", dl.IMAGES_MAGIC, N_SMALL, 28, 28)


def read_error(path, spec, **kwargs):
    """The MNISTError message of reading path; checks it is one line naming the file (or, for content, the spec)."""
    with pytest.raises(dl.MNISTError) as err:
        dl.read_idx_file(path, spec, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.startswith((f"{kwargs.get('name', path.name)}: ", f"{spec.name}: ")), \
        message
    return message


def peak_bytes(fn):
    """Peak traced memory while fn runs (fn's own allocations only)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# -------------------------------------------------------------------------------------- gzip bombs

def test_expected_sizes_of_the_official_files():
    assert [dl.expected_size(s) for s in dl.FILES.values()] == [47040016, 60008, 7840016, 10008]
    assert dl.compressed_limit(TRAIN) < 1.01 * dl.expected_size(TRAIN)


@pytest.fixture(scope="module")
def big_bomb(tmp_path_factory):
    """train-images header + 200 MB of zeros, gzipped (built once: a few seconds)."""
    return write_bomb(tmp_path_factory.mktemp("bomb") / "train-images-idx3-ubyte.gz", train_header(), BOMB_ZEROS)


def test_gzip_bomb_stops_at_the_expected_size_with_little_memory(big_bomb):
    bomb = big_bomb
    assert bomb.stat().st_size < MB  # the crafted file is small; its content is 200 MB
    messages = []
    peak = peak_bytes(lambda: messages.append(read_error(bomb, TRAIN)))
    limit = dl.expected_size(TRAIN)
    assert messages == [f"train-images-idx3-ubyte.gz: decompresses to more than {limit} bytes (not an MNIST file)"]
    assert peak < 1.25 * limit  # the preallocated content plus a few MB (was 459 MB before streaming)


def test_gzip_bomb_small_spec_memory_is_tiny(tmp_path):
    spec = spec_for(idx_images())
    bomb = write_bomb(tmp_path / "b.gz", small_header(), 50 * MB)  # ~50 kB gzipped: inside the compressed cap
    assert bomb.stat().st_size <= dl.compressed_limit(spec)
    messages = []
    peak = peak_bytes(lambda: messages.append(read_error(bomb, spec)))
    assert "decompresses to more than 2368 bytes (not an MNIST file)" in messages[0]
    assert peak < 4 * MB


def test_compressed_input_is_capped_before_decompressing(big_bomb):
    spec = spec_for(idx_images())  # 0.2 MB gzipped: above this spec's cap
    assert f"larger than {dl.compressed_limit(spec)} bytes compressed" in read_error(big_bomb, spec)


def test_huge_sparse_files_are_refused_without_reading(tmp_path):
    gz, raw = tmp_path / "sparse.gz", tmp_path / "sparse"
    for path, head in ((gz, b"\x1f\x8b\x08\x00"), (raw, train_header())):
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(10 << 30)  # 10 GB, no disk used
    start = time.monotonic()
    assert "larger than" in read_error(gz, TRAIN) and "compressed" in read_error(gz, TRAIN)
    assert f"too long ({10 << 30} bytes, expected 47040016)" in read_error(raw, TRAIN)
    assert time.monotonic() - start < 2.0


def test_zero_bomb_without_header_fails_on_the_header(tmp_path):
    bomb = write_bomb(tmp_path / "z.gz", b"", 60 * MB)
    messages = []
    peak = peak_bytes(lambda: messages.append(read_error(bomb, TRAIN)))
    assert "wrong magic number 0 (expected 2051)" in messages[0]
    assert peak < 1.25 * dl.expected_size(TRAIN)


def test_other_idx_file_is_named_by_its_header_before_reading_it_all(tmp_path):
    # EMNIST-like: right magic, larger count; and a label file where images are expected
    emnist = write_bomb(tmp_path / "emnist.gz", train_header(count=112800), 100 * MB)
    assert "wrong count 112800 (expected 60000)" in read_error(emnist, TRAIN)
    labels = tmp_path / "labels.gz"
    labels.write_bytes(gzip.compress(idx_labels(tuple(range(10)) * 5)))
    assert "wrong magic number 2049 (expected 2051)" in read_error(labels, spec_for(idx_images()))


def test_one_byte_too_many_inside_gzip(tmp_path):
    raw = idx_images()
    path = tmp_path / "long.gz"
    path.write_bytes(gzip.compress(raw + b"\0"))
    assert "decompresses to more than 2368 bytes" in read_error(path, spec_for(raw))


def test_bomb_from_a_mirror_is_rejected_then_next_mirror(tmp_path, server):  # noqa: F811
    base, routes, requested = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/bomb/{spec.name}.gz"] = gzip.compress(small_header() + bytes(20 * MB))
    routes[f"/good/{spec.name}.gz"] = gzip.compress(raw)
    path = dl.download(spec, tmp_path, mirrors=(base + "/bomb/", base + "/good/"), timeout=5)
    assert dl.read_idx_file(path, spec).shape == (N_SMALL, 28, 28)
    assert os.listdir(tmp_path) == [spec.name + ".gz"] and len(requested) == 2


def test_download_larger_than_the_cap_is_cut_off(tmp_path, server):  # noqa: F811
    base, routes, _ = server
    spec = spec_for(idx_images())
    routes[f"/big/{spec.name}.gz"] = b"\x1f\x8b" + bytes(dl.compressed_limit(spec) + 10)
    with pytest.raises(dl.MNISTError) as err:
        dl.download(spec, tmp_path, mirrors=(base + "/big/",), timeout=5)
    assert f"served more than {dl.compressed_limit(spec)} bytes" in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_slow_drip_download_hits_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(dl, "DOWNLOAD_DEADLINE", 0.5)
    with drip_server(length=100000, chunks=100, chunk_bytes=8) as url:  # 10 bytes every 50 ms
        start = time.monotonic()
        with pytest.raises(dl.MNISTError, match="slower than 0.5 s for one file"):
            dl.download(spec_for(idx_images()), tmp_path, mirrors=(url,), timeout=5)
        assert time.monotonic() - start < 3.0
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- damaged gzip data

def crc_flipped(raw):
    data = bytearray(gzip.compress(raw))
    data[-8] ^= 0x01  # CRC-32 of the trailer
    return bytes(data)


def length_flipped(raw):
    data = bytearray(gzip.compress(raw))
    data[-4] ^= 0x01  # ISIZE of the trailer
    return bytes(data)


@pytest.mark.parametrize("make, detail", [
    (lambda raw: gzip.compress(raw) + b"garbage!", "incorrect header check"),
    (lambda raw: gzip.compress(raw) + bytes(512), "incorrect header check"),   # zero padding
    (crc_flipped, "incorrect data check"),
    (length_flipped, "incorrect length check"),
    (lambda raw: b"\x1f\x8b", "ends early"),                                     # header cut after the magic
    (lambda raw: gzip.compress(raw)[:-1], "ends early"),
], ids=["trailing-garbage", "trailing-zeros", "bad-crc", "bad-length", "only-magic", "last-byte-cut"])
def test_damaged_gzip_is_one_line(tmp_path, make, detail):
    raw = idx_images()
    path = tmp_path / "d.gz"
    path.write_bytes(make(raw))
    message = read_error(path, spec_for(raw))
    assert "corrupt or truncated gzip data" in message and detail in message


def test_multi_member_gzip_is_read_like_gzip_does(tmp_path):
    raw = idx_images()
    path = tmp_path / "multi.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert gzip.decompress(path.read_bytes()) == raw
    np.testing.assert_array_equal(dl.read_idx_file(path, spec_for(raw)).ravel(), np.frombuffer(raw[16:], np.uint8))


def test_stream_reader_matches_gzip_on_real_sized_content(tmp_path):
    # random pixels (incompressible), several read chunks, levels 1 and 9: same bytes as the gzip module
    raw = idx_images(count=3000, seed=4)
    spec = spec_for(raw, count=3000)
    for level in (1, 9):
        path = tmp_path / f"l{level}.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=level))
        assert bytes(dl.read_content(path, spec)) == raw
    assert len(raw) > 2 * dl.READ_CHUNK


# ------------------------------------------------------------------------------------- odd files

def test_empty_files(tmp_path):
    spec = spec_for(idx_images())
    for name in ("empty", "empty.gz"):
        (tmp_path / name).write_bytes(b"")
        assert "truncated (0 bytes, shorter than the IDX header)" in read_error(tmp_path / name, spec)


def test_raw_file_with_trailing_bytes(tmp_path):
    raw = idx_images()
    path = tmp_path / "raw"
    path.write_bytes(raw + b"trailing")
    assert "too long (2376 bytes, expected 2368)" in read_error(path, spec_for(raw))


@pytest.mark.parametrize("content, message", [
    (lambda raw: raw, None),                                            # raw content with a .gz name: fine
    (lambda raw: b"<html><body>Forbidden</body></html>", f"wrong magic number {int.from_bytes(b'<htm', 'big')}"),
    (lambda raw: b"PK\x03\x04" + bytes(100), "wrong magic number 1347093252"),
    (lambda raw: b"\x1f", "truncated (1 bytes"),
], ids=["raw-named-gz", "html", "zip", "one-byte"])
def test_not_gzip_with_a_gz_name(tmp_path, content, message):
    raw = idx_images()
    path = tmp_path / "x.gz"
    path.write_bytes(content(raw))
    spec = spec_for(raw)
    if message is None:
        assert dl.read_idx_file(path, spec).shape == (N_SMALL, 28, 28)
    else:
        assert message in read_error(path, spec)


def test_directory_fifo_and_devices_are_refused_without_blocking(tmp_path):
    spec = spec_for(idx_images())
    (tmp_path / "dir.gz").mkdir()
    os.mkfifo(tmp_path / "fifo.gz")  # opening it for reading would block forever
    (tmp_path / "zero.gz").symlink_to("/dev/zero")  # endless zeros
    (tmp_path / "urandom").symlink_to("/dev/urandom")
    results = {}

    def attempt():
        for name in ("dir.gz", "fifo.gz", "zero.gz", "urandom"):
            results[name] = read_error(tmp_path / name, spec)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"blocked; done so far: {results}"
    assert results["dir.gz"] == "dir.gz: cannot read (a directory)"
    for name in ("fifo.gz", "zero.gz", "urandom"):
        assert results[name] == f"{name}: cannot read (not a regular file)"


def test_symlinks(tmp_path):
    spec = spec_for(idx_images())
    (tmp_path / "loop-a.gz").symlink_to(tmp_path / "loop-b.gz")
    (tmp_path / "loop-b.gz").symlink_to(tmp_path / "loop-a.gz")
    (tmp_path / "broken.gz").symlink_to(tmp_path / "nowhere")
    assert read_error(tmp_path / "loop-a.gz", spec) == "loop-a.gz: cannot read (Too many levels of symbolic links)"
    assert read_error(tmp_path / "broken.gz", spec) == f"broken.gz: cannot read (a broken symbolic link to " \
                                                       f"{tmp_path / 'nowhere'})"
    good = tmp_path / "good"
    good.write_bytes(gzip.compress(idx_images()))
    (tmp_path / "link.gz").symlink_to(good)  # a valid symlink is followed
    assert dl.read_idx_file(tmp_path / "link.gz", spec).shape == (N_SMALL, 28, 28)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "cannot read (a directory)"),
    (lambda p: os.symlink(p, p), "cannot read (Too many levels of symbolic links)"),
    (lambda p: os.mkfifo(p), "cannot read (not a regular file)"),
    (lambda p: os.symlink(p.parent / "gone", p), "cannot read (a broken symbolic link"),
], ids=["directory", "symlink-loop", "fifo", "broken-symlink"])
def test_load_mnist_says_why_a_present_file_is_unusable_and_does_not_download(tmp_path, monkeypatch, make, message):
    _, specs = tiny_files()
    monkeypatch.setattr(dl, "FILES", specs)
    target = tmp_path / (specs["train_images"].name + ".gz")
    make(target)
    monkeypatch.setattr(dl, "download", lambda *a, **k: pytest.fail("must not download over an unusable file"))
    with pytest.raises(dl.MNISTError) as err:
        dl.load_mnist(tmp_path)
    assert str(err.value).startswith(f"{target.name}: {message}") and "\n" not in str(err.value)


def test_permission_denied_injected(tmp_path, monkeypatch):
    path = tmp_path / "locked.gz"
    path.write_bytes(gzip.compress(idx_images()))
    real_open = os.open

    def deny(p, *args, **kwargs):
        if os.fspath(p) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(dl.os, "open", deny)
    assert read_error(path, spec_for(idx_images())) == "locked.gz: cannot read (Permission denied)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_real(tmp_path):
    path = tmp_path / "locked.gz"
    path.write_bytes(gzip.compress(idx_images()))
    path.chmod(0)
    try:
        assert read_error(path, spec_for(idx_images())) == "locked.gz: cannot read (Permission denied)"
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_read_error_midway_is_one_line(tmp_path, monkeypatch):
    raw = idx_images(count=3000, seed=4)
    path = tmp_path / "eio.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=0))  # stored: several read chunks

    class Failing:
        def __init__(self, f):
            self.f, self.reads = f, 0

        def read(self, n=-1):
            self.reads += 1
            if self.reads > 2:
                raise OSError(5, "Input/output error")
            return self.f.read(n)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real = dl._open_regular
    monkeypatch.setattr(dl, "_open_regular", lambda p, name: Failing(real(p, name)))
    assert read_error(path, spec_for(raw, count=3000)) == "eio.gz: cannot read (Input/output error)"


# -------------------------------------------------------------------------------- CLI and imports

def test_cli_on_a_bomb_is_one_error_line(tmp_path):
    write_bomb(tmp_path / "train-images-idx3-ubyte.gz", train_header(), 100 * MB, level=1)
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DIR"}
    result = subprocess.run([sys.executable, str(CODE / "data_loader.py"), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == ("error: train-images-idx3-ubyte.gz: decompresses to more than 47040016 bytes "
                             "(not an MNIST file)\n")


def test_data_loader_does_not_import_common():
    code = "import sys, data_loader; print('common' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CODE, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_zlib_max_length_zero_never_reached():
    # zlib treats max_length=0 as "no limit": the buffer always asks for at least one byte
    out = dl._CappedBuffer(spec_for(idx_images()), "x")
    out.size = out.limit
    assert out.room() == 1


class _NoHeaderCheck(dl._CappedBuffer):
    """The capped buffer without the IDX header check (for arbitrary content)."""

    def append(self, piece):
        assert self.size + len(piece) <= self.limit
        self.data[self.size:self.size + len(piece)] = piece
        self.size += len(piece)


def test_stream_reader_with_tiny_chunks_matches_gzip(monkeypatch):
    # every split of input and output: zeros (long matches), low-entropy and random bytes, all levels
    rs = np.random.RandomState(0)
    for trial in range(300):
        n = int(rs.randint(100, 20000))
        body = (bytes(n), rs.randint(0, 4, n).astype(np.uint8).tobytes(), rs.bytes(n))[trial % 3]
        compressed = gzip.compress(body, compresslevel=int(rs.randint(1, 10)))
        monkeypatch.setattr(dl, "READ_CHUNK", int(rs.randint(1, 300)))  # output bytes per call
        out = _NoHeaderCheck(dl.IdxSpec("x", dl.LABELS_MAGIC, n - 8, ""), "x")  # capped at exactly n bytes
        step = int(rs.randint(1, 64))  # input bytes per chunk
        dl._gunzip_into((compressed[i:i + step] for i in range(0, len(compressed), step)), out)
        assert bytes(out.content()) == body, (trial, n)


def test_file_chunks_cap_holds_when_the_size_lied():
    # a file that grows while read, or a /proc-like file whose stat size is 0: the stream itself is capped
    import io

    chunks = dl._file_chunks(io.BytesIO(bytes(3 * dl.READ_CHUNK)), "grown.gz", 2 * dl.READ_CHUNK)
    with pytest.raises(dl.MNISTError, match=f"grown.gz: larger than {2 * dl.READ_CHUNK} bytes compressed"):
        list(chunks)


def test_no_memory_for_the_content_is_one_line(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(idx_images()))
    spec = dl.IdxSpec("huge", dl.IMAGES_MAGIC, 1 << 40, "")  # 862 TB of pixels
    assert read_error(path, spec) == f"huge.gz: not enough memory for its {dl.expected_size(spec)} bytes"


# ------------------------------------------------------------- partial downloads: disk full, signals

def test_stale_partial_downloads_are_removed_fresh_ones_kept(tmp_path, server):  # noqa: F811
    base, routes, _ = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/m/{spec.name}.gz"] = gzip.compress(raw)
    stale = tmp_path / f".{spec.name}{dl.PART_PREFIX}killed"
    fresh = tmp_path / f".{spec.name}{dl.PART_PREFIX}running"  # another process may be downloading right now
    other = tmp_path / f".other-file{dl.PART_PREFIX}old"
    for path in (stale, fresh, other):
        path.write_bytes(b"partial")
    old = time.time() - dl.STALE_PART_SECONDS - 10
    for path in (stale, other):
        os.utime(path, (old, old))
    dl.download(spec, tmp_path, mirrors=(base + "/m/",), timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([spec.name + ".gz", fresh.name, other.name])


class _FailingWriter:
    """A file object whose write fails like a full disk (or raises what it is given)."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def write(self, data):
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_failed_write_during_download_leaves_no_partial_file(tmp_path, server, monkeypatch, error):  # noqa: F811
    base, routes, _ = server
    raw = idx_images()
    spec = spec_for(raw)
    routes[f"/m/{spec.name}.gz"] = gzip.compress(raw)
    real_fdopen = os.fdopen
    monkeypatch.setattr(dl.os, "fdopen", lambda fd, mode: _FailingWriter(real_fdopen(fd, mode), error))
    if isinstance(error, OSError):
        with pytest.raises(dl.MNISTError) as err:
            dl.download(spec, tmp_path, mirrors=(base + "/m/",), timeout=5)
        assert "No space left on device" in str(err.value) and "\n" not in str(err.value)
    else:
        with pytest.raises(KeyboardInterrupt):
            dl.download(spec, tmp_path, mirrors=(base + "/m/",), timeout=5)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum, code, word", [(15, 143, "terminated"), (2, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_cli_signal_mid_download_exits_cleanly(tmp_path, monkeypatch, signum, code, word):
    with drip_server(length=1000000, chunks=600, chunk_bytes=1000) as url:
        code_text = ("import functools, sys, data_loader as dl; "
                     f"dl.fetch_file = functools.partial(dl.fetch_file, mirrors=({url!r},)); "
                     f"sys.exit(dl.main(['--data-dir', {str(tmp_path)!r}]))")
        env = dict(os.environ, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
        proc = subprocess.Popen([sys.executable, "-c", code_text], cwd=CODE, env=env, stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not any(dl.PART_PREFIX in name for name in os.listdir(tmp_path)):
                assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
                time.sleep(0.05)
            time.sleep(0.3)
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == code and stderr == f"error: {word} (no partial file left)\n"
    assert os.listdir(tmp_path) == []


def test_data_dir_that_is_a_file_or_uses_tilde(tmp_path, monkeypatch):
    (tmp_path / "afile").write_bytes(b"")
    monkeypatch.setattr(dl, "download", lambda *a, **k: pytest.fail("must not try to download into a file"))
    with pytest.raises(dl.MNISTError, match=f"^{tmp_path / 'afile'}: not a folder"):
        dl.load_mnist(tmp_path / "afile")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MNIST_DIR", "~/data")
    assert dl.resolve_data_dir() == tmp_path / "data" and dl.resolve_data_dir("~/x") == tmp_path / "x"
