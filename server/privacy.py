"""Differential privacy for fedhead's rounds: Flower's central DP wrapper around the
strategy (sites clip their update to a fixed norm, the server adds Gaussian noise to
the mean), the privacy ledger that accounts the released rounds, and what the report
and the checkpoints keep of it.

Sites weigh the same under DP (the noise is calibrated to a fixed number of sites), and
a round in which any site failed is skipped: its aggregate is not released.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.common import Parameters, Scalar
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fedhead.common.config import RunConfig
from fedhead.server.checkpoints import Checkpoint, CheckpointError
from fedhead.server.rounds import Failure, FitResults

log = logging.getLogger(__name__)


class DPFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping, saying why a round is skipped.

    Flower's wrapper skips a round in which any site failed (the noise is calibrated to
    a fixed number of sites); the round's result shows it as not aggregated.
    """

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures:
            log.error(
                "round %d: %d site(s) failed; with differential privacy the round is skipped "
                "(noise is calibrated to %d sites)",
                server_round,
                len(failures),
                self.num_sampled_clients,
            )
        return super().aggregate_fit(server_round, results, failures)


PrivacyEvent = tuple[float, int, int]  # (noise multiplier, sampled sites, population)


@dataclass
class PrivacyLedger:
    """Cumulative (epsilon, delta) of the rounds whose noisy aggregate was released.

    ``released`` lists every accounted round's event, so a resumed run can replay
    them and go on from the same privacy spent.
    """

    noise_multiplier: float
    clipping_norm: float
    delta: float
    sites: int  # population: the sites that joined the run
    sampled: int  # sites per round
    released: list[PrivacyEvent] = field(default_factory=list)
    _accountant: Any = None

    def __post_init__(self) -> None:
        from flwr.serverapp import RdpAccountant
        from flwr.supercore.privacy_accounting import (
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )

        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=self.delta,
                population_size=self.sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    @classmethod
    def of_run(cls, cfg: RunConfig, sites: int, sampled: int) -> PrivacyLedger | None:
        """The run's ledger; None when it runs without differential privacy."""
        if cfg.dp_noise_multiplier <= 0:
            return None
        return cls(cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta, sites, sampled)

    def wrap(self, strategy: Strategy) -> DPFixedClipping:
        """``strategy`` with the noise of this ledger's rounds added to its aggregate."""
        return DPFixedClipping(strategy, self.noise_multiplier, self.clipping_norm, self.sampled)

    def release(self) -> float:
        """Account one released round; returns the cumulative epsilon at ``delta``."""
        self._compose((self.noise_multiplier, min(self.sampled, self.sites), self.sites))
        return self.epsilon()

    def resume(self, ckpt: Checkpoint) -> None:
        """Account the rounds the checkpoint's (cut-off) part of this run released."""
        for event in released_events(ckpt):
            self._compose(event)

    def epsilon(self) -> float:
        if not self.released:
            return 0.0
        epsilon = float(self._accountant.get_epsilon(self.delta))
        return epsilon if math.isfinite(epsilon) else math.inf

    def _compose(self, event: PrivacyEvent) -> None:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        noise, sampled, sites = float(event[0]), int(event[1]), int(event[2])
        self._accountant.compose(GaussianPrivacyEvent(noise, sampled, sites))
        self.released.append((noise, sampled, sites))

    def report(self) -> dict[str, Any]:
        """report.json's ``differential_privacy``."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "delta": self.delta,
            "sites": self.sites,
            "sampled_per_round": self.sampled,
            "accounting": "RDP, no sampling amplification, add-or-remove-one site",
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the rounds released so far."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "released": [list(e) for e in self.released],
        }


def released_events(ckpt: Checkpoint) -> list[PrivacyEvent]:
    """The privacy events of the rounds a checkpoint's run released."""
    privacy = ckpt.meta.get("privacy") or {}
    return [(float(e[0]), int(e[1]), int(e[2])) for e in privacy.get("released", [])]


def check_resumable(cfg: RunConfig, ckpt: Checkpoint | None) -> None:
    """A checkpoint whose rounds used DP only resumes a run with DP."""
    if cfg.dp_noise_multiplier <= 0 and ckpt is not None and released_events(ckpt):
        raise CheckpointError(
            "resume-from: the checkpoint's rounds used differential privacy but this run "
            "has dp-noise-multiplier=0; resume with the run's original settings"
        )
