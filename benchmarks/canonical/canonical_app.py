"""The canonical Flower pattern for transfer learning, without fedhead: the reference
fedhead's deployment round is measured against.

As Flower's PyTorch quickstart does it: a NumPyClient holds the whole model
(torchvision's MobileNetV2 with the ImageNet weights, its last layer replaced for the
run's classes, the trunk frozen), receives and returns every tensor of the model's
state each round, trains for ``local-epochs`` epochs with every image going through the
trunk in every epoch (nothing is cached), and evaluates each round on the site's
validation split. FedAvg on the server, no secure aggregation. Each site reads its own
.npz file (the node config's ``data-path``, as fedhead's sites do) and uses the
node's thread setting (``threads``), as fedhead's sites do. The ServerApp appends one
JSON line per round (its seconds, from the start of its fit to the end of its
evaluation) to ``out-file``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torchvision
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from torch import nn
from torch.nn import functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_model(weights: str, classes: int) -> nn.Module:
    """MobileNetV2 with the ImageNet weights, a new last layer, the trunk frozen."""
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.classifier[1] = nn.Linear(model.last_channel, classes)
    for p in model.features.parameters():
        p.requires_grad = False
    return cast(nn.Module, model)  # torchvision has no type information


def to_tensors(
    images: np.ndarray, labels: np.ndarray, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 grayscale images -> normalised (N, 3, size, size) floats, and labels."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(labels.astype(np.int64).reshape(-1))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    state = dict(zip(model.state_dict().keys(), (torch.tensor(w) for w in weights), strict=True))
    model.load_state_dict(state, strict=True)


class TransferClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        cfg, node = context.run_config, context.node_config
        threads = int(node.get("threads", 0))
        if threads:
            torch.set_num_threads(threads)
        self.model = build_model(str(cfg["weights"]), int(cfg["classes"]))
        size = int(cfg["input-size"])
        with np.load(str(node["data-path"])) as data:
            self.train = to_tensors(data["images"], data["labels"], size)
            self.val = to_tensors(data["val_images"], data["val_labels"], size)
        self.epochs, self.batch = int(cfg["local-epochs"]), int(cfg["batch-size"])
        self.lr, self.momentum = float(cfg["learning-rate"]), float(cfg["momentum"])

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=self.lr, momentum=self.momentum)
        x, y = self.train
        self.model.train()
        for _ in range(self.epochs):
            for i in torch.split(torch.randperm(len(y)), self.batch):
                opt.zero_grad()
                F.cross_entropy(self.model(x[i]), y[i]).backward()  # type: ignore[no-untyped-call]
                opt.step()
        return get_weights(self.model), len(y), {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        x, y = self.val
        self.model.eval()
        with torch.no_grad():
            logits = torch.cat([self.model(x[i : i + 256]) for i in range(0, len(y), 256)])
        loss = float(F.cross_entropy(logits, y))
        return loss, len(y), {"accuracy": float((logits.argmax(1) == y).float().mean())}


client = ClientApp(client_fn=lambda context: TransferClient(context).to_client())


class _TimedFedAvg(FedAvg):
    """FedAvg that notes each round's seconds, from its fit's start to its evaluation."""

    def __init__(self, out_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_file = out_file
        self.started = 0.0

    def configure_fit(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        self.started = time.perf_counter()
        return super().configure_fit(server_round, *args, **kwargs)

    def aggregate_evaluate(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        out = super().aggregate_evaluate(server_round, *args, **kwargs)
        if self.out_file:
            line = {"round": server_round, "seconds": time.perf_counter() - self.started}
            with Path(self.out_file).open("a") as f:
                f.write(json.dumps(line) + "\n")
        return out


def server_fn(context: Context) -> ServerAppComponents:
    cfg = context.run_config
    sites = int(cfg["sites"])
    model = build_model(str(cfg["weights"]), int(cfg["classes"]))
    strategy = _TimedFedAvg(
        str(cfg["out-file"]),
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        min_available_clients=sites,
        initial_parameters=ndarrays_to_parameters(get_weights(model)),
    )
    rounds = int(cfg["num-server-rounds"])
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))


server = ServerApp(server_fn=server_fn)
