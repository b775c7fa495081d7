from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.config import RunConfig
from fedhead.common.errors import ModelMismatchError, WeightsError
from fedhead.common.model import FedHeadModel, TrainableSet, initial_trainable, load_backbone

SPEC = get_spec("mobilenet_v2")


def test_real_weights_load_and_match_torchvision(mobilenet_weights: Path) -> None:
    model = load_backbone(SPEC, mobilenet_weights)
    reference = torch.load(mobilenet_weights, weights_only=True)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert len(trunk) == len(reference) - 2  # everything but the ImageNet classifier
    for key, value in trunk.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_custom_checkpoint_with_another_head_and_wrappers_loads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = SPEC.build()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.classifier.1.weight"] = torch.zeros(14, 1280)  # fine-tuned for 14 classes
    sd["module.classifier.1.bias"] = torch.zeros(14)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd}, path)
    model = load_backbone(SPEC, path)
    first = "features.0.0.weight"
    torch.testing.assert_close(model.get_parameter(first), src.get_parameter(first))


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(get_spec("resnet18").build().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit architecture mobilenet_v2"):
        load_backbone(SPEC, path)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable"):
        load_backbone(SPEC, path)


@pytest.fixture
def model() -> FedHeadModel:
    torch.manual_seed(0)
    return FedHeadModel(SPEC, SPEC.build(), num_classes=2, unfreeze_blocks=1)


def test_batchnorm_statistics_stay_frozen_in_training(model: FedHeadModel) -> None:
    model.train(True)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.forward_from_features(model.extract(torch.randn(4, 3, 32, 32)))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_only_trainable_tensors_get_gradients(model: FedHeadModel) -> None:
    model.train(True)
    loss = model.forward_from_features(model.extract(torch.randn(2, 3, 32, 32))).sum()
    loss.backward()  # type: ignore[no-untyped-call]
    names = set(TrainableSet.of(model).names)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name


def test_trainable_set_roundtrip_and_fingerprint(model: FedHeadModel) -> None:
    ts = TrainableSet.of(model)
    arrays = [np.full(t.shape, 0.5, dtype=t.dtype) for t in ts.tensors]
    ts.set(model, arrays)
    assert all(np.array_equal(a, b) for a, b in zip(ts.get(model), arrays, strict=True))
    other = FedHeadModel(SPEC, SPEC.build(), num_classes=3)
    assert TrainableSet.of(other).fingerprint() != ts.fingerprint()
    assert ts.nbytes == 4 * ts.num_params


def test_mismatching_payload_is_refused_with_names(model: FedHeadModel) -> None:
    ts = TrainableSet.of(model)
    arrays = ts.get(model)
    with pytest.raises(ModelMismatchError, match="expected"):
        ts.set(model, arrays[:-1])
    bad = [*arrays[:-1], np.zeros((7,), np.float32)]
    with pytest.raises(ModelMismatchError, match=ts.names[-1]):
        ts.set(model, bad)
    wrong_dtype = [a.astype(np.float64) for a in arrays]
    assert any("dtype" in p for p in ts.problems(wrong_dtype))


# --- the initial head ----------------------------------------------------------------
def _head(seed: int, head: str = "linear", **kw: object) -> list[np.ndarray]:
    cfg = RunConfig.from_mapping({"classes": "a,b,c", "seed": seed, "head": head, **kw})
    return initial_trainable(SPEC, None, cfg)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_the_initial_head_is_a_function_of_the_seed_and_architecture_only(head: str) -> None:
    """Whatever drew from torch's generator before (the server builds the trunk first),
    the head is the same for the same seed, and another for another seed."""
    first = _head(7, head, **{"head-hidden": 16})
    torch.manual_seed(12345)
    torch.rand(1000)  # a trunk's construction, say
    again = _head(7, head, **{"head-hidden": 16})
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = _head(8, head, **{"head-hidden": 16})
    assert not np.array_equal(first[0], other[0])


def test_the_initial_head_has_torchs_default_distribution() -> None:
    weight, bias = _head(0)
    bound = 1 / np.sqrt(SPEC.feature_dim)
    assert weight.shape == (3, SPEC.feature_dim) and weight.dtype == np.float32
    assert np.abs(weight).max() <= bound and np.abs(bias).max() <= bound
    # uniform on +-bound: standard deviation bound / sqrt(3)
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_the_server_and_a_site_start_from_the_same_head(mobilenet_weights: Path) -> None:
    """The server builds the whole model (its trunk drawing random numbers first); a
    site builds the head alone: they agree, with and without an unfrozen block."""
    from fedhead.server.server_model import build_server_model

    for blocks in (0, 1):
        cfg = RunConfig.from_mapping(
            {"classes": "a,b", "seed": 3, "unfreeze-blocks": blocks, "input-size": 32}
        )
        sm = build_server_model(cfg)
        backbone = load_backbone(SPEC, mobilenet_weights) if blocks else None
        site = initial_trainable(SPEC, backbone, cfg)
        for a, b in zip(sm.trainable.get(sm.model), site, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_trainable_set_round_trips_through_json() -> None:
    model = FedHeadModel(SPEC, None, num_classes=2, head="mlp", hidden=8)
    trainable = TrainableSet.of(model)
    assert TrainableSet.from_json(trainable.to_json()) == trainable
    with pytest.raises(ValueError, match="not a trainable set"):
        TrainableSet.from_json('[["a", "x", "float32"]]')
