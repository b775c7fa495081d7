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

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError, FedheadError, PackageError
from fedhead.common.files import append_line, read_json_object
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
from fedhead.server.persistence import ROUND_HEADS, STATUS_FILE

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
class DeliveryOutcome:
    head_sha256: str
    delivered_to: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    def report(self) -> dict[str, object]:
        return {
            "head_sha256": self.head_sha256,
            "delivered_to": sorted(self.delivered_to),
            "failed": {str(k): v for k, v in sorted(self.failed.items())},
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
    ) -> DeliveryOutcome:
        outcome = DeliveryOutcome(description.head_sha256)
        content = model_message_content(description, package_dir)
        out = [
            Message(content=content, dst_node_id=n, message_type=MSG_MODEL, group_id="model")
            for n in nodes
        ]
        replies = list(grid.send_and_receive(out, timeout=self.timeout))
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcome.failed[node] = msg.error.reason or f"error code {msg.error.code}"
                continue
            receipt = ModelReceipt.from_mapping(msg.content.config_records[RECORD_MODEL_REPLY])
            if receipt.head_sha256 != description.head_sha256:
                outcome.failed[node] = f"kept a model with sha256 {receipt.head_sha256[:12]}…"
                continue
            outcome.delivered_to.append(node)
        for node in set(nodes) - {m.metadata.src_node_id for m in replies}:
            outcome.failed[node] = f"no reply within {self.timeout:.0f}s"
        for node, why in sorted(outcome.failed.items()):
            log.warning("site %d does not hold the final model: %s", node, why)
        log.info(
            "final model (sha256 %s) delivered to %d of %d site(s)",
            description.head_sha256,
            len(outcome.delivered_to),
            len(nodes),
        )
        return outcome


# --- earlier runs' models, for sites that missed them ------------------------------------

DELIVERIES_FILE = "deliveries.jsonl"  # in a run's out-dir: every later delivery of its model


@dataclass(frozen=True)
class FinishedRun:
    """A finished run's model as its out-dir holds it, checked against the run's record."""

    run_id: int
    out_dir: Path
    description: ModelDescription
    package_dir: Path
    trained_heads: frozenset[str]  # sha256 of the global heads its sites trained from


def finished_run(out_dir: Path) -> FinishedRun:
    """The model of the finished run in ``out_dir``, only if its package is the one the
    run recorded (``status.json``'s sha256, the report's model description)."""
    status, report = (
        read_json_object(out_dir / STATUS_FILE),
        read_json_object(out_dir / "report.json"),
    )
    if status.get("state") != "finished" or not status.get("model_sha256"):
        raise PackageError(
            f"{out_dir} holds no finished run with a model (state: {status.get('state', 'none')})",
            "give the out-dir of a run that finished (see `fedhead status`)",
        )
    sha = str(status["model_sha256"])
    model = report.get("model")
    if not isinstance(model, dict):
        raise PackageError(f"{out_dir}/report.json describes no model", "the run did not finish")
    description = ModelDescription.from_mapping(model)
    package_dir = out_dir / "model"
    pkg = ModelPackage.load(package_dir)
    names = pkg.architecture.trainable().names
    held = head_sha256(names, [pkg.tensors[n] for n in names])
    if not description.head_sha256 == held == sha:
        raise PackageError(
            f"{package_dir} holds a model with sha256 {held[:12]}…, the run recorded {sha[:12]}…",
            "it was altered since the run; nothing is delivered from it",
        )
    heads = status.get(ROUND_HEADS)
    rounds = {int(k): str(v) for k, v in heads.items()} if isinstance(heads, dict) else {}
    trained = frozenset(v for r, v in rounds.items() if r < description.rounds)
    return FinishedRun(description.run_id, out_dir, description, package_dir, trained)


def finished_runs(runs_dir: Path) -> dict[int, Path]:
    """Run id -> out-dir of the finished runs under ``runs_dir`` (status.json only: cheap)."""
    found: dict[int, Path] = {}
    if not runs_dir.is_dir():
        return found
    for out in sorted(runs_dir.iterdir()):
        status = read_json_object(out / STATUS_FILE) if out.is_dir() else {}
        run_id = status.get("run_id")
        if status.get("state") == "finished" and isinstance(run_id, int):
            found[run_id] = out
    return found


def record_delivery(run: FinishedRun, entry: dict[str, object]) -> None:
    """Append one later delivery of ``run``'s model to its out-dir's deliveries.jsonl."""
    line = {"time": round(time.time(), 3), "head_sha256": run.description.head_sha256, **entry}
    append_line(run.out_dir / DELIVERIES_FILE, json.dumps(line, sort_keys=True), mode=0o644)


class EarlierModels:
    """Delivers, before a run's rounds, the earlier runs' models its sites ask for.

    A site names the run and, as proof of having trained in it, the sha256 of a global
    head it trained from; the server looks the run up among the finished runs beside this
    run's out-dir (never a path a site names), checks the proof against the heads that
    run recorded and sends the package it wrote. Requests it cannot serve are logged.
    """

    def __init__(self, runs_dir: Path, by_run: int, timeout: float) -> None:
        self.runs_dir = runs_dir
        self.by_run = by_run
        self.timeout = timeout

    def requests(self, replies: dict[int, PrepareReply]) -> dict[int, list[ModelRequest]]:
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
        known = finished_runs(self.runs_dir) if by_run else {}
        summary: dict[str, object] = {}
        for run_id, proofs in sorted(by_run.items()):
            if run_id not in known:
                log.info(
                    "%d site(s) ask for the model of run %d, which is not among the finished "
                    "runs in %s",
                    len(proofs),
                    run_id,
                    self.runs_dir,
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
    outcome = DeliveryOutcome(run.description.head_sha256)
    if entitled:
        log.info("sending run %d's model to %d site(s) that missed it", run.run_id, len(entitled))
        outcome = ModelDelivery(timeout).deliver(grid, entitled, run.description, run.package_dir)
    entry: dict[str, object] = {
        **outcome.report(),
        "by_run": by_run,
        "refused": refused,
        **{k: sorted(v) for k, v in (answers or {}).items()},
    }
    record_delivery(run, {k: v for k, v in entry.items() if k != "head_sha256"})
    return entry


def _connected(grid: Grid, min_sites: int, join_timeout: float) -> list[int]:
    """The connected nodes, once ``min_sites`` are there or ``join_timeout`` is up."""
    deadline = time.monotonic() + join_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not nodes:
        raise FederationError(
            f"no site connected within {join_timeout:.0f}s", "start the sites' nodes, then retry"
        )
    return nodes


def _answers(
    grid: Grid, run: FinishedRun, nodes: list[int], timeout: float
) -> tuple[dict[int, str], dict[int, str]]:
    """Offer ``run``'s model to ``nodes``: the answer of those that do not want it (or
    why they gave none), and the proof of each that wants it."""
    offer = ModelOffer(run.run_id, run.description.head_sha256).to_record()
    out = [
        Message(
            RecordDict({RECORD_MODEL_OFFER: offer}),
            dst_node_id=n,
            message_type=MSG_MODELS,
            group_id="models",
        )
        for n in nodes
    ]
    states: dict[int, str] = dict.fromkeys(nodes, "no-answer")
    proofs: dict[int, str] = {}
    for msg in grid.send_and_receive(out, timeout=timeout):
        node = msg.metadata.src_node_id
        if node not in states:
            continue
        if msg.has_error():
            states[node] = "error"
            log.warning("node %d could not answer the offer: %s", node, msg.error.reason)
            continue
        try:
            answer = ModelAnswer.from_mapping(msg.content.config_records[RECORD_MODEL_ANSWER])
        except (KeyError, FedheadError):
            answer = ModelAnswer("malformed", "")
        if answer.state not in MODEL_ANSWERS:
            states[node] = "malformed"
        elif answer.state == MODEL_WANTED:
            proofs[node] = answer.proof
            del states[node]
        else:
            states[node] = answer.state
    return states, proofs


def deliver_only(grid: Grid, context: Context, cfg: RunConfig) -> dict[str, object]:
    """A delivery-only run (``deliver-from``): offer one finished run's model to the
    connected sites and send it to those that trained in that run and lack it."""
    run = finished_run(Path(cfg.deliver_from).expanduser().absolute())
    log.info(
        "delivery only: run %d's model (sha256 %s) from %s",
        run.run_id,
        run.description.head_sha256,
        run.out_dir,
    )
    nodes = _connected(grid, cfg.min_sites, cfg.join_timeout)
    states, proofs = _answers(grid, run, nodes, cfg.round_timeout)
    groups: dict[str, list[int]] = {"already_held": []}  # the sites that did not ask, by answer
    for node, state in states.items():
        key = "already_held" if state == MODEL_HELD else state.replace("-", "_")
        groups.setdefault(key, []).append(node)
    entry = deliver_earlier(grid, run, proofs, cfg.round_timeout, context.run_id, groups)
    log.info(
        "run %d's model: sent to %d site(s) %s, already held by %d %s; other nodes: %s",
        run.run_id,
        len(entry["delivered_to"]),  # type: ignore[arg-type]
        entry["delivered_to"],
        len(groups["already_held"]),
        groups["already_held"],
        {k: v for k, v in groups.items() if k != "already_held" and v} or "none",
    )
    if failed := entry["failed"]:
        raise FederationError(
            f"run {run.run_id}'s model did not reach every site that asked for it: {failed}",
            "see those sites' logs; run the delivery again once fixed",
        )
    return entry
