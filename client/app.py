"""fedhead's Flower ClientApp: thin glue between Flower messages and ``Site``.

Handlers:
- ``query.prepare``: check data and backbone copy, remember the run spec.
- ``query.weights``: receive the backbone file from the server, verify, cache.
- ``query.model``: after the last round, the final head: verify it, keep it. Also an
  earlier run's model, for a site that missed it (checked against that run's record).
- ``query.models``: a delivery-only run offers an earlier run's model: held or wanted?
- ``query.outcome``: after delivery, when asked: local-only / federated / personalized
  metrics on the site's validation split (``client.outcome``); scalars only.
- ``train``: legacy FitIns -> local training -> FitRes (SecAgg+-compatible format); when
  asked, the head sent (the last round's global head) is evaluated first and the
  evaluation travels in the FitRes metrics, which saves a message per round.
- ``evaluate``: legacy EvaluateIns -> validation loss/accuracy -> EvaluateRes (the final
  head, or every round's when the train messages do not evaluate), only for heads the
  site agrees to evaluate (``client.ledger``).

Every head the server sends (train, evaluate, a delivered model) is checked first
(``client.guard``): the run's trainable set, the run's own initial head, then steps
within the run's bound of the heads this site took.

Cross-cutting concerns are Flower mods around the handlers (see ``client.mods``):
``build_app`` puts every handler inside them, and ``app``, the one a SuperNode runs, is
``build_app()``.

A SuperNode starts one process per message, and most messages of a SecAgg+ round
(key setup, key sharing, unmasking) need no tensor maths: importing this module
imports neither torch nor the site's model code; handlers that train or evaluate
import ``fedhead.client.site`` when they run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from fedhead.client.guard import (
    HeadGuard,
    check_declared,
    keep_trainable,
    prepared_trainable,
    refuse,
)
from fedhead.client.ledger import RECORD_LEDGER, HeadLedger
from fedhead.client.models import HEAD_FILE, SiteModels, site_models_dir
from fedhead.client.mods import app_mods, asks_for_statistics, fitins_of, train_mods
from fedhead.client.worker import RemoteSite
from fedhead.common.config import NodeConfig
from fedhead.common.errors import FederationError
from fedhead.common.heads import head_sha256, read_head
from fedhead.common.logs import setup_logging
from fedhead.common.protocol import (
    RECORD_CANDIDATES,
    RECORD_MODEL,
    RECORD_MODEL_ANSWER,
    RECORD_MODEL_FILES,
    RECORD_MODEL_OFFER,
    RECORD_MODEL_REPLY,
    RECORD_OUTCOME,
    RECORD_OUTCOME_FIT,
    RECORD_OUTCOME_HEAD,
    RECORD_OUTCOME_REPLY,
    RECORD_PREPARE,
    RECORD_RUN,
    RECORD_VALIDATE,
    RECORD_VALIDATION_PREFIX,
    RECORD_WEIGHTS,
    FitSettings,
    ModelDescription,
    ModelOffer,
    ModelReceipt,
    OutcomeRequest,
    RunSpec,
    StatisticsRequest,
    ValidationRequest,
)

if TYPE_CHECKING:
    from fedhead.client.site import Site
    from fedhead.client.steps import LocalSite

log = logging.getLogger(__name__)

# Sites live across messages within one process (the Simulation Engine reuses its
# workers); a SuperNode starts a fresh process per message, so this is only a shortcut.
_SITES: dict[tuple[int, int], Site] = {}

# A SuperNode runs every message in a fresh process: configure logging on import.
setup_logging()


def _prepared_spec(context: Context) -> RunSpec:
    """The run spec this node was prepared with (kept in its state by ``prepare``)."""
    if RECORD_RUN not in context.state.config_records:
        raise FederationError(
            "this node was not prepared for the run (it joined after the run started?)",
            "it takes part from the next run on",
        )
    return RunSpec.from_mapping(context.state.config_records[RECORD_RUN])


def _site(context: Context, spec: RunSpec | None = None) -> Site:
    from fedhead.client.site import Site  # torch: only for messages that need a site

    key = (context.run_id, context.node_id)
    if spec is None:
        if key in _SITES:
            return _SITES[key]
        spec = _prepared_spec(context)
    node = NodeConfig.from_mapping(context.node_config)
    site = _SITES.get(key)
    if site is None or site.spec != spec or site.node != node:
        for other in [k for k in _SITES if k[0] != context.run_id]:
            del _SITES[other]  # sites of earlier runs in this process
        _SITES.pop(key, None)  # a refused spec leaves no earlier site in its place
        site = Site(node, spec)
        _SITES[key] = site
    return site


def prepare(msg: Message, context: Context) -> Message:
    spec = RunSpec.from_mapping(msg.content.config_records[RECORD_RUN])
    site = _site(context, spec)
    reply = site.prepare()
    # The heads it will accept (client.guard): the run's trainable set, and the head
    # the run starts from, once this site can compute it (unfrozen blocks: the weights).
    trainable, initial = site.run_start()
    keep_trainable(context, trainable, spec)
    if initial is not None:
        HeadGuard(site.models, context.run_id, trainable).keep_initial(initial)
    context.state.config_records[RECORD_RUN] = spec.to_record()
    log.info(
        "prepared for run %s: backbone %s (%s), %d training / %d validation images",
        context.run_id,
        spec.backbone,
        reply.weights,
        reply.train_examples,
        reply.val_examples,
    )
    return Message(RecordDict({RECORD_PREPARE: reply.to_record()}), reply_to=msg)


def weights(msg: Message, context: Context) -> Message:
    site = _site(context)
    array = msg.content.array_records[RECORD_WEIGHTS]["file"]
    data = array.numpy()
    site.install_weights(np.ascontiguousarray(data).data.cast("B"))
    trainable, initial = site.run_start()
    if initial is not None:  # unfrozen blocks start from the weights just installed
        HeadGuard(site.models, context.run_id, trainable).keep_initial(initial)
    return Message(RecordDict({RECORD_PREPARE: ConfigRecord({"weights": "ok"})}), reply_to=msg)


def _earlier_site(context: Context, run_id: int) -> Site:
    """A site for an earlier run this node trained in, built from its own record of that
    run (never from what the server says the run was)."""
    from fedhead.client.site import Site

    node = NodeConfig.from_mapping(context.node_config)
    record = SiteModels(site_models_dir(node)).run(run_id)
    if record is None or not record.proof:
        raise FederationError(
            f"the server sent the model of run {run_id}, a run this site did not train in",
            "nothing was kept; tell the federation's operator",
        )
    return Site(node, record.run_spec())


def model(msg: Message, context: Context) -> Message:
    description = ModelDescription.from_mapping(msg.content.config_records[RECORD_MODEL])
    if description.run_id == context.run_id:
        site = _site(context)
    else:  # an earlier run's model, which this site missed when that run ended
        site = _earlier_site(context, description.run_id)
    record = msg.content.array_records[RECORD_MODEL_FILES]
    files = {name: np.ascontiguousarray(a.numpy()).tobytes() for name, a in record.items()}
    if HEAD_FILE in files:  # the final head: within the run's reach of the heads it took
        head = read_head(files[HEAD_FILE], site.trainable.names)
        HeadGuard(site.models, description.run_id, site.trainable).check_final(head)
    _, sha = site.keep_model(description.run_id, description, files)
    receipt = ModelReceipt(sha)
    return Message(RecordDict({RECORD_MODEL_REPLY: receipt.to_record()}), reply_to=msg)


def models(msg: Message, context: Context) -> Message:
    """A delivery-only run offers a finished run's model: does this site hold it or
    want it (with its proof of having trained in that run)?"""
    offer = ModelOffer.from_mapping(msg.content.config_records[RECORD_MODEL_OFFER])
    shelf = SiteModels(site_models_dir(NodeConfig.from_mapping(context.node_config)))
    answer = shelf.answer(offer)
    log.info(
        "run %d's model (sha256 %s…) offered: %s",
        offer.run_id,
        offer.head_sha256[:12],
        answer.state,
    )
    return Message(RecordDict({RECORD_MODEL_ANSWER: answer.to_record()}), reply_to=msg)


def outcome(msg: Message, context: Context) -> Message:
    from fedhead.client.outcome import site_outcome  # torch: only when asked

    request = OutcomeRequest.from_mapping(msg.content.config_records[RECORD_OUTCOME])
    settings = FitSettings.from_mapping(msg.content.config_records[RECORD_OUTCOME_FIT])
    record = msg.content.array_records[RECORD_OUTCOME_HEAD]
    initial = [np.ascontiguousarray(record[k].numpy()) for k in sorted(record, key=int)]
    # the local-only baseline starts only from the head this site trained from in round 1
    trusted = _ledger(context).is_initial_head(_identity(context, initial))
    result = site_outcome(_site(context), context.run_id, request, settings, initial, trusted)
    reply = RecordDict({RECORD_OUTCOME_REPLY: ConfigRecord(result.to_record())})
    return Message(reply, reply_to=msg)


def _identity(context: Context, arrays: list[np.ndarray]) -> str:
    """A head's sha256 (``common.heads.head_sha256``), by the run's tensor names."""
    return head_sha256(prepared_trainable(context).names, arrays)


def _ledger(context: Context) -> HeadLedger:
    return HeadLedger.from_record(context.state.config_records.get(RECORD_LEDGER))


def _work(context: Context) -> LocalSite | RemoteSite:
    """Who does the site's work: the node's warm worker when ``fedhead node`` runs one
    (``worker-socket``), else this process."""
    node = NodeConfig.from_mapping(context.node_config)
    if not node.worker_socket:
        from fedhead.client.steps import LocalSite  # torch: only when working here

        return LocalSite(_site(context), context.run_id)
    spec = _prepared_spec(context)
    return RemoteSite(
        node.worker_socket, node.worker_key_file, dict(context.node_config), spec, context.run_id
    )


def _models(context: Context) -> SiteModels:
    """This node's records of the runs it took part in and the models it kept."""
    return SiteModels(site_models_dir(NodeConfig.from_mapping(context.node_config)))


def _guard(context: Context) -> HeadGuard:
    """The heads this node accepts in this run (client.guard)."""
    return HeadGuard(_models(context), context.run_id, prepared_trainable(context))


def train(msg: Message, context: Context) -> Message:
    work = _work(context)  # an unprepared node stops here, before its ledger moves
    fitins = fitins_of(msg)
    if asks_for_statistics(fitins.config):
        return _statistics(msg, context, work, StatisticsRequest.from_mapping(fitins.config))
    settings = FitSettings.from_mapping(fitins.config)
    arrays = parameters_to_ndarrays(fitins.parameters)
    guard = _guard(context)
    guard.check(settings.server_round - 1, arrays, settings)  # the head after round r-1
    ledger = _ledger(context)
    evaluates = ledger.start_training(
        settings.server_round, _identity(context, arrays), settings.evaluate
    )
    context.state.config_records[RECORD_LEDGER] = ledger.to_record()
    guard.take(settings.server_round - 1, arrays, settings)
    if settings.evaluate and not evaluates:
        log.warning(
            "round %d: not evaluating the head of round %d, a round this site missed",
            settings.server_round,
            settings.server_round - 1,
        )
    # When asked, the head sent (the previous round's global head) is evaluated first:
    # that evaluation travels with the update, one message less per round.
    trained = work.train(arrays, settings, evaluates)
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters(trained.arrays),
        num_examples=trained.weight,
        metrics=trained.metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _statistics(
    msg: Message, context: Context, work: LocalSite | RemoteSite, request: StatisticsRequest
) -> Message:
    """A closed-form head's round: the sufficient statistics of this site's training
    features (under SecAgg+ the secagg mod masks them; the server sees only the sum)."""
    ledger = _ledger(context)
    ledger.start_statistics(request.server_round)
    context.state.config_records[RECORD_LEDGER] = ledger.to_record()
    vector, weight = work.statistics(request)
    _models(context).trained(context.run_id, _prepared_spec(context), request.server_round, "")
    log.info(
        "round %d: sending the statistics of this site's training features (%d values%s)",
        request.server_round,
        vector.size,
        ", masked by SecAgg+" if request.secure else "",
    )
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters([vector]),
        num_examples=weight,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def validate(msg: Message, context: Context) -> Message:
    """A closed-form round's candidate heads: evaluate each on the validation split (the
    loss, accuracy and, when asked, the coarsened count tables of any evaluation), once,
    in a run whose statistics this site sent; the round's head must be one of them."""
    work = _work(context)
    request = ValidationRequest.from_mapping(msg.content.config_records[RECORD_VALIDATE])
    trainable = prepared_trainable(context)
    if set(msg.content.array_records) != {RECORD_CANDIDATES}:
        raise refuse("shape", "the validation message carries tensors besides its candidates")
    record = msg.content.array_records[RECORD_CANDIDATES]
    heads = []
    size = len(trainable.tensors)
    for k in range(request.candidates):  # "<k>/<i>": tensor i of candidate k
        part = ArrayRecord(
            {str(i): record[f"{k}/{i}"] for i in range(size) if f"{k}/{i}" in record}
        )
        check_declared(part, trainable, f"candidate head {k}")
        heads.append([np.ascontiguousarray(part[str(i)].numpy()) for i in range(size)])
    if len(record) != request.candidates * size:
        raise refuse("shape", "the validation message carries tensors besides its candidates")
    guard = _guard(context)
    ledger = _ledger(context)
    models = _models(context)
    earlier = models.run(request.resumes_run) if request.resumes_run else None
    # a resumed run goes on with the sum of an earlier run it sent its statistics to
    if (
        ledger.trained_round < request.server_round
        and earlier
        and request.server_round in earlier.rounds
    ):
        ledger.start_statistics(request.server_round)
    ledger.start_validation(request.server_round, [_identity(context, h) for h in heads])
    guard.keep_candidates(heads)
    context.state.config_records[RECORD_LEDGER] = ledger.to_record()
    # its proof of having taken part, should it miss the model: a candidate it validated
    proof = head_sha256(trainable.names, heads[0])
    models.trained(context.run_id, _prepared_spec(context), request.server_round, proof)
    reply = RecordDict()
    for k, head in enumerate(heads):
        loss, examples, metrics = work.evaluate(head, request.statistics)
        values = {"loss": loss, "examples": examples, **metrics}
        reply.config_records[f"{RECORD_VALIDATION_PREFIX}{k}"] = ConfigRecord(values)
    log.info("round %d: evaluated %d candidate heads", request.server_round, len(heads))
    return Message(reply, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    work = _work(context)
    evalins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(evalins.parameters)
    server_round = evalins.config.get("server_round")
    if not isinstance(server_round, int) or isinstance(server_round, bool):
        raise FederationError(
            "an evaluate message without its round number",
            "server and sites must run the same fedhead version",
        )
    guard = _guard(context)
    guard.check(server_round, arrays, None)  # the head after round r
    ledger = _ledger(context)
    ledger.start_evaluation(server_round, _identity(context, arrays))
    context.state.config_records[RECORD_LEDGER] = ledger.to_record()
    guard.take(server_round, arrays, None)
    statistics = evalins.config.get("statistics") is True
    loss, examples, metrics = work.evaluate(arrays, statistics)
    evalres = EvaluateRes(
        status=Status(Code.OK, "ok"), loss=loss, num_examples=examples, metrics=metrics
    )
    return Message(compat.evaluateres_to_recorddict(evalres), reply_to=msg)


# The query handlers, by the action a server names (message type "query.<action>").
QUERIES = {
    "prepare": prepare,
    "weights": weights,
    "model": model,
    "models": models,
    "outcome": outcome,
    "validate": validate,
}


def build_app(outer: Sequence[Mod] = (), inner_train: Sequence[Mod] = ()) -> ClientApp:
    """fedhead's ClientApp: every handler, each inside the mods of ``client.mods``.

    ``outer`` mods wrap all of it, outside the audit: what they change is what leaves
    the site, after masking. ``inner_train`` mods sit just inside Flower's SecAgg+ client
    mod around ``train``: what they change is what the site masks. A real site has
    neither; tests build attacking sites from this same composition, so each mod a site
    runs is one its attackers face.
    """
    client_app = ClientApp(mods=[*outer, *app_mods()])
    client_app.train(mods=train_mods(inner_train))(train)
    client_app.evaluate()(evaluate)
    for action, handler in QUERIES.items():
        client_app.query(action)(handler)
    return client_app


app = build_app()
