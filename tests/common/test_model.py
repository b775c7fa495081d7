from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.errors import ModelMismatchError, WeightsError
from fedhead.common.model import FedHeadModel, TrainableSet, load_backbone

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
    torch.testing.assert_close(model.features[0][0].weight, src.features[0][0].weight)


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
    loss.backward()
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
