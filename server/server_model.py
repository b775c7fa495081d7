"""The run's model on the server, and what sites are told about it.

Resolves and verifies the backbone on the server, builds the model and the initial
head (the same for the same seed), and derives from the run configuration the RunSpec
every site is prepared with and the FitSettings each round's train messages carry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fedhead.common.backbones import BackboneSpec, get_spec
from fedhead.common.config import CLOSED_FORM, RunConfig
from fedhead.common.errors import WeightsError
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone, weights_ref
from fedhead.common.protocol import PROTOCOL_VERSION, FitSettings, RunSpec
from fedhead.common.weights import default_search_dirs, download, fedhead_cache_dir, find_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerModel:
    """The verified backbone (its spec, file and sha256), the model built on it, and the
    set of tensors sites train."""

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
    # the initial head is drawn from the seed itself (FedHeadModel); torch's generator is
    # seeded too, so the server's own random draws repeat for the same seed
    torch.manual_seed(cfg.seed)
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


def fit_settings(cfg: RunConfig, trainable: TrainableSet, resumes_run: int = 0) -> FitSettings:
    """A round's settings before the round and schedule are filled in; fields named as
    run-config keys come from them. ``resumes_run``: the run a resumed run continues (a
    site holds the heads it took there against the heads it is sent now)."""
    return FitSettings.drawing_on(
        cfg,
        server_round=0,
        trainable_fingerprint=trainable.fingerprint(),
        clipping_range=cfg.secagg_clipping_range if cfg.secure_aggregation else 0.0,
        uniform_weight=cfg.dp_noise_multiplier > 0,
        evaluate=False,  # set per site and round by the strategy
        statistics=False,
        # a closed-form head's fine-tuning rounds are FedAvg rounds, after its own round
        strategy="fedavg" if cfg.strategy == CLOSED_FORM else cfg.strategy,
        num_server_rounds=cfg.rounds(),
        resumes_run=resumes_run,
    )
