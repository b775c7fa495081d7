"""Find, verify and install backbone weights files; every file is sha256-checked.

Search order for a weights file: an explicit path, fedhead's own cache
(``$FEDHEAD_CACHE/weights``), torch's hub cache (``$TORCH_HOME/hub/checkpoints``).
Files are written atomically (temporary file, fsync, rename), so a crash never leaves
a half-written weights file under its final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedhead.common.errors import WeightsError, WeightsMismatchError, WeightsNotFoundError
from fedhead.common.files import atomic_writer

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_hash_memo: dict[tuple[str, int, int], str] = {}


WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors")
MAX_NAME_LENGTH = 128
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def weights_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain weights file name, or None if it is one.

    Names can come from the network (the server's run description); a plain name
    (no folder, no '..', no leading dot) never leaves the folder it is joined to.
    """
    if len(name) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        return (
            "not a plain file name (only letters, digits, '.', '_' and '-'; "
            "no folders, no '..', no leading dot)"
        )
    if not name.endswith(WEIGHTS_SUFFIXES):
        return f"does not end in {', '.join(WEIGHTS_SUFFIXES)}"
    return None


@dataclass(frozen=True)
class WeightsRef:
    """A weights file identified by name and sha256 (and where to download it).

    The name must be plain (``weights_name_problem``): every function here joins it
    to a folder, so an unsafe name is refused when the reference is made.
    """

    filename: str
    sha256: str
    url: str = ""
    label: str = ""  # for messages, e.g. "backbone mobilenet_v2"
    install_hint: str = ""  # how a user obtains the file

    def __post_init__(self) -> None:
        if problem := weights_name_problem(self.filename):
            raise WeightsError(
                f"{self.label or 'weights'}: file name {self.filename[:MAX_NAME_LENGTH]!r} "
                f"refused: {problem}",
                "weights files are named by plain file names only",
            )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, memoised on (path, size, mtime) within this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def fedhead_cache_dir() -> Path:
    """fedhead's cache root: ``$FEDHEAD_CACHE``, else ``$XDG_CACHE_HOME/fedhead``."""
    if env := os.environ.get("FEDHEAD_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fedhead"


def torch_checkpoint_dir() -> Path:
    """torch's hub checkpoint folder, where torchvision's ``weights=`` API looks."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def default_search_dirs(cache_dir: Path | None = None) -> list[Path]:
    return [(cache_dir or fedhead_cache_dir()) / "weights", torch_checkpoint_dir()]


def verify(path: Path, ref: WeightsRef) -> None:
    """Raise WeightsError unless ``path`` has the sha256 of ``ref``."""
    actual = sha256_file(path)
    if actual != ref.sha256:
        raise WeightsMismatchError(
            f"{ref.label or ref.filename}: {path} has sha256 {actual[:16]}…, "
            f"expected {ref.sha256[:16]}…",
            f"the file is corrupt or a different checkpoint: delete it, then "
            f"{ref.install_hint or 'obtain the correct file'}",
        )


def find_weights(
    ref: WeightsRef, search_dirs: Iterable[Path], explicit: Path | None = None
) -> Path:
    """The verified weights file for ``ref``.

    An explicit path must exist and match. In the search folders, a file with the
    right name but the wrong hash is skipped with a warning (another copy may match);
    if none matches, the error names the mismatching file.
    """
    if explicit is not None:
        if not explicit.is_file():
            raise WeightsNotFoundError(
                f"{ref.label or ref.filename}: weights file {explicit} does not exist",
                ref.install_hint or "check the path",
            )
        verify(explicit, ref)
        return explicit
    mismatch: WeightsMismatchError | None = None
    searched = []
    for folder in search_dirs:
        candidate = folder / ref.filename
        searched.append(str(folder))
        if candidate.is_file():
            try:
                verify(candidate, ref)
            except WeightsMismatchError as err:
                log.warning("%s", err)
                mismatch = mismatch or err
                continue
            return candidate
    if mismatch is not None:
        raise mismatch
    raise WeightsNotFoundError(
        f"{ref.label or ref.filename}: weights file {ref.filename} not found "
        f"(looked in {', '.join(searched)})",
        ref.install_hint or "install it first",
    )


def install_bytes(data: bytes | memoryview, ref: WeightsRef, dest_dir: Path) -> Path:
    """Verify ``data`` against ``ref`` and store it as ``dest_dir/ref.filename``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != ref.sha256:
        raise WeightsMismatchError(
            f"{ref.label or ref.filename}: received weights have sha256 {actual[:16]}…, "
            f"expected {ref.sha256[:16]}…; refusing them",
            "the copy on the sending side is corrupt or altered: check it there",
        )
    dest = dest_dir / ref.filename
    with atomic_writer(dest) as f:
        f.write(data)
    return dest


def install_file(src: Path, ref: WeightsRef, dest_dir: Path) -> Path:
    """Verify ``src`` against ``ref`` and copy it atomically into ``dest_dir``."""
    verify(src, ref)
    dest = dest_dir / ref.filename
    if dest.is_file() and sha256_file(dest) == ref.sha256:
        return dest
    with atomic_writer(dest) as out, src.open("rb") as inp:
        shutil.copyfileobj(inp, out, _CHUNK)
    verify(dest, ref)
    return dest


def download(ref: WeightsRef, dest_dir: Path) -> Path:
    """Download ``ref.url`` into ``dest_dir``, verifying the sha256 before it lands."""
    if not ref.url:
        raise WeightsError(f"{ref.label or ref.filename}: no download URL is known")
    from torch.hub import download_url_to_file

    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{ref.filename}.", suffix=".part", dir=dest_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            download_url_to_file(ref.url, str(tmp), progress=False)
        except OSError as err:  # URLError, timeouts, DNS: all OSError subclasses
            raise WeightsError(
                f"{ref.label or ref.filename}: download from {ref.url} failed ({err})",
                ref.install_hint or "install the file by hand",
            ) from err
        verify(tmp, ref)
        dest = dest_dir / ref.filename
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)
