"""What the server and the sites say to each other, beyond Flower's train/evaluate.

Before the first round the server sends every node a ``query.prepare`` message with
the ``RunSpec``: the backbone (name + sha256), classes, head and preprocessing. Each
node loads its data, checks its backbone copy and replies with a ``PrepareReply``. A
node that lacks the backbone then receives the weights file's bytes in a
``query.weights`` message, verifies the sha256 and caches them. Training and
evaluation then use Flower's legacy fit/evaluate records (needed for SecAgg+), with
the per-round settings in ``FitSettings``. After the last round every site that took
part receives the final head and its ``ModelDescription`` in a ``query.model``
message, verifies both and keeps them. Then, when the run asks for it, each site that
kept it gets a ``query.outcome`` message (``OutcomeRequest``, the round settings and the
initial head) and answers with its per-site outcome (``fedhead.common.outcome``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Self

from flwr.app import ConfigRecord

from fedhead.common.errors import FederationError, RunSpecError
from fedhead.common.records import FlatRecord, coerce

PROTOCOL_VERSION = 1

MSG_PREPARE = "query.prepare"
MSG_WEIGHTS = "query.weights"
MSG_MODEL = "query.model"
MSG_OUTCOME = "query.outcome"

RECORD_RUN = "fedhead.run"  # ConfigRecord: RunSpec (server -> node; node keeps it in state)
RECORD_PREPARE = "fedhead.prepare"  # ConfigRecord: PrepareReply (node -> server)
RECORD_WEIGHTS = "fedhead.weights"  # ArrayRecord: the weights file as one uint8 array
RECORD_MODEL = "fedhead.model"  # ConfigRecord: ModelDescription (server -> node)
RECORD_MODEL_FILES = "fedhead.model.files"  # ArrayRecord: the model package, one uint8 array a file
RECORD_MODEL_REPLY = "fedhead.model.reply"  # ConfigRecord: ModelReceipt (node -> server)
RECORD_OUTCOME = "fedhead.outcome"  # ConfigRecord: OutcomeRequest (server -> node)
RECORD_OUTCOME_FIT = "fedhead.outcome.fit"  # ConfigRecord: the run's FitSettings (round 1)
RECORD_OUTCOME_HEAD = "fedhead.outcome.head"  # ArrayRecord: the run's initial head
RECORD_OUTCOME_REPLY = "fedhead.outcome.reply"  # ConfigRecord: SiteOutcome (node -> server)

WEIGHTS_OK = "ok"
WEIGHTS_MISSING = "missing"
WEIGHTS_MISMATCH = "mismatch"


class _Record(FlatRecord):
    """A wire record: a flat ConfigRecord of scalars, refusing missing or mistyped keys."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    def to_config(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_mapping(cls, record: Any) -> Self:
        values: dict[str, Any] = {}
        for f in cls.fields():
            if f.name not in record:
                raise FederationError(
                    f"{cls.__name__}: missing key {f.name!r} in a message from the other side",
                    "server and sites must run the same fedhead version",
                )
            try:
                values[f.name] = coerce(record[f.name], cls.field_type(f))
            except TypeError as err:
                raise FederationError(
                    f"{cls.__name__}: key {f.name!r}: {err}",
                    "server and sites must run the same fedhead version",
                ) from err
        return cls(**values)


@dataclass(frozen=True)
class RunSpec(_Record):
    """Everything a node needs to build exactly the server's model for this run."""

    protocol: int
    backbone: str
    weights_file: str
    weights_sha256: str
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

    @classmethod
    def from_mapping(cls, record: Any) -> Self:
        """Refuse another protocol version first: its other keys may differ too."""
        version = record.get("protocol", "(none)")
        if version != PROTOCOL_VERSION:
            raise RunSpecError(
                f"the server speaks fedhead protocol {str(version)[:16]}, this site speaks "
                f"protocol {PROTOCOL_VERSION}",
                "run the same fedhead version on the server and the sites",
            )
        return super().from_mapping(record)

    def class_names(self) -> list[str]:
        return self.classes.split(",")


@dataclass(frozen=True)
class PrepareReply(_Record):
    weights: str  # WEIGHTS_OK / WEIGHTS_MISSING / WEIGHTS_MISMATCH
    detail: str
    train_examples: int
    val_examples: int
    device: str
    site_name: str  # the label the site's IT chose (``fedhead node --name``), or ""


# A site label: short, printable, no path or markup characters (sites are untrusted).
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def valid_site_name(text: str) -> bool:
    return SITE_NAME.fullmatch(text) is not None


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


@dataclass(frozen=True)
class ModelDescription(_Record):
    """What the final head is: enough to rebuild the model around it on a site that
    holds the backbone (the trunk itself is never part of a delivered model)."""

    run_id: int
    rounds: int
    backbone: str
    backbone_sha256: str
    classes: str  # comma-separated, in label order
    input_size: int
    head: str
    head_hidden: int
    head_dropout: float
    unfreeze_blocks: int
    trainable_fingerprint: str
    head_sha256: str  # sha256 of the head's canonical safetensors bytes


@dataclass(frozen=True)
class ModelReceipt(_Record):
    """A site's answer to a delivered model: the sha256 of what it verified and kept."""

    head_sha256: str


@dataclass(frozen=True)
class OutcomeRequest(_Record):
    """What the server asks of each site after delivery: evaluate the delivered head
    (``head_sha256``) and, as asked, train a local-only head with the run's budget
    (``rounds`` x the settings' local epochs, the learning rate on ``lr_schedule``) and
    a personalized head (``personalize_epochs`` at ``personalize_lr_scale`` x the rate)."""

    run_id: int
    head_sha256: str
    rounds: int
    lr_schedule: str
    local_baseline: bool
    personalize_epochs: int
    personalize_lr_scale: float
    resamples: int  # bootstrap resamples for every interval
