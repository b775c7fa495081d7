from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedhead.common.errors import WeightsError
from fedhead.common.files import atomic_writer
from fedhead.common.weights import (
    WeightsRef,
    find_weights,
    install_bytes,
    install_file,
    sha256_file,
    weights_name_problem,
)

DATA = b"pretend these are weights" * 1000
REF = WeightsRef("net-abcdef12.pth", hashlib.sha256(DATA).hexdigest(), label="backbone net")


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(DATA)
    assert sha256_file(p) == REF.sha256


def test_find_in_search_dirs_prefers_the_first_matching_copy(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    (b / REF.filename).write_bytes(DATA)
    assert find_weights(REF, [a, b]) == b / REF.filename


def test_missing_file_names_the_file_and_the_folders(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        find_weights(REF, [tmp_path / "x", tmp_path / "y"])
    msg = str(err.value)
    assert REF.filename in msg and str(tmp_path / "x") in msg and "not found" in msg


def test_mismatching_copy_is_refused_with_both_hashes(tmp_path: Path) -> None:
    (tmp_path / REF.filename).write_bytes(DATA + b"tampered")
    with pytest.raises(WeightsError) as err:
        find_weights(REF, [tmp_path])
    assert "sha256" in str(err.value) and REF.sha256[:16] in str(err.value)


def test_a_good_copy_elsewhere_wins_over_a_bad_one(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    (bad / REF.filename).write_bytes(b"corrupt")
    (good / REF.filename).write_bytes(DATA)
    assert find_weights(REF, [bad, good]) == good / REF.filename


def test_explicit_path_must_exist_and_match(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        find_weights(REF, [], explicit=tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"x")
    with pytest.raises(WeightsError, match="sha256"):
        find_weights(REF, [], explicit=wrong)


def test_install_bytes_refuses_altered_data_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="refusing"):
        install_bytes(DATA[:-1] + b"!", REF, tmp_path)
    assert list(tmp_path.iterdir()) == []
    path = install_bytes(DATA, REF, tmp_path)
    assert path.read_bytes() == DATA


def test_install_file_copies_verified(tmp_path: Path) -> None:
    src = tmp_path / "src.pth"
    src.write_bytes(DATA)
    dest = install_file(src, REF, tmp_path / "cache")
    assert dest.name == REF.filename and sha256_file(dest) == REF.sha256


def test_atomic_writer_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_writer(dest) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "../../outside-cache/planted.pth",
        "/etc/passwd",
        "sub/net.pth",
        "sub\\net.pth",
        ".hidden.pth",
        "-flag.pth",
        "net..pth",
        "net.sh",
        "net.pth\n",
        "",
        "n" * 200 + ".pth",
    ],
)
def test_only_plain_weights_file_names_are_accepted(name: str) -> None:
    assert weights_name_problem(name) is not None
    with pytest.raises(WeightsError, match="refused"):  # so no folder is ever joined to it
        WeightsRef(name, REF.sha256)


def test_registered_style_names_are_plain() -> None:
    for name in ("mobilenet_v2-b0353104.pth", "net-custom-0123456789abcdef.pth", "m.safetensors"):
        assert weights_name_problem(name) is None
