"""An in-process Grid that hands messages to ClientApps directly (fast tests only).

It stands in for Flower's transport in unit-level integration tests; messages are
serialised and inflated both ways, as Flower's transport does. Tests that need the real thing
start flower-superlink / flower-supernode processes (tests/e2e/).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242


def set_task_identity() -> None:
    """Flower's runtime sets the identity of the process that creates messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


def transmit(msg: Message) -> Message:
    """Serialise a message's object tree and inflate a fresh copy, as Flower's transport does."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    copy = cast(Message, inflate_object_from_contents(msg.object_id, contents))
    copy.metadata.__dict__.update(msg.metadata.__dict__)  # metadata travels beside the tree
    return copy


AppCallable = Callable[[Message, Context], Message]


class LoopbackGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        node_configs: dict[int, dict[str, Any]],
        node_apps: dict[int, AppCallable] | None = None,
        run_id: int = RUN_ID,
    ) -> None:
        set_task_identity()
        self.run_id = run_id
        self.app = client_app
        self.node_apps = dict(node_apps or {})  # nodes that run another app (an attacker's)
        self.contexts = {
            nid: Context(run_id, nid, node_config=cfg, state=RecordDict(), run_config={})
            for nid, cfg in node_configs.items()
        }
        self.dead: set[int] = set()
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        # called with (node_id, message) before delivery; may mark the node dead
        self.before_delivery: Callable[[int, Message], None] | None = None

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def get_nodes(self) -> Iterable[Any]:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if self.before_delivery:
                self.before_delivery(node, msg)
            if node in self.dead:
                continue  # a dead node never answers; the caller's timeout ends the wait
            app = self.node_apps.get(node, self.app)
            reply = app(transmit(msg), self.contexts[node])
            self.replies.append(transmit(reply))  # the caller may consume its copy
            replies.append(transmit(reply))
        return replies
