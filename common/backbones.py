"""Registry of pretrained torchvision backbones fedhead can distribute.

Each entry is a frozen ``BackboneSpec``: which torchvision builder and ``Weights``
enum it uses (that enum carries the download URL and file name), the full sha256 of
the weights file, where the trunk ends and the original classifier begins, the feature
width, the default input size and the normalisation. ``trunk_blocks`` cuts the trunk
into a sequence of blocks so the last K can be unfrozen and the rest cached.

torchvision is imported only where an architecture is built or a download URL is
needed: a site that trains a head on cached features never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision import models as tvm

from fedhead.common.errors import UnknownBackboneError
from fedhead.common.images import Preprocessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrunkBlocks:
    """A trunk cut into ``blocks`` applied in order, then ``pool`` to a feature vector."""

    blocks: list[nn.Module]
    pool: nn.Module


@dataclass(frozen=True)
class BackboneSpec:
    """Everything fedhead needs to know about one pretrained backbone."""

    name: str
    architecture: str  # torchvision builder, e.g. "mobilenet_v2"
    weights_enum: str  # torchvision Weights member, e.g. "MobileNet_V2_Weights.IMAGENET1K_V1"
    weights_file: str  # the file name in that member's URL (a test checks they agree)
    sha256: str  # full hex digest of the weights file
    head_module: str  # attribute of the torchvision model holding the ImageNet classifier
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fixed_input_size: bool = False  # ViTs only accept their training resolution
    description: str = ""  # one line for `fedhead weights list`

    @property
    def url(self) -> str:
        from torchvision import models

        return cast(str, models.get_weight(self.weights_enum).url)

    def build(self) -> nn.Module:
        """The torchvision architecture with random weights (load a state dict next)."""
        from torchvision import models

        return cast(nn.Module, models.get_model(self.architecture, weights=None))

    def preprocessor(self, input_size: int = 0) -> Preprocessor:
        """The image preprocessing these weights expect (as torchvision's
        ``Weights.transforms``): resize to ``input_size`` (0 = the default), normalise."""
        return Preprocessor(input_size or self.input_size, self.mean, self.std)

    def trunk_blocks(self, model: nn.Module) -> TrunkBlocks:
        return _SPLITTERS[self.architecture](model)


class _Flatten2dPool(nn.Module):
    """Global average pooling to a (N, C) feature vector, as torchvision CNNs do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class _VitStem(nn.Module):
    """Patch embedding, class token and position embedding of a torchvision ViT."""

    def __init__(self, vit: tvm.VisionTransformer) -> None:
        super().__init__()
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.image_size = vit.image_size
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return cast(torch.Tensor, self.dropout(x + self.pos_embedding))


class _VitPool(nn.Module):
    """Final LayerNorm, then the class token as the feature vector."""

    def __init__(self, ln: nn.Module) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.ln(x))[:, 0]


def _split_features(model: nn.Module) -> TrunkBlocks:
    features = cast(nn.Sequential, model.features)
    return TrunkBlocks(blocks=list(features), pool=_Flatten2dPool())


def _split_resnet(model: nn.Module) -> TrunkBlocks:
    r = cast("tvm.ResNet", model)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
    return TrunkBlocks(blocks=[stem, r.layer1, r.layer2, r.layer3, r.layer4], pool=_Flatten2dPool())


def _split_vit(model: nn.Module) -> TrunkBlocks:
    vit = cast("tvm.VisionTransformer", model)
    layers = list(cast(nn.Sequential, vit.encoder.layers))
    return TrunkBlocks(blocks=[_VitStem(vit), *layers], pool=_VitPool(vit.encoder.ln))


_SPLITTERS: dict[str, Callable[[nn.Module], TrunkBlocks]] = {
    "mobilenet_v2": _split_features,
    "efficientnet_b0": _split_features,
    "resnet18": _split_resnet,
    "resnet50": _split_resnet,
    "vit_b_16": _split_vit,
}

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.architecture not in _SPLITTERS:
        raise ValueError(f"no trunk splitter for architecture {spec.architecture!r}")
    if len(spec.sha256) != 64 or not spec.weights_file.split("-")[-1].startswith(spec.sha256[:8]):
        raise ValueError(
            f"sha256 of {spec.name!r} must be 64 hex digits starting with the hash "
            f"suffix of {spec.weights_file}"
        )
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(name, _REGISTRY) from None


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


register(
    BackboneSpec(
        name="mobilenet_v2",
        architecture="mobilenet_v2",
        weights_enum="MobileNet_V2_Weights.IMAGENET1K_V1",
        weights_file="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        head_module="classifier",
        feature_dim=1280,
        input_size=224,
        description="MobileNetV2, ImageNet-1K acc@1 71.9; 2.2M trunk parameters (default)",
    )
)

# Full digests of torchvision's files as recorded by several independent public
# sources; each begins with the hash suffix torchvision puts in the file name (checked
# by ``register``). MobileNetV2's was also verified here against the real file.
register(
    BackboneSpec(
        name="resnet18",
        architecture="resnet18",
        weights_enum="ResNet18_Weights.IMAGENET1K_V1",
        weights_file="resnet18-f37072fd.pth",
        sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        head_module="fc",
        feature_dim=512,
        input_size=224,
        description="ResNet-18, ImageNet-1K acc@1 69.8; 11.2M trunk parameters",
    )
)
register(
    BackboneSpec(
        name="resnet50",
        architecture="resnet50",
        weights_enum="ResNet50_Weights.IMAGENET1K_V2",
        weights_file="resnet50-11ad3fa6.pth",
        sha256="11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
        head_module="fc",
        feature_dim=2048,
        input_size=224,
        description="ResNet-50 (V2 recipe), ImageNet-1K acc@1 80.9; 23.5M trunk parameters",
    )
)
register(
    BackboneSpec(
        name="efficientnet_b0",
        architecture="efficientnet_b0",
        weights_enum="EfficientNet_B0_Weights.IMAGENET1K_V1",
        weights_file="efficientnet_b0_rwightman-7f5810bc.pth",
        sha256="7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934",
        head_module="classifier",
        feature_dim=1280,
        input_size=224,
        description="EfficientNet-B0, ImageNet-1K acc@1 77.7; 4.0M trunk parameters",
    )
)
register(
    BackboneSpec(
        name="vit_b_16",
        architecture="vit_b_16",
        weights_enum="ViT_B_16_Weights.IMAGENET1K_V1",
        weights_file="vit_b_16-c867db91.pth",
        sha256="c867db91d3e12c6cbadabb610d73c24a546bf82d8c03a9fea34f43a712ddb0e9",
        head_module="heads",
        feature_dim=768,
        input_size=224,
        fixed_input_size=True,
        description="ViT-B/16, ImageNet-1K acc@1 81.1; 85.8M trunk parameters",
    )
)
