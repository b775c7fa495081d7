"""Evaluation on the server's own data: its test set, through the same trunk and cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedhead.common.config import RunConfig
from fedhead.common.datasets import ReadPolicy, load_test_set
from fedhead.common.device import Device, select_device
from fedhead.common.evaluation import Evaluation, evaluate_predictions, point_metrics
from fedhead.common.features import FeatureExtractor, open_cache
from fedhead.common.images import DecodeLimits
from fedhead.common.training import evaluate_head, head_logits
from fedhead.common.weights import fedhead_cache_dir
from fedhead.server.server_model import ServerModel

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


class ServerTestSet:
    """The server's own labelled test set, through the trunk once (cached features).

    Called with the global tensors each round: loss, accuracy and the exact clinical
    metrics (``common.evaluation.point_metrics``); ``evaluation`` adds bootstrap
    intervals, for the final head (the same code as ``fedhead evaluate``).
    """

    def __init__(self, cfg: RunConfig, sm: ServerModel) -> None:
        # decoded as the sites decode their images: large files reduced for the input size
        policy = ReadPolicy(decode=DecodeLimits.for_input(cfg.resolved_input_size()))
        test = load_test_set(Path(cfg.server_test_data).expanduser(), cfg.class_names(), policy)
        extractor, self.device = server_extractor(cfg, sm)
        feats = extractor(test.images)
        self.features = feats.values
        self.labels = torch.from_numpy(test.labels[feats.ok])
        self.classes = cfg.class_names()
        self.sm = sm
        log.info(
            "server test set: %d images (%d unreadable)", len(self.labels), feats.stats.skipped
        )

    def _proba(self) -> np.ndarray:
        logits = head_logits(self.sm.model, self.features, self.device)
        return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64)

    def __call__(self, arrays: list[np.ndarray]) -> tuple[float, float, dict[str, float]]:
        self.sm.trainable.set(self.sm.model, arrays)
        res = evaluate_head(self.sm.model, self.features, self.labels, self.device)
        if res.examples == 0:
            return res.loss, res.accuracy, {}
        metrics = point_metrics(self.labels.numpy(), self._proba(), self.classes)
        return res.loss, res.accuracy, {k: v for k, v in metrics.items() if "/" not in k}

    def evaluation(self, arrays: list[np.ndarray]) -> Evaluation | None:
        """Every metric with its bootstrap interval (None without test images)."""
        if len(self.labels) == 0:
            return None
        self.sm.trainable.set(self.sm.model, arrays)
        return evaluate_predictions(self.labels.numpy(), self._proba(), self.classes)


def server_test_set(cfg: RunConfig, sm: ServerModel) -> ServerTestSet | None:
    """The server's test set, if one is configured."""
    return ServerTestSet(cfg, sm) if cfg.server_test_data else None
