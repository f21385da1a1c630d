"""Atomic file writes: a temporary file in the target's folder, then a rename (no half-written files)."""
import os
import tempfile
from pathlib import Path

PART_PREFIX = ".part-"  # temporary files are named .<target name>.part-XXXX (ignored by git)


def default_mode():
    """Permission bits a plain open() would give a new file (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_readable(tmp, path):
    """Rename a finished temporary file over path with normal permissions (mkstemp makes them 0600)."""
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)


def atomic_write_bytes(path, data):
    """Write bytes to path through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + PART_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        replace_readable(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
