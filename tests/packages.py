"""Building real model packages for tests: the real mobilenet_v2 trunk, a small input
size, a head trained for a few steps on real X-rays so its predictions vary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedhead.common import demo_data
from fedhead.common.backbones import get_spec
from fedhead.common.config import RunConfig
from fedhead.common.device import select_device
from fedhead.common.features import FeatureExtractor
from fedhead.common.images import ArrayImages, Preprocessor
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone
from fedhead.common.package import ModelPackage, TrainingSummary, package_from_run
from fedhead.common.training import TrainParams, train_head

# MODEL_CARD.md of the test packages: the server renders the real one
# (fedhead.server.model_card, tested in tests/server/test_model_card.py).
CARD = "# Model card\n\nA package built by fedhead's tests.\n"


def run_config(**overrides: object) -> RunConfig:
    base: dict[str, object] = {"classes": ",".join(demo_data.CLASSES), "input-size": 32}
    return RunConfig.from_mapping({**base, **overrides})


def make_package(
    weights: Path,
    cfg: RunConfig | None = None,
    train_steps: bool = True,
) -> ModelPackage:
    """A package as a run would leave it: the run's model with (briefly) trained tensors."""
    cfg = cfg or run_config()
    spec = get_spec(cfg.backbone)
    torch.manual_seed(cfg.seed)
    model = FedHeadModel.for_run(spec, load_backbone(spec, weights), cfg)
    if train_steps:
        data = demo_data.load("train")
        idx = np.concatenate([np.flatnonzero(data.labels == c)[:32] for c in (0, 1)])
        device = select_device("cpu")
        preprocess = Preprocessor(cfg.resolved_input_size(), spec.mean, spec.std)
        extractor = FeatureExtractor(model, preprocess, device, spec.sha256)
        feats = extractor(ArrayImages(data.images[idx], "train"))
        labels = torch.from_numpy(data.labels[idx][feats.ok])
        train_head(model, feats.values, labels, TrainParams(5, 16, 0.01), device)
    arrays = TrainableSet.of(model).get(model)
    training = TrainingSummary(
        run_id=7,
        rounds=3,
        sites=2,
        examples=64,
        class_counts=(32, 32),
        secure_aggregation="secagg+",
    )
    metrics = {"federated_eval_accuracy": 0.75, "federated_eval_loss": 0.5}
    return package_from_run(cfg, model, arrays, training, metrics)
