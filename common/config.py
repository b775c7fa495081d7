"""Typed run and node configuration, checked once at the boundary.

Flower hands the ServerApp ``context.run_config`` (from ``[tool.flwr.app.config]`` and
``--run-config`` overrides) and each SuperNode ``context.node_config`` (from
``--node-config``). Both arrive as flat mappings of kebab-case keys. ``from_mapping``
turns one into a frozen dataclass; unknown keys, wrong types and bad values are all
collected and reported together, each naming its key.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from fedhead.common.errors import ConfigError
from fedhead.common.records import FlatRecord, coerce

if TYPE_CHECKING:
    from fedhead.common.dicom import ReaderSettings

Check = Callable[[Any], str | None]

T = TypeVar("T", bound="_Config")


def _key(name: str) -> str:
    return name.replace("_", "-")


def opt(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A configuration field: default, optional value check, one-line doc."""
    return field(default=default, metadata={"check": check, "doc": doc})


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


class _Config(FlatRecord):
    """Shared loading logic for the frozen config dataclasses below."""

    _source = "configuration"

    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in cls.fields()]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Self:
        problems: list[str] = []
        fields = {_key(f.name): f for f in cls.fields()}
        for key in mapping:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key}: unknown key{hint}")
        values: dict[str, Any] = {}
        for key, f in fields.items():
            if key not in mapping:
                continue
            typ = cls.field_type(f)
            try:
                value = coerce(mapping[key], typ)
            except TypeError:
                problems.append(
                    f"{key}: expected {typ.__name__}, got {type(mapping[key]).__name__} "
                    f"{mapping[key]!r}"
                )
                continue
            check: Check | None = f.metadata.get("check")
            if check is not None and (why := check(value)):
                problems.append(f"{key}: {why} (got {value!r})")
                continue
            values[f.name] = value
        # Checks across keys run also when single values are bad (those fall back to
        # their defaults here), so one pass names every problem; keys already named for
        # a bad value are not named again.
        try:
            obj = cls(**values)
        except ConfigError as err:
            problems.extend(err.problems)
        else:
            named = {p.split(":", 1)[0] for p in problems}
            problems.extend(p for p in obj._cross_checks() if p.split(":", 1)[0] not in named)
            if not problems:
                return obj
        raise ConfigError(problems, cls._source)

    def _cross_checks(self) -> list[str]:
        """Problems involving several keys; override where needed."""
        return []

    def to_mapping(self) -> dict[str, Any]:
        return {_key(k): v for k, v in self.to_dict().items()}


def _classes_check(v: str) -> str | None:
    names = [c.strip() for c in v.split(",")]
    if len(names) < 2 or any(not c for c in names):
        return "needs at least two comma-separated class names"
    if len(set(names)) != len(names):
        return "class names must be unique"
    return None


def _shares_check(v: float) -> str | None:
    if 0 < v <= 1 or (v >= 3 and v == int(v)):
        return None
    return "must be a share in (0, 1] or a whole number >= 3"


def _sha_check(v: str) -> str | None:
    if v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
        return "must be 64 lowercase hex digits"
    return None


# Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"); see
# fedhead.server.optimizers.
# How the head is trained: a closed-form head from the sites' summed statistics, or
# rounds of FedAvg, alone or with a server optimizer on the aggregated delta.
CLOSED_FORM = "closed-form"
SERVER_STRATEGIES = (CLOSED_FORM, "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
CLOSED_FORM_METHODS = ("lda", "ridge")


# The largest FedProx weight (proximal-mu) a run may set and a site accepts: far above
# useful values (Li et al. 2020 use 0.001 to 1), low enough for the proximal term to
# stay finite.
MAX_PROXIMAL_MU = 1000.0


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


# The largest image side a run may ask for: sites refuse larger ones, which would make
# them allocate huge tensors (and decode large images at full size).
MAX_INPUT_SIZE = 1024

# Images with more pixels are refused unread (a small file can hold a huge image).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True)
class RunConfig(_Config):
    """One federated run, as the operator configures it (server side)."""

    _source = "run configuration"

    backbone: str = opt("mobilenet_v2", doc="registered backbone (`fedhead weights list`)")
    backbone_weights: str = opt("", doc="path to a custom checkpoint of that architecture")
    backbone_sha256: str = opt("", _sha_check, "sha256 of backbone-weights (required with it)")
    download_weights: bool = opt(False, doc="server may download missing weights")
    classes: str = opt("", _classes_check, "comma-separated class names, in label order")
    input_size: int = opt(
        0,
        lambda v: None if 0 <= v <= MAX_INPUT_SIZE else f"must be in 0..{MAX_INPUT_SIZE}",
        "image side in pixels; 0 = the backbone's default",
    )
    head: str = opt("linear", one_of("linear", "mlp"), "head type")
    head_hidden: int = opt(256, positive, "hidden width of the mlp head")
    head_dropout: float = opt(
        0.0, lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "dropout before the head"
    )
    unfreeze_blocks: int = opt(0, non_negative, "last trunk blocks trained too")
    unfreeze_lr_scale: float = opt(0.1, positive, "learning-rate factor for unfrozen blocks")
    augment_views: int = opt(
        0, non_negative, "augmented views per training image, cached; 0 = no augmentation"
    )
    augment_flip: bool = opt(False, doc="augmented views may be mirrored left-right")
    num_server_rounds: int = opt(10, positive, "federated rounds")
    local_epochs: int = opt(5, positive, "epochs per round on each site")
    batch_size: int = opt(64, positive, "training batch size")
    learning_rate: float = opt(0.01, positive, "head learning rate (first round)")
    lr_schedule: str = opt("cosine", one_of("cosine", "constant"), "learning rate over rounds")
    optimizer: str = opt("sgd", one_of("sgd", "adam"), "local optimizer")
    momentum: float = opt(
        0.9, lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "SGD momentum"
    )
    weight_decay: float = opt(0.0, non_negative, "L2 weight decay")
    min_sites: int = opt(2, positive, "sites needed to start and to finish a round")
    fraction_train: float = opt(1.0, fraction, "share of ready sites sampled per round")
    fraction_evaluate: float = opt(1.0, fraction, "share of ready sites evaluating per round")
    join_timeout: float = opt(300.0, positive, "seconds to wait for min-sites to connect")
    round_timeout: float = opt(600.0, positive, "seconds a site may take per message")
    val_fraction: float = opt(
        0.15,
        lambda v: None if 0 < v < 1 else "must be in (0, 1)",
        "validation share held out on sites without an explicit split",
    )
    seed: int = opt(0, non_negative, "seed for head init, splits and shuffling")
    secure_aggregation: bool = opt(True, doc="SecAgg+: the server only sees the sum of updates")
    secagg_num_shares: float = opt(
        1.0, _shares_check, "shares per site key: (0,1] = share of sampled sites, >=3 = count"
    )
    secagg_threshold: float = opt(
        0.0, non_negative, "shares to rebuild a key: 0 = majority, (0,1] = share, >=2 = count"
    )
    secagg_clipping_range: float = opt(8.0, positive, "update values must lie in +-this")
    secagg_quantization_range: int = opt(2**22, positive, "integer levels per value")
    # Honest head updates on the demo data measured at most 2.4 (Dirichlet alpha 0.5)
    # and 10.9 (alpha 0.1, sites holding almost one class each): ~3x the worst case.
    max_update_norm: float = opt(
        30.0, non_negative, "reject updates (or aggregates) with a larger L2 norm; 0 = off"
    )
    # A hospital's curated images for one task number in the thousands (a children's
    # hospital's pneumonia X-rays: 5,856): a larger site still takes part, counting as
    # this many, while a site declaring more cannot outweigh ten such sites by itself.
    max_site_examples: int = opt(
        10_000, positive, "a site's weight counts at most this many examples"
    )
    max_site_share: float = opt(
        0.5,
        lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
        "the largest share of the total weight (training, evaluation) one site may have; "
        "1 = no limit",
    )
    dp_noise_multiplier: float = opt(
        0.0, non_negative, "differential privacy: Gaussian noise / clipping norm; 0 = off"
    )
    dp_clipping_norm: float = opt(1.0, positive, "differential privacy: per-site update clip")
    dp_delta: float = opt(
        1e-5, lambda v: None if 0 < v < 1 else "must be in (0, 1)", "differential privacy delta"
    )
    strategy: str = opt(
        CLOSED_FORM,
        one_of(*SERVER_STRATEGIES),
        "closed-form: the pooled-data head from the sites' summed statistics in one round "
        "(linear head, frozen trunk); fedavg: rounds of FedAvg; fedavgm, fedadam, fedyogi, "
        "fedadagrad: a server optimizer on the aggregated head delta",
    )
    closed_form: str = opt(
        "lda",
        one_of(*CLOSED_FORM_METHODS),
        "closed-form head: shrinkage LDA or ridge; its regularisation is chosen by the sites' "
        "validation",
    )
    fine_tune_rounds: int = opt(
        0, non_negative, "closed-form: FedAvg rounds after the statistics round (from its head)"
    )
    dp_feature_clip: float = opt(
        0.0,
        non_negative,
        "closed-form with differential privacy: sites clip each trunk feature vector to this "
        "L2 norm before summing (required then)",
    )
    server_learning_rate: float = opt(
        0.0,
        non_negative,
        "server step size; 0 = the strategy's default (fedavgm 1, fedadam 0.1, fedyogi 0.01, "
        "fedadagrad 0.1)",
    )
    server_momentum: float = opt(0.9, _unit_interval, "fedavgm: server momentum")
    server_beta1: float = opt(0.9, _unit_interval, "fedadam/fedyogi/fedadagrad: first moment")
    server_beta2: float = opt(0.99, _unit_interval, "fedadam/fedyogi: second moment decay")
    server_tau: float = opt(1e-3, positive, "fedadam/fedyogi/fedadagrad: adaptivity (epsilon)")
    proximal_mu: float = opt(
        0.0,
        lambda v: None if 0 <= v <= MAX_PROXIMAL_MU else f"must be in [0, {MAX_PROXIMAL_MU:g}]",
        "FedProx at sites: weight of (mu/2)*||w - w_global||^2; 0 = off",
    )
    evaluation_statistics: bool = opt(
        True,
        doc="sites send count tables for pooled AUROC, sensitivity, specificity, calibration",
    )
    server_test_data: str = opt("", doc="server-side test set (folder, .csv or .npz)")
    out_dir: str = opt(
        "", doc="report.json, status and checkpoints go here; default ./fedhead-runs/run-<id>"
    )
    resume_from: str = opt(
        "", doc="continue a cut-off run: its out-dir or checkpoints folder (same model settings)"
    )
    deliver_from: str = opt(
        "", doc="no training: send this finished run's model (its out-dir) to sites that lack it"
    )
    keep_checkpoints: int = opt(2, positive, "newest round checkpoints kept (and the best one)")
    device: str = opt("auto", one_of("auto", "cpu", "cuda"), "server-side evaluation device")
    site_labels: bool = opt(
        True, doc="name sites by the label they chose (`fedhead node --name`); false: node ids"
    )
    local_baseline: bool = opt(
        False, doc="sites also train a local-only head with the run's budget (per-site gain)"
    )
    personalize_epochs: int = opt(
        0, non_negative, "sites fine-tune the final head on their data; kept if better"
    )
    personalize_lr_scale: float = opt(
        0.1,
        lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
        "personalization learning rate / learning-rate",
    )
    simulation_data: str = opt("", doc="simulation: folder with site-<i> data per node")
    dirichlet_alpha: float = opt(0.5, positive, "simulation: non-IID split of the demo data")

    def class_names(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",")]

    def _cross_checks(self) -> list[str]:
        problems = []
        if not self.classes:
            problems.append("classes: required (comma-separated class names)")
        if self.deliver_from and self.resume_from:
            problems.append("deliver-from: a delivery-only run trains nothing; drop resume-from")
        if self.secagg_threshold > 1 and self.secagg_threshold != int(self.secagg_threshold):
            problems.append("secagg-threshold: a count must be a whole number")
        if 1 < self.secagg_threshold < 2:
            problems.append("secagg-threshold: must be 0, a share in (0, 1] or a count >= 2")
        if (
            self.secure_aggregation
            and self.secagg_num_shares >= 3
            and self.secagg_threshold >= self.secagg_num_shares
        ):
            problems.append("secagg-threshold: must be smaller than secagg-num-shares")
        if (
            self.dp_noise_multiplier > 0
            and self.max_update_norm
            and (self.dp_clipping_norm > self.max_update_norm)
        ):
            problems.append("dp-clipping-norm: must not exceed max-update-norm")
        if self.strategy in ("fedavg", CLOSED_FORM) and self.server_learning_rate:
            problems.append(
                "server-learning-rate: applies to a server optimizer only; set strategy to "
                "fedavgm, fedadam, fedyogi or fedadagrad (or leave it at 0)"
            )
        if self.closed_form_applies() and self.dp_noise_multiplier > 0:
            if not self.dp_feature_clip:
                problems.append(
                    "dp-feature-clip: a closed-form head with differential privacy needs a "
                    "bound on the trunk features' L2 norm (the sensitivity of the summed "
                    "statistics)"
                )
            if self.fine_tune_rounds:
                problems.append(
                    "fine-tune-rounds: with differential privacy a closed-form head is one "
                    "release of the statistics; fine-tuning rounds would need a second privacy "
                    "account (set fine-tune-rounds=0, or use strategy=fedavg)"
                )
        if bool(self.backbone_weights) != bool(self.backbone_sha256):
            problems.append(
                "backbone-sha256: backbone-weights and backbone-sha256 go together "
                "(compute it with `sha256sum FILE`)"
            )
        from fedhead.common.backbones import backbone_names

        if self.backbone not in backbone_names():
            problems.append(
                f"backbone: unknown backbone {self.backbone!r} "
                f"(known: {', '.join(backbone_names())})"
            )
        else:
            from fedhead.common.backbones import get_spec

            spec = get_spec(self.backbone)
            if spec.fixed_input_size and self.input_size not in (0, spec.input_size):
                problems.append(f"input-size: {spec.name} only accepts {spec.input_size} px (or 0)")
        return problems

    def resolved_input_size(self) -> int:
        from fedhead.common.backbones import get_spec

        return self.input_size or get_spec(self.backbone).input_size

    def closed_form_applies(self) -> bool:
        """Whether the head is trained in closed form: asked for, and a linear head on a
        frozen trunk (an mlp head or unfrozen blocks are trained with FedAvg)."""
        return self.strategy == CLOSED_FORM and self.head == "linear" and self.unfreeze_blocks == 0

    def rounds(self) -> int:
        """The run's rounds: the statistics round and the fine-tuning rounds of a closed-form
        head, else ``num-server-rounds``."""
        return 1 + self.fine_tune_rounds if self.closed_form_applies() else self.num_server_rounds

    def training_text(self) -> str:
        """How the head is trained, in a few words: ``closed-form lda head, one round of
        summed statistics`` or ``10 rounds of fedavg``."""

        def rounds(n: int) -> str:
            return f"{n} round{'s' if n != 1 else ''}"

        if self.closed_form_applies():
            tuning = self.fine_tune_rounds
            then = f", then {rounds(tuning)} of fedavg from it" if tuning else ""
            return f"closed-form {self.closed_form} head, one round of summed statistics{then}"
        strategy = "fedavg" if self.strategy == CLOSED_FORM else self.strategy
        return f"{rounds(self.num_server_rounds)} of {strategy}"


def _roots_check(v: str) -> str | None:
    relative = [r.strip() for r in v.split(",") if r.strip() and not Path(r.strip()).is_absolute()]
    if relative:
        return f"folders must be absolute paths ({', '.join(relative)} is not)"
    return None


def _site_name_check(v: str) -> str | None:
    from fedhead.common.protocol import valid_site_name

    if v and not valid_site_name(v):
        return "letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 32"
    return None


@dataclass(frozen=True)
class NodeConfig(_Config):
    """One site's SuperNode, as its IT configures it (``--node-config``)."""

    _source = "node configuration"

    data_path: str = opt("", doc="the site's data: image folder, .csv manifest or .npz")
    cache_dir: str = opt(
        "", doc="weights, feature cache, delivered models and run records; default ~/.cache/fedhead"
    )
    device: str = opt("auto", one_of("auto", "cpu", "cuda"), "training device")
    audit_log: str = opt("", doc="JSON-lines file recording every message the site sends")
    site_name: str = opt(
        "", _site_name_check, "this site's label in the operator's logs and report"
    )
    feature_cache_gb: float = opt(5.0, positive, "disk budget of the feature cache")
    evaluation_statistics: bool = opt(
        True,
        doc="send confusion counts and score histograms for pooled AUROC etc. (SECURITY.md)",
    )
    dicom_window: int = opt(
        0,
        lambda v: None if v >= -1 else "must be >= -1",
        "DICOM: which VOI LUT / window center-width to apply (0 = first); -1 = none",
    )
    dicom_frame: int = opt(0, non_negative, "DICOM: which frame of a multi-frame file (0 = first)")
    data_roots: str = opt(
        "",
        _roots_check,
        "comma-separated absolute folders, besides the data folder, that image paths "
        "(CSV entries, symlinks) may lead into",
    )
    max_image_pixels: int = opt(
        DEFAULT_MAX_IMAGE_PIXELS,
        positive,
        "images with more pixels are refused unread and counted as unreadable",
    )
    threads: int = opt(
        0,
        non_negative,
        "CPU threads torch may use for this site's training (0 = torch's default); "
        "sites sharing a machine each get their share",
    )
    worker_socket: str = opt(
        "",
        doc="set by fedhead node: the socket of its warm worker, which trains and evaluates "
        "for the per-message ClientApp processes (empty: they do it themselves)",
    )
    worker_key_file: str = opt(
        "",
        doc="set by fedhead node: the file holding the key its warm worker asks of every "
        "process that connects (beside the socket, 0600)",
    )
    # Set by Flower's Simulation Engine for simulated nodes:
    partition_id: int = opt(-1, doc="simulation only")
    num_partitions: int = opt(0, doc="simulation only")

    @property
    def simulated(self) -> bool:
        return self.partition_id >= 0 and not self.data_path

    def reader_settings(self) -> ReaderSettings:
        """How this site's DICOM files become pictures (part of their cache keys)."""
        from fedhead.common.dicom import ReaderSettings

        return ReaderSettings(window=self.dicom_window, frame=self.dicom_frame)

    def data_root_paths(self) -> tuple[Path, ...]:
        return tuple(Path(r.strip()) for r in self.data_roots.split(",") if r.strip())
