from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhead.common.datasets import ReadPolicy, held_out_split, load_site_data, load_test_set
from fedhead.common.errors import DataError
from tests.conftest import write_png

CLASSES = ["normal", "pneumonia"]


def test_image_folder(image_folder: Path) -> None:
    data = load_site_data(image_folder, CLASSES, val_fraction=0.2, seed=0)
    assert len(data.train) + len(data.val) == 20
    assert data.val.class_counts(2) == [2, 2] and data.val_held_out
    assert "train 16 (normal 8, pneumonia 8)" in data.summary(CLASSES)


def test_image_folder_with_train_and_val(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = xray_arrays
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        part = "val" if i % 5 == 0 else "train"
        write_png(tmp_path / part / CLASSES[lab] / f"{i}.png", img)
    data = load_site_data(tmp_path, CLASSES)
    assert (len(data.train), len(data.val)) == (16, 4) and not data.val_held_out


def test_a_site_may_lack_a_class(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    for i, img in enumerate(xray_arrays[0][:6]):
        write_png(tmp_path / "normal" / f"{i}.png", img)
    data = load_site_data(tmp_path, [*CLASSES, "covid"])
    assert data.train.class_counts(3)[1:] == [0, 0]


def test_csv_manifest_with_split_column(csv_manifest: Path) -> None:
    data = load_site_data(csv_manifest, CLASSES)
    assert (len(data.train), len(data.val)) == (16, 4)
    assert data.train.images.describe(0).endswith("img/000.png")


def test_npz_with_class_names_maps_by_name(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = xray_arrays
    path = tmp_path / "site.npz"
    # the site numbers its classes the other way round, and names them
    np.savez(path, images=images, labels=1 - labels, class_names=np.array(["pneumonia", "normal"]))
    data = load_site_data(path, CLASSES, val_fraction=0.1)
    merged = np.concatenate([data.train.labels, data.val.labels])
    assert sorted(merged.tolist()) == sorted(labels.tolist())


def _two_splits(
    path: Path, images: np.ndarray, labels: np.ndarray, splits: tuple[str, str], at: int
) -> Path:
    """An .npz file with the first ``at`` images as split ``splits[0]``, the rest as
    ``splits[1]`` (keys <split>_images and <split>_labels)."""
    arrays = {}
    for split, part in zip(splits, (slice(None, at), slice(at, None)), strict=True):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[part], labels[part]
    np.savez(path, allow_pickle=False, **arrays)  # numeric and string arrays only
    return path


def test_npz_with_string_labels_and_explicit_val(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = xray_arrays
    names = np.array([CLASSES[x] for x in labels])
    data = load_site_data(
        _two_splits(tmp_path / "s.npz", images, names, ("train", "val"), 15), CLASSES
    )
    assert (len(data.train), len(data.val)) == (15, 5)


@pytest.mark.parametrize("fmt", ["folder", "csv", "npz"])
def test_unknown_label_lists_the_expected_classes(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray], fmt: str
) -> None:
    img = xray_arrays[0][0]
    if fmt == "folder":
        write_png(tmp_path / "d" / "covid" / "0.png", img)
        path = tmp_path / "d"
    elif fmt == "csv":
        write_png(tmp_path / "0.png", img)
        path = tmp_path / "m.csv"
        path.write_text("path,label\n0.png,covid\n")
    else:
        path = tmp_path / "s.npz"
        np.savez(path, images=img[None], labels=np.array(["covid"]))
    with pytest.raises(DataError) as err:
        load_site_data(path, CLASSES)
    assert "'covid'" in str(err.value) and "normal, pneumonia" in str(err.value)


def test_npz_integer_labels_out_of_range(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    np.savez(tmp_path / "s.npz", images=xray_arrays[0][:2], labels=np.array([0, 5]))
    with pytest.raises(DataError, match="class_names"):
        load_site_data(tmp_path / "s.npz", CLASSES)


def _bad_path(kind: str, tmp: Path) -> Path:
    """A data path that is wrong in the way ``kind`` names."""
    if kind == "missing":
        return tmp / "nope"
    if kind == "no class folders":
        (tmp / "d").mkdir()
        return tmp / "d"
    if kind == "csv without path/label":
        (tmp / "m.csv").write_text("file,class\na.png,normal\n")
        return tmp / "m.csv"
    if kind == "corrupt npz":
        (tmp / "bad.npz").write_bytes(b"not a zip file")
        return tmp / "bad.npz"
    (tmp / "notes.txt").write_text("x")
    return tmp / "notes.txt"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("no class folders", "no class folders"),
        ("csv without path/label", "'path' and 'label'"),
        ("corrupt npz", "not a readable .npz"),
        ("unsupported file", "neither a folder"),
    ],
)
def test_bad_data_paths_give_one_clear_line(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        load_site_data(_bad_path(kind, tmp_path), CLASSES)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_folder_with_class_folders(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    with pytest.raises(DataError, match="no training images"):
        load_site_data(tmp_path, CLASSES)


def test_held_out_split_is_stratified_and_stable() -> None:
    labels = np.array([0] * 10 + [1] * 20)
    tr, va = held_out_split(labels, 0.2, seed=3)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 30
    assert np.bincount(labels[va]).tolist() == [2, 4]
    assert held_out_split(labels, 0.2, seed=3)[1].tolist() == va.tolist()


def test_server_test_set_prefers_the_test_split(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = xray_arrays
    npz = _two_splits(tmp_path / "t.npz", images, labels, ("train", "test"), 5)
    assert len(load_test_set(npz, CLASSES)) == 15


def test_server_test_set_from_folder_uses_everything(image_folder: Path) -> None:
    assert len(load_test_set(image_folder, CLASSES)) == 20


# --- paths outside the data folder -----------------------------------------------------
def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the data with one real image in it."""
    write_png(tmp_path / "outside" / "x.png", np.full((8, 8), 7, np.uint8))
    return tmp_path / "outside"


def _inside_rows(site: Path) -> list[tuple[str, str]]:
    for i in range(4):
        write_png(site / "img" / f"{i}.png", np.full((8, 8), i, np.uint8))
    return [(f"img/{i}.png", CLASSES[i % 2]) for i in range(4)]


@pytest.mark.parametrize(
    "entry", ["/etc/passwd", "ABS", "../outside/x.png", "img/../../outside/x.png"]
)
def test_csv_paths_leading_outside_the_data_folder_are_refused(
    tmp_path: Path, outside: Path, entry: str
) -> None:
    site = tmp_path / "site"
    entry = str(outside / "x.png") if entry == "ABS" else entry
    manifest = _csv(site / "m.csv", [*_inside_rows(site), (entry, "normal")])
    with pytest.raises(DataError, match=r"1 image path\(s\) lead outside the data folder") as err:
        load_site_data(manifest, CLASSES)
    shown = "/etc/passwd" if entry == "/etc/passwd" else str(outside / "x.png")
    assert shown in str(err.value) and "data-roots" in str(err.value)


def test_symlinks_leading_out_are_refused_unless_their_folder_is_a_data_root(
    tmp_path: Path, outside: Path
) -> None:
    site = tmp_path / "site"
    manifest = _csv(site / "m.csv", [*_inside_rows(site), ("img/link.png", "normal")])
    (site / "img" / "link.png").symlink_to(outside / "x.png")
    with pytest.raises(DataError, match=r"img/link.png -> .*/outside/x.png"):
        load_site_data(manifest, CLASSES)
    # the node option names the folder the symlink may lead into
    data = load_site_data(manifest, CLASSES, policy=ReadPolicy(data_roots=(outside,)))
    assert len(data.train) + len(data.val) == 5
    loaded = [data.train.images.load(i) for i in range(len(data.train))]
    loaded += [data.val.images.load(i) for i in range(len(data.val))]
    assert any(int(img.max()) == 7 for img in loaded)  # the linked image was read
    # a symlink that stays inside the data folder needs no option
    (site / "img" / "link.png").unlink()
    (site / "img" / "link.png").symlink_to(site / "img" / "0.png")
    assert len(load_site_data(manifest, CLASSES).train) > 0


def test_class_folder_symlinks_leading_out_are_refused(image_folder: Path, outside: Path) -> None:
    (image_folder / "normal" / "link.png").symlink_to(outside / "x.png")
    with pytest.raises(DataError, match=r"normal/link.png -> .*/outside/x.png"):
        load_site_data(image_folder, CLASSES)
    (image_folder / "normal" / "link.png").unlink()
    (image_folder / "pneumonia").rename(outside / "pneumonia")
    (image_folder / "pneumonia").symlink_to(outside / "pneumonia")  # a whole class folder
    with pytest.raises(DataError, match=r"10 image path\(s\) lead outside"):
        load_site_data(image_folder, CLASSES)
    data = load_site_data(image_folder, CLASSES, policy=ReadPolicy(data_roots=(outside,)))
    assert len(data.train) + len(data.val) == 20


def test_read_images_for_prediction(tmp_path: Path, image_folder: Path) -> None:
    from fedhead.common.datasets import read_images
    from fedhead.common.images import ImageDecodeError

    assert len(read_images(image_folder)) == 20  # class folders, searched recursively
    npz = tmp_path / "splits.npz"
    imgs = np.zeros((3, 8, 8), np.uint8)
    np.savez(npz, train_images=imgs, test_images=imgs[:2], train_labels=np.zeros(3))
    source = read_images(npz)
    assert len(source) == 5 and source.describe(4) == "splits.npz:test_images[1]"
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path\n1,folder/normal/000.png\n2,missing.png\n")
    listed = read_images(manifest)
    assert len(listed) == 2  # a missing file stays listed, to be counted as unreadable
    with pytest.raises(ImageDecodeError):
        listed.key(1)
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    with pytest.raises(DataError, match="'path' column"):
        read_images(tmp_path / "nopath.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_images(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither an image"):
        read_images(tmp_path / "notes.txt")
