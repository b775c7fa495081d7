"""Checkpoints: atomic writes, pruning, loading, resuming from them, and refusing the
wrong model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError
from fedhead.common.rounds import RoundResult
from fedhead.server.checkpoints import (
    OPTIMIZER_PREFIX,
    RNG_NUMPY,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    RoundState,
    read_checkpoint,
)
from fedhead.server.optimizers import ServerOptimizer, ServerOptimizerSettings
from fedhead.server.privacy import PrivacyLedger
from fedhead.server.resume import check_resume, config_changes, config_fingerprint, load_resume
from fedhead.server.rundir import FINISHED, RunDir, RunState
from tests.server.conftest import CLASSES

NAMES = ["head.0.weight", "head.0.bias"]


def _arrays(value: float) -> list[np.ndarray]:
    return [np.full((2, 4), value, np.float32), np.full((2,), value, np.float32)]


def _meta(results: list[dict[str, object]]) -> dict[str, object]:
    return {"run_id": 7, "model": {"head": "linear"}, "privacy": None, "results": results}


def _save_rounds(store: CheckpointStore, accuracies: list[float]) -> None:
    results: list[dict[str, object]] = []
    for rnd, acc in enumerate(accuracies):
        results.append({"round": rnd, "eval_accuracy": acc})
        store.save(rnd, NAMES, _arrays(rnd), _meta(list(results)))


def test_keeps_the_newest_and_the_best_and_loads_the_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    _save_rounds(store, [0.5, 0.9, 0.6, 0.7, math.nan])
    assert sorted(store.rounds()) == [1, 3, 4]  # best (round 1) and the newest two
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    assert index["last"]["round"] == 4
    assert index["best"] == {
        "round": 1,
        "file": "round-0001.safetensors",
        "metric": "eval_accuracy",
        "value": 0.9,
    }
    last = store.load()
    assert last.round == 4 and last.names == NAMES
    assert all(np.array_equal(a, b) for a, b in zip(last.arrays, _arrays(4), strict=True))
    assert [r.round for r in last.results] == [0, 1, 2, 3, 4]
    assert math.isnan(last.results[4].eval_accuracy)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    _save_rounds(store, [0.5, 0.6, 0.7])
    newest = store.rounds()[2]
    data = bytearray(newest.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])["head/head.0.bias"]["data_offsets"]
    data[8 + header_len + start] ^= 0xFF  # a flipped byte in the head's values
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(newest)
    assert store.load().round == 1
    newest.write_bytes(bytes(data[: len(data) // 2]))  # cut off
    assert store.load().round == 1


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import numpy as np
from fedhead.server.checkpoints import CheckpointStore
store = CheckpointStore(Path(sys.argv[1]), keep=5)
names = ["w", "b"]
meta = {{"run_id": 1, "model": {{}}, "privacy": None, "results": [{{"round": 1}}]}}
store.save(1, names, [np.ones((3, 3), np.float32), np.ones(3, np.float32)], meta)
calls = []
real_fsync = os.fsync
def fsync_then_die(fd):
    calls.append(fd)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # the power goes out mid-write
    real_fsync(fd)
os.fsync = fsync_then_die
meta["results"] = [{{"round": 1}}, {{"round": 2}}]
store.save(2, names, [np.full((3, 3), 2, np.float32), np.full(3, 2, np.float32)], meta)
"""


# fsync 1: the new checkpoint's data (before its rename); 3: the index (the checkpoint
# file is complete and in place by then).
@pytest.mark.parametrize(("kill_at", "survivor"), [(1, 1), (3, 2)])
def test_a_process_killed_while_writing_leaves_a_valid_checkpoint(
    tmp_path: Path, kill_at: int, survivor: int
) -> None:
    folder = tmp_path / "ckpt"
    script = textwrap.dedent(_KILLED_WRITER.format(kill_at=kill_at))
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], timeout=120)
    assert proc.returncode == -9  # it really died mid-write
    store = CheckpointStore(folder, keep=5)
    ckpt = store.load()
    assert ckpt.round == survivor
    assert float(ckpt.arrays[0][0, 0]) == survivor
    if kill_at == 1:
        assert list(folder.glob(".round-0002*.part"))  # the torn write, never renamed
        store.save(2, ckpt.names, ckpt.arrays, ckpt.meta)  # the next save clears it
        assert not list(folder.glob("*.part"))
    json.loads((folder / "index.json").read_text())  # the index is whole either way


def _checkpointer(out: Path, cfg: RunConfig) -> Checkpointer:
    """The checkpoints of a run 7 writing to ``out`` (its status.json begun)."""
    run_dir = RunDir(out)
    run_dir.begin(RunState(7, str(out), cfg.num_server_rounds))
    meta = {"run_id": 7, "config": cfg.to_mapping(), "model": {}}
    return Checkpointer(run_dir, 2, NAMES, meta)


def _cfg(tmp: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "classes": CLASSES,
            "strategy": "fedavg",
            "num-server-rounds": 3,
            "out-dir": str(tmp),
            **overrides,
        }
    )


def test_an_out_dir_with_checkpoints_is_not_reused_without_resume(tmp_path: Path) -> None:
    _save_rounds(CheckpointStore(tmp_path / "checkpoints"), [0.5, 0.6])
    with pytest.raises(ConfigError, match="resume-from="):
        load_resume(_cfg(tmp_path), RunDir(tmp_path))
    here = RunDir(tmp_path)
    assert load_resume(_cfg(tmp_path, **{"resume-from": str(tmp_path)}), here) is not None
    with pytest.raises(ConfigError, match="no checkpoints"):
        load_resume(
            _cfg(tmp_path, **{"resume-from": str(tmp_path / "x")}), RunDir(tmp_path / "new")
        )
    earlier = str(tmp_path / "checkpoints" / "round-0000.safetensors")
    with pytest.raises(ConfigError, match="after round 0, which resuming there would replace"):
        load_resume(_cfg(tmp_path, **{"resume-from": earlier}), here)
    new = RunDir(tmp_path / "new")
    assert load_resume(_cfg(tmp_path, **{"resume-from": earlier}), new) is not None
    # its last round done: a run cut off before it finished is finished by resuming ...
    last = _cfg(tmp_path, **{"resume-from": str(tmp_path), "num-server-rounds": 1})
    assert load_resume(last, here) is not None
    # ... a run that finished is not: its model is there to deliver
    here.begin(RunState(7, str(tmp_path), 1, state=FINISHED))
    with pytest.raises(CheckpointError, match="deliver-from="):
        load_resume(last, here)


def test_other_settings_than_the_checkpoints_are_named(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"learning-rate": 0.05})
    meta = {**_meta([{"round": 1}]), "config": cfg.to_mapping()}
    meta["config_fingerprint"] = config_fingerprint(cfg)
    CheckpointStore(tmp_path).save(1, NAMES, _arrays(1), meta)
    ckpt = CheckpointStore(tmp_path).load()
    assert config_changes(ckpt, _cfg(tmp_path / "elsewhere", **{"learning-rate": 0.05})) == []
    assert config_changes(ckpt, _cfg(tmp_path)) == ["learning-rate: 0.05 -> 0.01"]


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    identity = {"backbone": "mobilenet_v2", "head": "linear", "input-size": 64}
    store.save(1, NAMES, _arrays(1), {**_meta([{"round": 1}]), "model": identity})
    ckpt = store.load()
    cfg = _cfg(tmp_path)
    check_resume(ckpt, identity, NAMES, cfg)
    with pytest.raises(CheckpointError, match="head='linear' but this run has head='mlp'") as err:
        check_resume(ckpt, {**identity, "head": "mlp"}, NAMES, cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="input-size=64 but this run has input-size=96"):
        check_resume(ckpt, {**identity, "input-size": 96}, NAMES, cfg)


def test_a_replayed_privacy_ledger_goes_on_from_the_same_epsilon(tmp_path: Path) -> None:
    whole = PrivacyLedger(1.0, 1.0, 1e-5, sites=3, sampled=3)
    eps = [whole.release() for _ in range(3)]
    cut = PrivacyLedger(1.0, 1.0, 1e-5, sites=3, sampled=3)
    for _ in range(2):
        cut.release()
    saved = CheckpointStore(tmp_path)
    saved.save(2, NAMES, _arrays(2), {**_meta([{"round": 2}]), "privacy": cut.checkpoint_state()})
    resumed = PrivacyLedger(1.0, 1.0, 1e-5, sites=3, sampled=3)
    resumed.resume(saved.load())
    assert resumed.epsilon() == pytest.approx(eps[1])
    assert resumed.release() == pytest.approx(eps[2])


def test_server_optimizer_state_is_saved_as_tensors_and_checked_on_reading(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, strategy="fedyogi")
    optimizer = ServerOptimizer(ServerOptimizerSettings("fedyogi", 0.01))
    optimizer.step([a * 0.1 for a in _arrays(1)])
    keeper = _checkpointer(tmp_path, cfg)
    keeper.round_trained(RoundResult(1), _arrays(1), RoundState(optimizer=optimizer))
    ckpt = keeper.store.load()
    assert ckpt.meta["server_optimizer"]["steps"] == 1 and ckpt.strategy == "fedyogi"
    assert sorted(ckpt.optimizer) == sorted(
        f"{OPTIMIZER_PREFIX}{slot}/{n}" for slot in ("m", "v") for n in NAMES
    )
    resumed = ServerOptimizer(ServerOptimizerSettings("fedyogi", 0.01))
    ckpt.restore_optimizer(resumed)
    for a, b in zip(resumed.v or [], optimizer.v or [], strict=True):
        np.testing.assert_array_equal(a, b)
    identity = ckpt.meta["model"]
    check_resume(ckpt, identity, NAMES, cfg)
    with pytest.raises(CheckpointError, match="strategy=fedyogi but this run has strategy=fedavg"):
        check_resume(ckpt, identity, NAMES, _cfg(tmp_path))
    with pytest.raises(CheckpointError, match="saved state is 'fedyogi'"):
        ckpt.restore_optimizer(ServerOptimizer(ServerOptimizerSettings("fedadam", 0.1)))

    # a checkpoint that lost one of its moment tensors is refused, naming it
    tensors = load_file(str(ckpt.path))
    del tensors[f"{OPTIMIZER_PREFIX}v/{NAMES[0]}"]
    with safe_open(str(ckpt.path), framework="numpy") as f:
        metadata = f.metadata()
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    with pytest.raises(CheckpointError, match="server-optimizer tensor 'server_optimizer/v/"):
        read_checkpoint(damaged)


def test_a_round_is_saved_when_trained_and_completed_when_its_evaluation_comes(
    tmp_path: Path,
) -> None:
    """The next round's training brings a round's evaluation: the head is saved before
    (a crash then loses no round), the evaluation is added to the same checkpoint after,
    with the random states of the moment the head was saved."""
    keeper = _checkpointer(tmp_path, _cfg(tmp_path))
    store = keeper.store
    keeper.round_trained(RoundResult(0), _arrays(0), RoundState())
    keeper.round_completed(RoundResult(0, eval_accuracy=0.5))
    keeper.round_started(1)
    keeper.round_trained(RoundResult(1), _arrays(1), RoundState())
    saved = store.load()
    status = tmp_path / "status.json"
    assert saved.round == 1 and math.isnan(saved.results[-1].eval_accuracy)
    assert json.loads(status.read_text())["rounds_done"] == 1
    keeper.round_started(2)
    np.random.random(5)  # the next round moves the random states on
    keeper.round_completed(RoundResult(1, eval_accuracy=0.75))
    done = store.load()
    assert [r.eval_accuracy for r in done.results] == [0.5, 0.75]
    np.testing.assert_array_equal(done.rng[RNG_NUMPY], saved.rng[RNG_NUMPY])
    assert done.meta["rng"] == saved.meta["rng"]
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["best"]["round"] == 1 and index["best"]["value"] == 0.75
    assert json.loads(status.read_text())["round_running"] == 2
