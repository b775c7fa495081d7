"""`fedhead predict`, `fedhead evaluate`, `fedhead export` on a real model package."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedhead.cli.inference import load_site_model, predict
from fedhead.cli.main import main
from fedhead.common import demo_data
from fedhead.common.device import select_device
from fedhead.common.errors import (
    DataError,
    ExportError,
    PackageError,
    SetupError,
    WeightsError,
)
from fedhead.common.images import ArrayImages
from fedhead.common.package import MODEL_JSON
from tests.cli.test_cli import fedhead
from tests.conftest import write_png
from tests.packages import CARD, make_package


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, mobilenet_weights: Path) -> Path:
    return make_package(mobilenet_weights).write(
        tmp_path_factory.mktemp("pkg") / "model", card=CARD
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fedhead: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_predict_on_a_folder_lists_and_counts_unreadable_files(
    tmp_path: Path,
    model_dir: Path,
    image_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = image_folder / "pneumonia" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    nested = image_folder / "normal" / "more" / "deep.png"
    write_png(nested, demo_data.load("test").images[0])
    out = tmp_path / "preds.csv"
    assert (
        main(["predict", "--model", str(model_dir), "--data", str(image_folder), "--out", str(out)])
        == 0
    )
    captured = capsys.readouterr()
    rows = _rows(out)
    assert list(rows[0]) == ["path", "prediction", "p_normal", "p_pneumonia"]
    assert len(rows) == 21  # 20 X-rays + the nested one; the broken file has no row
    assert str(nested) in {r["path"] for r in rows}
    for r in rows:
        p = np.array([float(r["p_normal"]), float(r["p_pneumonia"])])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == ("normal", "pneumonia")[int(p.argmax())]
    assert "1 of 22 images could not be read" in captured.err
    assert str(broken) in captured.err
    assert "predicted 21 of 22 images" in captured.out
    side = _rows(tmp_path / "preds.unreadable.csv")
    assert [r["path"] for r in side] == [str(broken)] and "not a readable image" in side[0]["error"]


def test_predict_on_a_csv_counts_missing_files(
    tmp_path: Path, model_dir: Path, csv_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with csv_manifest.open("a") as f:
        f.write("img/gone.png,normal,train\n")
    out = tmp_path / "preds.csv"
    assert (
        main(["predict", "--model", str(model_dir), "--data", str(csv_manifest), "--out", str(out)])
        == 0
    )
    assert len(_rows(out)) == 20
    err = capsys.readouterr().err
    assert "1 of 21 images could not be read" in err and "gone.png: cannot read" in err


def test_predict_on_an_npz_and_a_single_image(
    tmp_path: Path, model_dir: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = xray_arrays
    npz = tmp_path / "batch.npz"
    np.savez(npz, images=images)
    out = tmp_path / "npz.csv"
    assert main(["predict", "--model", str(model_dir), "--data", str(npz), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["path"] for r in rows] == [f"batch.npz:images[{i}]" for i in range(len(images))]
    # the same pictures as PNG files get the same probabilities: one preprocessing path
    png = tmp_path / "one.png"
    write_png(png, images[3])
    one = tmp_path / "one.csv"
    assert main(["predict", "--model", str(model_dir), "--data", str(png), "--out", str(one)]) == 0
    (row,) = _rows(one)
    # equal up to the last printed digit: a batch of 20 and a batch of 1 may take
    # different convolution paths, whose float32 sums can differ in the 7th digit
    assert float(row["p_normal"]) == pytest.approx(float(rows[3]["p_normal"]), abs=2e-6)


def test_predict_refuses_to_overwrite_and_to_read_nothing(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preds.csv"
    out.write_text("keep me")
    args = ["predict", "--model", str(model_dir), "--data", str(tmp_path), "--out", str(out)]
    assert main(args) == SetupError.exit_code
    assert "already exists" in _error_line(capsys) and out.read_text() == "keep me"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    assert (
        main([*args[:3], "--data", str(bad), "--out", str(tmp_path / "p2.csv")])
        == DataError.exit_code
    )
    assert "none of the 1 images" in _error_line(capsys)


def test_evaluate_agrees_with_sklearn_on_the_same_predictions(
    tmp_path: Path, model_dir: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preds, metrics = tmp_path / "preds.csv", tmp_path / "metrics.json"
    common = ["--model", str(model_dir), "--data", str(image_folder)]
    assert main(["predict", *common, "--out", str(preds)]) == 0
    assert main(["evaluate", *common, "--out", str(metrics), "--bootstrap", "100"]) == 0
    table = capsys.readouterr().out
    rows = _rows(preds)
    y = np.array([demo_data.CLASSES.index(Path(r["path"]).parent.name) for r in rows])
    p = np.array([[float(r["p_normal"]), float(r["p_pneumonia"])] for r in rows])
    pred = p.argmax(1)
    doc = json.loads(metrics.read_text())
    m = doc["metrics"]
    assert doc["examples"] == 20 and doc["unreadable"] == []
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-5)
    assert m["sensitivity"]["value"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["specificity"]["value"] == pytest.approx(recall_score(y, pred, pos_label=0))
    prec = precision_score(y, pred, average=None, zero_division=np.nan)
    if np.isfinite(prec[0]):
        assert doc["per_class"]["normal"]["precision"]["value"] == pytest.approx(prec[0])
    assert doc["confusion_matrix"]["counts"] == confusion_matrix(y, pred).tolist()
    lo, hi = m["accuracy"]["ci95"]
    assert lo <= m["accuracy"]["value"] <= hi
    assert "accuracy" in table and "confusion matrix" in table and "95% interval" in table


def test_evaluate_refuses_labels_outside_the_packages_classes(
    tmp_path: Path, model_dir: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_folder / "normal").rename(image_folder / "healthy")
    args = ["evaluate", "--model", str(model_dir), "--data", str(image_folder)]
    assert main([*args, "--out", str(tmp_path / "m.json")]) == DataError.exit_code
    assert "'healthy'" in _error_line(capsys)


def test_refusals_are_one_line_with_their_exit_code(
    tmp_path: Path, model_dir: Path, image_folder: Path
) -> None:
    """Through a real process: an altered package, an unknown format version."""
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    doc = json.loads((bad / MODEL_JSON).read_text())
    doc["format_version"] = 99
    (bad / MODEL_JSON).write_text(json.dumps(doc))
    result = fedhead(
        "predict",
        "--model",
        str(bad),
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path / "p.csv"),
    )
    assert result.returncode == PackageError.exit_code, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("fedhead: model package problem: ") and "format version 99" in line


def test_wrong_trunk_is_refused_by_every_command(
    tmp_path: Path, model_dir: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the trunk")
    for cmd in (
        ["predict", "--data", str(image_folder), "--out", str(tmp_path / "p.csv")],
        ["evaluate", "--data", str(image_folder), "--out", str(tmp_path / "m.json")],
        ["export", "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
    ):
        assert (
            main([*cmd, "--model", str(model_dir), "--weights", str(fake)])
            == WeightsError.exit_code
        )
        assert "sha256" in _error_line(capsys)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_package(
    tmp_path: Path,
    model_dir: Path,
    fmt: str,
    xray_arrays: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / f"model.{fmt}"
    args = ["export", "--model", str(model_dir), "--format", fmt, "--out", str(out)]
    assert main([*args, "--channels", "1", "--height", "28", "--width", "28"]) == 0
    printed = capsys.readouterr().out
    largest = re.search(r"largest difference .*: (\S+) \(tolerance", printed)
    assert largest is not None, printed
    diff = float(largest.group(1))
    assert diff <= 1e-4
    # Independently: the file on real X-rays against the package's own predictions.
    images, _ = xray_arrays
    site = load_site_model(model_dir)
    expected = predict(site, ArrayImages(images, "xrays"), select_device("cpu"), progress=False)
    batch = images[:, None]  # N x 1 x 28 x 28 uint8
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"images": batch})[0]
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(batch)).numpy()  # type: ignore[no-untyped-call]
    assert got.shape == (len(images), 2)
    assert np.abs(got - expected.probabilities).max() <= 1e-4
    assert main(args) == SetupError.exit_code  # an existing file is not replaced


def test_export_with_unfrozen_blocks_and_rgb_input(tmp_path: Path, mobilenet_weights: Path) -> None:
    from fedhead.cli.model_export import export_model
    from tests.packages import run_config

    cfg = run_config(**{"unfreeze-blocks": 2, "head": "mlp", "head-hidden": 32})
    folder = make_package(mobilenet_weights, cfg).write(tmp_path / "model", card=CARD)
    site = load_site_model(folder)
    result = export_model(site, "onnx", tmp_path / "m.onnx", channels=3, height=40, width=30)
    assert result.max_abs_diff <= 1e-4 and result.input_shape == (3, 40, 30)


def test_export_without_onnx_says_how_to_install_it(
    tmp_path: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    args = [
        "export",
        "--model",
        str(model_dir),
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "m.onnx"),
    ]
    assert main(args) == ExportError.exit_code
    line = _error_line(capsys)
    assert "onnxruntime is missing" in line and "pip install 'fedhead[export]'" in line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_predict_on_the_test_split_matches_the_demo_report(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    """A short demo's package, used at a site on the bundled test split written out as
    PNG class folders, scores what the demo's federated evaluation reported."""
    out = tmp_path / "demo"
    demo = fedhead(
        "demo",
        "--clients",
        "2",
        "--out",
        str(out),
        "--metrics-address",
        "none",
        "--device",
        "cpu",
        timeout=1800,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    report = json.loads((out / "report.json").read_text())
    test = demo_data.load("test")
    folder = tmp_path / "test-split"
    for i, (img, lab) in enumerate(zip(test.images, test.labels, strict=True)):
        write_png(folder / demo_data.CLASSES[lab] / f"{i:04d}.png", img)
    preds = tmp_path / "preds.csv"
    result = fedhead(
        "predict",
        "--model",
        str(out / "model"),
        "--data",
        str(folder),
        "--out",
        str(preds),
        "--device",
        "cpu",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(preds)
    assert len(rows) == len(test.labels) == 468
    accuracy = float(np.mean([Path(r["path"]).parent.name == r["prediction"] for r in rows]))
    # the demo measures its final accuracy on the untouched test split, server-side
    assert abs(accuracy - report["final_server_eval_accuracy"]) <= 0.005, (
        accuracy,
        report["final_server_eval_accuracy"],
    )
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "2 site(s)" in card and f"{report['setup']['train_examples']:,}" in card
