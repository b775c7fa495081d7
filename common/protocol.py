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

A site that missed that message (offline at the end) asks again: its ``PrepareReply``
in any later run lists up to ``MAX_MODEL_REQUESTS`` earlier runs it trained in but holds
no model of (``ModelRequest``: the run id and, as proof of having trained, the sha256 of
a global head it trained from). A delivery-only run (run-config ``deliver-from``) sends
every node a ``query.models`` message offering one finished run's model
(``ModelOffer``); the node answers held, wanted (with its proof) or not-trained
(``ModelAnswer``). Either way the model comes in a ``query.model`` message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Self

from flwr.app import ConfigRecord

from fedhead.common.config import MAX_PROXIMAL_MU
from fedhead.common.errors import FederationError, RunSpecError
from fedhead.common.records import FlatRecord, coerce

# 2: a train message may ask the site to evaluate the head it trains from (FitSettings.evaluate)
# 3: round settings carry what bounds a round's step (server optimizer, DP, min-sites,
#    rounds), which a site checks every head it is sent against (client.guard); closed-
#    form heads: a train message may ask for the site's sufficient statistics
#    (StatisticsRequest) and a query.validate message for its evaluation of candidate heads
PROTOCOL_VERSION = 3

MSG_PREPARE = "query.prepare"
MSG_WEIGHTS = "query.weights"
MSG_MODEL = "query.model"
MSG_MODELS = "query.models"
MSG_OUTCOME = "query.outcome"
MSG_VALIDATE = "query.validate"

RECORD_RUN = "fedhead.run"  # ConfigRecord: RunSpec (server -> node; node keeps it in state)
RECORD_PREPARE = "fedhead.prepare"  # ConfigRecord: PrepareReply (node -> server)
RECORD_WEIGHTS = "fedhead.weights"  # ArrayRecord: the weights file as one uint8 array
RECORD_MODEL = "fedhead.model"  # ConfigRecord: ModelDescription (server -> node)
RECORD_MODEL_FILES = "fedhead.model.files"  # ArrayRecord: the model package, one uint8 array a file
RECORD_MODEL_REPLY = "fedhead.model.reply"  # ConfigRecord: ModelReceipt (node -> server)
RECORD_MODEL_OFFER = "fedhead.model.offer"  # ConfigRecord: ModelOffer (server -> node)
RECORD_MODEL_ANSWER = "fedhead.model.answer"  # ConfigRecord: ModelAnswer (node -> server)
RECORD_OUTCOME = "fedhead.outcome"  # ConfigRecord: OutcomeRequest (server -> node)
RECORD_OUTCOME_FIT = "fedhead.outcome.fit"  # ConfigRecord: the run's FitSettings (round 1)
RECORD_OUTCOME_HEAD = "fedhead.outcome.head"  # ArrayRecord: the run's initial head
RECORD_OUTCOME_REPLY = "fedhead.outcome.reply"  # ConfigRecord: SiteOutcome (node -> server)
RECORD_CANDIDATES = "fedhead.candidates"  # ArrayRecord: candidate heads, "<k>/<tensor index>"
RECORD_VALIDATE = "fedhead.validate"  # ConfigRecord: ValidationRequest (server -> node)
# ConfigRecord "fedhead.validate.<k>": the site's evaluation of candidate k (node -> server)
RECORD_VALIDATION_PREFIX = "fedhead.validate."

# The key of a train message's config that says what the message asks for; absent: train.
TASK_KEY = "task"
TASK_STATISTICS = "statistics"  # closed-form heads: the site's sufficient statistics

# Metrics of a train reply that evaluated the head it was sent (FitSettings.evaluate).
FIT_EVAL_LOSS = "eval-loss"
FIT_EVAL_ACCURACY = "eval-accuracy"
FIT_EVAL_EXAMPLES = "eval-examples"

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
    missing_models: str  # earlier runs' models this site lacks: format_model_requests()


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
    proximal_mu: float = 0.0  # FedProx: (mu/2)*||w - w_global||^2 in the local loss
    # Evaluate the head sent (the previous round's global head) on the validation split
    # before training from it, and return that evaluation with the update (FIT_EVAL_*);
    # with ``statistics``, the count tables for pooled clinical metrics too.
    evaluate: bool = False
    statistics: bool = False
    # What bounds how far a round moves the global head (common.stepbound): a site
    # refuses a head beyond that reach. Named as the run-config keys they come from.
    strategy: str = "fedavg"
    server_learning_rate: float = 0.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    min_sites: int = 2
    num_server_rounds: int = 10
    # A run resumed from a checkpoint of run ``resumes_run`` (0: none): a site that took
    # part in that run checks the first head against the last one it took there.
    resumes_run: int = 0

    def __post_init__(self) -> None:
        """Sites are told these by the server: refuse what would break local training."""
        if not (math.isfinite(self.proximal_mu) and 0 <= self.proximal_mu <= MAX_PROXIMAL_MU):
            raise FederationError(
                f"FitSettings: proximal_mu {self.proximal_mu!r} is not in [0, {MAX_PROXIMAL_MU:g}]",
                "set the run's proximal-mu to a value in that range",
            )


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


# How many earlier runs' models a site may ask for in one prepare reply.
MAX_MODEL_REQUESTS = 8
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class ModelRequest:
    """A site asks for an earlier run's model: the run and the sha256 (``head_sha256``)
    of a global head it trained from in that run, which only the run's sites saw."""

    run_id: int
    proof: str


def format_model_requests(requests: list[ModelRequest]) -> str:
    """``run:proof`` pairs, comma-separated (at most ``MAX_MODEL_REQUESTS``)."""
    return ",".join(f"{r.run_id}:{r.proof}" for r in requests[:MAX_MODEL_REQUESTS])


def parse_model_requests(text: str) -> list[ModelRequest]:
    """A site's ``missing_models``, refused whole (ValueError) unless every entry is a
    run id and a sha256, with no run twice and at most ``MAX_MODEL_REQUESTS`` entries:
    sites are untrusted and the text reaches the server's file lookups."""
    if not text:
        return []
    if len(text) > MAX_MODEL_REQUESTS * 86:
        raise ValueError(f"{len(text)} characters, more than {MAX_MODEL_REQUESTS} requests hold")
    requests = []
    for entry in text.split(","):
        run, _, proof = entry.partition(":")
        if not _RUN_ID.fullmatch(run) or int(run) >= 2**64 or not _SHA256.fullmatch(proof):
            raise ValueError(f"entry {entry[:40]!r} is not RUN_ID:SHA256")
        requests.append(ModelRequest(int(run), proof))
    if len(requests) > MAX_MODEL_REQUESTS:
        raise ValueError(f"{len(requests)} requests, at most {MAX_MODEL_REQUESTS} allowed")
    if len({r.run_id for r in requests}) != len(requests):
        raise ValueError("a run is named twice")
    return requests


@dataclass(frozen=True)
class ModelOffer(_Record):
    """A delivery-only run offers one finished run's model (by run id and head sha256)."""

    run_id: int
    head_sha256: str


MODEL_HELD = "held"  # the site keeps exactly this model
MODEL_WANTED = "wanted"  # the site trained in the run and lacks its model
MODEL_NOT_TRAINED = "not-trained"  # the site has no record of training in the run
MODEL_OTHER = "other"  # the site keeps another model for the run (it will not replace it)
MODEL_ANSWERS = (MODEL_HELD, MODEL_WANTED, MODEL_NOT_TRAINED, MODEL_OTHER)


@dataclass(frozen=True)
class ModelAnswer(_Record):
    """A site's answer to a ``ModelOffer``; ``proof`` as in ``ModelRequest`` when wanted."""

    state: str
    proof: str


@dataclass(frozen=True)
class StatisticsRequest(_Record):
    """A train message that asks a site for the sufficient statistics of its training
    features (closed-form heads, ``common.closed_form``): how to send them.

    Under SecAgg+ (``secure``) the site encodes them with ``FixedPointCodec(clipping_range,
    quantization_range, fraction_bits, limbs)`` and reports one example (every site weighs
    the same: the statistics are sums); without it, it sends them as float64 with its
    example count. A site holding more than ``max_site_examples`` images scales its
    statistics down to that many; with ``feature_clip`` > 0 (differential privacy) it
    clips every feature vector to that L2 norm first."""

    server_round: int
    trainable_fingerprint: str
    secure: bool
    clipping_range: float
    quantization_range: int
    fraction_bits: int
    limbs: int
    max_site_examples: int
    feature_clip: float

    def to_config(self) -> dict[str, Any]:
        return {**self.to_dict(), TASK_KEY: TASK_STATISTICS}


@dataclass(frozen=True)
class ValidationRequest(_Record):
    """A ``query.validate`` message: evaluate each of ``candidates`` heads (closed-form,
    in ``RECORD_CANDIDATES``) on the validation split, with count tables if asked."""

    server_round: int
    candidates: int
    statistics: bool
    resumes_run: int  # a resumed run's earlier run, whose statistics round this one goes on


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
    # a closed-form run: the candidate the sites chose (e.g. "lda shrinkage=0.1"), which
    # a site's local-only head repeats on its own statistics, and the federation's class
    # counts ("n0,n1,..."), toward which its personalized class prior is shrunk; "": none
    closed_form: str
    class_counts: str
