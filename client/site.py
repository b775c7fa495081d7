"""One site's side of a run, in plain Python: data, backbone copy, training, evaluation.

The Flower ClientApp (``fedhead.client.app``) only translates messages to calls here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedhead.client.models import SiteModels, site_cache_dir, site_models_dir
from fedhead.common.backbones import backbone_names, get_spec
from fedhead.common.closed_form import FixedPointCodec, Statistics, clipped_statistics
from fedhead.common.config import MAX_INPUT_SIZE, NodeConfig
from fedhead.common.datasets import ReadPolicy, SiteData, load_site_data
from fedhead.common.device import Device, select_device
from fedhead.common.errors import (
    DataError,
    ModelMismatchError,
    RunSpecError,
    WeightsError,
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
from fedhead.common.files import atomic_folder, atomic_writer
from fedhead.common.heads import head_sha256
from fedhead.common.images import (
    AugmentedImages,
    Augmenter,
    DecodeLimits,
    HashMemo,
    ImageSource,
    LabeledImages,
    SubsetImages,
)
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone, weights_filename
from fedhead.common.pooled import EvalStatistics
from fedhead.common.protocol import (
    PROTOCOL_VERSION,
    WEIGHTS_MISMATCH,
    WEIGHTS_MISSING,
    WEIGHTS_OK,
    FitSettings,
    ModelDescription,
    PrepareReply,
    RunSpec,
    StatisticsRequest,
    format_model_requests,
)
from fedhead.common.simulation import simulated_site_data
from fedhead.common.telemetry import SiteDevice, SiteFeatures, SiteTrained, emit
from fedhead.common.training import (
    EvalResult,
    TrainParams,
    TrainResult,
    evaluate_head,
    head_logits,
    train_head,
)
from fedhead.common.weights import (
    WeightsRef,
    default_search_dirs,
    find_weights,
    install_bytes,
)

log = logging.getLogger(__name__)

# A kept final model: ``<cache-dir>/models/<run-id>/{head.safetensors,model.json}``.


def check_run_spec(spec: RunSpec) -> None:
    """Refuse a run description this site must not act on, naming every problem.

    The weights file name is joined to this site's folders, so only the name this
    fedhead version gives that backbone's file is accepted: the registered file name,
    or for a custom checkpoint ``<backbone>-custom-<sha256 prefix>.pth``. Nothing here
    touches the file system.
    """
    problems = []
    if spec.protocol != PROTOCOL_VERSION:
        problems.append(f"protocol {spec.protocol} (this site speaks {PROTOCOL_VERSION})")
    sha_ok = len(spec.weights_sha256) == 64 and all(
        c in "0123456789abcdef" for c in spec.weights_sha256
    )
    if not sha_ok:
        problems.append("weights_sha256 is not 64 lowercase hex digits")
    if spec.backbone not in backbone_names():
        known = ", ".join(backbone_names())
        problems.append(f"backbone {spec.backbone[:64]!r} is unknown here (known: {known})")
    elif sha_ok:
        backbone = get_spec(spec.backbone)
        expected = weights_filename(backbone, spec.weights_sha256 if spec.custom_weights else "")
        if spec.weights_file != expected:
            what = "a custom checkpoint of " if spec.custom_weights else ""
            problems.append(
                f"weights_file {spec.weights_file[:128]!r} is not the file name of "
                f"{what}{backbone.name} ({expected})"
            )
        if not spec.custom_weights and spec.weights_sha256 != backbone.sha256:
            problems.append(
                f"weights_sha256 is not the registered sha256 of {backbone.name} "
                "(a custom checkpoint must be announced as one)"
            )
        if backbone.fixed_input_size and spec.input_size != backbone.input_size:
            problems.append(
                f"input_size {spec.input_size}: {backbone.name} needs {backbone.input_size}"
            )
    if not 1 <= spec.input_size <= MAX_INPUT_SIZE:
        problems.append(f"input_size {spec.input_size} is not in 1..{MAX_INPUT_SIZE}")
    if problems:
        raise RunSpecError(
            "the server's run description is refused: " + "; ".join(problems),
            "ask the operator to check the run configuration and that server and sites "
            "run the same fedhead version",
        )


@dataclass(frozen=True)
class TrainOutcome:
    arrays: list[np.ndarray]  # the trained tensors, in TrainableSet order
    result: TrainResult
    extraction: ExtractionStats


class Site:
    """A site's state for one run: resolved lazily and reused across messages."""

    def __init__(self, node: NodeConfig, spec: RunSpec) -> None:
        check_run_spec(spec)  # before anything is looked up or written
        self.node = node
        self.spec = spec
        self.cache_dir = site_cache_dir(node)
        self.models = SiteModels(site_models_dir(node))
        if node.threads:
            torch.set_num_threads(node.threads)  # co-located sites share the cores
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
        self._head: FedHeadModel | None = None
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

    def read_policy(self) -> ReadPolicy:
        """Where this site's images may lie, and how far they are decoded for this run."""
        return ReadPolicy(
            self.node.data_root_paths(),
            DecodeLimits.for_input(self.spec.input_size, self.node.max_image_pixels),
        )

    def _load_data(self) -> SiteData:
        classes = self.spec.class_names()
        if not self.node.simulated:
            return load_site_data(
                Path(self.node.data_path).expanduser(),
                classes,
                self.spec.val_fraction,
                self.spec.seed,
                self._hash_memo(),
                self.read_policy(),
                self.node.reader_settings(),
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
            self.read_policy(),
        )

    def _hash_memo(self) -> HashMemo:
        return HashMemo(self.cache.lookup_hash, self.cache.store_hash)

    def model(self) -> FedHeadModel:
        """The full model: the backbone loaded from its verified file, and the head."""
        if self._model is None:
            path = find_weights(self.ref, default_search_dirs(self.cache_dir))
            model, trainable = _shared_model(self.spec, path, self.device.kind)
            self._check(trainable)
            self._model = model
        return self._model

    def trained_model(self) -> FedHeadModel:
        """What trains and evaluates: without unfrozen blocks the head alone, since
        features come from the cache (the trunk is built only to extract missing ones)."""
        if self.spec.unfreeze_blocks:
            return self.model()
        if self._head is None:
            head = FedHeadModel.for_run(get_spec(self.spec.backbone), None, self.spec)
            self._check(TrainableSet.of(head))
            self._head = head
        return self._head

    def _check(self, trainable: TrainableSet) -> None:
        if trainable.fingerprint() != self.spec.trainable_fingerprint:
            raise ModelMismatchError(
                "this site's model has other trainable tensors than the server's "
                f"({len(trainable.tensors)} tensors, {trainable.num_params} parameters)",
                "server and site must run the same fedhead version",
            )
        self._trainable = trainable

    def run_start(self) -> tuple[TrainableSet, list[np.ndarray] | None]:
        """The run's trainable set and, when this site can compute it, the head the run
        starts from (``initial_trainable``): a head from the seed, and unfrozen blocks
        from the verified weights (None while this site lacks them). Built afresh: a
        model of this process may hold another run's tensors."""
        backbone_spec = get_spec(self.spec.backbone)
        backbone = None
        if self.spec.unfreeze_blocks:
            try:
                path = find_weights(self.ref, default_search_dirs(self.cache_dir))
            except WeightsError:  # missing or altered (logged by weights_status)
                model = FedHeadModel.for_run(backbone_spec, backbone_spec.build(), self.spec)
                return TrainableSet.of(model), None
            backbone = load_backbone(backbone_spec, path)
        model = FedHeadModel.for_run(backbone_spec, backbone, self.spec)
        trainable = TrainableSet.of(model)
        return trainable, trainable.get(model)

    @property
    def trainable(self) -> TrainableSet:
        self.trained_model()
        assert self._trainable is not None
        return self._trainable

    def _extractor(self) -> FeatureExtractor:
        spec = get_spec(self.spec.backbone)
        model = self.trained_model()
        return FeatureExtractor(
            model,
            spec.preprocessor(self.spec.input_size),
            self.device,
            self.spec.weights_sha256,
            self.cache,
            trunk=None if model.has_trunk else self.model,
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
        Features already held in memory (a warm worker's later rounds) count as cached.
        """
        if part in self._features:
            values, labels, stats = self._features[part]
            held = stats.cache_hits + stats.cache_misses
            return (
                values,
                labels,
                replace(stats, cache_hits=held, cache_misses=0, extracted=0, extract_seconds=0.0),
            )
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
            site_name=self.label,
            missing_models=format_model_requests(self.models.missing()),
        )

    @property
    def label(self) -> str:
        """The site's chosen name; a simulated node without one is named after its data
        (``site-<i>``); else empty."""
        if self.node.site_name or not self.node.simulated:
            return self.node.site_name
        return f"site-{self.node.partition_id}"

    def train(self, arrays: list[np.ndarray], settings: FitSettings) -> TrainOutcome:
        if settings.trainable_fingerprint != self.spec.trainable_fingerprint:
            raise ModelMismatchError("round settings name another trainable set than the run")
        model = self.trained_model()
        self.trainable.set(model, arrays)
        feats, labels, stats = self.features("train")
        if len(labels) == 0:
            raise DataError(
                f"no usable training images at {self.data().source} ({stats.skipped} unreadable)",
                "fix or replace the image files",
            )
        params = TrainParams.of_run(
            settings,
            settings.local_epochs,
            settings.learning_rate,
            settings.server_round,
            settings.proximal_mu,
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

    def keep_model(
        self, run_id: int, description: ModelDescription, files: Mapping[str, bytes]
    ) -> tuple[Path, str]:
        """Verify the run's model package and keep it under ``<cache-dir>/models/<run-id>/``
        (ready for ``fedhead predict --model``); returns where, and the head's sha256.

        It must be the model this site trained: a package that reads back whole (format,
        tensors file checksum), for the backbone this site holds (sha256) and the run's
        classes, with the same trainable tensors (names and shapes) and a head whose
        sha256 is the one described. A model already kept for the run is never replaced
        by another.
        """
        from fedhead.common.package import MODEL_CARD, MODEL_JSON, TENSORS_FILE, ModelPackage

        if description.run_id != run_id:
            raise ModelMismatchError(f"a final model for run {description.run_id} in run {run_id}")
        if set(files) != {MODEL_JSON, TENSORS_FILE, MODEL_CARD}:
            raise ModelMismatchError(
                f"the final model holds files {sorted(files)}, expected {MODEL_JSON}, "
                f"{TENSORS_FILE} and {MODEL_CARD}"
            )
        if self.weights_status() != WEIGHTS_OK:
            raise ModelMismatchError(
                "this site no longer holds the run's backbone with its sha256",
                "the final model is of no use without it",
            )
        names = self.trainable.names
        dest = self.models.model_dir(run_id)

        def already_kept() -> tuple[Path, str]:  # sites sharing a cache folder
            kept = ModelPackage.load(dest)
            sha = head_sha256(names, [kept.tensors[n] for n in names])
            if sha != description.head_sha256:
                raise ModelMismatchError(
                    f"{dest} already holds another final model for run {run_id}",
                    "nothing was overwritten; move that folder away to accept this one",
                )
            self.models.kept(run_id, self.spec, sha)
            return dest, sha

        if (dest / TENSORS_FILE).is_file():
            return already_kept()
        try:
            return self._write_model(dest, description, files, names)
        except OSError:
            if (dest / TENSORS_FILE).is_file():  # another site of this cache won the race
                return already_kept()
            raise

    def _write_model(
        self,
        dest: Path,
        description: ModelDescription,
        files: Mapping[str, bytes],
        names: list[str],
    ) -> tuple[Path, str]:
        from fedhead.common.package import ModelPackage

        spec = self.spec
        run_id = description.run_id
        with atomic_folder(dest) as tmp:
            for name, data in files.items():
                with atomic_writer(tmp / name) as f:
                    f.write(data)
            pkg = ModelPackage.load(tmp)  # format, checksum of the tensors file
            problems = []
            if pkg.backbone.sha256 != spec.weights_sha256:
                problems.append(
                    f"backbone sha256 {pkg.backbone.sha256[:12]}…, this site trained on "
                    f"{spec.weights_sha256[:12]}…"
                )
            if list(pkg.classes) != spec.class_names():
                problems.append(f"classes {', '.join(pkg.classes)}, the run's are {spec.classes}")
            if pkg.architecture.trainable().fingerprint() != spec.trainable_fingerprint:
                problems.append("another trainable set than the run's")
            missing = [n for n in names if n not in pkg.tensors]
            if missing or len(pkg.tensors) != len(names):
                problems.append(f"tensors {sorted(pkg.tensors)[:3]}…, expected {names[:3]}…")
            if problems:
                raise ModelMismatchError("the final model does not fit: " + "; ".join(problems))
            arrays = [pkg.tensors[n] for n in names]
            if more := self.trainable.problems(arrays):
                raise ModelMismatchError("the final model does not fit: " + "; ".join(more[:3]))
            sha = head_sha256(names, arrays)
            if sha != description.head_sha256:
                raise ModelMismatchError(
                    f"the final model's tensors have sha256 {sha[:12]}…, "
                    f"described as {description.head_sha256[:12]}…"
                )
        self.models.kept(run_id, spec, sha)
        log.info("kept the final model of run %d at %s (head sha256 %s)", run_id, dest, sha)
        return dest, sha

    def training_statistics(self, feature_clip: float = 0.0) -> Statistics:
        """The sufficient statistics of this site's training features (every augmented
        view an example), each feature vector clipped to ``feature_clip`` (> 0: DP)."""
        values, labels, _ = self.features("train")
        if len(labels) == 0:
            raise DataError("no usable training images for the statistics", "check the data")
        features = values.float().numpy()
        classes = len(self.spec.class_names())
        if feature_clip <= 0:
            return Statistics.of(features, labels.numpy(), classes)
        clipped = clipped_statistics(features, labels.numpy(), classes, feature_clip)
        log.info(
            "statistics: %d of %d feature vectors clipped to L2 norm %g (differential privacy)",
            clipped.clipped,
            clipped.examples,
            feature_clip,
        )
        return clipped.statistics

    def statistics(self, request: StatisticsRequest) -> tuple[np.ndarray, int]:
        """The statistics for a closed-form head (``common.closed_form``), as ``request``
        asks to send them: the vector and the weight the site reports. Under SecAgg+
        every site weighs one (the statistics are sums) and the vector is the fixed-point
        code; a site holding more images than max-site-examples scales its statistics
        down to that many."""
        if request.trainable_fingerprint != self.spec.trainable_fingerprint:
            raise ModelMismatchError("the statistics request names another trainable set")
        stats = self.training_statistics(request.feature_clip)
        cap = request.max_site_examples * (1 + self.spec.augment_views)
        if stats.total > cap:
            log.info(
                "statistics: %d examples count as %d (max-site-examples %d)",
                stats.total,
                cap,
                request.max_site_examples,
            )
            stats = stats.scaled(cap / stats.total)
        vector = stats.to_vector()
        if not request.secure:
            return vector, round(stats.total)
        codec = FixedPointCodec(
            request.clipping_range, request.quantization_range, request.fraction_bits, request.limbs
        )
        return codec.encode(vector, stats.layout), 1

    def evaluate(self, arrays: list[np.ndarray]) -> EvalResult:
        model = self.trained_model()
        self.trainable.set(model, arrays)
        feats, labels, _ = self.features("val")
        return evaluate_head(model, feats, labels, self.device)

    def evaluation_statistics(self, arrays: list[np.ndarray]) -> EvalStatistics:
        """The count tables the server pools into clinical metrics (``common.pooled``):
        confusion counts and score histograms over the validation split, coarsened so
        that no reported score describes fewer than ``MIN_CELL`` images."""
        model = self.trained_model()
        self.trainable.set(model, arrays)
        feats, labels, _ = self.features("val")
        proba = torch.softmax(head_logits(model, feats, self.device), dim=1)
        exact = EvalStatistics.from_predictions(labels.numpy(), proba.cpu().numpy())
        return exact.coarsened()


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
