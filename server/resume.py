"""Resuming a run: which checkpoint a ``resume-from`` names, and whether it fits.

A fresh run refuses an out-dir that already holds checkpoints (nothing is overwritten
silently). A resumed run continues from the checkpoint ``resume-from`` names (a file, a
checkpoints folder or an out-dir: its newest readable checkpoint) and refuses one whose
model differs from the run's in anything that shapes it, or whose server optimizer is
another. Other changed settings are allowed and logged. A run cut off after its last
round (during the final evaluation, the delivery, the per-site outcome or the report)
resumes into finishing it: ``server.run.finish_cut_off``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError
from fedhead.server.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    checkpoint_folder,
    holds_checkpoints,
    read_checkpoint,
)
from fedhead.server.rundir import FINISHED, RunDir

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


def checkpoint_meta(
    run_id: int, cfg: RunConfig, identity: dict[str, Any], resumed: Checkpoint | None
) -> dict[str, Any]:
    """The run's part of every checkpoint's metadata: what resuming checks it against."""
    return {
        "run_id": run_id,
        "config": cfg.to_mapping(),
        "config_fingerprint": config_fingerprint(cfg),
        "model": identity,
        "resumed_from": resumed_from(resumed),
    }


def load_resume(cfg: RunConfig, run_dir: RunDir) -> Checkpoint | None:
    """The checkpoint this run continues from, or None for a fresh run (which refuses an
    out-dir that already holds checkpoints)."""
    here = run_dir.checkpoints
    if not cfg.resume_from:
        if holds_checkpoints(here):
            raise ConfigError(
                [
                    f"out-dir: {run_dir.path} already holds checkpoints of an earlier run; set "
                    f"resume-from='{run_dir.path}' to continue it, or choose another out-dir"
                ],
                "run configuration",
            )
        return None
    source = Path(cfg.resume_from).expanduser().absolute()
    if source.is_file():
        ckpt = read_checkpoint(source)
    else:
        folder = checkpoint_folder(source)
        if not holds_checkpoints(folder):
            raise CheckpointError(f"resume-from: {source} holds no checkpoints")
        ckpt = CheckpointStore(folder).load()
    if here != ckpt.path.parent and holds_checkpoints(here):
        raise ConfigError(
            [
                f"out-dir: {run_dir.path} already holds checkpoints of another run; resume "
                f"into the out-dir of the run in resume-from, or choose an empty out-dir"
            ],
            "run configuration",
        )
    held = CheckpointStore(here).rounds()
    if here == ckpt.path.parent and max(held, default=0) > ckpt.round:
        raise ConfigError(
            [
                f"resume-from: {run_dir.path} holds checkpoints after round {ckpt.round}, "
                "which resuming there would replace; resume from the last one, or into "
                "another out-dir"
            ],
            "run configuration",
        )
    if ckpt.round >= cfg.rounds() and ckpt.complete:
        origin = RunDir(ckpt.path.parent.parent)
        state = origin.read_state()
        if state is not None and state.state == FINISHED:
            raise CheckpointError(
                f"resume-from: {ckpt.path.name} is the last round of a run that finished: "
                f"its model is in {origin.model_dir} (to send it to sites that missed it, "
                f"start a run with deliver-from='{origin.path}'; to train on, raise "
                "num-server-rounds)"
            )
    return ckpt


def is_cut_off_after_rounds(cfg: RunConfig, ckpt: Checkpoint | None) -> bool:
    """Whether a resumed run only has to finish: its checkpoint is of its last round,
    complete, and the run was cut off before it finished (see ``load_resume``)."""
    return ckpt is not None and ckpt.round >= cfg.rounds() and ckpt.complete


def check_resume(
    ckpt: Checkpoint, identity: Mapping[str, Any], names: list[str], cfg: RunConfig
) -> list[str]:
    """Refuse a checkpoint whose model or server optimizer differs from the run's,
    naming the first difference; returns the other settings that changed since it."""
    saved = ckpt.meta["model"]
    for key, value in identity.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"resume-from: the checkpoint's model has {key}={saved.get(key)!r} but this "
                f"run has {key}={value!r}; resume with the run's original settings"
            )
    if ckpt.names != names:
        raise CheckpointError("resume-from: the checkpoint holds other tensors than this model")
    # The saved optimizer state (or its absence) only fits the strategy that wrote it.
    if ckpt.strategy != cfg.strategy:
        raise CheckpointError(
            f"resume-from: the checkpoint's rounds ran strategy={ckpt.strategy} but this run "
            f"has strategy={cfg.strategy}; resume with strategy={ckpt.strategy}, or start a "
            "new run"
        )
    return config_changes(ckpt, cfg)


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


def resumed_from(ckpt: Checkpoint | None) -> dict[str, Any] | None:
    """What report.json and the checkpoints say about the checkpoint a run continued from."""
    if ckpt is None:
        return None
    return {"round": ckpt.round, "checkpoint": str(ckpt.path), "run_id": ckpt.meta["run_id"]}
