"""Frozen-trunk feature extraction with a persistent, content-keyed feature cache.

A frozen trunk in eval mode maps the same image to the same features every time, so
each image goes through the trunk once; later epochs, rounds and runs read the cache.

The cache is one SQLite database per cache folder (``features.sqlite``). A row is keyed
by a namespace (backbone sha256 + preprocessing + trunk cut) and the image's content
sha256, so a changed image, transform or backbone is recomputed and nothing stale is
read. SQLite's transactions make it safe against a crash mid-write; a database that is
nevertheless corrupt is moved aside and rebuilt. Disk use is bounded: least recently
used rows are evicted past the budget. Features never leave the site.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedhead.common.device import Device
from fedhead.common.images import ImageDecodeError, ImageSource, Preprocessor
from fedhead.common.model import FedHeadModel

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    ns TEXT NOT NULL, key TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
    nbytes INTEGER NOT NULL, used REAL NOT NULL, PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS features_used ON features (used);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
) WITHOUT ROWID;
"""
_SQL_VARS = 500  # keys per IN (...) query, below SQLite's variable limit


def cache_namespace(backbone_sha256: str, preprocess: Preprocessor, unfreeze_blocks: int) -> str:
    """Which trunk, preprocessing and cut produced a feature: part of every cache key."""
    blob = f"{backbone_sha256}|{preprocess.fingerprint()}|cut-{unfreeze_blocks}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_OPEN: dict[tuple[str, int, int], FeatureCache] = {}


def open_cache(path: Path, max_bytes: int = 5 * 1024**3) -> FeatureCache:
    """The thread's one connection to the cache at ``path`` (opened and checked once).

    Per thread, as SQLite connections may not cross threads: the demo's ServerApp
    evaluates in the simulation's thread, its centralized baseline in the main one."""
    key = (str(path.resolve()), max_bytes, threading.get_ident())
    if key not in _OPEN:
        _OPEN[key] = FeatureCache(path, max_bytes)
    return _OPEN[key]


class FeatureCache:
    """Persistent features keyed by (namespace, image content sha256), bounded in size."""

    def __init__(self, path: Path, max_bytes: int = 5 * 1024**3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        for attempt in range(2):
            db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                if attempt == 0 and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("quick_check failed")
                return db
            except sqlite3.DatabaseError as err:
                db.close()
                if attempt:
                    raise
                aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
                log.warning("feature cache %s is corrupt (%s); moved to %s", self.path, err, aside)
                self.path.rename(aside)
                for suffix in ("-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def get_many(self, ns: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _SQL_VARS):
            chunk = unique[start : start + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, shape, data FROM features WHERE ns=? AND key IN ({marks})",
                [ns, *chunk],
            ).fetchall()
            for key, shape, data in rows:
                dims = tuple(int(d) for d in shape.split("x")) if shape else ()
                out[key] = np.frombuffer(data, dtype=np.float16).reshape(dims)
        if out:
            now = time.time()
            self._db.executemany(
                "UPDATE features SET used=? WHERE ns=? AND key=?", [(now, ns, k) for k in out]
            )
        return out

    def put_many(self, ns: str, items: Iterable[tuple[str, np.ndarray]]) -> None:
        now = time.time()
        rows = []
        for key, arr in items:
            half = np.ascontiguousarray(arr, dtype=np.float16)
            shape = "x".join(str(d) for d in half.shape)
            rows.append((ns, key, shape, half.tobytes(), half.nbytes, now))
        if not rows:
            return
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO features VALUES (?,?,?,?,?,?)", rows)
        self._evict()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Commit on success, roll back on error (the connection is in autocommit mode)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def total_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM features").fetchone()[0])

    def _evict(self) -> None:
        total = self.total_bytes()
        if total <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)
        with self._transaction():
            cur = self._db.execute("SELECT ns, key, nbytes FROM features ORDER BY used")
            doomed = []
            for ns, key, nbytes in cur:
                if total <= target:
                    break
                doomed.append((ns, key))
                total -= nbytes
            self._db.executemany("DELETE FROM features WHERE ns=? AND key=?", doomed)
        log.info("feature cache: evicted %d least recently used rows", len(doomed))

    # --- file content hashes, memoised by (path, size, mtime) ---------------------
    def lookup_hash(self, path: Path, size: int, mtime_ns: int) -> str | None:
        row = self._db.execute(
            "SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?",
            (str(path), size, mtime_ns),
        ).fetchone()
        return None if row is None else str(row[0])

    def store_hash(self, path: Path, size: int, mtime_ns: int, digest: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?)",
            (str(path), size, mtime_ns, digest),
        )


@dataclass
class ExtractionStats:
    images: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    extracted: int = 0
    extract_seconds: float = 0.0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Features:
    """Trunk outputs for the usable images of a source, in source order."""

    values: torch.Tensor  # (n_ok, ...) float32
    ok: np.ndarray  # indices into the source of the images that were usable
    stats: ExtractionStats


class _Misses(torch.utils.data.Dataset[tuple[int, torch.Tensor | None]]):
    """The images to extract, decoded and preprocessed one by one (in DataLoader workers)."""

    def __init__(self, images: ImageSource, indices: list[int], preprocess: Preprocessor) -> None:
        self.images = images
        self.indices = indices
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor | None]:
        try:
            return j, self.preprocess([self.images.load(self.indices[j])])[0]
        except ImageDecodeError:
            return j, None


def _collate(
    items: list[tuple[int, torch.Tensor | None]],
) -> tuple[list[int], list[int], torch.Tensor]:
    ok = [(j, x) for j, x in items if x is not None]
    failed = [j for j, x in items if x is None]
    batch = torch.stack([x for _, x in ok]) if ok else torch.empty(0)
    return [j for j, _ in ok], failed, batch


def default_workers(device: Device) -> int:
    """DataLoader workers for decoding: on CUDA, enough to keep the GPU fed; on CPU none,
    since the trunk needs every core and decoding is cheap beside it."""
    if device.kind != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(eq=False, repr=False)
class FeatureExtractor:
    """Runs the frozen part of a ``FedHeadModel`` over image sources, through the cache.

    Images are batched. On CUDA the trunk runs in mixed precision with channels_last
    memory layout, fed by DataLoader workers into pinned memory; on CPU it runs in
    the calling process with torch's intra-op threads on every core.
    """

    model: FedHeadModel
    preprocess: Preprocessor
    device: Device
    backbone_sha256: InitVar[str]  # with the preprocessing, names the cache's namespace
    cache: FeatureCache | None = None
    batch_size: int = 64
    progress: bool = False
    workers: InitVar[int | None] = None  # DataLoader workers (None: default_workers)
    # Builds the model that extracts at the first cache miss; ``model`` may then be the
    # head alone, since cached features need no trunk.
    trunk: Callable[[], FedHeadModel] | None = None
    loader_workers: int = field(init=False)
    namespace: str = field(init=False)
    channels_last: bool = field(init=False)

    def __post_init__(self, backbone_sha256: str, workers: int | None) -> None:
        self.loader_workers = default_workers(self.device) if workers is None else workers
        self.namespace = cache_namespace(
            backbone_sha256, self.preprocess, self.model.unfreeze_blocks
        )
        self.channels_last = self.device.kind == "cuda"
        if self.trunk is None:
            self._place(self.model)

    def _place(self, model: FedHeadModel) -> None:
        model.frozen.to(self.device.torch_device)
        model.pool.to(self.device.torch_device)
        if self.channels_last:
            model.frozen.to(memory_format=torch.channels_last)

    def _trunk_model(self) -> FedHeadModel:
        """The model that extracts: ``model``, or ``trunk()`` built at the first cache miss
        (``model`` may then be the head alone: cached features need no trunk)."""
        if self.trunk is not None:
            self.model = self.trunk()
            self.trunk = None
            self._place(self.model)
        return self.model

    def __call__(self, images: ImageSource) -> Features:
        stats = ExtractionStats(images=len(images))
        keys: list[str | None] = []
        for i in range(len(images)):
            try:
                keys.append(images.key(i))
            except ImageDecodeError as err:
                keys.append(None)
                self._note_failure(stats, str(err))
        wanted = [k for k in keys if k is not None]
        found = self.cache.get_many(self.namespace, wanted) if self.cache else {}
        stats.cache_hits = sum(1 for k in wanted if k in found)
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k is not None and k not in found and k not in todo:
                todo[k] = i
        stats.cache_misses = len(todo)
        if todo:
            found.update(self._extract(images, todo, stats))
        ok = np.array([i for i, k in enumerate(keys) if k is not None and k in found], np.int64)
        stats.skipped = len(images) - len(ok)  # every unusable image, duplicates included
        if len(ok):
            values = torch.from_numpy(np.stack([found[keys[i]] for i in ok])).float()
        else:
            values = torch.empty(0)
        return Features(values=values, ok=ok, stats=stats)

    def _note_failure(self, stats: ExtractionStats, why: str) -> None:
        if len(stats.skipped_examples) < 5:
            stats.skipped_examples.append(why)
        log.warning("skipping image: %s", why)

    def _batches(
        self, images: ImageSource, indices: list[int], stats: ExtractionStats
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(positions in ``indices``, preprocessed batch) for every decodable image."""
        if self.loader_workers == 0:
            for start in range(0, len(indices), self.batch_size):
                positions, arrays = [], []
                for j in range(start, min(start + self.batch_size, len(indices))):
                    try:
                        arrays.append(images.load(indices[j]))
                        positions.append(j)
                    except ImageDecodeError as err:
                        self._note_failure(stats, str(err))
                if arrays:
                    yield positions, self.preprocess(arrays)
            return
        loader = torch.utils.data.DataLoader(
            _Misses(images, indices, self.preprocess),
            batch_size=self.batch_size,
            num_workers=self.loader_workers,
            pin_memory=self.device.kind == "cuda",
            collate_fn=_collate,
            prefetch_factor=4,
        )
        for positions, failed, batch in loader:
            for j in failed:
                self._note_failure(stats, f"{images.describe(indices[j])}: not a readable image")
            if positions:
                yield positions, batch

    def _extract(
        self, images: ImageSource, todo: dict[str, int], stats: ExtractionStats
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        keys, indices = list(todo), list(todo.values())
        dev = self.device.torch_device
        # A bar for long extractions (short ones stay quiet); on a log rather than a
        # terminal, tqdm writes a line at most every 10 s.
        show = (self.progress or len(indices) >= 2048) and len(indices) >= 256
        progress = tqdm(
            total=len(indices),
            desc="extracting trunk features",
            unit="img",
            disable=not show,
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )
        t0 = time.perf_counter()
        model = self._trunk_model()
        for positions, batch in self._batches(images, indices, stats):
            x = batch.to(dev, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self.device.autocast():
                z = model.extract(x)
            # Stored as float16: round fresh features the same way, so a run that
            # extracts and a run that reads the cache train on identical values.
            z_np = z.float().cpu().numpy().astype(np.float16)
            new = [(keys[j], z_np[n]) for n, j in enumerate(positions)]
            out.update(new)
            stats.extracted += len(new)
            if self.cache:
                self.cache.put_many(self.namespace, new)
            progress.update(len(positions))
        progress.close()
        stats.extract_seconds = time.perf_counter() - t0
        return out
