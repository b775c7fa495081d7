"""Registry tests, run over every registered backbone (random weights: no downloads)."""

from __future__ import annotations

import pytest
import torch

from fedhead.common.backbones import BackboneSpec, backbone_names, get_spec, register
from fedhead.common.errors import UnknownBackboneError
from fedhead.common.model import FedHeadModel, TrainableSet, count_params

REQUIRED = {"mobilenet_v2", "resnet18", "resnet50", "efficientnet_b0", "vit_b_16"}


def test_required_backbones_are_registered() -> None:
    assert set(backbone_names()) >= REQUIRED


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBackboneError) as err:
        get_spec("resnet9000")
    for name in REQUIRED:
        assert name in str(err.value)


def test_register_refuses_a_sha256_that_does_not_match_the_file_name() -> None:
    spec = get_spec("resnet18")
    bad = BackboneSpec(**{**spec.__dict__, "name": "resnet18-bad", "sha256": "0" * 64})
    with pytest.raises(ValueError, match="hash suffix"):
        register(bad)


@pytest.mark.parametrize("name", backbone_names())
def test_spec_metadata_is_consistent(name: str) -> None:
    spec = get_spec(name)
    assert spec.weights_file.endswith(".pth")
    assert spec.weights_file.rsplit("-", 1)[1].startswith(spec.sha256[:8])
    assert spec.url.endswith(spec.weights_file)
    assert len(spec.mean) == len(spec.std) == 3


@pytest.fixture(scope="module", params=backbone_names())
def built(request: pytest.FixtureRequest) -> tuple[BackboneSpec, torch.nn.Module]:
    spec = get_spec(request.param)
    torch.manual_seed(0)
    return spec, spec.build()


def test_trunk_blocks_reproduce_the_torchvision_features(
    built: tuple[BackboneSpec, torch.nn.Module],
) -> None:
    """Blocks + pool compute the same features torchvision's model feeds its classifier."""
    spec, backbone = built
    backbone.eval()
    split = spec.trunk_blocks(backbone)
    x = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        z = x
        for block in split.blocks:
            z = block(z)
        feats = split.pool(z)
        head = getattr(backbone, spec.head_module)
        ours = head(feats)
        theirs = backbone(x)
    assert feats.shape == (2, spec.feature_dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_trainable_set_is_the_head_and_only_the_head(
    built: tuple[BackboneSpec, torch.nn.Module],
) -> None:
    spec, backbone = built
    model = FedHeadModel(spec, backbone, num_classes=3)
    ts = TrainableSet.of(model)
    assert all(name.startswith("head.") for name in ts.names)
    assert ts.num_params == spec.feature_dim * 3 + 3
    assert count_params(model.head) == ts.num_params
    frozen = [p for p in model.frozen.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_unfrozen_blocks_join_the_trainable_set(
    built: tuple[BackboneSpec, torch.nn.Module],
) -> None:
    spec, backbone = built
    model = FedHeadModel(spec, backbone, num_classes=2, head="mlp", hidden=16, unfreeze_blocks=1)
    ts = TrainableSet.of(model)
    tuned = [n for n in ts.names if n.startswith("tuned.")]
    assert tuned, "the last trunk block should be trainable"
    assert {n.split(".")[0] for n in ts.names} == {"head", "tuned"}
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    z = model.extract(x)
    assert model.forward_from_features(z).shape == (1, 2)


def test_too_many_unfrozen_blocks_is_refused() -> None:
    spec = get_spec("resnet18")
    with pytest.raises(ValueError, match="unfreeze_blocks"):
        FedHeadModel(spec, spec.build(), num_classes=2, unfreeze_blocks=99)
