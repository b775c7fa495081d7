"""``fedhead demo``: a complete federated job on the embedded chest X-ray data."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhead.cli.types import Subparsers
from fedhead.common.config import SERVER_STRATEGIES
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS


def _demo(args: argparse.Namespace) -> int:
    from fedhead.cli.demo_job import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            rounds=args.rounds,
            clients=args.clients,
            out=Path(args.out),
            alpha=args.alpha,
            input_size=args.input_size,
            backbone=args.backbone,
            local_epochs=args.local_epochs,
            learning_rate=args.learning_rate,
            seed=args.seed,
            device=args.device,
            secure_aggregation=not args.no_secure_aggregation,
            metrics_address=args.metrics_address,
            verbose=args.verbose,
            resume=args.resume,
            strategy=args.strategy,
            proximal_mu=args.proximal_mu,
            local_baseline=not args.no_local_baseline,
            personalize_epochs=args.personalize_epochs,
        )
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead demo``."""
    d = sub.add_parser(
        "demo",
        help="run a complete federated job on the embedded X-ray data",
        description="Simulate hospitals with Flower's Simulation Engine, train "
        "the head federatedly and centrally, print a per-round table and "
        "write report.json, accuracy_loss.png, sites.png (per-site accuracy: local-only, "
        "federated, personalized), a checkpoint per round and the model "
        "package model/ to --out (a previous demo's model/ there is replaced).",
    )
    d.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    d.add_argument("--clients", type=int, default=3, help="simulated hospitals (default 3)")
    d.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
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
        default="fedavg",
        help="server optimizer on the aggregated head update (fedavg; the others keep "
        "momentum or adaptive state on the server, see README)",
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
        action="store_true",
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
        action="store_true",
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
    d.set_defaults(handler=_demo)
