"""One federated run, server side: from a RunConfig to a RunReport.

Resolves and verifies the backbone on the server, builds the model and the initial
head, describes the run to the sites (RunSpec), and drives FedHeadWorkflow with the
plain or the SecAgg+ fit step. Both the ServerApp and ``fedhead demo`` call
``run_federation``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedhead.common.backbones import BackboneSpec, get_spec
from fedhead.common.config import RunConfig
from fedhead.common.datasets import load_test_set
from fedhead.common.device import Device, select_device
from fedhead.common.errors import WeightsError
from fedhead.common.features import FeatureExtractor, open_cache
from fedhead.common.images import Preprocessor
from fedhead.common.model import (
    FedHeadModel,
    TrainableSet,
    count_params,
    load_backbone,
    weights_ref,
)
from fedhead.common.protocol import PROTOCOL_VERSION, FitSettings, RunSpec
from fedhead.common.telemetry import (
    RoundFinished,
    RoundStarted,
    RunFinished,
    RunPrepared,
    RunStarted,
    emit,
)
from fedhead.common.training import evaluate_head
from fedhead.common.weights import (
    default_search_dirs,
    download,
    fedhead_cache_dir,
    find_weights,
)
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.report import TABLE_HEADER, RoundRecord, RunReport, table_row
from fedhead.server.secure import DPFixedClipping, PrivacyLedger, TimedSecAggPlus, secagg_params
from fedhead.server.strategy import FedHeadStrategy
from fedhead.server.workflow import FedHeadWorkflow, MeteredGrid, PlainEvaluate, PlainFit, Step

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
    return RunSpec(
        protocol=PROTOCOL_VERSION,
        backbone=sm.spec.name,
        weights_file=weights_ref(sm.spec, cfg.backbone_sha256).filename,
        weights_sha256=sm.sha256,
        weights_bytes=sm.weights_path.stat().st_size,
        custom_weights=bool(cfg.backbone_weights),
        classes=",".join(cfg.class_names()),
        input_size=cfg.resolved_input_size(),
        head=cfg.head,
        head_hidden=cfg.head_hidden,
        head_dropout=cfg.head_dropout,
        unfreeze_blocks=cfg.unfreeze_blocks,
        augment_views=cfg.augment_views,
        augment_flip=cfg.augment_flip,
        trainable_fingerprint=sm.trainable.fingerprint(),
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        simulation_data=cfg.simulation_data,
        dirichlet_alpha=cfg.dirichlet_alpha,
    )


def fit_settings(cfg: RunConfig, trainable: TrainableSet) -> FitSettings:
    return FitSettings(
        server_round=0,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        unfreeze_lr_scale=cfg.unfreeze_lr_scale,
        seed=cfg.seed,
        trainable_fingerprint=trainable.fingerprint(),
        max_update_norm=cfg.max_update_norm,
        clipping_range=cfg.secagg_clipping_range if cfg.secure_aggregation else 0.0,
        uniform_weight=cfg.dp_noise_multiplier > 0,
    )


def server_extractor(
    cfg: RunConfig, sm: ServerModel, progress: bool = False
) -> tuple[FeatureExtractor, Device]:
    """The trunk on the server (its own test set, the demo's baseline), via its cache."""
    device = select_device(cfg.device)
    extractor = FeatureExtractor(
        sm.model,
        Preprocessor(cfg.resolved_input_size(), sm.spec.mean, sm.spec.std),
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
    test = load_test_set(Path(cfg.server_test_data).expanduser(), cfg.class_names())
    extractor, device = server_extractor(cfg, sm)
    feats = extractor(test.images)
    labels = torch.from_numpy(test.labels[feats.ok])
    log.info("server test set: %d images (%d unreadable)", len(labels), feats.stats.skipped)

    def evaluate(arrays: list[np.ndarray]) -> tuple[float, float]:
        sm.trainable.set(sm.model, arrays)
        res = evaluate_head(sm.model, feats.values, labels, device)
        return res.loss, res.accuracy

    return evaluate


RoundCallback = Callable[[RoundRecord], None]


def run_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: RoundCallback | None = None,
    out_dir: Path | None = None,
) -> RunReport:
    """Run every round of one federated job and write its report."""
    emit(RunStarted(cfg.backbone, "secagg+" if cfg.secure_aggregation else "none"))
    try:
        report = _Run(grid, context, cfg, on_round, out_dir)()
    except BaseException:
        emit(RunFinished(ok=False))
        raise
    emit(RunFinished(ok=True))
    return report


def _fmt_acc(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "-"


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


class _Run:
    """One run's server side: the hooks the workflow calls, and the report they fill."""

    def __init__(
        self,
        grid: Grid,
        context: Context,
        cfg: RunConfig,
        on_round: RoundCallback | None,
        out_dir: Path | None,
    ) -> None:
        self.cfg = cfg
        self.context = context
        self.on_round = on_round
        self.sm = build_server_model(cfg)
        self.spec = run_spec(cfg, self.sm)
        self.strategy = FedHeadStrategy(
            trainable=self.sm.trainable,
            initial=self.sm.trainable.get(self.sm.model),
            settings=fit_settings(cfg, self.sm.trainable),
            num_rounds=cfg.num_server_rounds,
            min_sites=cfg.min_sites,
            lr_schedule=cfg.lr_schedule,
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            secure=cfg.secure_aggregation,
            max_update_norm=cfg.max_update_norm,
            server_evaluate=server_evaluator(cfg, self.sm),
        )
        self.grid = MeteredGrid(grid)
        self.privacy: PrivacyLedger | None = None
        self.out = (out_dir or Path(cfg.out_dir or f"fedhead-runs/run-{context.run_id}")).absolute()
        sm = self.sm
        self.report = RunReport(
            run_id=context.run_id,
            backbone={
                "name": sm.spec.name,
                "sha256": sm.sha256,
                "weights_file": self.spec.weights_file,
                "custom": self.spec.custom_weights,
                "trunk_params": count_params(sm.model.frozen) + count_params(sm.model.tuned),
                "head_params": sm.trainable.num_params,
                "head_bytes": sm.trainable.nbytes,
                "trainable_tensors": sm.trainable.names,
            },
            clients=0,
            input_size=self.spec.input_size,
            config=cfg.to_mapping(),
        )

    def __call__(self) -> RunReport:
        t_start = time.perf_counter()
        cfg, sm = self.cfg, self.sm
        log.info(
            "run %d: backbone %s (sha256 %s…), %d trainable parameters (%d bytes per message), "
            "%d rounds",
            self.context.run_id,
            sm.spec.name,
            sm.sha256[:12],
            sm.trainable.num_params,
            sm.trainable.nbytes,
            cfg.num_server_rounds,
        )
        workflow = FedHeadWorkflow(
            strategy=self.strategy,
            distributor=BackboneDistributor(
                self.spec, sm.weights_path, cfg.round_timeout, cfg.site_labels
            ),
            build_round=self.build_round,
            evaluate_step=PlainEvaluate(cfg.round_timeout),
            num_rounds=cfg.num_server_rounds,
            min_sites=cfg.min_sites,
            join_timeout=cfg.join_timeout,
            on_prepared=self.prepared,
            on_round=self.round_done,
            on_round_start=lambda rnd: emit(RoundStarted(rnd)),
        )
        legacy = LegacyContext(
            context=self.context,
            config=ServerConfig(num_rounds=cfg.num_server_rounds),
            strategy=self.strategy,
        )
        workflow(self.grid, legacy)
        report = self.report
        finals = [r for r in report.rounds if math.isfinite(r.eval_accuracy)]
        if finals:
            report.final_eval_accuracy = finals[-1].eval_accuracy
            report.final_eval_loss = finals[-1].eval_loss
        tested = [r for r in report.rounds if math.isfinite(r.server_eval_accuracy)]
        if tested:
            report.final_server_eval_accuracy = tested[-1].server_eval_accuracy
            report.final_server_eval_loss = tested[-1].server_eval_loss
        report.seconds = time.perf_counter() - t_start
        path = report.write(self.out)
        log.info(
            "final accuracy: federated %s%s; report written to %s (on the SuperLink's host)",
            _fmt_acc(report.final_eval_accuracy),
            f", server test set {_fmt_acc(report.final_server_eval_accuracy)}" if tested else "",
            path,
        )
        return report

    def build_round(self, outcome: PrepareOutcome) -> tuple[Step, Strategy]:
        """Once sites joined: the fit step and the strategy it drives, sized to them."""
        cfg, ready = self.cfg, len(outcome.ready)
        sampled = min(ready, max(cfg.min_sites, math.ceil(cfg.fraction_train * ready)))
        legacy: Strategy = self.strategy
        if cfg.dp_noise_multiplier > 0:
            legacy = DPFixedClipping(
                self.strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled
            )
            self.privacy = PrivacyLedger(cfg.dp_noise_multiplier, cfg.dp_delta, ready, sampled)
            self.report.differential_privacy = {
                "noise_multiplier": cfg.dp_noise_multiplier,
                "clipping_norm": cfg.dp_clipping_norm,
                "delta": cfg.dp_delta,
                "sites": ready,
                "sampled_per_round": sampled,
                "accounting": "RDP, no sampling amplification, add-or-remove-one site",
            }
            log.info(
                "differential privacy on: clipping norm %g, noise multiplier %g, %d sites",
                cfg.dp_clipping_norm,
                cfg.dp_noise_multiplier,
                sampled,
            )
        if not cfg.secure_aggregation:
            log.warning(
                "secure aggregation is OFF (secure-aggregation=false): the server sees every "
                "site's head update"
            )
            return PlainFit(cfg.round_timeout), legacy
        max_examples = max(r.train_examples for r in outcome.ready.values())
        params = secagg_params(cfg, sampled, max_examples)
        self.report.secure_aggregation = "secagg+"
        self.report.secure_aggregation_params = params.report()
        log.info(
            "secure aggregation: SecAgg+ over %d sites (shares %s, threshold %s, clipping +-%g)",
            sampled,
            params.num_shares,
            params.reconstruction_threshold,
            params.clipping_range,
        )

        def stage_done(rnd: int, stage: str, seconds: float) -> None:
            self.strategy.stats(rnd).secagg_seconds[stage] = seconds

        return TimedSecAggPlus(params, stage_done), legacy

    def prepared(self, outcome: PrepareOutcome) -> None:
        sent, received = self.grid.take()
        self.report.clients = len(outcome.ready)
        self.report.setup = {
            "sites_ready": sorted(outcome.ready),
            "sites_failed": {str(k): v for k, v in outcome.failed.items()},
            "backbone_sent_to": sorted(outcome.weights_sent_to),
            "bytes_to_clients": sent,
            "bytes_from_clients": received,
            "train_examples": outcome.train_examples,
            # who took part, by the label each site chose (site-labels=true) or node id
            "sites": [
                {
                    "node_id": node,
                    "name": outcome.name(node),
                    "train_examples": reply.train_examples,
                    "val_examples": reply.val_examples,
                    "device": reply.device,
                }
                for node, reply in sorted(outcome.ready.items())
            ],
        }
        emit(RunPrepared(self.sm.sha256, len(outcome.ready), self.sm.trainable.num_params))

    def round_done(self, rnd: int, seconds: float) -> None:
        st = self.strategy.stats(rnd)
        sent, received = self.grid.take()
        if rnd == 0:
            self.report.initial_eval = {
                "eval_loss": st.eval_loss,
                "eval_accuracy": st.eval_accuracy,
                "server_eval_loss": st.server_eval_loss,
                "server_eval_accuracy": st.server_eval_accuracy,
                "bytes_to_clients": sent,
                "bytes_from_clients": received,
                "seconds": seconds,
            }
            log.info("initial head: federated eval accuracy %.4f", st.eval_accuracy)
            log.info("%s", TABLE_HEADER)
            return
        rejected: dict[str, int] = {}
        for r in st.rejected:
            rejected[r.reason] = rejected.get(r.reason, 0) + 1
        rec = RoundRecord(
            round=rnd,
            train_loss=st.train_loss,
            eval_loss=st.eval_loss,
            eval_accuracy=st.eval_accuracy,
            server_eval_loss=st.server_eval_loss,
            server_eval_accuracy=st.server_eval_accuracy,
            bytes_to_clients=sent,
            bytes_from_clients=received,
            seconds=seconds,
            sites_selected=st.selected,
            sites_replied=st.replied,
            sites_failed=st.failed,
            sites_dropped=st.dropped,
            updates_rejected=rejected,
            aggregated=st.aggregated,
            secagg_seconds=dict(st.secagg_seconds),
        )
        if self.privacy is not None and st.aggregated:
            rec.dp_epsilon = self.privacy.release()
            log.info(
                "round %d: privacy spent epsilon %.4g at delta %g",
                rnd,
                rec.dp_epsilon,
                self.cfg.dp_delta,
            )
        self.report.rounds.append(rec)
        emit(
            RoundFinished(
                round=rnd,
                seconds=seconds,
                aggregated=st.aggregated,
                sites_selected=st.selected,
                sites_replied=st.replied,
                sites_failed=st.failed,
                sites_dropped=st.dropped,
                rejected=rejected,
                bytes_to_sites=sent,
                bytes_from_sites=received,
                eval_loss=_finite_or_none(st.eval_loss),
                eval_accuracy=_finite_or_none(st.eval_accuracy),
                server_eval_loss=_finite_or_none(st.server_eval_loss),
                server_eval_accuracy=_finite_or_none(st.server_eval_accuracy),
                secagg_seconds=dict(st.secagg_seconds),
                dp_epsilon=rec.dp_epsilon,
                dp_delta=self.cfg.dp_delta,
            )
        )
        log.info("%s", table_row(rec))
        if self.on_round:
            self.on_round(rec)
