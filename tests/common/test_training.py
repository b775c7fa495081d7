from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.device import select_device
from fedhead.common.model import FedHeadModel, TrainableSet
from fedhead.common.partition import dirichlet_partition, iid_partition
from fedhead.common.training import (
    TrainParams,
    evaluate_head,
    proximal_term,
    round_seed,
    scheduled_lr,
    train_head,
)
from tests.conftest import round_settings

SPEC = get_spec("mobilenet_v2")
CPU = select_device("cpu")


@pytest.fixture
def model() -> FedHeadModel:
    torch.manual_seed(0)
    return FedHeadModel(SPEC, SPEC.build(), num_classes=2)


def _blobs(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1280, generator=g) * 0.5
    x[:, :10] += (y[:, None].float() * 2 - 1) * 1.5  # separable along 10 features
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_learns_a_separable_problem(model: FedHeadModel, optimizer: str) -> None:
    x, y = _blobs()
    before = evaluate_head(model, x, y, CPU)
    result = train_head(model, x, y, TrainParams(5, 32, 0.01, optimizer), CPU)
    after = evaluate_head(model, x, y, CPU)
    assert result.examples == 200 and result.steps == 5 * math.ceil(200 / 32)
    assert after.loss < before.loss / 2 and after.accuracy > 0.95


def test_training_changes_only_the_trainable_tensors(model: FedHeadModel) -> None:
    trunk_before = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    x, y = _blobs(64)
    train_head(model, x, y, TrainParams(1, 16, 0.1), CPU)
    for k, v in model.frozen.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k


def test_training_is_deterministic_for_a_seed(model: FedHeadModel) -> None:
    ts = TrainableSet.of(model)
    start = ts.get(model)
    x, y = _blobs(64)
    train_head(model, x, y, TrainParams(2, 16, 0.1, seed=7), CPU)
    first = ts.get(model)
    ts.set(model, start)
    train_head(model, x, y, TrainParams(2, 16, 0.1, seed=7), CPU)
    assert all(np.array_equal(a, b) for a, b in zip(first, ts.get(model), strict=True))


def test_evaluate_empty_gives_nan(model: FedHeadModel) -> None:
    res = evaluate_head(model, torch.empty(0, 1280), torch.empty(0, dtype=torch.long), CPU)
    assert res.examples == 0 and math.isnan(res.accuracy)


def test_cosine_schedule() -> None:
    lrs = [scheduled_lr(0.1, r, 10, "cosine") for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] > 0
    assert scheduled_lr(0.1, 7, 10, "constant") == 0.1


def test_dirichlet_partition_covers_everything_once_and_is_skewed() -> None:
    labels = np.repeat([0, 1], 500)
    parts = dirichlet_partition(labels, 4, alpha=0.3, seed=1)
    merged = np.sort(np.concatenate(parts))
    assert np.array_equal(merged, np.arange(1000))
    shares = [labels[p].mean() for p in parts]
    assert max(shares) - min(shares) > 0.3  # label mixes differ between sites
    assert parts[0].tolist() == dirichlet_partition(labels, 4, 0.3, seed=1)[0].tolist()


def test_partition_errors() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(100), 2, alpha=0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(np.zeros(15), 2, alpha=1)
    parts = iid_partition(10, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_pulls_back() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    anchor = torch.tensor([0.0, -1.0, 0.5])
    term = proximal_term([w], [anchor], mu=0.4)
    assert float(term.detach()) == pytest.approx(0.2 * (1.0 + 1.0 + 0.0))
    term.backward()  # type: ignore[no-untyped-call]
    assert w.grad is not None
    # d/dw (mu/2)||w - a||^2 = mu (w - a): a gradient step moves w toward the anchor
    np.testing.assert_allclose(w.grad.numpy(), 0.4 * np.array([1.0, -1.0, 0.0]), rtol=1e-6)


def _distance_after_training(model: FedHeadModel, mu: float) -> float:
    ts = TrainableSet.of(model)
    start = ts.get(model)
    x, y = _blobs(128)
    train_head(model, x, y, TrainParams(5, 16, 0.1, seed=1, proximal_mu=mu), CPU)
    moved = ts.get(model)
    ts.set(model, start)
    return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(moved, start, strict=True)))


def test_fedprox_keeps_the_trained_head_closer_to_the_global_one(model: FedHeadModel) -> None:
    plain = _distance_after_training(model, 0.0)
    prox = _distance_after_training(model, 1.0)
    strong = _distance_after_training(model, 10.0)
    assert strong < prox < plain


def test_train_params_refuse_a_bad_proximal_mu() -> None:
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="proximal_mu"):
            TrainParams(1, 16, 0.1, proximal_mu=bad)


def test_a_rounds_training_follows_the_run_settings_and_its_round_seed() -> None:
    settings = round_settings(batch_size=16, optimizer="adam", momentum=0.5, seed=3)
    params = TrainParams.of_run(settings, 2, 0.05, 4, proximal_mu=0.1)
    assert (params.epochs, params.batch_size, params.lr, params.proximal_mu) == (2, 16, 0.05, 0.1)
    assert (params.optimizer, params.momentum, params.tuned_lr_scale) == ("adam", 0.5, 0.1)
    assert params.seed == round_seed(3, 4) != round_seed(3, 5)
