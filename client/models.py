"""A site's own record of the runs it trained in and the models it keeps.

Under the site's fedhead data folder (``--cache-dir``):

- ``runs/<run-id>.json``: written when the site trains in a run: the run's ``RunSpec``
  (what the model must be), the rounds it trained in, and the sha256 of the global
  head it last trained from (its proof, to the server, of having trained in the run);
  once the run's model is kept, its head sha256 too.
- ``runs/<run-id>.initial.safetensors``: the run's initial head as the site computed it,
  and ``runs/<run-id>.head.safetensors``: the last head it took in the run, with its
  round and the run's step settings in the metadata (``client.guard`` checks every head
  the server sends against both).
- ``models/<run-id>/``: the run's model package (``Site.keep_model``).

A run recorded here without a model is one whose model the site missed (offline when
the run ended); the site asks for it in every later run's prepare reply, or answers a
delivery-only run's offer. ``fedhead models`` shows both folders to the site's IT.
Plain Python, no Flower: the ClientApp calls it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fedhead.common.config import NodeConfig
from fedhead.common.files import atomic_writer
from fedhead.common.heads import head_bytes
from fedhead.common.protocol import (
    MAX_MODEL_REQUESTS,
    MODEL_HELD,
    MODEL_NOT_TRAINED,
    MODEL_OTHER,
    MODEL_WANTED,
    ModelAnswer,
    ModelOffer,
    ModelRequest,
    RunSpec,
)
from fedhead.common.weights import fedhead_cache_dir

log = logging.getLogger(__name__)

RUNS, MODELS = "runs", "models"
HEAD_FILE = "head.safetensors"  # fedhead.common.package.TENSORS_FILE (that module imports torch)
_RUN_FILE = re.compile(r"^([0-9]{1,20})\.json$")


SIMULATION = "simulation"  # simulated nodes' records and models, apart from a real site's


def site_cache_dir(node: NodeConfig) -> Path:
    """The site's fedhead data folder: ``cache-dir`` from its node config, else the default."""
    return Path(node.cache_dir).expanduser() if node.cache_dir else fedhead_cache_dir()


def site_models_dir(node: NodeConfig) -> Path:
    """Where the site keeps its run records and delivered models: its data folder. A
    simulated node (``fedhead demo``, the benchmarks) without a ``cache-dir`` keeps them
    in ``<cache>/simulation/site-<i>/`` instead, so a real site's ``fedhead models``
    never lists a demo's models; it shares the cache's weights and features."""
    if node.simulated and not node.cache_dir:
        return fedhead_cache_dir() / SIMULATION / f"site-{node.partition_id}"
    return site_cache_dir(node)


@dataclass(frozen=True)
class TrainedRun:
    """One run this site trained in, as ``runs/<run-id>.json`` records it."""

    run_id: int
    spec: dict[str, Any]  # RunSpec.to_dict() of the run
    rounds: tuple[int, ...]  # the rounds it trained in
    proof: str  # sha256 (head_sha256) of the global head it last trained from
    model_sha256: str  # the kept model's head sha256; "" while it has none
    updated: float

    def run_spec(self) -> RunSpec:
        return RunSpec.from_mapping(self.spec)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "spec": self.spec,
            "rounds": list(self.rounds),
            "proof": self.proof,
            "model_sha256": self.model_sha256,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TrainedRun:
        return cls(
            int(doc["run_id"]),
            dict(doc["spec"]),
            tuple(int(r) for r in doc["rounds"]),
            str(doc["proof"]),
            str(doc.get("model_sha256", "")),
            float(doc.get("updated", 0.0)),
        )


class SiteModels:
    """The ``runs/`` and ``models/`` folders of one site's data folder."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def run_file(self, run_id: int) -> Path:
        return self.cache_dir / RUNS / f"{run_id}.json"

    def head_file(self, run_id: int, which: str) -> Path:
        """``runs/<run-id>.<which>.safetensors`` (which: initial or head)."""
        return self.cache_dir / RUNS / f"{run_id}.{which}.safetensors"

    def keep_head(
        self,
        run_id: int,
        which: str,
        names: Sequence[str],
        arrays: Sequence[np.ndarray],
        meta: Mapping[str, str],
    ) -> None:
        """Write one of the run's heads, with ``meta``, in place of the one kept before."""
        with atomic_writer(self.head_file(run_id, which)) as f:
            f.write(head_bytes(names, arrays, meta))

    def head(
        self, run_id: int, which: str, names: Sequence[str]
    ) -> tuple[list[np.ndarray], dict[str, str]] | None:
        """One of the run's heads and its metadata, or None when none is kept (or it
        does not read back as the tensors ``names``: logged)."""
        path = self.head_file(run_id, which)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="np") as f:
                meta = dict(f.metadata() or {})
                return [f.get_tensor(n) for n in names], meta
        except Exception as err:  # safetensors raises its own types for damaged files
            log.warning("ignoring %s: not a readable head (%s)", path, type(err).__name__)
            return None

    def model_dir(self, run_id: int) -> Path:
        return self.cache_dir / MODELS / str(run_id)

    def holds_model(self, run_id: int) -> bool:
        return (self.model_dir(run_id) / HEAD_FILE).is_file()

    def held_sha256(self, run_id: int) -> str:
        """The head sha256 of the model kept for ``run_id`` (from its record, else read
        from the package), or "" when it holds none or it does not read back."""
        if not self.holds_model(run_id):
            return ""
        run = self.run(run_id)
        if run is not None and run.model_sha256:
            return run.model_sha256
        return package_sha256(self.model_dir(run_id))

    # --- writing ----------------------------------------------------------------------
    def trained(self, run_id: int, spec: RunSpec, server_round: int, head_sha: str) -> None:
        """The site trains in ``server_round`` of ``run_id`` from the head ``head_sha``."""
        old = self.run(run_id)
        rounds = sorted({*(old.rounds if old else ()), server_round})
        proof = head_sha if old is None or server_round >= max(old.rounds, default=0) else old.proof
        self._write(
            TrainedRun(
                run_id,
                spec.to_dict(),
                tuple(rounds),
                proof,
                old.model_sha256 if old else "",
                time.time(),
            )
        )

    def kept(self, run_id: int, spec: RunSpec, model_sha256: str) -> None:
        """The run's model is kept (its head sha256 recorded beside the run)."""
        old = self.run(run_id)
        self._write(
            TrainedRun(
                run_id,
                spec.to_dict(),
                old.rounds if old else (),
                old.proof if old else "",
                model_sha256,
                time.time(),
            )
        )

    def _write(self, run: TrainedRun) -> None:
        with atomic_writer(self.run_file(run.run_id)) as f:
            f.write((json.dumps(run.to_json(), indent=2) + "\n").encode())

    # --- reading ----------------------------------------------------------------------
    def run(self, run_id: int) -> TrainedRun | None:
        """The record of ``run_id``, or None (none, or not readable: logged)."""
        path = self.run_file(run_id)
        if not path.is_file():
            return None
        try:
            return TrainedRun.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring %s: not a readable run record (%s)", path, err)
            return None

    def runs(self) -> list[TrainedRun]:
        """Every readable run record, newest first."""
        folder = self.cache_dir / RUNS
        if not folder.is_dir():
            return []
        found = []
        for path in folder.iterdir():
            m = _RUN_FILE.match(path.name)
            if m and (run := self.run(int(m.group(1)))) is not None:
                found.append(run)
        return sorted(found, key=lambda r: (r.updated, r.run_id), reverse=True)

    def missing(self) -> list[ModelRequest]:
        """Runs trained in without a kept model, newest first, at most
        ``MAX_MODEL_REQUESTS`` (the ones a site asks the server for)."""
        return [
            ModelRequest(r.run_id, r.proof)
            for r in self.runs()
            if r.proof and not self.holds_model(r.run_id)
        ][:MAX_MODEL_REQUESTS]

    def answer(self, offer: ModelOffer) -> ModelAnswer:
        """What this site says to an offered model: held, wanted, other or not-trained."""
        if self.holds_model(offer.run_id):
            same = self.held_sha256(offer.run_id) == offer.head_sha256
            return ModelAnswer(MODEL_HELD if same else MODEL_OTHER, "")
        run = self.run(offer.run_id)
        if run is None or not run.proof:
            return ModelAnswer(MODEL_NOT_TRAINED, "")
        return ModelAnswer(MODEL_WANTED, run.proof)


def package_sha256(folder: Path) -> str:
    """The head sha256 of the model package in ``folder`` ("" when it does not read back)."""
    from fedhead.common.errors import FedheadError
    from fedhead.common.heads import head_sha256
    from fedhead.common.package import ModelPackage

    try:
        pkg = ModelPackage.load(folder)
    except FedheadError as err:
        log.warning("%s: %s", folder, err)
        return ""
    names = pkg.architecture.trainable().names
    return head_sha256(names, [pkg.tensors[n] for n in names])
