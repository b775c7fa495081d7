"""One site's side of a run, in plain Python: data, backbone copy, training, evaluation.

The Flower ClientApp (``fedhead.client.app``) only translates messages to calls here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.config import NodeConfig
from fedhead.common.datasets import SiteData, load_site_data
from fedhead.common.device import Device, select_device
from fedhead.common.errors import (
    DataError,
    ModelMismatchError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from fedhead.common.features import (
    ExtractionStats,
    FeatureCache,
    FeatureExtractor,
    Features,
    open_cache,
)
from fedhead.common.images import (
    AugmentedImages,
    Augmenter,
    HashMemo,
    ImageSource,
    LabeledImages,
    Preprocessor,
    SubsetImages,
)
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone
from fedhead.common.protocol import (
    WEIGHTS_MISMATCH,
    WEIGHTS_MISSING,
    WEIGHTS_OK,
    FitSettings,
    PrepareReply,
    RunSpec,
)
from fedhead.common.simulation import simulated_site_data
from fedhead.common.telemetry import SiteDevice, SiteFeatures, SiteTrained, emit
from fedhead.common.training import EvalResult, TrainParams, TrainResult, evaluate_head, train_head
from fedhead.common.weights import (
    WeightsRef,
    default_search_dirs,
    fedhead_cache_dir,
    find_weights,
    install_bytes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    arrays: list[np.ndarray]  # the trained tensors, in TrainableSet order
    result: TrainResult
    extraction: ExtractionStats


class Site:
    """A site's state for one run: resolved lazily and reused across messages."""

    def __init__(self, node: NodeConfig, spec: RunSpec) -> None:
        self.node = node
        self.spec = spec
        self.cache_dir = (
            Path(node.cache_dir).expanduser() if node.cache_dir else fedhead_cache_dir()
        )
        self.device: Device = select_device(node.device)
        self.ref = WeightsRef(
            filename=spec.weights_file,
            sha256=spec.weights_sha256,
            label=f"backbone {spec.backbone}",
            install_hint="let the server send it (it does so when this site lacks it)",
        )
        self._cache: FeatureCache | None = None
        self._data: SiteData | None = None
        self._model: FedHeadModel | None = None
        self._trainable: TrainableSet | None = None
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor, ExtractionStats]] = {}

    # --- backbone ------------------------------------------------------------------
    def weights_status(self) -> str:
        """Whether this site holds the run's backbone: ok, missing or mismatch.

        Details (local paths) are logged here and never sent to the server.
        """
        try:
            find_weights(self.ref, default_search_dirs(self.cache_dir))
        except WeightsNotFoundError as err:
            log.info("%s; asking the server for it", err.what)
            return WEIGHTS_MISSING
        except WeightsMismatchError as err:
            log.error("refusing the local copy: %s", err)
            return WEIGHTS_MISMATCH
        return WEIGHTS_OK

    def install_weights(self, data: bytes | memoryview) -> Path:
        """Verify weights received from the server and cache them for later runs."""
        path = install_bytes(data, self.ref, self.cache_dir / "weights")
        log.info("cached backbone %s from the server at %s", self.spec.backbone, path)
        return path

    # --- data and model ------------------------------------------------------------
    @property
    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = open_cache(
                self.cache_dir / "features.sqlite", int(self.node.feature_cache_gb * 1024**3)
            )
        return self._cache

    def data(self) -> SiteData:
        if self._data is None:
            self._data = self._load_data()
            log.info("site data %s", self._data.summary(self.spec.class_names()))
        return self._data

    def _load_data(self) -> SiteData:
        classes = self.spec.class_names()
        if not self.node.simulated:
            return load_site_data(
                Path(self.node.data_path).expanduser(),
                classes,
                self.spec.val_fraction,
                self.spec.seed,
                self._hash_memo(),
            )
        return simulated_site_data(
            self.node.partition_id,
            self.node.num_partitions,
            classes,
            self.spec.simulation_data,
            self.spec.dirichlet_alpha,
            self.spec.val_fraction,
            self.spec.seed,
            self._hash_memo(),
        )

    def _hash_memo(self) -> HashMemo:
        return HashMemo(self.cache.lookup_hash, self.cache.store_hash)

    def model(self) -> FedHeadModel:
        if self._model is None:
            path = find_weights(self.ref, default_search_dirs(self.cache_dir))
            model, trainable = _shared_model(self.spec, path, self.device.kind)
            if trainable.fingerprint() != self.spec.trainable_fingerprint:
                raise ModelMismatchError(
                    "this site's model has other trainable tensors than the server's "
                    f"({len(trainable.tensors)} tensors, {trainable.num_params} parameters)",
                    "server and site must run the same fedhead version",
                )
            self._model, self._trainable = model, trainable
        return self._model

    @property
    def trainable(self) -> TrainableSet:
        self.model()
        assert self._trainable is not None
        return self._trainable

    def _extractor(self) -> FeatureExtractor:
        spec = get_spec(self.spec.backbone)
        return FeatureExtractor(
            self.model(),
            Preprocessor(self.spec.input_size, spec.mean, spec.std),
            self.device,
            self.spec.weights_sha256,
            self.cache,
        )

    def _extract(self, extractor: FeatureExtractor, images: ImageSource, part: str) -> Features:
        feats = extractor(images)
        s = feats.stats
        if s.skipped:
            log.warning(
                "%s: skipped %d unreadable image(s) of %d, e.g. %s",
                part,
                s.skipped,
                len(images),
                s.skipped_examples[0],
            )
        emit(
            SiteFeatures(
                s.images, s.extracted, s.extract_seconds, s.cache_hits, s.cache_misses, s.skipped
            )
        )
        return feats

    def features(self, part: str) -> tuple[torch.Tensor, torch.Tensor, ExtractionStats]:
        """Trunk features and labels of the usable images of 'train' or 'val'.

        With augmentation (``augment-views`` > 0) the training features get a leading
        view dimension: the image itself, then its augmented views, all cached.
        """
        if part not in self._features:
            images: LabeledImages = getattr(self.data(), part)
            extractor = self._extractor()
            feats = self._extract(extractor, images.images, part)
            values = feats.values
            if part == "train" and self.spec.augment_views and len(feats.ok):
                augmenter = Augmenter(self.spec.augment_views, self.spec.augment_flip)
                usable = SubsetImages(images.images, feats.ok.tolist())
                views = [
                    self._extract(extractor, AugmentedImages(usable, augmenter, v), part).values
                    for v in range(self.spec.augment_views)
                ]
                values = torch.stack([values, *views])
            labels = torch.from_numpy(images.labels[feats.ok])
            self._features[part] = (values, labels, feats.stats)
        return self._features[part]

    # --- federated steps -------------------------------------------------------------
    def prepare(self) -> PrepareReply:
        """Load and count the data (bad data fails here, before any round) and check weights."""
        data = self.data()
        status = self.weights_status()
        self.report_device()
        return PrepareReply(
            weights=status,
            detail="local copy failed its sha256 check" if status == WEIGHTS_MISMATCH else "",
            train_examples=len(data.train),
            val_examples=len(data.val),
            device=self.device.kind,
            site_name=self.node.site_name,
        )

    def train(self, arrays: list[np.ndarray], settings: FitSettings) -> TrainOutcome:
        if settings.trainable_fingerprint != self.spec.trainable_fingerprint:
            raise ModelMismatchError("round settings name another trainable set than the run")
        model = self.model()
        self.trainable.set(model, arrays)
        feats, labels, stats = self.features("train")
        if len(labels) == 0:
            raise DataError(
                f"no usable training images at {self.data().source} ({stats.skipped} unreadable)",
                "fix or replace the image files",
            )
        params = TrainParams(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            optimizer=settings.optimizer,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            tuned_lr_scale=settings.unfreeze_lr_scale,
            seed=settings.seed * 100_003 + settings.server_round,
        )
        views = self.spec.augment_views > 0
        result = train_head(model, feats, labels, params, self.device, views=views)
        emit(SiteTrained(result.seconds, result.examples))
        self.report_device()
        return TrainOutcome(self.trainable.get(model), result, stats)

    def report_device(self) -> None:
        peak = 0
        if self.device.kind == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device.torch_device))
        emit(SiteDevice(self.device.kind, self.device.describe(), peak))

    def evaluate(self, arrays: list[np.ndarray]) -> EvalResult:
        model = self.model()
        self.trainable.set(model, arrays)
        feats, labels, _ = self.features("val")
        return evaluate_head(model, feats, labels, self.device)


# One model per process and run configuration. A simulation worker serves many sites
# in turn; they all use the same frozen trunk, and every train or evaluate call loads
# the trainable tensors it is given before using the model, so sites can share it.
_MODELS: dict[tuple[object, ...], tuple[FedHeadModel, TrainableSet]] = {}


def _shared_model(spec: RunSpec, weights: Path, device: str) -> tuple[FedHeadModel, TrainableSet]:
    key = (
        spec.weights_sha256,
        spec.backbone,
        spec.classes,
        spec.head,
        spec.head_hidden,
        spec.head_dropout,
        spec.unfreeze_blocks,
        device,
    )
    if key not in _MODELS:
        _MODELS.clear()  # one run at a time per process: free the previous run's model
        backbone = get_spec(spec.backbone)
        model = FedHeadModel.for_run(backbone, load_backbone(backbone, weights), spec)
        _MODELS[key] = (model, TrainableSet.of(model))
    return _MODELS[key]
