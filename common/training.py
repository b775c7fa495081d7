"""Local training and evaluation of the trainable part on cached trunk features."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedhead.common.device import Device
from fedhead.common.model import FedHeadModel

if TYPE_CHECKING:
    from fedhead.common.protocol import FitSettings


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    tuned_lr_scale: float = 0.1
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx: weight of (mu/2)*||w - w_start||^2; 0 = plain training

    def __post_init__(self) -> None:
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be finite and >= 0, got {self.proximal_mu}")

    @classmethod
    def of_run(
        cls, settings: FitSettings, epochs: int, lr: float, rnd: int, proximal_mu: float = 0.0
    ) -> TrainParams:
        """A run's optimiser settings for ``epochs`` of training in round ``rnd`` at
        ``lr``, seeded as every site is for that round."""
        return cls(
            epochs=epochs,
            batch_size=settings.batch_size,
            lr=lr,
            optimizer=settings.optimizer,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            tuned_lr_scale=settings.unfreeze_lr_scale,
            seed=round_seed(settings.seed, rnd),
            proximal_mu=proximal_mu,
        )


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the last epoch
    examples: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    examples: int


def round_seed(seed: int, server_round: int) -> int:
    """The local-training seed of one round: the same on every site and in the demo's
    centralized baseline, different in every round."""
    return seed * 100_003 + server_round


def scheduled_lr(base: float, server_round: int, num_rounds: int, schedule: str) -> float:
    """Learning rate for a round: constant, or cosine-decayed from ``base`` over the run.

    Decay matters in federated training: with a constant rate, sites with skewed label
    mixes pull the head back and forth and the final round's accuracy oscillates.
    """
    if schedule == "constant" or num_rounds <= 1:
        return base
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / num_rounds))
    raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")


def _optimizer(model: FedHeadModel, p: TrainParams) -> torch.optim.Optimizer:
    groups = model.param_groups(p.lr, p.tuned_lr_scale)
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    if p.optimizer == "adam":
        return torch.optim.Adam(groups, lr=p.lr, weight_decay=p.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', not {p.optimizer!r}")


def _trainable_to(model: FedHeadModel, device: Device) -> None:
    model.tuned.to(device.torch_device)
    model.pool.to(device.torch_device)
    model.head.to(device.torch_device)


def _autocast(model: FedHeadModel, device: Device) -> contextlib.AbstractContextManager[None]:
    # Mixed precision only pays off when trunk blocks are trained; a head is tiny.
    if model.unfreeze_blocks and device.amp_dtype is not None:
        return device.autocast()
    return contextlib.nullcontext()


def proximal_term(
    params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu/2) * ||w - w_global||^2 over the trained tensors (Li et al. 2020)."""
    total = sum(((p.float() - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return (mu / 2) * torch.as_tensor(total)


def train_head(
    model: FedHeadModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    params: TrainParams,
    device: Device,
    views: bool = False,
) -> TrainResult:
    """Train the head (and unfrozen blocks) for ``params.epochs`` over the features.

    With ``views``, ``features`` has a leading dimension of cached views per example
    (the image and its augmented views): every batch takes one at random per example.
    With ``params.proximal_mu > 0`` (FedProx) the loss gains (mu/2)*||w - w_start||^2
    over the trained tensors, which keeps them near the global ones they started from;
    the reported loss stays the cross-entropy.
    """
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training examples")
    t0 = time.perf_counter()
    _trainable_to(model, device)
    model.train(True)
    opt = _optimizer(model, params)
    trained = [p for g in opt.param_groups for p in g["params"]]
    anchor = [p.detach().float().clone() for p in trained] if params.proximal_mu > 0 else []
    scaler = torch.amp.GradScaler(enabled=device.amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(params.seed)
    x_all = features.to(device.torch_device)
    y_all = labels.to(device.torch_device)
    steps, last_epoch_loss = 0, math.nan
    for _ in range(params.epochs):
        total, seen = 0.0, 0
        order = torch.randperm(n, generator=gen).to(device.torch_device)
        for start in range(0, n, params.batch_size):
            idx = order[start : start + params.batch_size]
            if views:
                pick = torch.randint(x_all.shape[0], (len(idx),), generator=gen)
                x = x_all[pick.to(device.torch_device), idx]
            else:
                x = x_all[idx]
            with _autocast(model, device):
                loss = F.cross_entropy(model.forward_from_features(x), y_all[idx])
            objective = loss
            if anchor:
                objective = loss + proximal_term(trained, anchor, params.proximal_mu)
            opt.zero_grad(set_to_none=True)
            scaled: torch.Tensor = scaler.scale(objective)
            scaled.backward()  # type: ignore[no-untyped-call]
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
        last_epoch_loss = total / seen
    model.train(False)
    return TrainResult(last_epoch_loss, n, steps, time.perf_counter() - t0)


@torch.no_grad()
def evaluate_head(
    model: FedHeadModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    device: Device,
    batch_size: int = 1024,
) -> EvalResult:
    """Mean cross-entropy and accuracy of the model on the features."""
    n = int(labels.shape[0])
    if n == 0:
        return EvalResult(math.nan, math.nan, 0)
    logits = head_logits(model, features, device, batch_size)
    y = labels.to(logits.device)
    loss = float(F.cross_entropy(logits, y, reduction="sum"))
    correct = int((logits.argmax(1) == y).sum())
    return EvalResult(loss / n, correct / n, n)


@torch.no_grad()
def head_logits(
    model: FedHeadModel, features: torch.Tensor, device: Device, batch_size: int = 1024
) -> torch.Tensor:
    """float32 logits of the trainable part on cached trunk features, as evaluation
    computes them (on ``device``)."""
    _trainable_to(model, device)
    model.train(False)
    out = []
    for start in range(0, int(features.shape[0]), batch_size):
        x = features[start : start + batch_size].to(device.torch_device)
        with _autocast(model, device):
            out.append(model.forward_from_features(x).float())
    return torch.cat(out) if out else torch.empty(0, device=device.torch_device)
