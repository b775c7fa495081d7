"""The run folder: the one owner of everything a run keeps on disk.

    <out-dir>/
      status.json       RunState: running, finished or failed (with the reason), the
                        rounds done, the round in progress, the checkpoints, the model
      report.json       the run's report (``server.report.RunReport``)
      checkpoints/      round-NNNN.safetensors and index.json (``server.checkpoints``)
      model/            the final model package, beside the report
      deliveries.jsonl  every later delivery of the run's model to a site that missed it

The server writes it as the run goes, ``fedhead status`` reads it, and a later run
finds the finished runs beside its own (to deliver a model a site missed) through it.
Every file is replaced atomically: a reader sees the old or the new one, never a part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhead.common.files import append_line, atomic_writer, json_safe, read_json_object

DEFAULT_RUNS_DIR = "fedhead-runs"  # runs without an out-dir: ./fedhead-runs/run-<id>
RUNNING, FINISHED, FAILED = "running", "finished", "failed"


@dataclass(frozen=True)
class RunState:
    """``status.json``: where a run stands, rewritten whenever that changes."""

    run_id: int
    out_dir: str
    num_rounds: int
    state: str = RUNNING  # running, finished or failed
    reason: str = ""  # why it failed: "<error type>: <its one line>"
    rounds_done: int = 0  # the last round whose checkpoint was written
    round_running: int | None = None  # the round in progress, if any
    resumed_from: dict[str, Any] | None = None  # round, checkpoint and run id continued
    sites: int = 0  # sites that were prepared and take part
    # round -> sha256 of the global head after it: the heads sites trained from, which a
    # site names to prove it trained in the run when it asks for a model it missed
    round_heads: dict[str, str] = field(default_factory=dict)
    last_checkpoint: str = ""
    best_checkpoint: str = ""
    model_sha256: str = ""  # the final head, once the run finished
    report: str = ""  # report.json's path, once the run finished
    pid: int = field(default_factory=os.getpid)  # the server process writing it
    host: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.time)
    updated: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState | None:
        """The state a status.json holds; None when it is not one (a damaged or foreign
        file, or one without the fields every state has)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if not {"run_id", "out_dir", "num_rounds"} <= set(values):
            return None
        try:
            state = cls(**values)
        except TypeError:
            return None
        ints = (state.run_id, state.num_rounds, state.rounds_done, state.pid)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            return None
        if not isinstance(state.round_heads, dict):
            return None
        return state

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json_safe(dataclasses.asdict(self))
        return data

    def failed(self, err: BaseException) -> RunState:
        """This state once the run stopped with ``err`` (the reason: its one line)."""
        reason = str(err) or type(err).__name__
        return dataclasses.replace(
            self, state=FAILED, round_running=None, reason=f"{type(err).__name__}: {reason}"
        )


class RunDir:
    """One run's out-dir and the files in it (see the module docstring)."""

    STATUS = "status.json"
    REPORT = "report.json"
    CHECKPOINTS = "checkpoints"
    MODEL = "model"
    DELIVERIES = "deliveries.jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self._state: RunState | None = None  # what this process last wrote

    @classmethod
    def for_run(cls, out_dir: str, run_id: int) -> RunDir:
        """The run's out-dir: ``out_dir`` when set, else ./fedhead-runs/run-<id>."""
        return cls(
            Path(out_dir).expanduser() if out_dir else Path(DEFAULT_RUNS_DIR) / f"run-{run_id}"
        )

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths -------------------------------------------------------------------
    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def model_dir(self) -> Path:
        return self.path / self.MODEL

    # --- status.json -------------------------------------------------------------
    def read_state(self) -> RunState | None:
        """The state status.json holds (None: no run wrote one here)."""
        return RunState.from_json(read_json_object(self.path / self.STATUS))

    def begin(self, state: RunState) -> RunState:
        """A run starts writing here: its first state."""
        self._state = None
        return self.update(state)

    def update(self, base: RunState | None = None, /, **changes: Any) -> RunState:
        """Write ``base`` (default: the state last written) with ``changes``."""
        base = base or self._state
        if base is None:
            raise RuntimeError(f"{self}: no run state to update; call begin() first")
        new = dataclasses.replace(base, **changes, updated=time.time())
        with atomic_writer(self.path / self.STATUS) as f:
            f.write((json.dumps(new.to_json(), indent=2) + "\n").encode())
        self._state = new
        return new

    def failed(self, err: BaseException) -> None:
        """The run stopped with ``err``: status.json says so, with the reason."""
        if self._state is not None:
            self.update(self._state.failed(err))

    # --- report.json -------------------------------------------------------------
    def read_report(self) -> dict[str, Any]:
        """report.json as written ({} before the run finished)."""
        return read_json_object(self.report_path)

    def write_report(self, report: dict[str, Any]) -> Path:
        with atomic_writer(self.report_path) as f:
            f.write((json.dumps(report, indent=2) + "\n").encode())
        return self.report_path

    # --- deliveries.jsonl --------------------------------------------------------
    def record_delivery(self, entry: dict[str, Any]) -> None:
        """Append one later delivery of this run's model (one JSON line, whole)."""
        line = {"time": round(time.time(), 3), **entry}
        append_line(self.path / self.DELIVERIES, json.dumps(line, sort_keys=True), mode=0o644)

    def deliveries(self) -> list[dict[str, Any]]:
        path = self.path / self.DELIVERIES
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # --- the runs beside this one ----------------------------------------------------
    def siblings(self) -> Iterator[RunDir]:
        """The run folders beside this one (this one included), by name."""
        parent = self.path.parent
        if not parent.is_dir():
            return
        for path in sorted(parent.iterdir()):
            if path.is_dir():
                yield RunDir(path)
