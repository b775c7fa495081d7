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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedhead.common.heads import head_sha256
from fedhead.common.package import MODEL_CARD, MODEL_JSON, TENSORS_FILE
from fedhead.common.protocol import (
    MSG_MODEL,
    RECORD_MODEL,
    RECORD_MODEL_FILES,
    RECORD_MODEL_REPLY,
    ModelDescription,
    ModelReceipt,
    RunSpec,
)
from fedhead.server.aggregation import Arrays

log = logging.getLogger(__name__)


def describe_model(
    spec: RunSpec, run_id: int, rounds: int, names: list[str], arrays: Arrays
) -> ModelDescription:
    """The final head's description, from the run spec every site was prepared with."""
    return ModelDescription(
        run_id=run_id,
        rounds=rounds,
        backbone=spec.backbone,
        backbone_sha256=spec.weights_sha256,
        classes=spec.classes,
        input_size=spec.input_size,
        head=spec.head,
        head_hidden=spec.head_hidden,
        head_dropout=spec.head_dropout,
        unfreeze_blocks=spec.unfreeze_blocks,
        trainable_fingerprint=spec.trainable_fingerprint,
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
