"""A site's outcome of a run (``query.outcome``): local-only, federated and
personalized heads on its own validation split. See ``fedhead.common.outcome``.

The site evaluates only the head it was delivered and kept (``Site.keep_model``), and
trains the local-only head only from the run's initial head, the one it trained from
in round 1 (its ledger holds that head's digest; a site that did not train in round 1,
e.g. in a resumed run, sends no local-only metrics). A personalized head that beats the
federated one on the validation split is written as a model package to
``<cache>/models/<run-id>/personalized/`` (``personalized-<site name>/`` for a named
site: sites may share a cache folder), for ``fedhead predict --model``; it never leaves
the site.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedhead.client.site import Site
from fedhead.common.errors import ModelMismatchError, RunSpecError
from fedhead.common.heads import head_sha256
from fedhead.common.outcome import HeadMetrics, SiteOutcome, head_metrics
from fedhead.common.package import MODEL_CARD, ModelPackage
from fedhead.common.protocol import FitSettings, OutcomeRequest
from fedhead.common.training import TrainParams, head_logits, scheduled_lr, train_head

log = logging.getLogger(__name__)

PERSONALIZED = "personalized"
MAX_ROUNDS = 10_000  # bounds on what the server may ask a site to compute
MAX_PERSONALIZE_EPOCHS = 1_000
MAX_RESAMPLES = 10_000
# a closed-form run's chosen candidate (common.closed_form.Candidate.label) and counts
_CLOSED_FORM = re.compile(r"(lda shrinkage|ridge lambda)=[0-9.e+-]{1,24}")
_COUNTS = re.compile(r"[0-9]{1,15}(,[0-9]{1,15}){0,999}")


def check_request(request: OutcomeRequest, settings: FitSettings, run_id: int) -> None:
    """Refuse a request this site must not act on (the server is not trusted blindly)."""
    problems = []
    if request.run_id != run_id:
        problems.append(f"it names run {request.run_id}, this is run {run_id}")
    if not 1 <= request.rounds <= MAX_ROUNDS:
        problems.append(f"rounds {request.rounds} not in 1..{MAX_ROUNDS}")
    if not 0 <= request.personalize_epochs <= MAX_PERSONALIZE_EPOCHS:
        problems.append(f"personalize_epochs not in 0..{MAX_PERSONALIZE_EPOCHS}")
    if not 0 < request.personalize_lr_scale <= 1:
        problems.append("personalize_lr_scale not in (0, 1]")
    if not 0 < request.resamples <= MAX_RESAMPLES:
        problems.append(f"resamples not in 1..{MAX_RESAMPLES}")
    if request.lr_schedule not in ("cosine", "constant"):
        problems.append(f"unknown lr_schedule {request.lr_schedule[:16]!r}")
    if not (0 < settings.local_epochs <= MAX_PERSONALIZE_EPOCHS and settings.batch_size > 0):
        problems.append("local epochs or batch size out of range")
    if not (math.isfinite(settings.learning_rate) and settings.learning_rate > 0):
        problems.append("the learning rate is not a positive number")
    if request.closed_form and not _CLOSED_FORM.fullmatch(request.closed_form):
        problems.append(f"unknown closed-form head {request.closed_form[:32]!r}")
    if request.class_counts and not _COUNTS.fullmatch(request.class_counts):
        problems.append("class counts that are not whole numbers")
    if problems:
        raise RunSpecError(
            "the server's outcome request is refused: " + "; ".join(problems),
            "server and sites must run the same fedhead version",
        )


def site_outcome(
    site: Site,
    run_id: int,
    request: OutcomeRequest,
    settings: FitSettings,
    initial: list[np.ndarray],
    initial_trusted: bool = False,
) -> SiteOutcome:
    """The outcome the request asks for. The local-only head is trained only when
    ``initial_trusted``: the initial head sent is the one this site trained from in
    round 1 (``HeadLedger.is_initial_head``); otherwise it is left out, with a warning."""
    check_request(request, settings, run_id)
    kept_dir = site.models.model_dir(run_id)
    names = site.trainable.names
    kept = ModelPackage.load(kept_dir)  # the delivered model: the only final head it evaluates
    final = [kept.tensors[n] for n in names]
    if head_sha256(names, final) != request.head_sha256:
        raise ModelMismatchError(
            f"the outcome request names head {request.head_sha256[:12]}…, this site kept "
            "another final model for the run",
            "nothing was evaluated",
        )
    if settings.trainable_fingerprint != site.spec.trainable_fingerprint:
        raise ModelMismatchError("the outcome request names another trainable set than the run")
    if problems := site.trainable.problems(initial):
        raise ModelMismatchError("the initial head does not fit: " + "; ".join(problems[:3]))

    model = site.trained_model()
    val_x, val_y, _ = site.features("val")
    train_x, train_y, _ = site.features("train")
    if len(val_y) == 0 or len(train_y) == 0:
        raise RunSpecError("no usable training or validation images for the outcome")
    classes = site.spec.class_names()
    y = val_y.numpy()
    views = site.spec.augment_views > 0
    seed = settings.seed

    def probabilities(arrays: list[np.ndarray]) -> tuple[np.ndarray, float]:
        site.trainable.set(model, arrays)
        logits = head_logits(model, val_x, site.device).cpu()
        loss = float(F.cross_entropy(logits, val_y))
        return torch.softmax(logits, dim=1).numpy(), loss

    def train(arrays: list[np.ndarray], epochs: int, lr: float, rnd: int) -> list[np.ndarray]:
        site.trainable.set(model, arrays)
        params = TrainParams.of_run(settings, epochs, lr, rnd)
        train_head(model, train_x, train_y, params, site.device, views=views)
        trained: list[np.ndarray] = site.trainable.get(model)
        return trained

    def metrics(proba: np.ndarray, loss: float) -> HeadMetrics:
        return head_metrics(y, proba, loss, classes, request.resamples, seed)

    fed_proba, fed_loss = probabilities(final)
    outcome = SiteOutcome(examples=len(y), federated=metrics(fed_proba, fed_loss))
    scorer = _Scorer(y, seed, metrics, probabilities)
    if request.closed_form:
        return _closed_form_outcome(site, run_id, request, outcome, scorer, final)
    if request.local_baseline and not initial_trusted:
        log.warning(
            "run %d: no local-only baseline: the initial head sent is not the one this site "
            "trained from in round 1 (or it did not train in round 1)",
            run_id,
        )
    if request.local_baseline and initial_trusted:
        # the federation's budget and schedule: a fresh optimizer each "round", as sites do
        local = [a.copy() for a in initial]
        for rnd in range(1, request.rounds + 1):
            lr = scheduled_lr(settings.learning_rate, rnd, request.rounds, request.lr_schedule)
            local = train(local, settings.local_epochs, lr, rnd)
        local_proba, local_loss = probabilities(local)
        outcome = scorer.against_local(outcome, fed_proba, local_proba, local_loss, request)
        gain, lo, hi = outcome.gain, outcome.gain_lo, outcome.gain_hi
        log.info(
            "run %d outcome: federated accuracy %.4f, local-only %.4f, gain %+.4f [%+.4f, %+.4f]",
            run_id, outcome.federated.accuracy, outcome.local.accuracy if outcome.local else 0,
            gain, lo, hi,
        )  # fmt: skip
    if request.personalize_epochs:
        lr = settings.learning_rate * request.personalize_lr_scale
        mine = train(final, request.personalize_epochs, lr, request.rounds + 1)
        proba, loss = probabilities(mine)
        personal = metrics(proba, loss)
        fed = outcome.federated
        better = personal.accuracy > fed.accuracy or (
            personal.accuracy == fed.accuracy and personal.loss < fed.loss
        )
        if better:
            folder = f"{PERSONALIZED}-{site.label}" if site.label else PERSONALIZED
            card = _personalized_card(
                (kept_dir / MODEL_CARD).read_text(), request.personalize_epochs, personal, fed
            )
            path = _keep_personalized(kept_dir / folder, kept, mine, names, card)
            log.info("personalized head beats the federated one; kept at %s", path)
        else:
            log.info("personalized head does not beat the federated one; not kept")
        outcome = dataclasses.replace(outcome, personalized=personal, personalized_kept=better)
    return outcome


PRIOR_STRENGTH = 10.0  # pseudo-examples of the federation's class balance in a site's prior


@dataclasses.dataclass(frozen=True)
class _Scorer:
    """How a head does on the site's validation split (labels ``y``)."""

    y: np.ndarray
    seed: int
    metrics: Callable[[np.ndarray, float], HeadMetrics]
    probabilities: Callable[[list[np.ndarray]], tuple[np.ndarray, float]]

    def against_local(
        self,
        outcome: SiteOutcome,
        fed_proba: np.ndarray,
        local_proba: np.ndarray,
        local_loss: float,
        request: OutcomeRequest,
    ) -> SiteOutcome:
        """``outcome`` with the local-only head's metrics and the paired gain of the
        federated head over it (accuracy and balanced accuracy, 95% intervals)."""
        from fedhead.common.evaluation import paired_difference

        y, n, seed = self.y, request.resamples, self.seed
        gain, lo, hi = paired_difference(y, fed_proba, local_proba, n, seed=seed)
        balanced = paired_difference(
            y, fed_proba, local_proba, n, seed=seed, metric="balanced_accuracy"
        )
        return SiteOutcome(
            outcome.examples, outcome.federated, self.metrics(local_proba, local_loss), None,
            False, gain, lo, hi, *balanced,
        )  # fmt: skip


def _closed_form_outcome(
    site: Site,
    run_id: int,
    request: OutcomeRequest,
    outcome: SiteOutcome,
    score: _Scorer,
    final: list[np.ndarray],
) -> SiteOutcome:
    """A closed-form run's outcome, at no extra message: the local-only head is the same
    closed form on this site's own statistics (what it would have had alone); the
    personalized head is the federated one with this site's class balance in place of
    the federation's (the Bayes rule under label shift), shrunk toward the federation's
    by ``PRIOR_STRENGTH`` pseudo-examples, kept where it does better on the validation
    split."""
    from fedhead.common.closed_form import ClosedFormError, candidate_heads

    method, _, parameter = request.closed_form.partition(" ")
    stats = site.training_statistics()
    weight, bias = site.trainable.tensors
    own = stats.counts / max(stats.total, 1.0)
    probabilities = score.probabilities
    if request.local_baseline:
        try:
            (alone,) = candidate_heads(stats, method, [float(parameter.split("=")[1])])
            local = [alone.head.weight, alone.head.bias]
        except ClosedFormError:  # a class this site lacks: alone, it predicts its own
            local = [np.zeros(weight.shape), np.log(np.maximum(own, 1e-12))]
        dtypes = (np.dtype(weight.dtype), np.dtype(bias.dtype))
        local_proba, local_loss = probabilities(
            [a.astype(d) for a, d in zip(local, dtypes, strict=True)]
        )
        fed_proba, _ = probabilities(final)
        outcome = score.against_local(outcome, fed_proba, local_proba, local_loss, request)
    federation = np.array([float(c) for c in request.class_counts.split(",") if c])
    if len(federation) != len(own) or federation.sum() <= 0:
        log.warning("run %d: no personalized head: no class counts of the federation", run_id)
        return outcome
    pooled = federation / federation.sum()
    prior = (stats.counts + PRIOR_STRENGTH * pooled) / (stats.total + PRIOR_STRENGTH)
    shifted = final[1].astype(np.float64) + np.log(prior) - np.log(np.maximum(pooled, 1e-12))
    mine = [final[0], shifted.astype(final[1].dtype)]
    proba, loss = probabilities(mine)
    personal = score.metrics(proba, loss)
    fed = outcome.federated
    better = personal.accuracy > fed.accuracy or (
        personal.accuracy == fed.accuracy and personal.loss < fed.loss
    )
    log.info(
        "run %d outcome (closed form): federated %.4f, local-only %s, own class balance %.4f%s",
        run_id,
        fed.accuracy,
        f"{outcome.local.accuracy:.4f}" if outcome.local else "-",
        personal.accuracy,
        " (kept)" if better else "",
    )
    return dataclasses.replace(outcome, personalized=personal, personalized_kept=better)


def _personalized_card(
    delivered: str, epochs: int, personal: HeadMetrics, federated: HeadMetrics
) -> str:
    """The delivered MODEL_CARD.md and what this site changed (its metrics stay the
    federated head's: the server wrote them)."""
    return (
        delivered.rstrip()
        + f"""

## Personalized at this site

This copy's head was fine-tuned on this site's training split for {epochs} epoch(s)
after the run and kept because it did better on the site's validation split
(accuracy {personal.accuracy:.4f}, the federated head {federated.accuracy:.4f}). The
metrics above are the federated head's: measure this one on your own labelled data
with `fedhead evaluate`.
"""
    )


def _keep_personalized(
    dest: Path,
    kept: ModelPackage,
    arrays: list[np.ndarray],
    names: list[str],
    card: str,
) -> Path:
    """The delivered package with the personalized head, beside it (replacing an earlier
    personalization of the same run, which only this site wrote)."""
    from dataclasses import replace

    tensors = dict(zip(names, (np.ascontiguousarray(a) for a in arrays), strict=True))
    pkg = replace(kept, tensors=tensors, metrics={})
    written: Path = pkg.write(dest, card=card, overwrite=True)
    return written
