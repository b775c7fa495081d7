"""Names for the reply lists and results of Flower's legacy ``Strategy`` methods, which
FedHeadStrategy and the wrappers around it (DP, server optimizer) all spell out."""

from __future__ import annotations

from typing import TypeAlias

from flwr.common import EvaluateRes, FitRes, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy

FitResults: TypeAlias = list[tuple[ClientProxy, FitRes]]
FitFailures: TypeAlias = list[tuple[ClientProxy, FitRes] | BaseException]
# aggregate_fit: the new global parameters (None: keep the old ones) and the metrics
FitAggregate: TypeAlias = tuple[Parameters | None, dict[str, Scalar]]
EvaluateResults: TypeAlias = list[tuple[ClientProxy, EvaluateRes]]
EvaluateFailures: TypeAlias = list[tuple[ClientProxy, EvaluateRes] | BaseException]
# aggregate_evaluate: the weighted loss (None: nobody answered) and the metrics
EvaluateAggregate: TypeAlias = tuple[float | None, dict[str, Scalar]]
