"""Which heads a site accepts from the server: the server must not probe its data.

A head is how the server asks questions of a site's images: evaluating it, or training
from it and reporting the loss, tells the server how that head does on them. A site
therefore accepts only heads it can account for:

1. **Exactly the run's trainable tensors, checked before decoding.** Every head in a
   train, evaluate or outcome message must hold the run's trainable set (names, shapes,
   dtypes: ``TrainableSet``, computed by the site itself at prepare and kept in its node
   state), read from each array's declared shape and dtype, or for the legacy
   Parameters of train and evaluate messages from the ``.npy`` header, before anything
   turns the bytes into arrays (a 100 MB head costs no more than its bytes).
2. **The run's own initial head.** The first head is a function of the run's seed and
   architecture (``common.model.initial_trainable``): the site recomputes it at
   prepare (or once it holds the weights, when trunk blocks are trained) and keeps it
   (``SiteModels``, ``runs/<run-id>.initial.safetensors``); the head of round 0
   (trained from in round 1, or evaluated before any training) must be exactly it.
3. **Bounded steps.** The head after ``k`` aggregations must lie within
   ``common.stepbound.distance_bound`` of every head the site holds of the run: the
   initial head (after 0) and the last head it took (``runs/<run-id>.head.safetensors``,
   with its round and the run's step settings, pinned when the site first trains).
   A head too far from them, one of an earlier round than a head already taken, or
   step settings changed within the run are refused, and so is a run whose settings
   admit no bound (FedAvg or FedAvgM without ``max-update-norm``, SecAgg+ or DP). A
   delivered model must lie within the run's remaining rounds of them. A resumed run
   (``FitSettings.resumes_run``) is also held to the last head the site took in the
   run it resumes, when it took part in it.

Refusals are one line in the site's log (``RefusedHeadError``), an error reply naming
only the kind of problem, and ``fedhead_site_heads_refused_total{reason}``. The records
live on the site's disk, so a restarted node still knows the run's heads; sites that
share a cache folder share them (every site of a run is sent the same global heads).
Numpy only: the ClientApp checks heads before it hands any work to torch.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedhead.client.models import SiteModels
from fedhead.common.errors import FederationError, ModelMismatchError, RefusedHeadError
from fedhead.common.heads import TrainableSet, global_norm
from fedhead.common.protocol import FitSettings, RunSpec
from fedhead.common.stepbound import StepSettings, distance_bound
from fedhead.common.telemetry import SiteRefusedHead, emit

RECORD_TRAINABLE = "fedhead.trainable"  # ConfigRecord in the node's state: the run's set
_NPY_HEADER_MAX = 1 << 16  # numpy writes headers of a few hundred bytes
PROBING = "the server may be probing this site's data: tell its operator"
INITIAL, LAST = "initial", "head"  # SiteModels.head_file names
CANDIDATE = "candidate-{}"  # ... and a closed-form run's candidate heads
MAX_CANDIDATES = 16  # a validation message's heads, at most
# Why a head is refused (a bounded metrics label; cli.metrics pre-initialises them).
REFUSALS = (
    "shape",
    "initial",
    "step",
    "stale",
    "settings",
    "unbounded",
    "non_finite",
    "candidates",
)


def keep_trainable(context: Context, trainable: TrainableSet, spec: RunSpec) -> None:
    """Remember the run's trainable set in the node's state (at prepare)."""
    if trainable.fingerprint() != spec.trainable_fingerprint:
        raise ModelMismatchError(
            "this site's model has other trainable tensors than the server's "
            f"({len(trainable.tensors)} tensors, {trainable.num_params} parameters)",
            "server and site must run the same fedhead version",
        )
    context.state.config_records[RECORD_TRAINABLE] = ConfigRecord({"set": trainable.to_json()})


def prepared_trainable(context: Context) -> TrainableSet:
    """The run's trainable set this node was prepared with."""
    record = context.state.config_records.get(RECORD_TRAINABLE)
    if record is None:
        raise FederationError(
            "this node was not prepared for the run (it joined after the run started?)",
            "it takes part from the next run on",
        )
    return TrainableSet.from_json(str(record["set"]))


# --- 1. the declared tensors ---------------------------------------------------------
def refuse(reason: str, what: str, hint: str = PROBING) -> RefusedHeadError:
    """The error for a refused head, counted (``reason``: a bounded metrics label)."""
    emit(SiteRefusedHead(reason))
    return RefusedHeadError(what, hint)


def declared(array: Array) -> tuple[tuple[int, ...], np.dtype, int]:
    """An array's shape, dtype and size in bytes as its own header says, without
    decoding it: the ``.npy`` header for numpy arrays (legacy Parameters declare
    nothing else; Arrays made from numpy declare both, and must agree)."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"a tensor serialized as {array.stype[:32]!r}, not numpy")
    buf = io.BytesIO(array.data[:_NPY_HEADER_MAX])
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f"an .npy header of version {version}")
    if fortran or dtype.hasobject:
        raise ValueError("a tensor in Fortran order or of Python objects")
    if array.dtype and (tuple(array.shape) != shape or array.dtype != str(dtype)):
        raise ValueError(
            f"a tensor declared {array.dtype}{list(array.shape)} holding {dtype}{list(shape)}"
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(array.data) - buf.tell() != nbytes:
        raise ValueError(f"a {dtype}{list(shape)} tensor in {len(array.data)} bytes")
    return shape, dtype, nbytes


def check_declared(record: ArrayRecord, expected: TrainableSet, what: str) -> None:
    """``record`` holds exactly ``expected``'s tensors, in order (keys "0", "1", ...),
    by their declared shapes and dtypes; nothing is decoded."""
    keys = list(record.keys())
    if keys != [str(i) for i in range(len(expected.tensors))]:
        raise refuse(
            "shape",
            f"{what} holds {len(keys)} tensors, the run's trainable set {len(expected.tensors)}",
            "server and site must run the same fedhead version",
        )
    for key, spec in zip(keys, expected.tensors, strict=True):
        try:
            shape, dtype, _ = declared(record[key])
        except ValueError as err:
            raise refuse("shape", f"{what}: tensor {key} ({spec.name}): {err}") from err
        if shape != spec.shape or dtype != np.dtype(spec.dtype):
            raise refuse(
                "shape",
                f"{what}: tensor {key} is {dtype}{list(shape)}, the run's {spec.name} is "
                f"{spec.dtype}{list(spec.shape)}; refused before decoding",
                "server and site must run the same fedhead version",
            )


# --- 2. and 3. where a head may lie ----------------------------------------------------
@dataclass(frozen=True)
class RunHeads:
    """What a site holds of one run's heads: the initial one, the last one it took
    (``index``: after how many aggregations), and the settings that bound a step."""

    initial: list[np.ndarray] | None
    last: list[np.ndarray] | None
    index: int
    steps: StepSettings | None
    rounds: int  # the run's num-server-rounds


def step_settings(settings: FitSettings) -> StepSettings:
    return StepSettings(
        max_update_norm=settings.max_update_norm,
        clipping_range=settings.clipping_range,
        strategy=settings.strategy,
        server_learning_rate=settings.server_learning_rate,
        server_momentum=settings.server_momentum,
        server_beta1=settings.server_beta1,
        server_beta2=settings.server_beta2,
        server_tau=settings.server_tau,
        dp_noise_multiplier=settings.dp_noise_multiplier,
        dp_clipping_norm=settings.dp_clipping_norm,
        min_sites=settings.min_sites,
    )


class HeadGuard:
    """The heads one site accepts in one run (``run_id``), from its records under
    ``models`` (``runs/<run-id>.{initial,head}.safetensors``)."""

    def __init__(self, models: SiteModels, run_id: int, trainable: TrainableSet) -> None:
        self.models = models
        self.run_id = run_id
        self.trainable = trainable

    # --- records ---------------------------------------------------------------------
    def keep_initial(self, arrays: Sequence[np.ndarray]) -> None:
        """The run's initial head, as this site computed it (at prepare)."""
        self.models.keep_head(self.run_id, INITIAL, self.trainable.names, arrays, {})

    def held(self, run_id: int | None = None) -> RunHeads:
        run = self.run_id if run_id is None else run_id
        names = self.trainable.names
        initial = self.models.head(run, INITIAL, names)
        last = self.models.head(run, LAST, names)
        meta = last[1] if last else {}
        try:
            steps = StepSettings(**json.loads(meta["steps"])) if "steps" in meta else None
            index, rounds = int(meta.get("index", -1)), int(meta.get("rounds", 0))
        except (TypeError, ValueError) as err:  # written by this module: a damaged file
            raise refuse(
                "settings",
                f"the record of run {run}'s last head does not read back ({err})",
                f"remove {self.models.head_file(run, LAST)} and restart the node",
            ) from err
        return RunHeads(
            initial[0] if initial else None, last[0] if last else None, index, steps, rounds
        )

    def take(self, index: int, arrays: Sequence[np.ndarray], settings: FitSettings | None) -> None:
        """Record ``arrays`` as the last head taken, the head after ``index``
        aggregations (after ``check`` passed); ``settings`` pins the run's step settings."""
        held = self.held()
        steps = step_settings(settings) if settings is not None else held.steps
        rounds = settings.num_server_rounds if settings is not None else held.rounds
        meta = {"index": str(index), "rounds": str(rounds)}
        if steps is not None:
            meta["steps"] = json.dumps(asdict(steps))
        self.models.keep_head(self.run_id, LAST, self.trainable.names, arrays, meta)

    def keep_candidates(self, heads: Sequence[Sequence[np.ndarray]]) -> None:
        """A closed-form run's candidate heads, which the site validates once: its round-1
        head must be one of them (``check``), and every later head within the step bound
        of it."""
        if self.candidates():
            raise refuse(
                "candidates",
                f"a second set of candidate heads in run {self.run_id}",
                "a site validates one set of closed-form candidates per run; " + PROBING,
            )
        if not 0 < len(heads) <= MAX_CANDIDATES:
            raise refuse("candidates", f"{len(heads)} candidate heads (at most {MAX_CANDIDATES})")
        for arrays in heads:
            if not all(math.isfinite(float(np.max(np.abs(a), initial=0.0))) for a in arrays):
                raise refuse("non_finite", "a candidate head holds non-finite values")
        names = self.trainable.names
        for k, arrays in enumerate(heads):
            meta = {"count": str(len(heads))}
            self.models.keep_head(self.run_id, CANDIDATE.format(k), names, arrays, meta)

    def candidates(self) -> list[list[np.ndarray]]:
        """The closed-form candidate heads this site validated in the run ([]: none)."""
        names = self.trainable.names
        first = self.models.head(self.run_id, CANDIDATE.format(0), names)
        if first is None:
            return []
        out = [first[0]]
        for k in range(1, int(first[1].get("count", "1"))):
            held = self.models.head(self.run_id, CANDIDATE.format(k), names)
            if held is not None:
                out.append(held[0])
        return out

    def _closed_form(self, index: int, arrays: Sequence[np.ndarray]) -> bool:
        """A closed-form run's heads: round 1's must be one of the candidates this site
        validated (the sum of the sites' statistics chose it, which no site can
        recompute); later ones are bounded from the last head taken, as in any run.
        False: not a closed-form run."""
        candidates = self.candidates()
        if not candidates:
            return False
        if index <= 1 and not any(_distance(arrays, c) == 0.0 for c in candidates):
            raise refuse(
                "candidates",
                f"the head of round {index} of closed-form run {self.run_id} is none of the "
                "candidate heads this site validated",
            )
        return True

    # --- checks ----------------------------------------------------------------------
    def check(self, index: int, arrays: Sequence[np.ndarray], settings: FitSettings | None) -> None:
        """Refuse (RefusedHeadError) a head after ``index`` aggregations that this site
        cannot account for; ``settings``: the round's (train messages) or None (an
        evaluation, bounded by the settings pinned when the site trained)."""
        held = self.held()
        if held.initial is None:
            raise refuse(
                "initial",
                f"this site holds no initial head of run {self.run_id} to check heads against",
                "it was not prepared for the run, or lost its records: restart the node",
            )
        # the round's settings are checked; steps are bounded by the run's first (loosest)
        steps = self._steps(held, settings)
        steps = held.steps or steps
        if not all(math.isfinite(float(np.max(np.abs(a), initial=0.0))) for a in arrays):
            raise refuse("non_finite", f"the head of round {index} holds non-finite values")
        closed_form = self._closed_form(index, arrays)
        if closed_form and index <= 1:
            return
        if index == 0:
            if _distance(arrays, held.initial) != 0.0:
                raise refuse(
                    "initial",
                    f"the initial head sent is not run {self.run_id}'s initial head "
                    "(a function of its seed and architecture that this site computed)",
                )
            return
        if steps is None:
            raise refuse(
                "step", f"a head of round {index} before this site was told the run's settings"
            )
        # a closed-form run's heads start from its round-1 head, not from the initial one
        references = [] if closed_form else [(held.initial, 0, steps)]
        if closed_form and (held.last is None or held.index < 1):
            raise refuse("step", f"a head of round {index} before the run's round-1 head")
        if held.last is not None:
            if held.index > index:
                raise refuse(
                    "stale",
                    f"a head of round {index} after this site took the head of round {held.index}",
                    "rounds only go forward; check the server",
                )
            references.append((held.last, held.index, steps))
        if settings is not None and settings.resumes_run:
            earlier = self._resumed(settings.resumes_run, index)
            if earlier is not None:
                references.append(earlier)
        self._within(index, arrays, references)

    def check_final(self, arrays: Sequence[np.ndarray]) -> None:
        """The run's final head (a delivered model) after at most ``num-server-rounds``
        aggregations, as pinned when this site trained."""
        held = self.held()
        if self.candidates():  # a closed-form run: from its round-1 head on
            if held.last is None or held.steps is None:  # no round after the candidates
                self._closed_form(1, arrays)
                return
            references = [(held.last, held.index, held.steps)]
            self._within(max(held.rounds, held.index), arrays, references)
            return
        if held.initial is None or held.steps is None:
            raise refuse(
                "initial",
                f"the model of run {self.run_id}, whose heads this site has no record of",
                "nothing was kept; tell the federation's operator",
            )
        references = [(held.initial, 0, held.steps)]
        if held.last is not None:
            references.append((held.last, held.index, held.steps))
        self._within(max(held.rounds, held.index), arrays, references)

    def _steps(self, held: RunHeads, settings: FitSettings | None) -> StepSettings | None:
        if settings is None:
            return held.steps
        steps = step_settings(settings)
        if problems := steps.problems():
            raise refuse("settings", "the run's step settings are refused: " + "; ".join(problems))
        if math.isinf(distance_bound(steps, self.trainable.num_params, 0, 1)):
            raise refuse(
                "unbounded",
                "the run sets no max-update-norm, no SecAgg+ and no DP under "
                f"{steps.strategy}: nothing bounds how far a round moves the head, so "
                "this site cannot check the heads it is sent",
                "ask the operator to set max-update-norm",
            )
        if held.steps is not None and not steps.within(held.steps):
            raise refuse(
                "settings",
                "the round's server optimizer, norm, clipping or DP settings would let it "
                "move the head further than those this site was first sent in the run",
            )
        return steps

    def _resumed(
        self, earlier_run: int, index: int
    ) -> tuple[list[np.ndarray], int, StepSettings] | None:
        """The last head this site took in the run a resumed run continues, if any."""
        if earlier_run == self.run_id:
            return None
        held = self.held(earlier_run)
        if held.last is None or held.steps is None or held.index > index:
            return None
        return held.last, held.index, held.steps

    def _within(
        self,
        index: int,
        arrays: Sequence[np.ndarray],
        references: list[tuple[list[np.ndarray], int, StepSettings]],
    ) -> None:
        values = self.trainable.num_params
        for reference, start, steps in references:
            distance = _distance(arrays, reference)
            bound = distance_bound(steps, values, start, index)
            if not distance <= bound:
                raise refuse(
                    "step",
                    f"the head of round {index} lies {distance:.4g} from the head of round "
                    f"{start}, beyond the {bound:.4g} that {index - start} round(s) of "
                    f"{steps.strategy} can move it under the run's settings",
                )


def _distance(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    pairs = zip(a, b, strict=True)
    return global_norm([x.astype(np.float64) - y.astype(np.float64) for x, y in pairs])
