"""Writing files safely: whole files atomically, log lines appended in one write."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(dest: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Write to a temporary file beside ``dest`` and rename it into place on success.

    The data are fsynced before the rename, so a crash leaves either the old file or
    the complete new one, never a part.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the folder's entry list reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Fill a temporary folder beside ``dest`` and rename it into place on success.

    Write every file in the yielded folder (through ``atomic_writer`` or fsynced); a
    crash leaves no ``dest`` or the complete one. ``dest`` must not exist yet: a folder
    is never replaced.
    """
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_line(path: Path, line: str, mode: int = 0o600) -> None:
    """Append one line to ``path`` (created with ``mode``) in a single ``write``.

    O_APPEND makes each write land whole at the end, also with several processes
    appending to the same file; a reader never sees two lines interleaved.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object
    (status and report files that a run may not have written yet)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (nested in dicts and lists) replaced by
    None: NaN is not JSON, so files write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
