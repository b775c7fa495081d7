"""Checkpoints: the format of one round's saved state, the folder that keeps them, and
the ``Checkpointer`` the round loop calls after every round.

A checkpoint is ``<out-dir>/checkpoints/round-NNNN.safetensors``: the global head plus,
in the file's metadata, everything a resumed run needs (round, run config and its
fingerprint, the model's identity, the privacy ledger's released rounds, RNG state,
the results so far, the server optimizer's settings and step count; its moments are
tensors beside the head). Each write is atomic (temporary file, fsync, rename): a crash
leaves the previous checkpoint intact. The folder keeps the newest ``keep-checkpoints``
and the best (by federated evaluation accuracy) and an ``index.json`` naming both.
Whether and how a run continues from a checkpoint is ``server.resume``'s business.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from fedhead.common.errors import ConfigError
from fedhead.common.files import atomic_writer, json_safe
from fedhead.common.heads import head_bytes, head_sha256
from fedhead.common.rounds import RoundResult
from fedhead.server.rundir import RunDir

if TYPE_CHECKING:  # `fedhead status` reads checkpoints without torch or the strategy
    from fedhead.server.aggregation import Arrays
    from fedhead.server.optimizers import ServerOptimizer

log = logging.getLogger(__name__)

FORMAT = 1
META_KEY = "fedhead.checkpoint"
HEAD_PREFIX = "head/"
RNG_NUMPY, RNG_TORCH = "rng/numpy", "rng/torch"
OPTIMIZER_PREFIX = "server_optimizer/"  # + "<slot>/<tensor name>": the moments, float64
STATISTICS = "closed_form/statistics"  # a closed-form run's summed statistics, float64
BEST_METRIC = "eval_accuracy"  # federated evaluation, example-weighted over sites
ROUND_HEADS = "round_heads"  # checkpoint metadata: round -> head sha256
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.safetensors$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, damaged, or for another model)."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem], "resume")


@dataclass(frozen=True)
class Checkpoint:
    """One round's saved state (see the module docstring for what ``meta`` holds)."""

    round: int
    names: list[str]
    arrays: Arrays
    meta: dict[str, Any]
    path: Path
    rng: dict[str, np.ndarray]  # the RNG states too large for the metadata
    optimizer: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # by tensor key
    statistics: np.ndarray | None = None  # a closed-form run's summed statistics

    @property
    def complete(self) -> bool:
        """Whether its round is complete; a closed-form statistics round is not until the
        sites chose its head (then the sum is here, and resuming solves it again)."""
        closed_form = self.meta.get("closed_form") or {}
        return not (closed_form and closed_form.get("chosen") is None)

    @property
    def results(self) -> list[RoundResult]:
        return [_round_result(r) for r in self.meta["results"]]

    @property
    def excluded(self) -> dict[int, str]:
        """The sites the run left out (node -> why) by the end of this round."""
        return {int(k): str(v) for k, v in (self.meta.get("excluded") or {}).items()}

    @property
    def strategy(self) -> str:
        """The run's server optimizer (checkpoints from before there was a choice: fedavg)."""
        return str(self.meta.get("config", {}).get("strategy", "fedavg"))

    def restore_optimizer(self, optimizer: ServerOptimizer) -> None:
        """Give ``optimizer`` the state it had after this checkpoint's round."""
        meta = self.meta.get("server_optimizer")
        if meta is None:
            raise CheckpointError(
                f"resume-from: {self.path.name} holds no server-optimizer state for strategy "
                f"{optimizer.settings.name}"
            )
        slots = {
            slot: [self.optimizer[f"{OPTIMIZER_PREFIX}{slot}/{n}"] for n in self.names]
            for slot in meta.get("slots", [])
        }
        for slot, arrays in slots.items():
            for name, moment, head in zip(self.names, arrays, self.arrays, strict=True):
                if moment.shape != head.shape:
                    raise CheckpointError(
                        f"resume-from: {self.path.name}: the server optimizer's {slot} of "
                        f"{name} has shape {moment.shape}, the tensor {head.shape}"
                    )
        try:
            optimizer.load_state(meta, slots)
        except ValueError as err:
            raise CheckpointError(f"resume-from: {self.path.name}: {err}") from err

    def restore_rng(self) -> None:
        """Put Python's, NumPy's and torch's global RNGs back where they were."""
        rng = self.meta["rng"]
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))
        name, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, self.rng[RNG_NUMPY], pos, has_gauss, cached))
        import torch

        torch.set_rng_state(torch.from_numpy(self.rng[RNG_TORCH].copy()))


def _round_result(d: Mapping[str, Any]) -> RoundResult:
    fields = {f.name: f for f in dataclasses.fields(RoundResult)}
    values: dict[str, Any] = {
        k: (math.nan if v is None and fields[k].type == "float" else v)
        for k, v in d.items()
        if k in fields
    }
    return RoundResult(**values)


RngState = tuple[dict[str, Any], dict[str, np.ndarray]]  # (JSON part, tensor part)


def _rng_state() -> RngState:
    import torch

    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(state), gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return meta, {RNG_NUMPY: np.asarray(keys), RNG_TORCH: torch.get_rng_state().numpy()}


class CheckpointStore:
    """The checkpoints of one run: ``round-NNNN.safetensors`` files and ``index.json``."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = folder
        self.keep = keep

    def rounds(self) -> dict[int, Path]:
        """Checkpoint files by round (complete files only: partial writes are hidden)."""
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.iterdir():
            if m := _ROUND_FILE.match(path.name):
                found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def path_of(self, rnd: int) -> Path:
        return self.folder / f"round-{rnd:04d}.safetensors"

    def save(
        self,
        rnd: int,
        names: list[str],
        arrays: Arrays,
        meta: dict[str, Any],
        extra: dict[str, np.ndarray] | None = None,
        rng: RngState | None = None,
    ) -> tuple[Path, int]:
        """Write round ``rnd`` atomically, update the index, prune; returns (path, best
        round). ``rng``: the random states to restore on resuming (default: now's)."""
        rng_meta, rng_tensors = rng or _rng_state()
        meta = {
            **meta,
            "format": FORMAT,
            "round": rnd,
            "tensors": names,
            "head_sha256": head_sha256(names, arrays),
            "rng": rng_meta,
            "saved": time.time(),
        }
        tensors = {HEAD_PREFIX + n: a for n, a in zip(names, arrays, strict=True)}
        tensors.update(rng_tensors)
        tensors.update(extra or {})
        blob = head_bytes(list(tensors), list(tensors.values()), {META_KEY: json.dumps(meta)})
        path = self.path_of(rnd)
        with atomic_writer(path) as f:
            f.write(blob)
        best = self._best(meta["results"], rnd)
        self._write_index(rnd, best, meta["results"])
        self._prune(rnd, best)
        return path, best

    def _best(self, results: list[dict[str, Any]], last: int) -> int:
        """The kept round with the highest federated evaluation accuracy (ties: the
        later one); the last round when none was evaluated."""
        kept = self.rounds()
        scored = [
            (float(r[BEST_METRIC]), r["round"])
            for r in results
            if r["round"] in kept and r.get(BEST_METRIC) is not None
            if math.isfinite(float(r[BEST_METRIC]))
        ]
        return max(scored)[1] if scored else last

    def _write_index(self, last: int, best: int, results: list[dict[str, Any]]) -> None:
        by_round = {r["round"]: r for r in results}
        index = {
            "last": {"round": last, "file": self.path_of(last).name},
            "best": {
                "round": best,
                "file": self.path_of(best).name,
                "metric": BEST_METRIC,
                "value": by_round.get(best, {}).get(BEST_METRIC),
            },
        }
        with atomic_writer(self.folder / "index.json") as f:
            f.write((json.dumps(json_safe(index), indent=2) + "\n").encode())

    def _prune(self, last: int, best: int) -> None:
        rounds = self.rounds()
        newest = sorted(r for r in rounds if r <= last)[-self.keep :]
        for rnd, path in rounds.items():
            if rnd not in newest and rnd != best:
                path.unlink(missing_ok=True)
        for stale in self.folder.glob(".round-*.part"):  # left by a write that was cut off
            stale.unlink(missing_ok=True)

    def load(self, rnd: int | None = None) -> Checkpoint:
        """Round ``rnd``, or the newest checkpoint that reads back whole."""
        rounds = self.rounds()
        if rnd is not None:
            if rnd not in rounds:
                raise CheckpointError(f"resume-from: no checkpoint of round {rnd} in {self.folder}")
            return read_checkpoint(rounds[rnd])
        problems = []
        for candidate in sorted(rounds, reverse=True):
            try:
                return read_checkpoint(rounds[candidate])
            except CheckpointError as err:
                problems.append(str(err))
                log.warning("skipping a damaged checkpoint: %s", err)
        raise CheckpointError(
            f"resume-from: no usable checkpoint in {self.folder}"
            + (f" ({problems[0]})" if problems else "")
        )


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file (its head must match its recorded sha256)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # damaged file: safetensors and json raise their own types
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__})"
        ) from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    names = list(meta["tensors"])
    try:
        arrays = [tensors[HEAD_PREFIX + n] for n in names]
    except KeyError as err:
        raise CheckpointError(f"{path}: tensor {err} is missing") from err
    if head_sha256(names, arrays) != meta["head_sha256"]:
        raise CheckpointError(f"{path}: the head does not match its recorded sha256")
    rng = {k: tensors[k] for k in (RNG_NUMPY, RNG_TORCH)}
    optimizer = {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
    meta_opt = meta.get("server_optimizer") or {}
    missing = [
        f"{OPTIMIZER_PREFIX}{slot}/{n}"
        for slot in meta_opt.get("slots", [])
        for n in names
        if f"{OPTIMIZER_PREFIX}{slot}/{n}" not in optimizer
    ]
    if missing:
        raise CheckpointError(f"{path}: server-optimizer tensor {missing[0]!r} is missing")
    statistics = tensors.get(STATISTICS)
    if (meta.get("closed_form") or {}).get("chosen", "") is None and statistics is None:
        raise CheckpointError(f"{path}: the closed-form statistics are missing")
    return Checkpoint(int(meta["round"]), names, arrays, meta, path, rng, optimizer, statistics)


def holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` (a checkpoints folder) holds any complete checkpoint."""
    return bool(CheckpointStore(folder).rounds())


def checkpoint_folder(path: Path) -> Path:
    """The checkpoints folder that ``path`` (an out-dir or the folder itself) names."""
    inside = RunDir(path).checkpoints
    return inside if inside.is_dir() else path


@dataclass(frozen=True)
class RoundState:
    """What a round's checkpoint holds beyond the head and the results: the privacy
    ledger's state (``server.privacy``) and the server optimizer's, as they are after
    the round."""

    privacy: dict[str, Any] | None = None
    optimizer: ServerOptimizer | None = None
    # a closed-form run: how its head was chosen (``server.closed_form``) and the summed
    # statistics it was solved from (released ones, under differential privacy)
    closed_form: dict[str, Any] | None = None
    statistics: np.ndarray | None = None
    excluded: dict[str, str] | None = None  # node -> why it is left out of the run

    def meta(self) -> dict[str, Any]:
        opt = self.optimizer.state()[0] if self.optimizer is not None else None
        meta = {"privacy": self.privacy, "server_optimizer": opt, "excluded": self.excluded}
        return meta | ({"closed_form": self.closed_form} if self.closed_form else {})

    def tensors(self, names: list[str]) -> dict[str, np.ndarray]:
        out = {} if self.statistics is None else {STATISTICS: self.statistics}
        if self.optimizer is None:
            return out
        return out | {
            f"{OPTIMIZER_PREFIX}{slot}/{n}": a
            for slot, arrays in self.optimizer.state()[1].items()
            for n, a in zip(names, arrays, strict=True)
        }


@dataclass(frozen=True)
class _Saved:
    """What a round's checkpoint holds besides the run's results."""

    round: int
    arrays: Arrays
    meta: dict[str, Any]
    extra: dict[str, np.ndarray]
    rng: RngState


class Checkpointer:
    """Saves a checkpoint after every round and keeps the run state's round fields.

    The round loop calls it: ``round_started``, ``round_trained`` (the head is saved at
    once), ``round_completed`` (the round's evaluation arrived: the same checkpoint is
    written again with it) and ``finished``.
    """

    def __init__(
        self,
        run_dir: RunDir,
        keep: int,
        names: list[str],
        meta: dict[str, Any],
        resumed: Checkpoint | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.store = CheckpointStore(run_dir.checkpoints, keep)
        self.names = names
        self.meta = meta  # the run's part of every checkpoint's metadata (server.resume)
        self.results: list[dict[str, Any]] = list(resumed.meta["results"]) if resumed else []
        # sha256 of the global head after each round: the heads sites trained from, which
        # a site names to prove it trained in the run when it asks for a missed model.
        self.round_heads: dict[str, str] = (
            dict(resumed.meta.get(ROUND_HEADS, {})) if resumed else {}
        )
        self.running = 0  # the round in progress (the run state's round_running)
        self._last: _Saved | None = None  # the newest checkpoint's content

    def round_started(self, server_round: int) -> None:
        self.running = server_round
        self.run_dir.update(round_running=server_round)

    def round_trained(self, result: RoundResult, arrays: Arrays, state: RoundState) -> None:
        """Save the round's head at once, with the optimizer, privacy and random states
        of this moment; its evaluation, when it comes later, is added to the same
        checkpoint (``round_completed``)."""
        self.results = [r for r in self.results if r["round"] < result.round]
        self.round_heads = {k: v for k, v in self.round_heads.items() if int(k) < result.round} | {
            str(result.round): head_sha256(self.names, arrays)
        }
        self.results.append(dataclasses.asdict(result))
        self._last = _Saved(
            result.round,
            [a.copy() for a in arrays],
            {**self.meta, **state.meta()},
            state.tensors(self.names),
            _rng_state(),
        )
        self._save(self._last)

    def round_completed(self, result: RoundResult) -> None:
        """The round is complete: its checkpoint gets the round's final result."""
        complete = dataclasses.asdict(result)
        last = self._last
        if last is None or last.round != result.round or self.results[-1] == complete:
            return
        self.results[-1] = complete
        self._save(last)

    def _save(self, saved: _Saved) -> None:
        meta = {**saved.meta, "results": self.results, ROUND_HEADS: self.round_heads}
        path, best = self.store.save(
            saved.round, self.names, saved.arrays, meta, saved.extra, saved.rng
        )
        self.run_dir.update(
            rounds_done=saved.round,
            # a round completes once its evaluation is in: maybe during the next one
            round_running=self.running if self.running > saved.round else None,
            round_heads=self.round_heads,
            last_checkpoint=str(path),
            best_checkpoint=str(self.store.path_of(best)),
        )
