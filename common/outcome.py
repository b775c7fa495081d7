"""Per-site outcome of a run: what the federation did for each site.

After the final model is delivered, the server asks each site that keeps it for its
*outcome* (``query.outcome``, one message per run): the site evaluates on its own
validation split the delivered federated head, optionally a local-only head trained
from the same initial head with the federation's budget (local epochs x rounds, the
same optimizer, learning rate and schedule), and optionally a personalized head (the
federated head fine-tuned on the site's training split at a lower learning rate).
It answers with scalar metrics only, each with a percentile bootstrap interval, and
the paired-bootstrap interval of the accuracy difference federated - local-only on
the same validation examples. A site whose interval lies wholly below zero is
flagged ``negative_transfer``: the federation made its model worse than it would
have trained alone.

Everything a site sends is untrusted: ``SiteOutcome.from_mapping`` refuses values
that are missing, mistyped, not finite where they must be, or out of range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from fedhead.common.errors import FederationError
from fedhead.common.records import coerce

# Metrics of one head, each "<metric>", "<metric>_lo", "<metric>_hi" except the loss.
PROBABILITIES = ("accuracy", "balanced_accuracy", "auroc")
HEADS = ("local", "federated", "personalized")
MAX_LOSS = 1e6  # cross-entropy beyond this is no result a site can honestly report


def _bad(what: str) -> FederationError:
    return FederationError(
        f"site outcome: {what}", "the site's outcome is left out; check its fedhead version"
    )


@dataclass(frozen=True)
class HeadMetrics:
    """One head on one site's validation split (NaN: undefined, e.g. AUROC of a split
    holding a single class)."""

    accuracy: float
    accuracy_lo: float
    accuracy_hi: float
    balanced_accuracy: float
    balanced_accuracy_lo: float
    balanced_accuracy_hi: float
    auroc: float
    auroc_lo: float
    auroc_hi: float
    loss: float

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_values(cls, values: Mapping[str, float]) -> Self:
        return cls(**{k: float(values[k]) for k in cls.__dataclass_fields__})

    @classmethod
    def check(cls, values: Mapping[str, float], head: str) -> Self:
        """Values from a site: accuracy in [0, 1] and finite; balanced accuracy and AUROC
        in [0, 1] or NaN; every interval ordered around its value; loss finite, >= 0."""
        for name in PROBABILITIES:
            v, lo, hi = (values[name], values[f"{name}_lo"], values[f"{name}_hi"])
            trio = (v, lo, hi)
            if name == "accuracy" and not all(math.isfinite(x) for x in trio):
                raise _bad(f"{head} accuracy or its interval is not a finite number")
            if any(math.isinf(x) for x in trio) or not all(
                math.isnan(x) or 0.0 <= x <= 1.0 for x in trio
            ):
                raise _bad(f"{head} {name} or its interval lies outside [0, 1]")
            if all(math.isfinite(x) for x in trio) and not lo <= v <= hi:
                raise _bad(f"{head} {name} {v:.4g} lies outside its interval")
        loss = values["loss"]
        if not (math.isfinite(loss) and 0.0 <= loss <= MAX_LOSS):
            raise _bad(f"{head} loss is not a finite number in [0, {MAX_LOSS:g}]")
        return cls.from_values(values)


@dataclass(frozen=True)
class SiteOutcome:
    """What one site reports about the run: validation examples, the federated head's
    metrics, the local-only and personalized heads' where computed, and the gain."""

    examples: int
    federated: HeadMetrics
    local: HeadMetrics | None = None
    personalized: HeadMetrics | None = None
    personalized_kept: bool = False  # it beat the federated head and is stored at the site
    gain: float = math.nan  # accuracy, federated - local-only
    gain_lo: float = math.nan  # paired bootstrap interval of the gain
    gain_hi: float = math.nan
    # balanced accuracy, federated - local-only: on a skewed site a local-only head that
    # predicts the site's majority class has a high accuracy and a balanced accuracy of
    # 1 / classes; this gain shows it
    balanced_gain: float = math.nan
    balanced_gain_lo: float = math.nan
    balanced_gain_hi: float = math.nan

    @property
    def negative_transfer(self) -> bool:
        """Federated below local-only beyond the gain's interval (it lies below zero)."""
        return self.local is not None and self.gain_hi < 0

    def to_record(self) -> dict[str, Any]:
        """A flat mapping for the wire: ``<head>.<metric>`` keys, absent heads left out."""
        out: dict[str, Any] = {
            "examples": self.examples,
            "personalized_kept": self.personalized_kept,
            "gain": self.gain,
            "gain_lo": self.gain_lo,
            "gain_hi": self.gain_hi,
            "balanced_gain": self.balanced_gain,
            "balanced_gain_lo": self.balanced_gain_lo,
            "balanced_gain_hi": self.balanced_gain_hi,
        }
        for head in HEADS:
            metrics: HeadMetrics | None = getattr(self, head)
            if metrics is not None:
                out |= {f"{head}.{k}": v for k, v in metrics.to_dict().items()}
        return out

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any], max_examples: int) -> Self:
        """A site's reply, checked: every value typed, finite and in range."""

        def get(key: str, typ: type) -> Any:
            if key not in record:
                raise _bad(f"missing key {key!r}")
            try:
                return coerce(record[key], typ)
            except TypeError as err:
                raise _bad(f"key {key!r}: {err}") from err

        examples = get("examples", int)
        if not 1 <= examples <= max_examples:
            raise _bad(f"{examples} validation examples is not in 1..{max_examples}")
        heads: dict[str, HeadMetrics | None] = {}
        for head in HEADS:
            keys = [f"{head}.{k}" for k in HeadMetrics.__dataclass_fields__]
            present = [k in record for k in keys]
            if not any(present) and head != "federated":
                heads[head] = None
                continue
            values = {k.split(".", 1)[1]: get(k, float) for k in keys}
            heads[head] = HeadMetrics.check(values, head)
        kept = get("personalized_kept", bool)
        if kept and heads["personalized"] is None:
            raise _bad("a personalized head kept without its metrics")
        gains = []
        for name in ("gain", "balanced_gain"):
            gain, lo, hi = get(name, float), get(f"{name}_lo", float), get(f"{name}_hi", float)
            what = name.replace("_", " ")
            if heads["local"] is None:
                if not all(math.isnan(x) for x in (gain, lo, hi)):
                    raise _bad(f"a {what} without a local-only head")
            else:
                if not all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in (gain, lo, hi)):
                    raise _bad(f"the {what} or its interval is not a finite number in [-1, 1]")
                if not lo <= gain <= hi:
                    raise _bad(f"the {what} {gain:.4g} lies outside its interval")
            gains += [gain, lo, hi]
        federated = heads["federated"]
        assert federated is not None
        return cls(examples, federated, heads["local"], heads["personalized"], kept, *gains)

    def to_report(self, site: str) -> dict[str, Any]:
        """The site's entry in report.json's ``sites`` list."""
        return {
            "site": site,
            "val_examples": self.examples,
            "local_only": None if self.local is None else self.local.to_dict(),
            "federated": self.federated.to_dict(),
            "personalized": None if self.personalized is None else self.personalized.to_dict(),
            "personalized_kept": self.personalized_kept,
            "gain": None
            if self.local is None
            else {
                "accuracy": self.gain,
                "ci95": [self.gain_lo, self.gain_hi],
                "balanced_accuracy": self.balanced_gain,
                "balanced_ci95": [self.balanced_gain_lo, self.balanced_gain_hi],
            },
            "negative_transfer": self.negative_transfer,
        }


def head_metrics(
    y_true: Any, proba: Any, loss: float, classes: list[str], resamples: int, seed: int
) -> HeadMetrics:
    """A head's metrics with bootstrap intervals, from ``fedhead evaluate``'s code."""
    from fedhead.common.evaluation import evaluate_predictions

    ev = evaluate_predictions(y_true, proba, classes, resamples=resamples, seed=seed)
    values: dict[str, float] = {"loss": loss}
    for name in PROBABILITIES:
        v = ev.values[name]
        lo, hi = ev.intervals[name]
        if math.isfinite(v) and math.isfinite(lo):
            lo, hi = min(lo, v), max(hi, v)  # a percentile interval may miss a skewed point
        values |= {name: v, f"{name}_lo": lo, f"{name}_hi": hi}
    return HeadMetrics.from_values(values)
