"""A run's round plan, sized to the sites that joined: the fit step (plain or SecAgg+),
the strategy it drives (wrapped for differential privacy when the run uses DP) and
the privacy ledger. The report notes the secure aggregation and DP settings."""

from __future__ import annotations

import logging
import math

from flwr.server.strategy import Strategy

from fedhead.common.config import RunConfig
from fedhead.server.distribution import PrepareOutcome
from fedhead.server.report import RunReport
from fedhead.server.secure import DPFixedClipping, PrivacyLedger, TimedSecAggPlus, secagg_params
from fedhead.server.strategy import FedHeadStrategy
from fedhead.server.workflow import PlainStep, RoundPlan

log = logging.getLogger(__name__)


def plan_rounds(
    cfg: RunConfig, strategy: FedHeadStrategy, outcome: PrepareOutcome, report: RunReport
) -> RoundPlan:
    """Once sites joined: the fit step, the strategy it drives and the privacy ledger,
    sized to them; the report notes the secure aggregation and DP settings."""
    ready = len(outcome.ready)
    sampled = min(ready, max(cfg.min_sites, math.ceil(cfg.fraction_train * ready)))
    uniform = cfg.dp_noise_multiplier > 0
    for node, reply in sorted(outcome.ready.items()):
        if max(reply.train_examples, reply.val_examples) > cfg.max_site_examples:
            log.warning(
                "site %d declares %d training / %d validation examples; it counts as %d "
                "(max-site-examples)",
                node,
                reply.train_examples,
                reply.val_examples,
                cfg.max_site_examples,
            )
    strategy.set_caps(
        train={
            n: 1 if uniform else min(r.train_examples, cfg.max_site_examples)
            for n, r in outcome.ready.items()
        },
        val={n: min(r.val_examples, cfg.max_site_examples) for n, r in outcome.ready.items()},
    )
    legacy: Strategy = strategy
    privacy: PrivacyLedger | None = None
    if cfg.dp_noise_multiplier > 0:
        legacy = DPFixedClipping(strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled)
        privacy = PrivacyLedger(cfg.dp_noise_multiplier, cfg.dp_delta, ready, sampled)
        report.differential_privacy = {
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
        return RoundPlan(PlainStep(cfg.round_timeout, strategy, train=True), legacy, privacy)
    max_examples = max(strategy.train_caps.values())
    params = secagg_params(cfg, sampled, max_examples)
    report.secure_aggregation = "secagg+"
    report.secure_aggregation_params = params.report()
    log.info(
        "secure aggregation: SecAgg+ over %d sites (shares %s, threshold %s, clipping +-%g)",
        sampled,
        params.num_shares,
        params.reconstruction_threshold,
        params.clipping_range,
    )

    def stage_done(rnd: int, stage: str, seconds: float) -> None:
        strategy.stats(rnd).secagg_seconds[stage] = seconds

    return RoundPlan(TimedSecAggPlus(params, strategy, stage_done), legacy, privacy)
