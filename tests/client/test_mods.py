"""The site's message metrics name each message's kind from a bounded set."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedhead.cli.metrics import SITE_MESSAGE_KINDS
from fedhead.client.mods import MESSAGE_KINDS, message_kind
from tests.loopback import set_task_identity


def _msg(message_type: str, stage: object = None) -> Message:
    set_task_identity()
    content = RecordDict()
    if stage is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    return Message(content, dst_node_id=1, message_type=message_type)


@pytest.mark.parametrize(
    ("message_type", "stage", "kind"),
    [
        ("train", None, "train"),
        ("train", "setup", "secagg_setup"),
        ("train", "share_keys", "secagg_share_keys"),
        ("train", "collect_masked_vectors", "train"),  # the stage that trains
        ("train", "unmask", "secagg_unmask"),
        ("train", "steal", "other"),
        ("train", 3, "other"),
        ("evaluate", None, "evaluate"),
        ("query.prepare", None, "prepare"),
        ("query.models", None, "models"),
        ("query.outcome", None, "outcome"),
        ("query.anything_a_server_makes_up", None, "other"),
    ],
)
def test_a_message_kind_is_one_of_a_bounded_set(
    message_type: str, stage: object, kind: str
) -> None:
    assert message_kind(_msg(message_type, stage)) == kind


def test_the_exporter_pre_initialises_every_kind() -> None:
    assert set(MESSAGE_KINDS) == set(SITE_MESSAGE_KINDS)
