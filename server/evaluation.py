"""Evaluation on the server's own data: its test set, through the same trunk and cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedhead.common.config import RunConfig
from fedhead.common.datasets import ReadPolicy, load_test_set
from fedhead.common.device import Device, select_device
from fedhead.common.features import FeatureExtractor, open_cache
from fedhead.common.images import DecodeLimits
from fedhead.common.training import evaluate_head
from fedhead.common.weights import fedhead_cache_dir
from fedhead.server.setup import ServerModel

log = logging.getLogger(__name__)


def server_extractor(
    cfg: RunConfig, sm: ServerModel, progress: bool = False
) -> tuple[FeatureExtractor, Device]:
    """The trunk on the server (its own test set, the demo's baseline), via its cache."""
    device = select_device(cfg.device)
    extractor = FeatureExtractor(
        sm.model,
        sm.spec.preprocessor(cfg.resolved_input_size()),
        device,
        sm.sha256,
        open_cache(fedhead_cache_dir() / "features.sqlite"),
        progress=progress,
    )
    return extractor, device


def server_evaluator(
    cfg: RunConfig, sm: ServerModel
) -> Callable[[list[np.ndarray]], tuple[float, float]] | None:
    """Evaluate global tensors on the server's own test set, if one is configured."""
    if not cfg.server_test_data:
        return None
    # decoded as the sites decode their images: large files reduced for the input size
    policy = ReadPolicy(decode=DecodeLimits.for_input(cfg.resolved_input_size()))
    test = load_test_set(Path(cfg.server_test_data).expanduser(), cfg.class_names(), policy)
    extractor, device = server_extractor(cfg, sm)
    feats = extractor(test.images)
    labels = torch.from_numpy(test.labels[feats.ok])
    log.info("server test set: %d images (%d unreadable)", len(labels), feats.stats.skipped)

    def evaluate(arrays: list[np.ndarray]) -> tuple[float, float]:
        sm.trainable.set(sm.model, arrays)
        res = evaluate_head(sm.model, feats.values, labels, device)
        return res.loss, res.accuracy

    return evaluate
