"""What the server and the sites say to each other, beyond Flower's train/evaluate.

Before the first round the server sends every node a ``query.prepare`` message with
the ``RunSpec``: the backbone (name + sha256), classes, head and preprocessing. Each
node loads its data, checks its backbone copy and replies with a ``PrepareReply``. A
node that lacks the backbone then receives the weights file's bytes in a
``query.weights`` message, verifies the sha256 and caches them. Training and
evaluation then use Flower's legacy fit/evaluate records (needed for SecAgg+), with
the per-round settings in ``FitSettings``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

from flwr.app import ConfigRecord

from fedhead.common.errors import FederationError

PROTOCOL_VERSION = 1

MSG_PREPARE = "query.prepare"
MSG_WEIGHTS = "query.weights"

RECORD_RUN = "fedhead.run"  # ConfigRecord: RunSpec (server -> node; node keeps it in state)
RECORD_PREPARE = "fedhead.prepare"  # ConfigRecord: PrepareReply (node -> server)
RECORD_WEIGHTS = "fedhead.weights"  # ArrayRecord: the weights file as one uint8 array

WEIGHTS_OK = "ok"
WEIGHTS_MISSING = "missing"
WEIGHTS_MISMATCH = "mismatch"


class _Record:
    """Dataclass <-> flat ConfigRecord of scalars, refusing missing or mistyped keys."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_config(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_mapping(cls, record: Any) -> Self:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in record:
                raise FederationError(
                    f"{cls.__name__}: missing key {f.name!r} in a message from the other side",
                    "server and sites must run the same fedhead version",
                )
            value = record[f.name]
            expected = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise FederationError(
                    f"{cls.__name__}: key {f.name!r} has type {type(value).__name__}",
                    "server and sites must run the same fedhead version",
                )
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class RunSpec(_Record):
    """Everything a node needs to build exactly the server's model for this run."""

    protocol: int
    backbone: str
    weights_file: str
    weights_sha256: str
    weights_bytes: int
    custom_weights: bool
    classes: str  # comma-separated
    input_size: int
    head: str
    head_hidden: int
    head_dropout: float
    unfreeze_blocks: int
    augment_views: int
    augment_flip: bool
    trainable_fingerprint: str
    val_fraction: float
    seed: int
    simulation_data: str
    dirichlet_alpha: float

    def class_names(self) -> list[str]:
        return self.classes.split(",")


@dataclass(frozen=True)
class PrepareReply(_Record):
    weights: str  # WEIGHTS_OK / WEIGHTS_MISSING / WEIGHTS_MISMATCH
    detail: str
    train_examples: int
    val_examples: int
    device: str


@dataclass(frozen=True)
class FitSettings(_Record):
    """Per-round training settings, sent in the legacy FitIns config."""

    server_round: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    unfreeze_lr_scale: float
    seed: int
    trainable_fingerprint: str
    max_update_norm: float  # the site refuses to send a larger update (0 = no bound)
    clipping_range: float  # SecAgg+: every sent value must lie within +-this (0 = no SecAgg+)
    uniform_weight: bool  # DP: every site counts once, whatever its number of examples
    max_site_examples: int  # a site counts at most this many examples
