"""MODEL_CARD.md, the human-readable page of a run's model package: intended use,
training data, metrics, limitations. The server renders it when it writes the package."""

from __future__ import annotations

import math

import numpy as np

from fedhead.common.package import ModelPackage


def model_card(pkg: ModelPackage) -> str:
    """MODEL_CARD.md: intended use, training data, metrics, limitations."""
    t, a, p = pkg.training, pkg.architecture, pkg.preprocessing
    counts = (
        ", ".join(f"{c}: {n}" for c, n in zip(pkg.classes, t.class_counts, strict=True))
        if t.class_counts is not None
        else "not known to the server (sites report only their totals)"
    )
    metric_lines = (
        "\n".join(
            f"| {name} | {'not measured' if v is None or not math.isfinite(v) else f'{v:.4f}'} |"
            for name, v in pkg.metrics.items()
        )
        or "| (none) | |"
    )
    dp = t.differential_privacy
    privacy = (
        f"differential privacy: noise multiplier {dp.get('noise_multiplier')}, "
        f"clipping norm {dp.get('clipping_norm')}, delta {dp.get('delta')}"
        if dp
        else "no differential privacy"
    )
    aggregation = (
        "SecAgg+ secure aggregation (the server saw only the sum of the updates)"
        if t.secure_aggregation == "secagg+"
        else "without secure aggregation (the server saw each site's update)"
    )
    trained = "the head" + (
        f" and the last {a.unfreeze_blocks} trunk block(s)" if a.unfreeze_blocks else ""
    )
    return f"""# Model card: fedhead {pkg.backbone.name} {a.head} head

Classes, in output order: {", ".join(f"`{c}`" for c in pkg.classes)}.
Created {pkg.created} by fedhead {pkg.fedhead_version} (run {t.run_id}).

## Intended use

Classifying images like those the sites trained on into the classes above, as a
decision aid reviewed by a qualified person. Use it with `fedhead predict`, check it
on your own labelled data with `fedhead evaluate` before relying on it, and export it
with `fedhead export`. It is not validated for any other use, population or device.

## Model

- Backbone: `{pkg.backbone.name}`, frozen pretrained trunk, weights file
  `{pkg.backbone.weights_file}` (sha256 `{pkg.backbone.sha256}`), not included:
  `{pkg.backbone.install}`.
- Trained: {trained}; head `{a.head}`{f" (hidden {a.hidden})" if a.head == "mlp" else ""},
  dropout {a.dropout}; {sum(int(np.prod(x.shape)) for x in a.tensors):,} trained parameters.
- Input: the shorter side resized to {p.input_size} px (bilinear, antialiased), the
  centre {p.input_size} x {p.input_size} kept; {p.channels};
  scaled to [0, 1] and normalised with mean {list(p.mean)}, std {list(p.std)}.

## Training data

Federated training over {t.sites} site(s) and {t.rounds} round(s); {t.examples:,}
training images in all. Images never left the sites. Images per class: {counts}.
Aggregation: {aggregation}; {privacy}.

## Metrics

Final federated evaluation: the last round's global model, on the sites' validation
splits, example-weighted over sites.

| metric | value |
|---|---|
{metric_lines}

## Limitations

- The metrics come from the sites' own validation data; other sites, scanners,
  populations or image preparations may do worse. Measure on your data first.
- The trunk was pretrained on ImageNet photographs and kept frozen
  ({"apart from the last unfrozen blocks" if a.unfreeze_blocks else "only the head was trained"}).
- Probabilities are not calibrated by construction: `fedhead evaluate` reports the
  expected calibration error on your data.
- A class missing or rare at the sites is learnt poorly, whatever the overall accuracy.
"""
