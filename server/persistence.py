"""Checkpoints and run status: the one place a run's state touches the disk.

``Checkpointer`` observes the round loop (it never changes what the loop does) and,
after every round, writes ``<out-dir>/checkpoints/round-NNNN.safetensors``: the global
head plus, in the file's metadata, everything a resumed run needs (round, run config
and its fingerprint, the model's identity, the privacy ledger's released rounds,
RNG state, the results so far, the server optimizer's settings and step count; its
moments are tensors beside the head). Each write is atomic (temporary file, fsync,
rename): a crash leaves the previous checkpoint intact. It keeps the newest
``keep-checkpoints`` and the best (by federated evaluation accuracy) and writes
``<out-dir>/status.json`` (running, finished or failed, with the reason) for
``fedhead runs``.

``load_resume`` is the other side: it finds the checkpoint a ``resume-from`` names,
and refuses one whose model differs from the run's in anything that shapes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError
from fedhead.common.files import atomic_writer, json_safe
from fedhead.common.heads import head_bytes, head_sha256
from fedhead.common.protocol import ModelDescription
from fedhead.common.rounds import RoundResult
from fedhead.server.aggregation import Arrays
from fedhead.server.distribution import PrepareOutcome
from fedhead.server.optimizers import ServerOptimizer
from fedhead.server.secure import PrivacyEvent, PrivacyLedger

log = logging.getLogger(__name__)

FORMAT = 1
META_KEY = "fedhead.checkpoint"
HEAD_PREFIX = "head/"
RNG_NUMPY, RNG_TORCH = "rng/numpy", "rng/torch"
OPTIMIZER_PREFIX = "server_optimizer/"  # + "<slot>/<tensor name>": the moments, float64
BEST_METRIC = "eval_accuracy"  # federated evaluation, example-weighted over sites
CHECKPOINTS = "checkpoints"
STATUS_FILE = "status.json"
ROUND_HEADS = "round_heads"  # status.json and checkpoint metadata: round -> head sha256
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.safetensors$")

# Run-config keys that shape the model: a checkpoint only resumes a run that agrees on
# all of them (and on the resolved backbone sha256, input size and trainable set).
MODEL_KEYS = ("backbone", "classes", "head", "head-hidden", "unfreeze-blocks")
# Keys that say where and how patiently a run works, not what it computes.
OPERATIONAL_KEYS = frozenset(
    {"out-dir", "resume-from", "keep-checkpoints", "join-timeout", "round-timeout", "device"}
    | {"download-weights", "backbone-weights"}
)


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the settings that determine what a run computes."""
    settings = {k: v for k, v in cfg.to_mapping().items() if k not in OPERATIONAL_KEYS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def model_identity(
    cfg: RunConfig, backbone_sha256: str, trainable_fingerprint: str
) -> dict[str, Any]:
    """What a checkpoint's head only fits: compared key by key on resume."""
    mapping = cfg.to_mapping()
    identity: dict[str, Any] = {k: mapping[k] for k in MODEL_KEYS}
    identity["backbone-sha256"] = backbone_sha256
    identity["input-size"] = cfg.resolved_input_size()
    identity["trainable-set"] = trainable_fingerprint
    return identity


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

    @property
    def results(self) -> list[RoundResult]:
        return [_round_result(r) for r in self.meta["results"]]

    @property
    def privacy_events(self) -> list[PrivacyEvent]:
        privacy = self.meta.get("privacy") or {}
        return [(float(e[0]), int(e[1]), int(e[2])) for e in privacy.get("released", [])]

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
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(state), gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return meta, {RNG_NUMPY: np.asarray(keys), RNG_TORCH: torch.get_rng_state().numpy()}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, damaged, or for another model)."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem], "resume")


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
        path = self.folder / f"round-{rnd:04d}.safetensors"
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
            "last": {"round": last, "file": f"round-{last:04d}.safetensors"},
            "best": {
                "round": best,
                "file": f"round-{best:04d}.safetensors",
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
    return Checkpoint(int(meta["round"]), names, arrays, meta, path, rng, optimizer)


def checkpoint_folder(path: Path) -> Path:
    """The checkpoints folder that ``path`` (an out-dir or the folder itself) names."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    return path


def has_checkpoints(out_dir: Path) -> bool:
    return bool(CheckpointStore(out_dir / CHECKPOINTS).rounds())


def load_resume(cfg: RunConfig, out_dir: Path) -> Checkpoint | None:
    """The checkpoint this run continues from, or None for a fresh run.

    A fresh run refuses an out-dir that already holds checkpoints: nothing is
    overwritten silently.
    """
    if not cfg.resume_from:
        if has_checkpoints(out_dir):
            raise ConfigError(
                [
                    f"out-dir: {out_dir} already holds checkpoints of an earlier run; set "
                    f"resume-from='{out_dir}' to continue it, or choose another out-dir"
                ],
                "run configuration",
            )
        return None
    source = Path(cfg.resume_from).expanduser().absolute()
    if source.is_file():
        ckpt = read_checkpoint(source)
    else:
        folder = checkpoint_folder(source)
        if not CheckpointStore(folder).rounds():
            raise CheckpointError(f"resume-from: {source} holds no checkpoints")
        ckpt = CheckpointStore(folder).load()
    if checkpoint_folder(out_dir) != ckpt.path.parent and has_checkpoints(out_dir):
        raise ConfigError(
            [
                f"out-dir: {out_dir} already holds checkpoints of another run; resume into "
                f"the out-dir of the run in resume-from, or choose an empty out-dir"
            ],
            "run configuration",
        )
    held = CheckpointStore(checkpoint_folder(out_dir)).rounds()
    if checkpoint_folder(out_dir) == ckpt.path.parent and max(held, default=0) > ckpt.round:
        raise ConfigError(
            [
                f"resume-from: {out_dir} holds checkpoints after round {ckpt.round}, which "
                "resuming there would replace; resume from the last one, or into another "
                "out-dir"
            ],
            "run configuration",
        )
    if ckpt.round >= cfg.num_server_rounds:
        raise CheckpointError(
            f"resume-from: {ckpt.path.name} is round {ckpt.round} of a run of "
            f"{cfg.num_server_rounds} rounds: nothing is left to train (raise "
            "num-server-rounds to train on)"
        )
    return ckpt


def check_resume(ckpt: Checkpoint, identity: Mapping[str, Any], names: list[str]) -> None:
    """Refuse a checkpoint whose model differs from the run's, naming the first difference."""
    saved = ckpt.meta["model"]
    for key, value in identity.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"resume-from: the checkpoint's model has {key}={saved.get(key)!r} but this "
                f"run has {key}={value!r}; resume with the run's original settings"
            )
    if ckpt.names != names:
        raise CheckpointError("resume-from: the checkpoint holds other tensors than this model")


def check_strategy(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """Refuse to switch server optimizers mid-run: the saved state (or its absence) only
    fits the strategy that wrote it."""
    if ckpt.strategy != cfg.strategy:
        raise CheckpointError(
            f"resume-from: the checkpoint's rounds ran strategy={ckpt.strategy} but this run "
            f"has strategy={cfg.strategy}; resume with strategy={ckpt.strategy}, or start a "
            "new run"
        )


def config_changes(ckpt: Checkpoint, cfg: RunConfig) -> list[str]:
    """Settings (beyond the model's) that differ from the checkpoint's run: allowed,
    but the resumed run then computes something else than the original would have."""
    if ckpt.meta.get("config_fingerprint") == config_fingerprint(cfg):
        return []
    saved, now = ckpt.meta.get("config", {}), cfg.to_mapping()
    return [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in OPERATIONAL_KEYS and saved.get(k) != v
    ]


class RunStatus:
    """``status.json``: running, finished or failed (with the reason), rewritten atomically."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path = path
        self.fields: dict[str, Any] = {
            "state": "running",
            "reason": "",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            **fields,
        }

    def update(self, **fields: Any) -> None:
        self.fields.update(fields, updated=time.time())
        with atomic_writer(self.path) as f:
            f.write((json.dumps(json_safe(self.fields), indent=2) + "\n").encode())

    def failed(self, err: BaseException) -> None:
        """The run stopped with ``err``: the reason is its one-line message."""
        reason = str(err) or type(err).__name__
        self.update(state="failed", round_running=None, reason=f"{type(err).__name__}: {reason}")


@dataclass(frozen=True)
class FinalModel:
    """The run's result: the final head and what it is."""

    names: list[str]
    arrays: Arrays
    description: ModelDescription


@dataclass(frozen=True)
class _Saved:
    """What a round's checkpoint holds besides the run's results."""

    round: int
    arrays: Arrays
    meta: dict[str, Any]
    extra: dict[str, np.ndarray]
    rng: RngState


class Checkpointer:
    """A RunObserver that saves a checkpoint after every round and keeps status.json."""

    def __init__(
        self,
        store: CheckpointStore,
        status: RunStatus,
        run_id: int,
        cfg: RunConfig,
        identity: dict[str, Any],
        names: list[str],
        privacy: Callable[[], PrivacyLedger | None],
        resumed: Checkpoint | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        self.store = store
        self.status = status
        self.names = names
        self.privacy = privacy
        self.optimizer = optimizer
        self.results: list[dict[str, Any]] = list(resumed.meta["results"]) if resumed else []
        # sha256 of the global head after each round: the heads sites trained from, which
        # a site names to prove it trained in the run when it asks for a missed model.
        self.round_heads: dict[str, str] = (
            dict(resumed.meta.get(ROUND_HEADS, {})) if resumed else {}
        )
        self.running = 0  # the round in progress (status.json's round_running)
        self._last: _Saved | None = None  # the newest checkpoint's content
        self.meta: dict[str, Any] = {
            "run_id": run_id,
            "config": cfg.to_mapping(),
            "config_fingerprint": config_fingerprint(cfg),
            "model": identity,
            "resumed_from": resumed_from(resumed),
        }

    def prepared(self, outcome: PrepareOutcome) -> None:
        self.status.update(sites=len(outcome.ready))

    def round_started(self, server_round: int) -> None:
        self.running = server_round
        self.status.update(round_running=server_round)

    def round_trained(self, result: RoundResult, arrays: Arrays) -> None:
        """Save the round's head at once, with the optimizer, privacy and random states
        of this moment; its evaluation, when it comes later, is added to the same
        checkpoint (``round_finished``)."""
        self.results = [r for r in self.results if r["round"] < result.round]
        self.round_heads = {k: v for k, v in self.round_heads.items() if int(k) < result.round} | {
            str(result.round): head_sha256(self.names, arrays)
        }
        self.results.append(dataclasses.asdict(result))
        ledger = self.privacy()
        privacy = None
        if ledger is not None:
            privacy = {
                "noise_multiplier": ledger.noise_multiplier,
                "delta": ledger.delta,
                "released": [list(e) for e in ledger.released],
            }
        opt_meta, opt_tensors = self._optimizer_state()
        meta = {**self.meta, "privacy": privacy, "server_optimizer": opt_meta}
        self._last = _Saved(
            result.round, [a.copy() for a in arrays], meta, opt_tensors, _rng_state()
        )
        self._save(self._last)

    def round_finished(self, result: RoundResult, arrays: Arrays) -> None:
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
        self.status.update(
            rounds_done=saved.round,
            # a round completes once its evaluation is in: maybe during the next one
            round_running=self.running if self.running > saved.round else None,
            round_heads=self.round_heads,
            last_checkpoint=str(path),
            best_checkpoint=str(self.store.folder / f"round-{best:04d}.safetensors"),
        )

    def _optimizer_state(self) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
        """The server optimizer's state after the round (None: FedAvg keeps none)."""
        if self.optimizer is None:
            return None, {}
        meta, slots = self.optimizer.state()
        tensors = {
            f"{OPTIMIZER_PREFIX}{slot}/{n}": a
            for slot, arrays in slots.items()
            for n, a in zip(self.names, arrays, strict=True)
        }
        return meta, tensors

    def run_finished(self, final: FinalModel, report_path: Path) -> None:
        """The run ended well: record its final model and its report.

        The one place that holds the run's result once it is complete (the head, its
        description and sha256): whatever keeps the model beyond the checkpoints
        belongs here.
        """
        self.status.update(
            state="finished",
            model_sha256=final.description.head_sha256,
            report=str(report_path),
        )


def resumed_from(ckpt: Checkpoint | None) -> dict[str, Any] | None:
    """What report.json and the checkpoints say about the checkpoint a run continued from."""
    if ckpt is None:
        return None
    return {"round": ckpt.round, "checkpoint": str(ckpt.path), "run_id": ckpt.meta["run_id"]}
