"""`image_folder`: a user's folder of class sub-folders in, single pictures for prediction.

Every image is written here with Pillow from known pixel values, so each expectation is worked out
by hand (a grey level 200 must come back as 200/255), not by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from capsnet.datasets import DEFAULT_CLASS_NAMES_FILE, DataError, load_class_names, save_class_names
from capsnet.image_folder import (
    IMAGE_SUFFIXES,
    expand_prediction_paths,
    is_image_folder,
    load_for_prediction,
    load_image_folder,
)

# Deliberately not in sorted order: class indices must follow the sorted names.
CLASSES = ("zebra", "apple", "mango")


def save(path: Path, pixels: np.ndarray | tuple | int, size: tuple[int, int] = (28, 28), **kwargs) -> Path:
    """Writes an image of `size` (rows, cols): a uniform grey level, a uniform (r, g, b) colour, or
    the given array."""
    if np.isscalar(pixels):
        pixels = np.full(size, pixels, dtype=np.uint8)
    elif isinstance(pixels, tuple):
        pixels = np.broadcast_to(np.array(pixels, dtype=np.uint8), size + (3,))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, **kwargs)
    return path


def gray_folder(root: Path, n_per_class: int = 4, with_test: bool = True) -> dict[int, str]:
    """Writes uniform grey images, each with its own level; returns {level: class name}."""
    levels = {}
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            level = 5 + 7 * (c * n_per_class + i)
            save(root / "train" / name / f"{i:03d}.png", level)
            levels[level] = name
        if with_test:
            level = 250 - c
            save(root / "test" / name / "t.png", level)
            levels[level] = name
    return levels


def as_pairs(x: np.ndarray, y: np.ndarray, class_names: list[str]) -> list[tuple[str, int]]:
    """(class name from the one-hot label, grey level from pixel [0, 0]) for every image."""
    return sorted((class_names[int(row.argmax())], int(round(float(img[0, 0, 0]) * 255)))
                  for img, row in zip(x, y, strict=True))


def single_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Loading folders
# ---------------------------------------------------------------------------------------------


def test_grayscale_folder(tmp_path: Path) -> None:
    levels = gray_folder(tmp_path)
    ((x_train, y_train), (x_test, y_test)), names = load_image_folder(tmp_path, verbose=False)
    assert names == ["apple", "mango", "zebra"]
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.float32
    assert y_train.shape == (12, 3) and y_test.shape == (3, 3)
    for y in (y_train, y_test):
        assert set(np.unique(y)) == {0.0, 1.0} and (y.sum(axis=1) == 1).all()
    # Each image is uniform, at exactly level/255, and labelled with the folder it came from.
    for x in (x_train, x_test):
        assert (x == x[:, :1, :1, :]).all()
    assert np.allclose(x_train[:, 0, 0, 0] * 255, np.round(x_train[:, 0, 0, 0] * 255), atol=1e-4)
    expected_train = sorted((name, level) for level, name in levels.items() if level < 240)
    expected_test = sorted((name, level) for level, name in levels.items() if level >= 240)
    assert as_pairs(x_train, y_train, names) == expected_train
    assert as_pairs(x_test, y_test, names) == expected_test
    assert np.float32(x_test.max()) == pytest.approx(250 / 255, abs=1e-7)


def test_rgb_folder_exact_colours(tmp_path: Path) -> None:
    colours = {"red": (200, 10, 50), "teal": (0, 128, 128)}
    for name, colour in colours.items():
        for i in range(3):
            save(tmp_path / "train" / name / f"{i}.png", colour, size=(32, 32))
        save(tmp_path / "test" / name / "t.bmp", colour, size=(32, 32))
    ((x_train, y_train), (x_test, y_test)), names = load_image_folder(tmp_path, verbose=False)
    assert names == ["red", "teal"]
    assert x_train.shape == (6, 32, 32, 3) and x_test.shape == (2, 32, 32, 3)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        for img, row in zip(x, y, strict=True):
            expected = np.array(colours[names[int(row.argmax())]], dtype=np.float32) / 255
            assert np.allclose(img, expected, atol=1e-7)


def test_sixteen_bit_and_palette_grey_stay_one_channel(tmp_path: Path) -> None:
    save(tmp_path / "train" / "deep" / "a.png", np.full((28, 28), 30000, dtype=np.uint16))
    save(tmp_path / "train" / "deep" / "b.png", np.full((28, 28), 65535, dtype=np.uint16))
    # Pillow reopens a grey GIF in palette mode "P": it is still grey.
    save(tmp_path / "train" / "gif" / "a.gif", 77)
    save(tmp_path / "train" / "gif" / "b.gif", 0)
    ((x_train, _), (x_test, _)), names = load_image_folder(tmp_path, holdout=0.5, verbose=False)
    assert names == ["deep", "gif"] and len(x_train) == 2 and len(x_test) == 2
    everything = np.concatenate([x_train, x_test])
    assert everything.shape == (4, 28, 28, 1)
    assert sorted(np.unique(everything).tolist()) == pytest.approx([0.0, 77 / 255, 30000 / 65535, 1.0])


def test_mixed_grey_and_colour_becomes_rgb(tmp_path: Path) -> None:
    for i in range(2):
        save(tmp_path / "train" / "grey" / f"{i}.png", 100)
        save(tmp_path / "train" / "colour" / f"{i}.jpg", (255, 0, 0), quality=100, subsampling=0)
    save(tmp_path / "test" / "grey" / "t.png", 100)
    save(tmp_path / "test" / "colour" / "t.png", (0, 0, 255))
    ((x_train, y_train), (x_test, y_test)), names = load_image_folder(tmp_path, verbose=False)
    assert names == ["colour", "grey"]
    assert x_train.shape == (4, 28, 28, 3) and x_test.shape == (2, 28, 28, 3)
    grey = x_train[y_train[:, 1] == 1]
    assert len(grey) == 2 and np.allclose(grey, 100 / 255, atol=1e-7)
    # JPEG is lossy even at quality 100: red stays within a few levels of (255, 0, 0).
    assert np.allclose(x_train[y_train[:, 0] == 1], [1.0, 0.0, 0.0], atol=4 / 255)
    assert np.allclose(x_test[y_test[:, 0] == 1], [0.0, 0.0, 1.0], atol=1e-7)
    assert np.allclose(x_test[y_test[:, 1] == 1], 100 / 255, atol=1e-7)


def test_missing_test_split_is_held_out_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    levels = gray_folder(tmp_path, n_per_class=10, with_test=False)
    data, names = load_image_folder(tmp_path, holdout=0.2, seed=3, verbose=True)
    (x_train, y_train), (x_test, y_test) = data
    out = capsys.readouterr().out
    held_lines = [line for line in out.splitlines() if "held out" in line]
    assert len(held_lines) == 1 and "6 of 30" in held_lines[0]

    assert len(x_train) == 24 and len(x_test) == 6
    # Stratified: 20 % of each class of 10 is 2 images.
    assert (y_test.sum(axis=0) == 2).all() and (y_train.sum(axis=0) == 8).all()
    train_pairs, test_pairs = as_pairs(x_train, y_train, names), as_pairs(x_test, y_test, names)
    assert not set(train_pairs) & set(test_pairs)
    assert sorted(train_pairs + test_pairs) == sorted((name, level) for level, name in levels.items())

    (_, (x_again, _)), _ = load_image_folder(tmp_path, holdout=0.2, seed=3, verbose=False)
    assert np.array_equal(x_again, x_test)
    (_, (x_other, _)), _ = load_image_folder(tmp_path, holdout=0.2, seed=4, verbose=False)
    assert not np.array_equal(x_other, x_test)
    assert capsys.readouterr().out == ""  # verbose=False prints nothing


def test_holdout_must_be_a_share(tmp_path: Path) -> None:
    gray_folder(tmp_path, with_test=False)
    for holdout in (0.0, 1.0):
        with pytest.raises(DataError, match="holdout"):
            load_image_folder(tmp_path, holdout=holdout, verbose=False)


def test_size_mismatch_names_a_file_of_each_size(tmp_path: Path) -> None:
    save(tmp_path / "train" / "a" / "small.png", 10, size=(28, 28))
    save(tmp_path / "train" / "b" / "large.png", 20, size=(32, 32))
    save(tmp_path / "test" / "b" / "t.png", 20, size=(32, 32))
    with pytest.raises(DataError) as excinfo:
        load_image_folder(tmp_path, verbose=False)
    message = single_line_error(excinfo)
    assert "small.png" in message and "large.png" in message
    assert "28x28" in message and "32x32" in message and "--image_size H W" in message


def test_image_size_resizes_everything(tmp_path: Path) -> None:
    save(tmp_path / "train" / "a" / "small.png", 200, size=(28, 28))
    save(tmp_path / "train" / "b" / "large.png", 40, size=(32, 32))
    # Left half 0, right half 255: bilinear keeps the far edges and rises monotonically between.
    ramp = np.zeros((10, 40), dtype=np.uint8)
    ramp[:, 20:] = 255
    save(tmp_path / "test" / "a" / "ramp.png", ramp)
    ((x_train, y_train), (x_test, _)), names = load_image_folder(tmp_path, image_size=(20, 24), verbose=False)
    assert x_train.shape == (2, 20, 24, 1) and x_test.shape == (1, 20, 24, 1)
    assert np.allclose(x_train[y_train[:, 0] == 1], 200 / 255, atol=1e-6)
    assert np.allclose(x_train[y_train[:, 1] == 1], 40 / 255, atol=1e-6)
    row = x_test[0, 10, :, 0]
    assert row[0] == pytest.approx(0, abs=1e-6) and row[-1] == pytest.approx(1, abs=1e-6)
    assert (np.diff(row) >= -1e-6).all() and ((row > 0.01) & (row < 0.99)).any()
    assert x_test.min() >= 0 and x_test.max() <= 1


@pytest.mark.parametrize("bad_name", ["corrupt.png", "truncated.png", "truncated.jpg"])
def test_unreadable_image_is_named(tmp_path: Path, bad_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gray_folder(tmp_path)
    bad = tmp_path / "train" / "apple" / bad_name
    if bad_name.startswith("corrupt"):
        bad.write_bytes(np.random.default_rng(0).bytes(500))
    else:
        # Noise does not compress, so half the file cuts the pixel data itself.
        noise = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
        save(bad, noise)
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    # Even if another module told Pillow to accept truncated files, the loader must refuse them.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError) as excinfo:
        load_image_folder(tmp_path, verbose=False)
    assert bad_name in single_line_error(excinfo)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_non_image_files_are_ignored(tmp_path: Path) -> None:
    gray_folder(tmp_path)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "apple" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "apple" / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    (tmp_path / "train" / "labels.csv").write_text("file,label\n")
    (tmp_path / "train" / ".hidden").mkdir()
    save(tmp_path / "train" / "mango" / "nested" / "extra.PNG", 3)  # nested and upper-case: an image
    ((x_train, _), (x_test, _)), names = load_image_folder(tmp_path, verbose=False)
    assert names == ["apple", "mango", "zebra"]
    assert len(x_train) == 13 and len(x_test) == 3


def test_test_class_not_in_train(tmp_path: Path) -> None:
    gray_folder(tmp_path)
    save(tmp_path / "test" / "kiwi" / "k.png", 9)
    with pytest.raises(DataError) as excinfo:
        load_image_folder(tmp_path, verbose=False)
    assert "kiwi" in single_line_error(excinfo)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/"):
        load_image_folder(tmp_path, verbose=False)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path, verbose=False)
    save(tmp_path / "train" / "a" / "1.png", 1)
    save(tmp_path / "train" / "b" / "1.png", 2)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images"):
        load_image_folder(tmp_path, verbose=False)


def test_is_image_folder(tmp_path: Path) -> None:
    gray_folder(tmp_path / "images")
    assert is_image_folder(tmp_path / "images")
    idx = tmp_path / "idx"
    idx.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (idx / name).write_bytes(b"")
    assert not is_image_folder(idx)
    (tmp_path / "bare" / "train").mkdir(parents=True)
    assert not is_image_folder(tmp_path / "bare")
    assert not is_image_folder(tmp_path / "images" / "train" / "apple" / "000.png")
    assert not is_image_folder(tmp_path / "missing")
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif"} <= set(IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------


def test_class_names_round_trip(tmp_path: Path) -> None:
    path = tmp_path / DEFAULT_CLASS_NAMES_FILE
    assert load_class_names(path) is None
    save_class_names(path, ["apple", "mango", "zèbre"])
    assert json.loads(path.read_text(encoding="utf-8")) == {"class_names": ["apple", "mango", "zèbre"]}
    assert load_class_names(path) == ["apple", "mango", "zèbre"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_CLASS_NAMES_FILE]  # no temp file left


@pytest.mark.parametrize("text", [
    '{"class_names": "apple"}',
    '{"class_names": ["apple", 2]}',
    '{"class_names": {"0": "apple"}}',
    '{"names": ["apple"]}',
    '["apple", "mango"]',
    'not json',
])
def test_class_names_refuse_anything_but_a_list_of_strings(tmp_path: Path, text: str) -> None:
    path = tmp_path / DEFAULT_CLASS_NAMES_FILE
    path.write_text(text)
    with pytest.raises(DataError) as excinfo:
        load_class_names(path)
    assert DEFAULT_CLASS_NAMES_FILE in single_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Prediction inputs
# ---------------------------------------------------------------------------------------------


def test_load_for_prediction_colour_to_grey_with_resize(tmp_path: Path) -> None:
    path = save(tmp_path / "photo.png", (200, 100, 50), size=(40, 30))
    x = load_for_prediction(path, size=(28, 28), channels=1)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    # ITU-R 601-2 luma: 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2, stored as 8 bits.
    assert np.allclose(x, 124.2 / 255, atol=0.5 / 255)


def test_load_for_prediction_grey_to_rgb_and_invert(tmp_path: Path) -> None:
    path = save(tmp_path / "digit.png", 200, size=(28, 28))
    x = load_for_prediction(path, size=(28, 28), channels=3)
    assert x.shape == (28, 28, 3) and np.allclose(x, 200 / 255, atol=1e-7)
    inverted = load_for_prediction(path, size=(32, 32), channels=1, invert=True)
    assert inverted.shape == (32, 32, 1) and np.allclose(inverted, 55 / 255, atol=1e-6)
    colour = load_for_prediction(save(tmp_path / "c.png", (10, 20, 30)), size=(28, 28), channels=3)
    assert np.allclose(colour, np.array([10, 20, 30]) / 255, atol=1e-7)


def test_load_for_prediction_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for path in (bad, tmp_path / "absent.png"):
        with pytest.raises(DataError) as excinfo:
            load_for_prediction(path, size=(28, 28), channels=1)
        assert path.name in single_line_error(excinfo)


def test_expand_prediction_paths(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    save(folder / "b.png", 1)
    save(folder / "sub" / "a.jpg", 2)
    save(folder / "sub" / "deeper" / "c.GIF", 3)
    (folder / "sub" / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"x")
    single = save(tmp_path / "one.bmp", 4)
    missing = tmp_path / "missing.png"
    assert expand_prediction_paths([str(single), str(folder), str(missing)]) == [
        single,
        folder / "b.png",
        folder / "sub" / "a.jpg",
        folder / "sub" / "deeper" / "c.GIF",
        missing,
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        expand_prediction_paths([tmp_path / "empty"])
