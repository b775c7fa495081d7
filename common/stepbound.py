"""How far one round can move the global head: a bound derived from the run's settings.

A site checks every head it is sent against the last head it trained from (or the
run's initial head, which it recomputes): a server that follows the protocol moves the
head by at most ``round_bound`` per round, so a head further away than the sum of the
rounds' bounds is one no honest round produced (a crafted probe), and is refused.

The round's aggregate ``Δ`` (the mean of the sites' changes, plus DP noise) is
bounded first. A server following the protocol refuses a mean whose L2 norm exceeds
``max-update-norm`` ``M`` (under SecAgg+ it checks the aggregate; without, every
update), and under SecAgg+ a mean with a value outside the clipping range ``c``:

    ‖Δ‖ ≤ min(M, c √d)      (M = 0: no norm bound; c = 0: no SecAgg+; d: tensor values)

With DP every site clips its change to ``C`` (``dp-clipping-norm``), so the mean is
within ``C`` too, and the server adds Gaussian noise of standard deviation
``σ = z C / n`` per value (Flower's ``compute_stdv``; ``z`` the noise multiplier, ``n``
the sampled sites, at least ``min-sites``). Its norm exceeds ``σ (√d + 6.5)`` with
probability below 1e-9 (Gaussian concentration: P(‖N‖ > σ(√d + t)) ≤ exp(-t²/2)).

The server optimizer (``server/optimizers.py``, Reddi et al. 2021 without bias
correction; m₀ = 0, v₀ = τ²) turns ``Δ`` into the step, round ``t`` (1 = the first
step of the run):

- fedavg: the step is ``Δ``.
- fedavgm: ``η m_t`` with ``m_t = μ m_{t-1} + Δ_t``, so ‖step‖ ≤ η ‖Δ‖ (1 − μᵗ)/(1 − μ).
- fedadam: per value, |m_t| ≤ (1−β1) Σ_k β1ᵏ |g_{t−k}| and v_t ≥ (1−β2) Σ_k β2ᵏ g²_{t−k};
  Cauchy-Schwarz gives |m_t|/√v_t ≤ (1−β1)/√(1−β2) · √(Σ_{k<t} (β1²/β2)ᵏ), a bound on
  every value's step whatever ``Δ`` was: ‖step‖ ≤ η √d times that.
- fedyogi: v_t ≥ β2 v_{t−1} always and v_t ≥ min(β2, 1−β2) g_t², so
  v_t ≥ min(β2, 1−β2) β2ᵏ g²_{t−k} for every k, and
  |m_t|/√v_t ≤ (1−β1)/√min(β2, 1−β2) · Σ_{k<t} (β1/√β2)ᵏ.
- fedadagrad: v_t ≥ Σ_k g²_{t−k}, so |m_t|/√v_t ≤ (1−β1) √(Σ_{k<t} β1²ᵏ).

The adaptive three thus bound the step even where ``Δ`` has no bound (and take the
smaller of that and η ‖m‖/τ). FedAvg and FedAvgM without ``max-update-norm``, SecAgg+
or DP admit none: ``round_bound`` is then infinite, and the site refuses to take part
(``client.guard``): the strictest rule an honest run still passes is one no run
without a bound can meet.

The bound is loose where the settings are: with the default ``max-update-norm`` 30 a
round may move a linear head of norm ~1 far enough to replace it. It rules out heads
beyond any honest round's reach (arbitrary probes), not probes within it; the count
tables' coarsening (``common.pooled``) is the defence there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# fedhead.server.optimizers.DEFAULT_LEARNING_RATES is this table: the server
# learning rate a strategy uses when the run config leaves it at 0.
DEFAULT_SERVER_LEARNING_RATES = {"fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1}
# P(‖N(0, σ² I_d)‖ > σ (√d + t)) ≤ exp(-t²/2): t = 6.5 puts it below 1e-9 a round.
NOISE_TAIL = 6.5
# Relative and per-value slack: float32 rounding of the head and SecAgg+ quantization
# (about 4e-6 a value at the default ranges) must not turn an honest head away.
RELATIVE_SLACK = 1e-3
VALUE_SLACK = 1e-4


@dataclass(frozen=True)
class StepSettings:
    """The run settings a round's step depends on (the run config's keys, as the site
    receives them in every round's settings)."""

    max_update_norm: float  # 0: no norm bound
    clipping_range: float  # 0: no SecAgg+
    strategy: str  # fedavg, fedavgm, fedadam, fedyogi, fedadagrad
    server_learning_rate: float  # 0: the strategy's default
    server_momentum: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    dp_noise_multiplier: float  # 0: no DP
    dp_clipping_norm: float
    min_sites: int

    def problems(self) -> list[str]:
        """Why these settings describe no run this site can bound (empty: they do)."""
        out = []
        if self.strategy not in ("fedavg", *DEFAULT_SERVER_LEARNING_RATES):
            out.append(f"unknown strategy {self.strategy[:32]!r}")
        for name in ("max_update_norm", "clipping_range", "server_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                out.append(f"{name} {value!r} is not a number >= 0")
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"{name} {getattr(self, name)!r} is not in [0, 1)")
        if not (math.isfinite(self.server_tau) and self.server_tau > 0):
            out.append(f"server_tau {self.server_tau!r} is not a number > 0")
        if not (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0):
            out.append(f"dp_noise_multiplier {self.dp_noise_multiplier!r} is not >= 0")
        if self.dp_noise_multiplier and not (
            math.isfinite(self.dp_clipping_norm) and self.dp_clipping_norm > 0
        ):
            out.append(f"dp_clipping_norm {self.dp_clipping_norm!r} is not a number > 0")
        if self.min_sites < 1:
            out.append(f"min_sites {self.min_sites} is below 1")
        return out

    def within(self, pinned: StepSettings) -> bool:
        """Whether a round under these settings moves the head no further than one under
        ``pinned`` can: the same optimizer, and no bound looser (a run may tighten its
        bounds from round to round, never loosen them)."""

        def cap(v: float) -> float:
            return math.inf if v == 0 else v

        def noise(s: StepSettings) -> float:
            return s.dp_noise_multiplier * s.dp_clipping_norm / s.min_sites

        same = ("strategy", "server_momentum", "server_beta1", "server_beta2", "server_tau")
        return (
            all(getattr(self, k) == getattr(pinned, k) for k in same)
            and cap(self.max_update_norm) <= cap(pinned.max_update_norm)
            and cap(self.clipping_range) <= cap(pinned.clipping_range)
            and self.learning_rate <= pinned.learning_rate
            and noise(self) <= noise(pinned)
            and (not self.dp_noise_multiplier or self.dp_clipping_norm <= pinned.dp_clipping_norm)
        )

    @property
    def learning_rate(self) -> float:
        return self.server_learning_rate or DEFAULT_SERVER_LEARNING_RATES.get(self.strategy, 1.0)


def mean_bound(s: StepSettings, values: int) -> float:
    """The largest L2 norm of a round's aggregate change ``Δ`` (noise included)."""
    bound = math.inf
    if s.max_update_norm:
        bound = s.max_update_norm
    if s.clipping_range:
        bound = min(bound, s.clipping_range * math.sqrt(values))
    if s.dp_noise_multiplier:
        sigma = s.dp_noise_multiplier * s.dp_clipping_norm / s.min_sites
        bound = min(bound, s.dp_clipping_norm) + sigma * (math.sqrt(values) + NOISE_TAIL)
    return bound


def _geometric(ratio: float, terms: int) -> float:
    """1 + ratio + ... + ratio^(terms-1)."""
    if ratio == 1:
        return float(terms)
    return (1 - ratio**terms) / (1 - ratio)


def round_bound(s: StepSettings, values: int, step: int) -> float:
    """The largest L2 norm of the global head's step in the run's ``step``-th
    aggregation (1 = the first), for a head of ``values`` values."""
    t = max(step, 1)
    delta = mean_bound(s, values)
    eta = s.learning_rate
    if s.strategy == "fedavg":
        return delta
    if s.strategy == "fedavgm":
        return eta * delta * _geometric(s.server_momentum, t)
    b1, b2 = s.server_beta1, s.server_beta2
    if s.strategy == "fedadam":
        ratio = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(_geometric(b1 * b1 / b2, t))
    elif s.strategy == "fedyogi":
        ratio = (1 - b1) / math.sqrt(min(b2, 1 - b2)) * _geometric(b1 / math.sqrt(b2), t)
    else:  # fedadagrad
        ratio = (1 - b1) * math.sqrt(_geometric(b1 * b1, t))
    # |m_t| is also at most max ‖Δ‖ per value and √v_t + τ > τ
    return eta * min(ratio * math.sqrt(values), delta / s.server_tau)


def distance_bound(s: StepSettings, values: int, start: int, end: int) -> float:
    """How far the head after ``end`` aggregations may lie from the head after
    ``start`` (``start`` <= ``end``), with the slack rounding needs."""
    total = sum(round_bound(s, values, t) for t in range(start + 1, end + 1))
    return total * (1 + RELATIVE_SLACK) + VALUE_SLACK * math.sqrt(values) * (end - start)
