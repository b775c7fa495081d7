"""A run's server-side setup: the verified backbone, the model, and what sites are told.

Resolves and verifies the backbone on the server, builds the model and the initial
head (the same for the same seed), and derives the RunSpec sent to every site and the
per-round FitSettings from the run configuration, and the strategy that runs the rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fedhead.common.backbones import BackboneSpec, get_spec
from fedhead.common.config import RunConfig
from fedhead.common.errors import WeightsError
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone, weights_ref
from fedhead.common.protocol import PROTOCOL_VERSION, FitSettings, RunSpec
from fedhead.common.weights import default_search_dirs, download, fedhead_cache_dir, find_weights
from fedhead.server.aggregation import Arrays
from fedhead.server.strategy import FedHeadStrategy, ServerEvaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerModel:
    spec: BackboneSpec
    weights_path: Path
    sha256: str
    model: FedHeadModel
    trainable: TrainableSet


def resolve_weights(cfg: RunConfig) -> tuple[BackboneSpec, Path, str]:
    """The verified weights file of the run's backbone on this (server) machine."""
    spec = get_spec(cfg.backbone)
    ref = weights_ref(spec, cfg.backbone_sha256)
    explicit = Path(cfg.backbone_weights).expanduser() if cfg.backbone_weights else None
    try:
        path = find_weights(ref, default_search_dirs(), explicit)
    except WeightsError:
        if explicit is not None or not cfg.download_weights:
            raise
        log.info("downloading %s from %s", ref.filename, ref.url)
        path = download(ref, fedhead_cache_dir() / "weights")
    return spec, path, ref.sha256


def build_server_model(cfg: RunConfig) -> ServerModel:
    spec, path, sha = resolve_weights(cfg)
    torch.manual_seed(cfg.seed)  # the initial head is the same for the same seed
    model = FedHeadModel.for_run(spec, load_backbone(spec, path), cfg)
    return ServerModel(spec, path, sha, model, TrainableSet.of(model))


def run_spec(cfg: RunConfig, sm: ServerModel) -> RunSpec:
    """What every site is prepared with; fields named as run-config keys come from them."""
    return RunSpec.drawing_on(
        cfg,
        protocol=PROTOCOL_VERSION,
        backbone=sm.spec.name,
        weights_file=weights_ref(sm.spec, cfg.backbone_sha256).filename,
        weights_sha256=sm.sha256,
        custom_weights=bool(cfg.backbone_weights),
        classes=",".join(cfg.class_names()),
        input_size=cfg.resolved_input_size(),
        trainable_fingerprint=sm.trainable.fingerprint(),
    )


def fit_settings(cfg: RunConfig, trainable: TrainableSet) -> FitSettings:
    """A round's settings before the round and schedule are filled in; fields named as
    run-config keys come from them."""
    return FitSettings.drawing_on(
        cfg,
        server_round=0,
        trainable_fingerprint=trainable.fingerprint(),
        clipping_range=cfg.secagg_clipping_range if cfg.secure_aggregation else 0.0,
        uniform_weight=cfg.dp_noise_multiplier > 0,
    )


def build_strategy(
    cfg: RunConfig,
    sm: ServerModel,
    initial: Arrays,
    server_evaluate: ServerEvaluate | None,
    resumed_after: int | None,
) -> FedHeadStrategy:
    """The run's strategy, from ``initial`` (the first head, or a checkpoint's after
    round ``resumed_after``)."""
    return FedHeadStrategy(
        trainable=sm.trainable,
        initial=initial,
        settings=fit_settings(cfg, sm.trainable),
        num_rounds=cfg.num_server_rounds,
        min_sites=cfg.min_sites,
        lr_schedule=cfg.lr_schedule,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        secure=cfg.secure_aggregation,
        server_evaluate=server_evaluate,
        statistics_classes=len(cfg.class_names()) if cfg.evaluation_statistics else 0,
        evaluate_in_train_from=evaluate_in_train_from(cfg, resumed_after),
    )


def evaluate_in_train_from(cfg: RunConfig, resumed_after: int | None) -> int | None:
    """The first round whose train messages also evaluate the head they carry (the
    previous round's): when every site trains every round, a round's federated
    evaluation needs no message of its own. A resumed run's first round does not: its
    checkpoint holds that evaluation already."""
    if cfg.fraction_train < 1.0:
        return None  # sites that sit a round out are evaluated by an evaluate step
    return 1 if resumed_after is None else resumed_after + 2
