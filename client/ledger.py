"""Which heads a site agrees to evaluate: the server must not probe its data.

Evaluating a head the server chose freely tells the server how that head does on the
site's validation images; a crafted head ("always class k") reveals how many images of
class k the site holds. A site therefore evaluates at most one head per round, only for
a round it has trained in (or round 0, before any training), and keeps the sha256 of the
head it evaluated: the next round's training must start from that very head, else the
site stops. It also keeps the head the site first trained from and in which round: after
the run, a local-only baseline (``query.outcome``) starts only from the run's initial
head, the one the site trained from in round 1, never from one the server picks then.
Heads are named by their sha256 (``common.heads.head_sha256``, the one head identity).
The ledger lives in the node's state, which outlives single messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedhead.common.errors import FederationError

RECORD_LEDGER = "fedhead.ledger"  # ConfigRecord in the node's state
NONE = -1


@dataclass
class HeadLedger:
    trained_round: int = NONE  # the last round this site trained in
    evaluated_round: int = NONE  # the last round whose head it evaluated
    evaluated_sha: str = ""  # ... and that head's digest
    first_round: int = NONE  # the first round this site trained in
    first_sha: str = ""  # ... and the digest of the head it trained from then

    @classmethod
    def from_record(cls, record: ConfigRecord | None) -> HeadLedger:
        if record is None:
            return cls()
        return cls(
            int(record["trained_round"]),  # type: ignore[arg-type]
            int(record["evaluated_round"]),  # type: ignore[arg-type]
            str(record["evaluated_sha"]),
            int(record.get("first_round", NONE)),  # type: ignore[arg-type]
            str(record.get("first_sha", "")),
        )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "trained_round": self.trained_round,
                "evaluated_round": self.evaluated_round,
                "evaluated_sha": self.evaluated_sha,
                "first_round": self.first_round,
                "first_sha": self.first_sha,
            }
        )

    def start_training(self, server_round: int, digest: str, evaluate: bool = False) -> bool:
        """Training in ``server_round`` from the head with ``digest``; with ``evaluate``,
        evaluating that head first, for round ``server_round - 1``, if the rules allow it
        (not for a round this site missed). Returns whether it may evaluate it."""
        if server_round <= self.trained_round:
            raise FederationError(
                f"the server asks for round {server_round} after round {self.trained_round}",
                "rounds only go forward; check the server",
            )
        evaluated = self.evaluated_sha.split(",")  # a closed-form round: its candidates
        if self.evaluated_round == server_round - 1 and digest not in evaluated:
            raise FederationError(
                f"the head sent for round {server_round} is not the one this site evaluated "
                f"for round {self.evaluated_round}; refusing to go on",
                "the server may be probing this site's data: tell its operator",
            )
        evaluates = evaluate and self._refusal(server_round - 1) is None
        if evaluates:
            self.evaluated_round, self.evaluated_sha = server_round - 1, digest
        self.trained_round = server_round
        if self.first_round == NONE:
            self.first_round, self.first_sha = server_round, digest
        return evaluates

    def start_statistics(self, server_round: int) -> None:
        """Sending the statistics of round ``server_round`` (a closed-form head's round:
        the site trains no head from one the server sent)."""
        if server_round <= self.trained_round:
            raise FederationError(
                f"the server asks for round {server_round} after round {self.trained_round}",
                "rounds only go forward; check the server",
            )
        self.trained_round = server_round

    def start_validation(self, server_round: int, digests: Sequence[str]) -> None:
        """Evaluating the candidate heads of a closed-form round: once, for the round whose
        statistics this site sent; the next round trains from one of them."""
        if (refusal := self._refusal(server_round)) is not None:
            raise refusal
        self.evaluated_round, self.evaluated_sha = server_round, ",".join(digests)

    def is_initial_head(self, digest: str) -> bool:
        """Whether ``digest`` is the head this site trained from in round 1."""
        return self.first_round == 1 and digest == self.first_sha

    def start_evaluation(self, server_round: int, digest: str) -> None:
        """Evaluating the head with ``digest`` for ``server_round``, if allowed."""
        if (refusal := self._refusal(server_round)) is not None:
            raise refusal
        self.evaluated_round, self.evaluated_sha = server_round, digest

    def _refusal(self, server_round: int) -> FederationError | None:
        """Why this site may not evaluate a head for ``server_round`` (None: it may)."""
        if server_round <= self.evaluated_round:
            return FederationError(
                f"round {server_round} was already evaluated on this site",
                "a site evaluates one head per round",
            )
        if server_round == 0 and self.trained_round != NONE:
            return FederationError(
                "an initial-head evaluation after training started",
                "a site evaluates only heads it trains from",
            )
        if server_round > 0 and not 0 < server_round <= self.trained_round:
            return FederationError(
                f"an evaluation for round {server_round}, a round this site did not train in",
                "a site evaluates only the heads of rounds it took part in",
            )
        return None
