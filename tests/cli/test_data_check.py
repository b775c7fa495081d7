"""`fedhead data check` over a DICOM site: what it reports, and what it never prints."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedhead.cli.main import main
from fedhead.common import demo_data
from fedhead.common.errors import ConfigError
from tests import dicom_files as dcm
from tests.cli.test_cli import fedhead, one_line_error
from tests.conftest import write_png


def dicom_site(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Per class: DICOM series (MONOCHROME1 and 2), 8- and 16-bit PNG exports, and one
    colour and one corrupt DICOM file that must be reported as unreadable."""
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / demo_data.CLASSES[lab]
        kind = i % 4
        if kind == 0:
            dcm.write_gray(folder / f"study{i}" / "series1" / f"IM{i:04d}", img)
        elif kind == 1:
            dcm.write_gray(folder / f"study{i}" / f"{i}.dcm", img, photometric="MONOCHROME1")
        elif kind == 2:
            dcm.write_png16(folder / f"{i}.png", img)
        else:
            write_png(folder / f"{i}.png", img)
    dcm.write_rgb(root / "normal" / "colour.dcm", images[0])
    dcm.write_corrupt(root / "pneumonia" / "broken.dcm", images[1])
    return root


def test_data_check_reports_formats_depths_and_unreadable_files_without_phi(
    tmp_path: Path,
    xray_arrays: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = dicom_site(tmp_path / "site", *xray_arrays)
    files = [p.read_bytes() for p in site.rglob("*") if p.is_file()]
    # the files do carry PHI: 10 grey DICOM and the colour one (the corrupt one is scrambled)
    assert sum(dcm.PATIENT_ID.encode() in b for b in files) == 11
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["data", "check", str(site), "--classes", "normal,pneumonia"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    # 20 images: 5 of each kind; DICOM 10 (5 MONOCHROME2, 5 MONOCHROME1), PNG 10
    assert "formats: DICOM 10, PNG 10" in lines
    assert "bits per sample: DICOM 12-bit 10; PNG 16-bit 5, 8-bit 5" in lines
    assert (
        "photometric interpretation / mode: DICOM MONOCHROME1 5, MONOCHROME2 5; "
        "PNG I;16 5, L 5" in lines
    )
    assert "image size (rows x columns): 28x28 to 28x28" in lines
    assert "pixel spacing: 0.15 to 0.15 mm (10 of 10 DICOM file(s) state it)" in lines
    assert "20 usable image(s), 2 unreadable" in lines
    unreadable = [line for line in lines if "unreadable:" in line]
    assert any("colour.dcm" in u and "(0028,0004) is RGB" in u for u in unreadable)
    assert any("broken.dcm" in u for u in unreadable)
    everything = [out, err, caplog.text, *(str(w.message) for w in caught)]
    everything += [str(r.args) for r in caplog.records]
    for secret in dcm.PHI_VALUES:
        assert not any(secret in text for text in everything), secret


def test_data_check_refuses_a_bad_window_setting(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    site = dicom_site(tmp_path / "site", *xray_arrays)
    code = main(
        ["data", "check", str(site), "--classes", "normal,pneumonia", "--dicom-window", "-2"]
    )
    assert code == ConfigError.exit_code
    assert "--dicom-window" in capsys.readouterr().err


def test_node_wrapper_passes_the_dicom_settings(tmp_path: Path) -> None:
    base = ["node", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path), "--insecure"]
    base += ["--allow-unsigned-apps"]
    result = fedhead(*base, "--dicom-window", "-1", "--dicom-frame", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dicom-window=-1 dicom-frame=2" in result.stdout
    plain = fedhead(*base, "--dry-run")
    assert "dicom-" not in plain.stdout  # the node's defaults apply
    one_line_error(
        fedhead(*base, "--dicom-frame", "-1", "--dry-run"), ConfigError.exit_code, "--dicom-frame"
    )
