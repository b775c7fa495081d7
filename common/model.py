"""The fedhead model: a frozen pretrained trunk, optionally K unfrozen last blocks, a head.

Only the trainable tensors ever travel. ``TrainableSet`` computes their names, shapes
and dtypes once from the model; the same set packs and unpacks the payload in both
directions, and its fingerprint lets both sides prove they agree before training.

The run's first head is a function of its seed and architecture alone (``init_head``),
not of whatever else drew from torch's random generator before it was built: a site
recomputes it (``initial_trainable``) and takes part only from that very head, so a
server cannot start a run from a head crafted to probe the site's images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from fedhead.common.backbones import BackboneSpec
from fedhead.common.errors import WeightsError
from fedhead.common.heads import TensorSpec as TensorSpec  # re-exported: the model's tensors
from fedhead.common.heads import TrainableSet as TrainableSet
from fedhead.common.weights import WeightsRef


def weights_filename(spec: BackboneSpec, custom_sha256: str = "") -> str:
    """The name of the weights file a run uses (without importing torchvision)."""
    return f"{spec.name}-custom-{custom_sha256[:16]}.pth" if custom_sha256 else spec.weights_file


def weights_ref(spec: BackboneSpec, custom_sha256: str = "") -> WeightsRef:
    """The weights file a run uses: the registered ImageNet file or a custom checkpoint."""
    if custom_sha256:
        return WeightsRef(
            filename=weights_filename(spec, custom_sha256),
            sha256=custom_sha256,
            label=f"custom {spec.name} checkpoint",
            install_hint="give the checkpoint's path in backbone-weights",
        )
    return WeightsRef(
        filename=spec.weights_file,
        sha256=spec.sha256,
        url=spec.url,
        label=f"backbone {spec.name}",
        install_hint=f"run `fedhead weights install {spec.name}`",
    )


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the usual {'state_dict': ...} / {'model': ...} wrappers."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TypeError("not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_backbone(spec: BackboneSpec, path: Path) -> nn.Module:
    """Build ``spec``'s architecture and load the trunk from a (verified) weights file.

    Classifier weights in the file are not needed and may have any shape, so custom
    checkpoints fine-tuned for another label set load too. Every trunk tensor must be
    present with the right shape.
    """
    model = spec.build()
    try:
        loaded = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise WeightsError(
            f"{path} is not a loadable PyTorch state dict ({type(err).__name__}: {err})",
            "give a checkpoint saved with torch.save(model.state_dict())",
        ) from err
    own = model.state_dict()
    head_prefix = spec.head_module + "."
    trunk_keys = [k for k in own if not k.startswith(head_prefix)]
    missing = [k for k in trunk_keys if k not in loaded]
    wrong = [k for k in trunk_keys if k in loaded and loaded[k].shape != own[k].shape]
    if missing or wrong:
        bad = (missing + wrong)[:3]
        raise WeightsError(
            f"{path} does not fit architecture {spec.architecture}: "
            f"{len(missing)} trunk tensors missing, {len(wrong)} of the wrong shape (e.g. {bad})",
            "check that the checkpoint was trained with this architecture",
        )
    model.load_state_dict({k: loaded[k] for k in trunk_keys}, strict=False)
    return model


def _freeze_batchnorm_stats(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class ModelSettings(Protocol):
    """The run settings that shape the model: RunConfig on the server, RunSpec on a node."""

    @property
    def seed(self) -> int: ...
    @property
    def head(self) -> str: ...
    @property
    def head_hidden(self) -> int: ...
    @property
    def head_dropout(self) -> float: ...
    @property
    def unfreeze_blocks(self) -> int: ...
    def class_names(self) -> list[str]: ...


class FedHeadModel(nn.Module):
    """``frozen`` blocks (cacheable), ``tuned`` last blocks, frozen ``pool``, trainable ``head``.

    Built without a backbone it holds the head only (no trunk to extract with).

    ``extract(x)`` runs the cacheable part: the frozen blocks, plus the pool when no
    block is unfrozen (then it yields the feature vector). ``forward_from_features``
    runs the rest. BatchNorm statistics stay frozen everywhere, also in tuned blocks,
    so no buffer changes during training and only parameters need exchanging.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module | None,
        num_classes: int,
        head: str = "linear",
        hidden: int = 256,
        dropout: float = 0.0,
        unfreeze_blocks: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.unfreeze_blocks = unfreeze_blocks
        self.has_trunk = backbone is not None
        self.pool: nn.Module
        if backbone is None:  # the head alone, trained on cached features
            if unfreeze_blocks:
                raise ValueError("a model without a trunk cannot unfreeze trunk blocks")
            self.frozen, self.tuned, self.pool = nn.Sequential(), nn.Sequential(), nn.Identity()
        else:
            split = spec.trunk_blocks(backbone)
            if not 0 <= unfreeze_blocks < len(split.blocks):
                raise ValueError(
                    f"unfreeze_blocks={unfreeze_blocks}: {spec.name} has "
                    f"{len(split.blocks)} trunk blocks, choose 0..{len(split.blocks) - 1}"
                )
            cut = len(split.blocks) - unfreeze_blocks
            self.frozen = nn.Sequential(*split.blocks[:cut])
            self.tuned = nn.Sequential(*split.blocks[cut:])
            self.pool = split.pool
        self.head = make_head(head, spec.feature_dim, num_classes, hidden, dropout)
        init_head(self.head, seed)
        for p in [*self.frozen.parameters(), *self.pool.parameters()]:
            p.requires_grad_(False)
        for p in [*self.tuned.parameters(), *self.head.parameters()]:
            p.requires_grad_(True)
        self.train(False)

    @classmethod
    def for_run(
        cls, spec: BackboneSpec, backbone: nn.Module | None, run: ModelSettings
    ) -> FedHeadModel:
        """The run's model; the server and every node build it here, so they agree
        (also on the initial head, drawn from the run's seed).

        Without ``backbone`` it is the head alone (runs with no unfrozen block): it
        trains and evaluates on cached features, and its trainable tensors are the
        full model's.
        """
        return cls(
            spec,
            backbone,
            num_classes=len(run.class_names()),
            head=run.head,
            hidden=run.head_hidden,
            dropout=run.head_dropout,
            unfreeze_blocks=run.unfreeze_blocks,
            seed=run.seed,
        )

    def train(self, mode: bool = True) -> FedHeadModel:
        super().train(mode)
        self.frozen.eval()
        self.pool.eval()
        _freeze_batchnorm_stats(self.tuned)
        return self

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The cacheable part: frozen blocks (and the pool when nothing is unfrozen)."""
        if not self.has_trunk:
            raise RuntimeError("this model holds the head only; build it with its backbone")
        z = self.frozen(x)
        return cast(torch.Tensor, self.pool(z)) if self.unfreeze_blocks == 0 else z

    def forward_from_features(self, z: torch.Tensor) -> torch.Tensor:
        if self.unfreeze_blocks:
            z = self.pool(self.tuned(z))
        return cast(torch.Tensor, self.head(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_features(self.extract(x))

    def param_groups(self, lr: float, tuned_lr_scale: float) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(self.head.parameters()), "lr": lr}]
        tuned = [p for p in self.tuned.parameters() if p.requires_grad]
        if tuned:
            groups.append({"params": tuned, "lr": lr * tuned_lr_scale})
        return groups


def make_head(kind: str, in_dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    if kind == "linear":
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        return nn.Sequential(*layers, nn.Linear(in_dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    raise ValueError(f"head must be 'linear' or 'mlp', not {kind!r}")


# Which stream of the run's seed the head is drawn from (the seed also splits the data
# and shuffles batches, from streams of their own).
HEAD_STREAM = 0x68656164  # "head"


def init_head(head: nn.Module, seed: int) -> None:
    """The head's initial values from ``seed`` alone: every linear layer's weight and
    bias uniform in +-1/sqrt(fan_in), torch's default for ``nn.Linear``, drawn in
    order from one numpy PCG64 stream (its doubles, ``random()``, are the same on
    every platform and numpy version), so whoever builds the run's head gets the
    same values, whatever else drew random numbers before."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([HEAD_STREAM, seed])))
    with torch.no_grad():
        for layer in head.modules():
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    values = (rng.random(tuple(p.shape)) * 2 - 1) * bound
                    p.copy_(torch.from_numpy(values.astype(np.float32)))


def initial_trainable(
    spec: BackboneSpec, backbone: nn.Module | None, run: ModelSettings
) -> list[np.ndarray]:
    """The run's initial trainable tensors, as the server starts the run from them: the
    head from the seed and, with unfrozen blocks, those blocks as ``backbone`` holds
    them (the verified pretrained weights)."""
    model = FedHeadModel.for_run(spec, backbone, run)
    return TrainableSet.of(model).get(model)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
