"""``fedhead demo``: a complete federated job on the embedded chest X-ray data."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from fedhead.cli.types import Subparsers, add_command
from fedhead.common.config import CLOSED_FORM, CLOSED_FORM_METHODS, SERVER_STRATEGIES
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS


def _demo(args: argparse.Namespace) -> int:
    """run a complete federated job on the embedded X-ray data

    Simulate hospitals with Flower's Simulation Engine, train the head federatedly (by
    default in closed form: one round of the hospitals' summed feature statistics under
    SecAgg+) and, as references, centrally; print a per-round table and write
    report.json, accuracy_loss.png, sites.png
    (per-site accuracy: local-only, federated, personalized), a checkpoint per round and
    the model package model/ to --out (a previous demo's model/ there is replaced).
    """
    from fedhead.cli.demo_job import DemoOptions, run_demo

    run_demo(DemoOptions(**{f.name: getattr(args, f.name) for f in fields(DemoOptions)}))
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead demo``: every option is a field of ``DemoOptions``, of the same name."""
    d = add_command(sub, "demo", _demo)
    d.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="FedAvg rounds, with --strategy fedavg or a server optimizer (default 10)",
    )
    d.add_argument("--clients", type=int, default=3, help="simulated hospitals (default 3)")
    d.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)"
    )
    d.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet alpha of the non-IID split; smaller is more skewed (0.5)",
    )
    d.add_argument("--input-size", type=int, default=128, help="image side in pixels (128)")
    d.add_argument("--backbone", default="mobilenet_v2", help="registered backbone")
    d.add_argument("--local-epochs", type=int, default=5, help="epochs per round (5)")
    d.add_argument("--learning-rate", type=float, default=0.01, help="first-round rate (0.01)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--strategy",
        choices=SERVER_STRATEGIES,
        default=CLOSED_FORM,
        help="closed-form: the pooled-data head from the sites' summed statistics in one "
        "round (default); fedavg: rounds of FedAvg; the others are server optimizers on the "
        "aggregated head update (see README)",
    )
    d.add_argument(
        "--closed-form",
        choices=CLOSED_FORM_METHODS,
        default="lda",
        help="the closed-form head: shrinkage LDA or ridge (lda)",
    )
    d.add_argument(
        "--fine-tune-rounds",
        type=int,
        default=0,
        help="closed form: FedAvg rounds starting from the closed-form head (0)",
    )
    d.add_argument(
        "--proximal-mu",
        type=float,
        default=0.0,
        help="FedProx at the sites: weight of the pull toward the global head (0 = off)",
    )
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument(
        "--no-secure-aggregation",
        dest="secure_aggregation",
        action="store_false",
        help="plain FedAvg: the server sees each site's update (SecAgg+ is the default)",
    )
    d.add_argument(
        "--metrics-address",
        default=DEFAULT_SERVER_ADDRESS,
        help=f"serve Prometheus metrics while the demo runs ({DEFAULT_SERVER_ADDRESS}; none)",
    )
    d.add_argument(
        "--resume",
        action="store_true",
        help="continue the demo whose checkpoints are in --out (after it was cut off)",
    )
    d.add_argument(
        "--no-local-baseline",
        dest="local_baseline",
        action="store_false",
        help="skip the per-site local-only heads (each site trains alone with the run's "
        "budget, to show what the federation gained it; on by default)",
    )
    d.add_argument(
        "--personalize-epochs",
        type=int,
        default=0,
        help="after the run each site fine-tunes the final head on its own data for this "
        "many epochs and keeps it if it beats the federated head on its validation split (0)",
    )
    d.add_argument("--verbose", action="store_true", help="show Flower's and the sites' logs")
