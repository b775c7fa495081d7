"""``fedhead export``: a run's model package as one ONNX or TorchScript file."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhead.cli import package_options as opts
from fedhead.cli.types import Subparsers, add_command


def _export(args: argparse.Namespace) -> int:
    """export a model package as one ONNX or TorchScript file

    Write trunk, head and preprocessing (channel handling, resize and centre crop,
    normalisation) as one file. Input: a uint8 tensor N x C x H x W with values 0..255, C =
    --channels (1 grayscale, 3 RGB), H x W = --height x --width (default: the model's input
    size; other sizes are resized inside the model as in training); any batch size N.
    Output: N x classes probabilities, in the package's class order. The file is checked
    against the package on sample images and only kept when the largest difference is at
    most 1e-4. ONNX needs the export extra: pip install 'fedhead[export]'. TorchScript is
    deprecated by PyTorch but still loads with torch.jit.load.
    """
    from fedhead.cli.model_export import TOLERANCE, export_model
    from fedhead.common.errors import ConfigError

    out = Path(args.out)
    opts.refuse_existing(out, args.force)
    bad = [
        f"--{name}: must be >= {low} (got {value})"
        for name, value, low in (
            ("height", args.height, 0),
            ("width", args.width, 0),
            ("samples", args.samples, 2),
        )
        if value < low
    ]
    if bad:
        raise ConfigError(bad, "arguments")
    site = opts.load_site(args)
    result = export_model(
        site,
        args.format,
        out,
        channels=args.channels,
        height=args.height,
        width=args.width,
        samples=args.samples,
        overwrite=args.force,
    )
    c, h, w = result.input_shape
    print(
        f"exported {result.format}: {result.path} (input uint8 N x {c} x {h} x {w}, "
        f"output N x {len(site.classes)} probabilities: {', '.join(site.classes)})"
    )
    print(
        f"largest difference from the package on {result.samples} sample images: "
        f"{result.max_abs_diff:.2e} (tolerance {TOLERANCE:g})"
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead export``."""
    ex = add_command(sub, "export", _export)
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", required=True, help="file to write (.onnx or .pt)")
    opts.package_options(ex)
    ex.add_argument("--channels", type=int, choices=[1, 3], default=3, help="input channels (3)")
    ex.add_argument("--height", type=int, default=0, help="input height (model's input size)")
    ex.add_argument("--width", type=int, default=0, help="input width (model's input size)")
    ex.add_argument("--samples", type=int, default=8, help="sample images for the check (8)")
