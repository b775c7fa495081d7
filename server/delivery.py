"""Delivering the run's result to the sites that trained it.

After the last round the server writes the run's model package (``model.json``,
``head.safetensors``, ``MODEL_CARD.md``: never the trunk) and sends every site that took part a
``query.model`` message with the package's files and a ``ModelDescription`` (backbone
name and sha256, classes, input size, head, run id, rounds, the head's sha256). Each
site verifies the package against the model it trained and keeps it, ready for
``fedhead predict``; it answers with the sha256 it verified, which must equal the
server's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError, FedheadError, PackageError
from fedhead.common.heads import head_sha256
from fedhead.common.package import MODEL_CARD, MODEL_JSON, TENSORS_FILE, ModelPackage
from fedhead.common.protocol import (
    MODEL_ANSWERS,
    MODEL_HELD,
    MODEL_WANTED,
    MSG_MODEL,
    MSG_MODELS,
    RECORD_MODEL,
    RECORD_MODEL_ANSWER,
    RECORD_MODEL_FILES,
    RECORD_MODEL_OFFER,
    RECORD_MODEL_REPLY,
    ModelAnswer,
    ModelDescription,
    ModelOffer,
    ModelReceipt,
    ModelRequest,
    PrepareReply,
    RunSpec,
    parse_model_requests,
)
from fedhead.server.aggregation import Arrays
from fedhead.server.exchange import exchange, to_each, wait_for_sites
from fedhead.server.rundir import FINISHED, RunDir

log = logging.getLogger(__name__)


def describe_model(
    spec: RunSpec, run_id: int, rounds: int, names: list[str], arrays: Arrays
) -> ModelDescription:
    """The final head's description, from the run spec every site was prepared with."""
    return ModelDescription.drawing_on(
        spec,
        run_id=run_id,
        rounds=rounds,
        backbone_sha256=spec.weights_sha256,
        head_sha256=head_sha256(names, arrays),
    )


def model_message_content(description: ModelDescription, package_dir: Path) -> RecordDict:
    """The description and the package's files (model.json, head.safetensors), each as
    one uint8 array: the site keeps exactly the package the server wrote."""
    files = ArrayRecord(
        {
            name: Array(np.frombuffer((package_dir / name).read_bytes(), dtype=np.uint8))
            for name in (MODEL_JSON, TENSORS_FILE, MODEL_CARD)
        }
    )
    return RecordDict({RECORD_MODEL: description.to_record(), RECORD_MODEL_FILES: files})


@dataclass
class Delivery:
    """Which sites verified and kept a model, and why the others do not hold it."""

    head_sha256: str
    delivered_to: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    def report(self, name: Callable[[int], str] | None = None) -> dict[str, object]:
        """For report.json: sites by ``name`` (the labels the run's report uses) or by
        node id (a delivery outside a run, which knows no labels)."""
        label: Callable[[int], object] = name or (lambda node: node)
        return {
            "head_sha256": self.head_sha256,
            "delivered_to": sorted((label(n) for n in self.delivered_to), key=str),
            "failed": {str(label(k)): v for k, v in sorted(self.failed.items())},
        }


class ModelDelivery:
    """Sends the final model to the sites and checks each one's receipt."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def deliver(
        self,
        grid: Grid,
        nodes: list[int],
        description: ModelDescription,
        package_dir: Path,
    ) -> Delivery:
        delivery = Delivery(description.head_sha256)
        content = model_message_content(description, package_dir)
        replies = exchange(grid, to_each(nodes, content), MSG_MODEL, "model", self.timeout)
        for node, answer in replies.ok.items():
            try:
                receipt = ModelReceipt.from_mapping(answer.config_records[RECORD_MODEL_REPLY])
            except (KeyError, FedheadError):
                delivery.failed[node] = "its receipt is malformed"
                continue
            if receipt.head_sha256 != description.head_sha256:
                delivery.failed[node] = f"kept a model with sha256 {receipt.head_sha256[:12]}…"
                continue
            delivery.delivered_to.append(node)
        delivery.failed.update(replies.failed)
        delivery.failed.update(replies.dropped)
        for node, why in sorted(delivery.failed.items()):
            log.warning("site %d does not hold the final model: %s", node, why)
        log.info(
            "final model (sha256 %s) delivered to %d of %d site(s)",
            description.head_sha256,
            len(delivery.delivered_to),
            len(nodes),
        )
        return delivery


# --- earlier runs' models, for sites that missed them ------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    """A finished run's model as its out-dir holds it, checked against the run's record."""

    run_id: int
    run_dir: RunDir
    description: ModelDescription
    package_dir: Path
    # sha256 of the global heads its sites trained from (a closed-form run: its candidates)
    trained_heads: frozenset[str]


def finished_run(run_dir: RunDir) -> FinishedRun:
    """The model of the finished run in ``run_dir``, only if its package is the one the
    run recorded (its run state's sha256, the report's model description)."""
    state, report = run_dir.read_state(), run_dir.read_report()
    if state is None or state.state != FINISHED or not state.model_sha256:
        raise PackageError(
            f"{run_dir.path} holds no finished run with a model "
            f"(state: {state.state if state else 'none'})",
            "give the out-dir of a run that finished (see `fedhead status`)",
        )
    sha = state.model_sha256
    model = report.get("model")
    if not isinstance(model, dict):
        raise PackageError(f"{run_dir.report_path} describes no model", "the run did not finish")
    description = ModelDescription.from_mapping(model)
    pkg = ModelPackage.load(run_dir.model_dir)
    names = pkg.architecture.trainable().names
    held = head_sha256(names, [pkg.tensors[n] for n in names])
    if not description.head_sha256 == held == sha:
        raise PackageError(
            f"{run_dir.model_dir} holds a model with sha256 {held[:12]}…, the run recorded "
            f"{sha[:12]}…",
            "it was altered since the run; nothing is delivered from it",
        )
    rounds = {int(k): str(v) for k, v in state.round_heads.items()}
    trained = {v for r, v in rounds.items() if r < description.rounds}
    closed_form = report.get("closed_form")
    if isinstance(closed_form, dict):  # a closed-form head's sites validated its candidates
        grid = closed_form.get("grid")
        rows = grid if isinstance(grid, list) else []
        trained |= {
            str(r["head_sha256"]) for r in rows if isinstance(r, dict) and "head_sha256" in r
        }
    return FinishedRun(
        description.run_id, run_dir, description, run_dir.model_dir, frozenset(trained)
    )


def finished_runs(beside: RunDir) -> dict[int, RunDir]:
    """Run id -> run folder of the finished runs beside ``beside`` (their run state only)."""
    found: dict[int, RunDir] = {}
    for run_dir in beside.siblings():
        state = run_dir.read_state()
        if state is not None and state.state == FINISHED:
            found[state.run_id] = run_dir
    return found


def record_delivery(run: FinishedRun, entry: dict[str, object]) -> None:
    """Append one later delivery of ``run``'s model to its out-dir's deliveries.jsonl."""
    run.run_dir.record_delivery({"head_sha256": run.description.head_sha256, **entry})


class EarlierModels:
    """Delivers, before a run's rounds, the earlier runs' models its sites ask for.

    A site names the run and, as proof of having trained in it, the sha256 of a global
    head it trained from; the server looks the run up among the finished runs beside this
    run's out-dir (never a path a site names), checks the proof against the heads that
    run recorded and sends the package it wrote. Requests it cannot serve are logged.
    """

    def __init__(self, run_dir: RunDir, by_run: int, timeout: float) -> None:
        self.run_dir = run_dir
        self.by_run = by_run
        self.timeout = timeout

    def requests(self, replies: Mapping[int, PrepareReply]) -> dict[int, list[ModelRequest]]:
        """Each site's valid requests (a malformed list is ignored, with a warning)."""
        wanted: dict[int, list[ModelRequest]] = {}
        for node, reply in sorted(replies.items()):
            try:
                requests = parse_model_requests(reply.missing_models)
            except ValueError as err:
                log.warning("node %d: ignoring its list of missing models: %s", node, err)
                continue
            if requests:
                wanted[node] = requests
        return wanted

    def deliver(self, grid: Grid, wanted: dict[int, list[ModelRequest]]) -> dict[str, object]:
        """Send each asked-for model to the sites entitled to it; returns a summary by run."""
        by_run: dict[int, dict[int, str]] = {}
        for node, requests in wanted.items():
            for r in requests:
                by_run.setdefault(r.run_id, {})[node] = r.proof
        known = finished_runs(self.run_dir) if by_run else {}
        summary: dict[str, object] = {}
        for run_id, proofs in sorted(by_run.items()):
            if run_id not in known:
                log.info(
                    "%d site(s) ask for the model of run %d, which is not among the finished "
                    "runs in %s",
                    len(proofs),
                    run_id,
                    self.run_dir.path.parent,
                )
                continue
            try:
                run = finished_run(known[run_id])
            except FedheadError as err:
                log.warning("not delivering run %d's model: %s", run_id, err)
                continue
            summary[str(run_id)] = deliver_earlier(grid, run, proofs, self.timeout, self.by_run)
        return summary


def deliver_earlier(
    grid: Grid,
    run: FinishedRun,
    proofs: dict[int, str],
    timeout: float,
    by_run: int,
    answers: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, object]:
    """Send ``run``'s model to the sites whose proof is a head of that run; record it."""
    entitled = sorted(n for n, proof in proofs.items() if proof in run.trained_heads)
    refused = sorted(set(proofs) - set(entitled))
    for node in refused:
        log.warning(
            "node %d asks for run %d's model but names no head that run trained from: not sent",
            node,
            run.run_id,
        )
    delivery = Delivery(run.description.head_sha256)
    if entitled:
        log.info("sending run %d's model to %d site(s) that missed it", run.run_id, len(entitled))
        delivery = ModelDelivery(timeout).deliver(grid, entitled, run.description, run.package_dir)
    entry: dict[str, object] = {
        **delivery.report(),
        "by_run": by_run,
        "refused": refused,
        **{k: sorted(v) for k, v in (answers or {}).items()},
    }
    record_delivery(run, {k: v for k, v in entry.items() if k != "head_sha256"})
    return entry


def _answers(
    grid: Grid, run: FinishedRun, nodes: list[int], timeout: float
) -> tuple[dict[int, str], dict[int, str]]:
    """Offer ``run``'s model to ``nodes``: the answer of those that do not want it (or
    why they gave none), and the proof of each that wants it."""
    offer = RecordDict(
        {RECORD_MODEL_OFFER: ModelOffer(run.run_id, run.description.head_sha256).to_record()}
    )
    replies = exchange(grid, to_each(nodes, offer), MSG_MODELS, "models", timeout)
    states: dict[int, str] = dict.fromkeys(replies.dropped, "no-answer")
    proofs: dict[int, str] = {}
    for node, why in replies.failed.items():
        states[node] = "error"
        log.warning("node %d could not answer the offer: %s", node, why)
    for node, content in replies.ok.items():
        try:
            answer = ModelAnswer.from_mapping(content.config_records[RECORD_MODEL_ANSWER])
        except (KeyError, FedheadError):
            answer = ModelAnswer("malformed", "")
        if answer.state not in MODEL_ANSWERS:
            states[node] = "malformed"
        elif answer.state == MODEL_WANTED:
            proofs[node] = answer.proof
        else:
            states[node] = answer.state
    return states, proofs


def offer_and_deliver(
    grid: Grid, run: FinishedRun, nodes: list[int], timeout: float, by_run: int
) -> dict[str, object]:
    """Offer ``run``'s model to ``nodes`` and send it to those that trained in that run
    and lack it (never to a site that holds it already)."""
    states, proofs = _answers(grid, run, nodes, timeout)
    groups: dict[str, list[int]] = {"already_held": []}  # the sites that did not ask, by answer
    for node, state in states.items():
        key = "already_held" if state == MODEL_HELD else state.replace("-", "_")
        groups.setdefault(key, []).append(node)
    entry = deliver_earlier(grid, run, proofs, timeout, by_run, groups)
    log.info(
        "run %d's model: sent to %d site(s) %s, already held by %d %s; other nodes: %s",
        run.run_id,
        len(entry["delivered_to"]),  # type: ignore[arg-type]
        entry["delivered_to"],
        len(groups["already_held"]),
        groups["already_held"],
        {k: v for k, v in groups.items() if k != "already_held" and v} or "none",
    )
    return entry


def connected_sites(grid: Grid, cfg: RunConfig) -> list[int]:
    """The connected nodes, once min-sites are there or join-timeout is up (at least one)."""
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.join_timeout)
    if not nodes:
        raise FederationError(
            f"no site connected within {cfg.join_timeout:.0f}s",
            "start the sites' nodes, then retry",
        )
    return nodes


def deliver_only(grid: Grid, context: Context, cfg: RunConfig) -> dict[str, object]:
    """A delivery-only run (``deliver-from``): offer one finished run's model to the
    connected sites and send it to those that trained in that run and lack it."""
    run = finished_run(RunDir(Path(cfg.deliver_from).expanduser()))
    log.info(
        "delivery only: run %d's model (sha256 %s) from %s",
        run.run_id,
        run.description.head_sha256,
        run.run_dir.path,
    )
    nodes = connected_sites(grid, cfg)
    entry = offer_and_deliver(grid, run, nodes, cfg.round_timeout, context.run_id)
    if failed := entry["failed"]:
        raise FederationError(
            f"run {run.run_id}'s model did not reach every site that asked for it: {failed}",
            "see those sites' logs; run the delivery again once fixed",
        )
    return entry
