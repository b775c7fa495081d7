from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedhead.client.mods import audit_mod, delta_mod, describe_message, errors_mod, update_check_mod
from fedhead.client.site import Site
from fedhead.common.config import NodeConfig, RunConfig
from fedhead.common.errors import DataError, FedheadError, ModelMismatchError, WeightsError
from fedhead.common.model import FedHeadModel
from fedhead.common.protocol import WEIGHTS_MISMATCH, WEIGHTS_MISSING, WEIGHTS_OK, RunSpec
from fedhead.server.server_model import ServerModel, build_server_model, fit_settings, run_spec
from tests.conftest import round_settings
from tests.loopback import RUN_ID, set_task_identity


class ServerSide(NamedTuple):
    """What the server holds before a run: its config, model and the sites' run spec."""

    cfg: RunConfig
    sm: ServerModel
    spec: RunSpec


@pytest.fixture
def server_side(mobilenet_weights: Path) -> ServerSide:
    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 32, "seed": 1})
    sm = build_server_model(cfg)
    return ServerSide(cfg, sm, run_spec(cfg, sm))


def make_site(tmp: Path, spec: RunSpec, data: Path) -> Site:
    return Site(
        NodeConfig.from_mapping({"data-path": str(data), "cache-dir": str(tmp / "c")}), spec
    )


def test_weights_status_and_verified_install(
    tmp_path: Path,
    server_side: ServerSide,
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch"))
    _, sm, spec = server_side
    site = make_site(tmp_path, spec, image_folder)
    assert site.weights_status() == WEIGHTS_MISSING
    good = sm.weights_path.read_bytes()
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0xFF  # one flipped byte
    with pytest.raises(WeightsError, match="refusing"):
        site.install_weights(bytes(altered))
    assert site.weights_status() == WEIGHTS_MISSING  # nothing was stored
    site.install_weights(good)
    assert site.weights_status() == WEIGHTS_OK
    cached = tmp_path / "c" / "weights" / spec.weights_file
    cached.write_bytes(bytes(altered))
    assert site.weights_status() == WEIGHTS_MISMATCH


def test_train_evaluate_and_reject_foreign_heads(
    tmp_path: Path, server_side: ServerSide, image_folder: Path
) -> None:
    cfg, sm, spec = server_side
    site = make_site(tmp_path, spec, image_folder)
    initial = sm.trainable.get(sm.model)
    out = site.train(initial, fit_settings(cfg, sm.trainable))
    assert out.result.examples == len(site.data().train)
    assert [a.shape for a in out.arrays] == [a.shape for a in initial]
    assert not all(np.array_equal(a, b) for a, b in zip(out.arrays, initial, strict=True))
    assert site.evaluate(out.arrays).examples == len(site.data().val)
    with pytest.raises(ModelMismatchError, match="do not match"):
        site.evaluate([np.zeros((3, 1280), np.float32), np.zeros(3, np.float32)])


def test_a_site_whose_images_are_all_unreadable_refuses_to_train(
    tmp_path: Path,
    server_side: ServerSide,
) -> None:
    cfg, sm, spec = server_side
    for cls in ("normal", "pneumonia"):
        for i in range(3):
            p = tmp_path / "d" / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not an image")
    site = make_site(tmp_path, spec, tmp_path / "d")
    with pytest.raises(DataError, match=r"no usable training images .* \(4 unreadable\)"):
        site.train(sm.trainable.get(sm.model), fit_settings(cfg, sm.trainable))


def test_some_unreadable_images_are_skipped_and_counted(
    tmp_path: Path,
    server_side: ServerSide,
    image_folder: Path,
) -> None:
    cfg, sm, spec = server_side
    broken = sorted((image_folder / "normal").iterdir())[:2]
    for p in broken:
        p.write_bytes(b"truncated")
    site = make_site(tmp_path, spec, image_folder)
    out = site.train(sm.trainable.get(sm.model), fit_settings(cfg, sm.trainable))
    train_n = len(site.data().train)
    in_train = sum(
        1 for i in range(train_n) if Path(site.data().train.images.describe(i)) in broken
    )
    assert in_train >= 1 and out.extraction.skipped == in_train
    assert out.result.examples == train_n - in_train


# --- mods ---------------------------------------------------------------------------
def _train_msg(
    arrays: list[np.ndarray], max_norm: float = 0.0, clipping_range: float = 0.0
) -> Message:
    set_task_identity()
    settings = round_settings(max_update_norm=max_norm, clipping_range=clipping_range)
    fitins = FitIns(ndarrays_to_parameters(arrays), settings.to_config())
    content = compat.fitins_to_recorddict(fitins, True)
    return Message(content=content, dst_node_id=5, message_type="train", group_id="1")


def _ctx(**node_config: str) -> Context:
    return Context(RUN_ID, 5, node_config=dict(node_config), state=RecordDict(), run_config={})


def _trainer(result: list[np.ndarray]) -> ClientAppCallable:
    def handler(msg: Message, ctx: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(result), 7, {"train-loss": 0.5})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    return handler


def test_delta_mod_sends_the_change_from_the_global_tensors() -> None:
    glob = [np.full((2, 2), 1.0, np.float32)]
    reply = delta_mod(_train_msg(glob), _ctx(), _trainer([np.full((2, 2), 1.25, np.float32)]))
    sent = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, False).parameters)
    assert np.allclose(sent[0], 0.25) and sent[0].dtype == np.float32


def test_update_check_mod_refuses_to_send_nan() -> None:
    bad = [np.array([1.0, np.nan], np.float32)]
    with pytest.raises(FedheadError, match="non-finite"):
        update_check_mod(_train_msg(bad), _ctx(), _trainer(bad))


def test_update_check_mod_enforces_the_norm_bound_and_the_secagg_range() -> None:
    update = [np.array([3.0, 4.0], np.float32)]  # L2 norm 5, largest value 4
    reply = update_check_mod(_train_msg(update, 5.0, 4.0), _ctx(), _trainer(update))
    assert not reply.has_error()
    with pytest.raises(FedheadError, match="max-update-norm"):
        update_check_mod(_train_msg(update, max_norm=4.9), _ctx(), _trainer(update))
    with pytest.raises(FedheadError, match="clipping range"):
        update_check_mod(_train_msg(update, clipping_range=3.5), _ctx(), _trainer(update))


def test_secagg_key_exchange_messages_are_not_counted_as_training() -> None:
    from fedhead.client.mods import message_kind

    msg = _train_msg([np.zeros(1, np.float32)])
    assert message_kind(msg) == "train"  # plain FedAvg
    for stage, kind in (
        ("setup", "secagg_setup"),
        ("share_keys", "secagg_share_keys"),
        ("collect_masked_vectors", "train"),  # the stage that trains
        ("unmask", "secagg_unmask"),
    ):
        msg.content.config_records["secaggplus_configs"] = ConfigRecord({"stage": stage})
        assert message_kind(msg) == kind


def test_errors_mod_replies_with_the_problem_kind_only() -> None:
    def failing(msg: Message, ctx: Context) -> Message:
        raise DataError("data path /secret/site/data does not exist")

    reply = errors_mod(_train_msg([np.zeros(1, np.float32)]), _ctx(), failing)
    assert reply.has_error() and "/secret" not in (reply.error.reason or "")
    assert reply.error.code == 1000 + DataError.exit_code

    def crashing(msg: Message, ctx: Context) -> Message:
        open("/secret/site/scan-0001.png")  # noqa: SIM115 - fails with the path in its text
        raise AssertionError("unreachable")

    reply = errors_mod(_train_msg([np.zeros(1, np.float32)]), _ctx(), crashing)
    assert reply.error.reason == "FileNotFoundError: unexpected error (details in the site's log)"


def test_audit_mod_records_what_leaves(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "sent.jsonl"
    arrays = [np.zeros((2, 3), np.float32)]
    audit_mod(_train_msg(arrays), _ctx(**{"audit-log": str(log)}), _trainer(arrays))
    entry = json.loads(log.read_text().splitlines()[0])
    assert entry["message_type"] == "train"
    tensor = entry["arrays"]["fitres.parameters"]["0"]
    assert tensor["shape"] == [2, 3] and tensor["dtype"] == "float32"
    assert entry["metrics"]["fitres.num_examples"] == {"num_examples": 7}
    assert entry["configs"]["fitres.metrics"] == {"train-loss": 0.5}


def test_describe_message_hides_bytes_values() -> None:
    set_task_identity()
    msg = Message(
        RecordDict({"c": ConfigRecord({"k": b"secret-key-material"})}),
        dst_node_id=1,
        message_type="query.x",
    )
    assert describe_message(msg)["configs"]["c"]["k"] == {"type": "bytes", "len": 19}


def test_weights_missing_everywhere_is_a_weights_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    cfg = RunConfig.from_mapping({"classes": "a,b", "backbone": "resnet18"})
    with pytest.raises(WeightsError, match="fedhead weights install resnet18"):
        build_server_model(cfg)


def test_augmented_views_are_cached_and_used_in_training(
    tmp_path: Path, mobilenet_weights: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig.from_mapping(
        {"classes": "normal,pneumonia", "input-size": 32, "augment-views": 2}
    )
    sm = build_server_model(cfg)
    spec = run_spec(cfg, sm)
    site = make_site(tmp_path, spec, image_folder)
    feats, labels, _ = site.features("train")
    assert feats.shape == (3, len(labels), 1280)  # the image and two augmented views
    assert not torch.equal(feats[0], feats[1]) and not torch.equal(feats[1], feats[2])
    out = site.train(sm.trainable.get(sm.model), fit_settings(cfg, sm.trainable))
    assert out.result.examples == len(labels)
    again = make_site(tmp_path, spec, image_folder)  # a new message, a new process

    def no_trunk(*_: object) -> None:
        raise AssertionError("the trunk ran although every view is cached")

    monkeypatch.setattr(FedHeadModel, "extract", no_trunk)
    cached, _, _ = again.features("train")
    torch.testing.assert_close(cached, feats)


def test_a_delivered_model_is_verified_kept_once_and_never_replaced(
    tmp_path: Path, server_side: ServerSide, image_folder: Path
) -> None:
    import hashlib

    from fedhead.common.errors import PackageError
    from fedhead.common.package import ModelPackage, TrainingSummary, package_from_run
    from fedhead.server.delivery import describe_model
    from tests.packages import CARD

    cfg, sm, spec = server_side
    site = make_site(tmp_path, spec, image_folder)
    names, head = sm.trainable.names, sm.trainable.get(sm.model)
    description = describe_model(spec, RUN_ID, 3, names, head)

    def files(arrays: list[np.ndarray], tag: str) -> dict[str, bytes]:
        """The package files a server writes for these final tensors."""
        summary = TrainingSummary(run_id=RUN_ID, rounds=3, sites=2, examples=40)
        pkg = package_from_run(cfg, sm.model, arrays, summary, {})
        folder = pkg.write(tmp_path / f"server-{tag}", card=CARD)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    good = files(head, "good")
    foreign = {
        **good,
        "model.json": good["model.json"].replace(spec.weights_sha256.encode(), b"0" * 64),
    }
    with pytest.raises(ModelMismatchError, match="backbone sha256"):
        site.keep_model(RUN_ID, description, foreign)
    with pytest.raises(ModelMismatchError, match="described as"):
        site.keep_model(RUN_ID, description, files([a + 1 for a in head], "tampered"))
    damaged = bytearray(good["head.safetensors"])
    damaged[-1] ^= 1
    with pytest.raises(PackageError):
        site.keep_model(RUN_ID, description, {**good, "head.safetensors": bytes(damaged)})
    with pytest.raises(ModelMismatchError, match=r"expected model\.json"):
        site.keep_model(RUN_ID, description, {"head.safetensors": good["head.safetensors"]})
    assert not list((tmp_path / "c").glob("models/*"))  # nothing kept from those

    kept, sha = site.keep_model(RUN_ID, description, good)
    assert kept == tmp_path / "c" / "models" / str(RUN_ID)
    assert sha == description.head_sha256
    assert hashlib.sha256((kept / "head.safetensors").read_bytes()).hexdigest() == sha
    assert list(ModelPackage.load(kept).classes) == ["normal", "pneumonia"]  # a usable package
    assert site.keep_model(RUN_ID, description, good) == (kept, sha)  # the same again: fine
    other = [a * 2 for a in head]
    with pytest.raises(ModelMismatchError, match="nothing was overwritten"):
        site.keep_model(RUN_ID, describe_model(spec, RUN_ID, 3, names, other), files(other, "o"))
    assert hashlib.sha256((kept / "head.safetensors").read_bytes()).hexdigest() == sha


def test_with_cached_features_a_site_trains_the_head_without_building_the_trunk(
    tmp_path: Path, server_side: ServerSide, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedhead.client.site as site_module

    cfg, sm, spec = server_side
    settings = fit_settings(cfg, sm.trainable)
    initial = sm.trainable.get(sm.model)
    first = make_site(tmp_path, spec, image_folder)
    with_trunk = first.train(initial, settings)  # extracts and caches the features
    assert first.evaluate(with_trunk.arrays).examples == len(first.data().val)

    def no_trunk(*_: object) -> None:
        raise AssertionError("the trunk was built although every feature is cached")

    monkeypatch.setattr(site_module, "_shared_model", no_trunk)
    again = make_site(tmp_path, spec, image_folder)  # a new message, a new process
    head_only = again.train(initial, settings)
    assert head_only.extraction.cache_misses == 0
    for a, b in zip(head_only.arrays, with_trunk.arrays, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert again.evaluate(head_only.arrays) == first.evaluate(with_trunk.arrays)
    assert not again.trained_model().has_trunk


def _runs_in_a_fresh_process(code: str) -> None:
    """``code``'s assertions hold in a fresh Python, as in a per-message ClientApp."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_client_app_imports_no_torch_until_a_message_needs_it() -> None:
    _runs_in_a_fresh_process(
        "import sys, fedhead.client.app\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "import fedhead.client.site\n"
        "assert 'torchvision' not in sys.modules, 'torchvision'\n"
        # a site counts the tables the server pools; scikit-learn is the server's
        "assert 'sklearn' not in sys.modules, 'sklearn'\n"
    )


def test_a_train_message_handed_to_the_worker_imports_no_torch_on_its_way_out() -> None:
    """With the node's warm worker doing the training, the per-message process runs only
    the mods around it (update checks, delta, masking): none of them imports torch."""
    _runs_in_a_fresh_process(
        "import sys\n"
        "import numpy as np\n"
        "from flwr.app import Message, RecordDict\n"
        "from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters\n"
        "from flwr.compat.common import recorddict_compat as compat\n"
        "from fedhead.client.mods import delta_mod, update_check_mod\n"
        "from fedhead.common.protocol import FitSettings\n"
        "from tests.loopback import set_task_identity\n"
        "set_task_identity()\n"
        "settings = FitSettings(1, 1, 8, 0.1, 'sgd', 0.0, 0.0, 0.1, 0, 'x', 10.0, 8.0, False, 9)\n"
        "head = [np.zeros((2, 4), np.float32), np.zeros(2, np.float32)]\n"
        "ins = FitIns(ndarrays_to_parameters(head), settings.to_config())\n"
        "msg = Message(compat.fitins_to_recorddict(ins, True), dst_node_id=1, "
        "message_type='train')\n"
        "def worker(m, c):\n"
        "    trained = ndarrays_to_parameters([a + 1 for a in head])\n"
        "    res = FitRes(Status(Code.OK, 'ok'), trained, 8, {})\n"
        "    return Message(compat.fitres_to_recorddict(res, False), reply_to=m)\n"
        "reply = update_check_mod(msg, None, lambda m, c: delta_mod(m, c, worker))\n"
        "assert not reply.has_error()\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
    )
